"""Many ranks on one clock: collective matching, clock alignment, waiting versus transfer.

**Matching.** Every communication kernel (see :mod:`~traceinsight.analysis.classify`) is keyed
by ``(group, seq)`` where the trace numbers a process group's collectives (Kineto ``Seq``),
else by ``(step, group, name, occurrence)``: the n-th collective of that name of that group
launched inside step *s*. All ranks of a group issue its collectives in the same order, and
steps are matched by number, so the same key on two ranks is the same collective even when
the ranks' profiling windows started at different moments. Keys whose names differ between
ranks never match, since the name is part of the key.

**Clock alignment.** Each rank's own clock is first put on the wall clock with the file's own
origin (nsys ``utcEpochNs``, Kineto ``baseTimeNanoseconds`` or absolute stamps). The residual
skew is then measured from matched collectives: participants leave a collective at nearly
the same moment (its *ends* agree; its *starts* do not: that difference is the waiting), so
each rank's correction is the median of its end differences with the reference rank, after
dropping collectives more than 5 MADs away. ``clock_offset_ns`` of a rank is what to add to
its own clock to land on the common clock (the reference rank's).

**Waiting versus transfer.** For a matched collective, a rank *arrives* when its kernel starts
(its GPU reached the collective); ``wait = last arrival - own arrival`` is time spent
spinning for the others, ``transfer = end - last arrival``; the last to arrive is the
straggler. The phase is the innermost user annotation around the launch
(``layer1.moe_dispatch``), skipping the communication library's own ranges.

**Why the straggler was late.** Between the previous collective and this one, each rank's
time is broken down (:func:`~traceinsight.analysis.breakdown.window_breakdown`); the category
in which the straggler exceeds the median of the others most is the reason, with the token
counts of each rank where the trace records them (``Input Dims`` of the collective's op).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from traceinsight.analysis.anomalies import LIBRARY_RANGES, assign_to_steps
from traceinsight.analysis.breakdown import CATEGORIES
from traceinsight.model import TraceModel


MAD_CUTOFF = 5.0


@dataclass
class Alignment:
    """Clock offsets and how well the collectives agree after applying them.

    Attributes
    ----------
    offsets
        rank -> ns to add to the rank's own clock to reach the common clock.
    corrections
        rank -> the part of the offset measured from collectives, beyond what the files'
        wall-clock origins say (the clock skew between hosts, or an origin that was wrong).
    reference_rank
        The rank whose clock is the common clock.
    method
        ``"collectives"`` (refined from matched collectives), ``"clock origin"`` (wall-clock
        origins only) or ``"none"``.
    matched
        Number of collectives matched on every rank.
    residual_p50_ns, residual_max_ns
        Spread (max - min) of the aligned ends of each matched collective.
    notes
        What could not be done.
    """

    offsets: dict[int, int]
    reference_rank: int
    method: str
    corrections: dict[int, int] = field(default_factory=dict)
    matched: int = 0
    residual_p50_ns: float | None = None
    residual_p95_ns: float | None = None
    residual_max_ns: float | None = None
    notes: list[str] = field(default_factory=list)


def communication_kernels(gpu: pl.DataFrame, steps: pl.DataFrame) -> pl.DataFrame:
    """Communication kernels with their step, group and matching key.

    Columns added: ``step``, ``group``, ``label`` (collective name), ``occurrence``, ``key``.
    """
    comm = gpu.filter(pl.col("is_comm")).with_columns(
        _when=pl.coalesce("launch_start_ns", "start_ns")
    )
    if comm.is_empty():
        return comm.with_columns(step=pl.lit(None, pl.Int64), group=pl.lit(None, pl.String),
                                 label=pl.lit(None, pl.String), occurrence=pl.lit(None, pl.UInt32),
                                 key=pl.lit(None, pl.String))
    comm = assign_to_steps(comm, steps, time_column="_when")
    comm = comm.with_columns(
        group=pl.col("comm_group").fill_null("default"),
        label=pl.coalesce("comm_op", pl.col("name").str.replace(r"\(.*$", "")),
    ).sort("rank", "start_ns")
    comm = comm.with_columns(
        occurrence=pl.int_range(pl.len()).over("rank", "step", "group", "label"),
    )
    by_seq = pl.format("seq/{}/{}", "group", "comm_seq")
    by_order = pl.format("step/{}/{}/{}/{}", pl.col("step").fill_null(-1), "group", "label", "occurrence")
    return comm.with_columns(
        key=pl.when(pl.col("comm_seq").is_not_null()).then(by_seq).otherwise(by_order)
    ).drop("_when")


def _robust_median(values: np.ndarray) -> float:
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median)))
    if mad > 0:
        values = values[np.abs(values - median) <= MAD_CUTOFF * 1.4826 * mad]
    return float(np.median(values))


def align_clocks(comm: pl.DataFrame, ranks: pl.DataFrame) -> Alignment:
    """Per-rank clock offsets from the files' origins, refined with matched collectives.

    Examples
    --------
    >>> alignment = align_clocks(communication_kernels(gpu, steps), model.ranks)  # doctest: +SKIP
    >>> alignment.offsets  # doctest: +SKIP
    {0: 0, 1: -21292119}
    """
    rank_ids = sorted(ranks.get_column("rank").to_list())
    origins = dict(zip(ranks.get_column("rank").to_list(), ranks.get_column("clock_origin_ns").to_list()))
    notes = []
    if len(rank_ids) <= 1:
        return Alignment({r: 0 for r in rank_ids}, rank_ids[0] if rank_ids else 0, "none")
    known = all(origins[r] is not None for r in rank_ids)
    if not known:
        notes.append("some files do not tell their wall-clock origin: ranks aligned by collectives only")
    coarse = {r: (origins[r] - origins[rank_ids[0]]) if known else 0 for r in rank_ids}
    counts = comm.group_by("key").agg(n=pl.col("rank").n_unique())
    everywhere = counts.filter(pl.col("n") == len(rank_ids)).get_column("key")
    common = comm.filter(pl.col("key").is_in(everywhere.implode()))
    reference = rank_ids[0]
    if common.is_empty():
        notes.append("no collective is seen on every rank: clocks aligned by their origins only")
        return Alignment(coarse, reference, "clock origin" if known else "none", notes=notes)
    ends = common.group_by("key", "rank").agg(end_ns=pl.col("end_ns").max()).pivot(
        on="rank", index="key", values="end_ns"
    )
    offsets = {reference: 0}
    for rank in rank_ids[1:]:
        diffs = (
            (ends.get_column(str(rank)) + coarse[rank]) - ends.get_column(str(reference))
        ).drop_nulls().to_numpy()
        offsets[rank] = int(round(coarse[rank] - _robust_median(diffs.astype(np.float64))))
    aligned = np.column_stack([ends.get_column(str(r)).to_numpy() + offsets[r] for r in rank_ids])
    spread = aligned.max(axis=1) - aligned.min(axis=1)
    return Alignment(
        offsets, reference, "collectives", corrections={r: coarse[r] - offsets[r] for r in rank_ids},
        matched=int(ends.height),
        residual_p50_ns=float(np.median(spread)), residual_p95_ns=float(np.percentile(spread, 95)),
        residual_max_ns=float(spread.max()), notes=notes,
    )


def disjoint_ranks_note(steps: pl.DataFrame, alignment: Alignment) -> str | None:
    """A warning when some ranks do not overlap in time on the aligned clock (files of
    different runs, or a clock far off): waits between them would mean nothing.

    Only said where the clocks are known (aligned by origins or collectives)."""
    if alignment.method == "none" or steps.is_empty() or steps.get_column("rank").n_unique() < 2:
        return None
    spans = (
        steps.group_by("rank")
        .agg(start=pl.col("start_ns").min(), end=pl.col("end_ns").max())
        .with_columns(shift=pl.col("rank").replace_strict(alignment.offsets, default=0, return_dtype=pl.Int64))
        .select("rank", start=pl.col("start") + pl.col("shift"), end=pl.col("end") + pl.col("shift"))
        .sort("start", "rank")
    )
    latest_rank, latest_end = None, None
    for rank, start, end in spans.iter_rows():
        if latest_end is not None and start > latest_end:
            return (
                f"ranks {latest_rank} and {rank} do not overlap in time: rank {rank} starts "
                f"{(start - latest_end) / 1e9:,.3f} s after rank {latest_rank} ends; were the files "
                "recorded in the same run? Cross-rank waits and comparisons are not meaningful"
            )
        if latest_end is None or end > latest_end:
            latest_rank, latest_end = rank, end
    return None


def _phases(model: TraceModel, comm: pl.DataFrame, step_labels: list[str]) -> pl.DataFrame:
    """The innermost user annotation around each collective's launch call."""
    annotations = model.intervals.lazy().filter(
        (pl.col("kind") == "annotation")
        & ~pl.col("name").str.contains(LIBRARY_RANGES)
        & ~pl.col("name").is_in(step_labels)
        & (pl.col("domain").is_null() | (pl.col("domain") != "NCCL"))
    ).select("rank", "pid", "tid", "depth", "start_ns", "end_ns", "name").collect()
    phases = np.full(comm.height, None, dtype=object)
    if annotations.is_empty() or comm.is_empty():
        return comm.with_columns(phase=pl.Series(phases.tolist(), dtype=pl.String))
    comm = comm.with_row_index("_i")
    for (rank, pid, tid), launches in comm.filter(pl.col("launch_tid").is_not_null()).group_by(
        "rank", "launch_pid", "launch_tid"
    ):
        thread = annotations.filter((pl.col("rank") == rank) & (pl.col("pid") == pid) & (pl.col("tid") == tid))
        times = launches.get_column("launch_start_ns").to_numpy()
        index = launches.get_column("_i").to_numpy()
        best = np.full(times.size, None, dtype=object)
        # Ranges of one depth on one thread do not overlap: a sorted search finds the candidate
        # at each depth; the deepest one that contains the launch wins.
        for depth in sorted(thread.get_column("depth").unique().to_list()):
            level = thread.filter(pl.col("depth") == depth).sort("start_ns")
            starts = level.get_column("start_ns").to_numpy()
            ends = level.get_column("end_ns").to_numpy()
            names = level.get_column("name").to_numpy()
            at = np.searchsorted(starts, times, side="right") - 1
            inside = (at >= 0) & (times <= ends[np.clip(at, 0, None)])
            best[inside] = names[at[inside]]
        phases[index] = best
    return comm.drop("_i").with_columns(phase=pl.Series(phases.tolist(), dtype=pl.String))


def _tokens(model: TraceModel, comm: pl.DataFrame) -> pl.DataFrame:
    """Rows sent and received per collective where the trace records the input shape.

    The collective's op (Kineto ``record_param_comms`` linked by ``External id``) records
    ``Input Dims`` like ``[[12288, 2048], ...]``: 12288 rows (tokens) of 2048 elements. Rows
    received = ``Out msg nelems`` / row width.
    """
    ops = model.intervals.filter(
        (pl.col("kind") == "cpu_op") & (pl.col("name") == "record_param_comms") & pl.col("external_id").is_not_null()
    ).select(
        "rank", "external_id",
        pl.col("detail").str.extract(r"^\[\[(\d+)", 1).cast(pl.Int64, strict=False).alias("rows_sent"),
        pl.col("comm_in_nelems").alias("_op_in"), pl.col("comm_out_nelems").alias("_op_out"),
    ).unique(["rank", "external_id"], keep="first")
    if ops.is_empty():
        return comm.with_columns(rows_sent=pl.lit(None, pl.Int64), rows_received=pl.lit(None, pl.Int64))
    joined = comm.join(ops, on=["rank", "external_id"], how="left")
    in_nelems = pl.coalesce("comm_in_nelems", "_op_in")
    out_nelems = pl.coalesce("comm_out_nelems", "_op_out")
    width = pl.when(pl.col("rows_sent") > 0).then(in_nelems / pl.col("rows_sent"))
    return joined.with_columns(
        rows_received=pl.when(width > 0).then((out_nelems / width).round(0)).cast(pl.Int64),
    ).drop("_op_in", "_op_out")


def enrich_collectives(model: TraceModel, comm: pl.DataFrame, *, step_labels: list[str]) -> pl.DataFrame:
    """Per-rank part of the waits: add each collective's phase and row counts."""
    if comm.is_empty():
        return comm
    return _tokens(model, _phases(model, comm, step_labels))


def match_waits(comm: pl.DataFrame, alignment: Alignment) -> pl.DataFrame:
    """Per matched collective and rank: arrival, wait, transfer and straggler (common clock),
    from the enriched collectives of all ranks (:func:`enrich_collectives`).

    Returns
    -------
    polars.DataFrame
        ``key, step, group, label, rank, phase, start_ns, end_ns`` (own clock),
        ``arrival_ns, end_aligned_ns`` (common clock), ``last_arrival_ns, straggler,
        wait_ns, transfer_ns, participants, rows_sent, rows_received``.
    """
    if comm.is_empty():
        return pl.DataFrame()
    offsets = pl.col("rank").replace_strict(alignment.offsets, default=0, return_dtype=pl.Int64)
    matched = comm.with_columns(
        arrival_ns=pl.col("start_ns") + offsets,
        end_aligned_ns=pl.col("end_ns") + offsets,
        participants=pl.col("rank").n_unique().over("key"),
    ).filter(pl.col("participants") >= 2)
    if matched.is_empty():
        return matched
    last = matched.sort(["arrival_ns", "rank"], descending=[True, False]).group_by("key").agg(
        last_arrival_ns=pl.col("arrival_ns").first(),
        straggler=pl.col("rank").first(),
        collective_end_ns=pl.col("end_aligned_ns").max(),
    )
    return (
        matched.join(last, on="key")
        .with_columns(
            # A rank can only wait while its kernel runs; clip to the kernel's own span.
            wait_ns=pl.min_horizontal(
                pl.col("last_arrival_ns") - pl.col("arrival_ns"), pl.col("end_ns") - pl.col("start_ns")
            ).clip(lower_bound=0),
            transfer_ns=(pl.col("end_aligned_ns") - pl.max_horizontal("last_arrival_ns", "arrival_ns")).clip(lower_bound=0),
        )
        .select(
            "key", "step", "group", "label", "rank", "phase", "start_ns", "end_ns", "arrival_ns",
            "end_aligned_ns", "last_arrival_ns", "collective_end_ns", "straggler", "wait_ns",
            "transfer_ns", "participants", "rows_sent", "rows_received",
        )
        .sort("arrival_ns", "rank", "key")
    )


def wait_intervals(waits: pl.DataFrame) -> pl.DataFrame:
    """The waiting spans on each rank's own clock (for ``cross_rank_wait`` in the breakdown)."""
    if waits.is_empty():
        return pl.DataFrame(schema={"rank": pl.Int32, "start_ns": pl.Int64, "end_ns": pl.Int64})
    return waits.filter(pl.col("wait_ns") > 0).select(
        "rank", pl.col("start_ns"), (pl.col("start_ns") + pl.col("wait_ns")).alias("end_ns")
    )


def straggler_windows(
    waits: pl.DataFrame, steps: pl.DataFrame, alignment: Alignment, *, min_wait_ns: int = 100_000
) -> pl.DataFrame:
    """The windows to break down to explain each costly collective's straggler.

    For every collective where some rank waited at least ``min_wait_ns``: each rank's span
    from the end of the previous collective of the step (or the step's start) to its own
    arrival, on the rank's own clock. Columns ``key, rank, start_ns, end_ns, rows_sent``.
    """
    empty = pl.DataFrame(schema={"key": pl.String, "rank": pl.Int32, "start_ns": pl.Int64,
                                 "end_ns": pl.Int64, "rows_sent": pl.Int64})
    if waits.is_empty():
        return empty
    offsets = pl.col("rank").replace_strict(alignment.offsets, default=0, return_dtype=pl.Int64)
    per_key = (
        waits.group_by("key", maintain_order=True)
        .agg(step=pl.col("step").first(), max_wait_ns=pl.col("wait_ns").max(),
             last_arrival_ns=pl.col("last_arrival_ns").first(), end_ns=pl.col("collective_end_ns").first())
        .sort("last_arrival_ns", "key")
    )
    step_start = dict(
        steps.with_columns(aligned=pl.col("start_ns") + offsets).group_by("step").agg(start=pl.col("aligned").min()).iter_rows()
    )
    previous_end: dict = {}
    starts = {}
    for row in per_key.iter_rows(named=True):
        window_start = previous_end.get(row["step"], step_start.get(row["step"]))
        previous_end[row["step"]] = row["end_ns"]
        if row["max_wait_ns"] >= min_wait_ns and window_start is not None:
            starts[row["key"]] = window_start
    if not starts:
        return empty
    return (
        waits.filter(pl.col("key").is_in(list(starts)))
        .with_columns(
            start_ns=pl.col("key").replace_strict(starts, return_dtype=pl.Int64) - offsets,
            end_ns=pl.col("arrival_ns") - offsets,
        )
        .filter(pl.col("end_ns") > pl.col("start_ns"))
        .select("key", pl.col("rank").cast(pl.Int32), "start_ns", "end_ns", pl.col("rows_sent").cast(pl.Int64))
    )


def reasons_from_windows(waits: pl.DataFrame, broken: pl.DataFrame) -> list[dict]:
    """Why each straggler was late, from the windows of :func:`straggler_windows` broken down
    per rank (:func:`~traceinsight.analysis.breakdown.window_breakdown`): the category in
    which the straggler exceeds the median of the others most."""
    if waits.is_empty() or broken.is_empty():
        return []
    per_key = (
        waits.group_by("key", maintain_order=True)
        .agg(step=pl.col("step").first(), label=pl.col("label").first(), phase=pl.col("phase").drop_nulls().first(),
             straggler=pl.col("straggler").first(), max_wait_ns=pl.col("wait_ns").max(),
             last_arrival_ns=pl.col("last_arrival_ns").first())
        .sort("last_arrival_ns", "key")
    )
    reasons = []
    for row in per_key.iter_rows(named=True):
        windows = broken.filter(pl.col("key") == row["key"]).sort("rank")
        late = windows.filter(pl.col("rank") == row["straggler"])
        others = windows.filter(pl.col("rank") != row["straggler"])
        if late.is_empty() or others.is_empty():
            continue
        late = late.row(0, named=True)
        deltas = {c: late[f"{c}_ns"] - float(others.get_column(f"{c}_ns").median()) for c in CATEGORIES}
        category = max(deltas, key=deltas.get)
        tokens = dict(zip(windows.get_column("rank").to_list(), windows.get_column("rows_sent").to_list()))
        reasons.append({
            "step": row["step"], "collective": row["label"], "phase": row["phase"],
            "straggler": row["straggler"], "max_wait_ms": round(row["max_wait_ns"] / 1e6, 3),
            "reason": category, "reason_excess_ms": round(deltas[category] / 1e6, 3),
            "before_ms": {str(r["rank"]): round((r["end_ns"] - r["start_ns"]) / 1e6, 3) for r in windows.iter_rows(named=True)},
            "rows_sent": {str(k): v for k, v in tokens.items()} if any(v is not None for v in tokens.values()) else None,
        })
    return reasons


def phase_class(name: str | None) -> str | None:
    """Coarse MoE phase of an annotation name: attention, dispatch, experts, combine."""
    if not name:
        return None
    lowered = name.lower()
    for phase, words in (
        ("dispatch", ("dispatch",)),
        ("combine", ("combine",)),
        ("attention", ("attention", "attn")),
        ("experts", ("expert", "grouped", "moe_mlp", "ffn", "mlp")),
    ):
        if any(word in lowered for word in words):
            return phase
    return None


def compute_phase_times(instances: pl.DataFrame) -> pl.DataFrame:
    """GPU time of the attention and expert work per (step, rank, phase) (per-rank part of
    :func:`imbalance_from`)."""
    if instances.is_empty():
        return pl.DataFrame(schema={"step": pl.Int64, "rank": pl.Int32, "phase": pl.String, "t": pl.Int64})
    return (
        instances.with_columns(phase=pl.col("name").map_elements(phase_class, return_dtype=pl.String))
        .filter(pl.col("phase").is_in(["attention", "experts"]) & pl.col("step").is_not_null())
        .group_by("step", "rank", "phase").agg(t=pl.col("gpu_ns").sum())
        .sort("step", "rank", "phase")
    )


def imbalance_from(compute_times: pl.DataFrame, waits: pl.DataFrame, steps: pl.DataFrame) -> list[dict]:
    """Per step: what balanced load across ranks would save, from measured per-rank rates.

    Each MoE phase's time per rank: attention and experts from the GPU time of the work
    launched in the matching annotations (``compute_times``); dispatch and combine from the
    transfer part of their collectives. Ranks meet at every dispatch and combine, so a step
    costs about ``max(attention) + max(dispatch) + max(experts) + max(combine)``.

    Balanced, compute phases cost the ranks' mean. A collective's transfer is set by the rank
    receiving the most rows (``t = max rows / bandwidth``, the measured transfer); balanced,
    each rank receives the mean, so it takes ``t * mean rows / max rows`` (where the trace
    records no row counts, the mean transfer time). Returns ``modeled_ms``, ``balanced_ms``,
    ``saving_ms`` and the ``measured_ms`` of the slowest rank's step, with per-phase figures.
    """
    if waits.is_empty() or compute_times.is_empty():
        return []
    compute = compute_times.group_by("step", "phase").agg(
        max_ns=pl.col("t").max(), balanced_ns=pl.col("t").mean()
    )
    transfers = waits.with_columns(phase=pl.col("phase").map_elements(phase_class, return_dtype=pl.String)).filter(
        pl.col("phase").is_in(["dispatch", "combine"]) & pl.col("step").is_not_null()
    )
    # Participants leave a collective together, so its transfer time is set by the rank that
    # receives the most rows at the link's bandwidth: t = max rows / bandwidth. Balanced, every
    # rank receives the mean, so t_balanced = t * mean rows / max rows.
    per_collective = (
        transfers.group_by("step", "phase", "key")
        .agg(
            max_ns=pl.col("transfer_ns").max(),
            mean_ns=pl.col("transfer_ns").mean(),
            max_rows=pl.col("rows_received").max(),
            mean_rows=pl.col("rows_received").mean(),
        )
        .with_columns(
            balanced_ns=pl.when(pl.col("max_rows") > 0)
            .then(pl.col("max_ns") * pl.col("mean_rows") / pl.col("max_rows"))
            .otherwise(pl.col("mean_ns"))
        )
        .group_by("step", "phase")
        .agg(pl.col("max_ns").sum(), pl.col("balanced_ns").sum())
    )
    summary = pl.concat([compute, per_collective], how="vertical_relaxed")
    if summary.is_empty():
        return []
    measured = steps.group_by("step").agg(measured=pl.col("duration_ns").max())
    out = []
    for (step,), part in summary.sort("step").group_by(["step"], maintain_order=True):
        modeled = float(part.get_column("max_ns").sum())
        balanced = float(part.get_column("balanced_ns").sum())
        measured_row = measured.filter(pl.col("step") == step)
        phases = {r["phase"]: {"max_ms": round(r["max_ns"] / 1e6, 3), "balanced_ms": round(r["balanced_ns"] / 1e6, 3)}
                  for r in part.sort("phase").iter_rows(named=True)}
        out.append({
            "step": step, "phases": phases,
            "modeled_ms": round(modeled / 1e6, 3), "balanced_ms": round(balanced / 1e6, 3),
            "saving_ms": round((modeled - balanced) / 1e6, 3),
            "measured_ms": round(measured_row.item(0, "measured") / 1e6, 3) if measured_row.height else None,
        })
    return out


def collective_summary(waits: pl.DataFrame) -> list[dict]:
    """One entry per matched collective: straggler, worst wait, transfer, phase."""
    if waits.is_empty():
        return []
    per = (
        waits.group_by("key", maintain_order=True)
        .agg(
            step=pl.col("step").first(), collective=pl.col("label").first(),
            phase=pl.col("phase").drop_nulls().first(), straggler=pl.col("straggler").first(),
            participants=pl.col("participants").first(), max_wait_ns=pl.col("wait_ns").max(),
            total_wait_ns=pl.col("wait_ns").sum(), transfer_ns=pl.col("transfer_ns").max(),
            arrival_ns=pl.col("last_arrival_ns").first(),
        )
        .sort("arrival_ns")
    )
    return [
        {"key": r["key"], "step": r["step"], "collective": r["collective"], "phase": r["phase"],
         "straggler": r["straggler"], "participants": r["participants"],
         "max_wait_ms": round(r["max_wait_ns"] / 1e6, 4), "total_wait_ms": round(r["total_wait_ns"] / 1e6, 4),
         "transfer_ms": round(r["transfer_ns"] / 1e6, 4)}
        for r in per.iter_rows(named=True)
    ]
