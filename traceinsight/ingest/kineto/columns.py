"""Column gathering: decoded events to typed, prepared polars columns, a chunk at a time.

:func:`_gather_columns` is the only per-event Python work of the reader (one list per
field); :func:`_raw_chunk` types the lists as polars columns, coercing mixed JSON types
(:func:`_int_series` and its kin); :class:`_Prepared` does the row-local work on each chunk
as it arrives; :class:`_RawColumns` keeps the prepared chunks and joins them into one frame,
which :class:`_ReadColumns` hands on with the file's top-level keys.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import msgspec
import polars as pl

import traceinsight.ingest.guard as guard
from traceinsight.ingest.kineto.classify import _classify, _details
from traceinsight.ingest.kineto.schema import _NO_LENIENT_ARGS
from traceinsight.ingest.kineto.times import _needs_exact_times, _usable_ts
from traceinsight.model import share_repeated_strings

@dataclass
class _ReadColumns:
    """A file's prepared columns (see :class:`_Prepared`) and its top-level keys."""

    frame: pl.DataFrame | None
    trace: Any
    base: int | None  # baseTimeNanoseconds
    prepared: "_Prepared"


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
