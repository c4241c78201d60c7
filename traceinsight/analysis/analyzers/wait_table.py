"""Who waited for whom: one row per (collective, rank) that waited, largest wait first (the
findings' ``waits``)."""

from __future__ import annotations

import polars as pl

from traceinsight.analysis.descriptor import Analysis
from traceinsight.analysis.schemas import WAIT_SCHEMA, frame_of

__all__ = ["wait_table"]


def wait_table(collectives: pl.DataFrame, *, min_wait_ns: int = 1_000) -> pl.DataFrame:
    """Who waited for whom (:data:`~traceinsight.analysis.schemas.WAIT_SCHEMA`): one row per
    (collective, rank) that waited at least 1 µs, largest wait first (``head(3)`` are the
    three that cost most).

    Reads :func:`match_waits`' collectives; returns ``step, rank, waiting_for_rank, phase,
    wait_ms, collective, transfer_ms, key, start_ns``."""
    if collectives.is_empty():
        return pl.DataFrame(schema=WAIT_SCHEMA)
    rows = collectives.filter((pl.col("wait_ns") >= min_wait_ns) & (pl.col("rank") != pl.col("straggler"))).sort(
        ["wait_ns", "step", "rank", "start_ns"], descending=[True, False, False, False], nulls_last=True)
    # Rounded by Python's round(), as every other figure of the findings is.
    return frame_of([
        {
            "step": r["step"], "rank": r["rank"], "waiting_for_rank": r["straggler"],
            "phase": r["phase"] or r["label"], "wait_ms": round(r["wait_ns"] / 1e6, 4),
            "collective": r["label"], "transfer_ms": round(r["transfer_ns"] / 1e6, 4),
            "key": r["key"], "start_ns": r["start_ns"],
        }
        for r in rows.iter_rows(named=True)
    ], WAIT_SCHEMA)


ANALYSIS = Analysis(name="who waited for whom", phase="job 1", function=wait_table, reads=("collectives",),
                    returns="one row per wait", field="waits")
