"""Where the per-rank work runs: here (the local engine, :mod:`traceinsight.analysis.engine`)
or on a Ray cluster next to the files (:mod:`traceinsight.engines.ray_engine`)."""
