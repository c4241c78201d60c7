"""The step table the analyses pass along: :class:`StepTable`, what
:func:`~traceinsight.analysis.analyzers.steps.find_steps` returns, its schema, and
:func:`assign_to_steps`, which gives the rows of any frame the step whose window holds them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from traceinsight.analysis.intervals import holding


STEP_SCHEMA = {
    "rank": pl.Int32,
    "step": pl.Int64,
    "label": pl.String,
    "start_ns": pl.Int64,
    "end_ns": pl.Int64,
    "marker_end_ns": pl.Int64,
    "pid": pl.Int64,
    "tid": pl.Int64,
}


@dataclass
class StepTable:
    """Steps of every rank.

    Attributes
    ----------
    steps
        One row per (rank, step): ``rank, step, label, start_ns, end_ns`` (the accounting
        window), ``marker_end_ns`` (the marker's own CPU-side end), ``pid, tid``.
    source
        ``"marker"`` when numbered markers were found, ``"repeated range 'NAME'"`` when an
        un-numbered range around every iteration was, ``"whole trace"`` for the fallback.
    pattern
        The regular expression used.
    """

    steps: pl.DataFrame
    source: str
    pattern: str

    def marker_names(self, intervals: pl.DataFrame) -> list[str]:
        """Every annotation name that is a step marker (``ProfilerStep#3`` and ``step 3``
        may both mark one step); ranges analyses leave them out."""
        # The regex first, then the few matches made unique: an emit_nvtx trace has
        # hundreds of thousands of distinct annotation names.
        return (
            intervals.lazy()
            .filter(pl.col("kind") == "annotation")
            .select(pl.col("name").filter(pl.col("name").str.contains(self.pattern)).unique())
            .collect()
            .to_series()
            .to_list()
        )


def assign_to_steps(frame: pl.DataFrame, steps: pl.DataFrame, *, time_column: str = "start_ns") -> pl.DataFrame:
    """Add ``step``: the step whose window holds ``time_column`` on the same rank (else null).

    The rows come back sorted by ``time_column`` (as they are, when already sorted), with
    ``step`` as the last column.
    """
    if "step" in frame.columns:
        frame = frame.drop("step")
    times = frame.get_column(time_column)
    # Range instances come sorted: sorting them again would copy the largest frame.
    if not (times.null_count() == 0 and times.is_sorted()):
        frame = frame.sort(time_column, maintain_order=True)
        times = frame.get_column(time_column)
    # The window starting last at or before each row's time on its rank (a backward as-of
    # match), kept where the row starts before that window ends. Found by a binary search
    # per rank and put beside the rows: a join would copy every column of the frame.
    # A window without a rank or a start matches no row; one without an end holds none.
    windows = steps.select("rank", "start_ns", pl.col("end_ns").fill_null(np.iinfo(np.int64).min), "step") \
        .drop_nulls(["rank", "start_ns"]).sort("rank", "start_ns", maintain_order=True)
    window_rank = windows.get_column("rank").to_numpy()
    window_start = windows.get_column("start_ns").to_numpy()
    window_end = windows.get_column("end_ns").to_numpy()
    row_rank = frame.get_column("rank")
    row_time = times.fill_null(0).to_numpy()
    valid = (times.is_not_null() & row_rank.is_not_null()).to_numpy()
    row_rank = row_rank.fill_null(0).to_numpy()
    match = np.full(frame.height, -1, dtype=np.int64)
    for rank in np.unique(window_rank):
        rows = np.flatnonzero(valid & (row_rank == rank))
        first, last = np.searchsorted(window_rank, rank, side="left"), np.searchsorted(window_rank, rank, side="right")
        at = holding(window_start[first:last], window_end[first:last], row_time[rows])
        match[rows] = np.where(at >= 0, at + first, -1)
    return frame.with_columns(step=windows.get_column("step").gather(pl.Series(match).replace(-1, None)))
