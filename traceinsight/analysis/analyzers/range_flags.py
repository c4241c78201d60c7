"""Anomalous range instances.

Range instances (every ``GroupedLinear forward layer2.fc1``...) are compared with the
distribution of the same name on the same rank: with at least ``min_range_instances``
instances, an instance is flagged when it is ``range_ratio`` times the name's 90th
percentile, longer than its median by ``min_range_excess_ns`` and by ``sigmas`` robust
deviations. A name whose long instances are not rare (more than ``max_range_flag_share`` of
them, a heavy tail, or long in more than a quarter of the steps) is not flagged at all: its
long instances are its normal behaviour. The thresholds:
:class:`~traceinsight.analysis.anomaly_options.AnomalyOptions`.
"""

from __future__ import annotations

import polars as pl

from traceinsight.analysis.anomaly_options import MAD_TO_SIGMA, AnomalyOptions
from traceinsight.analysis.descriptor import Analysis

__all__ = ["flag_range_instances"]


def flag_range_instances(instances: pl.DataFrame, options: AnomalyOptions = AnomalyOptions(), *,
                         first_is_warmup: bool = False) -> pl.DataFrame:
    """Add ``typical_ns`` (median of the same name and rank) and ``anomalous`` to range instances.

    Statistics per (rank, name) are one group-by joined back; see the module docstring for
    the rule. With ``first_is_warmup`` (a trace without a loop: no steps to set the first
    calls apart) the first instance of each name is not judged: first calls pay one-time
    costs (lazy module loading, library handles, autotuning).

    Reads the range instances (with their step and window breakdown); returns them with the two
    columns.
    """
    if instances.is_empty():
        return instances.with_columns(typical_ns=pl.lit(None, pl.Float64), anomalous=pl.lit(False))
    group = ["rank", "name"]
    stats = instances.group_by(group).agg(
        _count=pl.len(),
        typical_ns=pl.col("duration_ns").median(),
        _p90=pl.col("duration_ns").quantile(0.9, interpolation="lower"),
    )
    spread = (
        instances.select(*group, "duration_ns").join(stats.select(*group, "typical_ns"), on=group)
        .group_by(group)
        .agg(_sigma=(pl.col("duration_ns") - pl.col("typical_ns")).abs().median() * MAD_TO_SIGMA)
    )
    stats = stats.join(spread, on=group, how="left")
    excess = pl.col("duration_ns") - pl.col("typical_ns")
    # Only the keys are joined, and the statistics set beside the instances in their order:
    # joining the instances themselves would copy every column of every instance (the
    # largest frame of an emit_nvtx flood's analysis).
    per_instance = instances.select(group).join(stats, on=group, how="left", maintain_order="left").drop(group)
    flagged = (
        instances.drop("typical_ns", "anomalous", strict=False)
        .hstack(per_instance)
        .with_columns(
            _long=(pl.col("_count") >= options.min_range_instances)
            & (pl.col("duration_ns") >= options.range_ratio * pl.col("_p90"))
            & (excess >= options.min_range_excess_ns)
            & (excess > options.sigmas * pl.col("_sigma"))
        )
    )
    # Long instances that are not rare are the name's heavy tail, not anomalies.
    if first_is_warmup:
        flagged = flagged.with_columns(
            _long=pl.col("_long") & (pl.col("start_ns") != pl.col("start_ns").min().over(group)))
    rare = pl.col("_long").sum().over(group) <= pl.max_horizontal(
        pl.lit(1.0), options.max_range_flag_share * pl.col("_count"))
    if "step" in flagged.columns:
        # Long instances in many of the steps are what the name does, not an anomaly.
        steps_of_rank = pl.col("step").n_unique().over("rank")
        long_steps = pl.col("step").filter(pl.col("_long")).n_unique().over(group)
        rare = rare & ((steps_of_rank < 4) | (long_steps <= pl.max_horizontal(pl.lit(2.0), 0.25 * steps_of_rank)))
    return flagged.with_columns(anomalous=pl.col("_long") & rare).drop("_count", "_p90", "_sigma", "_long")


ANALYSIS = Analysis(name="range flags", phase="rank 3", function=flag_range_instances,
                    reads=("range instances", "steps"), returns="instances with typical time and flag",
                    field="range_instances")
