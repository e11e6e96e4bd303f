"""Subcommands of the `tandem` CLI, one module each."""
