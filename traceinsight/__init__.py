"""traceinsight: why was this MoE training/inference step slow, and who waited for whom.

Reads Nsight Systems SQLite exports and PyTorch profiler (Kineto) traces into one normalized
model (:mod:`traceinsight.model`), analyzes it (:mod:`traceinsight.analysis`) and renders
findings (:mod:`traceinsight.report`).

>>> import traceinsight
>>> model = traceinsight.load("sample_traces/moe_single_nsys.sqlite")  # doctest: +SKIP
"""

from traceinsight import _allocators

_allocators.configure()  # before polars is first imported

from traceinsight._version import __version__  # noqa: E402

__all__ = ["load", "TraceModel", "__version__"]


def __getattr__(name: str):
    # ``load`` and ``TraceModel`` import polars and the readers when first used, so that the
    # command line decides how they are imported (see traceinsight.cli.run).
    if name == "load":
        from traceinsight.ingest import load

        return load
    if name == "TraceModel":
        from traceinsight.model import TraceModel

        return TraceModel
    raise AttributeError(f"module 'traceinsight' has no attribute {name!r}")
