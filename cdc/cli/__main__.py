"""`python -m cdc.cli`: the `cdc` command."""

from cdc.cli import main

main()
