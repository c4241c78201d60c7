"""The analyses the engine runs, one module per analysis.

Each module holds one public function, the analysis (the only name in its ``__all__``),
whose docstring says which frames it reads and what it returns, and ``ANALYSIS``, its
:class:`~traceinsight.analysis.descriptor.Analysis`; helpers only that analysis uses are
private to the module. What several analyses (or the reports) share lives in the library
modules of :mod:`traceinsight.analysis` (``step_table``, ``places``, ``alignment``...).
Adding an analysis is adding a module here, listing it in
:mod:`traceinsight.analysis.registry` and calling it from :mod:`traceinsight.analysis.engine`.
"""
