"""Subcommands of the `megatron-rlvr` CLI, one module each (see cli.SUBCOMMANDS)."""
