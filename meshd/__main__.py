"""`python -m meshd` is the `meshd` command (a binary upgrade re-executes it this way)."""

from meshd.cli import main

main()
