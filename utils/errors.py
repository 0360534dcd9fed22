"""The one exception type a user sees as a one-line message and exit status 2."""


class UsageError(Exception):
    """A problem with the user's input: the CLI prints the message alone and exits 2."""
