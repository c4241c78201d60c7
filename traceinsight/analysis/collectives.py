"""What the engine, ``explain`` and the reports read from the collectives besides the
analyses: the ops that number them (:func:`collective_ops`), the spans each rank waited
(:func:`wait_intervals`), the token payload of dispatch and combine (:func:`payload_tokens`),
and per step who waited for whom (:func:`step_straggler`, :func:`who_waited_for_whom`,
:func:`collective_summary`)."""

from __future__ import annotations

import polars as pl

from traceinsight.analysis.classify import phase_expr
from traceinsight.analysis.schemas import rank_mapping
from traceinsight.model import TraceModel


def collective_ops(model: TraceModel) -> pl.DataFrame:
    """The ``record_param_comms`` ops that number their collective (Kineto 2026+ writes ``Seq``
    on the op, not always on its kernel): ``rank, external_id, _op_seq, _op_group``."""
    return model.intervals.lazy().filter(
        (pl.col("kind") == "cpu_op") & (pl.col("name") == "record_param_comms")
        & pl.col("external_id").is_not_null() & pl.col("comm_seq").is_not_null()
    ).select("rank", "external_id", _op_seq=pl.col("comm_seq"), _op_group=pl.col("comm_group")).unique(
        ["rank", "external_id"], keep="first").collect()


def wait_intervals(waits: pl.DataFrame) -> pl.DataFrame:
    """The waiting spans on each rank's own clock (for ``cross_rank_wait`` in the breakdown)."""
    if waits.is_empty():
        return pl.DataFrame(schema={"rank": pl.Int32, "start_ns": pl.Int64, "end_ns": pl.Int64})
    return waits.filter(pl.col("wait_ns") > 0).select(
        "rank", pl.col("start_ns"), (pl.col("start_ns") + pl.col("wait_ns")).alias("end_ns")
    )


def payload_tokens(waits: pl.DataFrame) -> dict[tuple[int, str], dict]:
    """Per (step, dispatch|combine): the token payload each rank received and sent.

    A MoE dispatch is often two all-to-alls: the token counts first (a few elements), then
    the hidden states. The payload is the collective of each phase range (``layer1.dispatch``)
    that moves the most elements; its rows (``Out msg nelems`` / row width, or the split
    sizes) are the tokens. Returns ``{(step, phase): {"received": {rank: N}, "sent": {rank: n},
    "transfer_ns": t}}`` where ``t`` sums the payload collectives' transfer times.
    """
    if waits.is_empty() or "payload_nelems" not in waits.columns:
        return {}
    frame = waits.with_columns(
        phase_class=phase_expr("phase")
    ).filter(pl.col("phase_class").is_in(["dispatch", "combine"]) & pl.col("step").is_not_null()
             & pl.col("payload_nelems").is_not_null())
    if frame.is_empty():
        return {}
    sizes = frame.group_by("step", "phase", "key").agg(size=pl.col("payload_nelems").max())
    payload_keys = (
        sizes.sort(["size", "key"], descending=[True, False])
        .group_by("step", "phase", maintain_order=True).first().get_column("key")
    )
    payload = frame.filter(pl.col("key").is_in(payload_keys.implode()))
    per_rank = payload.group_by("step", "phase_class", "rank").agg(
        received=pl.col("rows_received").sum(), sent=pl.col("rows_sent").sum(), n=pl.col("rows_received").count())
    transfer = payload.group_by("step", "phase_class", "key").agg(t=pl.col("transfer_ns").max()).group_by(
        "step", "phase_class").agg(t=pl.col("t").sum())
    out: dict[tuple[int, str], dict] = {}
    for row in per_rank.sort("rank").iter_rows(named=True):
        if not row["n"]:
            continue
        entry = out.setdefault((row["step"], row["phase_class"]), {"received": {}, "sent": {}, "transfer_ns": 0})
        entry["received"][row["rank"]] = int(row["received"])
        entry["sent"][row["rank"]] = int(row["sent"]) if row["sent"] is not None else None
    for step, phase, t in transfer.iter_rows():
        if (step, phase) in out:
            out[(step, phase)]["transfer_ns"] = int(t)
    return out


def step_straggler(collectives: pl.DataFrame, step: int) -> int | None:
    """The rank the others waited for longest in a step (None without waits)."""
    if collectives.is_empty() or "wait_ns" not in collectives.columns:
        return None
    caused = (
        collectives.filter((pl.col("step") == step) & (pl.col("rank") != pl.col("straggler")))
        .group_by("straggler").agg(ms=pl.col("wait_ns").sum())
        .filter(pl.col("ms") > 0).sort(["ms", "straggler"], descending=[True, False])
    )
    return None if caused.is_empty() else int(caused.item(0, "straggler"))


def who_waited_for_whom(collectives: pl.DataFrame, stragglers: pl.DataFrame, imbalance: pl.DataFrame,
                        step: int) -> list[dict]:
    """Every matched collective of one step, in the order they completed: each rank's arrival
    (ms after the first rank arrived, on the common clock) and wait, the straggler, and why it
    was late (the category in which its time before the collective exceeded the others', and,
    where the imbalance model has it, the compute phase in which its GPU time did)."""
    if collectives.is_empty() or "wait_ns" not in collectives.columns:
        return []
    part = collectives.filter(pl.col("step") == step)
    if part.is_empty():
        return []
    reasons = {r["key"]: r for r in stragglers.filter(pl.col("step") == step).iter_rows(named=True)}
    phases = next(({p["phase"]: p for p in e["phases"]} for e in imbalance.filter(pl.col("step") == step)
                   .iter_rows(named=True)), {})
    out = []
    for (key,), rows in part.sort("last_arrival_ns").group_by(["key"], maintain_order=True):
        rows = rows.sort("arrival_ns", "rank")
        first = rows.item(0, "arrival_ns")
        straggler = int(rows.item(0, "straggler"))
        entry = {
            "key": key, "collective": rows.item(0, "label"), "phase": rows.get_column("phase").drop_nulls().first(),
            "participants": rows.height, "straggler": straggler,
            "max_wait_ms": round(rows.get_column("wait_ns").max() / 1e6, 4),
            "transfer_ms": round(rows.get_column("transfer_ns").max() / 1e6, 4),
            "arrivals": [{"rank": r["rank"], "after_first_ms": round((r["arrival_ns"] - first) / 1e6, 4),
                          "wait_ms": round(r["wait_ns"] / 1e6, 4)} for r in rows.iter_rows(named=True)],
            "why": None,
        }
        reason = reasons.get(key)
        if reason is not None:
            why = (f"before it, rank {straggler}'s {reason['reason']} exceeded the others' by "
                   f"{reason['reason_excess_ms']:.2f} ms")
            grown = [(p, f) for p, f in phases.items() if p in ("attention", "experts") and f.get("max_rank") == straggler]
            if reason["reason"] == "gpu_compute" and grown and rows.height > 1:
                phase, figures = max(grown, key=lambda pf: pf[1]["max_ms"] - pf[1]["balanced_ms"])
                n = rows.height
                others = (n * figures["balanced_ms"] - figures["max_ms"]) / (n - 1)
                why += (f"; its {phase} took {figures['max_ms']:.2f} ms of GPU time in this step, "
                        f"the others' {others:.2f} ms" + (f" ({figures['max_ms'] / others:.1f}x)" if others > 0 else ""))
            if reason["rows_sent"]:
                why += f"; tokens sent per rank (payload all-to-all) {rank_mapping(reason['rows_sent'], 'rows')}"
            entry["why"] = why
        out.append(entry)
    return out


def collective_summary(waits: pl.DataFrame) -> list[dict]:
    """One entry per matched collective: straggler, worst wait, transfer, phase."""
    if waits.is_empty():
        return []
    per = (
        waits.group_by("key", maintain_order=True)
        .agg(
            step=pl.col("step").first(), collective=pl.col("label").first(),
            phase=pl.col("phase").drop_nulls().first(), straggler=pl.col("straggler").first(),
            participants=pl.col("participants").first(), max_wait_ns=pl.col("wait_ns").max(),
            total_wait_ns=pl.col("wait_ns").sum(), transfer_ns=pl.col("transfer_ns").max(),
            arrival_ns=pl.col("last_arrival_ns").first(),
        )
        .sort("arrival_ns")
    )
    return [
        {"key": r["key"], "step": r["step"], "collective": r["collective"], "phase": r["phase"],
         "straggler": r["straggler"], "participants": r["participants"],
         "max_wait_ms": round(r["max_wait_ns"] / 1e6, 4), "total_wait_ms": round(r["total_wait_ns"] / 1e6, 4),
         "transfer_ms": round(r["transfer_ns"] / 1e6, 4)}
        for r in per.iter_rows(named=True)
    ]
