"""GPU time of the attention and expert work per (step, rank): the per-rank part of the
load imbalance model (:mod:`~traceinsight.analysis.analyzers.load_imbalance`). Annotation
names are told apart by :func:`~traceinsight.analysis.classify.phase_expr`."""

from __future__ import annotations

import polars as pl

from traceinsight.analysis.classify import phase_expr, phase_word_expr
from traceinsight.analysis.descriptor import Analysis
from traceinsight.analysis.places import LIBRARY_RANGES, _innermost_names
from traceinsight.analysis.step_table import assign_to_steps
from traceinsight.model import TraceModel

__all__ = ["compute_phase_times"]


def compute_phase_times(model: TraceModel, gpu: pl.DataFrame, steps: pl.DataFrame, *,
                        step_labels: list[str]) -> pl.DataFrame:
    """GPU time of the attention and expert work per (step, rank, phase) (per-rank part of
    :func:`imbalance_from`).

    Every compute kernel counts once: it belongs to the innermost attention or expert
    annotation around its launch, however the annotations nest (``FlashAttnFunc`` around
    ``flash_attn::_flash_attn_forward`` is one attention, not two).

    Reads the model's annotations, the GPU activities and the steps; returns ``step, rank,
    phase, t``."""
    empty = pl.DataFrame(schema={"step": pl.Int64, "rank": pl.Int32, "phase": pl.String, "t": pl.Int64})
    if gpu.is_empty() or steps.is_empty():
        return empty
    annotations = model.intervals.lazy().filter(
        (pl.col("kind") == "annotation") & ~pl.col("name").is_in(step_labels)
        & ~pl.col("name").str.contains(LIBRARY_RANGES)
    ).select("rank", "pid", "tid", "depth", "start_ns", "end_ns", "name").collect()
    if annotations.is_empty():
        return empty
    # One search for every phase's words over all names first: an emit_nvtx export holds
    # 400k distinct names (the op's sequence number is in each), few of them with a phase
    # word; only those are told apart, each distinct name once.
    annotations = annotations.filter(phase_word_expr())
    classes = annotations.select(pl.col("name").unique()).with_columns(phase=phase_expr()).filter(
        pl.col("phase").is_in(["attention", "experts"]))
    annotations = annotations.join(classes.select("name"), on="name", how="semi")
    kernels = gpu.filter(
        (pl.col("kind") == "kernel") & ~pl.col("is_comm") & pl.col("launch_start_ns").is_not_null()
    ).select("rank", pl.col("launch_pid").alias("pid"), pl.col("launch_tid").alias("tid"),
             pl.col("launch_start_ns").alias("t"), gpu_ns=pl.col("end_ns") - pl.col("start_ns"))
    if annotations.is_empty() or kernels.is_empty():
        return empty
    kernels = (
        kernels.with_columns(name=pl.Series(_innermost_names(annotations, kernels), dtype=pl.String))
        .join(classes, on="name", how="left", maintain_order="left")
        .drop("name")
        .filter(pl.col("phase").is_not_null())
    )
    if kernels.is_empty():
        return empty
    return (
        assign_to_steps(kernels, steps, time_column="t")
        .filter(pl.col("step").is_not_null())
        .group_by("step", "rank", "phase").agg(t=pl.col("gpu_ns").sum())
        .select(pl.col("step").cast(pl.Int64), pl.col("rank").cast(pl.Int32), "phase", pl.col("t").cast(pl.Int64))
        .sort("step", "rank", "phase")
    )


ANALYSIS = Analysis(name="compute phase times", phase="rank 3", function=compute_phase_times,
                    reads=("intervals", "gpu", "steps"), returns="GPU time of attention and experts per (step, rank)")
