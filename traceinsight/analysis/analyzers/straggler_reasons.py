"""Why each straggler was late, from the windows before the collective
(:mod:`~traceinsight.analysis.analyzers.straggler_windows`) broken down per rank: the
category in which the straggler exceeds the median of the others most, with the token
counts of each rank where the trace records them."""

from __future__ import annotations

import polars as pl

from traceinsight.analysis.categories import CATEGORIES
from traceinsight.analysis.descriptor import Analysis
from traceinsight.analysis.schemas import STRAGGLER_SCHEMA, by_rank, frame_of

__all__ = ["reasons_from_windows"]


def reasons_from_windows(waits: pl.DataFrame, broken: pl.DataFrame) -> pl.DataFrame:
    """Why each straggler was late, from the windows of :func:`straggler_windows` broken down
    per rank (:func:`~traceinsight.analysis.analyzers.window_breakdown.window_breakdown`): the category in
    which the straggler exceeds the median of the others most.

    Reads the matched collectives and the broken-down windows; returns
    :data:`~traceinsight.analysis.schemas.STRAGGLER_SCHEMA`."""
    if waits.is_empty() or broken.is_empty():
        return pl.DataFrame(schema=STRAGGLER_SCHEMA)
    per_key = (
        waits.group_by("key", maintain_order=True)
        .agg(step=pl.col("step").first(), label=pl.col("label").first(), phase=pl.col("phase").drop_nulls().first(),
             straggler=pl.col("straggler").first(), max_wait_ns=pl.col("wait_ns").max(),
             last_arrival_ns=pl.col("last_arrival_ns").first())
        .sort("last_arrival_ns", "key")
    )
    reasons = []
    for row in per_key.iter_rows(named=True):
        windows = broken.filter(pl.col("key") == row["key"]).sort("rank")
        late = windows.filter(pl.col("rank") == row["straggler"])
        others = windows.filter(pl.col("rank") != row["straggler"])
        if late.is_empty() or others.is_empty():
            continue
        late = late.row(0, named=True)
        deltas = {c: late[f"{c}_ns"] - float(others.get_column(f"{c}_ns").median()) for c in CATEGORIES}
        category = max(deltas, key=deltas.get)
        tokens = _payload_rows(waits, row["step"], row["phase"], row["key"])
        reasons.append({
            "key": row["key"], "step": row["step"], "collective": row["label"], "phase": row["phase"],
            "straggler": row["straggler"], "max_wait_ms": round(row["max_wait_ns"] / 1e6, 3),
            "reason": category, "reason_excess_ms": round(deltas[category] / 1e6, 3),
            "before_ms": [{"rank": r["rank"], "ms": round((r["end_ns"] - r["start_ns"]) / 1e6, 3)}
                          for r in windows.iter_rows(named=True)],
            "rows_sent": by_rank(tokens, "rows") if any(v is not None for v in tokens.values()) else None,
        })
    return frame_of(reasons, STRAGGLER_SCHEMA)


def _payload_rows(waits: pl.DataFrame, step, phase, key) -> dict:
    """Tokens each rank sent in the payload collective of a phase: the collective of that step
    and phase range that moves the most elements (a dispatch's count exchange moves a few
    numbers before the hidden states; its row count says nothing about the batch)."""
    if "payload_nelems" not in waits.columns:
        part = waits.filter(pl.col("key") == key)
    else:
        same = waits.filter((pl.col("step") == step) & (pl.col("phase") == phase)) if phase is not None else \
            waits.filter(pl.col("key") == key)
        if same.is_empty() or same.get_column("payload_nelems").is_null().all():
            same = waits.filter(pl.col("key") == key)
        payload = same.sort(["payload_nelems", "key"], descending=[True, False], nulls_last=True).item(0, "key")
        part = waits.filter(pl.col("key") == payload)
    return dict(zip(part.get_column("rank").to_list(), part.get_column("rows_sent").to_list()))


ANALYSIS = Analysis(name="straggler reasons", phase="job 3", function=reasons_from_windows,
                    reads=("collectives", "window breakdown"), returns="why each straggler was late",
                    field="stragglers")
