"""Run the analysis on Ray: per-file actors next to the data, small summaries to the driver.

One actor per trace file reads it (through the per-file cache when given) and keeps the
model in its own memory for the whole analysis; the driver only ever receives per-rank
summaries: step tables, communication kernels, per-rank statistics, anomalies and the
largest CPU gaps (:data:`~traceinsight.analysis.engine.SUMMARY_GAPS`). The phases and the
cross-rank reductions are those of the local engine (:func:`~traceinsight.analysis.engine.run_phases`),
so the JSON findings are the same.

Design for 1024 ranks x 500 MB: each actor needs about 3x its file's decoded columns in
memory (a few GB for 500 MB of JSON) and parses in roughly the time of one ``orjson.loads``
of its file; actors run where Ray places them (with ``--ray-address`` of a cluster whose
nodes mount the traces, put them near the files with Ray's scheduling). What reaches the
driver grows with ranks x (steps + collectives), tens of MB at 1024 ranks, not with the
events.
"""

from __future__ import annotations

import os

from traceinsight.analysis.engine import RankWorker, run_phases, split_by_rank
from traceinsight.analysis.options import Options
from traceinsight.errors import TraceInputError
from traceinsight.ingest import expand_paths, rank_mapping, renumber


class FileWorker:
    """The ranks of one file, as :class:`~traceinsight.analysis.engine.RankWorker` objects."""

    def __init__(self, path: str, options: Options, salvage: bool, cache_dir: str | None) -> None:
        from traceinsight.ingest import _read_one

        self.options = options
        try:
            self.model = _read_one(path, salvage, cache_dir)
        except TraceInputError as exc:
            self.error = str(exc)
            self.model = None
        else:
            self.error = None

    def claimed_ranks(self) -> list[int] | str:
        return self.error if self.error else self.model.ranks.get_column("rank").to_list()

    def assign(self, mapping: dict[int, int]) -> list[int]:
        if any(old != new for old, new in mapping.items()):
            self.model = renumber(self.model, mapping)
        # The actor owns its model: each worker empties its part once no phase needs it.
        self.workers = {rank: RankWorker(part, self.options, free_model=True)
                        for rank, part in split_by_rank(self.model).items()}
        self.model = None
        return sorted(self.workers)

    def call(self, method: str, per_rank_args: dict | None) -> dict:
        keep = {"keep_details": False} if method == "finish" else {}
        return {
            rank: getattr(worker, method)(*(per_rank_args[rank] if per_rank_args else ()), **keep)
            for rank, worker in self.workers.items()
        }


def analyze_with_ray(
    paths,
    *,
    options: Options = Options(),
    address: str | None = None,
    salvage: bool = False,
    cache_dir: str | None = None,
    num_cpus: int | None = None,
):
    """Analyze ``paths`` with one Ray actor per file; returns the same
    :class:`~traceinsight.analysis.pipeline.Findings` as the local engine (with CPU gaps and
    range instances reduced to the largest and the anomalous ones)."""
    try:
        import ray
    except ImportError:
        raise TraceInputError("the ray engine needs Ray: pip install 'traceinsight-moe[ray]'") from None
    files = expand_paths(paths)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, num_cpus=None if address else (num_cpus or os.cpu_count()),
                 include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        actor_class = ray.remote(FileWorker)
        actors = [actor_class.remote(path, options, salvage, cache_dir) for path in files]
        claimed = ray.get([actor.claimed_ranks.remote() for actor in actors])
        for path, ranks in zip(files, claimed):
            if isinstance(ranks, str):
                raise TraceInputError(ranks.split(": ", 1)[-1] if ranks.startswith(path) else ranks, path=path)
        mappings, _ = rank_mapping(claimed)
        owned = ray.get([actor.assign.remote(mapping) for actor, mapping in zip(actors, mappings)])

        def call(method: str, per_rank_args: dict | None) -> dict:
            futures = [
                actor.call.remote(method, None if per_rank_args is None else {r: per_rank_args[r] for r in ranks})
                for actor, ranks in zip(actors, owned)
            ]
            merged: dict = {}
            for part in ray.get(futures):
                merged.update(part)
            return merged

        return run_phases(call, options)
    finally:
        if started_here:
            ray.shutdown()
