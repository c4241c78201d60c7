"""The analyses the engine runs, in the order it runs them: one entry per analysis.

Each entry names the function, the frames it reads, what it returns and the
:class:`~traceinsight.analysis.findings.Findings` field its result lands in, so a newcomer
sees the whole analysis on one screen, and a new analysis is one function plus one entry
here (and its call in :mod:`traceinsight.analysis.engine`). ``tests/test_layout.py`` checks
that every analysis function the engine calls is listed here, and that each says in its
docstring what it returns.

Phases (see :mod:`traceinsight.analysis.engine`): ``rank 1`` steps and collectives, ``job 1``
clock alignment and waits, ``rank 2`` breakdown and step flags, ``job 2`` job-level flags,
``rank 3`` causes, ranges and findings, ``job 3`` stragglers and imbalance.
"""

from __future__ import annotations

from traceinsight.analysis import multirank
from traceinsight.analysis.analyzers import (
    cause_totals,
    cpu_gap_causes,
    gpu_activities,
    job_step_flags,
    judged_durations,
    launch_counts,
    range_findings,
    range_flags,
    range_instances,
    range_statistics,
    step_breakdown,
    step_findings,
    step_flags,
    steps,
    top_kernels,
    window_breakdown,
)
from traceinsight.analysis.descriptor import Analysis


ANALYSES: tuple[Analysis, ...] = (
    steps.ANALYSIS,
    gpu_activities.ANALYSIS,
    Analysis("communication kernels", "rank 1", multirank.communication_kernels, ("gpu", "steps"),
             "collective kernels per step"),
    Analysis("collective details", "rank 1", multirank.enrich_collectives, ("intervals", "communication kernels"),
             "collectives with phase, group and row counts"),
    Analysis("collective pairing", "job 1", multirank.pair_collectives, ("collectives of every rank", "ranks"),
             "paired collectives and the clock alignment", "alignment"),
    Analysis("waits", "job 1", multirank.match_waits, ("paired collectives", "alignment"),
             "arrival, wait and transfer per (collective, rank)", "collectives"),
    Analysis("who waited for whom", "job 1", multirank.wait_table, ("collectives",), "one row per wait", "waits"),
    step_breakdown.ANALYSIS,
    judged_durations.ANALYSIS,
    step_flags.ANALYSIS,
    job_step_flags.ANALYSIS,
    cpu_gap_causes.ANALYSIS,
    cause_totals.ANALYSIS,
    range_instances.ANALYSIS,
    range_flags.ANALYSIS,
    launch_counts.ANALYSIS,
    step_findings.ANALYSIS,
    range_findings.ANALYSIS,
    range_statistics.ANALYSIS,
    top_kernels.ANALYSIS,
    Analysis("straggler windows", "job 2", multirank.straggler_windows, ("collectives", "steps", "alignment"),
             "the window before each costly collective, per rank"),
    window_breakdown.ANALYSIS,
    Analysis("straggler reasons", "job 3", multirank.reasons_from_windows, ("collectives", "window breakdown"),
             "why each straggler was late", "stragglers"),
    Analysis("compute phase times", "rank 3", multirank.compute_phase_times, ("intervals", "gpu", "steps"),
             "GPU time of attention and experts per (step, rank)"),
    Analysis("load imbalance", "job 3", multirank.imbalance_from, ("compute phase times", "collectives", "steps"),
             "modeled step time now and balanced", "imbalance"),
)
"""Every analysis, in the order the engine runs it."""


__all__ = ["ANALYSES"]
