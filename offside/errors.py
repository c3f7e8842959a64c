"""One error type for bad input: the CLI prints its message on one line and exits non-zero."""


class OffsideError(Exception):
    """Bad input or configuration; the message names the file, record or key that is wrong."""
