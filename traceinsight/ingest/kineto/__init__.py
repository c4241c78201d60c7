"""Read PyTorch-profiler / Kineto Chrome traces (``.json`` or ``.json.gz``) into the model.

How the file is read
--------------------
A well-formed trace is read as a stream (:mod:`.streaming`): the file is decompressed a few
MB at a time (gzip is recognised by its magic bytes ``1f 8b``, never by the name), the event
array is cut at event boundaries about every 4 MB of text, and each chunk is decoded with
:mod:`msgspec` straight into typed structs that declare only the fields the model needs
(msgspec skips every other key without building Python objects for it, the structs are not
tracked by the garbage collector, and no per-event ``dict`` exists at any point). The
chunk's columns are gathered with one list comprehension per field, handed to polars and
prepared at once (:class:`~.columns._Prepared`: text scrubbed, ``kind`` assigned, rows that
are no interval dropped, kernel names shortened), so neither the file's text nor all its
events, nor any full-length temporary column of them, ever exist at once. On a 333 MB trace
the whole ``analyze`` peaks below the size of the JSON, and reading alone is faster than an
``orjson.loads`` of the same bytes. Every era streams, the 2020 bare event list included;
absolute epoch stamps written with a fraction (Kineto builds of March to May 2024) are
re-read exactly from each chunk's text (:class:`~.streaming._ExactTimesStream`). Files that
need more (malformed or truncated JSON, ``--salvage``, fields of unexpected JSON types) take
the whole-file path (:mod:`.whole_file`), which holds the text: if an event field has an
unexpected JSON type, the file is decoded a second time with loosely typed structs and the
values are coerced one by one (slow, but a trace is never rejected over a field the model
only uses for enrichment).

The steps
---------
One module a job, in the order a file meets them; :func:`read_kineto` below calls them:

1. :mod:`.streaming` (the usual path) or :mod:`.whole_file` (gzip and whole-file decoding,
   with the lenient retry and salvage) decode the events into the structs of :mod:`.schema`;
2. :mod:`.columns` gathers their fields into polars columns, a chunk at a time, and prepares
   each chunk as it arrives, with :mod:`.classify` (``kind`` by category, ``detail``);
3. :func:`_finish_intervals` takes the steps that need the whole rank at once: :mod:`.times`
   (the rank's clock, nanoseconds re-read exactly where float64 lost them), then the
   ownership, sync and external-id steps of :mod:`.classify`;
4. :mod:`.rank_metadata` makes the file's ``ranks`` row.

Names with a leading underscore are private to this package; its modules share them.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import polars as pl

import traceinsight.ingest.guard as guard
from traceinsight._allocators import release_freed_memory
from traceinsight.errors import TraceFormatError
from traceinsight.ingest.kineto.classify import KIND_BY_CATEGORY  # noqa: F401 (public: the mapping)
from traceinsight.ingest.kineto.classify import _external_ids, _link_syncs, _ownership
from traceinsight.ingest.kineto.columns import _ReadColumns
from traceinsight.ingest.kineto.rank_metadata import _rank, _rank_frame
from traceinsight.ingest.kineto.streaming import _read_streaming
from traceinsight.ingest.kineto.times import _timestamps
from traceinsight.ingest.kineto.whole_file import _GZIP_MAGIC, _decode, _gunzip, _read_file, _whole_file_columns
from traceinsight.model import INTERVAL_SCHEMA, TraceModel, conform, with_depth

__all__ = ["read_kineto"]


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
        ``intervals`` with the kinds listed in :mod:`~traceinsight.ingest.kineto.classify`, no
        ``samples``, and one ``ranks`` row.

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
    read = _whole_file_columns(decoded, path=path, warnings=warnings)
    intervals, facts = _finish_intervals(read, warnings)
    del read
    release_freed_memory()
    ranks = _rank_frame(decoded.trace, facts, path=path)
    return TraceModel(intervals=intervals, ranks=ranks, warnings=warnings)


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
