"""The entry point :func:`analyze`: a model in, :class:`Findings` out.

Each analysis stays a plain function of model frames (:mod:`traceinsight.analysis.registry`
lists them); :mod:`traceinsight.analysis.engine` wires them into per-rank phases, so that the
CLI, the renderers, the Python API and the Ray engine all see the same results.
"""

from __future__ import annotations

from traceinsight.analysis.anomaly_options import AnomalyOptions
from traceinsight.analysis.classify import DEFAULT_COMM_PATTERNS
from traceinsight.analysis.engine import analyze_model
from traceinsight.analysis.options import Options
from traceinsight.analysis.findings import Findings
from traceinsight.model import TraceModel


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
    return analyze_model(model, Options(step_pattern=step_pattern, comm_patterns=comm_patterns,
                                        anomaly_options=anomaly_options))


__all__ = ["Findings", "analyze"]
