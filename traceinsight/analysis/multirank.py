"""Many ranks on one clock: collective matching, clock alignment, waiting versus transfer.

**One job first** (:func:`job_identity_note`). Files are paired only when they can be ranks
of one job: equal world sizes (``distributedInfo``), wall-clock windows that overlap by the
files' own clock origins (checked *before* any correction, which pairs of unrelated
collectives would otherwise invent), and shared collective sequence numbers where every file
carries them. Otherwise nothing is paired and one note names the files. Files holding fewer
ranks than their job get a note too (:func:`partial_job_note`): one rank of 64 cannot show
waiting at all.

**Matching.** Every communication kernel (see :mod:`~traceinsight.analysis.classify`) is keyed
by ``(group, seq)`` where the trace numbers a process group's collectives (Kineto ``Seq``),
else by ``(step, group, name, occurrence)``: the n-th collective of that name of that group
launched inside step *s*. All ranks of a group issue its collectives in the same order, and
steps are matched by number, so the same key on two ranks is the same collective even when
the ranks' profiling windows started at different moments. Keys whose names differ between
ranks never match, since the name is part of the key.

**Trusting the pairs** (:func:`pair_collectives`). No rank leaves a collective before the
last one arrived, so on the aligned clock the last arrival precedes the first end. Pairs by
order that break this (events missing on one rank, as in sampled traces) make the
collectives without sequence numbers be paired again by overlap in time
(:func:`pair_by_time`); what still breaks it is left unpaired, and when that is most pairs the
waits are refused with a note giving the residual.

**Clock alignment.** Processes recorded in one report (one nsys file) share its clock
(:func:`clock_domains`): no correction is measured between them. Each rank's own clock is first put on the wall clock with the file's own
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

**Cost.** The cross-rank part works on small per-rank summaries and is linear in the number
of ranks (corrections in one pass against the reference clock; pairing by time one sort of
all collectives). Measured on synthetic jobs of copies of a 2,459-event DLRM rank file (2
cores, shared): 64 ranks in 6.8-8.5 s, about 0.11-0.13 s per added rank, nearly all of it
the rank's own per-rank analysis; pairing, alignment and waits take 0.14 s at 64 ranks.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from traceinsight.analysis.categories import CATEGORIES
from traceinsight.analysis.places import LIBRARY_RANGES
from traceinsight.analysis.schemas import (
    IMBALANCE_SCHEMA,
    STRAGGLER_SCHEMA,
    WAIT_SCHEMA,
    by_rank,
    frame_of,
    rank_mapping,
)
from traceinsight.analysis.step_table import assign_to_steps
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
    #: rank -> {"method", "matched", "residual_p50_ns", "residual_max_ns"}: how each rank was
    #: put on the common clock and how well its collectives' ends agree with the others'.
    per_rank: dict[int, dict] = field(default_factory=dict)
    #: How collectives were paired across ranks: ``"sequence numbers"``, ``"order"``,
    #: ``"time"`` (order broke, pairs re-made by overlap in time) or ``"none"``.
    pairing: str = "none"
    #: False when the files are not one job or the pairing is wrong: then no waits at all.
    trusted: bool = True


def collective_ops(model: TraceModel) -> pl.DataFrame:
    """The ``record_param_comms`` ops that number their collective (Kineto 2026+ writes ``Seq``
    on the op, not always on its kernel): ``rank, external_id, _op_seq, _op_group``."""
    return model.intervals.lazy().filter(
        (pl.col("kind") == "cpu_op") & (pl.col("name") == "record_param_comms")
        & pl.col("external_id").is_not_null() & pl.col("comm_seq").is_not_null()
    ).select("rank", "external_id", _op_seq=pl.col("comm_seq"), _op_group=pl.col("comm_group")).unique(
        ["rank", "external_id"], keep="first").collect()


def communication_kernels(gpu: pl.DataFrame, steps: pl.DataFrame, ops: pl.DataFrame | None = None) -> pl.DataFrame:
    """Communication kernels with their step, group and matching key.

    ``ops`` (:func:`collective_ops`) lend their sequence number and group to the kernels they
    launched where the kernel itself carries none.

    Columns added: ``step``, ``group``, ``label`` (collective name), ``occurrence``, ``key``.

    Reads the GPU activities, the steps and the collective ops; returns the communication kernels.
    """
    comm = gpu.filter(pl.col("is_comm")).with_columns(
        _when=pl.coalesce("launch_start_ns", "start_ns")
    )
    if ops is not None and ops.height and comm.height:
        comm = comm.join(ops, on=["rank", "external_id"], how="left").with_columns(
            comm_seq=pl.coalesce("comm_seq", "_op_seq"), comm_group=pl.coalesce("comm_group", "_op_group"),
        ).drop("_op_seq", "_op_group")
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


def clock_domains(ranks: pl.DataFrame) -> dict[int, tuple]:
    """Which ranks share one clock: the processes recorded in one report (one nsys file holds
    several processes on its own host clock). rank -> (source, clock origin)."""
    return {
        row["rank"]: (row["source"], row["clock_origin_ns"]) if row["source"] else ("rank", row["rank"])
        for row in ranks.select("rank", "source", "clock_origin_ns").iter_rows(named=True)
    }


def _end_table(comm: pl.DataFrame, rank_ids: list[int]) -> pl.DataFrame:
    """One row per key seen on at least two ranks, one column per rank: the collective's end."""
    counts = comm.filter(pl.col("key").is_not_null()).group_by("key").agg(n=pl.col("rank").n_unique())
    shared_keys = counts.filter(pl.col("n") >= 2).get_column("key")
    common = comm.filter(pl.col("key").is_in(shared_keys.implode()))
    if common.is_empty():
        return pl.DataFrame()
    ends = common.group_by("key", "rank").agg(end_ns=pl.col("end_ns").max()).pivot(
        on="rank", index="key", values="end_ns"
    )
    for rank in rank_ids:
        if str(rank) not in ends.columns:
            ends = ends.with_columns(pl.lit(None, pl.Int64).alias(str(rank)))
    return ends


def align_clocks(comm: pl.DataFrame, ranks: pl.DataFrame) -> Alignment:
    """Per-rank clock offsets from the files' origins, refined with matched collectives.

    Ranks recorded in one report (:func:`clock_domains`) share its clock: no correction is
    measured between them, only between reports, from the collectives of all their ranks.

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
    domains = clock_domains(ranks)
    reference = rank_ids[0]
    ends = _end_table(comm, rank_ids)
    same_clock = {r: "same report clock" for r in rank_ids if r != reference and domains[r] == domains[reference]}
    if ends.is_empty():
        notes.append("no collective is seen on two ranks: clocks aligned by their origins only")
        method = "clock origin" if known else "none"
        per_rank = {r: {"method": "reference" if r == reference else same_clock.get(r, method), "matched": 0,
                        "residual_p50_ns": None, "residual_max_ns": None} for r in rank_ids}
        return Alignment(coarse, reference, method, notes=notes, per_rank=per_rank)
    # Corrections per clock domain: pooled end differences of all its ranks with the ranks of
    # the domains already placed (the reference's first), so a domain without collectives
    # in common with the reference can still be placed through another one.
    offsets = {r: coarse[r] for r in rank_ids if domains[r] == domains[reference]}
    methods = {r: same_clock.get(r, "reference") for r in offsets}
    pending = [d for d in dict.fromkeys(domains[r] for r in rank_ids) if d != domains[reference]]
    members_of = {d: [r for r in rank_ids if domains[r] == d] for d in pending}
    columns = {r: ends.get_column(str(r)).cast(pl.Float64).fill_null(np.nan).to_numpy() for r in rank_ids}

    def pooled_against(domain, against: list[int]) -> np.ndarray:
        diffs = [columns[rank] + coarse[rank] - (columns[placed] + offsets[placed])
                 for rank in members_of[domain] for placed in against]
        pooled = np.concatenate(diffs) if diffs else np.empty(0)
        return pooled[~np.isnan(pooled)]

    def place(domain, pooled: np.ndarray) -> None:
        correction = _robust_median(pooled)
        for rank in members_of[domain]:
            offsets[rank] = int(round(coarse[rank] - correction))
            methods[rank] = "collectives"

    # Against the reference's clock, one pass (linear in the number of ranks) ...
    on_reference = [r for r in offsets]
    for domain in list(pending):
        pooled = pooled_against(domain, on_reference)
        if pooled.size:
            place(domain, pooled)
            pending.remove(domain)
    # ... then, for clocks that share no collective with the reference, through placed ones.
    while pending:
        best = max(((d, pooled_against(d, list(offsets))) for d in pending), key=lambda dp: dp[1].size)
        if not best[1].size:
            for domain in pending:
                for rank in members_of[domain]:
                    offsets[rank], methods[rank] = coarse[rank], "clock origin" if known else "none"
            notes.append("some ranks share no collective with the others: aligned by their clock origins only")
            break
        place(*best)
        pending.remove(best[0])
    aligned = np.column_stack([columns[r] + offsets[r] for r in rank_ids])
    spread = np.nanmax(aligned, axis=1) - np.nanmin(aligned, axis=1)
    # Per rank: how far its end is from the median end of the others.
    per_rank = {}
    for i, rank in enumerate(rank_ids):
        others = np.delete(aligned, i, axis=1)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            deviation = np.abs(aligned[:, i] - np.nanmedian(others, axis=1))
        deviation = deviation[~np.isnan(deviation)]
        per_rank[rank] = {
            "method": methods[rank], "matched": int(deviation.size),
            "residual_p50_ns": float(np.median(deviation)) if deviation.size else None,
            "residual_max_ns": float(deviation.max()) if deviation.size else None,
        }
    measured = any(m == "collectives" for m in methods.values())
    return Alignment(
        offsets, reference, "collectives" if measured else ("same report clock" if same_clock else
                                                              "clock origin" if known else "none"),
        corrections={r: coarse[r] - offsets[r] for r in rank_ids},
        matched=int(ends.height),
        residual_p50_ns=float(np.median(spread)), residual_p95_ns=float(np.percentile(spread, 95)),
        residual_max_ns=float(spread.max()), notes=notes, per_rank=per_rank,
    )


#: How far (ns) the last arrival at a collective may follow the first participant's end on the
#: aligned clock before the pair is called impossible: no rank leaves a collective before the
#: last one arrived, so beyond the clocks' own disagreement (µs) such a pair is two collectives.
PAIR_SLACK_NS = 10_000
#: Files whose wall-clock windows are further apart than this were not recorded together
#: (clocks of one cluster agree far better; the margin covers hosts without time sync).
WINDOW_SLACK_NS = 10 * 1_000_000_000


def _file_name(path: str | None) -> str:
    return os.path.basename(path) if path else "?"


def job_identity_note(ranks: pl.DataFrame, steps: pl.DataFrame, comm: pl.DataFrame) -> str | None:
    """Why these files cannot be ranks of one job, or None when they can.

    Checked before any pairing, from what the files say about themselves: their world sizes
    (``distributedInfo``), their wall-clock windows where the files carry clock origins (on the
    files' own origins, before any correction: a correction measured from collectives that
    were never one collective would hide the gap), and the collective sequence numbers of a
    process group where every file carries them (one job's ranks share some).
    """
    if ranks.height < 2:
        return None
    rows = {r["rank"]: r for r in ranks.iter_rows(named=True)}
    sizes = {}
    for rank, row in rows.items():
        if row["world_size"] is not None:
            sizes.setdefault(row["world_size"], []).append(rank)
    if len(sizes) > 1:
        parts = "; ".join(
            f"world size {size}: rank(s) {', '.join(str(r) for r in members[:4])} "
            f"({', '.join(dict.fromkeys(_file_name(rows[r]['source']) for r in members[:4]))})"
            for size, members in sorted(sizes.items())
        )
        return f"these files are not one job ({parts}): no cross-rank waits or alignment are reported"
    origins = {r: row["clock_origin_ns"] for r, row in rows.items()}
    if steps.height and all(origin is not None for origin in origins.values()):
        spans = (
            steps.group_by("rank").agg(start=pl.col("start_ns").min(), end=pl.col("end_ns").max())
            .with_columns(origin=pl.col("rank").replace_strict(origins, default=0, return_dtype=pl.Int64))
            .select("rank", start=pl.col("start") + pl.col("origin"), end=pl.col("end") + pl.col("origin"))
            .sort("start", "rank")
        )
        # The wording of disjoint_ranks_note: the same finding, now made before pairing.
        if note := _disjoint_spans_note(spans, slack_ns=WINDOW_SLACK_NS):
            return note
    if comm.height and comm.get_column("comm_seq").is_not_null().any():
        numbered = comm.filter(pl.col("comm_seq").is_not_null())
        for (group,), part in numbered.group_by(["group"]):
            per_rank = part.group_by("rank").agg(pl.col("comm_seq").unique())
            if per_rank.height < 2:
                continue
            sets = [set(values) for values in per_rank.get_column("comm_seq").to_list()]
            if not set.intersection(*sets) and all(
                    min(a) > max(b) or min(b) > max(a) for a in sets for b in sets if a is not b):
                return (f"these files are not one job: the collectives of process group {group} carry "
                        "sequence numbers that no two files share; no cross-rank waits are reported")
    return None


def partial_job_note(ranks: pl.DataFrame) -> str | None:
    """A note when the files hold fewer ranks than the job they come from."""
    sizes = ranks.get_column("world_size").drop_nulls()
    if sizes.is_empty():
        return None
    world, loaded = int(sizes.max()), ranks.height
    if world <= loaded:
        return None
    if loaded == 1:
        return (f"this file is one rank of a {world}-rank job: waiting for other ranks cannot be measured "
                "from one rank, so cross_rank_wait is 0 because it was not measured (not because no rank "
                "waited); load the other ranks' files with it to measure waits")
    return (f"these files hold {loaded} of the job's {world} ranks: waits are measured among these only; a "
            "rank may also have waited for ranks that are not loaded")


def _coarse_offsets(ranks: pl.DataFrame) -> dict[int, int]:
    rank_ids = sorted(ranks.get_column("rank").to_list())
    origins = dict(zip(ranks.get_column("rank").to_list(), ranks.get_column("clock_origin_ns").to_list()))
    known = all(origins[r] is not None for r in rank_ids)
    return {r: (origins[r] - origins[rank_ids[0]]) if known else 0 for r in rank_ids}


def impossible_pairs(comm: pl.DataFrame, offsets: dict[int, int]) -> pl.DataFrame:
    """Per key seen on two ranks or more: whether its pairing is physically possible on the
    aligned clock (the last arrival is before the first participant's end), and the spread of
    its ends. Columns ``key, bad, spread_ns``."""
    shift = pl.col("rank").replace_strict(offsets, default=0, return_dtype=pl.Int64)
    return (
        comm.filter(pl.col("key").is_not_null())
        .with_columns(arrival=pl.col("start_ns") + shift, leave=pl.col("end_ns") + shift)
        .group_by("key")
        .agg(n=pl.col("rank").n_unique(), last=pl.col("arrival").max(), first_end=pl.col("leave").min(),
             last_end=pl.col("leave").max())
        .filter(pl.col("n") >= 2)
        .select("key", bad=pl.col("last") > pl.col("first_end") + PAIR_SLACK_NS,
                spread_ns=pl.col("last_end") - pl.col("first_end"))
    )


def pair_by_time(comm: pl.DataFrame, offsets: dict[int, int]) -> pl.DataFrame:
    """Re-key collectives without sequence numbers by overlap in time on the given clock.

    Per (group, collective name), all ranks' kernels sorted by start on the common clock are
    swept once: a kernel joins the open collective when it starts before the open collective's
    first end (all participants are inside a collective at once) and its rank is not in it yet;
    otherwise it opens the next one. Cost O(n log n) in the number of kernels, whatever the
    number of ranks."""
    if comm.is_empty():
        return comm
    shift = pl.col("rank").replace_strict(offsets, default=0, return_dtype=pl.Int64)
    numbered = comm.filter(pl.col("comm_seq").is_not_null())
    timed = comm.filter(pl.col("comm_seq").is_null()).with_columns(
        _a=pl.col("start_ns") + shift, _e=pl.col("end_ns") + shift
    ).sort("group", "label", "_a", "rank")
    keys = []
    previous, cluster, members, first_end = None, 0, set(), 0
    for group, label, rank, start, end in timed.select("group", "label", "rank", "_a", "_e").iter_rows():
        if (group, label) != previous or rank in members or start > first_end + PAIR_SLACK_NS:
            cluster += 1
            previous, members, first_end = (group, label), set(), end
        members.add(rank)
        first_end = min(first_end, end)
        keys.append(f"time/{group}/{label}/{cluster}")
    timed = timed.with_columns(key=pl.Series(keys, dtype=pl.String)).drop("_a", "_e")
    return pl.concat([numbered, timed], how="vertical_relaxed") if numbered.height else timed


def pair_collectives(comm: pl.DataFrame, ranks: pl.DataFrame) -> tuple[pl.DataFrame, Alignment]:
    """Pair the ranks' collectives and align their clocks; refuse what cannot be right.

    Keys from :func:`communication_kernels` (sequence numbers where the trace has them, else
    order within the step). After alignment every pair is checked (:func:`impossible_pairs`):
    when some are impossible, the collectives without sequence numbers are paired again by
    overlap in time (:func:`pair_by_time`) on the files' clock origins, and the pairing with
    fewer impossible pairs is kept. Impossible pairs are then left unpaired; when they are
    the majority the pairing is wrong as a whole, and the waits are refused with a note
    giving the residual.

    Reads every rank's collectives and the ranks; returns the paired collectives and the
    :class:`Alignment`.
    """
    alignment = align_clocks(comm, ranks)
    if comm.is_empty() or ranks.height < 2:
        return comm, alignment
    numbered = comm.get_column("comm_seq").is_not_null()
    alignment.pairing = "sequence numbers" if numbered.all() else ("order" if not numbered.any() else
                                                                   "sequence numbers, else order")
    check = impossible_pairs(comm, alignment.offsets)
    if check.is_empty() or not check.get_column("bad").any():
        return comm, alignment
    by_order = (comm, alignment, check)
    retimed = pair_by_time(comm, _coarse_offsets(ranks))
    timed_alignment = align_clocks(retimed, ranks)
    timed_check = impossible_pairs(retimed, timed_alignment.offsets)
    chosen, chosen_alignment, chosen_check = by_order
    if timed_check.height and timed_check.get_column("bad").mean() < check.get_column("bad").mean():
        chosen, chosen_alignment, chosen_check = retimed, timed_alignment, timed_check
        chosen_alignment.pairing = "time"
    else:
        chosen_alignment.pairing = alignment.pairing
    bad_keys = chosen_check.filter(pl.col("bad")).get_column("key")
    share = bad_keys.len() / chosen_check.height
    if share > 0.5:
        spread = float(check.get_column("spread_ns").median())
        # The collectives say nothing reliable about the clocks either: the origins only.
        chosen_alignment = align_clocks(comm.head(0), ranks)
        chosen_alignment.pairing, chosen_alignment.trusted, chosen_alignment.notes = "none", False, []
        chosen_alignment.notes.append(
            f"the ranks' collectives could not be paired: after alignment {bad_keys.len()} of "
            f"{chosen_check.height} pairs never overlap in time (paired by order, their ends differ by "
            f"{spread / 1e3:,.1f} µs at the median); no cross-rank waits are reported"
        )
        return chosen.with_columns(key=pl.lit(None, pl.String)), chosen_alignment
    kept = chosen.with_columns(
        key=pl.when(pl.col("key").is_in(bad_keys.implode())).then(None).otherwise(pl.col("key"))
    )
    final = align_clocks(kept, ranks)
    final.pairing = chosen_alignment.pairing
    how = "re-paired by overlap in time" if final.pairing == "time" else "paired by order"
    before = check.get_column("spread_ns").median()
    final.notes.append(
        f"{check.get_column('bad').sum()} of {check.height} collectives paired by order never overlapped in time "
        f"after alignment (ends {before / 1e3:,.1f} µs apart at the median: events are missing on some rank); "
        f"{how}, {bad_keys.len()} left unpaired, residual now {(final.residual_p50_ns or 0) / 1e3:,.1f} µs"
    )
    return kept, final


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
    return _disjoint_spans_note(spans, slack_ns=0)


def _disjoint_spans_note(spans: pl.DataFrame, *, slack_ns: int) -> str | None:
    """The first rank whose span (``rank, start, end``, sorted by start) begins more than
    ``slack_ns`` after every earlier one has ended, told as a note."""
    latest_rank, latest_end = None, None
    for rank, start, end in spans.iter_rows():
        if latest_end is not None and start > latest_end + slack_ns:
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
    # The deepest range around each launch names the collective's phase.
    launches = comm.select("rank", pl.col("launch_pid").alias("pid"), pl.col("launch_tid").alias("tid"),
                           pl.col("launch_start_ns").alias("t"))
    return comm.with_columns(phase=pl.Series(_innermost_names(annotations, launches), dtype=pl.String))


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
        return comm.with_columns(rows_sent=pl.lit(None, pl.Int64), rows_received=pl.lit(None, pl.Int64),
                                 payload_nelems=pl.max_horizontal("comm_in_nelems", "comm_out_nelems").cast(pl.Int64))
    joined = comm.join(ops, on=["rank", "external_id"], how="left")
    in_nelems = pl.coalesce("comm_in_nelems", "_op_in")
    out_nelems = pl.coalesce("comm_out_nelems", "_op_out")
    width = pl.when(pl.col("rows_sent") > 0).then(in_nelems / pl.col("rows_sent"))
    return joined.with_columns(
        rows_received=pl.when(width > 0).then((out_nelems / width).round(0)).cast(pl.Int64),
        payload_nelems=pl.max_horizontal(in_nelems, out_nelems).cast(pl.Int64),
    ).drop("_op_in", "_op_out")


def enrich_collectives(model: TraceModel, comm: pl.DataFrame, *, step_labels: list[str]) -> pl.DataFrame:
    """Per-rank part of the waits: add each collective's phase and row counts.

    Reads the model's annotations and the communication kernels; returns the kernels with
    ``phase`` and row counts."""
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
    if not alignment.trusted:
        return pl.DataFrame()
    offsets = pl.col("rank").replace_strict(alignment.offsets, default=0, return_dtype=pl.Int64)
    matched = comm.filter(pl.col("key").is_not_null()).with_columns(
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
            "transfer_ns", "participants", "rows_sent", "rows_received", "payload_nelems",
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

    Reads the matched collectives, the steps and the alignment; returns the windows.
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


def wait_table(collectives: pl.DataFrame, *, min_wait_ns: int = 1_000) -> pl.DataFrame:
    """Who waited for whom (:data:`~traceinsight.analysis.schemas.WAIT_SCHEMA`): one row per
    (collective, rank) that waited at least 1 µs, largest wait first (``head(3)`` are the
    three that cost most).

    Reads :func:`match_waits`' collectives; returns ``step, rank, waiting_for_rank, phase,
    wait_ms, collective, transfer_ms, key, start_ns``."""
    if collectives.is_empty():
        return pl.DataFrame(schema=WAIT_SCHEMA)
    rows = collectives.filter((pl.col("wait_ns") >= min_wait_ns) & (pl.col("rank") != pl.col("straggler"))).sort(
        ["wait_ns", "step", "rank", "start_ns"], descending=[True, False, False, False], nulls_last=True)
    # Rounded by Python's round(), as every other figure of the findings is.
    return frame_of([
        {
            "step": r["step"], "rank": r["rank"], "waiting_for_rank": r["straggler"],
            "phase": r["phase"] or r["label"], "wait_ms": round(r["wait_ns"] / 1e6, 4),
            "collective": r["label"], "transfer_ms": round(r["transfer_ns"] / 1e6, 4),
            "key": r["key"], "start_ns": r["start_ns"],
        }
        for r in rows.iter_rows(named=True)
    ], WAIT_SCHEMA)


def reasons_from_windows(waits: pl.DataFrame, broken: pl.DataFrame) -> pl.DataFrame:
    """Why each straggler was late, from the windows of :func:`straggler_windows` broken down
    per rank (:func:`~traceinsight.analysis.breakdown.window_breakdown`): the category in
    which the straggler exceeds the median of the others most.

    Reads the matched collectives and the broken-down windows; returns
    :data:`~traceinsight.analysis.schemas.STRAGGLER_SCHEMA`."""
    if waits.is_empty() or broken.is_empty():
        return pl.DataFrame(schema=STRAGGLER_SCHEMA)
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
        tokens = _payload_rows(waits, row["step"], row["phase"], row["key"])
        reasons.append({
            "key": row["key"], "step": row["step"], "collective": row["label"], "phase": row["phase"],
            "straggler": row["straggler"], "max_wait_ms": round(row["max_wait_ns"] / 1e6, 3),
            "reason": category, "reason_excess_ms": round(deltas[category] / 1e6, 3),
            "before_ms": [{"rank": r["rank"], "ms": round((r["end_ns"] - r["start_ns"]) / 1e6, 3)}
                          for r in windows.iter_rows(named=True)],
            "rows_sent": by_rank(tokens, "rows") if any(v is not None for v in tokens.values()) else None,
        })
    return frame_of(reasons, STRAGGLER_SCHEMA)


def _payload_rows(waits: pl.DataFrame, step, phase, key) -> dict:
    """Tokens each rank sent in the payload collective of a phase: the collective of that step
    and phase range that moves the most elements (a dispatch's count exchange moves a few
    numbers before the hidden states; its row count says nothing about the batch)."""
    if "payload_nelems" not in waits.columns:
        part = waits.filter(pl.col("key") == key)
    else:
        same = waits.filter((pl.col("step") == step) & (pl.col("phase") == phase)) if phase is not None else \
            waits.filter(pl.col("key") == key)
        if same.is_empty() or same.get_column("payload_nelems").is_null().all():
            same = waits.filter(pl.col("key") == key)
        payload = same.sort(["payload_nelems", "key"], descending=[True, False], nulls_last=True).item(0, "key")
        part = waits.filter(pl.col("key") == payload)
    return dict(zip(part.get_column("rank").to_list(), part.get_column("rows_sent").to_list()))


#: The coarse MoE phases and the words in a range name that mark them, tried in order.
PHASE_WORDS = (
    ("dispatch", ("dispatch",)),
    ("combine", ("combine",)),
    ("attention", ("attention", "attn")),
    ("experts", ("expert", "grouped", "moe_mlp", "ffn", "mlp")),
)


def phase_class(name: str | None) -> str | None:
    """Coarse MoE phase of an annotation name: attention, dispatch, experts, combine."""
    if not name:
        return None
    lowered = name.lower()
    return next((phase for phase, words in PHASE_WORDS if any(word in lowered for word in words)), None)


def phase_expr(column: str = "name") -> pl.Expr:
    """:func:`phase_class` as a polars expression (every distinct name at once).

    One Aho-Corasick search per phase, ASCII case folded: the same answer as Python's
    ``lower()`` for these all-ASCII words (of the non-ASCII letters whose lowercase holds an
    ASCII letter, the Kelvin sign gives ``k``, which no word holds, and ``İ`` gives ``i`` and a
    combining dot, which no word ends before), at a fifth of the cost of lowercasing every
    name and searching each word apart."""
    name = pl.col(column)
    expr = pl.when(pl.lit(False)).then(pl.lit(None, pl.String))
    for phase, words in PHASE_WORDS:
        expr = expr.when(name.str.contains_any(list(words), ascii_case_insensitive=True)).then(pl.lit(phase))
    return expr.otherwise(pl.lit(None, pl.String))


def _innermost_names(annotations: pl.DataFrame, rows: pl.DataFrame) -> list:
    """For each row (``rank, pid, tid, t``), the name of the deepest annotation of its thread
    that contains ``t`` (None where none does)."""
    names_out = np.full(rows.height, None, dtype=object)
    if annotations.is_empty() or rows.is_empty():
        return names_out.tolist()
    rows = rows.with_row_index("_i").filter(pl.col("tid").is_not_null())
    # Ranges of one depth on one thread do not overlap: a sorted search finds the candidate
    # at each depth; the deepest one that contains the time wins.
    for (rank, pid, tid), part in rows.group_by("rank", "pid", "tid"):
        thread = annotations.filter((pl.col("rank") == rank) & (pl.col("pid") == pid) & (pl.col("tid") == tid))
        if thread.is_empty():
            continue
        times = part.get_column("t").to_numpy()
        best = np.full(times.size, None, dtype=object)
        for depth in sorted(thread.get_column("depth").unique().to_list()):
            level = thread.filter(pl.col("depth") == depth).sort("start_ns")
            starts = level.get_column("start_ns").to_numpy()
            ends = level.get_column("end_ns").to_numpy()
            names = level.get_column("name").to_numpy()
            at = np.searchsorted(starts, times, side="right") - 1
            inside = (at >= 0) & (times <= ends[np.clip(at, 0, None)])
            best[inside] = names[at[inside]]
        names_out[part.get_column("_i").to_numpy()] = best
    return names_out.tolist()


def compute_phase_times(model: TraceModel, gpu: pl.DataFrame, steps: pl.DataFrame, *,
                        step_labels: list[str]) -> pl.DataFrame:
    """GPU time of the attention and expert work per (step, rank, phase) (per-rank part of
    :func:`imbalance_from`).

    Every compute kernel counts once: it belongs to the innermost attention or expert
    annotation around its launch, however the annotations nest (``FlashAttnFunc`` around
    ``flash_attn::_flash_attn_forward`` is one attention, not two).

    Reads the model's annotations, the GPU activities and the steps; returns ``step, rank,
    phase, t``."""
    empty = pl.DataFrame(schema={"step": pl.Int64, "rank": pl.Int32, "phase": pl.String, "t": pl.Int64})
    if gpu.is_empty() or steps.is_empty():
        return empty
    annotations = model.intervals.lazy().filter(
        (pl.col("kind") == "annotation") & ~pl.col("name").is_in(step_labels)
        & ~pl.col("name").str.contains(LIBRARY_RANGES)
    ).select("rank", "pid", "tid", "depth", "start_ns", "end_ns", "name").collect()
    if annotations.is_empty():
        return empty
    # Each distinct name is classified once, by one expression over all of them.
    classes = annotations.select(pl.col("name").unique()).with_columns(phase=phase_expr()).filter(
        pl.col("phase").is_in(["attention", "experts"]))
    annotations = annotations.join(classes.select("name"), on="name", how="semi")
    kernels = gpu.filter(
        (pl.col("kind") == "kernel") & ~pl.col("is_comm") & pl.col("launch_start_ns").is_not_null()
    ).select("rank", pl.col("launch_pid").alias("pid"), pl.col("launch_tid").alias("tid"),
             pl.col("launch_start_ns").alias("t"), gpu_ns=pl.col("end_ns") - pl.col("start_ns"))
    if annotations.is_empty() or kernels.is_empty():
        return empty
    kernels = (
        kernels.with_columns(name=pl.Series(_innermost_names(annotations, kernels), dtype=pl.String))
        .join(classes, on="name", how="left", maintain_order="left")
        .drop("name")
        .filter(pl.col("phase").is_not_null())
    )
    if kernels.is_empty():
        return empty
    return (
        assign_to_steps(kernels, steps, time_column="t")
        .filter(pl.col("step").is_not_null())
        .group_by("step", "rank", "phase").agg(t=pl.col("gpu_ns").sum())
        .select(pl.col("step").cast(pl.Int64), pl.col("rank").cast(pl.Int32), "phase", pl.col("t").cast(pl.Int64))
        .sort("step", "rank", "phase")
    )


def imbalance_from(compute_times: pl.DataFrame, waits: pl.DataFrame, steps: pl.DataFrame) -> pl.DataFrame:
    """Per step: what balanced load across ranks would save, from measured per-rank rates.

    Each MoE phase's time per rank: attention and experts from the GPU time of the work
    launched in the matching annotations (``compute_times``); dispatch and combine from the
    transfer part of their collectives. Ranks meet at every dispatch and combine, so a step
    costs about ``max(attention) + max(dispatch) + max(experts) + max(combine)``.

    Balanced, compute phases cost the ranks' mean. A collective's transfer is set by the rank
    receiving the most rows (``t = max rows / bandwidth``, the measured transfer); balanced,
    each rank receives the mean, so it takes ``t * mean rows / max rows`` (where the trace
    records no row counts, the mean transfer time).

    Reads per-rank compute times (:func:`compute_phase_times`), the matched collectives and
    the steps; returns :data:`~traceinsight.analysis.schemas.IMBALANCE_SCHEMA`: per step
    ``modeled_ms``, ``balanced_ms``, ``saving_ms``, the ``measured_ms`` of the slowest rank's
    step, per-phase figures and the tokens of dispatch and combine.
    """
    if waits.is_empty() or compute_times.is_empty():
        return pl.DataFrame(schema=IMBALANCE_SCHEMA)
    compute = compute_times.sort("t", "rank", descending=[True, False]).group_by("step", "phase").agg(
        max_ns=pl.col("t").max(), balanced_ns=pl.col("t").mean(), max_rank=pl.col("rank").first()
    )
    transfers = waits.with_columns(phase=phase_expr("phase")).filter(
        pl.col("phase").is_in(["dispatch", "combine"]) & pl.col("step").is_not_null()
    )
    # Participants leave a collective together, so its transfer time is set by the rank that
    # receives or sends the most rows at the link's bandwidth: t = max rows / bandwidth.
    # Balanced, every rank sends and receives the mean, so t_balanced = t * mean rows / max rows.
    per_collective = (
        transfers.group_by("step", "phase", "key")
        .agg(
            max_ns=pl.col("transfer_ns").max(),
            mean_ns=pl.col("transfer_ns").mean(),
            max_rows=pl.max_horizontal("rows_sent", "rows_received").max(),
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
    summary = pl.concat([compute, per_collective], how="diagonal_relaxed")
    if summary.is_empty():
        return pl.DataFrame(schema=IMBALANCE_SCHEMA)
    measured = steps.group_by("step").agg(measured=pl.col("duration_ns").max())
    out = []
    for (step,), part in summary.sort("step").group_by(["step"], maintain_order=True):
        modeled = float(part.get_column("max_ns").sum())
        balanced = float(part.get_column("balanced_ns").sum())
        measured_row = measured.filter(pl.col("step") == step)
        phases = [{"phase": r["phase"], "max_ms": round(r["max_ns"] / 1e6, 3),
                   "balanced_ms": round(r["balanced_ns"] / 1e6, 3), "max_rank": r.get("max_rank")}
                  for r in part.sort("phase").iter_rows(named=True)]
        out.append({
            "step": step, "phases": phases,
            "modeled_ms": round(modeled / 1e6, 3), "balanced_ms": round(balanced / 1e6, 3),
            "saving_ms": round((modeled - balanced) / 1e6, 3),
            "measured_ms": round(measured_row.item(0, "measured") / 1e6, 3) if measured_row.height else None,
        })
    return frame_of(_with_payload(out, waits), IMBALANCE_SCHEMA)


def payload_tokens(waits: pl.DataFrame) -> dict[tuple[int, str], dict]:
    """Per (step, dispatch|combine): the token payload each rank received and sent.

    A MoE dispatch is often two all-to-alls: the token counts first (a few elements), then
    the hidden states. The payload is the collective of each phase range (``layer1.dispatch``)
    that moves the most elements; its rows (``Out msg nelems`` / row width, or the split
    sizes) are the tokens. Returns ``{(step, phase): {"received": {rank: N}, "sent": {rank: n},
    "transfer_ns": t}}`` where ``t`` sums the payload collectives' transfer times.
    """
    if waits.is_empty() or "payload_nelems" not in waits.columns:
        return {}
    frame = waits.with_columns(
        phase_class=phase_expr("phase")
    ).filter(pl.col("phase_class").is_in(["dispatch", "combine"]) & pl.col("step").is_not_null()
             & pl.col("payload_nelems").is_not_null())
    if frame.is_empty():
        return {}
    sizes = frame.group_by("step", "phase", "key").agg(size=pl.col("payload_nelems").max())
    payload_keys = (
        sizes.sort(["size", "key"], descending=[True, False])
        .group_by("step", "phase", maintain_order=True).first().get_column("key")
    )
    payload = frame.filter(pl.col("key").is_in(payload_keys.implode()))
    per_rank = payload.group_by("step", "phase_class", "rank").agg(
        received=pl.col("rows_received").sum(), sent=pl.col("rows_sent").sum(), n=pl.col("rows_received").count())
    transfer = payload.group_by("step", "phase_class", "key").agg(t=pl.col("transfer_ns").max()).group_by(
        "step", "phase_class").agg(t=pl.col("t").sum())
    out: dict[tuple[int, str], dict] = {}
    for row in per_rank.sort("rank").iter_rows(named=True):
        if not row["n"]:
            continue
        entry = out.setdefault((row["step"], row["phase_class"]), {"received": {}, "sent": {}, "transfer_ns": 0})
        entry["received"][row["rank"]] = int(row["received"])
        entry["sent"][row["rank"]] = int(row["sent"]) if row["sent"] is not None else None
    for step, phase, t in transfer.iter_rows():
        if (step, phase) in out:
            out[(step, phase)]["transfer_ns"] = int(t)
    return out


def _with_payload(entries: list[dict], waits: pl.DataFrame) -> list[dict]:
    """Add ``tokens`` per entry: for dispatch and combine, the rank receiving most, its tokens
    N, the balanced M (mean over ranks), the expected time ratio N/M (transfer time grows with
    the tokens of the busiest receiver) and the measured ratio: this step's payload transfer
    time per balanced token over the median of all steps (what the ratio would be if the
    model holds). A step without token counts keeps ``tokens`` null."""
    tokens = payload_tokens(waits)
    if not tokens:
        return entries
    per_token: dict[str, list[float]] = {}
    for (step, phase), entry in tokens.items():
        received = [v for v in entry["received"].values() if v]
        if received and entry["transfer_ns"]:
            per_token.setdefault(phase, []).append(entry["transfer_ns"] / (sum(received) / len(received)))
    typical = {phase: float(np.median(values)) for phase, values in per_token.items()}
    for entry in entries:
        for phase in ("dispatch", "combine"):
            found = tokens.get((entry["step"], phase))
            if not found or not found["received"]:
                continue
            received, sent = found["received"], found["sent"]
            # The busiest end of the all-to-all sets its time: the rank receiving the most
            # tokens, or sending the most (a rank with 1.75x the batch sends 1.75x at dispatch).
            loads = [(v, r, "receives") for r, v in received.items()] + \
                    [(v, r, "sends") for r, v in sent.items() if v is not None]
            tokens_busiest, busiest, direction = max(loads, key=lambda x: (x[0], -x[1], x[2]))
            balanced = sum(received.values()) / len(received)
            measured = None
            if balanced > 0 and found["transfer_ns"] and typical.get(phase):
                measured = round(found["transfer_ns"] / balanced / typical[phase], 3)
            entry.setdefault("tokens", []).append({
                "phase": phase, "received": by_rank(received, "rows"), "sent": by_rank(sent, "rows"),
                "rank": busiest, "direction": direction, "tokens": tokens_busiest,
                "balanced_tokens": round(balanced, 1),
                "expected_ratio": round(tokens_busiest / balanced, 3) if balanced > 0 else None,
                "measured_ratio": measured,
                "transfer_ms": round(found["transfer_ns"] / 1e6, 4),
            })
    return entries


def step_straggler(collectives: pl.DataFrame, step: int) -> int | None:
    """The rank the others waited for longest in a step (None without waits)."""
    if collectives.is_empty() or "wait_ns" not in collectives.columns:
        return None
    caused = (
        collectives.filter((pl.col("step") == step) & (pl.col("rank") != pl.col("straggler")))
        .group_by("straggler").agg(ms=pl.col("wait_ns").sum())
        .filter(pl.col("ms") > 0).sort(["ms", "straggler"], descending=[True, False])
    )
    return None if caused.is_empty() else int(caused.item(0, "straggler"))


def who_waited_for_whom(collectives: pl.DataFrame, stragglers: pl.DataFrame, imbalance: pl.DataFrame,
                        step: int) -> list[dict]:
    """Every matched collective of one step, in the order they completed: each rank's arrival
    (ms after the first rank arrived, on the common clock) and wait, the straggler, and why it
    was late (the category in which its time before the collective exceeded the others', and,
    where the imbalance model has it, the compute phase in which its GPU time did)."""
    if collectives.is_empty() or "wait_ns" not in collectives.columns:
        return []
    part = collectives.filter(pl.col("step") == step)
    if part.is_empty():
        return []
    reasons = {r["key"]: r for r in stragglers.filter(pl.col("step") == step).iter_rows(named=True)}
    phases = next(({p["phase"]: p for p in e["phases"]} for e in imbalance.filter(pl.col("step") == step)
                   .iter_rows(named=True)), {})
    out = []
    for (key,), rows in part.sort("last_arrival_ns").group_by(["key"], maintain_order=True):
        rows = rows.sort("arrival_ns", "rank")
        first = rows.item(0, "arrival_ns")
        straggler = int(rows.item(0, "straggler"))
        entry = {
            "key": key, "collective": rows.item(0, "label"), "phase": rows.get_column("phase").drop_nulls().first(),
            "participants": rows.height, "straggler": straggler,
            "max_wait_ms": round(rows.get_column("wait_ns").max() / 1e6, 4),
            "transfer_ms": round(rows.get_column("transfer_ns").max() / 1e6, 4),
            "arrivals": [{"rank": r["rank"], "after_first_ms": round((r["arrival_ns"] - first) / 1e6, 4),
                          "wait_ms": round(r["wait_ns"] / 1e6, 4)} for r in rows.iter_rows(named=True)],
            "why": None,
        }
        reason = reasons.get(key)
        if reason is not None:
            why = (f"before it, rank {straggler}'s {reason['reason']} exceeded the others' by "
                   f"{reason['reason_excess_ms']:.2f} ms")
            grown = [(p, f) for p, f in phases.items() if p in ("attention", "experts") and f.get("max_rank") == straggler]
            if reason["reason"] == "gpu_compute" and grown and rows.height > 1:
                phase, figures = max(grown, key=lambda pf: pf[1]["max_ms"] - pf[1]["balanced_ms"])
                n = rows.height
                others = (n * figures["balanced_ms"] - figures["max_ms"]) / (n - 1)
                why += (f"; its {phase} took {figures['max_ms']:.2f} ms of GPU time in this step, "
                        f"the others' {others:.2f} ms" + (f" ({figures['max_ms'] / others:.1f}x)" if others > 0 else ""))
            if reason["rows_sent"]:
                why += f"; tokens sent per rank (payload all-to-all) {rank_mapping(reason['rows_sent'], 'rows')}"
            entry["why"] = why
        out.append(entry)
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
