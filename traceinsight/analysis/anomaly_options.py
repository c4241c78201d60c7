"""The thresholds of the anomaly analyses (:class:`AnomalyOptions`) and the robust spread
they share (:data:`MAD_TO_SIGMA`: 1.4826 × MAD estimates a standard deviation).

How the step thresholds are used: :mod:`traceinsight.analysis.analyzers.step_flags` (and
:mod:`~traceinsight.analysis.analyzers.job_step_flags` for the job); the range thresholds:
:mod:`traceinsight.analysis.analyzers.range_flags`.
"""

from __future__ import annotations

from dataclasses import dataclass


MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class AnomalyOptions:
    """Thresholds of the anomaly detector (see the module docstring)."""

    window: int = 5
    min_ratio: float = 1.15
    max_ratio: float = 1.5
    sigmas: float = 5.0
    min_excess_ns: int = 1_000_000
    range_ratio: float = 3.0
    min_range_excess_ns: int = 1_000_000
    min_range_instances: int = 8
    max_range_flag_share: float = 0.05
