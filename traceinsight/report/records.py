"""The findings' frames as JSON-ready records: the one place where frames become dicts.

The JSON report writes these records as they are; the terminal, HTML and Chrome-trace
renderers read the same records, so every output shows the same shapes. The shapes are the
JSON contract (see :mod:`traceinsight.report.json_report`): each kind of anomaly with its own
keys, per-rank figures as objects keyed by rank, per-phase figures keyed by phase.
"""

from __future__ import annotations

import polars as pl

from traceinsight.analysis.categories import CATEGORIES
from traceinsight.analysis.schemas import RANGE_ANOMALY_FIELDS, STEP_ANOMALY_FIELDS, rank_mapping


def breakdown_ms(row: dict) -> dict[str, float]:
    """The ``breakdown_ms`` mapping of one step row."""
    return {name: round(row[f"{name}_ns"] / 1e6, 4) for name in CATEGORIES}


def _place(place: dict) -> dict:
    """A place of a step finding: ``ranges`` only for a family of ranges, ``kernels`` only
    on the GPU side."""
    out = {key: place[key] for key in ("where", "side", "range", "ms", "typical_ms", "excess_ms")}
    if place["ranges"] is not None:
        out["ranges"] = place["ranges"]
    out["cause"], out["evidence"] = place["cause"], place["evidence"]
    if place["kernels"] is not None:
        out["kernels"] = place["kernels"]
    return out


def anomaly_records(anomalies: pl.DataFrame) -> list[dict]:
    """The JSON ``anomalies``: each kind of finding with its own keys."""
    out = []
    for row in anomalies.iter_rows(named=True):
        if row["kind"] == "step":
            entry = {key: row[key] for key in STEP_ANOMALY_FIELDS}
            entry["places"] = [_place(place) for place in row["places"] or []]
            entry["kernels"] = row["kernels"] or []
            entry["ranges"] = row["ranges"] or []
        else:
            entry = {key: row[key] for key in RANGE_ANOMALY_FIELDS}
        out.append(entry)
    return out


def straggler_records(stragglers: pl.DataFrame) -> list[dict]:
    """The JSON ``stragglers``: per-rank figures as objects keyed by rank."""
    return [
        {**row, "before_ms": rank_mapping(row["before_ms"], "ms"), "rows_sent": rank_mapping(row["rows_sent"], "rows")}
        for row in stragglers.iter_rows(named=True)
    ]


def imbalance_records(imbalance: pl.DataFrame) -> list[dict]:
    """The JSON ``imbalance``: phases and tokens as objects keyed by phase (``max_rank`` only
    for compute phases, ``tokens`` only where the trace records them)."""
    out = []
    for row in imbalance.iter_rows(named=True):
        phases = {}
        for figures in row["phases"] or []:
            phases[figures["phase"]] = {"max_ms": figures["max_ms"], "balanced_ms": figures["balanced_ms"]}
            if figures["max_rank"] is not None:
                phases[figures["phase"]]["max_rank"] = figures["max_rank"]
        entry = {"step": row["step"], "phases": phases,
                 **{key: row[key] for key in ("modeled_ms", "balanced_ms", "saving_ms", "measured_ms")}}
        if row["tokens"] is not None:
            entry["tokens"] = {
                tokens["phase"]: {
                    "received": rank_mapping(tokens["received"], "rows"), "sent": rank_mapping(tokens["sent"], "rows"),
                    **{key: tokens[key] for key in ("rank", "direction", "tokens", "balanced_tokens",
                                                    "expected_ratio", "measured_ratio", "transfer_ms")},
                }
                for tokens in row["tokens"]
            }
        out.append(entry)
    return out


def wait_records(waits: pl.DataFrame) -> list[dict]:
    """The JSON ``waits``: one object per row, largest wait first."""
    return waits.to_dicts()
