"""The post-mortem of one step (``traceinsight explain --step N``).

Puts the step beside the typical step of its rank (the median of each quantity over the
rank's unflagged steps): categories, ranges, kernels, the CPU gaps with their evidence, and,
for the range that grew most, the lag between its start and its first kernel and what the
CPU did in that lag.
"""

from __future__ import annotations

import polars as pl

from traceinsight.analysis.analyzers.step_findings import explain_steps
from traceinsight.analysis.categories import CATEGORIES
from traceinsight.analysis.collectives import step_straggler, who_waited_for_whom
from traceinsight.analysis.findings import Findings
from traceinsight.analysis.places import Places
from traceinsight.analysis.step_table import assign_to_steps
from traceinsight.errors import TraceInputError


def _kernel_comparison(gpu: pl.DataFrame, steps: pl.DataFrame, rank: int, step: int,
                       normal_steps: list[int], *, limit: int = 10) -> list[dict]:
    """Kernels of this step (attributed by launch time) against their typical per-step figures."""
    launched = gpu.filter((pl.col("rank") == rank) & pl.col("launch_start_ns").is_not_null())
    if launched.is_empty():
        return []
    launched = assign_to_steps(
        launched.select("rank", "name", "start_ns", "end_ns", "launch_start_ns"),
        steps.filter(pl.col("rank") == rank), time_column="launch_start_ns",
    )
    per_step = launched.group_by("name", "step").agg(
        count=pl.len(), total_ns=(pl.col("end_ns") - pl.col("start_ns")).sum()
    )
    this = per_step.filter(pl.col("step") == step)
    typical = (
        per_step.filter(pl.col("step").is_in(normal_steps))
        .group_by("name")
        .agg(typical_count=pl.col("count").sum() / max(len(normal_steps), 1),
             typical_ns=pl.col("total_ns").sum() / max(len(normal_steps), 1))
    )
    # Step-to-step noise of each kernel's time: 3 robust sigmas (1.4826 MAD) over the normal
    # steps, a step without the kernel counting 0; a change must also reach 5 % and 20 µs.
    grid = pl.DataFrame({"step": normal_steps}, schema={"step": per_step.schema["step"]}).join(
        per_step.select("name").unique(), how="cross")
    spread = (
        grid.join(per_step.select("name", "step", "total_ns"), on=["name", "step"], how="left")
        .with_columns(pl.col("total_ns").fill_null(0))
        .group_by("name").agg(median_ns=pl.col("total_ns").median(),
                              noise_ns=3 * 1.4826 * (pl.col("total_ns") - pl.col("total_ns").median()).abs().median())
    )
    table = (
        this.join(typical, on="name", how="full", coalesce=True)
        .join(spread, on="name", how="left")
        .with_columns(pl.col("count", "total_ns", "typical_count", "typical_ns", "noise_ns").fill_null(0))
        .with_columns(excess_ns=pl.col("total_ns") - pl.col("typical_ns"),
                      new=(pl.col("typical_count") == 0) & (pl.col("count") > 0),
                      missing=(pl.col("count") == 0) & (pl.col("typical_count") >= 1))
        # against the median step (the mean can sit between two common values)
        .with_columns(_off=(pl.col("total_ns") - pl.col("median_ns").fill_null(0)).abs())
        .with_columns(beyond_noise=(pl.col("_off") > pl.col("noise_ns"))
                      & (pl.col("_off") >= 0.05 * pl.col("median_ns").fill_null(0))
                      & (pl.col("_off") >= 20_000) & (pl.col("excess_ns").abs() >= 20_000))
        .sort("beyond_noise", pl.col("excess_ns").abs(), descending=True)
        .head(limit)
    )
    return [
        {"name": r["name"], "count": int(r["count"]), "typical_count": round(float(r["typical_count"]), 1),
         "ms": round(r["total_ns"] / 1e6, 3), "typical_ms": round(r["typical_ns"] / 1e6, 3),
         "excess_ms": round(r["excess_ns"] / 1e6, 3), "new": bool(r["new"]), "missing": bool(r["missing"]),
         "noise_ms": round(r["noise_ns"] / 1e6, 3), "beyond_noise": bool(r["beyond_noise"])}
        for r in table.iter_rows(named=True)
    ]


def _kept_places(findings: Findings) -> Places | None:
    """The places the analysis built, where it kept them (else ``explain_steps`` builds them)."""
    if not findings.place_cpu.width:
        return None
    return Places.from_frames(findings.steps, findings.range_instances, findings.gpu,
                              place_cpu=findings.place_cpu, place_gpu=findings.place_gpu,
                              place_tree=findings.place_tree)


def step_postmortem(findings: Findings, *, step: int, rank: int | None = None) -> dict:
    """Everything about one step, against its rank's typical step.

    Parameters
    ----------
    findings
        From :func:`~traceinsight.analysis.pipeline.analyze`.
    step
        The step number (the integer in its marker).
    rank
        The rank; by default the step's straggler (the rank the others waited for longest),
        else the rank where the step is slowest.

    Raises
    ------
    TraceInputError
        No such step (or rank).
    """
    steps = findings.steps
    chosen_as_straggler = rank is None and (rank := step_straggler(findings.collectives, step)) is not None
    if chosen_as_straggler and steps.filter((pl.col("step") == step) & (pl.col("rank") == rank)).is_empty():
        rank, chosen_as_straggler = None, False
    candidates = steps.filter(pl.col("step") == step)
    if rank is not None:
        candidates = candidates.filter(pl.col("rank") == rank)
    if candidates.is_empty():
        known = steps.get_column("step").unique().sort().to_list()
        shown = ", ".join(str(s) for s in known[:12]) + (" ..." if len(known) > 12 else "")
        where = f" on rank {rank}" if rank is not None else ""
        raise TraceInputError(f"no step {step}{where}; steps found: {shown or 'none'}")
    row = candidates.sort("duration_ns", descending=True).row(0, named=True)
    rank = row["rank"]
    rank_steps = steps.filter(pl.col("rank") == rank)
    normal = rank_steps.filter(~pl.col("anomalous") & (pl.col("step") != step))
    normal_steps = normal.get_column("step").to_list()
    explanation = explain_steps(steps, findings.range_instances, findings.cpu_gaps,
                                which=pl.DataFrame({"rank": [rank], "step": [step]},
                                                   schema={"rank": pl.Int32, "step": pl.Int64}),
                                launch_counts=findings.launch_counts, gpu=findings.gpu,
                                sync_pieces=findings.sync_gaps if findings.sync_gaps.width else None,
                                places=_kept_places(findings))[0]
    categories = [
        {"category": c, "ms": round(row[f"{c}_ns"] / 1e6, 3),
         "typical_ms": round(float(normal.get_column(f"{c}_ns").median() or 0) / 1e6, 3)}
        for c in CATEGORIES
    ]
    gaps = (
        findings.cpu_gaps.filter((pl.col("rank") == rank) & (pl.col("step") == step))
        .sort("duration_ns", descending=True)
        .head(8)
    )
    gap_rows = [
        {"offset_ms": round((g["start_ns"] - row["start_ns"]) / 1e6, 3), "ms": round(g["duration_ns"] / 1e6, 3),
         "cause": g["cause"], "evidence": g["evidence"], "source": g["evidence_source"],
         "before": g["next_name"]}
        for g in gaps.iter_rows(named=True)
    ]
    lag = None
    where = explanation["where"]
    range_name = explanation.get("range")
    instances = findings.range_instances.filter(
        (pl.col("rank") == rank) & (pl.col("step") == step) & (pl.col("name") == (range_name or ""))
    ).sort("duration_ns", descending=True)
    if instances.height:
        inst = instances.row(0, named=True)
        if inst["first_gpu_lag_ns"] is not None:
            lag_start, lag_end = inst["start_ns"], inst["first_gpu_start_ns"]
            in_lag = findings.cpu_gaps.filter(
                (pl.col("rank") == rank) & (pl.col("end_ns") > lag_start) & (pl.col("start_ns") < lag_end)
            ).sort("duration_ns", descending=True)
            lag = {
                "range": range_name,
                "lag_ms": round(inst["first_gpu_lag_ns"] / 1e6, 3),
                "range_ms": round(inst["duration_ns"] / 1e6, 3),
                "cpu_in_lag": [
                    {"ms": round(g["duration_ns"] / 1e6, 3), "cause": g["cause"], "evidence": g["evidence"]}
                    for g in in_lag.head(3).iter_rows(named=True)
                ],
            }
    return {
        "rank": rank,
        "step": step,
        "label": row["label"],
        "anomalous": bool(row["anomalous"]),
        "duration_ms": round(row["duration_ns"] / 1e6, 3),
        "typical_ms": explanation["typical_ms"],
        "excess_ms": explanation["excess_ms"],
        "where": where,
        "cause": explanation["cause"],
        "narrative": explanation["evidence"],
        "categories": categories,
        "ranges": [
            {"name": r["name"], "ms": round(r["total_ns"] / 1e6, 3), "typical_ms": round(r["typical_ns"] / 1e6, 3),
             "excess_ms": round(r["excess_ns"] / 1e6, 3), "launches": r["launches"],
             "typical_launches": r["typical_launches"],
             "lag_ms": None if r["lag_ns"] is None else round(r["lag_ns"] / 1e6, 3)}
            for r in explanation["ranges"]
        ],
        "kernels": _kernel_comparison(findings.gpu, steps, rank, step, normal_steps),
        "cpu_gaps": gap_rows,
        "range_lag": lag,
        # Multi-rank: who waited for whom at each collective of the step (empty on one rank).
        "rank_chosen_as": "straggler" if chosen_as_straggler else None,
        "waits": who_waited_for_whom(findings.collectives, findings.stragglers, findings.imbalance, step),
    }
