"""Ranks on one clock: the clock offsets (:class:`Alignment`) and the checks on the pairs of
collectives they are measured from.

**Clock alignment** (:func:`align_clocks`). Processes recorded in one report (one nsys file)
share its clock (:func:`clock_domains`): no correction is measured between them. Each rank's
own clock is first put on the wall clock with the file's own origin (nsys ``utcEpochNs``,
Kineto ``baseTimeNanoseconds`` or absolute stamps). The residual skew is then measured from
matched collectives: participants leave a collective at nearly the same moment (its *ends*
agree; its *starts* do not: that difference is the waiting), so each rank's correction is
the median of its end differences with the reference rank, after dropping collectives more
than 5 MADs away. ``clock_offset_ns`` of a rank is what to add to its own clock to land on
the common clock (the reference rank's).

**Pairs that cannot be.** No rank leaves a collective before the last one arrived, so on the
aligned clock the last arrival precedes the first end (:func:`impossible_pairs`); collectives
without sequence numbers can be paired again by overlap in time (:func:`pair_by_time`).
:mod:`~traceinsight.analysis.analyzers.collective_pairing` decides with them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import polars as pl


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
