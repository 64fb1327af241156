"""The one exception type users see: a one-line message naming the file or argument and the problem."""


class LowbitError(Exception):
    """A user-facing error; the CLI prints `error: <message>` and exits with status 2."""
