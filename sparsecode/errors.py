"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class SparsecodeError(ValueError):
    """A problem with the user's input, configuration or files (not a bug in sparsecode)."""
