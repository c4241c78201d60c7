"""The results of an analysis (:class:`Findings`) and the entry point :func:`analyze`.

Each analysis stays a plain function of model frames; :mod:`traceinsight.analysis.engine`
wires them into per-rank phases, so that the CLI, the renderers, the Python API and the Ray
engine all see the same results.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from traceinsight.analysis.anomalies import AnomalyOptions
from traceinsight.analysis.breakdown import CATEGORIES
from traceinsight.analysis.classify import DEFAULT_COMM_PATTERNS
from traceinsight.analysis.multirank import Alignment
from traceinsight.model import TraceModel


@dataclass
class Findings:
    """Everything ``analyze`` found.

    Attributes
    ----------
    ranks
        ``model.ranks`` with ``clock_offset_ns`` (0 until clocks are aligned).
    steps
        One row per (rank, step): window, ``duration_ns`` and ``<category>_ns`` columns,
        ``anomalous``.
    step_source
        ``"marker"`` or ``"whole trace"``.
    cpu_gaps
        Every CPU-gap piece with its cause and evidence.
    cpu_gap_causes
        CPU-gap time per (rank, step, cause).
    sync_gaps
        The ``host_sync`` pieces of the breakdown (GPU idle while the host synchronized):
        step findings place them like CPU gaps.
    ranges
        Range statistics per (rank, name); ``range_instances`` one row per instance.
    place_cpu, place_gpu, place_tree
        Where each CPU gap and each launched GPU activity belongs (``key``, ``family``), and
        the annotation tree they refer to (``node``, ``parent``): built for the step findings,
        kept so that ``explain`` of a cached analysis need not build them again. Empty where
        no rank had an anomaly.
    top_kernels
        Kernels by total time per rank.
    gpu
        Every GPU activity with its launch call (for per-step kernel comparisons).
    anomalies
        JSON-ready dicts, one per anomalous step or range instance.
    waits
        JSON-ready dicts, one per (collective, waiting rank) with a wait, largest wait first.
    alignment
        Clock offsets and residuals (multi-rank).
    collectives
        One row per (matched collective, rank): arrival, wait, transfer, straggler, phase.
    stragglers
        Why the straggler of each costly collective was late.
    imbalance
        Per step: modeled time now and with balanced load.
    warnings
        What the input lacked.
    """

    ranks: pl.DataFrame
    steps: pl.DataFrame
    step_source: str
    step_pattern: str
    cpu_gaps: pl.DataFrame
    cpu_gap_causes: pl.DataFrame
    ranges: pl.DataFrame
    range_instances: pl.DataFrame
    top_kernels: pl.DataFrame
    gpu: pl.DataFrame = field(default_factory=pl.DataFrame)
    launch_counts: pl.DataFrame = field(default_factory=pl.DataFrame)
    sync_gaps: pl.DataFrame = field(default_factory=pl.DataFrame)
    place_cpu: pl.DataFrame = field(default_factory=pl.DataFrame)
    place_gpu: pl.DataFrame = field(default_factory=pl.DataFrame)
    place_tree: pl.DataFrame = field(default_factory=pl.DataFrame)
    anomalies: list[dict] = field(default_factory=list)
    waits: list[dict] = field(default_factory=list)
    alignment: Alignment | None = None
    collectives: pl.DataFrame = field(default_factory=pl.DataFrame)
    stragglers: list[dict] = field(default_factory=list)
    imbalance: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def analyze(
    model: TraceModel,
    *,
    step_pattern: str | None = None,
    comm_patterns: tuple[str, ...] = DEFAULT_COMM_PATTERNS,
    anomaly_options: AnomalyOptions = AnomalyOptions(),
) -> Findings:
    """Steps, their breakdown, CPU-gap causes, range statistics and top kernels.

    Examples
    --------
    >>> import traceinsight
    >>> from traceinsight.analysis.pipeline import analyze
    >>> findings = analyze(traceinsight.load("sample_traces/moe_single_nsys.sqlite"))  # doctest: +SKIP
    """
    from traceinsight.analysis.engine import Options, analyze_model

    return analyze_model(model, Options(step_pattern=step_pattern, comm_patterns=comm_patterns,
                                        anomaly_options=anomaly_options))


def wait_records(collectives: pl.DataFrame, *, min_wait_ns: int = 1_000) -> list[dict]:
    """The JSON ``waits``: one entry per (collective, rank) that waited at least 1 µs, largest
    wait first (``findings.waits[:3]`` are the three that cost most)."""
    if collectives.is_empty():
        return []
    rows = collectives.filter((pl.col("wait_ns") >= min_wait_ns) & (pl.col("rank") != pl.col("straggler"))).sort(
        ["wait_ns", "step", "rank", "start_ns"], descending=[True, False, False, False], nulls_last=True)
    return [
        {
            "step": r["step"], "rank": r["rank"], "waiting_for_rank": r["straggler"],
            "phase": r["phase"] or r["label"], "wait_ms": round(r["wait_ns"] / 1e6, 4),
            "collective": r["label"], "transfer_ms": round(r["transfer_ns"] / 1e6, 4),
            "key": r["key"], "start_ns": r["start_ns"],
        }
        for r in rows.iter_rows(named=True)
    ]


def breakdown_ms(row: dict) -> dict[str, float]:
    """The ``breakdown_ms`` mapping of one step row."""
    return {name: round(row[f"{name}_ns"] / 1e6, 4) for name in CATEGORIES}
