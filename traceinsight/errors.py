"""Errors a user can cause, each with a one-line message and an exit code.

``TraceInputError`` (exit 2) means "something is wrong with an input file, an option or an
output path: here is what and which, and what to do". Its subclasses name the kind of
problem for callers of the Python API; the CLI treats them all alike. Anything else escaping
the CLI is an internal error (exit 1, with a hint to report it and to rerun with
``--debug``). ``docs/errors.md`` lists every message.

Every class takes ``(message, *, path=None)`` and nothing else, so that an error raised in a
worker process survives pickling back to the parent unchanged.
"""

from __future__ import annotations

import re
import signal
import threading

EXIT_OK = 0
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
        # One line, whatever the message quotes (library errors may quote file content).
        self.message = message = one_line(message, limit=None)
        super().__init__(f"{one_line(path, limit=None)}: {message}" if path else message)


class TraceFormatError(TraceInputError):
    """The file is not a trace of a supported format, or it is damaged (truncated, corrupt)."""


class TraceTooLargeError(TraceInputError):
    """Reading the file would need more memory than is available (checked before reading)."""


class OptionError(TraceInputError):
    """A command-line option has a value that cannot work (e.g. an invalid regex)."""


class OutputError(TraceInputError):
    """An output file cannot be written where the user asked."""


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]+")


def one_line(text: str, *, limit: int | None = 200) -> str:
    """``text`` on one line: line breaks and other control characters become a space, runs
    of spaces one space, and (with ``limit``) at most ``limit`` characters, cut with "…".

    For quoting untrusted text (a library's error message that quotes a damaged file) in a
    message.
    """
    text = re.sub(r" {2,}", " ", _CONTROL.sub(" ", str(text))).strip()
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def check_pattern(pattern: str, *, option: str, groups: int | None = None) -> None:
    """Raise :class:`OptionError` unless ``pattern`` is a regex the analyses can use.

    Patterns are matched both by Python's :mod:`re` and by polars (the Rust ``regex`` crate,
    which has no look-around or back-references), so both must accept it.

    Parameters
    ----------
    pattern
        The user's regular expression.
    option
        The option that gave it (``--step-marker``), for the message.
    groups
        The number of capture groups it must have, if any.
    """
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise OptionError(
            f"{option} '{pattern}' is not a valid regular expression ({exc})"
        ) from None
    if groups is not None and compiled.groups != groups:
        found = "no capture group" if compiled.groups == 0 else f"{compiled.groups} capture groups"
        raise OptionError(
            f"{option} '{pattern}' has {found}; it needs exactly {groups}, around the step "
            r"number, e.g. 'train_step_(\d+)' (write (?:...) for other groups)"
        )
    import polars as pl

    try:
        pl.Series([""], dtype=pl.String).str.contains(pattern)
    except pl.exceptions.PolarsError as exc:
        lines = [line.strip() for line in str(exc).splitlines()]
        reason = next((line[6:].strip() for line in lines if line.startswith("error:")), "")
        raise OptionError(
            f"{option} '{pattern}' cannot be used: {reason or 'the regex engine rejects it'} "
            "in polars' regex engine (no look-around, no back-references)"
        ) from None


# Line breaks and other characters that move the cursor or end a line in a terminal: C0
# controls (newline and tab included), DEL, the C1 controls (NEL U+0085, CSI U+009B) and
# Unicode's line and paragraph separators.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text) -> str:
    """Untrusted text for one terminal line: every control character (line breaks, tabs,
    escapes) becomes U+FFFD, so a name cannot start a line of its own (``traceinsight:
    error: ...``) or drive the terminal. ``None`` is the empty string."""
    return "" if text is None else _UNPRINTABLE.sub("\ufffd", str(text))


#: The largest rank number a trace can hold (ranks are 32-bit), and the most ranks an
#: option may name.
MAX_RANK = 2**31 - 1
MAX_RANKS_LISTED = 1_000_000


def check_finite(value: float | None, *, option: str, example: str) -> None:
    """Raise :class:`OptionError` for a number option given ``nan`` or ``inf``."""
    import math

    if value is not None and not math.isfinite(value):
        raise OptionError(f"{option} {value} is not a finite number; give a number like {example}")


def check_rank_bounds(first: int, last: int, *, text: str, option: str = "--ranks", already: int = 0) -> None:
    """Raise :class:`OptionError` for a rank range that no trace can hold, before a list of
    its ranks is built (``0-20000000000`` would exhaust memory); ``already``: ranks listed
    before this range."""
    if last > MAX_RANK:
        raise OptionError(f"{option} '{one_line(text, limit=60)}': rank {last:,} is beyond the largest "
                          f"rank number ({MAX_RANK:,})")
    if already + last - first + 1 > MAX_RANKS_LISTED:
        raise OptionError(f"{option} '{one_line(text, limit=60)}' names more than {MAX_RANKS_LISTED:,} "
                          "ranks; list fewer")


#: Exit status of a process ended by SIGTERM (128 + 15), as a shell reports it.
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(SystemExit):
    """Raised in the main thread when SIGTERM arrives (a ``SystemExit`` with status 143)."""

    def __init__(self) -> None:
        super().__init__(EXIT_TERMINATED)


def _raise_terminated(signum, frame):  # noqa: ARG001 - the signal module's signature
    raise Terminated()


def exit_cleanly_on_sigterm() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread (where Python runs signal
    handlers), unless someone else already handles it. Idempotent."""
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        current = signal.getsignal(signal.SIGTERM)
        if current in (signal.SIG_DFL, None) or current is _raise_terminated:
            signal.signal(signal.SIGTERM, _raise_terminated)
    except (ValueError, OSError):  # not the main interpreter, or no signals here
        pass
