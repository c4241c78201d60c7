"""The normalized trace model: a few polars frames with a fixed schema.

Every ingestor (``traceinsight.ingest.*``) turns one file into a :class:`TraceModel`; every
analysis (``traceinsight.analysis.*``) reads only these frames. All times are integer
nanoseconds on the *rank's own clock*: ``start_ns`` is relative to the rank's clock origin,
and ``clock_origin_ns`` in the ``ranks`` frame is the wall-clock (Unix epoch) nanosecond of
that zero where the file tells it (``None`` where it does not). Cross-rank alignment adds a
per-rank offset on top of that (see ``traceinsight.analysis.alignment``).

Frames
------
``intervals``
    One row per timed event, CPU and GPU side alike (see :data:`INTERVAL_SCHEMA`).

    ============== =========================================================================
    column         meaning
    ============== =========================================================================
    rank           rank of the process that produced the event
    kind           one of :data:`INTERVAL_KINDS`
    name           event name (kernel short name, API name without ``_vNNNN``, NVTX text…)
    start_ns       start, ns on the rank's clock
    end_ns         end, ns on the rank's clock (``end_ns >= start_ns``)
    pid            OS process id (CPU rows) or owning process (GPU rows)
    tid            OS thread id for CPU-side rows; null for GPU rows
    device         GPU index for GPU-side rows; null for CPU rows
    stream         CUDA stream for GPU-side rows; null for CPU rows
    correlation    CUDA correlation id linking an API call to the GPU work it launched
    external_id    Kineto ``External id`` (links ops to their launches in 2024+ traces)
    depth          nesting depth among rows of the same kind family on the same thread
                   (0 = outermost); null for GPU rows. Families: annotations (NVTX and
                   user annotations) and ops (cpu_op, python); other CPU kinds are depth 0.
    domain         NVTX domain name (``None`` for the default domain and for Kineto)
    bytes          bytes moved (memcpy) or set (memset)
    detail         a short free-form extra: memcpy direction (``HtoD``…), sync type,
                   input shapes of an op (``[[2048, 4096], []]``), long kernel signature
    comm_op        collective name where the trace tells it (``all_to_all``, ``allreduce``…)
    comm_group     process-group name
    comm_group_size
    comm_seq       collective sequence number within its group
    comm_in_nelems, comm_out_nelems   element counts of a collective
    comm_in_split, comm_out_split     all-to-all split sizes, as the trace spells them
    stack          backtrace of an OS-runtime call, innermost frame first (``symbol``
                   or the module where the symbol is unresolved)
    ============== =========================================================================

``samples``
    One row per CPU sample (see :data:`SAMPLE_SCHEMA`): ``rank, pid, tid, time_ns, state,
    frames`` (symbols, innermost first) and ``modules`` (the module of each frame).

``ranks``
    Per-rank metadata (see :data:`RANK_SCHEMA`). ``hostname`` is kept for alignment and for
    ``--show-host``; reports hide it by default.

Examples
--------
>>> import traceinsight
>>> model = traceinsight.load("sample_traces/moe_single_nsys.sqlite")  # doctest: +SKIP
>>> model.intervals.filter(kind="kernel").height  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

#: GPU-side interval kinds.
GPU_KINDS = ("kernel", "memcpy", "memset", "gpu_annotation")
#: CPU-side interval kinds.
#:
#: - ``cuda_api``: CUDA runtime or driver API call (``cudaLaunchKernel``, ``cuLaunchKernelEx``)
#: - ``sync``: a host-side synchronization as the GPU profiler reports it (nsys
#:   ``CUPTI_ACTIVITY_KIND_SYNCHRONIZATION``; Kineto ``cuda_sync``)
#: - ``annotation``: NVTX range or ``record_function``/``user_annotation`` (incl. ``ProfilerStep#N``)
#: - ``cpu_op``: framework operator (``aten::mm``, ``record_param_comms``)
#: - ``python``: Python function (Kineto ``with_stack``)
#: - ``osrt``: OS runtime call (nsys ``OSRT_API``: ``pthread_mutex_lock``, ``mmap64``…)
CPU_KINDS = ("cuda_api", "sync", "annotation", "cpu_op", "python", "osrt")
INTERVAL_KINDS = GPU_KINDS + CPU_KINDS

INTERVAL_SCHEMA: dict[str, pl.DataType] = {
    "rank": pl.Int32(),
    "kind": pl.String(),
    "name": pl.String(),
    "start_ns": pl.Int64(),
    "end_ns": pl.Int64(),
    "pid": pl.Int64(),
    "tid": pl.Int64(),
    "device": pl.Int32(),
    "stream": pl.Int64(),
    "correlation": pl.Int64(),
    "external_id": pl.Int64(),
    "depth": pl.Int32(),
    "domain": pl.String(),
    "bytes": pl.Int64(),
    "detail": pl.String(),
    "comm_op": pl.String(),
    "comm_group": pl.String(),
    "comm_group_size": pl.Int32(),
    "comm_seq": pl.Int64(),
    "comm_in_nelems": pl.Int64(),
    "comm_out_nelems": pl.Int64(),
    "comm_in_split": pl.String(),
    "comm_out_split": pl.String(),
    "stack": pl.List(pl.String()),
}

SAMPLE_SCHEMA: dict[str, pl.DataType] = {
    "rank": pl.Int32(),
    "pid": pl.Int64(),
    "tid": pl.Int64(),
    "time_ns": pl.Int64(),
    "state": pl.String(),
    "frames": pl.List(pl.String()),
    "modules": pl.List(pl.String()),
}

RANK_SCHEMA: dict[str, pl.DataType] = {
    "rank": pl.Int32(),
    #: how the rank number was found: ``distributedInfo``, ``MPI_RANKS``, ``env:RANK``,
    #: ``env:LOCAL_RANK``, ``record_param_comms``, ``process order``, ``file order``
    "rank_source": pl.String(),
    "source": pl.String(),  # the file path
    "format": pl.String(),  # "nsys-sqlite" | "kineto-json"
    "tool_version": pl.String(),  # nsys product version / kineto schema+torch info
    "pid": pl.Int64(),
    "hostname": pl.String(),
    "gpu_names": pl.List(pl.String()),
    "devices": pl.List(pl.Int32()),
    "world_size": pl.Int32(),
    "clock_origin_ns": pl.Int64(),  # epoch ns of the rank's time zero, null if unknown
}

_FAMILY = {"annotation": "annotation", "cpu_op": "op", "python": "op"}
_is_cpu_kind = pl.col("kind").is_in(CPU_KINDS)


def empty_frame(schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """An empty frame with ``schema``."""
    return pl.DataFrame(schema=schema)


def conform(frame: pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """Return ``frame`` with exactly the columns of ``schema``, in order, cast to its types.

    Missing columns are added as nulls; extra columns are dropped.
    """
    if list(frame.columns) == list(schema) and all(
        frame.schema[name] == dtype for name, dtype in schema.items()
    ):
        return frame
    return frame.select(
        [
            pl.col(name).cast(dtype, strict=False) if name in frame.columns
            else pl.lit(None, dtype=dtype).alias(name)
            for name, dtype in schema.items()
        ]
    )


def share_repeated_strings(series: pl.Series) -> pl.Series:
    """``series`` (String) with every row pointing at one stored copy of its value.

    A trace repeats a few thousand names and signatures over a million rows; built row by
    row, each row keeps its own copy of the bytes. Gathered from the distinct values, the
    rows share them: a 100-byte kernel signature then costs its 16-byte view per row.
    The values are unchanged.
    """
    if series.dtype != pl.String or series.is_empty():
        return series
    distinct = series.drop_nulls().unique()
    if distinct.len() * 2 > series.len():
        return series  # mostly distinct values: nothing to share
    codes = series.replace_strict(
        distinct, pl.int_range(distinct.len(), dtype=pl.UInt32, eager=True), default=None
    )
    return distinct.gather(codes).alias(series.name)


def compact_nulls(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with every column that is null in all rows held as one broadcast null.

    Most traces fill few of the schema's columns (no collectives, no stacks, no NVTX
    domains), and a materialised null column still costs 8-16 bytes a row: a quarter of a
    Kineto trace's model. The values and the schema are unchanged.
    """
    if frame.is_empty():
        return frame
    counts = frame.null_count().row(0)
    empty = [name for name, count in zip(frame.columns, counts) if count == frame.height]
    if not empty:
        return frame
    return frame.with_columns(pl.lit(None, frame.schema[name]).alias(name) for name in empty)


def with_depth(intervals: pl.DataFrame) -> pl.DataFrame:
    """Fill ``depth``: nesting level within each (rank, pid, tid, family) on the CPU side.

    Rows must be well nested per thread for the number to mean "stack depth"; where ranges
    overlap without nesting (NVTX start/end ranges may), the depth counts the ranges still
    open at the row's start. For each row: the rows of its group that started before it
    (in (start, -end) order) minus those that had already ended, found by one binary
    search over the group's sorted ends; no Python loop per row.
    """
    if intervals.is_empty():
        return intervals
    family = pl.col("kind").replace_strict(_FAMILY, default=None)
    nested_mask = (family.is_not_null() & pl.col("tid").is_not_null()).alias("_nested")
    keys = intervals.select(
        nested_mask,
        pl.struct("rank", "pid", "tid", family.alias("_family")).rank("dense").alias("_group"),
        "start_ns",
        "end_ns",
    )
    nested = keys.get_column("_nested").fill_null(False).to_numpy()
    depth = np.zeros(intervals.height, dtype=np.int64)
    if nested.any():
        group = keys.get_column("_group").to_numpy()[nested].astype(np.int64)
        start = keys.get_column("start_ns").to_numpy()[nested]
        end = keys.get_column("end_ns").to_numpy()[nested]
        depth[nested] = _nesting_depth(group, start, end)
    return intervals.with_columns(
        depth=pl.when(_is_cpu_kind).then(pl.Series(depth)).otherwise(None).cast(pl.Int32)
    )


def _nesting_depth(group: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Depth of each interval among the intervals of its group (see :func:`with_depth`)."""
    # Parents first: by group, then start ascending, then end descending.
    order = np.lexsort((-end, start, group))
    g, s, e = group[order], start[order], end[order]
    first_of_group = np.searchsorted(g, g, side="left")
    opened = np.arange(g.size) - first_of_group
    # Ends sorted within each group, as one array ordered by (group, end).
    end_order = np.lexsort((end, group))
    end_group, end_sorted = group[end_order], end[end_order]
    # Binary search by (group, time): map both to one monotone key per group.
    low = min(int(s.min()), int(end_sorted.min()))
    span = max(int(e.max()), int(s.max())) - low + 1
    if (int(g.max()) + 1) * span < 2**62:
        closed = np.searchsorted(end_group * span + (end_sorted - low), g * span + (s - low), side="right")
        closed -= np.searchsorted(end_group, g, side="left")
    else:  # keys would overflow: search group by group
        closed = np.empty(g.size, dtype=np.int64)
        bounds = np.flatnonzero(np.diff(g)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, g.size]):
            elo = np.searchsorted(end_group, g[lo], side="left")
            ehi = np.searchsorted(end_group, g[lo], side="right")
            closed[lo:hi] = np.searchsorted(end_sorted[elo:ehi], s[lo:hi], side="right")
    # A zero-length row counts itself among the closed ones; add it back.
    depth_sorted = np.clip(opened - closed + (e <= s), 0, None)
    out = np.empty_like(depth_sorted)
    out[order] = depth_sorted
    return out


@dataclass
class TraceModel:
    """The normalized content of one or more trace files.

    Attributes
    ----------
    intervals, samples, ranks
        The frames described in the module docstring.
    warnings
        Human-readable notes about what the input lacked or what was degraded
        (``"no CPU samples"``, ``"NVTX domain names missing"``…).
    """

    intervals: pl.DataFrame = field(default_factory=lambda: empty_frame(INTERVAL_SCHEMA))
    samples: pl.DataFrame = field(default_factory=lambda: empty_frame(SAMPLE_SCHEMA))
    ranks: pl.DataFrame = field(default_factory=lambda: empty_frame(RANK_SCHEMA))
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.intervals = compact_nulls(conform(self.intervals, INTERVAL_SCHEMA))
        self.samples = compact_nulls(conform(self.samples, SAMPLE_SCHEMA))
        self.ranks = conform(self.ranks, RANK_SCHEMA)

    @property
    def rank_ids(self) -> list[int]:
        """The ranks present, ascending."""
        return sorted(self.ranks.get_column("rank").to_list())

    def drop_events(self) -> None:
        """Empty ``intervals`` and ``samples`` (same schemas, no rows) so that their memory can
        be given back: for an analysis that owns the model and needs its events no more (see
        ``free_model`` of :func:`~traceinsight.analysis.engine.analyze_model`). ``ranks`` and
        ``warnings`` stay."""
        self.intervals = self.intervals.clear()
        self.samples = self.samples.clear()

    def of_kind(self, *kinds: str) -> pl.DataFrame:
        """Intervals whose ``kind`` is one of ``kinds``."""
        return self.intervals.filter(pl.col("kind").is_in(list(kinds)))

    @staticmethod
    def concat(models: list["TraceModel"]) -> "TraceModel":
        """Stack several single-file models (ranks must already be distinct)."""
        if len(models) == 1:
            return models[0]
        return TraceModel(
            intervals=pl.concat([m.intervals for m in models], how="vertical"),
            samples=pl.concat([m.samples for m in models], how="vertical"),
            ranks=pl.concat([m.ranks for m in models], how="vertical"),
            warnings=[w for m in models for w in m.warnings],
        )
