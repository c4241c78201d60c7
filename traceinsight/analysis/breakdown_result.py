"""What :func:`~traceinsight.analysis.analyzers.step_breakdown.step_breakdown` returns
(:class:`Breakdown`): the steps with their time per category, the GPU-idle pieces, and each
rank's interval sets, which break down any other window."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from traceinsight.analysis import intervals as iv
from traceinsight.analysis.analyzers.window_breakdown import window_breakdown


@dataclass
class Breakdown:
    """Result of :func:`step_breakdown`.

    Attributes
    ----------
    steps
        The step table with one ``<category>_ns`` column per category and ``duration_ns``.
    gaps
        One row per GPU-idle piece inside a step: ``rank, step, start_ns, end_ns, category``
        (``host_sync``, ``cpu_gap`` or ``idle``), ``pid, tid`` of the thread that launched the
        GPU work ending the gap, and ``next_name``, that work's name.
    gpu
        The GPU activities used, with ``is_comm``, ``launch_start_ns``, ``launch_tid``.
    sets
        Per rank, the disjoint interval set of each category but ``idle`` (for breaking
        down any other window, e.g. a range instance, with :func:`window_breakdown`).
    """

    steps: pl.DataFrame
    gaps: pl.DataFrame
    gpu: pl.DataFrame
    sets: dict[int, dict[str, iv.IntervalSet]]

    def window_breakdown(self, windows: pl.DataFrame) -> pl.DataFrame:
        """Add ``<category>_ns`` columns for arbitrary windows (``rank, start_ns, end_ns``)."""
        return window_breakdown(self.sets, windows)
