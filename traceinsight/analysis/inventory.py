"""What is in a trace: the summary behind ``traceinsight info``."""

from __future__ import annotations

import polars as pl

from traceinsight.analysis.analyzers.steps import find_steps
from traceinsight.analysis.analyzers.top_kernels import top_kernels
from traceinsight.model import INTERVAL_KINDS, TraceModel


def describe(model: TraceModel, *, path: str, fmt: str, step_pattern: str | None = None,
             show_host: bool = False) -> dict:
    """A JSON-ready description of one file's model (see ``traceinsight info --json``)."""
    intervals = model.intervals
    counts = {kind: 0 for kind in INTERVAL_KINDS}
    for kind, n in intervals.group_by("kind").agg(n=pl.len()).iter_rows():
        counts[kind] = n
    span_ms = 0.0
    if intervals.height:
        span_ms = (intervals["end_ns"].max() - intervals["start_ns"].min()) / 1e6
    table = find_steps(model, pattern=step_pattern)
    steps = table.steps
    ranks = []
    for row in model.ranks.sort("rank").iter_rows(named=True):
        entry = {
            "rank": row["rank"],
            "rank_source": row["rank_source"],
            "pid": row["pid"],
            "gpus": row["gpu_names"] or [],
            "devices": row["devices"] or [],
            "world_size": row["world_size"],
            "clock_origin_ns": row["clock_origin_ns"],
        }
        if show_host:
            entry["hostname"] = row["hostname"]
        ranks.append(entry)
    tool_versions = [v for v in model.ranks.get_column("tool_version").unique().to_list() if v]
    return {
        "path": path,
        "format": fmt,
        "tool_version": tool_versions[0] if tool_versions else None,
        "ranks": [r["rank"] for r in ranks],
        "rank_details": ranks,
        "gpus": sorted({g for r in ranks for g in r["gpus"]}),
        "kernels": counts["kernel"],
        "span_ms": round(span_ms, 3),
        "counts": counts,
        "samples": model.samples.height,
        "steps": {
            "source": table.source,
            "count": steps.height if table.source != "whole trace" else 0,
            "numbers": sorted(set(steps.get_column("step").to_list())) if table.source != "whole trace" else [],
            "labels": steps.get_column("label").unique(maintain_order=True).head(3).to_list()
            if table.source != "whole trace" else [],
        },
        "top_kernels": [
            {"rank": r, "name": n, "count": c, "total_ms": round(t, 3), "share": round(s, 4)}
            for r, n, c, t, _, s in top_kernels(model, limit=5).iter_rows()
        ],
        "warnings": list(model.warnings),
    }
