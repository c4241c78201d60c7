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
            ranges.filter(pl.col("tid").is_not_null() & ~pl.col("name").str.contains(LIBRARY_RANGES))
            .select(*THREAD, "name", pl.col("depth").fill_null(0).cast(pl.Int64), "start_ns", "end_ns")
            .sort(*THREAD, "start_ns", "depth")
            .with_row_index("node")
            .with_columns(pl.col("node").cast(pl.Int64))
        )
        # The parent is the latest-starting range of the same thread one level up that
        # starts no later than the child and ends no earlier.
        parents = ranges.select(
            *THREAD, (pl.col("depth") + 1).alias("depth"), pl.col("start_ns").alias("_p_start"),
            pl.col("end_ns").alias("_p_end"), pl.col("node").alias("parent"),
        ).sort("_p_start")
        with_parent = (
            ranges.sort("start_ns")
            .join_asof(parents, left_on="start_ns", right_on="_p_start", by=[*THREAD, "depth"],
                       strategy="backward", check_sortedness=False)
            .with_columns(parent=pl.when(pl.col("_p_end") >= pl.col("end_ns")).then(pl.col("parent")))
            .sort("node")
        )
        self.frame = with_parent.drop("_p_start", "_p_end")
        self.parent = self.frame.get_column("parent").fill_null(-1).to_numpy()
        self.start = self.frame.get_column("start_ns").to_numpy()
        self.end = self.frame.get_column("end_ns").to_numpy()
        self.names = self.frame.get_column("name").to_list()
        self.max_depth = int(self.frame.get_column("depth").max() or 0) if self.frame.height else 0

    def innermost(self, points: pl.DataFrame, *, time_column: str, until: str | None = None) -> np.ndarray:
        """Node of the innermost range holding each point (``-1`` where none does).

        ``points`` has the thread keys and ``time_column``; with ``until`` the range must hold
        the whole span ``[time_column, until]``.
        """
        if points.is_empty() or self.frame.is_empty():
            return np.full(points.height, -1, dtype=np.int64)
        starts = self.frame.select(*THREAD, pl.col("start_ns").alias("_t"), "node").sort("_t")
        keyed = points.select(
            *[pl.col(c).cast(self.frame.schema[c]) for c in THREAD],
            pl.col(time_column).alias("_t"),
            (pl.col(until) if until else pl.col(time_column)).alias("_until"),
        ).with_row_index("_row")
        found = (
            keyed.sort("_t")
            .join_asof(starts, on="_t", by=THREAD, strategy="backward", check_sortedness=False)
            .sort("_row")
        )
        node = found.get_column("node").fill_null(-1).to_numpy().astype(np.int64)
        until_ns = found.get_column("_until").to_numpy()
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
        """A path string per node (``""`` for -1), built one nesting level at a time."""
        nodes = np.asarray(nodes, dtype=np.int64)
        if self.frame.is_empty():
            return pl.Series([""] * nodes.size, dtype=pl.String)
        names = self.frame.get_column("name")
        out = pl.Series([None] * nodes.size, dtype=pl.String)
        current = nodes.copy()
        for _ in range(self.max_depth + 1):
            has = current >= 0
            if not has.any():
                break
            level = pl.select(
                pl.when(pl.Series(has)).then(names.gather(np.where(has, current, 0)))
            ).to_series()
            out = pl.select(
                pl.when(level.is_null()).then(out)
                .when(out.is_null()).then(level)
                .otherwise(pl.concat_str([level, pl.lit(PATH_SEPARATOR), out]))
            ).to_series()
            current = np.where(has, self.parent[np.where(has, current, 0)], -1)
        return out.fill_null("")


def join_path(parts: list[str]) -> str:
    """A place's path for reading."""
    return PATH_SEPARATOR.join(p for p in parts if p)
