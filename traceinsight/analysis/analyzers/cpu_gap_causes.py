"""What the host was doing while the GPU waited for it (the ``cpu_gap`` time of a step).

For every GPU-idle piece charged to ``cpu_gap`` the launching thread (the one that launched
the GPU work ending the gap) is examined with the best evidence the trace holds, in order:

1. **CPU samples** (nsys ``-s cpu``): each sample's stack is classified innermost frame first
   (:func:`~traceinsight.analysis.classify.cause_of_stack`); shares are sample counts.
2. **OS-runtime calls** (nsys ``-t osrt``): time inside ``nanosleep``, ``futex``, ``mmap``...
3. **Python functions** (Kineto ``with_stack=True``): the deepest functions running.
4. **Framework ops and annotations**: the deepest op running; many small ops or launches point
   to launch overhead. An annotation alone (no op, no stack) tells *where* but not *why*:
   the cause is then ``unknown``.

Causes: :data:`~traceinsight.analysis.classify.GAP_CAUSES`. The ``evidence`` string names the
top frames, calls or ops with their share of the gap.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from traceinsight.analysis.classify import (
    HOST_SYNC_API,
    cause_of_name,
    cause_of_stack,
    causes_of_names,
    launch_expr,
)
from traceinsight.analysis.descriptor import Analysis
from traceinsight.analysis.intervals import holding
from traceinsight.model import TraceModel

__all__ = ["attribute_cpu_gaps"]

GAP_KEYS = ["rank", "pid", "tid"]
#: The interval columns that evidence for a gap is read from.
_ITEM_COLUMNS = ["rank", "pid", "tid", "start_ns", "end_ns", "name", "kind", "depth"]
#: Items matched against gaps at a time (bounds the temporary arrays of the matching).
_ITEM_BLOCK = 1 << 16
#: The least share of a gap an op or function must cover to name the gap.
MIN_SHARE = 0.1
#: How soon after a ``host_sync`` piece a gap must begin to be that sync's refill cost.
SYNC_FOLLOW_NS = 50_000
#: The longest gap after a sync that is taken as the sync's refill cost.
SYNC_REFILL_NS = 1_000_000
#: CUDA API calls that cost host time without launching work: the device allocator, loading
#: GPU code (lazy loading on a kernel's first launch) and synchronizing calls.
_COSTLY_CUDA_API = (
    r"^(?:cu(?:da)?(?:Malloc\w*|Free\w*|MemAlloc\w*|MemFree\w*|MemCreate|MemRelease|MemMap|MemUnmap"
    r"|HostAlloc|MallocHost|FreeHost|HostRegister|HostUnregister|MemHostAlloc\w*|MemFreeHost"
    r"|LibraryLoad\w*|ModuleLoad\w*)(?:_v\d+)?$)"
    r"|" + HOST_SYNC_API.pattern
)


def _pairs_overlapping(
    gap_starts: np.ndarray, gap_ends: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gap index, item index, overlap ns) for every item overlapping a gap.

    Gaps must be disjoint and sorted; items are arbitrary intervals.
    """
    first = np.searchsorted(gap_ends, starts, side="right")
    last = np.searchsorted(gap_starts, ends, side="left")
    counts = np.maximum(last - first, 0)
    item = np.repeat(np.arange(starts.size), counts)
    if item.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    offsets = np.arange(item.size) - np.repeat(np.cumsum(counts) - counts, counts)
    gap = first[item] + offsets
    overlap = np.minimum(ends[item], gap_ends[gap]) - np.maximum(starts[item], gap_starts[gap])
    keep = overlap > 0
    return gap[keep], item[keep], overlap[keep]


def _key_arrays(frame: pl.DataFrame) -> list[np.ndarray]:
    """The thread key columns as int64 arrays, null as -1 (no thread has that id)."""
    return [frame.get_column(name).cast(pl.Int64).fill_null(-1).to_numpy() for name in GAP_KEYS]


def _per_thread_overlaps(gaps: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    """Join gaps with the items of the same thread that overlap them (``overlap_ns`` added,
    with the items' columns other than the thread keys and times).

    Gaps come from a few threads: each thread's items are found with one comparison over
    the key arrays, matched a block at a time, and only the matching rows' other columns
    are gathered, once, at the end.
    """
    if gaps.is_empty() or items.is_empty():
        return pl.DataFrame()
    item_keys = _key_arrays(items)
    item_starts = items.get_column("start_ns").to_numpy()
    item_ends = items.get_column("end_ns").to_numpy()
    found_gaps, found_items, overlaps = [], [], []
    threads = gaps.drop_nulls(GAP_KEYS).partition_by(GAP_KEYS, as_dict=True, maintain_order=True)
    for key in sorted(threads):
        thread_gaps = threads[key].sort("start_ns")
        mine = np.ones(item_starts.size, dtype=bool)
        for values, wanted in zip(item_keys, key):
            mine &= values == wanted
        thread_items = np.flatnonzero(mine).astype(np.uint32)
        del mine
        starts = thread_gaps.get_column("start_ns").to_numpy()
        ends = thread_gaps.get_column("end_ns").to_numpy()
        ids = thread_gaps.get_column("gap_id").to_numpy()
        # A block of items at a time: the pair arrays' temporaries stay block-sized.
        for block in range(0, thread_items.size, _ITEM_BLOCK):
            chosen = thread_items[block : block + _ITEM_BLOCK]
            gap_index, item_index, overlap = _pairs_overlapping(starts, ends, item_starts[chosen], item_ends[chosen])
            found_gaps.append(ids[gap_index])
            found_items.append(chosen[item_index])
            overlaps.append(overlap)
    del item_keys
    if not found_items or not sum(part.size for part in found_items):
        return pl.DataFrame()
    hits = pl.DataFrame(
        {
            "gap_id": pl.Series(np.concatenate(found_gaps), dtype=gaps.schema["gap_id"]),
            "overlap_ns": np.concatenate(overlaps),
        }
    )
    del found_gaps, overlaps
    extra = items.drop(*GAP_KEYS, "start_ns", "end_ns")
    if not extra.width:
        return hits
    return hits.hstack(extra[pl.Series(np.concatenate(found_items))])


def _samples_in_gaps(gaps: pl.DataFrame, samples: pl.DataFrame) -> pl.DataFrame:
    frames = []
    for key, thread_gaps in gaps.group_by(GAP_KEYS):
        rank, pid, tid = key
        thread_samples = samples.filter((pl.col("rank") == rank) & (pl.col("tid") == tid))
        if thread_samples.is_empty():
            continue
        thread_gaps = thread_gaps.sort("start_ns")
        index = holding(thread_gaps.get_column("start_ns").to_numpy(), thread_gaps.get_column("end_ns").to_numpy(),
                        thread_samples.get_column("time_ns").to_numpy())
        inside = index >= 0
        if not inside.any():
            continue
        frames.append(
            thread_samples.filter(pl.Series(inside)).select("time_ns", "frames", "modules", "state").with_columns(
                gap_id=pl.Series(thread_gaps.get_column("gap_id").to_numpy()[index[inside]])
            )
        )
    if not frames:
        return pl.DataFrame()
    return pl.concat(frames)


def _label_of_stack(frames: list[str] | None, modules: list[str] | None, cause: str) -> str:
    """The frame that best names a stack for a reader: the one that decided the cause."""
    frames = frames or []
    modules = modules or [None] * len(frames)
    for frame, module in zip(frames, modules):
        if cause_of_name(frame) == cause or cause_of_name(module) == cause:
            return frame if frame and not frame.startswith("0x") else (module or frame or "?")
    if frames:
        frame = frames[0]
        return frame if frame and not frame.startswith("0x") else (modules[0] or frame)
    return "?"


def _classify_samples(hits: pl.DataFrame) -> pl.DataFrame:
    """Add ``cause`` and ``label`` to sample rows (one Python call per distinct stack)."""
    causes, labels = [], []
    memo: dict[tuple, tuple[str, str]] = {}
    for frames, modules, state in hits.select("frames", "modules", "state").iter_rows():
        key = (tuple(frames or ()), tuple(modules or ()), state)
        if key not in memo:
            cause = cause_of_stack(frames, modules)
            if cause in ("unknown", "unresolved", "python") and state and state.lower() not in ("running", "r"):
                cause = "blocked"
            if cause == "unresolved":
                module = next((m for m in (modules or []) if m), "?")
                memo[key] = (cause, f"unresolved frames in {module}")
            else:
                memo[key] = (cause, _label_of_stack(frames, modules, cause))
        cause, label = memo[key]
        causes.append(cause)
        labels.append(label)
    return hits.with_columns(cause=pl.Series(causes, dtype=pl.String), label=pl.Series(labels, dtype=pl.String))


def _infer_unreadable(hits: pl.DataFrame, *, by: list[str]) -> pl.DataFrame:
    """Give unreadable samples the cause of the nearest readable sample of the same thread.

    Interpreter and libc frames often come without symbols; such a sample is most likely
    doing what the readable sample closest in time on the same thread did (a collector pass
    or an allocation loop runs for many samples in a row). With no readable neighbour the
    cause stays ``unknown``.
    """
    readable = pl.col("cause") != "unresolved"
    hits = hits.sort(*by, "time_ns").with_columns(
        _cause=pl.when(readable).then(pl.col("cause")),
        _time=pl.when(readable).then(pl.col("time_ns")),
    )
    hits = hits.with_columns(
        _prev_cause=pl.col("_cause").forward_fill().over(by),
        _prev_time=pl.col("_time").forward_fill().over(by),
        _next_cause=pl.col("_cause").backward_fill().over(by),
        _next_time=pl.col("_time").backward_fill().over(by),
    )
    prev_is_nearer = (pl.col("time_ns") - pl.col("_prev_time")).fill_null(np.iinfo(np.int64).max) <= (
        pl.col("_next_time") - pl.col("time_ns")
    ).fill_null(np.iinfo(np.int64).max)
    return hits.with_columns(
        cause=pl.when(readable)
        .then(pl.col("cause"))
        .otherwise(
            pl.when(prev_is_nearer).then(pl.col("_prev_cause")).otherwise(pl.col("_next_cause")).fill_null("unknown")
        )
    ).drop("_cause", "_time", "_prev_cause", "_prev_time", "_next_cause", "_next_time")


def _sample_weights(counts: pl.DataFrame, durations: pl.DataFrame, *, key: str, source: str) -> pl.DataFrame:
    """Turn per-(key, cause, label) sample counts into time weights (share of the gap)."""
    per_key = counts.group_by(key).agg(total=pl.col("count").sum())
    return (
        counts.join(per_key, on=key)
        .join(durations, on=key)
        .with_columns(
            weight_ns=(pl.col("count") / pl.col("total") * pl.col("duration_ns")).cast(pl.Int64),
            source=pl.lit(source),
        )
        .filter(pl.col("weight_ns") > 0)
        .select(key, "cause", "label", "weight_ns", "source")
    )


def _weights_from_samples(gaps: pl.DataFrame, samples: pl.DataFrame) -> pl.DataFrame:
    hits = _samples_in_gaps(gaps, samples)
    if hits.is_empty():
        return pl.DataFrame()
    hits = _infer_unreadable(_classify_samples(hits), by=["gap_id"])
    counts = hits.group_by("gap_id", "cause", "label").agg(count=pl.len())
    return _sample_weights(counts, gaps.select("gap_id", "duration_ns"), key="gap_id", source="cpu samples")


def _pooled_evidence(gaps: pl.DataFrame, samples: pl.DataFrame, undecided: pl.DataFrame) -> pl.DataFrame:
    """Cause and evidence for gaps too short to hold a sample of their own.

    At ~1 kHz sampling a 30 µs gap rarely holds a sample, but the samples that land in any
    CPU gap of the same thread and step are a fair draw of what those gaps held: each
    undecided gap gets that pooled verdict (summarized once per pool, not once per gap).
    """
    empty = pl.DataFrame(schema={"gap_id": pl.UInt32, "cause": pl.String, "evidence": pl.String,
                                 "evidence_source": pl.String})
    if undecided.is_empty():
        return empty
    hits = _samples_in_gaps(gaps, samples)
    if hits.is_empty():
        return empty
    pool_keys = ["rank", "pid", "tid", "step"]
    hits = _classify_samples(hits.join(gaps.select("gap_id", *pool_keys), on="gap_id"))
    hits = _infer_unreadable(hits, by=pool_keys)
    pool = pl.concat_str([pl.col(k).cast(pl.String) for k in pool_keys], separator="/")
    counts = hits.group_by(*pool_keys, "cause", "label").agg(count=pl.len()).with_columns(pool=pool)
    unit = 1_000_000  # shares of a pool are sample fractions: express them per million
    weights = counts.with_columns(
        weight_ns=(pl.col("count") / pl.col("count").sum().over("pool") * unit).cast(pl.Int64),
        source=pl.lit("cpu samples pooled over the step's gaps"),
    ).select("pool", "cause", "label", "weight_ns", "source")
    durations = weights.select("pool").unique().with_columns(duration_ns=pl.lit(unit, pl.Int64))
    verdicts = _summarize_evidence(weights, durations, key="pool")
    return (
        undecided.with_columns(pool=pool)
        .join(verdicts, on="pool", how="inner")
        .select("gap_id", "cause", "evidence", "evidence_source")
    )


def _cause_of_cuda_call(name: str) -> str | None:
    if HOST_SYNC_API.match(name):
        return "host_sync"
    return cause_of_name(name)


def _weights_from_intervals(
    gaps: pl.DataFrame, items: pl.DataFrame, *, source: str, deepest_only: bool, default_cause: str | None,
    cause_of=cause_of_name,
) -> pl.DataFrame:
    if items.is_empty():
        return pl.DataFrame()
    # Ops say more than the annotations around them: rank them above any annotation depth.
    specificity = pl.col("depth").fill_null(0) + pl.when(pl.col("kind") == "annotation").then(0).otherwise(1 << 20)
    # Names travel as categorical codes until the few deciding hits are known: a gap is
    # overlapped by every op around it, and copying each one's name would cost more than
    # the rest of the analysis.
    hits = _per_thread_overlaps(
        gaps,
        items.select(
            "rank", "pid", "tid", "start_ns", "end_ns", pl.col("name").cast(pl.Categorical),
            specificity.cast(pl.Int32).alias("specificity"),
        ),
    )
    if hits.is_empty():
        return pl.DataFrame()
    if deepest_only:
        hits = hits.filter(_deepest_covering(hits, gaps))
    hits = hits.with_columns(pl.col("name").cast(pl.String))
    names = hits.select(pl.col("name").unique().drop_nulls()).to_series()
    if cause_of is cause_of_name:
        cause_table = causes_of_names(names, default_cause)
    else:  # a special rule over a few distinct names (CUDA calls)
        cause_table = pl.DataFrame(
            {"name": names, "cause": [cause_of(name) or default_cause for name in names.to_list()]},
            schema={"name": pl.String, "cause": pl.String})
    return (
        hits.join(cause_table, on="name", how="left", maintain_order="left")
        .with_columns(cause=pl.when(pl.col("name").is_null()).then(pl.lit(default_cause, pl.String))
                      .otherwise("cause"))
        .filter(pl.col("cause").is_not_null())
        .group_by("gap_id", "cause", pl.col("name").alias("label"))
        .agg(weight_ns=pl.col("overlap_ns").sum(), _calls=pl.len())
        # Recorded calls are counted: 160 cudaFree calls read differently from one.
        .with_columns(
            label=pl.when(pl.lit(not deepest_only) & (pl.col("_calls") > 1))
            .then(pl.format("{} ×{}", pl.col("label"), pl.col("_calls")))
            .otherwise(pl.col("label")),
            source=pl.lit(source),
        )
        .drop("_calls")
    )


def _deepest_covering(hits: pl.DataFrame, gaps: pl.DataFrame) -> np.ndarray:
    """Mask of the hits that may name their gap: those whose name covers at least
    ``MIN_SHARE`` of the gap (summed over the name's items: an op that merely touches the
    gap's edge says nothing about the rest), and of those the most specific.

    In numpy on integer keys: a polars window over (gap, name) strings needs several times
    the memory of the hits themselves.
    """
    gap = hits.get_column("gap_id").to_numpy().astype(np.int64)
    name = hits.get_column("name").to_physical().fill_null(-1).to_numpy().astype(np.int64) + 1
    overlap = hits.get_column("overlap_ns").to_numpy()
    specificity = hits.get_column("specificity").to_numpy()
    ids = gaps.get_column("gap_id").to_numpy().astype(np.int64)
    duration = np.zeros(int(ids.max()) + 1 if ids.size else 1, dtype=np.int64)
    duration[ids] = gaps.get_column("duration_ns").to_numpy()
    _, group = np.unique(gap * (int(name.max()) + 1) + name, return_inverse=True)
    covered = np.zeros(int(group.max()) + 1, dtype=np.int64)
    np.add.at(covered, group, overlap)
    covering = covered[group] >= MIN_SHARE * duration[gap]
    best = np.full(duration.size, np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(best, gap[covering], specificity[covering])
    return covering & (specificity == best[gap])


def attribute_cpu_gaps(model: TraceModel, gaps: pl.DataFrame, *, marker_names: list[str] = ()) -> pl.DataFrame:
    """Give every ``cpu_gap`` piece a cause and evidence.

    Reads the model's intervals and CPU samples and the breakdown's gap pieces; returns the
    CPU gaps with their cause and evidence.

    Parameters
    ----------
    model
        The trace model.
    gaps
        ``Breakdown.gaps`` from :func:`~traceinsight.analysis.analyzers.step_breakdown.step_breakdown`.
    marker_names
        Step-marker annotations: they hold every gap of their step and so say nothing.

    Returns
    -------
    polars.DataFrame
        The ``cpu_gap`` rows of ``gaps`` with ``cause``, ``evidence`` (top labels with their
        share), ``evidence_source`` and ``launches`` (GPU launches the thread made inside).

    Examples
    --------
    >>> pieces = step_breakdown(model, find_steps(model)).gaps  # doctest: +SKIP
    >>> attribute_cpu_gaps(model, pieces).group_by("cause").agg(pl.col("duration_ns").sum())  # doctest: +SKIP
    """
    cpu_gaps = (
        gaps.filter(pl.col("category") == "cpu_gap")
        .with_row_index("gap_id")
        .with_columns(duration_ns=pl.col("end_ns") - pl.col("start_ns"))
    )
    if cpu_gaps.is_empty():
        return cpu_gaps.with_columns(
            cause=pl.lit(None, pl.String), evidence=pl.lit(None, pl.String),
            evidence_source=pl.lit(None, pl.String), launches=pl.lit(0, pl.Int64),
        ).drop("gap_id")
    known = cpu_gaps.filter(pl.col("tid").is_not_null())
    intervals = model.intervals.lazy()

    def rows(where: pl.Expr) -> pl.DataFrame:
        # Lazily, so that only the columns the evidence needs are copied, not whole rows.
        return intervals.filter(where).select(_ITEM_COLUMNS).collect()

    osrt = _weights_from_intervals(
        known, rows(pl.col("kind") == "osrt"),
        source="os runtime", deepest_only=False, default_cause=None,
    )
    # The CUDA calls of the thread that cost time without launching: the device allocator
    # (cudaMalloc/cudaFree, pinned-host allocation) and synchronizing calls.
    cuda_calls = _weights_from_intervals(
        known, rows((pl.col("kind") == "cuda_api") & pl.col("name").str.contains(_COSTLY_CUDA_API)),
        source="cuda api", deepest_only=False, default_cause=None, cause_of=_cause_of_cuda_call,
    )
    if cuda_calls.height:
        osrt = pl.concat([osrt, cuda_calls], how="vertical_relaxed") if osrt.height else cuda_calls
    samples = _weights_from_samples(known, model.samples)
    if osrt.height and samples.height:
        # A thread asleep in a call takes no CPU samples, so samples speak only for the part
        # of the gap that no recorded OS call covers.
        covered = osrt.group_by("gap_id").agg(covered_ns=pl.col("weight_ns").sum())
        samples = (
            samples.join(covered, on="gap_id", how="left")
            .join(known.select("gap_id", "duration_ns"), on="gap_id")
            .with_columns(
                weight_ns=(
                    pl.col("weight_ns")
                    * (1 - (pl.col("covered_ns").fill_null(0) / pl.col("duration_ns")).clip(0, 1))
                ).cast(pl.Int64)
            )
            .drop("covered_ns", "duration_ns")
            .filter(pl.col("weight_ns") > 0)
        )
        # A recorded call says what the thread did; a sample that says nothing (no readable
        # frame, or only the profiler's own hook) must not outweigh it.
        samples = samples.filter(
            ~(pl.col("cause").is_in(["unknown", "unresolved"]) & pl.col("gap_id").is_in(covered.get_column("gap_id").implode()))
        )
    strong = [samples, osrt]
    python = _weights_from_intervals(
        known, rows(pl.col("kind") == "python"),
        source="python functions", deepest_only=True, default_cause="python",
    )
    # Framework ops only: an annotation (the range under judgement, or one around it) says
    # where the gap is, never why.
    ops = _weights_from_intervals(
        known, rows((pl.col("kind") == "cpu_op") & ~pl.col("name").is_in(list(marker_names))),
        source="ops", deepest_only=True, default_cause="unknown",
    )
    strong = [frame for frame in strong if not frame.is_empty()]
    # Evidence tiers, strongest first: the first tier with anything to say about a gap decides it.
    decided: list[pl.DataFrame] = []
    decided_ids: set[int] = set()

    def take(weights: pl.DataFrame) -> None:
        if weights.is_empty():
            return
        weights = weights.filter(~pl.col("gap_id").is_in(list(decided_ids)))
        if weights.height:
            decided.append(weights)
            decided_ids.update(weights.get_column("gap_id").unique().to_list())

    if strong:
        # A call or sample must account for a fair share of a gap to explain it: a 5 µs
        # cudaMalloc inside a 13 ms gap says nothing about the rest.
        weights = pl.concat(strong, how="vertical_relaxed")
        enough = (
            weights.group_by("gap_id").agg(_w=pl.col("weight_ns").sum())
            .join(known.select("gap_id", "duration_ns"), on="gap_id")
            .filter(pl.col("_w") >= MIN_SHARE * pl.col("duration_ns"))
            .select("gap_id")
        )
        take(weights.join(enough, on="gap_id", how="semi"))
    take(python)
    pooled = _pooled_evidence(known, model.samples, known.filter(~pl.col("gap_id").is_in(list(decided_ids))))
    decided_ids.update(pooled.get_column("gap_id").to_list())
    take(ops)
    launch_counts = (
        _per_thread_overlaps(known, rows(launch_expr()).select("rank", "pid", "tid", "start_ns", "end_ns"))
    )
    launch_counts = (
        launch_counts.group_by("gap_id").agg(launches=pl.len())
        if not launch_counts.is_empty()
        else pl.DataFrame(schema={"gap_id": pl.UInt32, "launches": pl.UInt32})
    )
    summaries = [pooled]
    if decided:
        evidence = pl.concat(decided, how="vertical_relaxed")
        summaries.append(_summarize_evidence(evidence, cpu_gaps.select("gap_id", "duration_ns"), key="gap_id"))
    summary = pl.concat([frame.cast({"gap_id": pl.UInt32}) for frame in summaries], how="vertical_relaxed")
    out = (
        cpu_gaps.join(summary, on="gap_id", how="left")
        .join(launch_counts, on="gap_id", how="left")
        .with_columns(
            launches=pl.col("launches").fill_null(0).cast(pl.Int64),
            cause=pl.col("cause").fill_null("unknown"),
            evidence_source=pl.col("evidence_source").fill_null("none"),
        )
    )
    # A gap whose thread only launched work (no op, no stack) is launch overhead.
    out = out.with_columns(
        cause=pl.when((pl.col("cause") == "unknown") & (pl.col("launches") >= 2))
        .then(pl.lit("launch_overhead"))
        .otherwise(pl.col("cause"))
    )
    out = _after_host_sync(out, gaps)
    return out.drop("gap_id").sort("rank", "start_ns")


def _after_host_sync(attributed: pl.DataFrame, pieces: pl.DataFrame) -> pl.DataFrame:
    """A gap that begins where a ``host_sync`` piece ends follows a synchronizing call that
    emptied the GPU queue: every microsecond of host work until the next launch is exposed
    because of that sync (``.item()``, ``.cpu()``, ``cudaStreamSynchronize``). Unless the
    evidence names something specific (the collector, an allocation, I/O, sleeping), its
    cause is the host sync, as the breakdown calls the wait itself."""
    syncs = (pieces.filter(pl.col("category") == "host_sync")
             .select("rank", pl.col("end_ns").alias("_sync_end")).sort("_sync_end"))
    if syncs.is_empty() or attributed.is_empty():
        return attributed
    # The host usually launches a small kernel or copy right after the sync returns, so the
    # gap may begin a few microseconds after the sync piece ends.
    follows = attributed.sort("start_ns").join_asof(
        syncs, left_on="start_ns", right_on="_sync_end", by="rank", strategy="backward",
        tolerance=SYNC_FOLLOW_NS, check_sortedness=False,
    ).sort("rank", "start_ns")
    # Only a refill-sized gap is the sync's doing: a long one after a sync is host work of
    # its own that the trace cannot name.
    vague = pl.col("cause").is_in(["unknown", "launch_overhead", "python", "unresolved"]) & (
        pl.col("end_ns") - pl.col("start_ns") <= SYNC_REFILL_NS)
    after_sync = follows.select(pl.col("_sync_end").is_not_null() & vague).to_series()
    follows = follows.drop("_sync_end")
    if not after_sync.any():
        return follows
    # The new text is made for those gaps only: made for every gap and then mostly dropped,
    # it was a second copy of all the evidence (30 MB on the 318 MiB trace) at this
    # analysis' peak.
    rows = after_sync.arg_true()
    told = follows[rows].select(pl.concat_str([
        pl.lit("the host had just synchronized with the GPU (queue empty); then "),
        pl.col("evidence").fill_null("no further evidence"),
    ])).to_series()
    return follows.with_columns(
        follows.get_column("evidence").cast(pl.String).scatter(rows, told),
        follows.get_column("cause").cast(pl.String).scatter(rows, "host_sync"),
    )


def _summarize_evidence(evidence: pl.DataFrame, durations: pl.DataFrame, *, key: str) -> pl.DataFrame:
    """Per ``key``: the heaviest cause, and the top three labels with their share.

    ``evidence`` has ``key, cause, label, weight_ns, source``; ``durations`` has ``key,
    duration_ns`` (the time the shares are of).
    """
    by_cause = evidence.group_by(key, "cause").agg(weight_ns=pl.col("weight_ns").sum())
    best = (
        by_cause.sort([key, "weight_ns", "cause"], descending=[False, True, False])
        .unique(key, keep="first", maintain_order=True)
        .select(key, "cause")
    )
    # Name the labels behind the chosen cause first, readable frames before unreadable ones.
    ranked = (
        evidence.join(best.rename({"cause": "best_cause"}), on=key)
        .group_by(key, "source", "label")
        .agg(
            weight_ns=pl.col("weight_ns").sum(),
            backs_cause=(pl.col("cause") == pl.col("best_cause")).any(),
        )
        .join(durations, on=key)
        .with_columns(unreadable=pl.col("label").str.starts_with("unresolved frames"))
        .sort([key, "backs_cause", "unreadable", "weight_ns", "label"], descending=[False, True, False, True, False])
    )
    sources = _join_sorted_runs(
        ranked.select(key, pl.col("source").alias("evidence_source")).unique(maintain_order=True),
        key=key, column="evidence_source", separator=" + ",
    )
    top = _join_sorted_runs(
        ranked.filter(pl.int_range(pl.len()).over(key) < 3).select(
            key,
            evidence=pl.format(
                "{} ({}%)",
                pl.col("label"),
                (pl.col("weight_ns") / pl.col("duration_ns") * 100).clip(0, 100).round(0).cast(pl.Int64),
            ),
        ),
        key=key, column="evidence", separator=", ",
    )
    unresolved = (
        ranked.filter(pl.col("unreadable") & (pl.col("source") != "python functions"))
        .group_by(key).agg(_unresolved=pl.col("weight_ns").sum(), _duration=pl.col("duration_ns").first())
        .with_columns(_share=(pl.col("_unresolved") / pl.col("_duration") * 100).clip(0, 100).round(0).cast(pl.Int64))
        .filter(pl.col("_share") >= 20)
        .select(key, "_share")
    )
    out = best.join(top, on=key, how="left").join(sources, on=key, how="left")
    if unresolved.height:
        out = out.join(unresolved, on=key, how="left").with_columns(
            evidence=pl.when(pl.col("_share").is_not_null())
            .then(pl.format("{}; {}% of it unresolved samples (taken as their nearest readable neighbour's cause)",
                            pl.col("evidence"), pl.col("_share")))
            .otherwise(pl.col("evidence"))
        ).drop("_share")
    return out


#: Runs longer than this are joined with a group-by instead of shifted columns.
_MAX_SHIFTED_RUN = 16


def _join_sorted_runs(frame: pl.DataFrame, *, key: str, column: str, separator: str) -> pl.DataFrame:
    """``key, column``: one row per run of equal ``key`` (``frame`` is ordered by it), with
    the run's ``column`` values joined by ``separator`` in row order.

    A group-by with a string join needs a list of strings per group (tens of MB for a
    hundred thousand gaps); runs here hold a few rows, so the run's next rows are read
    from shifted columns instead.
    """
    keys = frame.get_column(key).to_numpy()
    if keys.size == 0:
        return frame.select(key, column)
    starts = np.r_[0, np.flatnonzero(keys[1:] != keys[:-1]) + 1]
    lengths = np.diff(np.r_[starts, keys.size])
    widest = int(lengths.max())
    if widest > _MAX_SHIFTED_RUN:
        return frame.group_by(key, maintain_order=True).agg(pl.col(column).str.join(separator))
    run_length = pl.Series(np.repeat(lengths, lengths))
    offset = pl.Series(np.arange(keys.size) - np.repeat(starts, lengths))
    value = pl.col(column)
    joined = pl.concat_str(
        [value, *(pl.when(offset + k < run_length).then(separator + value.shift(-k)) for k in range(1, widest))],
        ignore_nulls=True,
    )
    # Nulls are skipped, as a string join skips them: a run that starts with one must not
    # start with the separator.
    joined = pl.when(value.is_null()).then(joined.str.strip_prefix(separator)).otherwise(joined)
    return frame.select(key, joined.alias(column))[pl.Series(starts)]


ANALYSIS = Analysis(name="CPU-gap causes", phase="rank 3", function=attribute_cpu_gaps,
                    reads=("intervals", "samples", "gap pieces"), returns="every CPU gap with cause and evidence",
                    field="cpu_gaps")
