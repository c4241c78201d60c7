"""GPU activities launched per step, counted by the time of their launch call: a step
that launched many more than usual tells the step findings of launch overhead."""

from __future__ import annotations

import polars as pl

from traceinsight.analysis.descriptor import Analysis
from traceinsight.analysis.step_table import assign_to_steps

__all__ = ["launches_per_step"]


def launches_per_step(gpu: pl.DataFrame, steps: pl.DataFrame) -> pl.DataFrame:
    """GPU activities launched per (rank, step), by the launch call's time.

    Reads the GPU activities and the steps; returns ``rank, step, launches``."""
    launched = gpu.filter(pl.col("launch_start_ns").is_not_null()).select("rank", "launch_start_ns")
    if launched.is_empty():
        return pl.DataFrame(schema={"rank": pl.Int32, "step": pl.Int64, "launches": pl.UInt32})
    return (
        assign_to_steps(launched, steps, time_column="launch_start_ns")
        .filter(pl.col("step").is_not_null())
        .group_by("rank", "step")
        .agg(launches=pl.len())
        .sort("rank", "step")  # the same rows in the same order on every run
    )


ANALYSIS = Analysis(name="launch counts", phase="rank 3", function=launches_per_step, reads=("gpu", "steps"),
                    returns="launches per step", field="launch_counts")
