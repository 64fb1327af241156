"""The one exception type users see: a one-line message naming the file or argument and the problem."""
from contextlib import contextmanager


class LowbitError(Exception):
    """A user-facing error; the CLI prints `error: <message>` and exits with status 2."""


class LowbitWarning(UserWarning):
    """A user-facing warning (e.g. NaN weights without --strict); the CLI prints `warning: <message>`."""


def first_line(e: BaseException) -> str:
    """A library exception reduced to one line for a LowbitError message (its type name if it says nothing)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__


@contextmanager
def about_file(path, doing: str = "cannot load"):
    """The last-resort boundary around reading a user's file: a LowbitError passes through; any other
    exception the file provoked (a check nobody wrote yet) becomes one naming the file, `path: doing (Type:
    first line)`, chained to the original for --debug."""
    try:
        yield
    except LowbitError:
        raise
    except Exception as e:
        raise LowbitError(f"{path}: {doing} ({type(e).__name__}: {first_line(e)})") from e
