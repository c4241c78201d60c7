"""Anomalous steps and range instances, and the root cause of each.

Baselines are robust and local. A step is compared with the median of its neighbours on the
same rank (``window`` steps either side, outliers left out), so a warm-up phase or a slow
drift is not called an anomaly, while a single step that stands out from the steps around it
is. A step is flagged when its duration exceeds that local median by at least ``min_ratio``
(default +50%) *and* by more than ``sigmas`` robust standard deviations (1.4826 × MAD of the
ratios of the rank's ordinary steps), and by at least ``min_excess_ns``.

Range instances (every ``GroupedLinear forward layer2.fc1``...) are compared with the median
of the same name on the same rank; an instance is flagged when it is at least ``range_ratio``
times the median, longer by ``min_range_excess_ns``, and beyond ``sigmas`` robust deviations;
this finds a 200 ms range among 1–3 ms siblings even where the step as a whole hides it.

The root cause compares the anomalous step with the *typical* step of the same rank (the
median of each quantity over the rank's unflagged steps):

- **category**: the breakdown category that grew most;
- **where**: the deepest annotation whose per-step time grew by at least half the step's
  excess (else the one that grew most);
- **cause**: from the vocabulary :data:`CAUSES`: ``cpu_gap.<cause>`` where the CPU-gap evidence
  of the step names what grew (``cpu_gap`` alone where the trace holds no evidence),
  ``host_sync``, ``gpu_compute``, ``communication``, ``cross_rank_wait``, ``unknown``;
- **evidence**: the range's time and GPU lag against typical, launch counts, the CPU-gap
  evidence (frames, calls, ops with their share).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from traceinsight.analysis.breakdown import CATEGORIES

CAUSES = (
    "cpu_gap.memory_allocation",
    "cpu_gap.garbage_collection",
    "cpu_gap.launch_overhead",
    "cpu_gap.blocked",
    "cpu_gap.python",
    "cpu_gap",
    "host_sync",
    "gpu_compute",
    "communication",
    "cross_rank_wait",
    "unknown",
)

MAD_TO_SIGMA = 1.4826
#: Annotations that name a communication library's call rather than a place in the model.
LIBRARY_RANGES = r"(?i)^(?:nccl|rccl|c10d::|record_param_comms|ProfilerStep#|cub::|deep_ep)|^nccl:"


@dataclass(frozen=True)
class AnomalyOptions:
    """Thresholds of the anomaly detector (see the module docstring)."""

    window: int = 5
    min_ratio: float = 1.5
    sigmas: float = 5.0
    min_excess_ns: int = 1_000_000
    range_ratio: float = 3.0
    min_range_excess_ns: int = 1_000_000


def _robust_sigma(values: np.ndarray) -> float:
    if values.size == 0:
        return 0.0
    median = np.median(values)
    return float(MAD_TO_SIGMA * np.median(np.abs(values - median)))


def _local_median(durations: np.ndarray, window: int, usable: np.ndarray) -> np.ndarray:
    """Median of the usable neighbours within ``window`` steps on each side (the step excluded).

    Falls back to the median of all usable steps where no neighbour is usable.
    """
    n = durations.size
    fallback = np.median(durations[usable]) if usable.any() else np.median(durations)
    out = np.empty(n, dtype=np.float64)
    for i in range(n):  # steps per rank are few (tens to thousands): a plain loop is fine
        lo, hi = max(0, i - window), min(n, i + window + 1)
        mask = usable[lo:hi].copy()
        mask[i - lo] = False
        neighbours = durations[lo:hi][mask]
        out[i] = np.median(neighbours) if neighbours.size else fallback
    return out


def flag_steps(steps: pl.DataFrame, options: AnomalyOptions = AnomalyOptions()) -> pl.DataFrame:
    """Add ``baseline_ns``, ``ratio`` and ``anomalous`` to the step table (per rank).

    Two passes keep outliers out of their neighbours' baselines: steps at least ``min_ratio``
    times the median of all their neighbours are candidates and are left out of every local
    median and of the spread estimate; every step is then judged against the median of its
    usable neighbours. A warm-up phase has slow neighbours and is no candidate.

    Examples
    --------
    >>> flag_steps(breakdown.steps).filter("anomalous").select("rank", "step")  # doctest: +SKIP
    """
    frames = []
    for _, rank_steps in steps.sort("rank", "step").group_by("rank", maintain_order=True):
        durations = rank_steps.get_column("duration_ns").to_numpy().astype(np.float64)
        if durations.size < 3:
            frames.append(rank_steps.with_columns(
                baseline_ns=pl.col("duration_ns").cast(pl.Float64), ratio=pl.lit(1.0), anomalous=pl.lit(False)))
            continue
        # Pass 1: steps that stand out from all their neighbours are candidates. Pass 2: the
        # baseline of every step leaves the candidates out.
        raw = _local_median(durations, options.window, np.ones(durations.size, dtype=bool))
        usable = durations < options.min_ratio * raw
        baseline = _local_median(durations, options.window, usable)
        ratio = durations / np.maximum(baseline, 1.0)
        spread = _robust_sigma(ratio[usable])
        threshold = max(options.min_ratio, 1.0 + options.sigmas * spread)
        anomalous = (ratio >= threshold) & (durations - baseline >= options.min_excess_ns)
        frames.append(rank_steps.with_columns(
            baseline_ns=pl.Series(baseline), ratio=pl.Series(ratio), anomalous=pl.Series(anomalous)))
    if not frames:
        return steps.with_columns(
            baseline_ns=pl.lit(None, pl.Float64), ratio=pl.lit(None, pl.Float64), anomalous=pl.lit(False))
    return pl.concat(frames)


def flag_job_steps(steps: pl.DataFrame, options: AnomalyOptions = AnomalyOptions()) -> pl.DataFrame:
    """Extend per-rank flags (:func:`flag_steps`) to the job.

    Ranks of one job meet at every collective, so a step that stands out on one rank is a
    slow step of the job: it is flagged on every rank where it is also ``min_ratio`` slower
    than that rank's baseline.
    """
    job_slow = pl.col("anomalous").any().over("step") & (pl.col("ratio") >= options.min_ratio)
    return steps.with_columns(anomalous=pl.col("anomalous") | job_slow)


def assign_to_steps(frame: pl.DataFrame, steps: pl.DataFrame, *, time_column: str = "start_ns") -> pl.DataFrame:
    """Add ``step``: the step whose window holds ``time_column`` on the same rank (else null)."""
    windows = steps.select("rank", pl.col("start_ns").alias("_w_start"), pl.col("end_ns").alias("_w_end"),
                           pl.col("step")).sort("_w_start")
    if "step" in frame.columns:
        frame = frame.drop("step")
    return (
        frame.sort(time_column)
        .join_asof(windows, left_on=time_column, right_on="_w_start", by="rank",
                   strategy="backward", check_sortedness=False)
        .with_columns(step=pl.when(pl.col(time_column) < pl.col("_w_end")).then(pl.col("step")))
        .drop("_w_start", "_w_end")
    )


def flag_range_instances(instances: pl.DataFrame, options: AnomalyOptions = AnomalyOptions()) -> pl.DataFrame:
    """Add ``typical_ns`` (median of the same name and rank) and ``anomalous`` to range instances."""
    if instances.is_empty():
        return instances.with_columns(typical_ns=pl.lit(None, pl.Float64), anomalous=pl.lit(False))
    group = ["rank", "name"]
    median = pl.col("duration_ns").median().over(group)
    mad = (pl.col("duration_ns") - median).abs().median().over(group)
    return instances.with_columns(typical_ns=median, _sigma=mad * MAD_TO_SIGMA, _count=pl.len().over(group)).with_columns(
        anomalous=(pl.col("_count") >= 5)
        & (pl.col("duration_ns") >= options.range_ratio * pl.col("typical_ns"))
        & (pl.col("duration_ns") - pl.col("typical_ns") >= options.min_range_excess_ns)
        & (pl.col("duration_ns") - pl.col("typical_ns") > options.sigmas * pl.col("_sigma"))
    ).drop("_sigma", "_count")


def _ms(ns: float | None) -> str:
    return "?" if ns is None else f"{ns / 1e6:.1f} ms"


def explain_steps(
    steps: pl.DataFrame,
    instances: pl.DataFrame,
    cpu_gaps: pl.DataFrame,
    *,
    which: pl.DataFrame | None = None,
    launch_counts: pl.DataFrame | None = None,
) -> list[dict]:
    """Root cause of each anomalous step (or of the steps in ``which``: ``rank, step``).

    Parameters
    ----------
    steps
        Flagged step table (:func:`flag_steps`) with the breakdown columns.
    instances
        Range instances with a ``step`` column (:func:`assign_to_steps`).
    cpu_gaps
        Attributed CPU gaps (:func:`~traceinsight.analysis.cpu_gaps.attribute_cpu_gaps`).
    launch_counts
        GPU activities launched per (rank, step) (:func:`launches_per_step`): a CPU gap that
        grew along with the number of launches is launch overhead even where the trace holds
        no stack to show it.

    Returns
    -------
    list of dict
        ``rank, step, duration_ms, typical_ms, excess_ms, category, category_excess_ms, where,
        cause, evidence, ranges`` (the ranges that grew most, with this step's and the typical
        per-step time, lag and launches).
    """
    targets = which if which is not None else steps.filter(pl.col("anomalous")).select("rank", "step")
    gap_totals = cpu_gaps.group_by("rank", "step", "cause").agg(total=pl.col("duration_ns").sum())
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
        typical = {c: float(normal.get_column(f"{c}_ns").median() or 0) for c in CATEGORIES}
        typical_duration = float(normal.get_column("duration_ns").median() or 0) if normal.height else 0.0
        excess = this["duration_ns"] - typical_duration
        deltas = {c: this[f"{c}_ns"] - typical[c] for c in CATEGORIES}
        category = max(deltas, key=deltas.get)
        ranges = _range_excess(instances, rank, step, set(normal.get_column("step").to_list()))
        where, where_row = _where(ranges, excess, this["label"])
        also = None
        if category in ("cpu_gap", "host_sync") and (
            where_row is None or where_row["excess_ns"] < 0.5 * deltas[category]
        ):
            # No range holds the growth: name the place of the largest gap instead.
            located = _locate_largest_gap(cpu_gaps, instances, rank, step, deltas[category])
            if located:
                also = where_row
                where, where_row = located, None
        cause, gap_evidence = _cause(category, cpu_gaps, gap_totals, rank, step,
                                     set(normal.get_column("step").to_list()))
        launches_note = None
        if launch_counts is not None and category == "cpu_gap":
            counts = launch_counts.filter(pl.col("rank") == rank)
            here = counts.filter(pl.col("step") == step).get_column("launches")
            usual = counts.filter(pl.col("step").is_in(normal.get_column("step").implode())).get_column("launches").median()
            if here.len() and usual and here[0] >= 1.5 * usual:
                launches_note = f"the step launched {here[0]} GPU activities vs {usual:.0f} typically ({here[0] / usual:.1f}x)"
                if cause == "cpu_gap":
                    cause = "cpu_gap.launch_overhead"
        evidence = _evidence(where_row, category, deltas[category], gap_evidence, this, typical_duration)
        if launches_note and launches_note.split(" (")[0] not in evidence:
            evidence += f". {launches_note[0].upper()}{launches_note[1:]}"
        if also is not None:
            evidence += (f". The largest gap lies outside the ranges; of the ranges, {also['name']} grew most: "
                         f"{_ms(also['total_ns'])} vs {_ms(also['typical_ns'])} typical")
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
            "cause": cause,
            "evidence": evidence,
            "ranges": ranges.head(8).to_dicts() if ranges.height else [],
        })
    return results


def launches_per_step(gpu: pl.DataFrame, steps: pl.DataFrame) -> pl.DataFrame:
    """GPU activities launched per (rank, step), by the launch call's time."""
    launched = gpu.filter(pl.col("launch_start_ns").is_not_null()).select("rank", "launch_start_ns")
    if launched.is_empty():
        return pl.DataFrame(schema={"rank": pl.Int32, "step": pl.Int64, "launches": pl.UInt32})
    return (
        assign_to_steps(launched, steps, time_column="launch_start_ns")
        .filter(pl.col("step").is_not_null())
        .group_by("rank", "step")
        .agg(launches=pl.len())
    )


def _range_excess(instances: pl.DataFrame, rank: int, step: int, normal_steps: set[int]) -> pl.DataFrame:
    """Per annotation name: this step's total time against the typical step's, largest growth first."""
    ranked = instances.filter((pl.col("rank") == rank) & pl.col("step").is_not_null())
    if ranked.is_empty():
        return pl.DataFrame()
    per_step = ranked.group_by("name", "step").agg(
        total_ns=pl.col("duration_ns").sum(),
        depth=pl.col("depth").min(),
        launches=pl.col("launches").sum(),
        lag_ns=pl.col("first_gpu_lag_ns").max(),
        count=pl.len(),
    )
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


def _locate_largest_gap(cpu_gaps: pl.DataFrame, instances: pl.DataFrame, rank: int, step: int,
                        category_excess: float) -> str | None:
    """Where the step's largest CPU gap sits: its innermost range, or the ranges around it."""
    gaps = cpu_gaps.filter((pl.col("rank") == rank) & (pl.col("step") == step))
    if gaps.is_empty():
        return None
    gap = gaps.sort("duration_ns", descending=True).row(0, named=True)
    if gap["duration_ns"] < 0.5 * category_excess:
        return None  # many small gaps (launch-bound): no single place holds the growth
    ranges = instances.filter(
        (pl.col("rank") == rank) & (pl.col("step") == step) & ~pl.col("name").str.contains(LIBRARY_RANGES)
    )
    inside = ranges.filter((pl.col("start_ns") <= gap["start_ns"]) & (pl.col("end_ns") >= gap["end_ns"]))
    if inside.height:
        return inside.sort("depth", descending=True).item(0, "name")
    before = ranges.filter(pl.col("end_ns") <= gap["start_ns"]).sort(["end_ns", "depth"], descending=[True, False])
    after = ranges.filter(pl.col("start_ns") >= gap["start_ns"]).sort(["start_ns", "depth"])
    if before.height and after.height:
        return f"step {step} between {before.item(0, 'name')} and {after.item(0, 'name')}"
    if after.height:
        return f"step {step} before {after.item(0, 'name')}"
    if before.height:
        return f"step {step} after {before.item(0, 'name')}"
    return None


def _where(ranges: pl.DataFrame, excess: float, step_label: str) -> tuple[str, dict | None]:
    """The deepest range that holds (nearly) as much of the excess as any range does."""
    if ranges.is_empty() or excess <= 0:
        return step_label, None
    grown = ranges.filter((pl.col("name") != step_label) & (pl.col("excess_ns") > 0))
    if grown.is_empty():
        return step_label, None
    most = grown.get_column("excess_ns").max()
    # A parent range always holds at least its child's excess; prefer the child when it holds
    # at least 80% of what the range that grew most holds.
    best = (
        grown.filter(pl.col("excess_ns") >= 0.8 * most)
        .sort(["depth", "excess_ns"], descending=[True, True])
        .row(0, named=True)
    )
    return best["name"], best


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


def _evidence(where_row: dict | None, category: str, category_excess: float, gap_evidence: str | None,
              this: dict, typical_duration: float) -> str:
    parts = [f"step {this['step']} took {_ms(this['duration_ns'])} vs {_ms(typical_duration)} typical; "
             f"{category} +{_ms(category_excess)}"]
    if where_row is not None:
        text = f"{where_row['name']} took {_ms(where_row['total_ns'])} vs {_ms(where_row['typical_ns'])} typical"
        lag, typical_lag = where_row.get("lag_ns"), where_row.get("typical_lag_ns")
        if lag is not None and typical_lag is not None and lag - typical_lag > 0.25 * max(where_row["excess_ns"], 1):
            text += f"; its first kernel started {_ms(lag)} after it began (typically {_ms(typical_lag)})"
        launches, typical_launches = where_row.get("launches") or 0, where_row.get("typical_launches") or 0
        if typical_launches and launches >= 1.5 * typical_launches:
            text += f"; it launched {launches:.0f} GPU activities vs {typical_launches:.0f} typically ({launches / typical_launches:.1f}x)"
        parts.append(text)
    if gap_evidence:
        parts.append(f"CPU during the gaps, {gap_evidence}")
    elif category == "cpu_gap":
        parts.append("no CPU sample, OS call, Python function or op covers the gap: the trace cannot tell what the host did")
    return ". ".join(parts)


def _gap_cause_in_window(cpu_gaps: pl.DataFrame, rank: int, start: int, end: int) -> tuple[str, str | None]:
    """The CPU-gap cause that covers most of ``[start, end)`` on ``rank``, with its evidence."""
    inside = cpu_gaps.filter(
        (pl.col("rank") == rank) & (pl.col("end_ns") > start) & (pl.col("start_ns") < end)
    ).with_columns(
        overlap=pl.min_horizontal("end_ns", pl.lit(end)) - pl.max_horizontal("start_ns", pl.lit(start))
    )
    if inside.is_empty():
        return "cpu_gap", None
    cause = inside.group_by("cause").agg(t=pl.col("overlap").sum()).sort("t", descending=True).row(0)[0]
    top = inside.filter(pl.col("cause") == cause).sort("overlap", descending=True).row(0, named=True)
    evidence = f"{top['evidence_source']}: {top['evidence']}" if top["evidence"] else None
    return ("cpu_gap" if cause == "unknown" else f"cpu_gap.{cause}"), evidence


def explain_range_instances(instances: pl.DataFrame, cpu_gaps: pl.DataFrame, *, skip_steps: set[tuple[int, int]]) -> list[dict]:
    """Root cause of each anomalous range instance outside the already-explained steps.

    ``instances`` must carry the ``<category>_ns`` columns of their own window
    (:meth:`~traceinsight.analysis.breakdown.Breakdown.window_breakdown`): the category that
    grew most against the median instance of the same name decides the cause.
    """
    columns = [f"{c}_ns" for c in CATEGORIES]
    typical = instances.group_by("rank", "name").agg(
        [pl.col(c).median().alias(f"typical_{c}") for c in columns]
    )
    flagged = instances.filter(pl.col("anomalous")).join(typical, on=["rank", "name"], how="left")
    out = []
    for row in flagged.sort("duration_ns", descending=True).iter_rows(named=True):
        if row["step"] is None or (row["rank"], row["step"]) in skip_steps:
            continue
        deltas = {c: row[f"{c}_ns"] - (row[f"typical_{c}_ns"] or 0) for c in CATEGORIES}
        category = max(deltas, key=deltas.get)
        gap_evidence = None
        if category == "cpu_gap":
            cause, gap_evidence = _gap_cause_in_window(cpu_gaps, row["rank"], row["start_ns"], row["end_ns"])
        elif category == "idle":
            cause = "unknown"
        else:
            cause = category
        lag = row["first_gpu_lag_ns"]
        text = (
            f"{row['name']} took {_ms(row['duration_ns'])} vs {_ms(row['typical_ns'])} typical "
            f"in step {row['step']}; {category} +{_ms(deltas[category])} inside it"
        )
        if lag is not None:
            text += f"; its first kernel started {_ms(lag)} after it began"
        if gap_evidence:
            text += f". CPU during the gaps, {gap_evidence}"
        out.append({
            "kind": "range",
            "rank": row["rank"],
            "step": row["step"],
            "excess_ms": round((row["duration_ns"] - row["typical_ns"]) / 1e6, 3),
            "where": row["name"],
            "category": category,
            "cause": cause,
            "evidence": text,
            "start_ns": row["start_ns"],
        })
    return out
