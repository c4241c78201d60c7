"""The step table the analyses pass along: :class:`StepTable`, what
:func:`~traceinsight.analysis.analyzers.steps.find_steps` returns, its schema, and
:func:`assign_to_steps`, which gives the rows of any frame the step whose window holds them."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl


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
    """Add ``step``: the step whose window holds ``time_column`` on the same rank (else null)."""
    windows = steps.select("rank", pl.col("start_ns").alias("_w_start"), pl.col("end_ns").alias("_w_end"),
                           pl.col("step")).sort("_w_start")
    if "step" in frame.columns:
        frame = frame.drop("step")
    times = frame.get_column(time_column)
    # Range instances come sorted: sorting them again would copy the largest frame.
    if not (times.null_count() == 0 and times.is_sorted()):
        frame = frame.sort(time_column, maintain_order=True)
    return (
        frame
        .join_asof(windows, left_on=time_column, right_on="_w_start", by="rank",
                   strategy="backward", check_sortedness=False)
        .with_columns(step=pl.when(pl.col(time_column) < pl.col("_w_end")).then(pl.col("step")))
        .drop("_w_start", "_w_end")
    )
