"""`python scripts/bench.py`: the same as `python -m bench` from the repository root (the
benchmark is the package bench/; see its docstring and bench/README.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
