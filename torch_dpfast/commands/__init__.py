"""The subcommands of the ``dpfast`` command (cli.py builds the parser)."""


class UsageError(Exception):
    """A bad flag value or data file: reported as ``dpfast CMD: error: ...``, exit status 2."""
