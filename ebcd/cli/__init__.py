"""The `ebcd` command line: commands, rendering, the demo."""
