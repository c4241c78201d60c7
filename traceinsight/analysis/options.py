"""What the user chose for an analysis (:class:`Options`).

Its own small module: the command line builds it for every question, also for those
answered from the findings cache (whose key includes its ``repr``), which then need none of
the analyses' modules.
"""

from __future__ import annotations

from dataclasses import dataclass

from traceinsight.analysis.anomaly_options import AnomalyOptions
from traceinsight.analysis.classify import DEFAULT_COMM_PATTERNS


@dataclass(frozen=True)
class Options:
    """What the user chose for the analysis."""

    step_pattern: str | None = None
    comm_patterns: tuple[str, ...] = DEFAULT_COMM_PATTERNS
    anomaly_options: AnomalyOptions = AnomalyOptions()
