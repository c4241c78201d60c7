"""Read PyTorch-profiler / Kineto Chrome traces (``.json`` or ``.json.gz``) into the model.

How the file is read
--------------------
A well-formed trace is read as a stream (:func:`_read_streaming`): the file is decompressed
a few MB at a time (gzip is recognised by its magic bytes ``1f 8b``, never by the name), the
event array is cut at event boundaries about every 4 MB of text, and each chunk is decoded
with :mod:`msgspec` straight into typed structs that declare only the fields the model
needs (msgspec skips every other key without building Python objects for it, the structs
are not tracked by the garbage collector, and no per-event ``dict`` exists at any point).
The chunk's columns are gathered with one list comprehension per field, handed to polars
and prepared at once (:class:`_Prepared`: text scrubbed, ``kind`` assigned, rows that are
no interval dropped, kernel names shortened), so neither the file's text nor all its
events, nor any full-length temporary column of them, ever exist at once. On a 333 MB trace
the whole ``analyze`` peaks below the size of the JSON, and reading alone is faster than an
``orjson.loads`` of the same bytes. Every era streams, the 2020 bare event list included;
absolute epoch stamps written with a fraction (Kineto builds of March to May 2024) are
re-read exactly from each chunk's text (:class:`_ExactTimesStream`). Files that need more
(malformed or truncated JSON, ``--salvage``, fields of unexpected JSON types) take the
whole-file path, which holds the text: if an event field has an unexpected JSON type, the
file is decoded a second time with loosely typed structs and the values are coerced one by
one (slow, but a trace is never rejected over a field the model only uses for enrichment).

Format eras (see ``shared/traces/kineto/FORMAT.md``)
----------------------------------------------------
- 2020: a bare JSON list of events; categories ``Operator``/``Runtime``/``Kernel``/
  ``Memcpy``/``Memset``; GPU ``tid`` is the string ``"stream 7"``, CPU ``tid`` a numeric
  string; ``Input dims``; runtime/GPU events link to ops through lower-case ``external id``.
- 2021: a JSON object (``schemaVersion``, ``deviceProperties``, ``traceEvents``), old
  categories still, ``Input Dims``.
- 2022 to early 2024: today's category names (``cpu_op``, ``cuda_runtime``, ``kernel``…),
  integer epoch µs; runtime/GPU ``External id`` is a copy of their own ``correlation``.
- 2024: fractional µs (``x.yyy``), ``baseTimeNanoseconds`` with relative ``ts``, real
  ``External id`` links, collective args on ``record_param_comms`` and NCCL kernels.
- 2025-2026: ``python_function``, ``cuda_driver``, ``Rank``/``Seq`` collective args; some
  tools re-serialise files (other indentation, no ``M`` events, metadata after the events).

Mapping (by ``cat``, never by ``pid``; 2020-2021 names in brackets)
-------------------------------------------------------------------
=========================================== ================== ============================
``cat``                                     ``kind``           side
=========================================== ================== ============================
``kernel`` (``Kernel``)                     ``kernel``         GPU
``gpu_memcpy`` (``Memcpy``)                 ``memcpy``         GPU (``bytes``, direction)
``gpu_memset`` (``Memset``)                 ``memset``         GPU (``bytes``)
``gpu_user_annotation``                     ``gpu_annotation`` GPU
``cuda_sync``                               ``sync``           host wait, on a GPU stream
``cuda_runtime`` (``Runtime``)              ``cuda_api``       CPU, ``detail`` ``runtime``
``cuda_driver``                             ``cuda_api``       CPU, ``detail`` ``driver``
``cpu_op`` (``Operator``)                   ``cpu_op``         CPU
``user_annotation``                         ``annotation``     CPU
``python_function``                         ``python``         CPU
=========================================== ================== ============================

- ``ProfilerStep#N`` is an ``annotation`` whatever its category (``user_annotation`` since
  2022, ``Operator`` before, ``cpu_op`` after some third-party rewrites).
- GPU rows get ``device`` from ``args.device`` (else the event's ``pid``), ``stream`` from
  ``args.stream`` (else the ``tid``), a null ``tid``, and the rank's main CPU process as
  ``pid``: Kineto's own GPU ``pid`` is the device index, not a process.
- ``cuda_sync`` events (``Stream Sync``, ``Event Sync``, ``Context Sync``, ``Stream Wait
  Event``) are CUPTI synchronization records. Their span is the time the *host* thread spent
  inside the synchronizing call (``cudaStreamSynchronize``…, whose runtime event carries the
  same correlation id), but Kineto draws them on the GPU stream waited for. They keep
  ``device`` and ``stream`` (null for a context-wide sync) and, as in the nsys reader, take
  the name and thread of that call; ``detail`` is the sync type (``Stream sync``,
  ``Event sync``, ``Context sync``, ``Stream wait sync``).
- Kernels: ``name`` is the qualified function name with its template head (no return type,
  template or call arguments: ``dpsk::ep::internode::combine<...>``) and ``detail`` the full
  demangled signature.
- ``detail`` of ops holds ``Input Dims`` (``Input dims`` in 2020) as compact JSON, e.g.
  ``[[2048, 4096], []]``; of memcpys the direction (``HtoD``…).
- ``record_param_comms`` ops and the NCCL kernels linked to them (2024+) fill the ``comm_*``
  columns from ``Collective name``, ``In/Out msg nelems``, ``Group size``, ``Process Group
  Name``, ``Seq`` and ``In/Out split size``.
- ``external_id`` comes from ``External id`` (``external id`` in 2020-2021, where 0 means
  none). Where runtime/GPU events carry their own ``correlation`` there (2022 to early
  2024), which points at no CPU op, those values are dropped with a warning so that nobody
  joins on them by mistake.
- Not intervals: flows (``ac2g``, ``async``…), ``M`` metadata, instants (``[memory]``, step
  markers), the ``Trace`` span, Kineto ``overhead``. Complete events of other, unknown
  categories are skipped with a warning.

Time
----
``ts``/``dur`` are microseconds in every era. With ``baseTimeNanoseconds`` ``ts`` is
relative and the epoch time is ``base + round(ts * 1000)`` (as Kineto and HTA define it); the
rank's ``clock_origin_ns`` is the base and ``start_ns = round(ts * 1000)``. Without it ``ts``
is absolute epoch µs; the origin is the earliest event floored to a whole µs. Absolute stamps
with a fraction (``1712195495519689.047``) have more digits than a float64 keeps, so such
files are decoded once more with ``decimal.Decimal`` timestamps to keep every nanosecond.

Ranks
-----
One rank per file: ``distributedInfo.rank``, else the ``Rank`` arg of ``record_param_comms``,
else 0. ``world_size`` comes from ``distributedInfo``; ``gpu_names`` from the
``deviceProperties`` entries of the devices the GPU events use (all distinct names when the
ids do not match, as with ROCm's offset device numbers).
"""

from __future__ import annotations

import decimal
import json
import math
import os
import re
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import polars as pl

from traceinsight._allocators import release_freed_memory
from traceinsight.errors import TraceFormatError, TraceInputError
import traceinsight.ingest.guard as guard
from traceinsight.ingest.kernel_names import short_kernel_name
from traceinsight.model import (
    INTERVAL_SCHEMA,
    RANK_SCHEMA,
    TraceModel,
    conform,
    share_repeated_strings,
    with_depth,
)

__all__ = ["read_kineto"]

FORMAT_NAME = "kineto-json"

#: Interval kind of each event category, old (2020–2021) spellings included.
KIND_BY_CATEGORY: dict[str, str] = {
    "kernel": "kernel",
    "Kernel": "kernel",
    "gpu_memcpy": "memcpy",
    "Memcpy": "memcpy",
    "gpu_memset": "memset",
    "Memset": "memset",
    "gpu_user_annotation": "gpu_annotation",
    "cuda_sync": "sync",
    "cuda_runtime": "cuda_api",
    "Runtime": "cuda_api",
    "cuda_driver": "cuda_api",
    "cpu_op": "cpu_op",
    "Operator": "cpu_op",
    "user_annotation": "annotation",
    "python_function": "python",
}
#: CUPTI's "no stream" (a context-wide sync), written as a stream id of 2**32 - 1.
_NO_STREAM = 0xFFFFFFFF
#: Kinds whose rows live on a GPU stream (``device``/``stream`` set, ``tid`` null).
_STREAM_KINDS = ("kernel", "memcpy", "memset", "gpu_annotation", "sync")
#: Complete events of these categories are expected and deliberately not intervals.
_IGNORED_CATEGORIES = frozenset({"Trace", "overhead", "cuda_profiler_range"})

#: Above this many µs a float64 can no longer hold a timestamp's nanosecond digits.
_FLOAT_EXACT_LIMIT_US = 2**53 / 1000
#: An absolute epoch time in µs is at least this large (the year 2001); relative ones are not.
_EPOCH_MIN_US = 1e15
#: Larger ``ts`` (µs; the year 2116 as epoch time) or ``dur`` (73 years) values are garbage:
#: their nanoseconds would overflow int64 arithmetic.
_MAX_TS_US = 2.0**62 / 1000
_MAX_DUR_US = 2.0**61 / 1000
_MAX_EXACT_NS = 2**62

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

# --------------------------------------------------------------------------------------------
# Decoding schema.
#
# Only the keys listed here are materialised; msgspec skips everything else (including args
# such as "Comms Id" whose integers exceed 64 bits). The *fast* types cover every file seen;
# the *lenient* variant (``Any``) is used only when a file breaks them.
# --------------------------------------------------------------------------------------------

#: (attribute, JSON key in ``args``, fast type)
_ARG_FIELDS: list[tuple[str, str, Any]] = [
    ("external_id", "External id", int | None),
    ("legacy_external_id", "external id", int | None),  # 2020–2021 runtime/GPU events
    ("correlation", "correlation", int | None),
    ("device", "device", int | None),
    ("stream", "stream", int | str | None),  # ROCm hip* runtime rows hold a string
    ("bytes", "bytes", int | str | None),  # likewise
    ("input_dims", "Input Dims", msgspec.Raw),  # kept as raw JSON text: cheap, exact
    ("legacy_input_dims", "Input dims", msgspec.Raw),  # 2020 spelling
    ("collective_name", "Collective name", str | None),
    ("in_msg_nelems", "In msg nelems", int | None),
    ("out_msg_nelems", "Out msg nelems", int | None),
    ("group_size", "Group size", int | None),
    ("process_group_name", "Process Group Name", str | int | None),
    ("seq", "Seq", int | str | None),
    ("in_split_size", "In split size", str | None),
    ("out_split_size", "Out split size", str | None),
    ("rank", "Rank", int | None),
    ("cuda_sync_kind", "cuda_sync_kind", str | None),
]

#: (attribute, fast type, default) of a trace event; ``args`` is added per variant.
_EVENT_FIELDS: list[tuple[str, Any, Any]] = [
    ("ph", str, ""),
    ("cat", str, ""),
    ("name", str, ""),
    ("pid", int | float | str | None, None),
    ("tid", int | float | str | None, None),
    ("ts", float | None, None),  # msgspec accepts JSON integers for float fields
    ("dur", float | None, None),
]

#: Top-level keys read besides ``traceEvents`` (small; decoded loosely).
_TOP_FIELDS = [
    "baseTimeNanoseconds",
    "distributedInfo",
    "deviceProperties",
    "schemaVersion",
    "cuda_runtime_version",
    "cuda_driver_version",
    "cupti_version",
    "hip_runtime_version",
    "hip_driver_version",
    "roctracer_version",
]


def _arg_struct(lenient: bool) -> type[msgspec.Struct]:
    fields = [
        (
            attribute,
            key_type if (not lenient or key_type is msgspec.Raw) else Any,
            msgspec.field(default=None, name=key),
        )
        for attribute, key, key_type in _ARG_FIELDS
    ]
    # frozen: one shared instance can stand in for absent args; gc=False: millions of these
    # must not be walked by the cyclic garbage collector.
    name = "_LenientArgs" if lenient else "_Args"
    return msgspec.defstruct(name, fields, frozen=True, gc=False)


_Args = _arg_struct(lenient=False)
_LenientArgs = _arg_struct(lenient=True)
_NO_ARGS = _Args()
_NO_LENIENT_ARGS = _LenientArgs()

_Event = msgspec.defstruct(
    "_Event",
    [*_EVENT_FIELDS, ("args", _Args, _NO_ARGS)],
    gc=False,
)
_LenientEvent = msgspec.defstruct(
    "_LenientEvent",
    [
        *((name, Any, default) for name, _, default in _EVENT_FIELDS),
        ("args", _LenientArgs | None, None),
    ],
    gc=False,
)


def _top_struct(name: str, event_type: type) -> type[msgspec.Struct]:
    return msgspec.defstruct(
        name, [("traceEvents", list[event_type]), *((key, Any, None) for key in _TOP_FIELDS)]
    )


_TraceFile = _top_struct("_TraceFile", _Event)
_LenientTraceFile = _top_struct("_LenientTraceFile", _LenientEvent)


class _ExactTime(msgspec.Struct, gc=False):
    """Timestamps decoded as :class:`decimal.Decimal`: every digit of the text is kept."""

    ts: decimal.Decimal | None = None
    dur: decimal.Decimal | None = None


class _ExactTraceFile(msgspec.Struct):
    traceEvents: list[_ExactTime]


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def read_kineto(path: str | os.PathLike, *, salvage: bool = False) -> TraceModel:
    """Read one PyTorch profiler (Kineto) Chrome trace into a :class:`TraceModel`.

    Parameters
    ----------
    path
        A ``.json`` or gzip-compressed ``.json.gz`` trace as written by ``torch.profiler``
        (``export_chrome_trace`` or ``tensorboard_trace_handler``), any format from the 2020
        bare event list to 2026. Compression is recognised by content, not by name.
    salvage
        If the file was cut short while being written (the job crashed), read every event up
        to the last complete one instead of failing, and say in ``model.warnings`` how much
        was dropped.

    Returns
    -------
    TraceModel
        ``intervals`` with the kinds listed in the module docstring, no ``samples``, and one
        ``ranks`` row.

    Raises
    ------
    TraceInputError
        The file is missing, not gzip/JSON, truncated or malformed (without ``salvage``), or
        JSON that is not a trace (no ``traceEvents``, events of the wrong type).

    Examples
    --------
    >>> from traceinsight.ingest.kineto import read_kineto
    >>> model = read_kineto("rank0.json.gz")  # doctest: +SKIP
    >>> model.of_kind("kernel").height  # doctest: +SKIP
    10470
    >>> model.ranks.select("rank", "rank_source", "world_size").row(0)  # doctest: +SKIP
    (0, 'distributedInfo', 2)
    >>> read_kineto("crashed.json.gz", salvage=True).warnings  # doctest: +SKIP
    ['salvaged a truncated trace: kept 81,234 complete events, dropped the last 1,337 bytes']
    """
    path = os.fspath(path)
    warnings: list[str] = []
    # Before reading anything: refuse a file that clearly cannot fit in memory.
    budget = guard.check_kineto_memory(path)
    # Well-formed files with the usual field types are read as a stream, a chunk of events
    # at a time (bounded memory); anything else takes the whole-file path below, which
    # tells errors apart, retries leniently, salvages and keeps exact timestamps.
    streamed = _read_streaming(
        path, limit=None if budget is None else budget // guard.KINETO_BYTES_PER_JSON_BYTE, warnings=warnings
    )
    if streamed is not None:
        release_freed_memory()  # what decoding the chunks freed
        trace = streamed.trace
        intervals, facts = _finish_intervals(streamed, warnings)
        del streamed
        ranks = _rank_frame(trace, facts, path=path)
        return TraceModel(intervals=intervals, ranks=ranks, warnings=warnings)
    data = _read_file(path)
    if data.startswith(_GZIP_MAGIC):
        limit = None if budget is None else budget // guard.KINETO_WHOLE_FILE_BYTES_PER_JSON_BYTE
        data = _gunzip(data, path=path, salvage=salvage, warnings=warnings, limit=limit)
    try:
        decoded = _decode(data, path=path, salvage=salvage, warnings=warnings)
    except RecursionError:
        raise TraceFormatError(
            "JSON nested deeper than any profiler trace (over "
            f"{sys.getrecursionlimit():,} levels); not a PyTorch profiler trace",
            path=path,
        ) from None
    del data  # the events keep what they need of it (their raw Input Dims point into it)
    intervals, facts = _intervals(decoded, path=path, warnings=warnings)
    release_freed_memory()
    ranks = _rank_frame(decoded.trace, facts, path=path)
    return TraceModel(intervals=intervals, ranks=ranks, warnings=warnings)


# --------------------------------------------------------------------------------------------
# Bytes: read and decompress
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# JSON decoding, with a lenient retry and salvage
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Events -> interval columns
# --------------------------------------------------------------------------------------------


def _intervals(
    decoded: _Decoded, *, path: str, warnings: list[str]
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Build the interval frame; also return the facts the rank row needs."""
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
    return _finish_intervals(read, warnings)


@dataclass
class _ReadColumns:
    """A file's prepared columns (see :class:`_Prepared`) and its top-level keys."""

    frame: pl.DataFrame | None
    trace: Any
    base: int | None  # baseTimeNanoseconds
    prepared: "_Prepared"


def _finish_intervals(read: _ReadColumns, warnings: list[str]) -> tuple[pl.DataFrame, dict[str, Any]]:
    """From the prepared columns to the interval frame and the rank row's facts: the steps
    that need the whole rank at once. Takes the frame out of ``read``, so that it is freed
    as soon as it is replaced."""
    frame, read.frame = read.frame, None
    trace, prepared = read.trace, read.prepared
    frame, origin_ns = _timestamps(frame, read.base, prepared, warnings)
    warnings.extend(prepared.category_notes())
    frame, main_pid = _ownership(frame)
    frame = _link_syncs(frame)
    frame = _external_ids(frame, warnings)
    rank, rank_source = _rank(trace, frame)
    frame = conform(frame.with_columns(rank=pl.lit(rank)), INTERVAL_SCHEMA)
    frame = with_depth(guard.valid_intervals(frame, warnings))
    facts = {
        "rank": rank,
        "rank_source": rank_source,
        "pid": main_pid,
        "origin_ns": origin_ns,
        "devices": frame.get_column("device").drop_nulls().unique().sort().to_list(),
    }
    return frame, facts


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

_TopLevel = msgspec.defstruct(
    "_TopLevel", [("traceEvents", msgspec.Raw), *((key, Any, None) for key in _TOP_FIELDS)]
)


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


def _kept_events(events: list[Any]) -> list[Any]:
    """The complete events that may be intervals (strictly typed events)."""
    return [e for e in events if e.ph == "X" and e.cat not in _IGNORED_CATEGORIES]


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


#: Args that only a few rows carry (collectives, syncs): gathered for those rows only.
_SPARSE_ARGS = (
    "collective_name",
    "in_msg_nelems",
    "out_msg_nelems",
    "group_size",
    "process_group_name",
    "seq",
    "in_split_size",
    "out_split_size",
    "rank",
    "cuda_sync_kind",
)


def _gather_columns(kept: list[Any], *, lenient: bool) -> dict[str, list[Any]]:
    """One list per needed field: the only per-event Python work of the reader."""
    if lenient:
        args = [event.args if event.args is not None else _NO_LENIENT_ARGS for event in kept]
    else:
        args = [event.args for event in kept]
    encode = msgspec.json.encode  # hands back a Raw's JSON text as bytes, without parsing it
    columns: dict[str, list[Any]] = {
        "cat": [event.cat for event in kept],
        "name": [event.name for event in kept],
        "pid": [event.pid for event in kept],
        "tid": [event.tid for event in kept],
        "ts": [event.ts for event in kept],
        "dur": [event.dur for event in kept],
        "external_id": [a.external_id for a in args],
        "legacy_external_id": [a.legacy_external_id for a in args],
        "correlation": [a.correlation for a in args],
        "device": [a.device for a in args],
        "stream": [a.stream for a in args],
        "bytes": [a.bytes for a in args],
        "input_dims": [
            (
                encode(a.input_dims)
                if a.input_dims is not None
                else (None if a.legacy_input_dims is None else encode(a.legacy_input_dims))
            )
            for a in args
        ],
    }
    sparse_rows = [
        row
        for row, a in enumerate(args)
        if a.collective_name is not None or a.rank is not None or a.cuda_sync_kind is not None
    ]
    columns["sparse_row"] = sparse_rows
    for attribute in _SPARSE_ARGS:
        columns[attribute] = [getattr(args[row], attribute) for row in sparse_rows]
    return columns


class _Prepared:
    """The row-local work on raw columns, done on each chunk of events as it is read:
    control characters out and absurd lengths cut (before any regex runs over the text),
    ``kind`` (rows that are no interval dropped), kernel short names and ``detail``. Done
    per chunk, the temporary columns these build stay chunk-sized, and the text columns
    they consume (``cat``, shapes, full names) never exist for the whole trace.

    Also gathers, over the rows before any is dropped, what the whole-rank steps need: the
    earliest usable ``ts`` (the clock origin), whether float times lost nanoseconds, the
    counts of unknown categories and of shortened values (one warning each at the end).
    """

    def __init__(self) -> None:
        self.short_names: dict[str, str] = {}
        self.unknown_categories: dict[str | None, int] = {}
        self.shortened = 0
        self.first_ts: float | None = None
        self.first_exact: int | None = None
        self.needs_exact = False

    def __call__(self, frame: pl.DataFrame) -> pl.DataFrame:
        frame, shortened = guard.scrub_columns(frame)
        self.shortened += shortened
        ts = frame.get_column("ts")
        self.needs_exact = self.needs_exact or _needs_exact_times(ts)
        self.first_ts = _least(self.first_ts, ts.filter(_usable_ts(ts)).min())
        if "exact_start" in frame.columns:
            self.first_exact = _least(self.first_exact, frame.get_column("exact_start").min())
        frame = _classify(frame, self.unknown_categories)
        return _details(frame, self.short_names)

    def scrub_notes(self) -> list[str]:
        return [guard.shortened_note(self.shortened)] if self.shortened else []

    def category_notes(self) -> list[str]:
        if not self.unknown_categories:
            return []
        ranked = sorted(self.unknown_categories.items(), key=lambda item: (-item[1], str(item[0])))
        listed = ", ".join(f"{cat or '<none>'} ({count:,})" for cat, count in ranked[:5])
        return [f"ignored complete events of categories with no interval kind: {listed}"]


def _least(current: Any, candidate: Any) -> Any:
    if candidate is None:
        return current
    return candidate if current is None else min(current, candidate)


class _RawColumns:
    """Columns gathered a chunk of events at a time, each chunk prepared on arrival.

    Each column is kept as a list of per-chunk pieces and joined into one contiguous
    column at the end, one column at a time: a frame of many chunks would make polars
    re-align (copy) every column at the first expression mixing columns of different
    chunking, and joining all columns at once would hold two copies of the frame. A column
    null in every chunk (most collective args, in most traces) stays a cheap broadcast null.
    """

    def __init__(self, prepare: _Prepared) -> None:
        self.prepare = prepare
        self.pieces: dict[str, list[pl.Series]] = {}
        self.height = 0

    def add(self, columns: dict[str, list[Any]], *, extra: dict[str, pl.Series] | None = None) -> None:
        """Add one chunk's gathered lists (see :func:`_gather_columns`), and ``extra``
        columns aligned with them; empties the lists."""
        frame = _raw_chunk(columns)
        if extra:
            frame = frame.with_columns(**extra)
        frame = self.prepare(frame)
        for series in frame.iter_columns():
            self.pieces.setdefault(series.name, []).append(share_repeated_strings(series))
        self.height += frame.height

    def frame(self) -> pl.DataFrame:
        """The prepared frame, one chunk per column; the pieces are released as they are
        joined."""
        if not self.pieces:
            self.add(_gather_columns([], lenient=False))
        columns = []
        for name in list(self.pieces):
            pieces = self.pieces.pop(name)
            if all(piece.null_count() == len(piece) for piece in pieces):
                columns.append(pl.repeat(None, self.height, dtype=pieces[0].dtype, eager=True).alias(name))
            else:
                columns.append(pl.concat(pieces, rechunk=True) if len(pieces) > 1 else pieces[0].rechunk())
            del pieces
        return pl.DataFrame(columns)


def _raw_chunk(columns: dict[str, list[Any]]) -> pl.DataFrame:
    """Typed polars columns from one chunk's gathered lists (mixed JSON types coerced)."""
    tid, tid_stream = _tid_series(columns.pop("tid"))
    frame = pl.DataFrame(
        [
            _string_series("cat", columns.pop("cat")),  # lenient files: any JSON type
            _string_series("name", columns.pop("name")),
            _int_series("pid", columns.pop("pid")),
            tid,
            tid_stream,
            _float_series("ts", columns.pop("ts")),
            _float_series("dur", columns.pop("dur")),
            _int_series("external_id", columns.pop("external_id")),
            _int_series("legacy_external_id", columns.pop("legacy_external_id")),
            _int_series("correlation", columns.pop("correlation")),
            _int_series("arg_device", columns.pop("device")),
            _int_series("arg_stream", columns.pop("stream")),
            _int_series("bytes", columns.pop("bytes")),
            pl.Series("input_dims", columns.pop("input_dims"), dtype=pl.Binary).cast(pl.String),
        ]
    )
    # Args that only a few rows carry, gathered as (row, value) pairs: spread here.
    rows = pl.Series(columns.pop("sparse_row"), dtype=pl.UInt32)
    sparse = {
        "comm_op": _string_series("comm_op", columns.pop("collective_name")),
        "comm_in_nelems": _int_series("comm_in_nelems", columns.pop("in_msg_nelems")),
        "comm_out_nelems": _int_series("comm_out_nelems", columns.pop("out_msg_nelems")),
        "comm_group_size": _int_series("comm_group_size", columns.pop("group_size")),
        "comm_group": _string_series("comm_group", columns.pop("process_group_name")),
        "comm_seq": _int_series("comm_seq", columns.pop("seq")),
        "comm_in_split": _string_series("comm_in_split", columns.pop("in_split_size")),
        "comm_out_split": _string_series("comm_out_split", columns.pop("out_split_size")),
        "arg_rank": _int_series("arg_rank", columns.pop("rank")),
        "sync_kind": _string_series("sync_kind", columns.pop("cuda_sync_kind")),
    }
    full = []
    for name, values in sparse.items():
        column = pl.repeat(None, frame.height, dtype=values.dtype, eager=True).alias(name)
        if len(rows):
            column.scatter(rows, values)
        full.append(column)
    return frame.with_columns(full)


def _tid_series(tids: list[Any]) -> tuple[pl.Series, pl.Series]:
    """Thread ids, and the stream number of 2020–2021 GPU rows (tid ``"stream 7"``)."""
    try:
        tid = pl.Series("tid", tids, dtype=pl.Int64, strict=True)
        return tid, pl.repeat(None, len(tids), dtype=pl.Int64, eager=True).alias("tid_stream")
    except Exception:  # strings ("25738", "stream 7"), floats or huge numbers: one by one
        pass
    streams: list[int | None] = []
    for value in tids:
        match = _STREAM_TID.fullmatch(value.strip()) if isinstance(value, str) else None
        streams.append(int(match.group(1)) if match else None)
    return (
        _int_series("tid", tids),
        pl.Series("tid_stream", streams, dtype=pl.Int64),
    )


_STREAM_TID = re.compile(r"stream\s+(\d+).*")


def _int_series(name: str, values: list[Any]) -> pl.Series:
    """Int64 column; values that are not integers (strings, floats, >64-bit) are coerced."""
    try:
        return pl.Series(name, values, dtype=pl.Int64, strict=True)
    except Exception:  # mixed types or overflow: coerce value by value instead
        pass
    # Plain ints pass through untouched (most rows of an old file's string-tid column) ...
    coerced = [value if type(value) is int else _as_int(value) for value in values]
    try:
        return pl.Series(name, coerced, dtype=pl.Int64, strict=True)
    except Exception:  # ... unless one exceeds 64 bits
        return pl.Series(name, [_as_int(value) for value in coerced], dtype=pl.Int64)


def _float_series(name: str, values: list[Any]) -> pl.Series:
    try:
        return pl.Series(name, values, dtype=pl.Float64, strict=True)
    except Exception:  # lenient decode: numbers as strings, booleans, objects
        return pl.Series(name, [_as_float(value) for value in values], dtype=pl.Float64)


def _string_series(name: str, values: list[Any]) -> pl.Series:
    try:
        return pl.Series(name, values, dtype=pl.String, strict=True)
    except Exception:  # a numeric process-group name, or lists from a lenient decode
        return pl.Series(name, [_as_str(value) for value in values], dtype=pl.String)


def _as_int(value: Any) -> int | None:
    """An int64 from an int, an integral float or a decimal string; otherwise None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        result = value
    elif isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            return None
        result = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text.removeprefix("-").isdigit():
            return None
        result = int(text)
    else:
        return None
    return result if -(2**63) <= result < 2**63 else None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _as_str(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return msgspec.json.encode(value).decode()


# --------------------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------------------


#: A ``ts`` written with a non-zero fraction.
_FRACTIONAL_STAMP = re.compile(rb'"ts"[ \t\r\n]*:[ \t\r\n]*-?[0-9]+\.[0-9]*[1-9]')


def _needs_exact_times(ts: pl.Series, text: bytes | bytearray | msgspec.Raw | None = None) -> bool:
    """True when float64 lost nanoseconds: absolute epoch µs written with a fraction.

    Near 1.7e15 a float64 step is 0.25 µs, so most fractional stamps still show one; the
    ``text`` they were decoded from, where given, shows every one.
    """
    ts = ts.drop_nulls()
    if ts.is_empty() or ts.abs().max() < _FLOAT_EXACT_LIMIT_US:
        return False
    if (ts != ts.floor()).any():
        return True
    return text is not None and _FRACTIONAL_STAMP.search(memoryview(text)) is not None


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


def _exact_columns(events: list[Any], exact_events: list[Any], kept: list[Any]) -> dict[str, pl.Series] | None:
    """The kept events' exact times, from ``exact_events`` decoded from the same text as
    ``events`` (one per event, in order); None if they do not line up."""
    if len(exact_events) != len(events):
        return None
    kept_ids = {id(event) for event in kept}
    thousand = decimal.Decimal(1000)
    starts: list[int | None] = []
    durations: list[int | None] = []

    def nanoseconds(value: decimal.Decimal, limit: int) -> int | None:
        if not value.is_finite():
            return None
        number = int((value * thousand).to_integral_value())
        return number if -limit < number < limit else None

    for event, exact in zip(events, exact_events):
        if id(event) in kept_ids:
            starts.append(None if exact.ts is None else nanoseconds(exact.ts, _MAX_EXACT_NS))
            durations.append(
                0 if exact.dur is None else nanoseconds(exact.dur, _MAX_EXACT_NS // 2)
            )
    return {
        "exact_start": pl.Series(starts, dtype=pl.Int64),
        "exact_dur": pl.Series(durations, dtype=pl.Int64),
    }


def _usable_ts(ts: pl.Series | pl.Expr) -> pl.Series | pl.Expr:
    """Timestamps that are numbers small enough for int64 nanoseconds."""
    return ts.is_finite() & (ts.abs() < _MAX_TS_US)


def _timestamps(
    frame: pl.DataFrame,
    base: int | None,
    prepared: _Prepared,
    warnings: list[str],
) -> tuple[pl.DataFrame, int | None]:
    """Add ``start_ns``/``end_ns`` on the rank's clock; return its origin (epoch ns).

    Events without a usable ``ts`` or ``dur`` (not a number, or so large that nanoseconds
    overflow int64) keep a null time and are dropped by :func:`guard.valid_intervals`,
    which says how many; a missing ``dur`` is zero. Negative durations give an end before
    the start and are dropped the same way.
    """
    usable = _usable_ts(pl.col("ts"))
    frame = frame.with_columns(
        ts=pl.when(usable).then(pl.col("ts")),
        dur=pl.when(pl.col("dur").is_null())
        .then(pl.lit(0.0))
        .when(pl.col("dur").is_finite() & (pl.col("dur").abs() < _MAX_DUR_US))
        .then(pl.col("dur")),
    )
    ts = pl.col("ts")
    dur_ns = (pl.col("dur") * 1000).round(0).cast(pl.Int64, strict=False)
    origin_ns: int | None
    if base is not None:
        # As the Kineto writer and HTA define it: epoch ns = base + round(ts * 1000).
        frame = frame.with_columns(
            start_ns=(ts * 1000).round(0).cast(pl.Int64, strict=False), dur_ns=dur_ns
        )
        origin_ns = base
    elif "exact_start" in frame.columns:
        first = prepared.first_exact
        origin_ns = 0 if first is None else first // 1000 * 1000
        frame = frame.with_columns(start_ns=pl.col("exact_start") - origin_ns, dur_ns=pl.col("exact_dur"))
    else:
        # Over every complete event, before rows that are no interval were dropped.
        first = prepared.first_ts
        origin_us = 0 if first is None else math.floor(first)
        # Subtract in µs first: what is left is small, so ×1000 stays exact in float64.
        frame = frame.with_columns(
            start_ns=((ts - origin_us) * 1000).round(0).cast(pl.Int64, strict=False),
            dur_ns=dur_ns,
        )
        origin_ns = origin_us * 1000
        if first is not None and first < _EPOCH_MIN_US:
            origin_ns = None
            warnings.append(
                "timestamps are relative and the file has no baseTimeNanoseconds, "
                "so the wall-clock time of the trace is unknown"
            )
    frame = frame.with_columns(end_ns=pl.col("start_ns") + pl.col("dur_ns"))
    return frame.drop("ts", "dur", "dur_ns", "exact_start", "exact_dur", strict=False), origin_ns


# --------------------------------------------------------------------------------------------
# Classification and per-kind fields
# --------------------------------------------------------------------------------------------


def _classify(frame: pl.DataFrame, unknown_categories: dict[str | None, int]) -> pl.DataFrame:
    """Add ``kind``; drop complete events that are not intervals (counting them by category
    in ``unknown_categories``)."""
    kind = pl.col("cat").replace_strict(KIND_BY_CATEGORY, default=None, return_dtype=pl.String)
    is_step = pl.col("name").str.starts_with("ProfilerStep#")
    frame = frame.with_columns(
        kind=pl.when(kind.is_in(["cpu_op", "annotation"]) & is_step)
        .then(pl.lit("annotation"))
        .otherwise(kind)
    )
    unknown = (
        frame.lazy()
        .filter(pl.col("kind").is_null() & ~pl.col("cat").is_in(list(_IGNORED_CATEGORIES)))
        .group_by("cat")
        .len()
        .collect()
    )
    for cat, count in unknown.iter_rows():
        unknown_categories[cat] = unknown_categories.get(cat, 0) + count
    return frame.filter(pl.col("kind").is_not_null())


def _ownership(frame: pl.DataFrame) -> tuple[pl.DataFrame, int | None]:
    """pid/tid/device/stream by side: CPU rows keep OS ids, GPU rows get device and stream."""
    on_stream = pl.col("kind").is_in(_STREAM_KINDS)
    # Select before filtering: filtering the frame would copy every column.
    cpu_pids = frame.select(pl.col("pid").filter(~on_stream)).to_series().drop_nulls()
    if cpu_pids.is_empty():
        cpu_pids = frame.get_column("pid").drop_nulls()
    main_pid = None if cpu_pids.is_empty() else int(cpu_pids.mode().sort()[0])
    stream = pl.coalesce("arg_stream", "tid_stream", "tid")
    frame = frame.with_columns(
        pid=pl.when(on_stream).then(pl.lit(main_pid, dtype=pl.Int64)).otherwise(pl.col("pid")),
        tid=pl.when(on_stream).then(None).otherwise(pl.col("tid")),
        device=pl.when(on_stream)
        .then(pl.coalesce("arg_device", "pid"))
        .otherwise(None)
        .cast(pl.Int32, strict=False),  # an id past int32 is garbage: no device
        stream=pl.when(on_stream & (stream != _NO_STREAM)).then(stream).otherwise(None),
        bytes=pl.when(pl.col("kind").is_in(["memcpy", "memset"])).then(pl.col("bytes")),
    )
    return frame.drop("arg_device", "arg_stream", "tid_stream"), main_pid


#: Kineto's ``cuda_sync_kind`` spelled as the nsys reader labels CUPTI sync types.
_SYNC_KIND_LABELS = {
    "Stream Sync": "Stream sync",
    "Event Sync": "Event sync",
    "Context Sync": "Context sync",
    "Stream Wait Event": "Stream wait sync",
}
#: ``detail`` of ``cuda_api`` rows, as the nsys reader fills it.
_API_CLASS_BY_CATEGORY = {"cuda_runtime": "runtime", "Runtime": "runtime", "cuda_driver": "driver"}


def _details(frame: pl.DataFrame, short_names: dict[str, str]) -> pl.DataFrame:
    """Kernel short names, and ``detail`` per kind (signature, shapes, direction, sync type).

    ``short_names`` caches kernel short names across chunks (a few hundred distinct names
    in a million launches).
    """
    kind = pl.col("kind")
    kernel_names = frame.select(pl.col("name").filter(kind == "kernel").unique()).to_series()
    for name in kernel_names.drop_nulls().to_list():
        if name not in short_names:
            short_names[name] = short_kernel_name(name)
    short = {name: short_names[name] for name in kernel_names.drop_nulls().to_list()}
    dims = pl.col("input_dims")
    # Kineto writes "[[1, 2], []]"; files re-serialised by other tools spread the lists over
    # lines or drop the spaces. Rewriting every row is slow, so check first.
    if frame.get_column("input_dims").str.contains(r",\S|\s\s|\[\s|\s\]|\n").any():
        dims = dims.str.replace_all(r"\s+", "").str.replace_all(",", ", ", literal=True)
    frame = frame.with_columns(
        detail=pl.when(kind == "kernel")
        .then(pl.col("name"))
        .when(kind == "memcpy")
        .then(pl.col("name").str.extract(r"^Memcpy\s+(\w+)", 1))
        .when(kind == "sync")
        .then(pl.coalesce("sync_kind", "name").replace(_SYNC_KIND_LABELS))
        .when(kind == "cuda_api")
        .then(pl.col("cat").replace_strict(_API_CLASS_BY_CATEGORY, default=None))
        .when(kind.is_in(["cpu_op", "annotation", "python"]))
        .then(dims),
        name=pl.when(kind == "kernel")
        .then(pl.col("name").replace(short))
        .otherwise(pl.col("name")),
    )
    return frame.drop("input_dims", "sync_kind", "cat")


def _link_syncs(frame: pl.DataFrame) -> pl.DataFrame:
    """Give each sync row the thread and name of the API call that waited.

    Kineto draws ``cuda_sync`` on the GPU stream, but the span is the host thread's wait inside
    ``cudaStreamSynchronize`` & co.; that call carries the same correlation id. The nsys
    reader names sync rows after this call too.
    """
    is_sync = pl.col("kind") == "sync"
    syncs = frame.filter(is_sync)
    if syncs.is_empty():
        return frame
    calls = (
        frame.filter(
            (pl.col("kind") == "cuda_api")
            & pl.col("correlation").is_in(syncs.get_column("correlation").drop_nulls().implode())
        )
        .select("correlation", pl.col("tid").alias("_api_tid"), pl.col("name").alias("_api"))
        .unique(subset="correlation", keep="first")
    )
    syncs = syncs.join(calls, on="correlation", how="left").with_columns(
        tid=pl.col("_api_tid"), name=pl.coalesce("_api", "name")
    )
    return pl.concat([frame.filter(~is_sync), syncs.select(frame.columns)])


def _external_ids(frame: pl.DataFrame, warnings: list[str]) -> pl.DataFrame:
    """Merge the two spellings; drop ids that are really the event's own correlation id."""
    launched = pl.col("kind").is_in(["cuda_api", "kernel", "memcpy", "memset", "sync"])
    frame = frame.with_columns(external_id=pl.coalesce("external_id", "legacy_external_id")).drop(
        "legacy_external_id"
    )
    # 2020-2021 runtime/GPU events say "external id": 0 when no op launched them.
    frame = frame.with_columns(
        external_id=pl.when(launched & (pl.col("external_id") == 0))
        .then(None)
        .otherwise(pl.col("external_id"))
    )
    api = frame.filter(
        (pl.col("kind") == "cuda_api")
        & pl.col("external_id").is_not_null()
        & pl.col("correlation").is_not_null()
    )
    if (
        api.height
        and (api.get_column("external_id") == api.get_column("correlation")).mean() >= 0.9
    ):
        # Kineto ~2022 to early 2024 (kineto issue #843): the id points at no CPU op.
        frame = frame.with_columns(
            external_id=pl.when(launched & (pl.col("external_id") == pl.col("correlation")))
            .then(None)
            .otherwise(pl.col("external_id"))
        )
        warnings.append(
            "runtime and GPU events carry their own correlation id as 'External id' "
            "(Kineto 2022 to early 2024), so it cannot link them to CPU ops; those "
            "external_id values were dropped (link launches to ops by time nesting instead)"
        )
    return frame


# --------------------------------------------------------------------------------------------
# Rank metadata
# --------------------------------------------------------------------------------------------


def _rank(trace: Any, frame: pl.DataFrame) -> tuple[int, str]:
    info = trace.distributedInfo
    if isinstance(info, dict):
        rank = _count(info.get("rank"), minimum=0)
        if rank is not None:
            return rank, "distributedInfo"
    ranks = frame.get_column("arg_rank").drop_nulls()
    ranks = ranks.filter((ranks >= 0) & (ranks < 2**31))
    if not ranks.is_empty():
        return int(ranks[0]), "record_param_comms"
    return 0, "file order"


def _count(value: Any, *, minimum: int) -> int | None:
    """A rank or world size: an integer from ``minimum`` up to int32, else None."""
    number = _as_int(value)
    return number if number is not None and minimum <= number < 2**31 else None


def _rank_frame(trace: Any, facts: dict[str, Any], *, path: str) -> pl.DataFrame:
    info = trace.distributedInfo if isinstance(trace.distributedInfo, dict) else {}
    devices: list[int] = facts["devices"]
    row = {
        "rank": facts["rank"],
        "rank_source": facts["rank_source"],
        "source": path,
        "format": FORMAT_NAME,
        "tool_version": guard.scrub_value(_tool_version(trace, info)),
        "pid": facts["pid"],
        "hostname": None,  # Kineto has no reliable host field (worker names are user-chosen)
        "gpu_names": [guard.scrub_value(n) for n in _gpu_names(trace.deviceProperties, devices)],
        "devices": devices,
        "world_size": _count(info.get("world_size"), minimum=1),
        "clock_origin_ns": facts["origin_ns"],
    }
    return pl.DataFrame([row], schema=RANK_SCHEMA)


def _gpu_names(properties: Any, devices: list[int]) -> list[str]:
    """Names of the devices used; all distinct names when ids do not match (ROCm offsets)."""
    if not isinstance(properties, list):
        return []
    by_id = {
        _as_int(entry.get("id")): entry.get("name")
        for entry in properties
        if isinstance(entry, dict) and isinstance(entry.get("name"), str)
    }
    if devices and all(device in by_id for device in devices):
        return [by_id[device] for device in devices]
    return list(dict.fromkeys(name for name in by_id.values()))


def _version_text(value: Any) -> str | None:
    """CUDA encodes 12.9 as 12090; show both forms that people search for."""
    number = _as_int(value)
    if number is None:
        return None if value is None else str(value)
    if 1000 <= number < 100000:
        return f"{number // 1000}.{number % 1000 // 10}"
    return str(number)


def _tool_version(trace: Any, info: dict[str, Any]) -> str:
    schema = trace.schemaVersion
    parts = [
        f"kineto schemaVersion {schema}" if schema is not None else "kineto (no schemaVersion)"
    ]
    for key, label in (
        ("cuda_runtime_version", "CUDA runtime"),
        ("cuda_driver_version", "CUDA driver"),
    ):
        text = _version_text(getattr(trace, key))
        if text:
            parts.append(f"{label} {text}")
    for key, label in (
        ("cupti_version", "CUPTI"),
        ("hip_runtime_version", "HIP runtime"),
        ("hip_driver_version", "HIP driver"),
        ("roctracer_version", "roctracer"),
    ):
        value = getattr(trace, key)
        if value is not None:
            parts.append(f"{label} {value}")
    if isinstance(info.get("nccl_version"), str):
        parts.append(f"NCCL {info['nccl_version']}")
    return ", ".join(parts)
