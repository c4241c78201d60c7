"""Why each anomalous range instance was long.

Each anomalous range instance (inside flagged steps too) is a finding of its own. A range
finding whose excess lies within a flagged range instance nested inside it is folded into
that deepest one; a range that only waited for GPU work launched elsewhere is not blamed
(the step finding places that work where it was launched). Causes:
:data:`~traceinsight.analysis.categories.CAUSES`.
"""

from __future__ import annotations

import polars as pl

from traceinsight.analysis.categories import CATEGORIES
from traceinsight.analysis.descriptor import Analysis
from traceinsight.analysis.places import Places, _cause_name, _ms, join_path

__all__ = ["explain_range_instances"]


def _gap_cause_in_window(cpu_gaps: pl.DataFrame, rank: int, start: int, end: int, *,
                         tid: int | None = None) -> tuple[str, str | None]:
    """The CPU-gap cause that covers most of ``[start, end)`` on ``rank`` (on thread ``tid``,
    whose launches the gaps waited for, where given), with its evidence."""
    inside = cpu_gaps.filter(
        (pl.col("rank") == rank) & (pl.col("end_ns") > start) & (pl.col("start_ns") < end)
    )
    if tid is not None:
        inside = inside.filter(pl.col("tid") == tid)
    inside = inside.with_columns(
        overlap=pl.min_horizontal("end_ns", pl.lit(end)) - pl.max_horizontal("start_ns", pl.lit(start))
    )
    if inside.is_empty():
        return "cpu_gap", None
    cause = inside.group_by("cause").agg(t=pl.col("overlap").sum()).sort(["t", "cause"], descending=[True, False]).row(0)[0]
    top = inside.filter(pl.col("cause") == cause).sort("overlap", descending=True).row(0, named=True)
    evidence = f"{top['evidence_source']}: {top['evidence']}" if top["evidence"] else None
    return _cause_name(cause), evidence


def _fold_nested(rows: list[dict]) -> list[dict]:
    """Drop a flagged range whose excess lies mostly in a flagged range nested inside it on
    the same thread: one stall is reported once, at the deepest range that holds it."""
    kept = []
    for outer in rows:
        inner = [
            r for r in rows
            if r is not outer and r["rank"] == outer["rank"] and r["tid"] == outer["tid"]
            and r["start_ns"] >= outer["start_ns"] and r["end_ns"] <= outer["end_ns"]
            and (r["start_ns"], r["end_ns"]) != (outer["start_ns"], outer["end_ns"])
        ]
        # Nested flagged ranges do not overlap one another only at one level; the largest
        # inner excess and their sum bound what the inner ranges explain.
        explained = max(max((r["excess_ns"] for r in inner), default=0),
                        sum(r["excess_ns"] for r in inner if not any(
                            o is not r and o["start_ns"] <= r["start_ns"] and r["end_ns"] <= o["end_ns"] for o in inner)))
        if explained < 0.5 * outer["excess_ns"]:
            kept.append(outer)
    return kept


#: The least share of the rank's median step a range finding must cost (with several steps).
MIN_STEP_SHARE = 0.03
#: Range findings listed per (rank, step), largest first.
MAX_RANGE_FINDINGS_PER_STEP = 5


def explain_range_instances(instances: pl.DataFrame, cpu_gaps: pl.DataFrame, *,
                            steps: pl.DataFrame | None = None, places: Places | None = None,
                            max_per_step: int = MAX_RANGE_FINDINGS_PER_STEP) -> list[dict]:
    """Each anomalous range instance as its own finding (inside flagged steps too).

    ``instances`` must carry the ``<category>_ns`` columns of their own window
    (:meth:`~traceinsight.analysis.breakdown_result.Breakdown.window_breakdown`): the category that
    grew most against the median instance of the same name decides the cause. Left out: a
    range on a thread that never launches GPU work (a loader or metrics thread cannot hold
    up the GPU), and a range that only *waited* for GPU work launched elsewhere (its window
    grew on the GPU side while its own launched GPU time did not): the step finding places
    that work where it was launched. Nested flagged ranges of one stall are folded into the
    deepest (:func:`_fold_nested`). At most ``max_per_step`` per (rank, step) are listed, the
    largest; ``others_in_step`` counts the anomalous instances of the step left out.

    Reads the flagged range instances, the CPU gaps and the steps; returns one record per
    finding (:data:`~traceinsight.analysis.schemas.ANOMALY_SCHEMA`, ``kind == "range"``).
    """
    flagged = instances.filter(pl.col("anomalous"))
    if flagged.is_empty():
        return []
    # The threads that launched anything: the instances that launched, their threads once
    # (grouping every instance by thread would hash all of their keys).
    launching = instances.select("rank", "pid", "tid", "launches").filter(pl.col("launches") > 0) \
        .select("rank", "pid", "tid").unique()
    flagged = flagged.join(launching, on=["rank", "pid", "tid"], how="semi")
    columns = [f"{c}_ns" for c in CATEGORIES]
    typical = instances.group_by("rank", "name").agg(
        *[pl.col(c).median().alias(f"typical_{c}") for c in columns],
        typical_gpu_ns=pl.col("gpu_ns").median(),
        typical_lag_ns=pl.col("first_gpu_lag_ns").median(),
    )
    labels, floor = {}, {}
    if steps is not None and steps.height:
        labels = {(r, s): label for r, s, label in steps.select("rank", "step", "label").iter_rows()}
        # A place worth naming costs its step a noticeable share: a 1 ms stall in a 1 s step
        # is noise, in a 10 ms step it is not.
        if steps.height > 1:
            floor = {r: MIN_STEP_SHARE * (d or 0) for r, d in
                     steps.group_by("rank").agg(pl.col("duration_ns").median()).iter_rows()}
    rows = []
    for row in flagged.join(typical, on=["rank", "name"], how="left").sort("duration_ns", descending=True).iter_rows(named=True):
        row["excess_ns"] = row["duration_ns"] - row["typical_ns"]
        if row["excess_ns"] < floor.get(row["rank"], 0):
            continue
        deltas = {c: row[f"{c}_ns"] - (row[f"typical_{c}_ns"] or 0) for c in CATEGORIES}
        category = max(deltas, key=deltas.get)
        own_gpu_growth = (row["gpu_ns"] or 0) - (row["typical_gpu_ns"] or 0)
        if category in ("gpu_compute", "gpu_memory", "communication", "idle") and own_gpu_growth < 0.5 * row["excess_ns"]:
            continue  # it waited for work launched before it
        row["_deltas"], row["_category"] = deltas, category
        rows.append(row)
    # The largest few of a step are findings; a step with many more (a flood of long small
    # ops) says how many it left out rather than listing them all.
    kept, left_out = [], {}
    for row in sorted(_fold_nested(rows), key=lambda r: -r["excess_ns"]):
        key = (row["rank"], row["step"])
        if sum(1 for k in kept if (k["rank"], k["step"]) == key) >= max_per_step:
            left_out[key] = left_out.get(key, 0) + 1
        else:
            kept.append(row)
    out = []
    for row in kept:
        deltas, category = row["_deltas"], row["_category"]
        gap_evidence = None
        if category == "cpu_gap":
            cause, gap_evidence = _gap_cause_in_window(cpu_gaps, row["rank"], row["start_ns"], row["end_ns"],
                                                       tid=row["tid"])
        elif category == "idle":
            cause = "unknown"
        else:
            cause = category
        path = places.path_of(row) if places is not None else [row["name"]]
        label = labels.get((row["rank"], row["step"]))
        where = join_path([label, *path]) if label and label not in path else join_path(path)
        lag = row["first_gpu_lag_ns"]
        text = (f"{row['name']} took {_ms(row['duration_ns'])} vs {_ms(row['typical_ns'])} typical"
                + (f" in step {row['step']}" if row["step"] is not None else "")
                + f"; {category} +{_ms(deltas[category])} inside it")
        if lag is not None and lag - (row["typical_lag_ns"] or 0) > 0.25 * max(row["excess_ns"], 1):
            text += f"; its first GPU work started {_ms(lag)} after it began (typically {_ms(row['typical_lag_ns'])})"
        if gap_evidence:
            text += f". CPU during the gaps, {gap_evidence}"
        elif category == "cpu_gap":
            text += ". No CPU sample, OS call, Python function or op covers the gaps: the trace cannot tell what the host did"
        out.append({
            "kind": "range",
            "rank": row["rank"],
            "step": row["step"],
            "excess_ms": round(row["excess_ns"] / 1e6, 3),
            "where": where,
            "name": row["name"],
            "duration_ms": round(row["duration_ns"] / 1e6, 3),
            "typical_ms": round(row["typical_ns"] / 1e6, 3),
            "lag_ms": None if lag is None else round(lag / 1e6, 3),
            "category": category,
            "cause": cause,
            "evidence": text,
            "start_ns": row["start_ns"],
            "others_in_step": left_out.get((row["rank"], row["step"]), 0),
        })
    return out


ANALYSIS = Analysis(name="range findings", phase="rank 3", function=explain_range_instances,
                    reads=("range_instances", "cpu_gaps", "steps"), returns="why each flagged range instance was long",
                    field="anomalies")
