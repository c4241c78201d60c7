"""A compact timeline of one step: what the CPU threads and the GPU streams did, lane by lane.

The HTML report draws these frames as horizontal bars (the anomalous step beside the typical
step of its rank). A step of a real job holds thousands of kernels and launch calls, far more
than a page can draw or a reader can see, so the frame is bounded:

- annotations (NVTX ranges, ``record_function`` labels) are kept, longest first, one lane per
  thread and nesting depth;
- launch calls and other CUDA API calls of a thread become *busy blocks* when there are too
  many: neighbours are merged across every gap but the largest ones, so the idle stretches
  that matter stay visible; host-synchronizing calls are kept apart;
- GPU activity is merged the same way, per stream;
- CPU gaps (GPU idle because the host had not launched yet) are kept, largest first, with
  their cause and evidence.

Times are milliseconds from the step window's start; nothing here reads a trace file again.
"""

from __future__ import annotations

import io

import numpy as np
import polars as pl

from traceinsight.model import TraceModel

#: Columns of a timeline frame (see :func:`step_timeline`).
TIMELINE_SCHEMA: dict[str, pl.DataType] = {
    "lane": pl.String(),
    "lane_order": pl.Int32(),
    "kind": pl.String(),
    "name": pl.String(),
    "start_ms": pl.Float64(),
    "end_ms": pl.Float64(),
    "count": pl.Int32(),
    "busy": pl.Float64(),
    "detail": pl.String(),
}

#: Kinds a timeline row can have.
TIMELINE_KINDS = (
    "annotation",  # NVTX range / record_function
    "launch",  # launch calls (cudaLaunchKernel, cudaMemcpyAsync...), or a block of them
    "cuda_api",  # other CUDA API calls
    "sync",  # a host wait on the GPU (cudaStreamSynchronize, blocking copies...)
    "cpu_gap",  # GPU idle because the host had not launched the next work yet
    "kernel",
    "comm_kernel",
    "memcpy",
    "memset",
)

#: At most this many CPU threads get lanes (the step's own thread first, then the busiest).
MAX_THREADS = 4
#: Names are shortened to this many characters (kernel signatures can be kilobytes long).
MAX_NAME = 160


def _empty() -> pl.DataFrame:
    return pl.DataFrame(schema=TIMELINE_SCHEMA)


def typical_steps(findings) -> dict[int, int]:
    """Each rank's typical step: its unflagged step of median duration (the lower median, ties
    by step number), or the median of all its steps where every step is flagged."""
    steps = findings.steps
    if steps.is_empty():
        return {}
    flagged = pl.col("anomalous") if "anomalous" in steps.columns else pl.lit(False)
    any_normal = (~flagged).any().over("rank")
    picked = (steps.filter(~flagged | ~any_normal).sort("rank", "duration_ns", "step")
              .group_by("rank", maintain_order=True).agg(pl.col("step").get((pl.len() - 1) // 2)))
    return {int(rank): int(step) for rank, step in picked.iter_rows()}


def _blocks(frame: pl.DataFrame, budget: int, min_gap_ns: float = 0.0) -> pl.DataFrame:
    """Merge rows (``start_ns, end_ns, name, kind``) of one lane into at most ``budget`` blocks.

    Gaps up to ``min_gap_ns`` are closed (a gap too short to see); beyond that, rows stay as
    they are when there are few enough, else every gap but the ``budget - 1`` largest is
    closed, so the longest idle stretches of the lane stay visible. Adds ``count``, ``busy``
    (the fraction of the block covered by its events: a block of 2,000 short kernels with
    gaps between them is not a solid bar) and ``detail``; a merged block is named after its
    busiest name.
    """
    single = dict(count=pl.lit(1, pl.Int32), busy=pl.lit(1.0), detail=pl.lit(None, pl.String))
    if frame.is_empty():
        return frame.with_columns(**single)
    frame = frame.sort("start_ns")
    budget = max(int(budget), 1)
    if frame.height <= budget and min_gap_ns <= 0:
        return frame.with_columns(**single)
    starts = frame.get_column("start_ns").to_numpy()
    ends = frame.get_column("end_ns").to_numpy()
    reach = np.maximum.accumulate(ends)
    gaps = starts[1:] - reach[:-1]
    breaks = gaps > max(min_gap_ns, 0)
    if breaks.sum() + 1 > budget:
        # only the budget-1 largest gaps (stable order, so ties do not exceed the budget)
        largest = np.argsort(-gaps, kind="stable")[: budget - 1]
        keep = np.zeros(gaps.size, dtype=bool)
        keep[largest] = True
        breaks &= keep
    block = np.concatenate([[0], np.cumsum(breaks)])
    frame = frame.with_columns(_block=pl.Series(block, dtype=pl.Int64), _dur=pl.col("end_ns") - pl.col("start_ns"))
    spans = frame.group_by("_block").agg(
        start_ns=pl.col("start_ns").min(),
        end_ns=pl.col("end_ns").max(),
        count=pl.len().cast(pl.Int32),
        busy=_covered(),
    )
    top = (
        frame.group_by("_block", "name", "kind")
        .agg(t=pl.col("_dur").sum(), n=pl.len())
        .sort(["_block", "t", "name"], descending=[False, True, False])
        .group_by("_block", maintain_order=True)
        .first()
    )
    merged = spans.join(top, on="_block").sort("_block")
    return merged.select(
        "start_ns",
        "end_ns",
        pl.when(pl.col("count") > 1)
        .then(pl.format("{} events, mostly {} ({}x)", pl.col("count"), pl.col("name"), pl.col("n")))
        .otherwise(pl.col("name"))
        .alias("name"),
        "kind",
        "count",
        (pl.col("busy") / (pl.col("end_ns") - pl.col("start_ns")).clip(1)).clip(0.0, 1.0).alias("busy"),
        pl.when(pl.col("count") > 1)
        .then(pl.format("busy {} ms of this block ({}%)", (pl.col("busy") / 1e6).round(3),
                        (100 * pl.col("busy") / (pl.col("end_ns") - pl.col("start_ns")).clip(1)).round(0)))
        .alias("detail"),
    )


def _covered() -> pl.Expr:
    """Time covered by a group's intervals (overlaps counted once), in an aggregation."""
    start, end = pl.col("start_ns"), pl.col("end_ns")
    reach = end.cum_max()
    # each interval adds what it covers beyond everything before it
    prior = reach.shift(1).fill_null(start.first())
    return ((end - pl.max_horizontal(start, prior)).clip(0)).sum()


def _range_label(lane: pl.DataFrame) -> str:
    """A range lane is labelled with its ranges' names: the longest-running name, and how many
    other names the lane holds."""
    totals = (lane.group_by("name").agg(t=(pl.col("end_ns") - pl.col("start_ns")).sum())
              .sort(["t", "name"], descending=[True, False]))
    if totals.is_empty():
        return "ranges"
    first = str(totals.get_column("name")[0] or "?")
    if len(first) > 24:  # from the middle: "GroupedLin…layer1.fc1" keeps fc1 / fc2 apart
        first = first[:10] + "…" + first[-12:]
    return first + (f" +{totals.height - 1}" if totals.height > 1 else "")


def _lane(frame: pl.DataFrame, lane: str, order: int) -> pl.DataFrame:
    return frame.with_columns(lane=pl.lit(lane), lane_order=pl.lit(order, pl.Int32))


def step_timeline(model: TraceModel, findings, *, rank: int, step: int, max_events: int = 4000,
                  resolution: float = 0.0) -> pl.DataFrame:
    """The lanes of one step window of one rank, at most about ``max_events`` rows.

    Parameters
    ----------
    model
        The trace model the findings came from.
    findings
        :class:`~traceinsight.analysis.pipeline.Findings` (its step table, CPU gaps and GPU
        activities are used).
    rank, step
        Which step window.
    max_events
        Row budget: a quarter for annotations, a quarter for CUDA API calls, an eighth for CPU
        gaps, the rest for GPU streams.
    resolution
        A fraction of the step window (``1/1500``: about a pixel of a page-wide figure): gaps
        shorter than that between launch calls or GPU activities are closed, CPU gaps shorter
        than that are left out. 0 keeps every event within the budget.

    Returns
    -------
    polars.DataFrame
        :data:`TIMELINE_SCHEMA`: ``lane`` (label), ``lane_order`` (top to bottom), ``kind``
        (:data:`TIMELINE_KINDS`), ``name``, ``start_ms`` and ``end_ms`` from the step start,
        ``count`` (events merged into the row), ``busy`` (fraction of the row its events
        cover: 1 for one event), ``detail`` (cause and evidence of a CPU gap, busy time of a
        block). Range lanes are labelled with their longest-running range name; GPU lanes
        with the stream's busy share of the step. Empty when the step is unknown.

    Examples
    --------
    >>> frame = step_timeline(model, findings, rank=0, step=7)  # doctest: +SKIP
    >>> frame.filter(kind="cpu_gap").sort("end_ms", descending=True)  # doctest: +SKIP
    """
    # here, not at the top: the HTML report drawn from the findings cache reads this module
    # for the anomalies' order, and needs none of the classification patterns
    from traceinsight.analysis.classify import HOST_SYNC_API, LAUNCH_API

    window = findings.steps.filter((pl.col("rank") == rank) & (pl.col("step") == step))
    if window.is_empty():
        return _empty()
    row = window.row(0, named=True)
    w0, w1 = int(row["start_ns"]), int(row["end_ns"])
    step_tid = row.get("tid")
    budget = max(int(max_events), 40)
    min_gap = max(float(resolution), 0.0) * (w1 - w0)
    inside = (pl.col("rank") == rank) & (pl.col("end_ns") > w0) & (pl.col("start_ns") < w1)
    clip = [pl.col("start_ns").clip(w0, w1), pl.col("end_ns").clip(w0, w1)]
    parts: list[pl.DataFrame] = []

    cpu = model.intervals.filter(inside & pl.col("kind").is_in(["annotation", "cuda_api", "sync"])
                                 & pl.col("tid").is_not_null())
    cpu = cpu.select("kind", "name", "tid", "depth", "start_ns", "end_ns").with_columns(clip)
    threads = (
        cpu.group_by("tid").agg(n=pl.len())
        .with_columns(own=pl.col("tid") == (step_tid if step_tid is not None else -1))
        .sort(["own", "n", "tid"], descending=[True, True, False])
        .head(MAX_THREADS)
        .get_column("tid").to_list()
    )
    order = 0
    annotation_budget = budget // 4
    api_budget = budget // 4 // max(len(threads), 1)
    annotations = (
        cpu.filter((pl.col("kind") == "annotation") & pl.col("tid").is_in(threads))
        .with_columns(_d=pl.col("end_ns") - pl.col("start_ns"))
        .sort("_d", descending=True)
        .head(annotation_budget)
    )
    for tid in threads:
        prefix = "main" if tid == step_tid else f"tid {tid}"
        mine = annotations.filter(pl.col("tid") == tid)
        for depth in sorted(d for d in mine.get_column("depth").unique().to_list() if d is not None):
            lane = mine.filter(pl.col("depth") == depth).select(
                "start_ns", "end_ns", "name", "kind",
                count=pl.lit(1, pl.Int32), busy=pl.lit(1.0), detail=pl.lit(None, pl.String))
            parts.append(_lane(lane, f"{prefix} · {_range_label(lane)}", order))
            order += 1
        calls = cpu.filter((pl.col("tid") == tid) & pl.col("kind").is_in(["cuda_api", "sync"]))
        if calls.is_empty():
            continue
        is_sync = (pl.col("kind") == "sync") | pl.col("name").str.contains(HOST_SYNC_API.pattern)
        syncs = calls.filter(is_sync & (pl.col("kind") == "cuda_api"))
        if syncs.is_empty():  # only the profiler's sync records: use them
            syncs = calls.filter(pl.col("kind") == "sync")
        syncs = syncs.with_columns(kind=pl.lit("sync")).select("start_ns", "end_ns", "name", "kind")
        others = calls.filter(~is_sync).with_columns(
            kind=pl.when(pl.col("name").str.contains(LAUNCH_API.pattern)).then(pl.lit("launch"))
            .otherwise(pl.lit("cuda_api"))
        ).select("start_ns", "end_ns", "name", "kind")
        merged = _blocks(others, max(api_budget - min(syncs.height, api_budget // 4), 1), min_gap)
        # a block of launch calls and other API calls counts as launches when any are launches
        lane = pl.concat([merged, _blocks(syncs, max(api_budget // 4, 1))], how="vertical_relaxed")
        parts.append(_lane(lane, f"{prefix} · CUDA API", order))
        order += 1

    gaps = findings.cpu_gaps
    if gaps.height and "rank" in gaps.columns:
        gaps = gaps.filter(inside).with_columns(clip).with_columns(_d=pl.col("end_ns") - pl.col("start_ns"))
        gaps = gaps.filter(pl.col("_d") >= min_gap)
        gaps = gaps.sort("_d", descending=True).head(max(budget // 8, 1))
        if gaps.height:
            evidence = pl.when(pl.col("evidence").is_not_null()).then(
                pl.format("{}: {}", pl.col("evidence_source").fill_null("evidence"), pl.col("evidence"))
            ).otherwise(pl.lit("no evidence in the trace"))
            lane = gaps.select(
                "start_ns", "end_ns",
                name=pl.format("cpu_gap.{}", pl.col("cause").fill_null("unknown")),
                kind=pl.lit("cpu_gap"),
                count=pl.lit(1, pl.Int32),
                busy=pl.lit(1.0),
                detail=pl.format("{}; GPU work after it: {}", evidence, pl.col("next_name").fill_null("?")),
            )
            parts.append(_lane(lane, "GPU idle · CPU gap", order))
            order += 1

    gpu = findings.gpu if findings.gpu.height and "is_comm" in findings.gpu.columns else None
    if gpu is None:
        gpu = model.intervals.filter(pl.col("kind").is_in(["kernel", "memcpy", "memset"])).with_columns(
            is_comm=pl.lit(False))
    gpu = gpu.filter(inside & pl.col("kind").is_in(["kernel", "memcpy", "memset"])).with_columns(clip)
    if gpu.height:
        gpu = gpu.select(
            "start_ns", "end_ns", "name", "device", "stream",
            kind=pl.when((pl.col("kind") == "kernel") & pl.col("is_comm").fill_null(False))
            .then(pl.lit("comm_kernel")).otherwise(pl.col("kind")),
        )
        streams = gpu.group_by("device", "stream").agg(n=pl.len()).sort("device", "stream")
        gpu_budget = max(budget - sum(p.height for p in parts), budget // 4)
        total = max(int(streams.get_column("n").sum()), 1)
        for device, stream, n in streams.iter_rows():
            share = max(int(gpu_budget * n / total), 20)
            lane = _blocks(
                gpu.filter((pl.col("device") == device) & (pl.col("stream") == stream))
                .select("start_ns", "end_ns", "name", "kind"),
                share,
                min_gap,
            )
            busy = float(lane.select((pl.col("busy") * (pl.col("end_ns") - pl.col("start_ns"))).sum()).item() or 0)
            label = (f"GPU {device if device is not None else '?'} · stream {stream if stream is not None else '?'}"
                     f" · busy {busy / max(w1 - w0, 1):.0%}")
            parts.append(_lane(lane, label, order))
            order += 1

    if not parts:
        return _empty()
    out = pl.concat([p.select("lane", "lane_order", "kind", "name", "start_ns", "end_ns", "count", "busy", "detail")
                     for p in parts], how="vertical_relaxed")
    return out.select(
        pl.col("lane").cast(pl.String),
        pl.col("lane_order").cast(pl.Int32),
        pl.col("kind").cast(pl.String),
        pl.col("name").fill_null("").str.slice(0, MAX_NAME).cast(pl.String),
        ((pl.col("start_ns") - w0) / 1e6).round(4).alias("start_ms"),
        ((pl.col("end_ns") - w0) / 1e6).round(4).alias("end_ms"),
        pl.col("count").cast(pl.Int32),
        pl.col("busy").cast(pl.Float64).fill_null(1.0).round(3),
        pl.col("detail").cast(pl.String).str.slice(0, 400),
    ).sort("lane_order", "start_ms")


def report_anomalies(findings, limit: int | None = None) -> pl.DataFrame:
    """The anomalies in report order: largest excess first (``limit`` of them); ties keep
    the findings' order."""
    ordered = findings.anomalies.sort(
        [pl.col("excess_ms").fill_null(0), pl.col("rank").fill_null(0), pl.col("step").fill_null(0)],
        descending=[True, False, False], maintain_order=True)
    return ordered if limit is None else ordered.head(limit)


#: The model's columns that :func:`step_timeline` reads when the findings carry their GPU
#: activities, as the engine's do: those of the CPU lanes.
TIMELINE_MODEL_COLUMNS = ("rank", "kind", "name", "tid", "depth", "start_ns", "end_ns")
#: Rows per Parquet row group of :class:`PackedTimelineRows`. The step windows drawn are a
#: few of many: the scan that reads them back applies their filter as it reads, with the
#: row groups' start and end statistics to go by (two windows of the 1x emit_nvtx flood:
#: 0.04 s, against 0.13 s to read every row).
PACKED_ROW_GROUP = 65_536


class PackedTimelineRows:
    """What :func:`timelines_for_report` reads of a model, packed small while the model is gone.

    The HTML report's timelines are drawn after the analysis, for steps that only the
    analysis picks. Keeping the model's columns for them (:data:`TIMELINE_MODEL_COLUMNS`)
    through the analysis held them beside its peak: on the emit_nvtx flood at 1x a first run
    with the caches on peaked at 442 MiB, against 383 without the cache. Packed as Parquet
    in memory (zstd level 1), the 79 MB of columns take 10 MB, written in 0.3 s, and only
    the rows of the drawn step windows are kept when they are read back. (The first run's
    peak is then the findings cache's read-back check: 423 MiB.)

    Examples
    --------
    Packed by the analysis just before it empties the model:

    >>> packed = []
    >>> findings = analyze_model(model, free_model=True,  # doctest: +SKIP
    ...                          before_freeing=lambda whole: packed.append(PackedTimelineRows(whole)))
    >>> timelines = timelines_for_report(packed[0], findings)  # doctest: +SKIP
    """

    def __init__(self, model: TraceModel) -> None:
        buffer = io.BytesIO()
        model.intervals.select(TIMELINE_MODEL_COLUMNS).write_parquet(
            buffer, compression="zstd", compression_level=1, row_group_size=PACKED_ROW_GROUP)
        self._parquet = buffer.getvalue()
        self._ranks, self._warnings = model.ranks, list(model.warnings)

    @property
    def nbytes(self) -> int:
        """Size of the packed rows."""
        return len(self._parquet)

    def model_of(self, windows: list[tuple[int, int, int]]) -> TraceModel:
        """The rows of each ``(rank, start_ns, end_ns)`` window's rank that overlap it, in the
        model's order: every row :func:`step_timeline` reads for those step windows."""
        overlaps = [(pl.col("rank") == rank) & (pl.col("end_ns") > start) & (pl.col("start_ns") < end)
                    for rank, start, end in windows]
        intervals = pl.scan_parquet(io.BytesIO(self._parquet))
        intervals = intervals.filter(pl.any_horizontal(overlaps)) if overlaps else intervals.head(0)
        return TraceModel(intervals=intervals.collect(), ranks=self._ranks, warnings=list(self._warnings))


def timelines_for_report(model: TraceModel | PackedTimelineRows, findings, *, max_anomalies: int = 12,
                         max_events: int = 600, resolution: float = 1 / 1500) -> dict[tuple[int, int], pl.DataFrame]:
    """Timelines of the ``max_anomalies`` largest anomalies' steps and of their ranks' typical steps.

    Sized for a page: ``max_events`` rows each, gaps below ``resolution`` of the window closed
    (see :func:`step_timeline`). ``model`` is the model the findings came from, or its
    :class:`PackedTimelineRows` (the findings must then carry their GPU activities).

    Returns ``{(rank, step): frame}`` (see :func:`step_timeline`); a step shared by several
    anomalies, or a rank's typical step, appears once.
    """
    wanted: list[tuple[int, int]] = []
    typical_of = typical_steps(findings)
    for rank, step in report_anomalies(findings, max_anomalies).select("rank", "step").iter_rows():
        if rank is None or step is None:
            continue
        typical = typical_of.get(rank)
        for key in ((rank, step), (rank, typical)):
            if key[1] is not None and key not in wanted:
                wanted.append(key)
    if isinstance(model, PackedTimelineRows):
        bounds = {(rank, step): (start, end) for rank, step, start, end in
                  findings.steps.select("rank", "step", "start_ns", "end_ns").iter_rows()}
        model = model.model_of([(key[0], *bounds[key]) for key in wanted if key in bounds])
    return {key: step_timeline(model, findings, rank=key[0], step=key[1], max_events=max_events,
                               resolution=resolution) for key in wanted}


__all__ = ["TIMELINE_KINDS", "TIMELINE_MODEL_COLUMNS", "TIMELINE_SCHEMA", "PackedTimelineRows", "report_anomalies",
           "step_timeline", "timelines_for_report", "typical_steps"]
