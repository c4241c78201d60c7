"""The streaming path: a well-formed trace read a chunk of events at a time.

:func:`_read_streaming` never holds the file's text or all its events: :func:`_text_blocks`
decompresses a block of text at a time, :func:`_stream_header` reads the keys before the
event array, :func:`_next_chunk` cuts the array at an event boundary
(:func:`_event_boundary`) about every ``_CHUNK_BYTES`` and decodes the chunk, and the chunk
becomes prepared columns (:mod:`.columns`) before the next block is read.
:class:`_ExactTimesStream` re-reads a chunk's stamps exactly where float64 loses digits. A
file this path cannot take exactly as the whole-file path would (:class:`_NotStreamable`, a
decode error) goes to :mod:`.whole_file`.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator
from typing import Any

import msgspec
import polars as pl

import traceinsight.ingest.guard as guard
from traceinsight.ingest.kineto.classify import _kept_events
from traceinsight.ingest.kineto.columns import _as_int, _float_series, _gather_columns, _Prepared, _RawColumns
from traceinsight.ingest.kineto.columns import _ReadColumns
from traceinsight.ingest.kineto.schema import _TOP_FIELDS, _Event, _ExactTime, _TopLevel
from traceinsight.ingest.kineto.times import _FLOAT_EXACT_LIMIT_US, _FRACTIONAL_STAMP, _exact_columns
from traceinsight.ingest.kineto.times import _needs_exact_times
from traceinsight.ingest.kineto.whole_file import _GZIP_MAGIC, _INFLATE_INPUT, _WHITESPACE

#: JSON text of the event array decoded per chunk: bounds the structs alive at once. Small
#: chunks also leave Python's allocator fewer 1 MiB arenas that a few long-lived objects
#: keep from being freed (on the 333 MB trace: 16 MB chunks left 45 arenas, 4 MB 27, 2 MB
#: 23, but 2 MB chunks took 25% longer).
_CHUNK_BYTES = 1 << 22
#: Decompressed text taken from the file at a time by the streaming reader.
_STREAM_BLOCK = 1 << 22
#: The streaming reader looks this far into the text for the ``traceEvents`` key.
_MAX_HEADER_BYTES = 1 << 26
#: Tries per chunk to find an event boundary (a ``},`` inside ``args`` can look like one).
_CHUNK_TRIES = 16
#: A ``}`` followed by a comma: where an event may end and the next begin.
_EVENT_END = re.compile(rb"\}[ \t\r\n]*,")
#: The key opening the event array, and the array's ``[``.
_EVENTS_KEY = re.compile(rb'"traceEvents"[ \t\r\n]*:[ \t\r\n]*\[')


class _NotStreamable(Exception):
    """The file needs the whole-file path, which tells errors apart, salvages and reads
    loosely typed fields."""


def _text_blocks(path: str, limit: int | None) -> Iterator[bytes]:
    """The file's (decompressed) text, about ``_STREAM_BLOCK`` bytes at a time.

    Gzip members back to back, with zero padding between or after them, read as one text,
    as in :func:`_gunzip`. A damaged or cut gzip stream raises :class:`_NotStreamable`: the
    whole-file path words the error or salvages. More than ``limit`` bytes of text raise
    the same error as the whole-file path.
    """
    try:
        handle = guard.open_regular(path)
    except OSError:
        raise _NotStreamable from None
    with handle:
        if handle.read(2) != _GZIP_MAGIC:
            handle.seek(0)
            while block := handle.read(_STREAM_BLOCK):
                yield block
            return
        handle.seek(0)
        written = 0
        pending = b""  # compressed bytes read but not yet given to zlib
        while True:  # one gzip member per round
            inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
            while not inflater.eof:
                if not pending:
                    pending = handle.read(_INFLATE_INPUT)
                    if not pending:
                        raise _NotStreamable  # cut short
                try:
                    block = inflater.decompress(pending, _STREAM_BLOCK)
                except zlib.error:
                    raise _NotStreamable from None
                pending = inflater.unconsumed_tail
                written += len(block)
                if limit is not None and written > limit:
                    raise guard.inflate_limit_error(path, limit)
                guard.check_inflation(path, written, handle.tell() - len(pending))
                if block:
                    yield block
            pending = inflater.unused_data
            while True:  # zero padding, then another member or the end
                pending = pending.lstrip(b"\0")
                if pending:
                    break
                pending = handle.read(_INFLATE_INPUT)
                if not pending:
                    return
            if len(pending) < 2:
                pending += handle.read(1)
            if pending[:2] != _GZIP_MAGIC:
                return  # trailing bytes that are not gzip: ignored, as gzip(1) does


def _read_streaming(path: str, *, limit: int | None, warnings: list[str]) -> _ReadColumns | None:
    """The prepared columns and top-level keys of a well-formed trace (an object, or a
    2020 bare event list), read from a stream of its text a chunk of events at a time;
    ``None`` to take the whole-file path (malformed or cut JSON, unexpected field types,
    fractional stamps met only after the chunk that decided they were whole, no ``ph``).

    Neither the file's text nor its events are ever whole in memory: a block of text is
    decompressed, the event array is cut at an event boundary about every ``_CHUNK_BYTES``,
    and each chunk's structs become polars columns before the next block is read. A cut is
    right exactly when ``[`` + the chunk + ``]`` decodes, since a cut inside an event (or
    inside a string) leaves a bracket or a quote open. The text before the array is checked
    the same way (it must decode as an object once the array is closed), and the text after
    the last cut is decoded as ``{"traceEvents":[`` + the rest, which checks the end of the
    file and reads any keys written after the events. Every byte is decoded once, so the
    whole text is checked to be JSON, as a whole-file decode would.
    """
    blocks = _text_blocks(path, limit)
    buffer = bytearray()

    def read_more() -> bool:
        block = next(blocks, None)
        if block is None:
            return False
        buffer.extend(block)
        return True

    try:
        header, position, is_list = _stream_header(buffer, read_more)
        if header is None:
            return None
        prepared = _Prepared()
        columns = _RawColumns(prepared)
        times = _ExactTimesStream()
        seen = {"events": 0, "with_ph": False}

        def take(events: list[Any], text: bytes | msgspec.Raw) -> None:
            """Add one chunk's events, decoded from ``text`` (a JSON array)."""
            seen["events"] += len(events)
            seen["with_ph"] = seen["with_ph"] or any(event.ph for event in events)
            kept = _kept_events(events)
            columns.add(_gather_columns(kept, lenient=False), extra=times.columns(events, kept, text))

        while True:
            events, text, resume = _next_chunk(buffer, position, read_more)
            if events is None:
                break
            take(events, text)
            del events, text
            del buffer[:resume]  # cheap: CPython drops a bytearray's head in place
            position = 0
        # The rest of the array, its ']' and the keys after it, as one small object (a bare
        # list's rest ends with its ']').
        rest = bytearray(b'{"traceEvents":[')
        rest += memoryview(buffer)[position:]
        if is_list:
            rest += b"}"
        del buffer[:]
        tail = msgspec.json.decode(rest, type=_TopLevel)
        del rest
        take(msgspec.json.decode(tail.traceEvents, type=list[_Event]), tail.traceEvents)
        tail.traceEvents = None
    except (_NotStreamable, msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    finally:
        blocks.close()
    if seen["events"] and not seen["with_ph"]:
        return None
    for key in _TOP_FIELDS:  # a key written after the events wins, as in a whole decode
        if getattr(tail, key) is None:
            setattr(tail, key, getattr(header, key))
    base = _as_int(tail.baseTimeNanoseconds)
    if base is None and prepared.needs_exact and not times.exact:
        return None  # stamps that needed the exact re-decode were met too late
    read = _ReadColumns(columns.frame(), tail, base, prepared)
    del columns
    warnings.extend(prepared.scrub_notes())
    return read


def _stream_header(buffer: bytearray, read_more) -> tuple[Any, int, bool]:
    """The top-level keys before the event array, the offset just past its ``[``, and
    whether the text is a bare event list (2020); ``(None, 0, False)`` when the text is
    neither a list nor an object with a ``traceEvents`` array near its start (the
    whole-file path then says why)."""
    searched = 0
    while True:
        start = len(buffer) - len(buffer.lstrip(_WHITESPACE))
        if start < len(buffer):
            break
        if not read_more():
            return None, 0, False
    if buffer[start] == ord("["):
        return _TopLevel(None), start + 1, True
    if buffer[start] != ord("{"):
        return None, 0, False  # a BOM, or not JSON
    while True:
        found = _EVENTS_KEY.search(buffer, searched)
        if found is None:
            # The key may straddle the end of what was read: search its last bytes again.
            searched = max(searched, len(buffer) - 64)
            if len(buffer) > _MAX_HEADER_BYTES or not read_more():
                return None, 0, False
            continue
        # A match inside a string or a nested object leaves the prefix unbalanced.
        prefix = bytearray(memoryview(buffer)[: found.start()])
        prefix += b'"traceEvents":[]}'
        try:
            header = msgspec.json.decode(prefix, type=_TopLevel)
        except msgspec.DecodeError:
            searched = found.start() + 1
            continue
        return header, found.end(), False


def _next_chunk(buffer: bytearray, position: int, read_more) -> tuple[list[Any] | None, bytes, int]:
    """Decode the events from ``position`` to an event boundary at least ``_CHUNK_BYTES``
    further; returns them, their text as a JSON array and where the next chunk starts, or
    ``(None, b"", position)`` when the text ends first (the rest is decoded with the end of
    the file).

    Raises ``msgspec.DecodeError`` (a ``ValidationError``: a field of an unexpected type)
    and :class:`_NotStreamable` when no boundary decodes.
    """
    cut = position + _CHUNK_BYTES
    tries = 0
    while True:
        found = _event_boundary(buffer, cut, read_more)
        if found is None:
            return None, b"", position
        close, resume = found
        chunk = bytearray(b"[")
        chunk += memoryview(buffer)[position:close]
        chunk += b"]"
        try:
            return msgspec.json.decode(chunk, type=list[_Event]), chunk, resume
        except msgspec.ValidationError:
            raise
        except msgspec.DecodeError:
            tries += 1
            if tries >= _CHUNK_TRIES:
                raise _NotStreamable from None
            cut = close  # that '}' closed something inside an event: try the next one


_NOT_WHITESPACE = re.compile(rb"[^ \t\r\n]")


def _event_boundary(buffer: bytearray, start: int, read_more) -> tuple[int, int] | None:
    """The first ``}`` + whitespace + ``,`` at or after ``start`` (reading more text as
    needed): the offset just past the ``}`` and just past the ``,``; ``None`` when the text
    ends first.

    Every byte is scanned about once, however long the run of text without a boundary
    (one huge event, or gigabytes of whitespace): after a failed search only the text read
    since is searched, and a ``}`` followed by whitespace up to the end of what was read is
    remembered rather than searched again.
    """
    scan = start
    while True:
        if scan < len(buffer):
            found = _EVENT_END.search(buffer, scan)
            if found is not None:
                return found.start() + 1, found.end()
            brace = buffer.rfind(b"}", scan)
            scan = len(buffer)
            if brace >= 0 and _NOT_WHITESPACE.search(buffer, brace + 1) is None:
                while True:  # only whitespace after that '}' so far: what comes next?
                    if not read_more():
                        return None
                    other = _NOT_WHITESPACE.search(buffer, scan)
                    if other is None:
                        scan = len(buffer)
                        continue
                    if buffer[other.start()] == ord(","):
                        return brace + 1, other.end()
                    scan = other.start()
                    break
                continue
        if not read_more():
            return None


class _ExactTimesStream:
    """Exact (Decimal) times for a streamed file whose stamps need them: absolute epoch µs
    written with a fraction (Kineto from March to May 2024), where float64 loses the last
    nanosecond digits.

    The first chunk with usable stamps decides (by its text: a float can hide a fraction);
    from then on each chunk's text is decoded a second time for ``ts`` and ``dur`` alone, as
    the whole-file path decodes the whole text. A file whose stamps turn fractional only
    after that decision is re-read whole (:func:`_read_streaming` checks :attr:`exact`).
    """

    def __init__(self) -> None:
        self.exact: bool | None = None
        self.absolute = False

    def columns(self, events: list[Any], kept: list[Any], text: bytes | msgspec.Raw) -> dict[str, pl.Series] | None:
        if self.exact is None:
            stamps = _float_series("ts", [event.ts for event in kept]).drop_nulls()
            if stamps.is_empty():
                return None
            self.absolute = bool(stamps.abs().max() >= _FLOAT_EXACT_LIMIT_US)
            self.exact = _needs_exact_times(stamps, text)
        elif not self.exact and self.absolute and _FRACTIONAL_STAMP.search(memoryview(text)):
            raise _NotStreamable  # fractions after the decision: the whole-file path reads them
        if not self.exact:
            return None
        exact_events = msgspec.json.decode(text, type=list[_ExactTime])  # DecodeError: re-read whole
        extra = _exact_columns(events, exact_events, kept)
        if extra is None:
            raise _NotStreamable
        return extra
