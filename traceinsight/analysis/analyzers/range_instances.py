"""Every instance of every annotation range (NVTX, ``record_function``): how long, how late its GPU work.

For every instance of every annotation the GPU work it launched is found through the launch
calls its thread made inside it (correlation ids). Per instance:

``duration_ns``
    CPU-side length of the range.
``first_gpu_lag_ns``
    From the range's start to the start of the first GPU activity it launched: a
    ``GroupedLinear forward`` whose GEMMs start 200 ms after it began has a 200 ms lag.
``gpu_ns``
    Summed duration of the GPU activities it launched; ``gpu_span_ns`` from the first start
    to the last end.
``launches``
    Number of GPU activities launched inside.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from traceinsight._allocators import release_freed_memory
from traceinsight.analysis.analyzers.gpu_activities import gpu_activities
from traceinsight.analysis.descriptor import Analysis
from traceinsight.model import TraceModel

__all__ = ["range_instances"]

INSTANCE_KEYS = ["rank", "pid", "tid"]
#: Instances of one thread handled at once.
_BLOCK_ROWS = 1 << 16


def _launched_work(gpu: pl.DataFrame) -> pl.DataFrame:
    return (
        gpu.filter(pl.col("launch_start_ns").is_not_null())
        .group_by("rank", pl.col("launch_pid").alias("pid"), pl.col("launch_tid").alias("tid"), "correlation")
        .agg(
            launch_ns=pl.col("launch_start_ns").first(),
            gpu_start_ns=pl.col("start_ns").min(),
            gpu_end_ns=pl.col("end_ns").max(),
            gpu_ns=(pl.col("end_ns") - pl.col("start_ns")).sum(),
            activities=pl.len(),
        )
        .sort("launch_ns")
    )


def _range_reduce(ufunc, values: np.ndarray, first: np.ndarray, last: np.ndarray, empty) -> np.ndarray:
    """``ufunc.reduce(values[first[i]:last[i]])`` for every i, ``empty`` where the range is empty."""
    out = np.full(first.size, empty, dtype=values.dtype if values.size else np.int64)
    nonempty = last > first
    if values.size == 0 or not nonempty.any():
        return out
    pairs = np.empty(2 * int(nonempty.sum()), dtype=np.int64)
    pairs[0::2] = first[nonempty]
    pairs[1::2] = np.minimum(last[nonempty], values.size - 1)
    reduced = ufunc.reduceat(values, pairs)[0::2]
    # reduceat's slice for the last pair ends at pairs[i+1]; when last == size we clipped it,
    # so fold the final element back in.
    at_end = last[nonempty] == values.size
    if at_end.any():
        reduced[at_end] = ufunc(reduced[at_end], values[-1])
    out[nonempty] = reduced
    return out


def range_instances(
    model: TraceModel, *, gpu: pl.DataFrame | None = None, names: list[str] | None = None,
    free_model: bool = False,
) -> pl.DataFrame:
    """One row per annotation instance with its launched GPU work.

    Reads the model's annotations and the GPU activities; returns one row per instance.

    Parameters
    ----------
    model
        The trace model.
    gpu
        ``gpu_activities(model)`` if already computed.
    names
        Restrict to these annotation names.
    free_model
        Empty ``model`` (:meth:`~traceinsight.model.TraceModel.drop_events`) once its
        annotations are taken, before the instances are measured: for a caller that owns
        the model and reads its events no more (the model is otherwise held beside the
        instances' arrays at the analysis's peak).

    Returns
    -------
    polars.DataFrame
        ``rank, pid, tid, name, depth, start_ns, end_ns, duration_ns, launches, gpu_ns,
        first_gpu_start_ns, last_gpu_end_ns, first_gpu_lag_ns, gpu_span_ns``.

    Examples
    --------
    >>> range_instances(model, names=["GroupedLinear forward layer2.fc1"])  # doctest: +SKIP
    """
    gpu = gpu if gpu is not None else gpu_activities(model)
    annotations = _annotation_ranges(model, names=names)
    if free_model:
        model.drop_events()
        release_freed_memory()
    return _range_instances_from(annotations, gpu)


def _annotation_ranges(model: TraceModel, *, names: list[str] | None = None) -> pl.DataFrame:
    """The model's annotations as :func:`_range_instances_from` reads them: ``rank, pid, tid,
    name, depth, start_ns, end_ns``, sorted by rank and start: the output's order, in
    which each thread's ranges are a sorted subsequence.

    Eager steps: they keep sharing the model's string buffers, where one lazy query copies
    every name (30 MB on an emit_nvtx flood).
    """
    wanted = pl.col("kind") == "annotation"
    if names is not None:
        wanted = wanted & pl.col("name").is_in(names)
    # The columns first: filtering every column of the model would copy them all.
    annotations = model.intervals.select(*INSTANCE_KEYS, "name", "depth", "start_ns", "end_ns").filter(
        model.intervals.select(wanted).to_series())
    if _sorted_by_rank_and_start(annotations):  # as the readers order the model: no copy
        return annotations
    return annotations.sort("rank", "start_ns", maintain_order=True)


def _sorted_by_rank_and_start(frame: pl.DataFrame) -> bool:
    rank, start = frame.get_column("rank"), frame.get_column("start_ns")
    if rank.null_count() or start.null_count():
        return False
    rank, start = rank.to_numpy(), start.to_numpy()
    return bool(np.all((rank[1:] > rank[:-1]) | ((rank[1:] == rank[:-1]) & (start[1:] >= start[:-1]))))


def _range_instances_from(annotations: pl.DataFrame, gpu: pl.DataFrame) -> pl.DataFrame:
    """:func:`range_instances` of ``annotations`` (:func:`_annotation_ranges`) and the GPU
    activities ``gpu`` (:func:`~traceinsight.analysis.analyzers.gpu_activities.gpu_activities`)."""
    if annotations.is_empty():
        return annotations.with_columns(
            duration_ns=pl.lit(0, pl.Int64), launches=pl.lit(0, pl.Int64), gpu_ns=pl.lit(0, pl.Int64),
            first_gpu_start_ns=pl.lit(None, pl.Int64), last_gpu_end_ns=pl.lit(None, pl.Int64),
            first_gpu_lag_ns=pl.lit(None, pl.Int64), gpu_span_ns=pl.lit(None, pl.Int64),
        )
    work = _launched_work(gpu)
    big = np.iinfo(np.int64).max
    size = annotations.height
    launches = np.zeros(size, dtype=np.int64)
    gpu_ns = np.zeros(size, dtype=np.int64)
    first_gpu = np.full(size, big, dtype=np.int64)
    last_gpu = np.full(size, -big, dtype=np.int64)
    all_starts = annotations.get_column("start_ns").to_numpy()
    all_ends = annotations.get_column("end_ns").to_numpy()
    # The columns are filled thread by thread in place (no per-thread copy of the rows), a
    # block of rows at a time (the temporaries of a 400k-range thread stay a few MB).
    threads = annotations.select(INSTANCE_KEYS).with_row_index("_row").group_by(INSTANCE_KEYS).agg(pl.col("_row"))
    order = threads.get_column("_row").explode().to_numpy().astype(np.int64)  # rows ascending per thread
    bounds = np.concatenate([[0], np.cumsum(threads.get_column("_row").list.len().to_numpy(), dtype=np.int64)])
    for index, (rank, pid, tid) in enumerate(threads.select(INSTANCE_KEYS).iter_rows()):
        launched = work.filter((pl.col("rank") == rank) & (pl.col("pid") == pid) & (pl.col("tid") == tid))
        launch_ns = launched.get_column("launch_ns").to_numpy()
        summed = np.concatenate([[0], np.cumsum(launched.get_column("gpu_ns").to_numpy())])
        acts = np.concatenate([[0], np.cumsum(launched.get_column("activities").to_numpy())])
        gpu_starts = launched.get_column("gpu_start_ns").to_numpy()
        gpu_ends = launched.get_column("gpu_end_ns").to_numpy()
        for block in range(bounds[index], bounds[index + 1], _BLOCK_ROWS):
            rows = order[block:min(block + _BLOCK_ROWS, bounds[index + 1])]
            first = np.searchsorted(launch_ns, all_starts[rows], side="left")
            last = np.searchsorted(launch_ns, all_ends[rows], side="right")
            launches[rows] = acts[last] - acts[first]
            gpu_ns[rows] = summed[last] - summed[first]
            first_gpu[rows] = _range_reduce(np.minimum, gpu_starts, first, last, big)
            last_gpu[rows] = _range_reduce(np.maximum, gpu_ends, first, last, -big)
    del threads, order, work
    launched_any = pl.col("launches") > 0  # the others have no first or last GPU time
    # Eager steps, not one lazy query: the lazy engine returns every column of a large
    # frame in pieces (one per morsel), and a frame of pieces is copied whole by the next
    # operation that needs its columns in one piece (the window expressions of the flags):
    # on an emit_nvtx flood with 4x its ranges the peak was 1,096 MiB so, 898 eager. Eager,
    # the annotations' columns are shared and the new ones are whole.
    return (
        annotations
        .with_columns(launches=pl.Series(launches), gpu_ns=pl.Series(gpu_ns),
                      first_gpu_start_ns=pl.Series(first_gpu), last_gpu_end_ns=pl.Series(last_gpu))
        .with_columns(
            first_gpu_start_ns=pl.when(launched_any).then(pl.col("first_gpu_start_ns")),
            last_gpu_end_ns=pl.when(launched_any).then(pl.col("last_gpu_end_ns")),
        )
        .with_columns(
            duration_ns=pl.col("end_ns") - pl.col("start_ns"),
            first_gpu_lag_ns=pl.col("first_gpu_start_ns") - pl.col("start_ns"),
            gpu_span_ns=pl.col("last_gpu_end_ns") - pl.col("first_gpu_start_ns"),
        )
    )


ANALYSIS = Analysis(name="range instances", phase="rank 3", function=range_instances, reads=("intervals", "gpu"),
                    returns="one row per annotation instance with its GPU work", field="range_instances")
