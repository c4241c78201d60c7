"""Find the training/inference steps of each rank.

A step is an annotation (NVTX range, ``record_function`` or ``ProfilerStep#N``) whose name
matches a step marker. Its number is the integer captured from the name, so
``ProfilerStep#8`` is step 8 and NVTX ``step 7`` is step 7.

The step's *window* is where its time is accounted: from the marker's start to the later of
the marker's end and the end of the last GPU activity launched inside the marker, but never
past the next step's start on the same rank (so windows never overlap and a step's breakdown
can partition its window).

Where no annotation carries a number, a common habit is one range of the same name around
every iteration (``train_step``, ``fwd_bwd``, ``iteration``): the shallowest annotation name
that repeats at least :data:`MIN_REPEATS` times on one thread, holds most of the GPU launches
and covers most of the time from its first to its last instance marks the steps, numbered by
order from 0. Only without either kind of marker the whole trace is one step (number 0).
``StepTable.source`` says which rule found the steps.
"""

from __future__ import annotations

import re

import numpy as np
import polars as pl

from traceinsight.analysis.classify import LAUNCH_API
from traceinsight.analysis.descriptor import Analysis
from traceinsight.analysis.step_table import STEP_SCHEMA, StepTable
from traceinsight.model import GPU_KINDS, TraceModel

__all__ = ["find_steps"]


#: Default marker: ``ProfilerStep#12``, ``step 7``, ``Step_3``, ``iteration 5``, ``iter#9``.
DEFAULT_STEP_PATTERN = r"(?i)^\s*(?:ProfilerStep\s*#\s*|(?:step|iteration|iter)[\s_#:=-]*)(\d+)\s*$"

#: An un-numbered range must repeat this often to mark steps.
MIN_REPEATS = 4
#: ... and its instances must cover at least this share of the time from the first to the
#: last (a ``forward`` range repeats too, but leaves backward and the optimizer outside).
MIN_COVERAGE = 0.6


def _marker_rows(intervals: pl.DataFrame, pattern: str) -> pl.DataFrame:
    compiled = re.compile(pattern)
    if compiled.groups != 1:
        raise ValueError(f"step marker {pattern!r} must have exactly one capture group")
    annotations = (
        intervals.lazy()
        .filter(pl.col("kind") == "annotation")
        .select("rank", "name", "start_ns", "end_ns", "pid", "tid")
        .collect()
    )
    return (
        annotations.with_columns(
            step=pl.col("name").str.extract(pattern, 1).cast(pl.Int64, strict=False)
        )
        .filter(pl.col("step").is_not_null())
        # One marker per (rank, step): with emit_nvtx a ProfilerStep can appear twice.
        .sort("rank", "step", "start_ns")
        .unique(["rank", "step"], keep="first", maintain_order=True)
        .select(
            "rank",
            "step",
            pl.col("name").alias("label"),
            "start_ns",
            pl.col("end_ns").alias("marker_end_ns"),
            "pid",
            "tid",
        )
    )


def _last_launched_gpu_end(intervals: pl.DataFrame, markers: pl.DataFrame) -> pl.DataFrame:
    """Per marker: end of the last GPU activity whose launch call lies inside the marker."""
    gpu = (
        intervals.lazy()
        .filter(pl.col("kind").is_in(GPU_KINDS[:3]) & pl.col("correlation").is_not_null())
        .group_by("rank", "pid", "correlation")
        .agg(gpu_end=pl.col("end_ns").max())
    )
    launches = (
        intervals.lazy()
        .filter(pl.col("kind") == "cuda_api")
        .select("rank", "pid", "tid", "correlation", "start_ns")
        .join(gpu, on=["rank", "pid", "correlation"], how="inner")
        .collect()
    )
    if launches.is_empty() or markers.is_empty():
        return markers.with_columns(gpu_end=pl.lit(None, dtype=pl.Int64))
    # Attach each launch to the marker that contains it (markers of a rank do not overlap).
    marker_spans = markers.select("rank", "step", "start_ns", "marker_end_ns").sort("start_ns")
    attached = (
        launches.sort("start_ns")
        .join_asof(
            marker_spans, on="start_ns", by="rank", strategy="backward", check_sortedness=False
        )
        .filter(pl.col("start_ns") <= pl.col("marker_end_ns"))
        .group_by("rank", "step")
        .agg(gpu_end=pl.col("gpu_end").max())
    )
    return markers.join(attached, on=["rank", "step"], how="left")


def find_steps(model: TraceModel, *, pattern: str | None = None) -> StepTable:
    """Find each rank's steps and their accounting windows.

    Reads the model's annotations, launch calls and GPU activities; returns the steps of every
    rank and where they came from.

    Parameters
    ----------
    model
        The trace model.
    pattern
        A regular expression with one capture group (the step number) matched against
        annotation names; default :data:`DEFAULT_STEP_PATTERN`.

    Returns
    -------
    StepTable

    Examples
    --------
    >>> table = find_steps(model)  # doctest: +SKIP
    >>> table.steps.select("rank", "step", "label").head(2)  # doctest: +SKIP
    """
    user_pattern = pattern is not None
    pattern = pattern or DEFAULT_STEP_PATTERN
    intervals = model.intervals
    markers = _marker_rows(intervals, pattern)
    source = "marker"
    if markers.is_empty() and not user_pattern:
        markers, name = _repeated_range_rows(intervals)
        if name is not None:
            source = f"repeated range {name!r}"
            pattern = f"^{re.escape(name)}$"
    if markers.is_empty():
        return StepTable(_whole_trace_steps(model), "whole trace", pattern)
    markers = _last_launched_gpu_end(intervals, markers)
    steps = (
        markers.sort("rank", "start_ns")
        .with_columns(next_start=pl.col("start_ns").shift(-1).over("rank"))
        .with_columns(
            end_ns=pl.max_horizontal("marker_end_ns", "gpu_end"),
        )
        .with_columns(
            end_ns=pl.when(pl.col("next_start").is_not_null())
            .then(pl.min_horizontal("end_ns", "next_start"))
            .otherwise(pl.col("end_ns"))
        )
        .select(list(STEP_SCHEMA))
        .cast(STEP_SCHEMA)
        .sort("rank", "step")
    )
    return StepTable(steps, source, pattern)


def _repeated_range_rows(intervals: pl.DataFrame) -> tuple[pl.DataFrame, str | None]:
    """Markers from an un-numbered range that wraps every iteration.

    Per rank, among the annotation names of each thread and depth: the name that repeats at
    least :data:`MIN_REPEATS` times, whose instances nearly all see GPU work launched inside
    them (by any thread: backward launches from autograd's own thread), cover
    :data:`MIN_COVERAGE` of the time from the first to the last, and together hold most of
    the rank's launches; of such names the shallowest, then the one holding most launches.
    The same name must win on every rank (one job, one convention).
    """
    empty = pl.DataFrame(schema={k: STEP_SCHEMA[k] for k in ("rank", "step", "label", "start_ns",
                                                               "marker_end_ns", "pid", "tid")})
    launches = (
        intervals.lazy()
        .filter((pl.col("kind") == "cuda_api") & pl.col("name").str.contains(LAUNCH_API.pattern))
        .select("rank", "start_ns")
        .collect()
    )
    if launches.is_empty():
        return empty, None
    ranges = (
        intervals.lazy()
        .filter((pl.col("kind") == "annotation") & pl.col("tid").is_not_null())
        .select("rank", "pid", "tid", "name", "depth", "start_ns", "end_ns")
        .collect()
    )
    if ranges.is_empty():
        return empty, None
    # Launches inside each range instance: launch times are sorted, so two searches each.
    counted = []
    for (rank,), part in ranges.partition_by("rank", as_dict=True).items():
        times = launches.filter(pl.col("rank") == rank).get_column("start_ns").sort().to_numpy()
        if times.size == 0:
            continue
        first = np.searchsorted(times, part.get_column("start_ns").to_numpy(), side="left")
        last = np.searchsorted(times, part.get_column("end_ns").to_numpy(), side="right")
        counted.append(part.with_columns(launches=pl.Series(last - first), rank_launches=pl.lit(times.size)))
    if not counted:
        return empty, None
    ranges = pl.concat(counted)
    keys = ["rank", "pid", "tid", "depth", "name"]
    candidates = (
        ranges.group_by(keys)
        .agg(
            count=pl.len(),
            launching=(pl.col("launches") > 0).mean(),
            launched=pl.col("launches").sum(),
            rank_launches=pl.col("rank_launches").first(),
            covered=(pl.col("end_ns") - pl.col("start_ns")).sum(),
            span=pl.col("end_ns").max() - pl.col("start_ns").min(),
        )
        .filter(
            (pl.col("count") >= MIN_REPEATS)
            & (pl.col("launching") >= 0.8)
            & (pl.col("covered") >= MIN_COVERAGE * pl.col("span"))
            & (pl.col("launched") >= 0.5 * pl.col("rank_launches"))
        )
        .sort(["rank", "depth", "launched", "name"], descending=[False, False, True, False])
        .unique("rank", keep="first", maintain_order=True)
    )
    names = candidates.get_column("name").unique().to_list()
    if len(names) != 1 or candidates.height != ranges.get_column("rank").n_unique():
        return empty, None
    name = names[0]
    rows = (
        ranges.join(candidates.select(keys), on=keys, how="semi")
        .sort("rank", "start_ns")
        .with_columns(step=pl.int_range(pl.len()).over("rank").cast(pl.Int64))
        .select("rank", "step", pl.col("name").alias("label"), "start_ns",
                pl.col("end_ns").alias("marker_end_ns"), "pid", "tid")
    )
    return rows, name


def _whole_trace_steps(model: TraceModel) -> pl.DataFrame:
    spans = (
        model.intervals.group_by("rank")
        .agg(start_ns=pl.col("start_ns").min(), end_ns=pl.col("end_ns").max())
        .with_columns(
            step=pl.lit(0, dtype=pl.Int64),
            label=pl.lit("whole trace"),
            marker_end_ns=pl.col("end_ns"),
            pid=pl.lit(None, dtype=pl.Int64),
            tid=pl.lit(None, dtype=pl.Int64),
        )
    )
    return spans.select(list(STEP_SCHEMA)).cast(STEP_SCHEMA).sort("rank")


ANALYSIS = Analysis(name="steps", phase="rank 1", function=find_steps, reads=("intervals",),
                    returns="step windows and where they came from", field="steps")
