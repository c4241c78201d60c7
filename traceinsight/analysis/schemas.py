"""The schemas of the frames that hold findings (anomalies, waits, stragglers, imbalance).

A leaf module: analyses build their result frames with these schemas, and
:mod:`traceinsight.analysis.findings` documents them. Nested results are ``List(Struct)``
columns; a value per rank is a list of ``{rank, value}`` structs, in the order the analysis
met the ranks.
"""

from __future__ import annotations

import polars as pl

from traceinsight.analysis.categories import CATEGORIES

KERNEL_CHANGE = pl.Struct({
    "name": pl.String, "count": pl.Int64, "typical_count": pl.Float64, "ms": pl.Float64,
    "typical_ms": pl.Float64, "excess_ms": pl.Float64,
})
"""A kernel whose time in a step differs from the typical step's."""

RANGE_CHANGE = pl.Struct({
    "name": pl.String, "depth": pl.Int64, "count": pl.Int64, "total_ns": pl.Int64, "typical_ns": pl.Float64,
    "excess_ns": pl.Float64, "launches": pl.Int64, "typical_launches": pl.Float64, "lag_ns": pl.Int64,
    "typical_lag_ns": pl.Float64,
})
"""A range whose time in a step grew: instances, time, launches and first-GPU lag."""

PLACE = pl.Struct({
    "where": pl.String, "side": pl.String, "range": pl.String, "ms": pl.Float64, "typical_ms": pl.Float64,
    "excess_ms": pl.Float64, "ranges": pl.Int64, "cause": pl.String, "evidence": pl.String,
    "kernels": pl.List(KERNEL_CHANGE),
})
"""A place that explains part of a step's excess. ``ranges`` (the family's member count) is
null for a single range's place; ``kernels`` is null on the CPU side."""

ANOMALY_SCHEMA = {
    "kind": pl.String, "rank": pl.Int64, "step": pl.Int64, "duration_ms": pl.Float64, "typical_ms": pl.Float64,
    "excess_ms": pl.Float64, "category": pl.String, "category_excess_ms": pl.Float64,
    "category_deltas_ms": pl.Struct({category: pl.Float64 for category in CATEGORIES}),
    "where": pl.String, "range": pl.String, "name": pl.String, "lag_ms": pl.Float64, "cause": pl.String,
    "evidence": pl.String, "places": pl.List(PLACE), "kernels": pl.List(KERNEL_CHANGE),
    "ranges": pl.List(RANGE_CHANGE), "start_ns": pl.Int64, "others_in_step": pl.Int64,
}
"""One row per anomalous step (``kind == "step"``) or range instance (``kind == "range"``).

Both: ``rank, step, duration_ms, typical_ms, excess_ms, category, where, cause, evidence``.
Steps only: ``category_excess_ms, category_deltas_ms`` (one field per breakdown category),
``range`` (the innermost range of the first place), ``places, kernels, ranges``. Range
instances only: ``name, lag_ms`` (range start to its first GPU work), ``start_ns`` (on the
rank's clock), ``others_in_step`` (anomalous instances of that step not listed)."""

STEP_ANOMALY_FIELDS = ("kind", "rank", "step", "duration_ms", "typical_ms", "excess_ms", "category",
                       "category_excess_ms", "category_deltas_ms", "where", "range", "cause", "evidence",
                       "places", "kernels", "ranges")
RANGE_ANOMALY_FIELDS = ("kind", "rank", "step", "excess_ms", "where", "name", "duration_ms", "typical_ms",
                        "lag_ms", "category", "cause", "evidence", "start_ns", "others_in_step")

WAIT_SCHEMA = {
    "step": pl.Int64, "rank": pl.Int64, "waiting_for_rank": pl.Int64, "phase": pl.String, "wait_ms": pl.Float64,
    "collective": pl.String, "transfer_ms": pl.Float64, "key": pl.String, "start_ns": pl.Int64,
}
"""One row per (collective, rank) that waited at least 1 µs for another rank, largest wait
first: ``waiting_for_rank`` is the straggler, ``phase`` the MoE phase (else the collective)."""

RANK_MS = pl.List(pl.Struct({"rank": pl.Int64, "ms": pl.Float64}))
RANK_ROWS = pl.List(pl.Struct({"rank": pl.Int64, "rows": pl.Int64}))

STRAGGLER_SCHEMA = {
    "key": pl.String, "step": pl.Int64, "collective": pl.String, "phase": pl.String, "straggler": pl.Int64,
    "max_wait_ms": pl.Float64, "reason": pl.String, "reason_excess_ms": pl.Float64, "before_ms": RANK_MS,
    "rows_sent": RANK_ROWS,
}
"""Why the straggler of each costly collective was late: ``reason`` is the breakdown
category in which its time before the collective exceeded the others' median most;
``before_ms`` each rank's time in that window; ``rows_sent`` the tokens each rank sent in
the phase's payload all-to-all (null where the trace records none)."""

PHASE_FIGURES = pl.Struct({"phase": pl.String, "max_ms": pl.Float64, "balanced_ms": pl.Float64,
                           "max_rank": pl.Int64})
TOKEN_FIGURES = pl.Struct({
    "phase": pl.String, "received": RANK_ROWS, "sent": RANK_ROWS, "rank": pl.Int64, "direction": pl.String,
    "tokens": pl.Int64, "balanced_tokens": pl.Float64, "expected_ratio": pl.Float64,
    "measured_ratio": pl.Float64, "transfer_ms": pl.Float64,
})

IMBALANCE_SCHEMA = {
    "step": pl.Int64, "phases": pl.List(PHASE_FIGURES), "modeled_ms": pl.Float64, "balanced_ms": pl.Float64,
    "saving_ms": pl.Float64, "measured_ms": pl.Float64, "tokens": pl.List(TOKEN_FIGURES),
}
"""Per step: the modeled time (slowest rank of each MoE phase) and with balanced load.
``phases``: per phase, the slowest rank's time, the balanced time and (compute phases) the
slowest rank; ``tokens``: for dispatch and combine, the tokens each rank received and sent,
the busiest rank and what balance would move (null where the trace records no tokens)."""


def frame_of(records: list[dict], schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """``records`` as a frame of ``schema``; a key outside the schema is an error, so that
    nothing an analysis found is dropped on the way."""
    for record in records:
        unknown = set(record) - set(schema)
        if unknown:
            raise ValueError(f"fields outside the schema: {sorted(unknown)}")
    return pl.DataFrame(records, schema=schema)


def by_rank(values: dict, value_name: str) -> list[dict]:
    """A per-rank mapping as the list of ``{rank, <value_name>}`` a frame holds (keys may be
    rank numbers or their strings)."""
    return [{"rank": int(rank), value_name: value} for rank, value in values.items()]


def rank_mapping(entries: list[dict] | None, value_name: str) -> dict[str, object] | None:
    """The per-rank list of a frame back as ``{"rank": value}`` (``None`` stays ``None``)."""
    if entries is None:
        return None
    return {str(entry["rank"]): entry[value_name] for entry in entries}
