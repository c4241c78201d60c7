"""Errors a user can cause, each with a one-line message and an exit code.

``TraceInputError`` (exit 2) means "something is wrong with an input file or argument: here is
what and which". Anything else escaping the CLI is an internal error (exit 1).
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


class TraceInputError(Exception):
    """A problem with the user's input, explained in one line.

    Parameters
    ----------
    message
        What is wrong and, where useful, what to do about it.
    path
        The file concerned, if any; it prefixes the message.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)
