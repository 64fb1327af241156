"""The one exception type users see: a one-line message naming the file or argument and the problem."""


class LowbitError(Exception):
    """A user-facing error; the CLI prints `error: <message>` and exits with status 2."""


def first_line(e: BaseException) -> str:
    """A library exception reduced to one line for a LowbitError message (its type name if it says nothing)."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__
