"""The GPU side of a rank: its kernels, copies and memsets, each with the launch call that
put it on the GPU (through the correlation id) and whether it is a communication kernel
(:data:`~traceinsight.analysis.classify.DEFAULT_COMM_PATTERNS`)."""

from __future__ import annotations

import polars as pl

from traceinsight.analysis.classify import DEFAULT_COMM_PATTERNS, comm_kernel_expr
from traceinsight.analysis.descriptor import Analysis
from traceinsight.model import TraceModel, compact_nulls

__all__ = ["gpu_activities"]


GPU_ACTIVITY_KINDS = ("kernel", "memcpy", "memset")


def gpu_activities(
    model: TraceModel, *, comm_patterns: tuple[str, ...] = DEFAULT_COMM_PATTERNS
) -> pl.DataFrame:
    """GPU kernels, copies and memsets with their launch call attached.

    Columns added: ``is_comm``, ``launch_start_ns``, ``launch_end_ns``, ``launch_pid``,
    ``launch_tid``, ``launch_name``.

    Reads the model's intervals; returns one row per GPU activity.
    """
    intervals = model.intervals
    gpu = intervals.filter(pl.col("kind").is_in(GPU_ACTIVITY_KINDS))
    # The name regexes run once per distinct (name, signature), not once per launch: a
    # long templated signature times 100k launches would otherwise take minutes.
    names = (
        gpu.filter(pl.col("kind") == "kernel")
        .select("name", "detail", comm_op=pl.lit(None, pl.String))
        .unique()
        .with_columns(_comm_name=comm_kernel_expr(comm_patterns))
        .drop("comm_op")
    )
    gpu = gpu.join(names, on=["name", "detail"], how="left", nulls_equal=True,
                   maintain_order="left").with_columns(
        is_comm=(pl.col("kind") == "kernel")
        & (pl.col("_comm_name").fill_null(False) | pl.col("comm_op").is_not_null())
    ).drop("_comm_name")
    # Only the calls whose correlation id some GPU activity carries: most runtime calls
    # launch nothing (an emit_nvtx trace has three times more of them than of GPU rows).
    launched = gpu.select("rank", "correlation").filter(pl.col("correlation").is_not_null()).unique()
    launches = (
        intervals.lazy()
        .filter((pl.col("kind") == "cuda_api") & pl.col("correlation").is_not_null())
        .join(launched.lazy(), on=["rank", "correlation"], how="semi")
        .select("rank", "pid", "correlation", "start_ns", "end_ns", "tid", "name")
        .with_columns(launch_pid=pl.col("pid"))
        .group_by("rank", "pid", "correlation")
        .agg(
            launch_start_ns=pl.col("start_ns").min(),
            launch_pid=pl.col("launch_pid").first(),
            launch_end_ns=pl.col("end_ns").max(),
            launch_tid=pl.col("tid").first(),
            launch_name=pl.col("name").first(),
        )
        .collect()
    )
    joined = gpu.join(launches, on=["rank", "pid", "correlation"], how="left")
    # Kineto GPU rows carry the device as pid; the launch's pid is the CPU process. Fall back
    # to a join on (rank, correlation) where the pid join found nothing.
    missing = joined.filter(pl.col("launch_start_ns").is_null() & pl.col("correlation").is_not_null())
    if missing.height:
        by_rank = launches.drop("pid").unique(["rank", "correlation"], keep="first")
        fixed = missing.drop(
            "launch_start_ns", "launch_end_ns", "launch_pid", "launch_tid", "launch_name"
        ).join(by_rank, on=["rank", "correlation"], how="left")
        joined = pl.concat(
            [joined.filter(~(pl.col("launch_start_ns").is_null() & pl.col("correlation").is_not_null())), fixed],
            how="vertical",
        )
    # GPU rows leave many model columns empty (threads, stacks, collective args): held as
    # broadcast nulls, they cost nothing for the rest of the analysis.
    return compact_nulls(joined.sort("rank", "start_ns"))


ANALYSIS = Analysis(name="GPU activities", phase="rank 1", function=gpu_activities, reads=("intervals",),
                    returns="kernels, copies, memsets with their launch", field="gpu")
