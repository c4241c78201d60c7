"""The analyses the engine runs, in the order it runs them: one module per analysis.

Each module of :mod:`traceinsight.analysis.analyzers` holds one analysis function and
describes it with ``ANALYSIS`` (:class:`~traceinsight.analysis.descriptor.Analysis`): the
frames it reads, what it returns and the :class:`~traceinsight.analysis.findings.Findings`
field its result lands in. :data:`MODULES` lists those modules, so a newcomer sees the whole
analysis on one screen, and a new analysis is one module in ``analyzers/``, one line here
and its call in :mod:`traceinsight.analysis.engine`. ``tests/test_layout.py`` checks that
every analysis function the engine calls is listed here, that every analyzer module is
listed once, that each defines its one public function and nothing else public, and that
each says in its docstring what it reads and what it returns.

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


MODULES = (
    steps,
    gpu_activities,
    communication_kernels,
    collective_details,
    collective_pairing,
    waits,
    wait_table,
    step_breakdown,
    judged_durations,
    step_flags,
    job_step_flags,
    cpu_gap_causes,
    cause_totals,
    range_instances,
    range_flags,
    launch_counts,
    step_findings,
    range_findings,
    range_statistics,
    top_kernels,
    straggler_windows,
    window_breakdown,
    straggler_reasons,
    compute_phase_times,
    load_imbalance,
)
"""Every analyzer module, in the order the engine runs its analysis."""

ANALYSES: tuple[Analysis, ...] = tuple(module.ANALYSIS for module in MODULES)
"""Every analysis, in the order the engine runs it."""


__all__ = ["ANALYSES", "MODULES"]
