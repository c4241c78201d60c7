"""What balanced load across the ranks would save per step: the MoE phases (attention,
dispatch, experts, combine) of each rank, measured, and modeled with each rank doing the
mean; with the token payload of dispatch and combine where the trace records it."""

from __future__ import annotations

import numpy as np
import polars as pl

from traceinsight.analysis.classify import phase_expr
from traceinsight.analysis.collectives import payload_tokens
from traceinsight.analysis.descriptor import Analysis
from traceinsight.analysis.schemas import IMBALANCE_SCHEMA, by_rank, frame_of

__all__ = ["imbalance_from"]


def imbalance_from(compute_times: pl.DataFrame, waits: pl.DataFrame, steps: pl.DataFrame) -> pl.DataFrame:
    """Per step: what balanced load across ranks would save, from measured per-rank rates.

    Each MoE phase's time per rank: attention and experts from the GPU time of the work
    launched in the matching annotations (``compute_times``); dispatch and combine from the
    transfer part of their collectives. Ranks meet at every dispatch and combine, so a step
    costs about ``max(attention) + max(dispatch) + max(experts) + max(combine)``.

    Balanced, compute phases cost the ranks' mean. A collective's transfer is set by the rank
    receiving the most rows (``t = max rows / bandwidth``, the measured transfer); balanced,
    each rank receives the mean, so it takes ``t * mean rows / max rows`` (where the trace
    records no row counts, the mean transfer time).

    Reads per-rank compute times (:func:`compute_phase_times`), the matched collectives and
    the steps; returns :data:`~traceinsight.analysis.schemas.IMBALANCE_SCHEMA`: per step
    ``modeled_ms``, ``balanced_ms``, ``saving_ms``, the ``measured_ms`` of the slowest rank's
    step, per-phase figures and the tokens of dispatch and combine.
    """
    if waits.is_empty() or compute_times.is_empty():
        return pl.DataFrame(schema=IMBALANCE_SCHEMA)
    compute = compute_times.sort("t", "rank", descending=[True, False]).group_by("step", "phase").agg(
        max_ns=pl.col("t").max(), balanced_ns=pl.col("t").mean(), max_rank=pl.col("rank").first()
    )
    transfers = waits.with_columns(phase=phase_expr("phase")).filter(
        pl.col("phase").is_in(["dispatch", "combine"]) & pl.col("step").is_not_null()
    )
    # Participants leave a collective together, so its transfer time is set by the rank that
    # receives or sends the most rows at the link's bandwidth: t = max rows / bandwidth.
    # Balanced, every rank sends and receives the mean, so t_balanced = t * mean rows / max rows.
    per_collective = (
        transfers.group_by("step", "phase", "key")
        .agg(
            max_ns=pl.col("transfer_ns").max(),
            mean_ns=pl.col("transfer_ns").mean(),
            max_rows=pl.max_horizontal("rows_sent", "rows_received").max(),
            mean_rows=pl.col("rows_received").mean(),
        )
        .with_columns(
            balanced_ns=pl.when(pl.col("max_rows") > 0)
            .then(pl.col("max_ns") * pl.col("mean_rows") / pl.col("max_rows"))
            .otherwise(pl.col("mean_ns"))
        )
        .group_by("step", "phase")
        .agg(pl.col("max_ns").sum(), pl.col("balanced_ns").sum())
    )
    summary = pl.concat([compute, per_collective], how="diagonal_relaxed")
    if summary.is_empty():
        return pl.DataFrame(schema=IMBALANCE_SCHEMA)
    measured = steps.group_by("step").agg(measured=pl.col("duration_ns").max())
    out = []
    for (step,), part in summary.sort("step").group_by(["step"], maintain_order=True):
        modeled = float(part.get_column("max_ns").sum())
        balanced = float(part.get_column("balanced_ns").sum())
        measured_row = measured.filter(pl.col("step") == step)
        phases = [{"phase": r["phase"], "max_ms": round(r["max_ns"] / 1e6, 3),
                   "balanced_ms": round(r["balanced_ns"] / 1e6, 3), "max_rank": r.get("max_rank")}
                  for r in part.sort("phase").iter_rows(named=True)]
        out.append({
            "step": step, "phases": phases,
            "modeled_ms": round(modeled / 1e6, 3), "balanced_ms": round(balanced / 1e6, 3),
            "saving_ms": round((modeled - balanced) / 1e6, 3),
            "measured_ms": round(measured_row.item(0, "measured") / 1e6, 3) if measured_row.height else None,
        })
    return frame_of(_with_payload(out, waits), IMBALANCE_SCHEMA)


def _with_payload(entries: list[dict], waits: pl.DataFrame) -> list[dict]:
    """Add ``tokens`` per entry: for dispatch and combine, the rank receiving most, its tokens
    N, the balanced M (mean over ranks), the expected time ratio N/M (transfer time grows with
    the tokens of the busiest receiver) and the measured ratio: this step's payload transfer
    time per balanced token over the median of all steps (what the ratio would be if the
    model holds). A step without token counts keeps ``tokens`` null."""
    tokens = payload_tokens(waits)
    if not tokens:
        return entries
    per_token: dict[str, list[float]] = {}
    for (step, phase), entry in tokens.items():
        received = [v for v in entry["received"].values() if v]
        if received and entry["transfer_ns"]:
            per_token.setdefault(phase, []).append(entry["transfer_ns"] / (sum(received) / len(received)))
    typical = {phase: float(np.median(values)) for phase, values in per_token.items()}
    for entry in entries:
        for phase in ("dispatch", "combine"):
            found = tokens.get((entry["step"], phase))
            if not found or not found["received"]:
                continue
            received, sent = found["received"], found["sent"]
            # The busiest end of the all-to-all sets its time: the rank receiving the most
            # tokens, or sending the most (a rank with 1.75x the batch sends 1.75x at dispatch).
            loads = [(v, r, "receives") for r, v in received.items()] + \
                    [(v, r, "sends") for r, v in sent.items() if v is not None]
            tokens_busiest, busiest, direction = max(loads, key=lambda x: (x[0], -x[1], x[2]))
            balanced = sum(received.values()) / len(received)
            measured = None
            if balanced > 0 and found["transfer_ns"] and typical.get(phase):
                measured = round(found["transfer_ns"] / balanced / typical[phase], 3)
            entry.setdefault("tokens", []).append({
                "phase": phase, "received": by_rank(received, "rows"), "sent": by_rank(sent, "rows"),
                "rank": busiest, "direction": direction, "tokens": tokens_busiest,
                "balanced_tokens": round(balanced, 1),
                "expected_ratio": round(tokens_busiest / balanced, 3) if balanced > 0 else None,
                "measured_ratio": measured,
                "transfer_ms": round(found["transfer_ns"] / 1e6, 4),
            })
    return entries


ANALYSIS = Analysis(name="load imbalance", phase="job 3", function=imbalance_from,
                    reads=("compute phase times", "collectives", "steps"), returns="modeled step time now and balanced",
                    field="imbalance")
