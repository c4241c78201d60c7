"""The kernels that took the most GPU time on each rank (the findings' ``top_kernels`` and
``traceinsight info``)."""

from __future__ import annotations

import polars as pl

from traceinsight.analysis.descriptor import Analysis
from traceinsight.model import TraceModel

__all__ = ["top_kernels"]


def top_kernels(model: TraceModel, *, limit: int = 10) -> pl.DataFrame:
    """Kernels by total GPU time per rank: ``rank, name, count, total_ms, mean_us, share``.

    Reads the model's kernels; returns that frame."""
    kernels = (
        model.intervals.lazy().filter(pl.col("kind") == "kernel").select("rank", "name", "start_ns", "end_ns").collect()
    )
    if kernels.is_empty():
        return pl.DataFrame(schema={"rank": pl.Int32, "name": pl.String, "count": pl.UInt32,
                                    "total_ms": pl.Float64, "mean_us": pl.Float64, "share": pl.Float64})
    return (
        kernels.with_columns(dur=pl.col("end_ns") - pl.col("start_ns"))
        .group_by("rank", "name")
        .agg(count=pl.len(), total_ns=pl.col("dur").sum())
        .with_columns(
            total_ms=pl.col("total_ns") / 1e6,
            mean_us=pl.col("total_ns") / pl.col("count") / 1e3,
            share=pl.col("total_ns") / pl.col("total_ns").sum().over("rank"),
        )
        .sort(["rank", "total_ns", "name"], descending=[False, True, False])
        .group_by("rank", maintain_order=True)
        .head(limit)
        .drop("total_ns")
    )


ANALYSIS = Analysis(name="top kernels", phase="rank 3", function=top_kernels, reads=("intervals",),
                    returns="kernels by total time", field="top_kernels")
