"""The per-rank part of the waits: each collective's phase and row counts.

The phase is the innermost user annotation around the collective's launch
(``layer1.moe_dispatch``), skipping the communication library's own ranges. Rows sent and
received (tokens) come from the collective's op where the trace records its input shape
(``Input Dims``).
"""

from __future__ import annotations

import polars as pl

from traceinsight.analysis.descriptor import Analysis
from traceinsight.analysis.places import LIBRARY_RANGES, _innermost_names
from traceinsight.model import TraceModel

__all__ = ["enrich_collectives"]


def _phases(model: TraceModel, comm: pl.DataFrame, step_labels: list[str]) -> pl.DataFrame:
    """The innermost user annotation around each collective's launch call."""
    annotations = model.intervals.lazy().filter(
        (pl.col("kind") == "annotation")
        & ~pl.col("name").str.contains(LIBRARY_RANGES)
        & ~pl.col("name").is_in(step_labels)
        & (pl.col("domain").is_null() | (pl.col("domain") != "NCCL"))
    ).select("rank", "pid", "tid", "depth", "start_ns", "end_ns", "name").collect()
    # The deepest range around each launch names the collective's phase.
    launches = comm.select("rank", pl.col("launch_pid").alias("pid"), pl.col("launch_tid").alias("tid"),
                           pl.col("launch_start_ns").alias("t"))
    return comm.with_columns(phase=pl.Series(_innermost_names(annotations, launches), dtype=pl.String))


def _tokens(model: TraceModel, comm: pl.DataFrame) -> pl.DataFrame:
    """Rows sent and received per collective where the trace records the input shape.

    The collective's op (Kineto ``record_param_comms`` linked by ``External id``) records
    ``Input Dims`` like ``[[12288, 2048], ...]``: 12288 rows (tokens) of 2048 elements. Rows
    received = ``Out msg nelems`` / row width.
    """
    ops = model.intervals.filter(
        (pl.col("kind") == "cpu_op") & (pl.col("name") == "record_param_comms") & pl.col("external_id").is_not_null()
    ).select(
        "rank", "external_id",
        pl.col("detail").str.extract(r"^\[\[(\d+)", 1).cast(pl.Int64, strict=False).alias("rows_sent"),
        pl.col("comm_in_nelems").alias("_op_in"), pl.col("comm_out_nelems").alias("_op_out"),
    ).unique(["rank", "external_id"], keep="first")
    if ops.is_empty():
        return comm.with_columns(rows_sent=pl.lit(None, pl.Int64), rows_received=pl.lit(None, pl.Int64),
                                 payload_nelems=pl.max_horizontal("comm_in_nelems", "comm_out_nelems").cast(pl.Int64))
    joined = comm.join(ops, on=["rank", "external_id"], how="left")
    in_nelems = pl.coalesce("comm_in_nelems", "_op_in")
    out_nelems = pl.coalesce("comm_out_nelems", "_op_out")
    width = pl.when(pl.col("rows_sent") > 0).then(in_nelems / pl.col("rows_sent"))
    return joined.with_columns(
        rows_received=pl.when(width > 0).then((out_nelems / width).round(0)).cast(pl.Int64),
        payload_nelems=pl.max_horizontal(in_nelems, out_nelems).cast(pl.Int64),
    ).drop("_op_in", "_op_out")


def enrich_collectives(model: TraceModel, comm: pl.DataFrame, *, step_labels: list[str]) -> pl.DataFrame:
    """Per-rank part of the waits: add each collective's phase and row counts.

    Reads the model's annotations and the communication kernels; returns the kernels with
    ``phase`` and row counts."""
    if comm.is_empty():
        return comm
    return _tokens(model, _phases(model, comm, step_labels))


ANALYSIS = Analysis(name="collective details", phase="rank 1", function=enrich_collectives,
                    reads=("intervals", "communication kernels"),
                    returns="collectives with phase, group and row counts")
