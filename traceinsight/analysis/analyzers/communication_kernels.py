"""The communication kernels of a rank with the key that matches each to the same
collective on the other ranks.

Every communication kernel (see :mod:`~traceinsight.analysis.classify`) is keyed by
``(group, seq)`` where the trace numbers a process group's collectives (Kineto ``Seq``),
else by ``(step, group, name, occurrence)``: the n-th collective of that name of that group
launched inside step *s*. All ranks of a group issue its collectives in the same order, and
steps are matched by number, so the same key on two ranks is the same collective even when
the ranks' profiling windows started at different moments. Keys whose names differ between
ranks never match, since the name is part of the key.
"""

from __future__ import annotations

import polars as pl

from traceinsight.analysis.descriptor import Analysis
from traceinsight.analysis.step_table import assign_to_steps

__all__ = ["communication_kernels"]


def communication_kernels(gpu: pl.DataFrame, steps: pl.DataFrame, ops: pl.DataFrame | None = None) -> pl.DataFrame:
    """Communication kernels with their step, group and matching key.

    ``ops`` (:func:`collective_ops`) lend their sequence number and group to the kernels they
    launched where the kernel itself carries none.

    Columns added: ``step``, ``group``, ``label`` (collective name), ``occurrence``, ``key``.

    Reads the GPU activities, the steps and the collective ops; returns the communication kernels.
    """
    comm = gpu.filter(pl.col("is_comm")).with_columns(
        _when=pl.coalesce("launch_start_ns", "start_ns")
    )
    if ops is not None and ops.height and comm.height:
        comm = comm.join(ops, on=["rank", "external_id"], how="left").with_columns(
            comm_seq=pl.coalesce("comm_seq", "_op_seq"), comm_group=pl.coalesce("comm_group", "_op_group"),
        ).drop("_op_seq", "_op_group")
    if comm.is_empty():
        return comm.with_columns(step=pl.lit(None, pl.Int64), group=pl.lit(None, pl.String),
                                 label=pl.lit(None, pl.String), occurrence=pl.lit(None, pl.UInt32),
                                 key=pl.lit(None, pl.String))
    comm = assign_to_steps(comm, steps, time_column="_when")
    comm = comm.with_columns(
        group=pl.col("comm_group").fill_null("default"),
        label=pl.coalesce("comm_op", pl.col("name").str.replace(r"\(.*$", "")),
    ).sort("rank", "start_ns")
    comm = comm.with_columns(
        occurrence=pl.int_range(pl.len()).over("rank", "step", "group", "label"),
    )
    by_seq = pl.format("seq/{}/{}", "group", "comm_seq")
    by_order = pl.format("step/{}/{}/{}/{}", pl.col("step").fill_null(-1), "group", "label", "occurrence")
    return comm.with_columns(
        key=pl.when(pl.col("comm_seq").is_not_null()).then(by_seq).otherwise(by_order)
    ).drop("_when")


ANALYSIS = Analysis(name="communication kernels", phase="rank 1", function=communication_kernels,
                    reads=("gpu", "steps"), returns="collective kernels per step")
