"""The command's two kinds of error: bad usage (exit status 2) and a failure while running (1)."""

from __future__ import annotations

from contextlib import contextmanager

from ..checkpoint import CorruptFileError, UnsafeFileError

__all__ = ["CliError", "RunError", "usage_errors"]


class CliError(Exception):
    """Bad usage, found before any work: one line on stderr, exit status 2."""


class RunError(Exception):
    """A failure while running that the command explains itself: one line, exit status 1."""


@contextmanager
def usage_errors(context: str = ""):
    """Turn the errors that bad input raises while a command is being set up into CliError."""
    try:
        yield
    except CliError:
        raise
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError, TypeError,
            KeyError, ImportError, UnsafeFileError, CorruptFileError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        if isinstance(error, KeyError):
            message = f"missing entry {message}"
        raise CliError(f"{context}{message}") from None
