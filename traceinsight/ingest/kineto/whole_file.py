"""The whole-file path: gzip and whole-file decoding, for the files the stream cannot take.

Malformed or truncated JSON, ``--salvage``, fields of unexpected JSON types: this path holds
the whole text, which lets it tell errors apart (empty, not gzip, corrupt or cut gzip, cut or
malformed JSON, JSON that is not a trace), retry leniently, salvage and re-read fractional
stamps exactly:

- :func:`_read_file` and :func:`_gunzip`: the bytes, inflated into one buffer (gzip members
  back to back read as one text; a gzip bomb stops at the inflate limit of
  :mod:`traceinsight.ingest.guard`);
- :func:`_decode`: the fast structs of :mod:`.schema`, else the lenient ones (values coerced
  one by one: slow, but a trace is never rejected over a field the model only uses for
  enrichment); text that is not UTF-8 is decoded again with replacements;
- :func:`_salvage`: a file cut mid-write, up to its last complete event;
- :func:`_whole_file_columns`: the decoded events as prepared columns, as the stream makes
  them chunk by chunk.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from typing import Any

import msgspec
import polars as pl

import traceinsight.ingest.guard as guard
from traceinsight.errors import TraceFormatError, TraceInputError
from traceinsight.ingest.kineto.classify import _IGNORED_CATEGORIES, _kept_events
from traceinsight.ingest.kineto.columns import _as_int, _float_series, _gather_columns, _Prepared, _RawColumns
from traceinsight.ingest.kineto.columns import _ReadColumns
from traceinsight.ingest.kineto.schema import _ARG_FIELDS, _EVENT_FIELDS, _Event, _ExactTime, _ExactTraceFile
from traceinsight.ingest.kineto.schema import _LenientEvent, _LenientTraceFile, _TraceFile
from traceinsight.ingest.kineto.times import _exact_columns, _needs_exact_times

_GZIP_MAGIC = b"\x1f\x8b"
#: A gzip size trailer claiming more than this ratio is not trusted (JSON traces: 10-30x).
_MAX_COMPRESSION_RATIO = 100
#: Compressed bytes fed to zlib per call: slicing the input avoids the copies that
#: ``max_length`` makes of the unconsumed rest.
_INFLATE_INPUT = 1 << 20
#: ... and per call when salvaging a damaged stream (zlib loses a failing call's output).
_SALVAGE_INPUT = 1 << 12
#: At most this much output per zlib call, so that the inflate limit stops a gzip bomb early.
_MAX_CHUNK = 1 << 25
_WHITESPACE = b" \t\r\n"
#: Salvage looks no further back than this for the start of the last event.
_MAX_EVENT_BYTES = 1 << 24
#: Salvage parses the dropped tail for late metadata keys only up to this size.
_MAX_TAIL_BYTES = 1 << 26


def _read_file(path: str) -> bytes:
    try:
        with guard.open_regular(path) as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise TraceInputError("no such file", path=path) from None
    except IsADirectoryError:
        raise TraceInputError("is a directory; pass the trace files in it", path=path) from None
    except OSError as exc:
        raise TraceInputError(f"cannot read: {exc.strerror}", path=path) from None
    if not raw:
        raise TraceFormatError(
            "empty file (0 bytes); was the profiler stopped before it wrote the trace?", path=path
        )
    return raw


def _gunzip(
    raw: bytes, *, path: str, salvage: bool, warnings: list[str], limit: int | None = None
) -> bytearray:
    """Inflate every gzip member into one buffer.

    ``zlib.decompress`` collects its output in blocks and joins them at the end, which needs
    twice the decompressed size for a moment. Filling a buffer sized from the gzip trailer
    (ISIZE: the size modulo 4 GiB, so only a hint) keeps the peak at one copy. More than
    ``limit`` decompressed bytes (a gzip bomb, or a trace larger than memory) stop the read.
    """
    hint = _inflated_size_hint(raw) or 16 * len(raw)
    out = bytearray(hint if limit is None else min(hint, limit))
    source = memoryview(raw)

    def inflate(position: int, written: int, step: int):
        """Inflate one member from ``position``; returns where input and output stopped,
        the inflater and the zlib error that stopped it, if any."""
        inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
        try:
            while not inflater.eof and position < len(raw):
                piece = source[position : position + step]
                position += len(piece)
                chunk = inflater.decompress(piece, _MAX_CHUNK)
                while True:
                    end = written + len(chunk)
                    if limit is not None and end > limit:
                        raise guard.inflate_limit_error(path, limit)
                    guard.check_inflation(path, end, position - len(inflater.unconsumed_tail))
                    if end > len(out):  # grow geometrically: each growth may copy the buffer
                        out.extend(bytes(max(end - len(out), len(out) // 2)))
                    out[written:end] = chunk
                    written = end
                    if not inflater.unconsumed_tail:  # only a gzip bomb leaves input here
                        break
                    chunk = inflater.decompress(inflater.unconsumed_tail, _MAX_CHUNK)
        except zlib.error as exc:
            return position, written, inflater, exc
        return position, written, inflater, None

    written = 0
    position = 0
    while True:  # one gzip member per round
        member_start, member_written = position, written
        position, written, inflater, error = inflate(position, written, _INFLATE_INPUT)
        if error is not None:
            reason = _zlib_reason(error)
            if not salvage:
                raise TraceFormatError(
                    f"gzip data is corrupt ({reason}); the file was damaged after it was "
                    "written; --salvage reads what precedes the damage",
                    path=path,
                )
            # zlib drops the output of the call that fails: again in small steps, to keep
            # what inflates before the damage.
            _, written, _, _ = inflate(member_start, member_written, _SALVAGE_INPUT)
            warnings.append(
                f"gzip data is corrupt ({reason}); read the {written:,} decompressed bytes "
                "before the damage"
            )
            break
        if not inflater.eof:
            if not salvage:
                raise TraceFormatError(
                    f"gzip data ends early, after {written:,} decompressed bytes (file cut "
                    "short?); if the job crashed mid-write, retry with --salvage",
                    path=path,
                )
            warnings.append(f"gzip stream is truncated; decompressed its first {written:,} bytes")
            break
        # Several members back to back (``cat a.gz b.gz``) make one valid gzip file;
        # zero padding between or after them is tolerated, as gzip(1) does.
        position -= len(inflater.unused_data)
        while position < len(raw) and raw[position] == 0:
            position += 1
        if raw[position : position + 2] != _GZIP_MAGIC:
            break
    del out[written:]
    return out


def _zlib_reason(exc: zlib.error) -> str:
    """zlib's message without its error number, in words people know."""
    text = re.sub(r"^Error -?\d+ while decompressing data:?\s*", "", str(exc))
    if "incorrect data check" in text:
        return "checksum mismatch"
    return text or "unreadable deflate stream"


def _inflated_size_hint(raw: bytes) -> int | None:
    """The gzip trailer's ISIZE when it is believable, else None.

    ISIZE is the size modulo 4 GiB of the last member only, and a truncated file ends in
    four arbitrary bytes; trusting those blindly could allocate gigabytes for nothing.
    Profiler JSON compresses 10-30x, so anything far outside that is not used.
    """
    if len(raw) < 18:
        return None
    size = int.from_bytes(raw[-4:], "little")
    return size if len(raw) <= size <= _MAX_COMPRESSION_RATIO * len(raw) else None


@dataclass
class _Decoded:
    trace: Any  # a _TraceFile, or a _LenientTraceFile when ``lenient``
    lenient: bool
    is_list: bool  # the 2020 format: a bare list of events
    source: bytes | bytearray | None  # the JSON decoded, kept for an exact re-decode of times


def _decode(data: bytes | bytearray, *, path: str, salvage: bool, warnings: list[str]) -> _Decoded:
    first = _first_json_byte(data)
    if first not in (b"{", b"["):
        if not first:
            raise TraceFormatError("file holds only whitespace", path=path)
        raise TraceFormatError(
            "not a JSON trace (expected a PyTorch profiler trace starting with '{' or '[')",
            path=path,
        )
    is_list = first == b"["
    try:
        return _decode_json(data, is_list=is_list, path=path, salvage=salvage, warnings=warnings)
    except (UnicodeDecodeError, _NotUTF8):
        # A string holding bytes that are not UTF-8 (a name written by a buggy tool, or
        # damage): replace them, say so, and decode again.
        data = bytes(data).decode("utf-8", "replace").encode("utf-8")
        warnings.append(
            "the file holds text that is not valid UTF-8; the bad bytes were read as U+FFFD"
        )
        return _decode_json(data, is_list=is_list, path=path, salvage=salvage, warnings=warnings)


def _decode_json(
    data: bytes | bytearray, *, is_list: bool, path: str, salvage: bool, warnings: list[str]
) -> _Decoded:
    try:
        trace, lenient = _decode_typed(data, is_list=is_list, path=path)
        return _Decoded(trace, lenient, is_list, data)
    except msgspec.DecodeError as exc:  # malformed JSON (type errors were raised as ours)
        # msgspec < 0.23 raised UnicodeDecodeError for a string that is not UTF-8; 0.23
        # raises a DecodeError ("Invalid UTF-8 encoded string", at varying offsets): check
        # the bytes themselves, whatever the version says.
        if not _is_utf8(data):
            raise _NotUTF8 from None
        offset = _error_offset(exc, len(data))
        if not salvage:
            raise TraceFormatError(
                f"truncated or invalid JSON at byte {offset:,} ({_error_reason(exc)}); "
                "if the job crashed mid-write, retry with --salvage",
                path=path,
            ) from None
    return _salvage(data, offset, is_list=is_list, path=path, warnings=warnings)


class _NotUTF8(Exception):
    """The JSON text holds bytes that are not UTF-8 (decoded again with replacements)."""


def _is_utf8(data: bytes | bytearray, block: int = 1 << 24) -> bool:
    """Whether ``data`` is valid UTF-8, checked a block at a time (no copy of the whole)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(data)
    try:
        for start in range(0, len(view), block):
            decoder.decode(view[start : start + block], final=False)
    except UnicodeDecodeError:  # (a character cut by the end of a truncated file is not bad)
        return False
    return True


def _first_json_byte(data: bytes | bytearray) -> bytes:
    """The first byte that is not a UTF-8 BOM or whitespace (empty if there is none)."""
    offset = 3 if data[:3] == b"\xef\xbb\xbf" else 0
    length = len(data)
    while offset < length and data[offset] in _WHITESPACE:
        offset += 1
    return bytes(data[offset : offset + 1])


def _decode_typed(data: bytes | bytearray, *, is_list: bool, path: str) -> tuple[Any, bool]:
    """Decode with the fast schema, else the lenient one; returns ``(trace, lenient)``.

    Raises ``msgspec.DecodeError`` for malformed JSON and TraceInputError for JSON that is
    well formed but not a trace.
    """
    for lenient in (False, True):
        event_type = _LenientEvent if lenient else _Event
        file_type = _LenientTraceFile if lenient else _TraceFile
        try:
            if is_list:
                trace = file_type(traceEvents=msgspec.json.decode(data, type=list[event_type]))
            else:
                trace = msgspec.json.decode(data, type=file_type)
        except msgspec.ValidationError as exc:
            if lenient or not str(exc).endswith(_RETRY_LENIENT_PATHS):
                raise TraceFormatError(_not_a_trace_message(exc), path=path) from None
            continue
        return trace, lenient
    raise AssertionError("unreachable: the lenient pass returns or raises")


# A ValidationError ending at one of these paths is an event field of an unexpected JSON
# type, worth a lenient retry; anything else means the JSON is not a trace at all.
_RETRY_LENIENT_PATHS = tuple(
    [f"].{name}`" for name, _, _ in _EVENT_FIELDS]
    + [f".args.{key}`" for _, key, _ in _ARG_FIELDS]
    + ["].args`"]
)


def _not_a_trace_message(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    if "missing required field `traceEvents`" in text:
        return "JSON object has no traceEvents: not a PyTorch profiler trace"
    if text.endswith("- at `$.traceEvents`"):
        return "traceEvents is not a list of events: not a PyTorch profiler trace"
    return f"not a PyTorch profiler trace: wrong JSON type ({text})"


_BYTE_IN_MESSAGE = re.compile(r"\s*\(byte (\d+)\)")


def _error_offset(exc: msgspec.DecodeError, length: int) -> int:
    match = _BYTE_IN_MESSAGE.search(str(exc))
    return int(match.group(1)) if match else length  # "truncated" errors carry no offset


def _error_reason(exc: msgspec.DecodeError) -> str:
    text = _BYTE_IN_MESSAGE.sub("", str(exc)).strip()
    if "truncated" in text:
        return "the text ends in the middle of a value"
    return text.removeprefix("JSON is malformed:").strip() or "malformed"


def _salvage(
    data: bytes | bytearray, error_offset: int, *, is_list: bool, path: str, warnings: list[str]
) -> _Decoded:
    """Decode the events up to the last complete one before ``error_offset``.

    Kineto writes the metadata keys, then the event array, then (some versions) a few more
    keys. A file cut mid-write therefore usually ends inside the array: cut after the last
    event that closes completely, close the array and the object, and decode that.
    """
    array_start = _events_array_start(data, is_list)
    nothing = (
        f"truncated or invalid JSON at byte {error_offset:,} and no complete trace event "
        "before it; nothing to salvage"
    )
    if array_start is None:
        raise TraceFormatError(nothing, path=path)
    closing = b"]" if is_list else b"]}"
    search_before = min(error_offset, len(data))
    for _attempt in range(16):
        end = _last_event_end(data, array_start, search_before)
        if end is None:
            break
        candidate = bytearray(memoryview(data)[: end + 1])
        candidate += closing
        try:
            trace, lenient = _decode_typed(candidate, is_list=is_list, path=path)
        except msgspec.DecodeError:
            search_before = end  # that brace closed something inside an event; look earlier
            continue
        if not is_list:
            _recover_trailing_keys(trace, memoryview(data)[end + 1 :])
        warnings.append(
            f"salvaged a truncated trace: kept {len(trace.traceEvents):,} complete events, "
            f"dropped the last {len(data) - end - 1:,} bytes"
        )
        return _Decoded(trace, lenient, is_list, candidate)
    raise TraceFormatError(nothing, path=path)


def _events_array_start(data: bytes | bytearray, is_list: bool) -> int | None:
    """Offset of the '[' that opens the event array."""
    if is_list:
        start = data.find(b"[")
        return start if start >= 0 else None
    key = data.find(b'"traceEvents"')
    if key < 0:
        return None
    colon = data.find(b":", key + len(b'"traceEvents"'))
    start = data.find(b"[", colon) if colon >= 0 else -1
    return start if start >= 0 else None


def _last_event_end(data: bytes | bytearray, array_start: int, before: int) -> int | None:
    """Offset of the ``}`` closing the last complete event that ends before ``before``.

    A brace qualifies when the next non-blank byte is ``,``, ``]`` or the end of what can be
    read, and the object it closes, from a ``{`` that follows ``[`` or ``,``, decodes as JSON
    on its own. This finds the boundary without tokenizing the whole file in Python; the
    decode of the whole prefix that follows confirms it.
    """
    view = memoryview(data)
    position = before
    while True:
        close = data.rfind(b"}", array_start, position)
        if close < 0:
            return None
        position = close
        follower = close + 1
        while follower < before and data[follower] in _WHITESPACE:
            follower += 1
        if follower < before and data[follower] not in b",]":
            continue
        opening = close
        for _ in range(64):  # nested objects inside args start with '{' too
            opening = data.rfind(b"{", array_start, opening)
            if opening < 0 or close - opening > _MAX_EVENT_BYTES:
                break
            previous = opening - 1
            while previous > array_start and data[previous] in _WHITESPACE:
                previous -= 1
            if data[previous] not in b",[":
                continue
            try:
                event = msgspec.json.decode(view[opening : close + 1])
            except msgspec.DecodeError:
                continue
            if isinstance(event, dict):
                return close


def _recover_trailing_keys(trace: Any, tail: memoryview) -> None:
    """Pick ``baseTimeNanoseconds`` and ``distributedInfo`` out of the text after the cut.

    Some writers put them after the event array; a salvage that cuts inside the array drops
    them with the rest, although they may still be complete in the dropped text.
    """
    missing = [
        key for key in ("baseTimeNanoseconds", "distributedInfo") if getattr(trace, key) is None
    ]
    if not missing or len(tail) > _MAX_TAIL_BYTES:
        return
    text = bytes(tail).decode("utf-8", "replace")
    decoder = json.JSONDecoder()
    for key in missing:
        match = re.search(rf'"{key}"\s*:\s*', text)
        if not match:
            continue
        try:
            value, _ = decoder.raw_decode(text, match.end())
        except ValueError:
            continue
        setattr(trace, key, value)


def _whole_file_columns(decoded: _Decoded, *, path: str, warnings: list[str]) -> _ReadColumns:
    """The decoded events as prepared columns, with the file's top-level keys: what the
    streaming reader makes chunk by chunk, made of the whole file at once."""
    trace = decoded.trace
    events = trace.traceEvents
    trace.traceEvents = []  # from here ``events`` is the only reference: it dies with it
    if events and not any(event.ph for event in events):
        raise TraceFormatError("no event has a 'ph' field: not a PyTorch profiler trace", path=path)
    # Only complete events can be intervals; they are classified in polars. The ``Trace``
    # span goes now: its pid/tid are strings ("Spans") that would push whole columns onto
    # the slow coercion path.
    if decoded.lenient:
        kept = [
            event
            for event in events
            if event.ph == "X"
            and not (isinstance(event.cat, str) and event.cat in _IGNORED_CATEGORIES)
        ]
    else:
        kept = _kept_events(events)
    base = _as_int(trace.baseTimeNanoseconds)
    extra: dict[str, pl.Series] = {}
    exact_note = None
    if base is None and _needs_exact_times(_float_series("ts", [event.ts for event in kept]), decoded.source):
        extra = _exact_times(decoded, events, kept) or {}
        if not extra:
            exact_note = (
                "absolute timestamps with a fraction could not be re-read exactly; "
                "their last nanosecond digits may be off"
            )
    decoded.source = None  # let the JSON text go as soon as the events go
    prepared = _Prepared()
    columns = _RawColumns(prepared)
    columns.add(_gather_columns(kept, lenient=decoded.lenient), extra=extra)
    del events, kept, extra
    read = _ReadColumns(columns.frame(), trace, base, prepared)
    del columns
    warnings.extend(prepared.scrub_notes())
    if exact_note:
        warnings.append(exact_note)
    return read


def _exact_times(decoded: _Decoded, events: list[Any], kept: list[Any]) -> dict[str, pl.Series] | None:
    """``exact_start`` (epoch ns) and ``exact_dur`` (ns) of the kept events, from a Decimal
    re-decode of the whole text; None if that is impossible."""
    if decoded.source is None:
        return None
    try:
        if decoded.is_list:
            exact_events = msgspec.json.decode(decoded.source, type=list[_ExactTime])
        else:
            exact_events = msgspec.json.decode(decoded.source, type=_ExactTraceFile).traceEvents
    except msgspec.DecodeError:  # a stamp that is not a number: keep the float times
        return None
    return _exact_columns(events, exact_events, kept)
