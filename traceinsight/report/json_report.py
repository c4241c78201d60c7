"""The machine-readable findings (``analyze --json FILE``).

Stable keys (later analyses add keys, never change these)::

    {"ranks": [{"rank", "source", "format", "clock_offset_ns", ...}],
     "steps": [{"rank", "step", "label", "start_ns", "duration_ms", "breakdown_ms", "anomalous"}],
     "anomalies": [...], "waits": [...]}

``start_ns`` is on the rank's own clock (see ``ranks[].clock_origin_ns`` for its epoch).
"""

from __future__ import annotations

import msgspec
import polars as pl

from traceinsight._version import __version__
from traceinsight.analysis.collectives import collective_summary
from traceinsight.analysis.findings import Findings
from traceinsight.report.records import (
    anomaly_records,
    breakdown_ms,
    imbalance_records,
    straggler_records,
    wait_records,
)


def _ms(ns) -> float | None:
    return None if ns is None else round(ns / 1e6, 4)


def _us(ns) -> float | None:
    return None if ns is None else round(ns / 1e3, 3)


def step_stragglers(findings: Findings) -> list[dict]:
    """Per step: the rank the others waited for most, and the total waiting it caused."""
    if findings.waits.is_empty():
        return []
    waits = findings.waits
    per = waits.group_by("step", "waiting_for_rank").agg(caused_ms=pl.col("wait_ms").sum())
    best = per.sort(["step", "caused_ms"], descending=[False, True]).unique("step", keep="first", maintain_order=True)
    phases = (
        waits.group_by("step", "phase").agg(ms=pl.col("wait_ms").sum())
        .sort(["step", "ms"], descending=[False, True]).unique("step", keep="first", maintain_order=True)
    )
    joined = best.join(phases, on="step", how="left").sort("step")
    return [
        {"step": r["step"], "straggler": r["waiting_for_rank"], "wait_caused_ms": round(r["caused_ms"], 4),
         "worst_phase": r["phase"]}
        for r in joined.iter_rows(named=True)
    ]


def findings_to_dict(findings: Findings, *, show_host: bool = False) -> dict:
    """A JSON-ready dict of ``findings`` (host names only with ``show_host``)."""
    ranks = []
    for row in findings.ranks.sort("rank").iter_rows(named=True):
        entry = {
            "rank": row["rank"],
            "source": row["source"],
            "format": row["format"],
            "clock_offset_ns": row["clock_offset_ns"],
            "clock_origin_ns": row["clock_origin_ns"],
            "rank_source": row["rank_source"],
            "pid": row["pid"],
            "gpus": row["gpu_names"] or [],
            "tool_version": row["tool_version"],
        }
        if show_host:
            entry["hostname"] = row["hostname"]
        ranks.append(entry)
    steps = [
        {
            "rank": row["rank"],
            "step": row["step"],
            "label": row["label"],
            "start_ns": row["start_ns"],
            "duration_ms": _ms(row["duration_ns"]),
            "breakdown_ms": breakdown_ms(row),
            "anomalous": bool(row["anomalous"]),
            # How far the step stood out: its (judged) time over its baseline, and the ratio
            # that flags a step on this rank (the rank's noise band).
            "ratio": None if row.get("ratio") is None else round(row["ratio"], 4),
            "flag_ratio": None if row.get("threshold") is None else round(row["threshold"], 4),
        }
        for row in findings.steps.sort("rank", "step").iter_rows(named=True)
    ]
    causes = [
        {"rank": r["rank"], "step": r["step"], "cause": r["cause"], "gap_ms": _ms(r["gap_ns"]),
         "gaps": r["gaps"], "evidence": r["evidence"]}
        for r in findings.cpu_gap_causes.iter_rows(named=True)
    ]
    ranges = [
        {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        for row in findings.ranges.head(200).iter_rows(named=True)
    ]
    kernels = [
        {"rank": r["rank"], "name": r["name"], "count": r["count"], "total_ms": round(r["total_ms"], 4),
         "mean_us": round(r["mean_us"], 3), "share": round(r["share"], 4)}
        for r in findings.top_kernels.iter_rows(named=True)
    ]
    alignment = findings.alignment
    return {
        "traceinsight_version": __version__,
        "ranks": ranks,
        "step_source": findings.step_source,
        "step_pattern": findings.step_pattern,
        "steps": steps,
        "anomalies": anomaly_records(findings.anomalies),
        "waits": wait_records(findings.waits),
        "alignment": None if alignment is None else {
            "reference_rank": alignment.reference_rank,
            "method": alignment.method,
            "matched": alignment.matched,
            "offsets_ns": {str(k): v for k, v in alignment.offsets.items()},
            "skew_corrections_ns": {str(k): v for k, v in alignment.corrections.items()},
            "residual_p50_us": _us(alignment.residual_p50_ns),
            "residual_p95_us": _us(alignment.residual_p95_ns),
            "residual_max_us": _us(alignment.residual_max_ns),
            "pairing": alignment.pairing,
            "waits_trusted": alignment.trusted,
            "per_rank": {str(k): {"method": v["method"], "matched": v["matched"],
                                  "residual_p50_us": _us(v["residual_p50_ns"]),
                                  "residual_max_us": _us(v["residual_max_ns"])}
                         for k, v in alignment.per_rank.items()},
        },
        "stragglers": straggler_records(findings.stragglers),
        "collectives": collective_summary(findings.collectives),
        "step_stragglers": step_stragglers(findings),
        "imbalance": imbalance_records(findings.imbalance),
        "cpu_gap_causes": causes,
        "ranges": ranges,
        "top_kernels": kernels,
        "warnings": findings.warnings,
    }


def render_json(findings: Findings, *, show_host: bool = False) -> bytes:
    """The findings as indented UTF-8 JSON."""
    return msgspec.json.format(msgspec.json.encode(findings_to_dict(findings, show_host=show_host)), indent=1)


def render_diff_json(diff) -> bytes:
    """A :class:`~traceinsight.analysis.diff.FindingsDiff` as indented UTF-8 JSON (``diff
    --json``; see :func:`~traceinsight.analysis.diff.diff_to_dict`). Here, not beside the
    diff's terminal tables, so that writing it imports no terminal renderer."""
    from traceinsight.analysis.diff import diff_to_dict

    return msgspec.json.format(msgspec.json.encode(diff_to_dict(diff)), indent=1)


__all__ = ["findings_to_dict", "render_diff_json", "render_json"]
