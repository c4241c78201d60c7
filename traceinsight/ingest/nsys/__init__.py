"""Read an Nsight Systems SQLite export (``nsys export --type sqlite``) into a TraceModel.

The export is opened read-only and probed table by table: nsys creates tables lazily, adds and
drops columns between versions (2021 legacy exports up to 2026.2), and a file without any
event table is normal. Every table and column is therefore looked up before it is queried.

The steps
---------
:func:`read_nsys` opens the file; :func:`_build_model` reads it, one module a job:

1. :mod:`.sqlite_export` (query and fetch): the file opened untouched and read untrusted (the
   file's SQL never runs, every query has a deadline), its tables and columns probed, typed
   reads of them;
2. :mod:`.tables` (table decoding): each event table as a frame of the model's columns;
3. :mod:`.rank_metadata` (model building): one rank per profiled process, the ``ranks``
   frame; :func:`_build_model` then joins the tables' frames, checks and orders them.

Names with a leading underscore are private to this package; its modules share them.
"""

from __future__ import annotations

import os
import shutil
import sqlite3

import polars as pl

import traceinsight.ingest.guard as guard
from traceinsight.errors import TraceFormatError, TraceInputError, one_line
from traceinsight.ingest.nsys.rank_metadata import _ranks
from traceinsight.ingest.nsys.sqlite_export import KERNEL_TABLE, STRING_TABLE, _INT, _check_memory, _Export
from traceinsight.ingest.nsys.sqlite_export import _database_error_message, _interruptible, _open_untouched
from traceinsight.ingest.nsys.sqlite_export import _truncation
from traceinsight.ingest.nsys.tables import _EventTables
from traceinsight.model import INTERVAL_SCHEMA, SAMPLE_SCHEMA, TraceModel, empty_frame, with_depth


def read_nsys(path: str) -> TraceModel:
    """Read one Nsight Systems SQLite export into a :class:`~traceinsight.model.TraceModel`.

    The file is opened read-only and never modified. Tables or columns the export lacks are
    skipped (a note lands in ``model.warnings``); only a file that is not an SQLite database,
    is corrupt, or is a database of some other program is refused.

    Parameters
    ----------
    path
        An ``.sqlite`` file written by ``nsys export --type sqlite`` (any version from the
        2021 legacy exporter to 2026.x, Linux, Windows or WSL2 targets).

    Returns
    -------
    TraceModel
        ``intervals`` (kernel, memcpy, memset, sync, cuda_api, annotation, osrt), ``samples``
        (CPU samples with stacks) and ``ranks`` (one row per profiled process).

    Raises
    ------
    TraceInputError
        The file is missing, not an SQLite database, corrupt, or not an nsys export.

    Examples
    --------
    >>> from traceinsight.ingest.nsys import read_nsys
    >>> model = read_nsys("trace.sqlite")  # doctest: +SKIP
    >>> model.of_kind("kernel").select("name", "start_ns", "end_ns").head(3)  # doctest: +SKIP
    >>> model.ranks.select("rank", "rank_source", "pid", "gpu_names")  # doctest: +SKIP
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TraceInputError("no such file", path=path)
    if os.path.isdir(path):
        raise TraceInputError("is a directory, expected an nsys SQLite export", path=path)
    guard.check_regular(path)  # a FIFO or a device would block the open
    truncated = _truncation(path)
    if truncated:
        raise TraceFormatError(truncated, path=path)
    copy_folder = None
    try:
        connection, copy_folder = _open_untouched(path)
        notes = (
            ["the export has a write-ahead log or rollback journal beside it (an export still being "
             "written, or a crash): it was read from a private copy, so neither file changed"]
            if copy_folder else []
        )
        export = _Export(connection, path)
        export.copied = copy_folder is not None
        with _interruptible(connection, path) as deadline:
            export.deadline = deadline
            return _build_model(export, warnings=notes)
    except sqlite3.DatabaseError as exc:
        raise TraceFormatError(_database_error_message(exc), path=path) from None
    except UnicodeDecodeError:
        # SQLite's own error message quoted bytes of a damaged schema that are not UTF-8.
        raise TraceFormatError(
            _database_error_message(sqlite3.DatabaseError("malformed database schema")), path=path
        ) from None
    finally:
        if "export" in locals():
            export.close()
        if "connection" in locals():
            connection.close()
        if copy_folder is not None:
            shutil.rmtree(copy_folder, ignore_errors=True)


def _build_model(export: _Export, *, warnings: list[str]) -> TraceModel:
    """The model of an open export: its event tables decoded, one rank per process, the
    frames checked and ordered. ``warnings`` collects the notes on the input."""
    if not export.is_nsys_export():
        raise TraceFormatError(
            "SQLite database is not an Nsight Systems export (no StringIds and no nsys "
            "tables); create one with `nsys export --type sqlite`",
            path=export.path,
        )
    _check_memory(export)
    if export.ignored:
        names = sorted(guard.scrub_value(one_line(name, limit=80)) for name in export.ignored)
        warnings.append(
            f"{len(names)} view(s) or virtual table(s) ignored ({', '.join(names[:5])}"
            f"{', ...' if len(names) > 5 else ''}): only tables are read, the SQL of an untrusted "
            "file is not run"
        )
    if export.table(STRING_TABLE) is None:
        warnings.append(
            "the export has no StringIds table: kernel, CUDA API and range names are unknown"
        )
    if export.table(KERNEL_TABLE) is None:
        warnings.append(
            f"no {KERNEL_TABLE} table: the export has no GPU kernels (profile with "
            "--trace=cuda to record them)"
        )
    tables = _EventTables(export, warnings)
    runtime = tables.cuda_api()
    parts = [
        tables.kernels(),
        tables.memcpys(),
        tables.memsets(),
        tables.syncs(runtime),
        runtime,
        tables.annotations(),
        tables.osrt_calls(),
    ]
    parts = [part for part in parts if part is not None and not part.is_empty()]
    samples = tables.samples()

    event_processes = (
        pl.concat([part.select("_proc") for part in parts]).unique()
        if parts
        else pl.DataFrame(schema={"_proc": _INT})
    )
    if event_processes.is_empty() and samples is not None and not samples.is_empty():
        # A sampling-only capture: the sampled processes are all we know of.
        event_processes = samples.select("_proc").unique()
    event_processes = event_processes.drop_nulls()
    # Rows without a process id (globalTid/globalPid NULL) get no rank; the check of the
    # model below drops them and says how many.
    if samples is not None:
        samples = samples.join(event_processes, on="_proc", how="semi")

    if not parts and (samples is None or samples.is_empty()):
        warnings.append(
            "no events: the export has no CUDA, NVTX, OS runtime or CPU sampling rows"
        )

    ranks, rank_of_process = _ranks(export, event_processes, parts, warnings)
    to_rank = pl.col("_proc").replace_strict(
        rank_of_process, default=None, return_dtype=pl.Int32
    )

    if parts:
        # Peak memory: the tables become one frame a column at a time, each table's column
        # let go as it joins the frame, and the rows are checked before the sort (a stable
        # sort keeps the same order either way). The sort is an order, then a gather column
        # by column, each column let go as its sorted copy is made: one copy of the intervals
        # and a column at once, not two copies. A column null in every row is its own sorted
        # copy: gathered, it would be materialised (7-14 MB a column at 900k rows) where it
        # is one broadcast null.
        del runtime
        parts = [part.with_columns(rank=to_rank) for part in parts]
        intervals = _stacked(parts, INTERVAL_SCHEMA)
        del parts
        intervals = guard.valid_intervals(intervals, warnings)
        order = intervals.select(
            pl.arg_sort_by("rank", "start_ns", nulls_last=True, maintain_order=True)
        ).to_series()
        columns = intervals.get_columns()
        del intervals
        for index in range(len(columns)):
            if columns[index].null_count() < columns[index].len():
                columns[index] = columns[index].gather(order)
        intervals = pl.DataFrame(columns)
        del columns, order
        intervals = with_depth(intervals)
    else:
        intervals = empty_frame(INTERVAL_SCHEMA)

    if samples is not None and not samples.is_empty():
        samples = _conformed(samples.with_columns(rank=to_rank), SAMPLE_SCHEMA).sort(
            ["rank", "time_ns"], nulls_last=True, maintain_order=True
        )
        samples = guard.valid_samples(samples, warnings)
    else:
        samples = empty_frame(SAMPLE_SCHEMA)

    return TraceModel(intervals=intervals, samples=samples, ranks=ranks, warnings=warnings)


def _stacked(parts: list[pl.DataFrame], schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """The rows of ``parts``, one after the other, as :func:`_conformed` columns; ``parts``
    is emptied on the way.

    The same frame as ``_conformed(pl.concat(parts, how="diagonal_relaxed"), schema)``,
    built a column at a time: each part's piece of a column is let go once the column is
    whole, so the tables and the frame are not held twice. A whole-frame concat holds both:
    the peak of reading the emit_nvtx flood at 1x was 357 MiB with it, 321 without. A
    column no part has stays one typed null, as there.

    Each column is copied whole (one piece), not left as the parts' pieces end to end: left
    so, the sort's gather of the string pieces kept more of their buffers alive, and the
    model at 1x was 20 MiB larger.
    """
    heights = [part.height for part in parts]
    columns = []
    for name, dtype in schema.items():
        if not any(name in part.columns for part in parts):
            columns.append(pl.lit(None, dtype).alias(name))
            continue
        pieces = [
            part.get_column(name).cast(dtype, strict=False) if name in part.columns
            else pl.repeat(None, height, dtype=dtype, eager=True).alias(name)
            for part, height in zip(parts, heights)
        ]
        for index, part in enumerate(parts):
            if name in part.columns:
                parts[index] = part.drop(name)
        columns.append(pl.concat(pieces, rechunk=True).alias(name))
        del pieces
    parts.clear()
    # Every part has a rank column, so the frame has rows for the null literals to fill.
    return pl.DataFrame([column for column in columns if isinstance(column, pl.Series)]).select(
        column if isinstance(column, pl.Expr) else pl.col(column.name) for column in columns
    )


def _conformed(frame: pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """``frame`` with exactly the columns of ``schema``, absent ones as typed null literals.

    Same result as :func:`traceinsight.model.conform`, which builds a Python list of ``None``
    per absent column; a null literal instead saves about 0.1 s on a 500k-interval export.
    """
    return frame.select(
        (pl.col(name) if name in frame.columns else pl.lit(None))
        .cast(dtype, strict=False)
        .alias(name)
        for name, dtype in schema.items()
    )
