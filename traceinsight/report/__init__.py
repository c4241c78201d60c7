"""Renderers of :class:`~traceinsight.analysis.pipeline.Findings`: terminal, JSON and HTML.

Renderers never read trace files; they only format findings. Strings that come from traces
(kernel names, NVTX text) are untrusted and are escaped by every renderer.
"""
