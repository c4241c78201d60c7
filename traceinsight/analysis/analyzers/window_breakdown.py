"""Any window of a rank (the span before a collective, a range instance) broken down into
the breakdown categories, from the rank's interval sets
(:attr:`~traceinsight.analysis.breakdown_result.Breakdown.sets`)."""

from __future__ import annotations

import numpy as np
import polars as pl

from traceinsight.analysis import intervals as iv
from traceinsight.analysis.categories import CATEGORIES
from traceinsight.analysis.descriptor import Analysis

__all__ = ["window_breakdown"]


def window_breakdown(sets: dict[int, dict[str, iv.IntervalSet]], windows: pl.DataFrame) -> pl.DataFrame:
    """The categories inside each window; ``idle`` is the rest of the window.

    Reads a rank's interval sets and windows; returns the windows with ``<category>_ns`` columns."""
    frames = []
    ranks = windows.get_column("rank").unique() if "rank" in windows.columns else None
    # A rank's worker sees its own windows only: no split into per-rank frames and back.
    groups = ([((ranks[0],), windows)] if ranks is not None and ranks.len() == 1 and ranks[0] is not None
              else windows.group_by(["rank"], maintain_order=True))
    for (rank,), part in groups:
        rank_sets = sets.get(rank, {})
        starts = part.get_column("start_ns").to_numpy()
        ends = part.get_column("end_ns").to_numpy()
        columns = {
            f"{name}_ns": iv.overlap_per_window(rank_sets.get(name, iv.EMPTY), starts, ends)
            for name in CATEGORIES if name != "idle"
        }
        columns["idle_ns"] = (ends - starts) - np.sum(list(columns.values()), axis=0)
        frames.append(part.with_columns(**{k: pl.Series(v, dtype=pl.Int64) for k, v in columns.items()}))
    if not frames:
        return windows.with_columns(**{f"{c}_ns": pl.lit(0, pl.Int64) for c in CATEGORIES})
    return pl.concat(frames)


ANALYSIS = Analysis(name="window breakdown", phase="rank 3", function=window_breakdown,
                    reads=("interval sets", "straggler windows"), returns="time per category in each window")
