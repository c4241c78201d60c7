"""Where the time of each anomalous step went, and why.

Each anomalous step is a finding. A step finding lists the *places*
(:mod:`traceinsight.analysis.places`) that together explain most of its excess, largest
first: CPU gaps placed on the annotation path of the launching thread, and GPU time placed
on the range that *launched* it (through the launch correlation, backward's thread
included), each against the typical step. Causes:
:data:`~traceinsight.analysis.categories.CAUSES`.
"""

from __future__ import annotations

import polars as pl

from traceinsight.analysis.categories import CATEGORIES
from traceinsight.analysis.descriptor import Analysis
from traceinsight.analysis.places import Places, _kernel_text, _ms

__all__ = ["explain_steps"]


def explain_steps(
    steps: pl.DataFrame,
    instances: pl.DataFrame,
    cpu_gaps: pl.DataFrame,
    *,
    which: pl.DataFrame | None = None,
    launch_counts: pl.DataFrame | None = None,
    gpu: pl.DataFrame | None = None,
    sync_pieces: pl.DataFrame | None = None,
    places: Places | None = None,
) -> list[dict]:
    """Where the time of each anomalous step went, and why (or of the steps in ``which``).

    Reads the flagged steps, the range instances, the CPU gaps and the GPU activities; returns
    one record per step finding.

    Parameters
    ----------
    steps
        Flagged step table (:func:`flag_steps`) with the breakdown columns.
    instances
        Range instances with a ``step`` column (:func:`assign_to_steps`).
    cpu_gaps
        Attributed CPU gaps (:func:`~traceinsight.analysis.analyzers.cpu_gap_causes.attribute_cpu_gaps`).
    launch_counts
        GPU activities launched per (rank, step) (:func:`launches_per_step`).
    gpu
        GPU activities with their launch calls: GPU time is placed where it was launched.
    sync_pieces
        The ``host_sync`` pieces of the breakdown: GPU idle while the host synchronized.
    places
        A :class:`Places` already built over the same frames.

    Returns
    -------
    list of dict
        ``rank, step, duration_ms, typical_ms, excess_ms, category, category_excess_ms,
        category_deltas_ms, where, cause, evidence, places, kernels, ranges``. ``places``
        lists the places that together explain most of the excess (``where`` is the first),
        ``kernels`` the kernels that grew, ``ranges`` the ranges whose time grew most.
    """
    targets = which if which is not None else steps.filter(pl.col("anomalous")).select("rank", "step")
    if targets.is_empty():
        return []
    if places is None:
        places = Places(steps, instances, cpu_gaps, gpu, sync_pieces)
    gap_totals = cpu_gaps.group_by("rank", "step", "cause").agg(total=pl.col("duration_ns").sum())
    range_totals: dict[int, pl.DataFrame] = {}  # per rank, for all its flagged steps
    results = []
    for rank, step in targets.iter_rows():
        rank_steps = steps.filter(pl.col("rank") == rank)
        this = rank_steps.filter(pl.col("step") == step)
        if this.is_empty():
            continue
        this = this.row(0, named=True)
        normal = rank_steps.filter(~pl.col("anomalous") & (pl.col("step") != step))
        if normal.is_empty():
            normal = rank_steps.filter(pl.col("step") != step)
        normal_steps = normal.get_column("step").to_list()
        typical = {c: float(normal.get_column(f"{c}_ns").median() or 0) for c in CATEGORIES}
        typical_duration = float(normal.get_column("duration_ns").median() or 0) if normal.height else 0.0
        judged = this.get("judged_ns") or this["duration_ns"]
        excess = judged - typical_duration
        deltas = {c: this[f"{c}_ns"] - typical[c] for c in CATEGORIES}
        category = max(deltas, key=deltas.get)
        waited = category == "cross_rank_wait"
        found = places.step_places(rank, step, normal_steps, excess_ns=excess, label=this["label"],
                                   cross_rank_wait=waited)
        kernels = places.kernel_changes(rank, step, normal_steps, limit=5)
        if rank not in range_totals:
            range_totals[rank] = _range_totals(instances, rank)
        ranges = _range_excess(range_totals[rank], step, set(normal_steps))
        if found:
            where, cause = found[0]["where"], found[0]["cause"]
            if waited and deltas["cross_rank_wait"] >= 0.5 * max(excess, 1):
                cause = "cross_rank_wait"
        else:
            where = this["label"]
            cause, _ = _cause(category, cpu_gaps, gap_totals, rank, step, set(normal_steps))
        more_launches = None
        if launch_counts is not None:
            counts = launch_counts.filter(pl.col("rank") == rank)
            here = counts.filter(pl.col("step") == step).get_column("launches")
            usual = counts.filter(pl.col("step").is_in(normal_steps)).get_column("launches").median()
            if here.len() and usual and here[0] >= 1.5 * usual:
                more_launches = (f"the step launched {here[0]} GPU activities vs {usual:.0f} typically "
                                 f"({here[0] / usual:.1f}x)")
                # Host time that grew with the launches, without evidence of anything else.
                if cause == "cpu_gap":
                    cause = "cpu_gap.launch_overhead"
                    if found and found[0]["cause"] == "cpu_gap":
                        found[0]["cause"] = cause
        parts = [f"step {step} took {_ms(this['duration_ns'])} vs {_ms(typical_duration)} typical; "
                 f"{category} +{_ms(deltas[category])}"]
        if judged != this["duration_ns"]:
            parts[0] += (f" (the last step: judged on its marker and the GPU work it launched, "
                         f"{_ms(judged)}, not on the queue drain after it)")
        for index, place in enumerate(found, 1):
            parts.append(f"({index}) {place['where']}: +{_ms(place['excess_ms'] * 1e6)}, {place['cause']}: "
                         f"{place['evidence']}")
        if not found and category == "cpu_gap":
            parts.append("no single place holds the growth")
        gpu_growth = deltas["gpu_compute"] + deltas["gpu_memory"] + deltas["communication"]
        if kernels and gpu_growth > 0.1 * max(excess, 1) and not any(p["side"] == "gpu" for p in found):
            parts.append("kernels that grew: " + ", ".join(_kernel_text(k) for k in kernels[:3]))
        if more_launches:
            parts.append(more_launches)
        results.append({
            "rank": rank,
            "step": step,
            "duration_ms": round(this["duration_ns"] / 1e6, 3),
            "typical_ms": round(typical_duration / 1e6, 3),
            "excess_ms": round(excess / 1e6, 3),
            "category": category,
            "category_excess_ms": round(deltas[category] / 1e6, 3),
            "category_deltas_ms": {c: round(v / 1e6, 3) for c, v in deltas.items()},
            "where": where,
            "range": found[0].get("range") if found else None,
            "cause": cause,
            "evidence": ". ".join(parts),
            "places": found,
            "kernels": kernels,
            "ranges": ranges.head(8).to_dicts() if ranges.height else [],
        })
    return results


def _range_totals(instances: pl.DataFrame, rank: int) -> pl.DataFrame | None:
    """Per (annotation name, step) of ``rank``: time, depth, launches, lag and count (``None``
    when the rank has no range instance in a step); made once for all its flagged steps."""
    # The columns first (no copy of the others), and no copy at all where every row is kept
    # (one rank, every instance in a step).
    ranked = instances.select("rank", "step", "name", "duration_ns", "depth", "launches", "first_gpu_lag_ns")
    kept = ranked.select((pl.col("rank") == rank) & pl.col("step").is_not_null()).to_series().fill_null(False)
    if not kept.all():
        ranked = ranked.filter(kept)
    if ranked.is_empty():
        return None
    return ranked.group_by("name", "step").agg(
        total_ns=pl.col("duration_ns").sum(),
        depth=pl.col("depth").min(),
        launches=pl.col("launches").sum(),
        lag_ns=pl.col("first_gpu_lag_ns").max(),
        count=pl.len(),
    )


def _range_excess(per_step: pl.DataFrame | None, step: int, normal_steps: set[int]) -> pl.DataFrame:
    """Per annotation name: this step's total time against the typical step's, largest growth
    first (``per_step``: :func:`_range_totals` of the step's rank)."""
    if per_step is None:
        return pl.DataFrame()
    this = per_step.filter(pl.col("step") == step)
    typical = (
        per_step.filter(pl.col("step").is_in(list(normal_steps)))
        .group_by("name")
        .agg(
            typical_ns=pl.col("total_ns").median(),
            typical_launches=pl.col("launches").median(),
            typical_lag_ns=pl.col("lag_ns").median(),
            typical_count=pl.col("count").median(),
        )
    )
    return (
        this.join(typical, on="name", how="left")
        .with_columns(
            pl.col("typical_ns").fill_null(0.0),
            pl.col("typical_launches").fill_null(0.0),
        )
        .with_columns(excess_ns=pl.col("total_ns") - pl.col("typical_ns"))
        .sort("excess_ns", descending=True)
        .select("name", "depth", "count", "total_ns", "typical_ns", "excess_ns", "launches",
                "typical_launches", "lag_ns", "typical_lag_ns")
    )


def _cause(category: str, cpu_gaps: pl.DataFrame, gap_totals: pl.DataFrame, rank: int, step: int,
           normal_steps: set[int]) -> tuple[str, str | None]:
    if category == "idle":
        return "unknown", None
    if category != "cpu_gap":
        return category, None
    per_step = gap_totals.filter(pl.col("rank") == rank)
    this = per_step.filter(pl.col("step") == step)
    n_normal = max(len(normal_steps), 1)
    typical = (
        per_step.filter(pl.col("step").is_in(list(normal_steps)))
        .group_by("cause")
        .agg(typical=pl.col("total").sum() / n_normal)
    )
    grown = this.join(typical, on="cause", how="left").with_columns(
        growth=pl.col("total") - pl.col("typical").fill_null(0.0)
    ).sort("growth", descending=True)
    if grown.is_empty():
        return "cpu_gap", None
    cause = grown.row(0, named=True)["cause"]
    evidence = (
        cpu_gaps.filter((pl.col("rank") == rank) & (pl.col("step") == step) & (pl.col("cause") == cause))
        .sort("duration_ns", descending=True)
        .select("evidence", "evidence_source", "duration_ns")
        .row(0, named=True)
    )
    text = None
    if evidence["evidence"]:
        text = f"{evidence['evidence_source']}: {evidence['evidence']}"
    if cause == "unknown":
        return "cpu_gap", text
    return f"cpu_gap.{cause}", text


ANALYSIS = Analysis(name="step findings", phase="rank 3", function=explain_steps,
                    reads=("steps", "range_instances", "cpu_gaps", "gpu"),
                    returns="where each flagged step's time went and why", field="anomalies")
