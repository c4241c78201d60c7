"""The time each step is judged on (``judged_ns``): its duration, except for the last step of
a rank. That step has no next step to cap its window: it holds the drain of the GPU queue
the host filled ahead of time. It is judged on its CPU-side marker and the GPU time of the
work launched inside it, not on its window.
"""

from __future__ import annotations

import polars as pl

from traceinsight.analysis.descriptor import Analysis

__all__ = ["judged_durations"]


def judged_durations(steps: pl.DataFrame, gpu: pl.DataFrame | None) -> pl.DataFrame:
    """Add ``launched_gpu_ns`` (busy time of the GPU work launched inside each step's marker)
    and ``judged_ns``: the step's duration, except for the last step of each rank, which is
    judged on the longer of its marker and its launched GPU work (never more than its window).

    Reads the step table and the GPU activities; returns the step table with the two columns.
    """
    if "duration_ns" not in steps.columns:  # no breakdown (nothing to break down)
        steps = steps.with_columns(duration_ns=pl.col("end_ns") - pl.col("start_ns"))
    steps = steps.with_columns(launched_gpu_ns=pl.lit(0, pl.Int64))
    if gpu is not None and gpu.height and steps.height:
        launched = gpu.filter(pl.col("launch_start_ns").is_not_null()).select(
            "rank", "start_ns", "end_ns", "launch_start_ns")
        markers = steps.select("rank", "step", pl.col("start_ns").alias("_m_start"),
                               pl.col("marker_end_ns").alias("_m_end")).sort("_m_start")
        inside = (
            launched.sort("launch_start_ns")
            .join_asof(markers, left_on="launch_start_ns", right_on="_m_start", by="rank",
                       strategy="backward", check_sortedness=False)
            .filter(pl.col("launch_start_ns") <= pl.col("_m_end"))
            .sort("rank", "step", "start_ns")
        )
        # Busy time is the length of the union of the activities (streams overlap).
        busy = (
            inside.with_columns(_reach=pl.col("end_ns").cum_max().shift(1).over("rank", "step"))
            .with_columns(_block=(pl.col("_reach").is_null() | (pl.col("start_ns") > pl.col("_reach")))
                          .cum_sum().over("rank", "step"))
            .group_by("rank", "step", "_block")
            .agg(length=pl.col("end_ns").max() - pl.col("start_ns").min())
            .group_by("rank", "step")
            .agg(launched_gpu_ns=pl.col("length").sum().cast(pl.Int64))
        )
        steps = steps.drop("launched_gpu_ns").join(busy, on=["rank", "step"], how="left").with_columns(
            pl.col("launched_gpu_ns").fill_null(0))
    last = pl.col("start_ns") == pl.col("start_ns").max().over("rank")
    marker = pl.col("marker_end_ns") - pl.col("start_ns")
    return steps.with_columns(
        judged_ns=pl.when(last & (pl.len().over("rank") > 1))
        .then(pl.min_horizontal("duration_ns", pl.max_horizontal(marker, "launched_gpu_ns")))
        .otherwise(pl.col("duration_ns"))
    )


ANALYSIS = Analysis(name="judged durations", phase="rank 2", function=judged_durations, reads=("step breakdown", "gpu"),
                    returns="the time each step is judged on")
