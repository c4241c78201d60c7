"""What an analysis found (:class:`Findings`): polars frames with fixed, documented schemas.

Every result is a frame, so a Python user filters and sorts anomalies and waits the way
they do steps::

    findings.anomalies.filter(pl.col("kind") == "step").sort("excess_ms", descending=True)
    findings.waits.group_by("waiting_for_rank").agg(pl.col("wait_ms").sum())

Nested results (the places of a step finding, the kernels that grew) are ``List(Struct)``
columns; a value per rank is a list of ``{rank, value}`` structs, in the order the analysis
met the ranks. JSON shapes (keys, which keys a kind of finding carries, rank-keyed objects)
are decided by :mod:`traceinsight.report.json_report` alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from traceinsight.analysis.alignment import Alignment
from traceinsight.analysis.schemas import (
    ANOMALY_SCHEMA,
    IMBALANCE_SCHEMA,
    STRAGGLER_SCHEMA,
    WAIT_SCHEMA,
)

@dataclass
class Findings:
    """Everything ``analyze`` found; every table a polars frame.

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
        :data:`ANOMALY_SCHEMA`: one row per anomalous step or range instance, steps first.
    waits
        :data:`WAIT_SCHEMA`: one row per (collective, waiting rank), largest wait first.
    alignment
        Clock offsets and residuals (multi-rank).
    collectives
        One row per (matched collective, rank): arrival, wait, transfer, straggler, phase.
    stragglers
        :data:`STRAGGLER_SCHEMA`: why the straggler of each costly collective was late.
    imbalance
        :data:`IMBALANCE_SCHEMA`: per step, modeled time now and with balanced load.
    warnings
        What the input lacked.

    Examples
    --------
    >>> import polars as pl, traceinsight
    >>> findings = traceinsight.analyze(traceinsight.load("sample_traces/moe_2rank"))  # doctest: +SKIP
    >>> findings.anomalies.filter(pl.col("kind") == "step").select("rank", "step", "where", "cause")  # doctest: +SKIP
    >>> findings.waits.sort("wait_ms", descending=True).head(3)  # doctest: +SKIP
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
    anomalies: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=ANOMALY_SCHEMA))
    waits: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=WAIT_SCHEMA))
    alignment: Alignment | None = None
    collectives: pl.DataFrame = field(default_factory=pl.DataFrame)
    stragglers: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=STRAGGLER_SCHEMA))
    imbalance: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=IMBALANCE_SCHEMA))
    warnings: list[str] = field(default_factory=list)
