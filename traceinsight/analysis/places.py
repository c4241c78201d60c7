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

:class:`Places` places the CPU gaps and GPU work of a set of ranks once per analysis; step
findings compare each place's time in a step with the typical step's.
:func:`anomaly_range` reads the innermost range back from a finding.
"""

from __future__ import annotations

import re

import numpy as np
import polars as pl

from traceinsight.analysis.step_table import assign_to_steps

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
        # The columns first, and the rows kept and their order as one gather: filtering and
        # then sorting would copy the range instances' columns twice.
        ranges = ranges.select(*THREAD, "name", pl.col("depth").fill_null(0).cast(pl.Int64), "start_ns", "end_ns")
        kept = np.flatnonzero(ranges.select(
            pl.col("tid").is_not_null() & pl.col("start_ns").is_not_null() & pl.col("end_ns").is_not_null()
            & ~pl.col("name").str.contains(LIBRARY_RANGES)).to_series().fill_null(False).to_numpy())
        ranges = sorted_rows(ranges, [*THREAD, "start_ns", "depth"], rows=kept).with_row_index("node").with_columns(
            pl.col("node").cast(pl.Int64))
        # The parent is the latest-starting range of the same thread one level up that
        # starts no later than the child and ends no earlier. Nodes are numbered in (thread,
        # start, depth) order, so that is the last node one level up numbered before the
        # child, if it is on the same thread and has not ended: a sorted search per level.
        depth = ranges.get_column("depth").to_numpy()
        end = ranges.get_column("end_ns").to_numpy()
        runs = _thread_runs(ranges)
        # Each thread's nodes are one run, and the runs cover the nodes in order: each node's
        # thread starts at the first node of the run it is in.
        firsts = np.sort(runs.get_column("_first").to_numpy())
        thread_first = np.repeat(firsts, np.diff(np.r_[firsts, ranges.height]))
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
        self._paths: tuple[np.ndarray, pl.Series] | None = None
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
        path_of_node, texts = self._all_paths()
        known = nodes >= 0
        return pl.select(
            pl.when(pl.Series(known)).then(texts.gather(path_of_node[np.where(known, nodes, 0)]))
            .otherwise(pl.lit(""))
        ).to_series()

    def drop_paths(self) -> None:
        """Forget every node's path (:meth:`keys` builds them again if asked)."""
        self._paths = None

    def _all_paths(self) -> tuple[np.ndarray, pl.Series]:
        """Every node's path as a number, and the text of each number.

        Nodes with the same names down the same chain of parents share a number, and each
        distinct path is written once: a trace repeats the same few thousand paths in every
        step, and one string per node would cost as much as the nodes themselves (tens of
        MB on an emit_nvtx flood). Built one nesting level at a time: a parent is exactly
        one level up, so its number is known before its children's.
        """
        if self._paths is None:
            names = self.frame.get_column("name")
            codes = names.rank("dense").fill_null(0).to_numpy().astype(np.int64)
            width = int(codes.max()) + 1
            depth = self.frame.get_column("depth").to_numpy()
            path_of_node = np.full(self.frame.height, -1, dtype=np.int64)
            texts = pl.Series("path", [], dtype=pl.String)
            for level in np.unique(depth):
                members = np.flatnonzero(depth == level)
                parent = self.parent[members]
                parent_path = np.where(parent >= 0, path_of_node[np.maximum(parent, 0)], -1)
                # (parent's path, own name) as one integer: at most (nodes + 1) * names
                _, first, inverse = np.unique((parent_path + 1) * width + codes[members],
                                              return_index=True, return_inverse=True)
                path_of_node[members] = inverse.reshape(-1) + texts.len()
                below = parent_path[first]
                own = names.gather(members[first])
                level_texts = pl.select(
                    pl.when(pl.Series(below >= 0))
                    .then(pl.concat_str([texts.gather(np.maximum(below, 0)) if texts.len() else own,
                                         pl.lit(PATH_SEPARATOR), own]))
                    .otherwise(own)
                ).to_series()
                texts = pl.concat([texts, level_texts.alias("path")])
            self._paths = (path_of_node, texts)
        return self._paths


def _thread_runs(nodes: pl.DataFrame) -> pl.DataFrame:
    """Per thread, its first and last node number (a thread's nodes are one run)."""
    return nodes.group_by(THREAD).agg(_first=pl.col("node").min(), _last=pl.col("node").max())


def sorted_rows(frame: pl.DataFrame, by: list[str], *, rows: np.ndarray | None = None) -> pl.DataFrame:
    """``frame`` (only its ``rows``, where given) sorted by the integer columns ``by`` (the
    first most significant), ties in their order: numpy's stable lexsort and one gather take
    a third of the time of polars' multi-column sort on a few hundred thousand rows."""
    if rows is None and frame.height < 2:
        return frame
    keys = []
    for column in reversed(by):
        values = frame.get_column(column) if rows is None else frame.get_column(column).gather(rows)
        keys.append(values.fill_null(0).to_numpy())
        if values.null_count():
            keys.append(~values.is_null().to_numpy())  # nulls first, as polars sorts them
    order = np.lexsort(keys)
    return frame[order if rows is None else rows[order]]


def join_path(parts: list[str]) -> str:
    """A place's path for reading."""
    return PATH_SEPARATOR.join(p for p in parts if p)


def _ms(ns: float | None) -> str:
    return "?" if ns is None else f"{ns / 1e6:.1f} ms"


def anomaly_range(anomaly: dict) -> str | None:
    """The innermost range a finding names (its ``where`` is the whole nesting path): a range
    finding's ``name``, a step finding's ``range`` (the range of its first place)."""
    named = anomaly.get("range") or anomaly.get("name")
    if named:
        return named
    where = anomaly.get("where") or ""
    return where.split(PATH_SEPARATOR)[-1] or None


def _cause_name(cause: str | None) -> str:
    """The finding vocabulary for a CPU-gap cause."""
    if cause in (None, "unknown", "unresolved"):
        return "cpu_gap"
    if cause == "host_sync":
        return "host_sync"
    return f"cpu_gap.{cause}"


def _busiest_thread(frame: pl.DataFrame, column: str) -> dict[int, int]:
    """Per rank, the value of ``column`` (a thread id) that most rows carry."""
    counts = (
        frame.filter(pl.col(column).is_not_null())
        .group_by("rank", column).agg(n=pl.len())
        .sort(["rank", "n", column], descending=[False, True, False])
        .unique("rank", keep="first", maintain_order=True)
    )
    return dict(counts.select("rank", column).iter_rows())


def _main_threads(steps: pl.DataFrame, gpu: pl.DataFrame | None) -> dict[int, int]:
    """Per rank, the thread the program's loop runs on: the one holding the step markers,
    else the one that launched most GPU work."""
    out = {}
    if gpu is not None and gpu.height and "launch_tid" in gpu.columns:
        out.update(_busiest_thread(gpu, "launch_tid"))
    if steps.height and "tid" in steps.columns:
        out.update(_busiest_thread(steps, "tid"))
    return out


class Places:
    """CPU gaps and GPU work of a set of ranks, each with the place it belongs to.

    Built once per analysis (:mod:`traceinsight.analysis.places` explains the rules); step
    findings compare each place's time in a step with the typical step's.
    """

    def __init__(self, steps: pl.DataFrame, instances: pl.DataFrame, cpu_gaps: pl.DataFrame,
                 gpu: pl.DataFrame | None, sync_pieces: pl.DataFrame | None = None) -> None:
        self.tree = RangeTree(instances) if instances.height else None
        self.instances = instances
        self.main = _main_threads(steps, gpu)
        pieces = [cpu_gaps.select("rank", "step", "start_ns", "end_ns", "pid", "tid", "cause", "evidence",
                                  "evidence_source")] if cpu_gaps.height else []
        if sync_pieces is not None and sync_pieces.height:
            pieces.append(sync_pieces.select(
                "rank", "step", "start_ns", "end_ns", "pid", "tid", cause=pl.lit("host_sync"),
                evidence=pl.lit(None, pl.String), evidence_source=pl.lit("cuda api")))
        cpu = pl.concat(pieces, how="vertical_relaxed") if pieces else pl.DataFrame(
            schema={"rank": pl.Int32, "step": pl.Int64, "start_ns": pl.Int64, "end_ns": pl.Int64,
                    "pid": pl.Int64, "tid": pl.Int64, "cause": pl.String, "evidence": pl.String,
                    "evidence_source": pl.String})
        cpu = cpu.with_columns(duration_ns=pl.col("end_ns") - pl.col("start_ns"),
                               _mid=(pl.col("start_ns") + pl.col("end_ns")) // 2)
        self._totals: dict[tuple[str, str], dict[tuple, pl.DataFrame]] = {}
        self._key_totals: dict[str, pl.DataFrame] = {}
        self.cpu = _with_family(cpu.with_columns(self._cpu_keys(cpu)))
        self.gpu = _with_family(self._gpu_places(steps, gpu))

    def drop_caches(self) -> None:
        """Forget what was kept to answer many questions quickly: each node's path (built to
        key the CPU gaps and GPU work) and the per-step totals of :meth:`step_places`. Both
        are made again if asked for; an analysis drops them once the step findings are made
        (on an emit_nvtx flood, 60 MB at 1.8M range instances)."""
        self._totals, self._key_totals = {}, {}
        if self.tree is not None:
            self.tree.drop_paths()

    def frames(self) -> dict[str, pl.DataFrame]:
        """What :meth:`from_frames` needs to rebuild these places without their joins: the
        placed CPU gaps and GPU work, and the range tree."""
        return {"place_cpu": self.cpu, "place_gpu": self.gpu,
                "place_tree": self.tree.frame if self.tree is not None else pl.DataFrame()}

    @classmethod
    def from_frames(cls, steps: pl.DataFrame, instances: pl.DataFrame, gpu: pl.DataFrame | None, *,
                    place_cpu: pl.DataFrame, place_gpu: pl.DataFrame, place_tree: pl.DataFrame) -> Places:
        """The places :meth:`frames` described (from a findings cache), over the same
        steps, range instances and GPU activities."""
        places = cls.__new__(cls)
        places.tree = RangeTree.from_frame(place_tree) if place_tree.height else None
        places.instances = instances
        places.main = _main_threads(steps, gpu)
        places._totals, places._key_totals = {}, {}
        places.cpu, places.gpu = place_cpu, place_gpu
        return places

    def _key_column(self, nodes: np.ndarray) -> pl.Series:
        if self.tree is None:
            return pl.Series([""] * nodes.size, dtype=pl.String)
        nodes = np.asarray(nodes, dtype=np.int64)
        unique, index = np.unique(np.where(nodes >= 0, nodes, -1), return_inverse=True)
        paths = self.tree.keys(unique)  # "" for -1
        return paths.gather(index.astype(np.int64))

    def _cpu_keys(self, cpu: pl.DataFrame) -> list[pl.Series]:
        if cpu.is_empty() or self.tree is None:
            return [pl.Series("key", ["outside any range"] * cpu.height, dtype=pl.String),
                    pl.Series("node", [-1] * cpu.height, dtype=pl.Int64)]
        # The range holding the middle of the gap: where the host spent it. A gap in no range
        # sits before the range the host launched from when it ended.
        node = self.tree.innermost(cpu, time_column="_mid")
        at_end = self.tree.innermost(cpu, time_column="end_ns")
        on_main, main_node = self._on_main_thread(cpu, "_mid")
        outer = self.tree.outermost_many(at_end)
        names = self.tree.frame.get_column("name")
        outer_name = names.gather(np.where(outer >= 0, outer, 0))
        key = (
            pl.select(
                pl.when(pl.Series(node) >= 0).then(self._key_column(node))
                # A thread without ranges of its own (autograd's backward thread) works for
                # the loop thread, which sits in its own range meanwhile.
                .when(~pl.Series(on_main) & (pl.Series(main_node) >= 0))
                .then(pl.format("{} (thread {})", self._key_column(main_node), cpu.get_column("tid")))
                .when(pl.Series(outer) >= 0).then(pl.format("before {}", outer_name))
                .otherwise(pl.lit("outside any range"))
                .alias("key")
            ).to_series()
        )
        return [key, pl.Series("node", node, dtype=pl.Int64)]

    def _on_main_thread(self, frame: pl.DataFrame, time_column: str) -> tuple[np.ndarray, np.ndarray]:
        """Whether each row's thread is its rank's loop thread, and the innermost range of
        the loop thread at ``time_column``."""
        main = pl.col("rank").replace_strict(self.main, default=None, return_dtype=pl.Int64)
        on_main = frame.select((pl.col("tid") == main).fill_null(False)).to_series().to_numpy()
        if self.tree is None or not self.main:
            return on_main, np.full(frame.height, -1, dtype=np.int64)
        as_main = frame.with_columns(tid=main.cast(frame.schema["tid"]))
        pids = self.tree.frame.filter(pl.col("tid").is_in(list(self.main.values()))).group_by("rank", "tid").agg(
            pid=pl.col("pid").first())
        as_main = as_main.drop("pid").join(pids, on=["rank", "tid"], how="left", maintain_order="left")
        return on_main, self.tree.innermost(as_main, time_column=time_column)

    def _gpu_places(self, steps: pl.DataFrame, gpu: pl.DataFrame | None) -> pl.DataFrame:
        schema = {"rank": pl.Int32, "step": pl.Int64, "name": pl.String, "is_comm": pl.Boolean,
                  "kind": pl.String, "stream": pl.Int64, "duration_ns": pl.Int64, "key": pl.String}
        if gpu is None or gpu.is_empty() or "launch_start_ns" not in gpu.columns:
            return pl.DataFrame(schema=schema)
        launched = gpu.filter(pl.col("launch_start_ns").is_not_null()).select(
            "rank", "name", "kind", "is_comm", pl.col("stream").cast(pl.Int64), "start_ns", "end_ns", "launch_start_ns",
            pl.col("launch_pid").alias("pid"), pl.col("launch_tid").alias("tid"))
        launched = assign_to_steps(launched, steps, time_column="launch_start_ns").filter(
            pl.col("step").is_not_null())
        if launched.is_empty():
            return pl.DataFrame(schema=schema)
        node = (self.tree.innermost(launched, time_column="launch_start_ns") if self.tree is not None
                else np.full(launched.height, -1, dtype=np.int64))
        keys = self._key_column(node)
        on_main, main_node = (self._on_main_thread(launched, "launch_start_ns") if self.tree is not None
                              else (np.ones(launched.height, dtype=bool), np.full(launched.height, -1)))
        main_keys = self._key_column(main_node)
        return launched.with_columns(
            duration_ns=pl.col("end_ns") - pl.col("start_ns"),
            key=pl.when(pl.Series(node) >= 0).then(keys)
            .when(pl.Series(on_main)).then(pl.lit("outside any range"))
            # Launched from a thread without ranges (autograd's backward thread) while the
            # loop thread sat in a range: the work belongs there.
            .when(pl.Series(main_node) >= 0).then(pl.format("{} (thread {})", main_keys, pl.col("tid")))
            .otherwise(pl.format("thread {}, outside any range", pl.col("tid"))),
        ).select(list(schema))

    def step_places(self, rank: int, step: int, normal_steps: list[int], *, excess_ns: float,
                    label: str, cross_rank_wait: bool = False, limit: int = 5) -> list[dict]:
        """The places that together explain most of the step's excess, largest first."""
        n_normal = max(len(normal_steps), 1)
        grown = []
        for side in ("cpu", "gpu"):
            for level in ("key", "family"):
                per_step = self._per_step(side, level).get((rank,))
                if per_step is None:
                    continue
                typical = (per_step.filter(pl.col("step").is_in(normal_steps)).group_by("place")
                           .agg(typical_ns=pl.col("total_ns").sum() / n_normal))
                rows = (
                    per_step.filter(pl.col("step") == step).join(typical, on="place", how="left")
                    .with_columns(pl.col("typical_ns").fill_null(0.0), side=pl.lit(side), level=pl.lit(level))
                    .with_columns(excess_ns=pl.col("total_ns") - pl.col("typical_ns"))
                    .filter(pl.col("excess_ns") > 0)
                )
                if level == "family":
                    rows = rows.filter(pl.col("members") >= 2)
                grown.append(rows)
        if not grown:
            return []
        ranked = pl.concat(grown, how="vertical_relaxed")
        # The same block of every layer is one place when the growth is spread over the
        # layers (4x attention in each of 3 layers), not when one layer holds it.
        members = ranked.filter(pl.col("level") == "key")
        family_of = {place: _family_of(place) for place in members.get_column("place").to_list()}
        best_member: dict[tuple[str, str], float] = {}
        for side, place, excess in members.select("side", "place", "excess_ns").iter_rows():
            family = family_of.get(place, place)
            best_member[(side, family)] = max(best_member.get((side, family), 0.0), excess)
        rows = []
        for row in ranked.sort(["excess_ns", "place"], descending=[True, False]).iter_rows(named=True):
            if row["level"] == "family" and row["excess_ns"] < 1.5 * best_member.get((row["side"], row["place"]), 0.0):
                continue
            rows.append(row)
        chosen, covered, used = [], 0.0, set()
        floor = max(0.1 * excess_ns, 1_000_000) if excess_ns > 0 else 1_000_000
        for row in rows:
            # Every place worth a tenth of the excess, up to ``limit``: a step whose excess is
            # mostly one stall may still hold a second anomalous place worth naming.
            if len(chosen) >= limit or row["excess_ns"] < floor or (excess_ns > 0 and covered >= 0.98 * excess_ns):
                break
            family = row["place"] if row["level"] == "family" else family_of.get(row["place"], row["place"])
            if (row["side"], family) in used:
                continue  # a layer's share of a family already named, or the reverse
            used.add((row["side"], family))
            chosen.append(row)
            covered += row["excess_ns"]
        return [self._describe(rank, step, normal_steps, row, label, cross_rank_wait) for row in chosen]

    def _per_step(self, side: str, level: str) -> dict[tuple, pl.DataFrame]:
        """Time and distinct member places per (step, place) of each rank, made once for all
        the flagged steps."""
        cached = self._totals.get((side, level))
        if cached is None:
            # One group-by of the placed rows per side, by key; a family's totals and its
            # distinct member keys follow from its keys' totals (the family is a function of
            # the key), without grouping the rows again.
            keys = self._key_totals.get(side)
            if keys is None:
                frame = self.cpu if side == "cpu" else self.gpu
                keys = self._key_totals[side] = frame.group_by("rank", "step", "key", "family").agg(
                    total_ns=pl.col("duration_ns").sum())
            if level == "key":
                totals = keys.select("rank", "step", pl.col("key").alias("place"), "total_ns",
                                     members=pl.lit(1, pl.UInt32))
            else:
                totals = keys.group_by("rank", "step", pl.col("family").alias("place")).agg(
                    total_ns=pl.col("total_ns").sum(), members=pl.len())
            cached = self._totals[(side, level)] = totals.partition_by("rank", as_dict=True, include_key=False)
        return cached

    def _display(self, key: str, label: str) -> str:
        if key == "outside any range":
            return f"{label} (outside any range)"
        return join_path([label, key])

    def _describe(self, rank: int, step: int, normal_steps: list[int], row: dict, label: str,
                  cross_rank_wait: bool) -> dict:
        level = row["level"]
        row = {**row, "key": row["place"]}
        plain_path = (level == "key" and not row["key"].startswith(("before ", "thread ", "outside any range"))
                      and "(thread " not in row["key"])
        place = {"where": self._display(row["key"], label), "side": row["side"],
                 "range": row["key"].split(PATH_SEPARATOR)[-1] if plain_path and row["key"] else None,
                 "ms": round(row["total_ns"] / 1e6, 3), "typical_ms": round(row["typical_ns"] / 1e6, 3),
                 "excess_ms": round(row["excess_ns"] / 1e6, 3)}
        if level == "family":
            place["ranges"] = int(row["members"])
            place["where"] += f" ({int(row['members'])} ranges)"
        if row["side"] == "cpu":
            here = self.cpu.filter((pl.col("rank") == rank) & (pl.col("step") == step) & (pl.col(level) == row["key"]))
            by_cause = here.group_by("cause").agg(t=pl.col("duration_ns").sum()).sort(["t", "cause"], descending=[True, False])
            cause = by_cause.item(0, "cause") if by_cause.height else None
            top = here.filter(pl.col("cause") == cause).sort("duration_ns", descending=True).row(0, named=True)
            place["cause"] = _cause_name(cause)
            text = f"the GPU waited {_ms(row['total_ns'])} for the host here (typically {_ms(row['typical_ns'])})"
            if cause == "host_sync":
                text += "; the host had drained the GPU queue with a synchronizing call"
            if top["evidence"]:
                text += f"; {top['evidence_source']}: {top['evidence']}"
            elif cause in (None, "unknown"):
                text += "; no CPU sample, OS call, Python function or op covers it: the trace cannot tell what the host did"
            lag = self._lag(rank, int(top["node"]))
            if lag:
                text += f"; {lag}"
            place["evidence"] = text
        else:
            kernels = self.kernel_changes(rank, step, normal_steps, key=row["key"], level=level, limit=3)
            comm = self.gpu.filter((pl.col("rank") == rank) & (pl.col("step") == step) & (pl.col(level) == row["key"]))
            comm_share = (comm.filter(pl.col("is_comm")).get_column("duration_ns").sum() /
                          max(comm.get_column("duration_ns").sum(), 1))
            memory_share = (comm.filter(pl.col("kind") != "kernel").get_column("duration_ns").sum() /
                            max(comm.get_column("duration_ns").sum(), 1))
            if comm_share >= 0.5:
                place["cause"] = "cross_rank_wait" if cross_rank_wait else "communication"
            else:
                place["cause"] = "gpu_memory" if memory_share >= 0.5 else "gpu_compute"
            text = (f"the GPU work launched here took {_ms(row['total_ns'])} vs {_ms(row['typical_ns'])} typically"
                    f" (by launch, whichever range later waited for it)")
            if kernels:
                text += "; kernels that grew: " + ", ".join(_kernel_text(k) for k in kernels)
            streams = self._stream_growth(rank, step, normal_steps, level, row["key"])
            if streams:
                text += f"; {streams}"
            place["evidence"] = text
            place["kernels"] = kernels
        return place

    def _stream_growth(self, rank: int, step: int, normal_steps: list[int], level: str, key: str) -> str | None:
        """Where the place's GPU work runs on several streams: the stream whose time grew most."""
        mine = self.gpu.filter((pl.col("rank") == rank) & (pl.col(level) == key) & pl.col("stream").is_not_null())
        here = mine.filter(pl.col("step") == step)
        if here.get_column("stream").n_unique() < 2:
            return None
        n_normal = max(len(normal_steps), 1)
        per = (
            here.group_by("stream").agg(t=pl.col("duration_ns").sum())
            .join(mine.filter(pl.col("step").is_in(normal_steps)).group_by("stream")
                  .agg(typical=pl.col("duration_ns").sum() / n_normal), on="stream", how="left")
            .with_columns(growth=pl.col("t") - pl.col("typical").fill_null(0.0))
            .sort(["growth", "stream"], descending=[True, False])
        )
        top = per.row(0, named=True)
        if top["growth"] <= 0:
            return None
        total = max(float(per.get_column("growth").clip(lower_bound=0).sum()), 1.0)
        return (f"on {here.get_column('stream').n_unique()} streams, stream {top['stream']} grew most "
                f"(+{_ms(top['growth'])}, {top['growth'] / total:.0%} of the growth)")

    def _lag(self, rank: int, node: int) -> str | None:
        """The lag from a range's start to its first GPU work, when it is large."""
        if self.tree is None or node < 0:
            return None
        row = self.tree.frame.row(node, named=True)
        match = self.instances.filter(
            (pl.col("rank") == rank) & (pl.col("tid") == row["tid"]) & (pl.col("start_ns") == row["start_ns"])
            & (pl.col("end_ns") == row["end_ns"])
        )
        if match.is_empty() or "first_gpu_lag_ns" not in match.columns:
            return None
        lag = match.item(0, "first_gpu_lag_ns")
        if lag is None or lag < 1_000_000:
            return None
        return f"{row['name']} began {_ms(lag)} before its first GPU work started"

    def kernel_changes(self, rank: int, step: int, normal_steps: list[int], *, key: str | None = None,
                       level: str = "key", limit: int = 5) -> list[dict]:
        """Kernels (by launch) whose time in the step grew most against the typical step."""
        mine = self.gpu.filter(pl.col("rank") == rank)
        if key is not None:
            mine = mine.filter(pl.col(level) == key)
        if mine.is_empty():
            return []
        n_normal = max(len(normal_steps), 1)
        per_step = mine.group_by("step", "name").agg(count=pl.len(), total_ns=pl.col("duration_ns").sum())
        typical = (per_step.filter(pl.col("step").is_in(normal_steps)).group_by("name")
                   .agg(typical_count=pl.col("count").sum() / n_normal,
                        typical_ns=pl.col("total_ns").sum() / n_normal))
        table = (
            per_step.filter(pl.col("step") == step).join(typical, on="name", how="left")
            .with_columns(pl.col("typical_count", "typical_ns").fill_null(0.0))
            .with_columns(excess_ns=pl.col("total_ns") - pl.col("typical_ns"))
            .filter(pl.col("excess_ns") > 0)
            .sort(["excess_ns", "name"], descending=[True, False])
            .head(limit)
        )
        return [
            {"name": r["name"], "count": int(r["count"]), "typical_count": round(float(r["typical_count"]), 1),
             "ms": round(r["total_ns"] / 1e6, 3), "typical_ms": round(r["typical_ns"] / 1e6, 3),
             "excess_ms": round(r["excess_ns"] / 1e6, 3)}
            for r in table.iter_rows(named=True)
        ]

    def path_of(self, row: dict) -> list[str]:
        """The annotation path of a range instance (outermost first)."""
        if self.tree is None:
            return [row["name"]]
        frame = self.tree.frame
        match = frame.filter(
            (pl.col("rank") == row["rank"]) & (pl.col("tid") == row["tid"]) & (pl.col("start_ns") == row["start_ns"])
            & (pl.col("end_ns") == row["end_ns"]) & (pl.col("name") == row["name"])
        )
        if match.is_empty():
            return [row["name"]]
        return self.tree.path(int(match.item(0, "node")))


#: An index inside a range name: ``layer3``, ``layers.3``, ``block_3``, ``h.3``, ``[3]``; but
#: not the ``1`` of ``fc1`` (a different block, not another copy of the same one).
_INDEX = re.compile(r"(?i)(?:(?<=[._/\[\s#-])|(?<=layer)|(?<=layers)|(?<=block)|(?<=blocks))\d+")


def _family_of(key: str) -> str:
    """The place of the same block in every layer (``layer*.attention``)."""
    return _INDEX.sub("*", key)


def _with_family(frame: pl.DataFrame) -> pl.DataFrame:
    if frame.is_empty():
        return frame.with_columns(family=pl.lit(None, pl.String))
    keys = frame.get_column("key").unique().to_list()
    return frame.with_columns(family=pl.col("key").replace_strict({k: _family_of(k) for k in keys},
                                                                  return_dtype=pl.String))


def _kernel_text(kernel: dict) -> str:
    text = f"{kernel['name']} +{_ms(kernel['excess_ms'] * 1e6)}"
    if kernel["count"] != round(kernel["typical_count"]):
        text += f" ({kernel['count']} launches vs {kernel['typical_count']:.0f})"
    return text


def _innermost_names(annotations: pl.DataFrame, rows: pl.DataFrame) -> list:
    """For each row (``rank, pid, tid, t``), the name of the deepest annotation of its thread
    that contains ``t`` (None where none does)."""
    names_out = np.full(rows.height, None, dtype=object)
    if annotations.is_empty() or rows.is_empty():
        return names_out.tolist()
    rows = rows.with_row_index("_i").filter(pl.col("tid").is_not_null())
    # Ranges of one depth on one thread do not overlap: a sorted search finds the candidate
    # at each depth; the deepest one that contains the time wins.
    for (rank, pid, tid), part in rows.group_by("rank", "pid", "tid"):
        thread = annotations.filter((pl.col("rank") == rank) & (pl.col("pid") == pid) & (pl.col("tid") == tid))
        if thread.is_empty():
            continue
        times = part.get_column("t").to_numpy()
        best = np.full(times.size, None, dtype=object)
        for depth in sorted(thread.get_column("depth").unique().to_list()):
            level = thread.filter(pl.col("depth") == depth).sort("start_ns")
            starts = level.get_column("start_ns").to_numpy()
            ends = level.get_column("end_ns").to_numpy()
            names = level.get_column("name").to_numpy()
            at = np.searchsorted(starts, times, side="right") - 1
            inside = (at >= 0) & (times <= ends[np.clip(at, 0, None)])
            best[inside] = names[at[inside]]
        names_out[part.get_column("_i").to_numpy()] = best
    return names_out.tolist()
