"""Where every nanosecond of every step went, per rank.

Each step window (see :mod:`traceinsight.analysis.analyzers.steps`) is partitioned into the categories
below; they are disjoint, so they sum to the step's duration exactly. The GPU timeline of a
rank is the union of its kernels, copies and memsets on all its streams.

``gpu_compute``
    At least one non-communication kernel is running.
``gpu_memory``
    No compute kernel runs, but a memcpy or memset does.
``communication``
    Only communication kernels run (NCCL/RCCL, DeepEP, custom all-reduce; see
    :data:`~traceinsight.analysis.classify.DEFAULT_COMM_PATTERNS`): the exposed transfer part.
``cross_rank_wait``
    The part of exposed communication during which this rank was waiting for another rank
    to arrive (from the multi-rank analysis; 0 for a single rank, where waiting cannot be
    told from transfer).
``host_sync``
    The GPU is idle because the host waited for it: the GPU ran dry while the launching host
    thread was inside a synchronizing call (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``,
    blocking copies, ``.item()``), from that moment until the next GPU work starts, counting
    at most :data:`SYNC_REFILL_ALLOWANCE_NS` after the call returned (the refill of an emptied
    queue). Idle time that overlaps a synchronizing call is host_sync too.
``cpu_gap``
    The GPU is idle because the host had not yet launched the next GPU work: the launch call of
    the activity that ends the idle period started after the GPU ran dry (within
    :data:`LAUNCH_LATENCY_NS`). :mod:`traceinsight.analysis.analyzers.cpu_gap_causes` says what the host did.
``idle``
    Everything else: the GPU is idle although its next work was already queued (waiting on an
    event or another stream), the launch of the next work is not in the trace, or no GPU work
    follows in the step.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from traceinsight.analysis import intervals as iv
from traceinsight.analysis.analyzers.gpu_activities import gpu_activities
from traceinsight.analysis.breakdown_result import Breakdown
from traceinsight.analysis.categories import CATEGORIES
from traceinsight.analysis.classify import DEFAULT_COMM_PATTERNS, host_sync_expr
from traceinsight.analysis.descriptor import Analysis
from traceinsight.analysis.step_table import StepTable
from traceinsight.model import TraceModel

__all__ = ["step_breakdown"]


#: A launch that started up to this long before the GPU ran dry still counts as "not yet
#: launched": the driver needs a few microseconds to get a kernel onto the GPU.
LAUNCH_LATENCY_NS = 20_000
#: After a synchronizing call returns, the host must refill an empty queue; GPU idle time up
#: to this long after the return is charged to the sync, longer host work to ``cpu_gap``.
SYNC_REFILL_ALLOWANCE_NS = 100_000


def step_breakdown(
    model: TraceModel,
    steps: StepTable,
    *,
    waits: pl.DataFrame | None = None,
    comm_patterns: tuple[str, ...] = DEFAULT_COMM_PATTERNS,
    gpu: pl.DataFrame | None = None,
) -> Breakdown:
    """Partition every step window of every rank into :data:`CATEGORIES`.

    Reads the model's intervals, the steps, the GPU activities and the wait spans; returns the
    time per category of every step and the GPU-idle pieces.

    Parameters
    ----------
    model
        The trace model.
    steps
        From :func:`~traceinsight.analysis.analyzers.steps.find_steps`.
    waits
        Optional intervals (``rank, start_ns, end_ns``) during which a rank waited for others
        inside a collective (multi-rank analysis); their overlap with exposed communication
        becomes ``cross_rank_wait``.
    comm_patterns
        Regular expressions naming communication kernels.
    gpu
        :func:`gpu_activities` of the model if already computed (``comm_patterns`` is then
        not used).

    Returns
    -------
    Breakdown

    Examples
    --------
    >>> table = find_steps(model)  # doctest: +SKIP
    >>> step_breakdown(model, table).steps.select("step", "cpu_gap_ns")  # doctest: +SKIP
    """
    if gpu is None:
        gpu = gpu_activities(model, comm_patterns=comm_patterns)
    sync_rows = model.intervals.lazy().filter(host_sync_expr()).select("rank", "start_ns", "end_ns").collect()
    step_frames: list[pl.DataFrame] = []
    gap_frames: list[pl.DataFrame] = []
    all_sets: dict[int, dict[str, iv.IntervalSet]] = {}
    for rank in steps.steps.get_column("rank").unique().sort().to_list():
        rank_steps = steps.steps.filter(pl.col("rank") == rank).sort("start_ns")
        rank_gpu = gpu.filter(pl.col("rank") == rank)
        rank_waits = (
            waits.filter(pl.col("rank") == rank) if waits is not None and waits.height else None
        )
        sets, gaps = _partition_rank(
            rank_gpu,
            sync_rows.filter(pl.col("rank") == rank),
            rank_steps,
            rank_waits,
        )
        all_sets[rank] = sets
        window_starts = rank_steps.get_column("start_ns").to_numpy()
        window_ends = rank_steps.get_column("end_ns").to_numpy()
        columns = {
            f"{name}_ns": iv.overlap_per_window(sets[name], window_starts, window_ends)
            for name in CATEGORIES
            if name != "idle"
        }
        duration = window_ends - window_starts
        accounted = np.sum(list(columns.values()), axis=0) if columns else 0
        columns["idle_ns"] = duration - accounted
        step_frames.append(
            rank_steps.with_columns(
                duration_ns=pl.Series(duration, dtype=pl.Int64),
                **{k: pl.Series(v, dtype=pl.Int64) for k, v in columns.items()},
            )
        )
        gap_frames.append(gaps.with_columns(rank=pl.lit(rank, dtype=pl.Int32)))
    steps_out = pl.concat(step_frames) if step_frames else steps.steps
    gaps_out = (
        pl.concat(gap_frames, how="vertical_relaxed") if gap_frames else _empty_gaps()
    )
    return Breakdown(steps=steps_out, gaps=gaps_out, gpu=gpu, sets=all_sets)


def _empty_gaps() -> pl.DataFrame:
    return pl.DataFrame(
        schema={
            "rank": pl.Int32,
            "step": pl.Int64,
            "start_ns": pl.Int64,
            "end_ns": pl.Int64,
            "category": pl.String,
            "pid": pl.Int64,
            "tid": pl.Int64,
            "next_name": pl.String,
        }
    )


def _as_set(frame: pl.DataFrame) -> iv.IntervalSet:
    if frame.is_empty():
        return iv.EMPTY
    return iv.merge(frame.get_column("start_ns").to_numpy(), frame.get_column("end_ns").to_numpy())


def _partition_rank(
    gpu: pl.DataFrame,
    sync_rows: pl.DataFrame,
    steps: pl.DataFrame,
    waits: pl.DataFrame | None,
) -> tuple[dict[str, iv.IntervalSet], pl.DataFrame]:
    compute = _as_set(gpu.filter(~pl.col("is_comm") & (pl.col("kind") == "kernel")))
    memory = iv.subtract(_as_set(gpu.filter(pl.col("kind") != "kernel")), compute)
    comm = iv.subtract(iv.subtract(_as_set(gpu.filter(pl.col("is_comm"))), compute), memory)
    wait_set = _as_set(waits) if waits is not None else iv.EMPTY
    cross_rank_wait = iv.intersect(comm, wait_set)
    communication = iv.subtract(comm, wait_set)
    busy = iv.merge(
        np.concatenate([compute[0], memory[0], comm[0]]),
        np.concatenate([compute[1], memory[1], comm[1]]),
    )
    lo = int(steps.get_column("start_ns").min())
    hi = int(steps.get_column("end_ns").max())
    gap_starts, gap_ends = iv.complement(busy, lo, hi)

    # The activity that ends each gap: the first one starting at the gap's end.
    activity = gpu.select("start_ns", "launch_start_ns", "launch_pid", "launch_tid", "name").sort("start_ns")
    act_start = activity.get_column("start_ns").to_numpy()
    launch_start = activity.get_column("launch_start_ns").fill_null(np.iinfo(np.int64).min).to_numpy()
    has_launch = activity.get_column("launch_start_ns").is_not_null().to_numpy()
    index = np.searchsorted(act_start, gap_ends, side="left")
    found = index < act_start.size
    safe = np.clip(index, 0, max(act_start.size - 1, 0))
    if act_start.size:
        found &= act_start[safe] == gap_ends
        found &= has_launch[safe]
        next_launch = launch_start[safe]
    else:
        next_launch = np.zeros(gap_ends.size, dtype=np.int64)
    host_caused = found & (next_launch >= gap_starts - LAUNCH_LATENCY_NS)

    # Host syncs: when the GPU ran dry inside one, charge the gap until the call returned plus
    # the refill allowance; any other overlap of a gap with a sync is a host wait too.
    syncs = _as_set(sync_rows)
    in_sync_at_start = iv.covered(syncs, gap_starts)
    sync_index = np.clip(np.searchsorted(syncs[0], gap_starts, side="right") - 1, 0, None)
    sync_return = syncs[1][sync_index] if syncs[0].size else np.zeros(gap_starts.size, np.int64)
    drained = host_caused & in_sync_at_start
    drained_set = iv.merge(
        gap_starts[drained],
        np.minimum(gap_ends[drained], sync_return[drained] + SYNC_REFILL_ALLOWANCE_NS),
    )
    host_gaps = iv.merge(gap_starts[host_caused], gap_ends[host_caused])
    host_sync = iv.merge(
        np.concatenate([drained_set[0], iv.intersect(host_gaps, syncs)[0]]),
        np.concatenate([drained_set[1], iv.intersect(host_gaps, syncs)[1]]),
    )
    cpu_gap = iv.subtract(host_gaps, host_sync)
    idle_set = iv.subtract(iv.merge(gap_starts, gap_ends), host_gaps)

    sets = {
        "gpu_compute": compute,
        "gpu_memory": memory,
        "communication": communication,
        "cross_rank_wait": cross_rank_wait,
        "host_sync": host_sync,
        "cpu_gap": cpu_gap,
    }
    gaps = _gap_pieces(
        {"host_sync": host_sync, "cpu_gap": cpu_gap, "idle": idle_set},
        steps,
        gap_ends=gap_ends,
        next_index=np.where(found, safe, -1),
        activity=activity,
    )
    return sets, gaps


def _gap_pieces(
    sets: dict[str, iv.IntervalSet],
    steps: pl.DataFrame,
    *,
    gap_ends: np.ndarray,
    next_index: np.ndarray,
    activity: pl.DataFrame,
) -> pl.DataFrame:
    """Split gap sets at step boundaries and label each piece with its step and next work."""
    window_starts = steps.get_column("start_ns").to_numpy()
    window_ends = steps.get_column("end_ns").to_numpy()
    step_numbers = steps.get_column("step").to_numpy()
    cut_points = np.unique(np.concatenate([window_starts, window_ends]))
    frames = []
    act_pid = activity.get_column("launch_pid").fill_null(-1).to_numpy() if activity.height else np.zeros(0, np.int64)
    act_tid = activity.get_column("launch_tid").fill_null(-1).to_numpy() if activity.height else act_pid
    # Names stay a polars column, gathered by index: no Python string per activity or piece.
    act_name = activity.get_column("name").cast(pl.String)
    for category, (starts, ends) in sets.items():
        if starts.size == 0:
            continue
        points = np.unique(np.concatenate([starts, ends, cut_points]))
        left, right = points[:-1], points[1:]
        inside = iv.covered((starts, ends), left)
        left, right = left[inside], right[inside]
        window = iv.holding(window_starts, window_ends, left)
        in_window = window >= 0
        left, right, window = left[in_window], right[in_window], window[in_window]
        if left.size == 0:  # an empty frame's columns would have no type to concatenate with
            continue
        # The gap a piece belongs to ends at the first gap end at or after the piece's end.
        gap = np.clip(np.searchsorted(gap_ends, right, side="left"), 0, max(gap_ends.size - 1, 0))
        nxt = next_index[gap] if gap_ends.size else np.full(left.size, -1)
        has_next = nxt >= 0
        safe = np.clip(nxt, 0, None)
        frames.append(
            pl.DataFrame(
                {
                    "step": step_numbers[window].astype(np.int64),
                    "start_ns": left,
                    "end_ns": right,
                    "category": pl.repeat(category, left.size, dtype=pl.String, eager=True),
                    "pid": np.where(has_next, act_pid[safe] if act_pid.size else 0, -1),
                    "tid": np.where(has_next, act_tid[safe] if act_tid.size else 0, -1),
                    "next_name": act_name.gather(safe) if act_name.len()
                    else pl.repeat("", left.size, dtype=pl.String, eager=True),
                    "_has_next": has_next,
                }
            ).with_columns(next_name=pl.when("_has_next").then("next_name")).drop("_has_next")
        )
    if not frames:
        return _empty_gaps().drop("rank")
    out = pl.concat(frames).with_columns(
        pl.col("pid").replace(-1, None).cast(pl.Int64),
        pl.col("tid").replace(-1, None).cast(pl.Int64),
        pl.col("next_name").cast(pl.String),
    )
    # Adjacent pieces of one gap and category inside one step are one piece.
    return _coalesce(out).sort("start_ns")


def _coalesce(pieces: pl.DataFrame) -> pl.DataFrame:
    pieces = pieces.sort("category", "start_ns")
    new_piece = (
        (pl.col("start_ns") != pl.col("end_ns").shift(1))
        | (pl.col("category") != pl.col("category").shift(1))
        | (pl.col("step") != pl.col("step").shift(1))
    ).fill_null(True)
    return (
        pieces.with_columns(_piece=new_piece.cum_sum())
        .group_by("_piece", maintain_order=True)
        .agg(
            pl.col("step").first(),
            pl.col("start_ns").first(),
            pl.col("end_ns").last(),
            pl.col("category").first(),
            pl.col("pid").last(),
            pl.col("tid").last(),
            pl.col("next_name").last(),
        )
        .drop("_piece")
    )


ANALYSIS = Analysis(name="step breakdown", phase="rank 2", function=step_breakdown,
                    reads=("intervals", "steps", "gpu", "wait spans"),
                    returns="time per category per step, and the gap pieces")
