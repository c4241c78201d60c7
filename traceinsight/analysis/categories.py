"""The categories every step window is partitioned into (:data:`CATEGORIES`), in the order
they win when several things run at once; each is defined in
:mod:`traceinsight.analysis.analyzers.step_breakdown`."""

from __future__ import annotations


CATEGORIES = (
    "gpu_compute",
    "gpu_memory",
    "communication",
    "cross_rank_wait",
    "host_sync",
    "cpu_gap",
    "idle",
)
