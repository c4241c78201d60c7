"""The job's step flags: ranks of one job meet at every collective, so a step that stands
out on one rank (:mod:`~traceinsight.analysis.analyzers.step_flags`) is a slow step of the
whole job."""

from __future__ import annotations

import polars as pl

from traceinsight.analysis.anomaly_options import AnomalyOptions
from traceinsight.analysis.descriptor import Analysis

__all__ = ["flag_job_steps"]


def flag_job_steps(steps: pl.DataFrame, options: AnomalyOptions = AnomalyOptions()) -> pl.DataFrame:
    """Extend per-rank flags (:func:`flag_steps`) to the job.

    Ranks of one job meet at every collective, so a step that stands out on one rank is a
    slow step of the job: it is flagged on every rank where it is also ``min_ratio`` slower
    than that rank's baseline.

    Reads every rank's flagged steps; returns them with the job's flags.
    """
    job_slow = pl.col("anomalous").any().over("step") & (pl.col("ratio") >= options.min_ratio)
    return steps.with_columns(anomalous=pl.col("anomalous") | job_slow)


ANALYSIS = Analysis(name="job step flags", phase="job 2", function=flag_job_steps,
                    reads=("every rank's flagged steps",), returns="the job's flags", field="steps")
