"""Statistics of each annotation name on each rank: how many instances, how long
(percentiles), how late their first GPU work and how much GPU time they launched (the
``ranges`` of the findings)."""

from __future__ import annotations

import polars as pl

from traceinsight.analysis.descriptor import Analysis

__all__ = ["range_statistics"]


def range_statistics(instances: pl.DataFrame) -> pl.DataFrame:
    """Per (rank, name): count and duration percentiles, lag and GPU time.

    Reads the range instances; returns one row per (rank, name).

    Returns
    -------
    polars.DataFrame
        ``rank, name, count, total_ms, mean_ms, p50_ms, p90_ms, p99_ms, max_ms, lag_p50_ms,
        lag_max_ms, gpu_ms_mean, launches_mean``, sorted by total time.
    """
    ms = 1e-6
    frame = instances.select("rank", "name", "duration_ns", "first_gpu_lag_ns", "gpu_ns", "launches")
    # emit_nvtx names every range apart (`seq = N, op_id = M`): most names then have one
    # instance, whose statistics are its own values. Only names seen more than once go
    # through the group-by's percentiles (the same values either way).
    single = frame.select((pl.len().over("rank", "name") == 1).alias("single")).to_series()
    many = (
        frame.filter(~single).group_by("rank", "name")
        .agg(
            count=pl.len(),
            total_ms=pl.col("duration_ns").sum() * ms,
            mean_ms=pl.col("duration_ns").mean() * ms,
            p50_ms=pl.col("duration_ns").quantile(0.5, interpolation="linear") * ms,
            p90_ms=pl.col("duration_ns").quantile(0.9, interpolation="linear") * ms,
            p99_ms=pl.col("duration_ns").quantile(0.99, interpolation="linear") * ms,
            max_ms=pl.col("duration_ns").max() * ms,
            lag_p50_ms=pl.col("first_gpu_lag_ns").quantile(0.5, interpolation="linear") * ms,
            lag_max_ms=pl.col("first_gpu_lag_ns").max() * ms,
            gpu_ms_mean=pl.col("gpu_ns").mean() * ms,
            launches_mean=pl.col("launches").mean(),
        )
    )
    duration = pl.col("duration_ns").cast(pl.Float64) * ms
    lag = pl.col("first_gpu_lag_ns").cast(pl.Float64) * ms
    one = frame.filter(single).select(
        "rank", "name", count=pl.lit(1, pl.UInt32),
        total_ms=pl.col("duration_ns") * ms, mean_ms=duration, p50_ms=duration, p90_ms=duration,
        p99_ms=duration, max_ms=pl.col("duration_ns") * ms, lag_p50_ms=lag,
        lag_max_ms=pl.col("first_gpu_lag_ns") * ms, gpu_ms_mean=pl.col("gpu_ns").cast(pl.Float64) * ms,
        launches_mean=pl.col("launches").cast(pl.Float64),
    )
    return (
        pl.concat([many, one.cast(many.schema)])
        .sort(["total_ms", "rank", "name"], descending=[True, False, False])
    )


ANALYSIS = Analysis(name="range statistics", phase="rank 3", function=range_statistics, reads=("range_instances",),
                    returns="statistics per range name", field="ranges")
