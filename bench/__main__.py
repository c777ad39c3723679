"""`python -m bench` (what `make bench` runs): see the package docstring."""

import sys

from bench.cli import main

sys.exit(main())
