"""Where in the program a moment of a thread belongs: the annotation path around it.

A finding names a *place*: the nesting path of annotations (NVTX ranges, ``record_function``
labels) around the moment that matters, on the thread that matters, e.g.
``ProfilerStep#20 › layer3 › GroupedLinear.forward[layer3.fc2]``. Two kinds of moments:

- a CPU gap (the GPU idle, waiting for the host): the deepest range on the launching thread
  that holds the whole gap; where no range holds it, the position between ranges (``before
  layer0.attention``);
- a GPU activity: the range around its *launch call* on the launching thread (through the
  correlation id), so GPU work is placed where it was launched, not where the host later
  waited for it; on a thread without ranges (autograd's backward thread) the innermost
  framework op around the launch (``aten::add_``).

Annotations are properly nested per thread, so the innermost range around a time ``t`` is
the latest-starting one that has not ended, or one of its ancestors: found with one as-of
join and a few vectorized walks up the parent chain (one per nesting level).
"""

from __future__ import annotations

import numpy as np
import polars as pl

THREAD = ["rank", "pid", "tid"]
#: Separator of the elements of a place's path.
PATH_SEPARATOR = " › "
#: Annotations that name a library's call rather than a place in the model.
LIBRARY_RANGES = (r"(?i)^(?:nccl|rccl|c10d::|record_param_comms|ProfilerStep#|cub::|deep_ep|cuda(?:Graph)?Launch"
                  r"|gloo:|mpi:|ucc:)|^nccl:")


class RangeTree:
    """The annotation ranges of a trace with their parents, per thread.

    Parameters
    ----------
    ranges
        ``rank, pid, tid, name, depth, start_ns, end_ns`` (e.g. range instances); library
        ranges are left out.
    """

    def __init__(self, ranges: pl.DataFrame) -> None:
        ranges = (
            ranges.filter(pl.col("tid").is_not_null() & pl.col("start_ns").is_not_null() & pl.col("end_ns").is_not_null()
                          & ~pl.col("name").str.contains(LIBRARY_RANGES))
            .select(*THREAD, "name", pl.col("depth").fill_null(0).cast(pl.Int64), "start_ns", "end_ns")
        )
        ranges = sorted_rows(ranges, [*THREAD, "start_ns", "depth"]).with_row_index("node").with_columns(
            pl.col("node").cast(pl.Int64))
        # The parent is the latest-starting range of the same thread one level up that
        # starts no later than the child and ends no earlier. Nodes are numbered in (thread,
        # start, depth) order, so that is the last node one level up numbered before the
        # child, if it is on the same thread and has not ended: a sorted search per level.
        depth = ranges.get_column("depth").to_numpy()
        end = ranges.get_column("end_ns").to_numpy()
        runs = _thread_runs(ranges)
        thread_first = ranges.select(THREAD).join(runs, on=THREAD, how="left", nulls_equal=True, maintain_order="left") \
            .get_column("_first").to_numpy()
        parent = np.full(ranges.height, -1, dtype=np.int64)
        levels = np.unique(depth) if ranges.height else []
        for level in levels:
            children = np.flatnonzero(depth == level)
            above = np.flatnonzero(depth == level - 1)
            if not above.size:
                continue
            at = np.searchsorted(above, children) - 1
            candidate = np.where(at >= 0, above[np.maximum(at, 0)], -1)
            ok = (candidate >= thread_first[children]) & (end[np.maximum(candidate, 0)] >= end[children])
            parent[children] = np.where(ok, candidate, -1)
        self._adopt(ranges.with_columns(parent=pl.Series(parent).replace(-1, None)), runs)

    @classmethod
    def from_frame(cls, frame: pl.DataFrame) -> RangeTree:
        """The tree whose :attr:`frame` is ``frame`` (nodes numbered in (thread, start,
        depth) order, each with its parent), as a findings cache keeps it."""
        tree = cls.__new__(cls)
        tree._adopt(frame)
        return tree

    def _adopt(self, frame: pl.DataFrame, runs: pl.DataFrame | None = None) -> None:
        self.frame = frame
        self._runs = runs if runs is not None else _thread_runs(frame)
        self.parent = self.frame.get_column("parent").fill_null(-1).to_numpy()
        self.start = self.frame.get_column("start_ns").to_numpy()
        self.end = self.frame.get_column("end_ns").to_numpy()
        self.names = self.frame.get_column("name")
        self._paths: pl.Series | None = None
        self.max_depth = int(self.frame.get_column("depth").max() or 0) if self.frame.height else 0

    def innermost(self, points: pl.DataFrame, *, time_column: str, until: str | None = None) -> np.ndarray:
        """Node of the innermost range holding each point (``-1`` where none does).

        ``points`` has the thread keys and ``time_column``; with ``until`` the range must hold
        the whole span ``[time_column, until]``.
        """
        if points.is_empty() or self.frame.is_empty():
            return np.full(points.height, -1, dtype=np.int64)
        # Nodes are numbered in (thread, start, depth) order, so each thread's nodes are one
        # run of node numbers with sorted starts: the latest range starting at or before t
        # (the deepest of those starting together) is one sorted search in that run.
        keyed = points.select(
            *[pl.col(c).cast(self.frame.schema[c]) for c in THREAD],
            pl.col(time_column).alias("_t"),
            (pl.col(until) if until else pl.col(time_column)).alias("_until"),
        ).join(self._runs, on=THREAD, how="left", maintain_order="left")
        # A point without a time is in no range; a span without an end is held by any.
        timed = keyed.get_column("_t").is_not_null().to_numpy()
        times = keyed.get_column("_t").fill_null(0).to_numpy()
        until_ns = keyed.get_column("_until").fill_null(np.iinfo(np.int64).min).to_numpy()
        first = keyed.get_column("_first").fill_null(0).to_numpy()
        last = keyed.get_column("_last").fill_null(-1).to_numpy()
        node = np.full(points.height, -1, dtype=np.int64)
        known = timed & (last >= first)
        for begin in np.unique(first[known]):
            rows = np.flatnonzero(known & (first == begin))
            end = int(last[rows[0]]) + 1
            found = np.searchsorted(self.start[begin:end], times[rows], side="right") - 1
            node[rows] = np.where(found >= 0, found + begin, -1)
        # Walk up while the candidate ended before the span does (nesting depth bounds it).
        for _ in range(self.max_depth + 1):
            has = node >= 0
            safe = np.where(has, node, 0)
            outside = has & (self.end[safe] < until_ns)
            if not outside.any():
                break
            node = np.where(outside, self.parent[safe], node)
        return node

    def path(self, node: int, *, skip: tuple[str, ...] = ()) -> list[str]:
        """Names from the outermost range down to ``node``."""
        names = []
        while node >= 0:
            if self.names[node] not in skip:
                names.append(self.names[node])
            node = int(self.parent[node])
        return names[::-1]

    def outermost_many(self, nodes: np.ndarray) -> np.ndarray:
        """The outermost ancestor of every node (itself without a parent; ``-1`` stays ``-1``),
        one nesting level at a time."""
        nodes = np.asarray(nodes, dtype=np.int64).copy()
        for _ in range(self.max_depth + 1):
            has = nodes >= 0
            parent = np.where(has, self.parent[np.where(has, nodes, 0)], -1)
            up = parent >= 0
            if not up.any():
                break
            nodes = np.where(up, parent, nodes)
        return nodes

    def keys(self, nodes: np.ndarray) -> pl.Series:
        """A path string per node (``""`` for -1)."""
        nodes = np.asarray(nodes, dtype=np.int64)
        if self.frame.is_empty():
            return pl.Series([""] * nodes.size, dtype=pl.String)
        paths = self._all_paths()
        return pl.select(
            pl.when(pl.Series(nodes >= 0)).then(paths.gather(np.where(nodes >= 0, nodes, 0))).otherwise(pl.lit(""))
        ).to_series()

    def _all_paths(self) -> pl.Series:
        """Every node's path, built once, one nesting level at a time: a parent is exactly
        one level up, so its path is complete before its children's."""
        if self._paths is None:
            paths = self.frame.get_column("name").clone()
            depth = self.frame.get_column("depth").to_numpy()
            for level in range(1, self.max_depth + 1):
                children = np.flatnonzero((depth == level) & (self.parent >= 0))
                if children.size:
                    joined = pl.select(pl.concat_str([
                        paths.gather(self.parent[children]), pl.lit(PATH_SEPARATOR),
                        paths.gather(children)])).to_series()
                    paths = paths.scatter(children, joined)
            self._paths = paths
        return self._paths


def _thread_runs(nodes: pl.DataFrame) -> pl.DataFrame:
    """Per thread, its first and last node number (a thread's nodes are one run)."""
    return nodes.group_by(THREAD).agg(_first=pl.col("node").min(), _last=pl.col("node").max())


def sorted_rows(frame: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    """``frame`` sorted by the integer columns ``by`` (the first most significant), ties in
    their order: numpy's stable lexsort and one gather take a third of the time of polars'
    multi-column sort on a few hundred thousand rows."""
    if frame.height < 2:
        return frame
    keys = []
    for column in reversed(by):
        values = frame.get_column(column)
        keys.append(values.fill_null(0).to_numpy())
        if values.null_count():
            keys.append(~values.is_null().to_numpy())  # nulls first, as polars sorts them
    return frame[np.lexsort(keys)]


def join_path(parts: list[str]) -> str:
    """A place's path for reading."""
    return PATH_SEPARATOR.join(p for p in parts if p)
