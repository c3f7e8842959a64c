"""Subcommands of `offside` provided by this package (ray is imported inside the command functions)."""


def add_commands(sub) -> None:
    """Adds this package's subcommands to the `offside` parser."""
