"""Anomalous steps and range instances, where their time went, and why.

**Steps.** Baselines are robust and local. A step is compared with the median of its
neighbours on the same rank (``window`` steps either side, outliers left out), so a warm-up
phase or a slow drift is not called an anomaly, while a single step that stands out from the
steps around it is. How far it must stand out follows the rank's own noise: the robust
spread of the steps' ratios to their baselines (1.4826 × MAD); a step is flagged when its
ratio exceeds ``1 + sigmas × spread``, kept between ``min_ratio`` (+15%) and ``max_ratio``
(+50%: a step half again as long as its neighbours is slow however noisy the run), and it is
longer by at least ``min_excess_ns``. +30% is flagged on a run whose steps vary by ±3%; +20%
is not on one that varies by ±7%. Steps at least ``min_ratio`` above the median of all their
neighbours are candidates, left out of every baseline and of the spread estimate. Where more than a fifth of the steps would be flagged and they are alike (the
longest within the flag ratio of the shortest), they are a second mode of the run (every fourth step runs
the optimizer), and only steps that stand out from that mode too are kept. The *last* step of a rank has no next step to cap its window: it holds
the drain of the GPU queue the host filled ahead of time. It is judged on its CPU-side
marker and the GPU time of the work launched inside it (``judged_ns``), not on its window.

**Range instances** (every ``GroupedLinear forward layer2.fc1``...) are compared with the
distribution of the same name on the same rank: with at least ``min_range_instances``
instances, an instance is flagged when it is ``range_ratio`` times the name's 90th
percentile, longer than its median by ``min_range_excess_ns`` and by ``sigmas`` robust
deviations. A name whose long instances are not rare (more than ``max_range_flag_share`` of
them, a heavy tail, or long in more than a quarter of the steps) is not flagged at all: its
long instances are its normal behaviour.

**Findings.** Each anomalous step, and each anomalous range instance (inside flagged steps
too), is a finding. A step finding lists the *places* (:mod:`traceinsight.analysis.places`)
that together explain most of its excess, largest first: CPU gaps placed on the annotation
path of the launching thread, and GPU time placed on the range that *launched* it (through
the launch correlation, backward's thread included), each against the typical step. A range
finding whose excess lies within a flagged range instance nested inside it is folded into
that deepest one; a range that only waited for GPU work launched elsewhere is not blamed.

**Causes** (:data:`CAUSES`): ``cpu_gap.<cause>`` from the CPU-gap evidence of the place
(``cpu_gap`` alone where the trace holds none), ``host_sync``, ``gpu_compute``, ``gpu_memory``,
``communication``, ``cross_rank_wait``, ``unknown``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import polars as pl

from traceinsight.analysis.categories import CATEGORIES
from traceinsight.analysis.classify import GAP_CAUSES
from traceinsight.analysis.places import LIBRARY_RANGES, PATH_SEPARATOR, RangeTree, join_path

__all__ = ["LIBRARY_RANGES"]

CAUSES = (
    *(f"cpu_gap.{c}" for c in GAP_CAUSES if c not in ("unknown", "host_sync")),
    "cpu_gap",
    "host_sync",
    "gpu_compute",
    "gpu_memory",
    "communication",
    "cross_rank_wait",
    "unknown",
)

MAD_TO_SIGMA = 1.4826
#: Above this share of flagged steps the slow steps are a mode of the run, not outliers.
MODE_SHARE = 0.2


@dataclass(frozen=True)
class AnomalyOptions:
    """Thresholds of the anomaly detector (see the module docstring)."""

    window: int = 5
    min_ratio: float = 1.15
    max_ratio: float = 1.5
    sigmas: float = 5.0
    min_excess_ns: int = 1_000_000
    range_ratio: float = 3.0
    min_range_excess_ns: int = 1_000_000
    min_range_instances: int = 8
    max_range_flag_share: float = 0.05


def _robust_sigma(values: np.ndarray) -> float:
    if values.size == 0:
        return 0.0
    median = np.median(values)
    return float(MAD_TO_SIGMA * np.median(np.abs(values - median)))


def _local_median(durations: np.ndarray, window: int, usable: np.ndarray) -> np.ndarray:
    """The baseline of each step: the median of its usable neighbours within ``window`` steps
    on each side, taken per side, and the *higher* of the two sides where both have one.

    A step that stands out from both sides is a spike; one that is like the steps on one
    side is the edge of a phase (warm-up, a change of batch size), not an anomaly. Falls
    back to the median of all usable steps where no neighbour is usable.
    """
    n = durations.size
    fallback = np.median(durations[usable]) if usable.any() else np.median(durations)
    out = np.empty(n, dtype=np.float64)
    for i in range(n):  # steps per rank are few (tens to thousands): a plain loop is fine
        left = durations[max(0, i - window):i][usable[max(0, i - window):i]]
        right = durations[i + 1:i + 1 + window][usable[i + 1:i + 1 + window]]
        sides = [np.median(side) for side in (left, right) if side.size]
        out[i] = max(sides) if sides else fallback
    return out


def _threshold(ratios: np.ndarray, options: AnomalyOptions) -> float:
    """``1 + sigmas × spread``, kept between ``min_ratio`` and ``max_ratio``."""
    band = options.sigmas * _robust_sigma(ratios)
    return 1.0 + float(np.clip(band, options.min_ratio - 1.0, options.max_ratio - 1.0))


def judged_durations(steps: pl.DataFrame, gpu: pl.DataFrame | None) -> pl.DataFrame:
    """Add ``launched_gpu_ns`` (busy time of the GPU work launched inside each step's marker)
    and ``judged_ns``: the step's duration, except for the last step of each rank, which is
    judged on the longer of its marker and its launched GPU work (never more than its window).

    Reads the step table and the GPU activities; returns the step table with the two columns.
    """
    if "duration_ns" not in steps.columns:  # no breakdown (nothing to break down)
        steps = steps.with_columns(duration_ns=pl.col("end_ns") - pl.col("start_ns"))
    steps = steps.with_columns(launched_gpu_ns=pl.lit(0, pl.Int64))
    if gpu is not None and gpu.height and steps.height:
        launched = gpu.filter(pl.col("launch_start_ns").is_not_null()).select(
            "rank", "start_ns", "end_ns", "launch_start_ns")
        markers = steps.select("rank", "step", pl.col("start_ns").alias("_m_start"),
                               pl.col("marker_end_ns").alias("_m_end")).sort("_m_start")
        inside = (
            launched.sort("launch_start_ns")
            .join_asof(markers, left_on="launch_start_ns", right_on="_m_start", by="rank",
                       strategy="backward", check_sortedness=False)
            .filter(pl.col("launch_start_ns") <= pl.col("_m_end"))
            .sort("rank", "step", "start_ns")
        )
        # Busy time is the length of the union of the activities (streams overlap).
        busy = (
            inside.with_columns(_reach=pl.col("end_ns").cum_max().shift(1).over("rank", "step"))
            .with_columns(_block=(pl.col("_reach").is_null() | (pl.col("start_ns") > pl.col("_reach")))
                          .cum_sum().over("rank", "step"))
            .group_by("rank", "step", "_block")
            .agg(length=pl.col("end_ns").max() - pl.col("start_ns").min())
            .group_by("rank", "step")
            .agg(launched_gpu_ns=pl.col("length").sum().cast(pl.Int64))
        )
        steps = steps.drop("launched_gpu_ns").join(busy, on=["rank", "step"], how="left").with_columns(
            pl.col("launched_gpu_ns").fill_null(0))
    last = pl.col("start_ns") == pl.col("start_ns").max().over("rank")
    marker = pl.col("marker_end_ns") - pl.col("start_ns")
    return steps.with_columns(
        judged_ns=pl.when(last & (pl.len().over("rank") > 1))
        .then(pl.min_horizontal("duration_ns", pl.max_horizontal(marker, "launched_gpu_ns")))
        .otherwise(pl.col("duration_ns"))
    )


def flag_steps(steps: pl.DataFrame, options: AnomalyOptions = AnomalyOptions()) -> pl.DataFrame:
    """Add ``baseline_ns``, ``ratio``, ``threshold`` and ``anomalous`` to the step table (per rank).

    Two passes keep outliers out of their neighbours' baselines: steps that stand out from
    all their neighbours are candidates and are left out of every local median and of the
    spread estimate; every step is then judged against the median of its usable neighbours.
    Steps are judged on ``judged_ns`` where present (:func:`judged_durations`).

    Reads one rank's step table; returns it with the flag columns.

    Examples
    --------
    >>> flag_steps(breakdown.steps).filter("anomalous").select("rank", "step")  # doctest: +SKIP
    """
    frames = []
    column = "judged_ns" if "judged_ns" in steps.columns else "duration_ns"
    for _, rank_steps in steps.sort("rank", "step").group_by("rank", maintain_order=True):
        durations = rank_steps.get_column(column).to_numpy().astype(np.float64)
        if durations.size < 3:
            frames.append(rank_steps.with_columns(
                baseline_ns=pl.col(column).cast(pl.Float64), ratio=pl.lit(1.0),
                threshold=pl.lit(None, pl.Float64), anomalous=pl.lit(False)))
            continue
        # Pass 1: steps that stand out from all their neighbours are candidates. Pass 2: the
        # baseline of every step leaves the candidates out.
        raw = _local_median(durations, options.window, np.ones(durations.size, dtype=bool))
        usable = durations < options.min_ratio * raw
        if usable.sum() < 2:
            usable = np.ones(durations.size, dtype=bool)
        baseline = _local_median(durations, options.window, usable)
        ratio = durations / np.maximum(baseline, 1.0)
        threshold = _threshold(ratio[usable] if usable.any() else ratio, options)
        anomalous = (ratio >= threshold) & (durations - baseline >= options.min_excess_ns)
        slow = durations[anomalous]
        if slow.size >= 3 and slow.size > MODE_SHARE * durations.size \
                and slow.max() < threshold * slow.min():
            # Many slow steps alike (every fourth step runs the optimizer): a second mode of
            # the run, not outliers. Keep the steps that stand out from that mode too.
            anomalous &= durations >= threshold * np.median(slow)
        frames.append(rank_steps.with_columns(
            baseline_ns=pl.Series(baseline), ratio=pl.Series(ratio),
            threshold=pl.lit(float(threshold)), anomalous=pl.Series(anomalous)))
    if not frames:
        return steps.with_columns(
            baseline_ns=pl.lit(None, pl.Float64), ratio=pl.lit(None, pl.Float64),
            threshold=pl.lit(None, pl.Float64), anomalous=pl.lit(False))
    return pl.concat(frames, how="diagonal_relaxed")


def flag_job_steps(steps: pl.DataFrame, options: AnomalyOptions = AnomalyOptions()) -> pl.DataFrame:
    """Extend per-rank flags (:func:`flag_steps`) to the job.

    Ranks of one job meet at every collective, so a step that stands out on one rank is a
    slow step of the job: it is flagged on every rank where it is also ``min_ratio`` slower
    than that rank's baseline.

    Reads every rank's flagged steps; returns them with the job's flags.
    """
    job_slow = pl.col("anomalous").any().over("step") & (pl.col("ratio") >= options.min_ratio)
    return steps.with_columns(anomalous=pl.col("anomalous") | job_slow)


def assign_to_steps(frame: pl.DataFrame, steps: pl.DataFrame, *, time_column: str = "start_ns") -> pl.DataFrame:
    """Add ``step``: the step whose window holds ``time_column`` on the same rank (else null)."""
    windows = steps.select("rank", pl.col("start_ns").alias("_w_start"), pl.col("end_ns").alias("_w_end"),
                           pl.col("step")).sort("_w_start")
    if "step" in frame.columns:
        frame = frame.drop("step")
    return (
        frame.sort(time_column)
        .join_asof(windows, left_on=time_column, right_on="_w_start", by="rank",
                   strategy="backward", check_sortedness=False)
        .with_columns(step=pl.when(pl.col(time_column) < pl.col("_w_end")).then(pl.col("step")))
        .drop("_w_start", "_w_end")
    )


def flag_range_instances(instances: pl.DataFrame, options: AnomalyOptions = AnomalyOptions(), *,
                         first_is_warmup: bool = False) -> pl.DataFrame:
    """Add ``typical_ns`` (median of the same name and rank) and ``anomalous`` to range instances.

    Statistics per (rank, name) are one group-by joined back; see the module docstring for
    the rule. With ``first_is_warmup`` (a trace without a loop: no steps to set the first
    calls apart) the first instance of each name is not judged: first calls pay one-time
    costs (lazy module loading, library handles, autotuning).

    Reads the range instances (with their step and window breakdown); returns them with the two
    columns.
    """
    if instances.is_empty():
        return instances.with_columns(typical_ns=pl.lit(None, pl.Float64), anomalous=pl.lit(False))
    group = ["rank", "name"]
    stats = instances.group_by(group).agg(
        _count=pl.len(),
        typical_ns=pl.col("duration_ns").median(),
        _p90=pl.col("duration_ns").quantile(0.9, interpolation="lower"),
    )
    spread = (
        instances.select(*group, "duration_ns").join(stats.select(*group, "typical_ns"), on=group)
        .group_by(group)
        .agg(_sigma=(pl.col("duration_ns") - pl.col("typical_ns")).abs().median() * MAD_TO_SIGMA)
    )
    stats = stats.join(spread, on=group, how="left")
    excess = pl.col("duration_ns") - pl.col("typical_ns")
    flagged = (
        instances.drop("typical_ns", "anomalous", strict=False)
        .join(stats, on=group, how="left")
        .with_columns(
            _long=(pl.col("_count") >= options.min_range_instances)
            & (pl.col("duration_ns") >= options.range_ratio * pl.col("_p90"))
            & (excess >= options.min_range_excess_ns)
            & (excess > options.sigmas * pl.col("_sigma"))
        )
    )
    # Long instances that are not rare are the name's heavy tail, not anomalies.
    if first_is_warmup:
        flagged = flagged.with_columns(
            _long=pl.col("_long") & (pl.col("start_ns") != pl.col("start_ns").min().over(group)))
    rare = pl.col("_long").sum().over(group) <= pl.max_horizontal(
        pl.lit(1.0), options.max_range_flag_share * pl.col("_count"))
    if "step" in flagged.columns:
        # Long instances in many of the steps are what the name does, not an anomaly.
        steps_of_rank = pl.col("step").n_unique().over("rank")
        long_steps = pl.col("step").filter(pl.col("_long")).n_unique().over(group)
        rare = rare & ((steps_of_rank < 4) | (long_steps <= pl.max_horizontal(pl.lit(2.0), 0.25 * steps_of_rank)))
    return flagged.with_columns(anomalous=pl.col("_long") & rare).drop("_count", "_p90", "_sigma", "_long")


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
        self.cpu = _with_family(cpu.with_columns(self._cpu_keys(cpu)))
        self.gpu = _with_family(self._gpu_places(steps, gpu))

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
        places._totals = {}
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
            frame = self.cpu if side == "cpu" else self.gpu
            totals = frame.group_by("rank", "step", pl.col(level).alias("place")).agg(
                total_ns=pl.col("duration_ns").sum(), members=pl.col("key").n_unique())
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


def explain_steps(
    steps: pl.DataFrame,
    instances: pl.DataFrame,
    cpu_gaps: pl.DataFrame,
    *,
    which: pl.DataFrame | None = None,
    launch_counts: pl.DataFrame | None = None,
    gpu: pl.DataFrame | None = None,
    sync_pieces: pl.DataFrame | None = None,
    places: Places | None = None,
) -> list[dict]:
    """Where the time of each anomalous step went, and why (or of the steps in ``which``).

    Parameters
    ----------
    steps
        Flagged step table (:func:`flag_steps`) with the breakdown columns.
    instances
        Range instances with a ``step`` column (:func:`assign_to_steps`).
    cpu_gaps
        Attributed CPU gaps (:func:`~traceinsight.analysis.cpu_gaps.attribute_cpu_gaps`).
    launch_counts
        GPU activities launched per (rank, step) (:func:`launches_per_step`).
    gpu
        GPU activities with their launch calls: GPU time is placed where it was launched.
    sync_pieces
        The ``host_sync`` pieces of the breakdown: GPU idle while the host synchronized.
    places
        A :class:`Places` already built over the same frames.

    Returns
    -------
    list of dict
        ``rank, step, duration_ms, typical_ms, excess_ms, category, category_excess_ms,
        category_deltas_ms, where, cause, evidence, places, kernels, ranges``. ``places``
        lists the places that together explain most of the excess (``where`` is the first),
        ``kernels`` the kernels that grew, ``ranges`` the ranges whose time grew most.
    """
    targets = which if which is not None else steps.filter(pl.col("anomalous")).select("rank", "step")
    if targets.is_empty():
        return []
    if places is None:
        places = Places(steps, instances, cpu_gaps, gpu, sync_pieces)
    gap_totals = cpu_gaps.group_by("rank", "step", "cause").agg(total=pl.col("duration_ns").sum())
    results = []
    for rank, step in targets.iter_rows():
        rank_steps = steps.filter(pl.col("rank") == rank)
        this = rank_steps.filter(pl.col("step") == step)
        if this.is_empty():
            continue
        this = this.row(0, named=True)
        normal = rank_steps.filter(~pl.col("anomalous") & (pl.col("step") != step))
        if normal.is_empty():
            normal = rank_steps.filter(pl.col("step") != step)
        normal_steps = normal.get_column("step").to_list()
        typical = {c: float(normal.get_column(f"{c}_ns").median() or 0) for c in CATEGORIES}
        typical_duration = float(normal.get_column("duration_ns").median() or 0) if normal.height else 0.0
        judged = this.get("judged_ns") or this["duration_ns"]
        excess = judged - typical_duration
        deltas = {c: this[f"{c}_ns"] - typical[c] for c in CATEGORIES}
        category = max(deltas, key=deltas.get)
        waited = category == "cross_rank_wait"
        found = places.step_places(rank, step, normal_steps, excess_ns=excess, label=this["label"],
                                   cross_rank_wait=waited)
        kernels = places.kernel_changes(rank, step, normal_steps, limit=5)
        ranges = _range_excess(instances, rank, step, set(normal_steps))
        if found:
            where, cause = found[0]["where"], found[0]["cause"]
            if waited and deltas["cross_rank_wait"] >= 0.5 * max(excess, 1):
                cause = "cross_rank_wait"
        else:
            where = this["label"]
            cause, _ = _cause(category, cpu_gaps, gap_totals, rank, step, set(normal_steps))
        more_launches = None
        if launch_counts is not None:
            counts = launch_counts.filter(pl.col("rank") == rank)
            here = counts.filter(pl.col("step") == step).get_column("launches")
            usual = counts.filter(pl.col("step").is_in(normal_steps)).get_column("launches").median()
            if here.len() and usual and here[0] >= 1.5 * usual:
                more_launches = (f"the step launched {here[0]} GPU activities vs {usual:.0f} typically "
                                 f"({here[0] / usual:.1f}x)")
                # Host time that grew with the launches, without evidence of anything else.
                if cause == "cpu_gap":
                    cause = "cpu_gap.launch_overhead"
                    if found and found[0]["cause"] == "cpu_gap":
                        found[0]["cause"] = cause
        parts = [f"step {step} took {_ms(this['duration_ns'])} vs {_ms(typical_duration)} typical; "
                 f"{category} +{_ms(deltas[category])}"]
        if judged != this["duration_ns"]:
            parts[0] += (f" (the last step: judged on its marker and the GPU work it launched, "
                         f"{_ms(judged)}, not on the queue drain after it)")
        for index, place in enumerate(found, 1):
            parts.append(f"({index}) {place['where']}: +{_ms(place['excess_ms'] * 1e6)}, {place['cause']}: "
                         f"{place['evidence']}")
        if not found and category == "cpu_gap":
            parts.append("no single place holds the growth")
        gpu_growth = deltas["gpu_compute"] + deltas["gpu_memory"] + deltas["communication"]
        if kernels and gpu_growth > 0.1 * max(excess, 1) and not any(p["side"] == "gpu" for p in found):
            parts.append("kernels that grew: " + ", ".join(_kernel_text(k) for k in kernels[:3]))
        if more_launches:
            parts.append(more_launches)
        results.append({
            "rank": rank,
            "step": step,
            "duration_ms": round(this["duration_ns"] / 1e6, 3),
            "typical_ms": round(typical_duration / 1e6, 3),
            "excess_ms": round(excess / 1e6, 3),
            "category": category,
            "category_excess_ms": round(deltas[category] / 1e6, 3),
            "category_deltas_ms": {c: round(v / 1e6, 3) for c, v in deltas.items()},
            "where": where,
            "range": found[0].get("range") if found else None,
            "cause": cause,
            "evidence": ". ".join(parts),
            "places": found,
            "kernels": kernels,
            "ranges": ranges.head(8).to_dicts() if ranges.height else [],
        })
    return results


def launches_per_step(gpu: pl.DataFrame, steps: pl.DataFrame) -> pl.DataFrame:
    """GPU activities launched per (rank, step), by the launch call's time.

    Reads the GPU activities and the steps; returns ``rank, step, launches``."""
    launched = gpu.filter(pl.col("launch_start_ns").is_not_null()).select("rank", "launch_start_ns")
    if launched.is_empty():
        return pl.DataFrame(schema={"rank": pl.Int32, "step": pl.Int64, "launches": pl.UInt32})
    return (
        assign_to_steps(launched, steps, time_column="launch_start_ns")
        .filter(pl.col("step").is_not_null())
        .group_by("rank", "step")
        .agg(launches=pl.len())
    )


def _range_excess(instances: pl.DataFrame, rank: int, step: int, normal_steps: set[int]) -> pl.DataFrame:
    """Per annotation name: this step's total time against the typical step's, largest growth first."""
    ranked = instances.filter((pl.col("rank") == rank) & pl.col("step").is_not_null())
    if ranked.is_empty():
        return pl.DataFrame()
    per_step = ranked.group_by("name", "step").agg(
        total_ns=pl.col("duration_ns").sum(),
        depth=pl.col("depth").min(),
        launches=pl.col("launches").sum(),
        lag_ns=pl.col("first_gpu_lag_ns").max(),
        count=pl.len(),
    )
    this = per_step.filter(pl.col("step") == step)
    typical = (
        per_step.filter(pl.col("step").is_in(list(normal_steps)))
        .group_by("name")
        .agg(
            typical_ns=pl.col("total_ns").median(),
            typical_launches=pl.col("launches").median(),
            typical_lag_ns=pl.col("lag_ns").median(),
            typical_count=pl.col("count").median(),
        )
    )
    return (
        this.join(typical, on="name", how="left")
        .with_columns(
            pl.col("typical_ns").fill_null(0.0),
            pl.col("typical_launches").fill_null(0.0),
        )
        .with_columns(excess_ns=pl.col("total_ns") - pl.col("typical_ns"))
        .sort("excess_ns", descending=True)
        .select("name", "depth", "count", "total_ns", "typical_ns", "excess_ns", "launches",
                "typical_launches", "lag_ns", "typical_lag_ns")
    )


def _cause(category: str, cpu_gaps: pl.DataFrame, gap_totals: pl.DataFrame, rank: int, step: int,
           normal_steps: set[int]) -> tuple[str, str | None]:
    if category == "idle":
        return "unknown", None
    if category != "cpu_gap":
        return category, None
    per_step = gap_totals.filter(pl.col("rank") == rank)
    this = per_step.filter(pl.col("step") == step)
    n_normal = max(len(normal_steps), 1)
    typical = (
        per_step.filter(pl.col("step").is_in(list(normal_steps)))
        .group_by("cause")
        .agg(typical=pl.col("total").sum() / n_normal)
    )
    grown = this.join(typical, on="cause", how="left").with_columns(
        growth=pl.col("total") - pl.col("typical").fill_null(0.0)
    ).sort("growth", descending=True)
    if grown.is_empty():
        return "cpu_gap", None
    cause = grown.row(0, named=True)["cause"]
    evidence = (
        cpu_gaps.filter((pl.col("rank") == rank) & (pl.col("step") == step) & (pl.col("cause") == cause))
        .sort("duration_ns", descending=True)
        .select("evidence", "evidence_source", "duration_ns")
        .row(0, named=True)
    )
    text = None
    if evidence["evidence"]:
        text = f"{evidence['evidence_source']}: {evidence['evidence']}"
    if cause == "unknown":
        return "cpu_gap", text
    return f"cpu_gap.{cause}", text


def _gap_cause_in_window(cpu_gaps: pl.DataFrame, rank: int, start: int, end: int, *,
                         tid: int | None = None) -> tuple[str, str | None]:
    """The CPU-gap cause that covers most of ``[start, end)`` on ``rank`` (on thread ``tid``,
    whose launches the gaps waited for, where given), with its evidence."""
    inside = cpu_gaps.filter(
        (pl.col("rank") == rank) & (pl.col("end_ns") > start) & (pl.col("start_ns") < end)
    )
    if tid is not None:
        inside = inside.filter(pl.col("tid") == tid)
    inside = inside.with_columns(
        overlap=pl.min_horizontal("end_ns", pl.lit(end)) - pl.max_horizontal("start_ns", pl.lit(start))
    )
    if inside.is_empty():
        return "cpu_gap", None
    cause = inside.group_by("cause").agg(t=pl.col("overlap").sum()).sort(["t", "cause"], descending=[True, False]).row(0)[0]
    top = inside.filter(pl.col("cause") == cause).sort("overlap", descending=True).row(0, named=True)
    evidence = f"{top['evidence_source']}: {top['evidence']}" if top["evidence"] else None
    return _cause_name(cause), evidence


def _fold_nested(rows: list[dict]) -> list[dict]:
    """Drop a flagged range whose excess lies mostly in a flagged range nested inside it on
    the same thread: one stall is reported once, at the deepest range that holds it."""
    kept = []
    for outer in rows:
        inner = [
            r for r in rows
            if r is not outer and r["rank"] == outer["rank"] and r["tid"] == outer["tid"]
            and r["start_ns"] >= outer["start_ns"] and r["end_ns"] <= outer["end_ns"]
            and (r["start_ns"], r["end_ns"]) != (outer["start_ns"], outer["end_ns"])
        ]
        # Nested flagged ranges do not overlap one another only at one level; the largest
        # inner excess and their sum bound what the inner ranges explain.
        explained = max(max((r["excess_ns"] for r in inner), default=0),
                        sum(r["excess_ns"] for r in inner if not any(
                            o is not r and o["start_ns"] <= r["start_ns"] and r["end_ns"] <= o["end_ns"] for o in inner)))
        if explained < 0.5 * outer["excess_ns"]:
            kept.append(outer)
    return kept


#: The least share of the rank's median step a range finding must cost (with several steps).
MIN_STEP_SHARE = 0.03
#: Range findings listed per (rank, step), largest first.
MAX_RANGE_FINDINGS_PER_STEP = 5


def explain_range_instances(instances: pl.DataFrame, cpu_gaps: pl.DataFrame, *,
                            steps: pl.DataFrame | None = None, places: Places | None = None,
                            max_per_step: int = MAX_RANGE_FINDINGS_PER_STEP) -> list[dict]:
    """Each anomalous range instance as its own finding (inside flagged steps too).

    ``instances`` must carry the ``<category>_ns`` columns of their own window
    (:meth:`~traceinsight.analysis.breakdown.Breakdown.window_breakdown`): the category that
    grew most against the median instance of the same name decides the cause. Left out: a
    range on a thread that never launches GPU work (a loader or metrics thread cannot hold
    up the GPU), and a range that only *waited* for GPU work launched elsewhere (its window
    grew on the GPU side while its own launched GPU time did not): the step finding places
    that work where it was launched. Nested flagged ranges of one stall are folded into the
    deepest (:func:`_fold_nested`). At most ``max_per_step`` per (rank, step) are listed, the
    largest; ``others_in_step`` counts the anomalous instances of the step left out.

    Reads the flagged range instances, the CPU gaps and the steps; returns one record per
    finding (:data:`~traceinsight.analysis.schemas.ANOMALY_SCHEMA`, ``kind == "range"``).
    """
    flagged = instances.filter(pl.col("anomalous"))
    if flagged.is_empty():
        return []
    launching = instances.group_by("rank", "pid", "tid").agg(_l=pl.col("launches").sum()).filter(pl.col("_l") > 0)
    flagged = flagged.join(launching.select("rank", "pid", "tid"), on=["rank", "pid", "tid"], how="semi")
    columns = [f"{c}_ns" for c in CATEGORIES]
    typical = instances.group_by("rank", "name").agg(
        *[pl.col(c).median().alias(f"typical_{c}") for c in columns],
        typical_gpu_ns=pl.col("gpu_ns").median(),
        typical_lag_ns=pl.col("first_gpu_lag_ns").median(),
    )
    labels, floor = {}, {}
    if steps is not None and steps.height:
        labels = {(r, s): label for r, s, label in steps.select("rank", "step", "label").iter_rows()}
        # A place worth naming costs its step a noticeable share: a 1 ms stall in a 1 s step
        # is noise, in a 10 ms step it is not.
        if steps.height > 1:
            floor = {r: MIN_STEP_SHARE * (d or 0) for r, d in
                     steps.group_by("rank").agg(pl.col("duration_ns").median()).iter_rows()}
    rows = []
    for row in flagged.join(typical, on=["rank", "name"], how="left").sort("duration_ns", descending=True).iter_rows(named=True):
        row["excess_ns"] = row["duration_ns"] - row["typical_ns"]
        if row["excess_ns"] < floor.get(row["rank"], 0):
            continue
        deltas = {c: row[f"{c}_ns"] - (row[f"typical_{c}_ns"] or 0) for c in CATEGORIES}
        category = max(deltas, key=deltas.get)
        own_gpu_growth = (row["gpu_ns"] or 0) - (row["typical_gpu_ns"] or 0)
        if category in ("gpu_compute", "gpu_memory", "communication", "idle") and own_gpu_growth < 0.5 * row["excess_ns"]:
            continue  # it waited for work launched before it
        row["_deltas"], row["_category"] = deltas, category
        rows.append(row)
    # The largest few of a step are findings; a step with many more (a flood of long small
    # ops) says how many it left out rather than listing them all.
    kept, left_out = [], {}
    for row in sorted(_fold_nested(rows), key=lambda r: -r["excess_ns"]):
        key = (row["rank"], row["step"])
        if sum(1 for k in kept if (k["rank"], k["step"]) == key) >= max_per_step:
            left_out[key] = left_out.get(key, 0) + 1
        else:
            kept.append(row)
    out = []
    for row in kept:
        deltas, category = row["_deltas"], row["_category"]
        gap_evidence = None
        if category == "cpu_gap":
            cause, gap_evidence = _gap_cause_in_window(cpu_gaps, row["rank"], row["start_ns"], row["end_ns"],
                                                       tid=row["tid"])
        elif category == "idle":
            cause = "unknown"
        else:
            cause = category
        path = places.path_of(row) if places is not None else [row["name"]]
        label = labels.get((row["rank"], row["step"]))
        where = join_path([label, *path]) if label and label not in path else join_path(path)
        lag = row["first_gpu_lag_ns"]
        text = (f"{row['name']} took {_ms(row['duration_ns'])} vs {_ms(row['typical_ns'])} typical"
                + (f" in step {row['step']}" if row["step"] is not None else "")
                + f"; {category} +{_ms(deltas[category])} inside it")
        if lag is not None and lag - (row["typical_lag_ns"] or 0) > 0.25 * max(row["excess_ns"], 1):
            text += f"; its first GPU work started {_ms(lag)} after it began (typically {_ms(row['typical_lag_ns'])})"
        if gap_evidence:
            text += f". CPU during the gaps, {gap_evidence}"
        elif category == "cpu_gap":
            text += ". No CPU sample, OS call, Python function or op covers the gaps: the trace cannot tell what the host did"
        out.append({
            "kind": "range",
            "rank": row["rank"],
            "step": row["step"],
            "excess_ms": round(row["excess_ns"] / 1e6, 3),
            "where": where,
            "name": row["name"],
            "duration_ms": round(row["duration_ns"] / 1e6, 3),
            "typical_ms": round(row["typical_ns"] / 1e6, 3),
            "lag_ms": None if lag is None else round(lag / 1e6, 3),
            "category": category,
            "cause": cause,
            "evidence": text,
            "start_ns": row["start_ns"],
            "others_in_step": left_out.get((row["rank"], row["step"]), 0),
        })
    return out
