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

from traceinsight.analysis.analyzers import (
    cause_totals,
    collective_details,
    collective_pairing,
    communication_kernels,
    compute_phase_times,
    cpu_gap_causes,
    gpu_activities,
    job_step_flags,
    judged_durations,
    launch_counts,
    load_imbalance,
    range_findings,
    range_flags,
    range_instances,
    range_statistics,
    step_breakdown,
    step_findings,
    step_flags,
    steps,
    straggler_reasons,
    straggler_windows,
    top_kernels,
    wait_table,
    waits,
    window_breakdown,
)
from traceinsight.analysis.descriptor import Analysis


ANALYSES: tuple[Analysis, ...] = (
    steps.ANALYSIS,
    gpu_activities.ANALYSIS,
    communication_kernels.ANALYSIS,
    collective_details.ANALYSIS,
    collective_pairing.ANALYSIS,
    waits.ANALYSIS,
    wait_table.ANALYSIS,
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
    straggler_windows.ANALYSIS,
    window_breakdown.ANALYSIS,
    straggler_reasons.ANALYSIS,
    compute_phase_times.ANALYSIS,
    load_imbalance.ANALYSIS,
)
"""Every analysis, in the order the engine runs it."""


__all__ = ["ANALYSES"]
