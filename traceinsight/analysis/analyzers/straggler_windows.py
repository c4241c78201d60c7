"""The windows that explain why a straggler was late: each rank's time before every costly
collective.

Between the previous collective and this one, each rank's time is broken down
(:mod:`~traceinsight.analysis.analyzers.window_breakdown`); the category in which the
straggler exceeds the median of the others most is the reason, with the token counts of each
rank where the trace records them (``Input Dims`` of the collective's op).
"""

from __future__ import annotations

import polars as pl

from traceinsight.analysis.alignment import Alignment
from traceinsight.analysis.descriptor import Analysis

__all__ = ["straggler_windows"]


def straggler_windows(
    waits: pl.DataFrame, steps: pl.DataFrame, alignment: Alignment, *, min_wait_ns: int = 100_000
) -> pl.DataFrame:
    """The windows to break down to explain each costly collective's straggler.

    For every collective where some rank waited at least ``min_wait_ns``: each rank's span
    from the end of the previous collective of the step (or the step's start) to its own
    arrival, on the rank's own clock. Columns ``key, rank, start_ns, end_ns, rows_sent``.

    Reads the matched collectives, the steps and the alignment; returns the windows.
    """
    empty = pl.DataFrame(schema={"key": pl.String, "rank": pl.Int32, "start_ns": pl.Int64,
                                 "end_ns": pl.Int64, "rows_sent": pl.Int64})
    if waits.is_empty():
        return empty
    offsets = pl.col("rank").replace_strict(alignment.offsets, default=0, return_dtype=pl.Int64)
    per_key = (
        waits.group_by("key", maintain_order=True)
        .agg(step=pl.col("step").first(), max_wait_ns=pl.col("wait_ns").max(),
             last_arrival_ns=pl.col("last_arrival_ns").first(), end_ns=pl.col("collective_end_ns").first())
        .sort("last_arrival_ns", "key")
    )
    step_start = dict(
        steps.with_columns(aligned=pl.col("start_ns") + offsets).group_by("step").agg(start=pl.col("aligned").min()).iter_rows()
    )
    previous_end: dict = {}
    starts = {}
    for row in per_key.iter_rows(named=True):
        window_start = previous_end.get(row["step"], step_start.get(row["step"]))
        previous_end[row["step"]] = row["end_ns"]
        if row["max_wait_ns"] >= min_wait_ns and window_start is not None:
            starts[row["key"]] = window_start
    if not starts:
        return empty
    return (
        waits.filter(pl.col("key").is_in(list(starts)))
        .with_columns(
            start_ns=pl.col("key").replace_strict(starts, return_dtype=pl.Int64) - offsets,
            end_ns=pl.col("arrival_ns") - offsets,
        )
        .filter(pl.col("end_ns") > pl.col("start_ns"))
        .select("key", pl.col("rank").cast(pl.Int32), "start_ns", "end_ns", pl.col("rows_sent").cast(pl.Int64))
    )


ANALYSIS = Analysis(name="straggler windows", phase="job 2", function=straggler_windows,
                    reads=("collectives", "steps", "alignment"),
                    returns="the window before each costly collective, per rank")
