"""The words of the findings: the categories every step window is partitioned into
(:data:`CATEGORIES`), in the order they win when several things run at once, each defined in
:mod:`traceinsight.analysis.analyzers.step_breakdown`; and the causes a finding names
(:data:`CAUSES`)."""

from __future__ import annotations

from traceinsight.analysis.classify import GAP_CAUSES


CATEGORIES = (
    "gpu_compute",
    "gpu_memory",
    "communication",
    "cross_rank_wait",
    "host_sync",
    "cpu_gap",
    "idle",
)

#: The causes a finding names: ``cpu_gap.<cause>`` from the CPU-gap evidence of the place
#: (``cpu_gap`` alone where the trace holds none), ``host_sync``, ``gpu_compute``,
#: ``gpu_memory``, ``communication``, ``cross_rank_wait``, ``unknown``.
CAUSES = (
    *(f"cpu_gap.{c}" for c in GAP_CAUSES if c not in ("unknown", "host_sync")),
    "cpu_gap",
    "host_sync",
    "gpu_compute",
    "gpu_memory",
    "communication",
    "cross_rank_wait",
    "unknown",
)
