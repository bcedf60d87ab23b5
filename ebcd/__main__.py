"""`python -m ebcd` is the `ebcd` command."""

from ebcd.cli import main

main()
