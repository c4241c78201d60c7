"""Run the analyses in order and collect their results into :class:`Findings`.

Each analysis stays a plain function of model frames; this module only wires them together
so that the CLI, the renderers and the Python API see the same results.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from traceinsight.analysis.anomalies import (
    AnomalyOptions,
    assign_to_steps,
    explain_range_instances,
    explain_steps,
    flag_range_instances,
    flag_steps,
    launches_per_step,
)
from traceinsight.analysis.breakdown import CATEGORIES, gpu_activities, step_breakdown
from traceinsight.analysis.multirank import (
    Alignment,
    align_clocks,
    collective_waits,
    communication_kernels,
    imbalance_model,
    straggler_reasons,
    wait_intervals,
)
from traceinsight.analysis.classify import DEFAULT_COMM_PATTERNS
from traceinsight.analysis.cpu_gaps import attribute_cpu_gaps, summarize_causes
from traceinsight.analysis.inventory import top_kernels
from traceinsight.analysis.ranges import range_instances, range_statistics
from traceinsight.analysis.steps import find_steps
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
    ranges
        Range statistics per (rank, name); ``range_instances`` one row per instance.
    top_kernels
        Kernels by total time per rank.
    gpu
        Every GPU activity with its launch call (for per-step kernel comparisons).
    anomalies
        JSON-ready dicts, one per anomalous step or range instance.
    waits
        JSON-ready dicts, one per (collective, waiting rank) with a wait.
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
    warnings = list(model.warnings)
    table = find_steps(model, pattern=step_pattern)
    if table.source != "marker":
        if step_pattern:
            warnings.append(f"step marker {step_pattern!r} matched no annotation: the whole trace is one step")
        else:
            warnings.append("no step markers (ProfilerStep#N, 'step N', 'iteration N'): the whole trace is one step")
    gpu = gpu_activities(model, comm_patterns=comm_patterns)
    comm = communication_kernels(gpu, table.steps)
    alignment = align_clocks(comm, model.ranks)
    warnings += alignment.notes
    marker_names = table.marker_names(model.intervals)
    collectives = collective_waits(model, comm, alignment, step_labels=marker_names)
    breakdown = step_breakdown(model, table, waits=wait_intervals(collectives), gpu=gpu)
    gaps = attribute_cpu_gaps(model, breakdown.gaps, marker_names=marker_names)
    steps = flag_steps(breakdown.steps, anomaly_options)
    # Step markers are annotations too, but the step table already covers them.
    instances = range_instances(model, gpu=breakdown.gpu).filter(~pl.col("name").is_in(marker_names))
    instances = flag_range_instances(
        breakdown.window_breakdown(assign_to_steps(instances, steps)), anomaly_options
    )
    launch_counts = launches_per_step(gpu, steps)
    anomalies = [{"kind": "step", **a} for a in explain_steps(steps, instances, gaps, launch_counts=launch_counts)]
    anomalies += explain_range_instances(
        instances, gaps, skip_steps={(a["rank"], a["step"]) for a in anomalies}
    )
    ranks = model.ranks.with_columns(
        clock_offset_ns=pl.col("rank").replace_strict(alignment.offsets, default=0, return_dtype=pl.Int64)
    )
    return Findings(
        ranks=ranks,
        steps=steps,
        step_source=table.source,
        step_pattern=table.pattern,
        cpu_gaps=gaps,
        cpu_gap_causes=summarize_causes(gaps),
        ranges=range_statistics(instances),
        range_instances=instances,
        top_kernels=top_kernels(model, limit=10),
        gpu=breakdown.gpu,
        launch_counts=launch_counts,
        anomalies=anomalies,
        waits=_wait_records(collectives),
        alignment=alignment,
        collectives=collectives,
        stragglers=straggler_reasons(collectives, steps, breakdown.sets, alignment),
        imbalance=imbalance_model(instances, collectives, steps),
        warnings=warnings,
    )


def _wait_records(collectives: pl.DataFrame, *, min_wait_ns: int = 1_000) -> list[dict]:
    """The JSON ``waits``: one entry per (collective, rank) that waited at least 1 µs."""
    if collectives.is_empty():
        return []
    rows = collectives.filter((pl.col("wait_ns") >= min_wait_ns) & (pl.col("rank") != pl.col("straggler")))
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
