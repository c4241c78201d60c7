"""traceinsight: why was this MoE training/inference step slow, and who waited for whom.

Reads Nsight Systems SQLite exports and PyTorch profiler (Kineto) traces into one normalized
model (:mod:`traceinsight.model`), analyzes it (:mod:`traceinsight.analysis`) and renders
findings (:mod:`traceinsight.report`).

>>> import traceinsight
>>> model = traceinsight.load("sample_traces/moe_single_nsys.sqlite")  # doctest: +SKIP
"""

from traceinsight import _allocators

_allocators.configure()  # before polars is imported below

from traceinsight._version import __version__  # noqa: E402
from traceinsight.ingest import load  # noqa: E402
from traceinsight.model import TraceModel  # noqa: E402

__all__ = ["load", "TraceModel", "__version__"]
