"""CPU-gap time per (rank, step, cause), with the heaviest evidence of each: the totals
behind the findings' ``cpu_gap_causes``."""

from __future__ import annotations

import polars as pl

from traceinsight.analysis.descriptor import Analysis

__all__ = ["summarize_causes"]


def summarize_causes(attributed: pl.DataFrame) -> pl.DataFrame:
    """Total CPU-gap time per (rank, step, cause), with the heaviest evidence of each.

    Reads the attributed CPU gaps; returns ``rank, step, cause, gap_ns, gaps, evidence``."""
    if attributed.is_empty():
        return pl.DataFrame(schema={"rank": pl.Int32, "step": pl.Int64, "cause": pl.String, "gap_ns": pl.Int64, "gaps": pl.UInt32, "evidence": pl.String})
    return (
        attributed.sort("duration_ns", descending=True)
        .group_by("rank", "step", "cause", maintain_order=True)
        .agg(
            gap_ns=pl.col("duration_ns").sum(),
            gaps=pl.len(),
            evidence=pl.col("evidence").drop_nulls().first(),
        )
        .sort("rank", "step", "gap_ns", descending=[False, False, True])
    )


ANALYSIS = Analysis(name="cause totals", phase="rank 3", function=summarize_causes, reads=("cpu_gaps",),
                    returns="CPU-gap time per (step, cause)", field="cpu_gap_causes")
