"""`python -m ebcd` is the `ebcd` command."""

from ebcd.cli.commands import main

main()
