"""One aligned timeline for all ranks: the ``traceinsight merge`` writer (Chrome Trace Event Format).

The output opens in Perfetto UI and ``chrome://tracing``, and the project's own Kineto reader
reads it back (:mod:`traceinsight.ingest.merged`, see *Reading it back*).

Layout
------
- **One process per rank**: ``pid = rank + 1`` (pid 0 is special in some viewers), named
  ``"rank 3 · NVIDIA H100 80GB HBM3 · host hidden"`` (the host name only with ``show_host``),
  sorted by rank.
- **Threads** inside it, each with ``thread_name`` and ``thread_sort_index`` metadata:

  ==================== ======================== ===============================================
  tid                  name                     what
  ==================== ======================== ===============================================
  1                    traceinsight · steps     one slice per step; anomalous steps named
                                                ``step 27 ANOMALOUS: cpu_gap.blocked``
  100 + k              traceinsight · waits     per collective this rank waited in: the
                                                collective slice and, inside it, ``wait for
                                                rank N``; flow arrows start there and end on
                                                the straggler's collective kernel
  200 + k              traceinsight · anomalies anomalous range instances outside anomalous
                                                steps
  1000 + i             thread T                 CPU threads (``(pid P)`` added where the rank
                                                has several OS processes)
  1000000 + 3i         GPU d · stream s         kernels, copies, memsets of a stream
  1000000 + 3i + 1     … · ranges               GPU ranges (``gpu_user_annotation``) of it
  1000000 + 3i + 2     … · sync                 host syncs that waited for it
  50000000 + n         … · overlapping k        slices that do not nest on their own thread
  ==================== ======================== ===============================================

  ``k`` numbers lanes: overlapping slices go to separate lanes so that every thread holds
  properly nested slices only.
- **Events**: every interval is an ``X`` event; ``cat`` is the Kineto category where Kineto has
  one (``kernel``, ``gpu_memcpy``, ``gpu_memset``, ``gpu_user_annotation``, ``cuda_sync``,
  ``cuda_runtime``/``cuda_driver``, ``cpu_op``, ``user_annotation``, ``python_function``) and
  the model kind otherwise (``osrt``). ``args`` carry ``correlation``, ``External id``,
  ``device``, ``stream``, ``bytes``, ``Input Dims`` and the collective fields with Kineto's key
  names. Kernels are named by their full signature where the input had it, as Kineto names them.
  Findings use the categories ``traceinsight.step``, ``traceinsight.collective``,
  ``traceinsight.wait`` and ``traceinsight.anomaly``.
- **Time**: ``ts``/``dur`` in µs written with exactly three decimals (whole nanoseconds), on
  the *aligned* clock: for rank ``r`` an event at ``start_ns`` (its own clock) is at
  ``start_ns + offsets_ns[r] - clock_base_ns``; ``clock_base_ns`` is the earliest aligned time
  written, so the numbers stay small.

Top-level metadata (``"traceinsight"`` key)::

    {"format": "traceinsight-merged", "format_version": 1, "traceinsight_version": "0.1.0",
     "clock_base_ns": 4464828189067132, "reference_rank": 0,
     "offsets_ns": {"0": 0, "1": 741},
     "clock_origin_ns": {"0": 1790857026000000000, "1": ...},   # epoch of each rank's clock zero
     "epoch_ns_at_ts0": 1795321854189067132,                      # null when unknown
     "alignment": {"method": "collectives", "matched": 270, "residual_p50_us": 11.6, ...},
     "processes": {"1": {"rank": 0, "world_size": 2, "gpus": ["NVIDIA H200"], "devices": [0],
                         "source": "rank0.json.gz", "format": "kineto-json"}, ...},
     "filters": {"steps": [20, 30] | null, "ranks": [0, 3] | null, "min_cpu_us": 0.0},
     "time": "<how to recover absolute time>"}

A rank's own-clock time is ``ts * 1000 + clock_base_ns - offsets_ns[rank]``, its Unix-epoch
time that plus ``clock_origin_ns[rank]``. ``baseTimeNanoseconds`` (as Kineto defines it: epoch ns
of ``ts = 0``) is written when the reference rank's epoch is known.

Reading it back
---------------
The Kineto reader gives one rank per *file* (``distributedInfo.rank``) and puts every GPU row
under the file's main CPU process, so a file holding all ranks would come back as one rank.
:func:`~traceinsight.ingest.merged.split_merged` therefore regroups the merged events by ``pid``
into one Kineto document per rank (with ``distributedInfo``, ``deviceProperties`` and
``baseTimeNanoseconds = epoch_ns_at_ts0`` or ``clock_base_ns``), leaving out the findings
tracks, and :func:`~traceinsight.ingest.merged.load_merged` reads those with
:func:`~traceinsight.ingest.kineto.read_kineto`. Since every rank then shares one clock origin,
the alignment of the reloaded model finds offsets of ~0 and the same waits.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec
import polars as pl

from traceinsight._version import __version__
from traceinsight.analysis.places import anomaly_range
from traceinsight.analysis.findings import Findings
from traceinsight.report.records import anomaly_records
from traceinsight.errors import TraceInputError
from traceinsight.model import GPU_KINDS, TraceModel

__all__ = ["MergedTrace", "MergeResult", "merged_trace", "write_merged"]

FORMAT_NAME = "traceinsight-merged"
FORMAT_VERSION = 1

#: Chrome ``cat`` per model kind (Kineto's names where Kineto has the kind).
CATEGORY_BY_KIND = {
    "kernel": "kernel",
    "memcpy": "gpu_memcpy",
    "memset": "gpu_memset",
    "gpu_annotation": "gpu_user_annotation",
    "sync": "cuda_sync",
    "cuda_api": "cuda_runtime",
    "annotation": "user_annotation",
    "cpu_op": "cpu_op",
    "python": "python_function",
    "osrt": "osrt",
}
#: CPU kinds that ``min_cpu_us`` may drop. Annotations (steps, ranges) and runtime calls (the
#: launch links) always stay: the step windows and the waits depend on them.
DROPPABLE_CPU_KINDS = ("cpu_op", "python", "osrt")
#: The model's sync labels back to Kineto's ``cuda_sync_kind``.
_SYNC_KIND = {
    "Stream sync": "Stream Sync",
    "Event sync": "Event Sync",
    "Context sync": "Context Sync",
    "Stream wait sync": "Stream Wait Event",
}
_NO_STREAM = 0xFFFFFFFF

TID_STEPS = 1
TID_WAITS = 100
TID_ANOMALIES = 200
TID_CPU = 1000
TID_GPU = 1_000_000
TID_OVERFLOW = 50_000_000
#: Findings categories (left out when the file is read back).
FINDINGS_CATEGORY_PREFIX = "traceinsight"

_encode = msgspec.json.encode


@dataclass
class MergedTrace:
    """The merged file's JSON text and what went into it.

    Attributes
    ----------
    data
        The UTF-8 JSON document.
    counts
        ``X`` events per ``cat``, plus ``flows`` (arrow pairs, two events each) and
        ``metadata`` (``M`` events).
    ranks
        Ranks written.
    notes
        What was left out and why.
    """

    data: bytes
    counts: dict[str, int]
    ranks: list[int]
    notes: list[str] = field(default_factory=list)

    @property
    def events(self) -> int:
        """Number of entries in ``traceEvents``."""
        return sum(n for cat, n in self.counts.items() if cat != "flows") + 2 * self.counts.get("flows", 0)


@dataclass
class MergeResult:
    """What :func:`write_merged` wrote.

    Attributes
    ----------
    path
        The output file.
    bytes_written
        Size on disk (compressed when gzip).
    json_bytes
        Size of the JSON text.
    counts
        Events per category (``X`` events), plus ``flows`` (pairs) and ``metadata``.
    events
        Total number of events in ``traceEvents``.
    ranks
        Ranks written.
    notes
        What was left out and why.
    """

    path: str
    bytes_written: int
    json_bytes: int
    counts: dict[str, int]
    events: int
    ranks: list[int]
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Small formatting helpers
# --------------------------------------------------------------------------------------------


def _us_expr(ns: pl.Expr) -> pl.Expr:
    """Integer ns (>= 0) as µs text with exactly three decimals: ``1234567`` -> ``1234.567``."""
    return pl.concat_str(
        [(ns // 1000).cast(pl.String), pl.lit("."), (ns % 1000).cast(pl.String).str.zfill(3)]
    )


def _us(ns: int) -> str:
    sign = "-" if ns < 0 else ""
    ns = abs(int(ns))
    return f"{sign}{ns // 1000}.{ns % 1000:03d}"


def _json_text(series: pl.Series) -> pl.Series:
    """Every string of ``series`` as a JSON string literal (quotes and escapes), nulls kept.

    Each distinct value is encoded once with msgspec, so any name from a trace is safe.
    """
    values = series.drop_nulls().unique().to_list()
    mapping = {value: _encode(value).decode() for value in values}
    return series.replace_strict(mapping, default=None, return_dtype=pl.String)


def _raw_json_or_none(series: pl.Series) -> tuple[pl.Series, pl.Series]:
    """Split ``detail`` into JSON arrays (``Input Dims``, written raw) and other text (quoted)."""
    raw: dict[str, str] = {}
    quoted: dict[str, str] = {}
    for value in series.drop_nulls().unique().to_list():
        try:
            parsed = msgspec.json.decode(value)
        except msgspec.DecodeError:
            parsed = None
        if isinstance(parsed, list):
            raw[value] = _encode(parsed).decode()
        else:
            quoted[value] = _encode(value).decode()
    return (
        series.replace_strict(raw, default=None, return_dtype=pl.String),
        series.replace_strict(quoted, default=None, return_dtype=pl.String),
    )


def _event(ph: str, name: str, pid: int, tid: int, ts_ns: int | None, *, cat: str | None = None,
           dur_ns: int | None = None, args: dict | None = None, **extra) -> str:
    """One event as JSON text; ``ts``/``dur`` with three decimals, strings via msgspec."""
    parts = [f'"ph":"{ph}"']
    if cat is not None:
        parts.append(f'"cat":{_encode(cat).decode()}')
    parts.append(f'"name":{_encode(name).decode()}')
    parts.append(f'"pid":{int(pid)},"tid":{int(tid)}')
    parts.append(f'"ts":{_us(ts_ns) if ts_ns is not None else 0}')
    if dur_ns is not None:
        parts.append(f'"dur":{_us(dur_ns)}')
    for key, value in extra.items():
        parts.append(f'{_encode(key).decode()}:{_encode(value).decode()}')
    if args is not None:
        parts.append(f'"args":{_encode(args).decode()}')
    return "{" + ",".join(parts) + "}"


def _lanes(starts: list[int], ends: list[int]) -> list[int]:
    """Greedy lane per interval (input sorted by start) so that no lane holds an overlap."""
    lane_ends: list[int] = []
    out = []
    for start, end in zip(starts, ends):
        for lane, lane_end in enumerate(lane_ends):
            if lane_end <= start:
                lane_ends[lane] = end
                out.append(lane)
                break
        else:
            lane_ends.append(end)
            out.append(len(lane_ends) - 1)
    return out


def _jsonable(value):
    """Polars/numpy scalars in finding dicts to plain JSON values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    return value


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def _step_spans(findings: Findings, steps: tuple[int, int] | None, ranks: list[int]) -> pl.DataFrame | None:
    """Per rank, the own-clock span from the first to the last selected step (None: no filter)."""
    if steps is None:
        return None
    lo, hi = steps
    selected = findings.steps.filter(pl.col("step").is_between(lo, hi) & pl.col("rank").is_in(ranks))
    if selected.is_empty():
        found = findings.steps.get_column("step")
        have = f"{found.min()}-{found.max()}" if found.len() else "none"
        raise TraceInputError(f"no step in {lo}-{hi} (steps found: {have})")
    return selected.group_by("rank").agg(
        _span_lo=pl.col("start_ns").min(), _span_hi=pl.col("end_ns").max()
    )


def _select(model: TraceModel, ranks: list[int], spans: pl.DataFrame | None, min_cpu_ns: int) -> pl.DataFrame:
    intervals = model.intervals.filter(pl.col("rank").is_in(ranks))
    if spans is not None:
        intervals = intervals.join(spans, on="rank", how="inner").filter(
            (pl.col("start_ns") < pl.col("_span_hi")) & (pl.col("end_ns") >= pl.col("_span_lo"))
        ).drop("_span_lo", "_span_hi")
    if min_cpu_ns > 0:
        intervals = intervals.filter(
            ~pl.col("kind").is_in(DROPPABLE_CPU_KINDS) | ((pl.col("end_ns") - pl.col("start_ns")) >= min_cpu_ns)
        )
    return intervals


# --------------------------------------------------------------------------------------------
# Tracks
# --------------------------------------------------------------------------------------------


_SIDE_CPU, _SIDE_GPU, _SIDE_RANGES, _SIDE_SYNC = 0, 1, 2, 3


def _with_tracks(intervals: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Give every interval its merged ``_tid``; return it and the thread table.

    Tracks: a CPU thread per ``(pid, tid)``; per ``(device, stream)`` one track for GPU work,
    one for GPU ranges (``gpu_user_annotation``, which need not nest with the kernels) and one
    for syncs. The thread table has ``rank, _tid, _sort, _label``.
    """
    kind = pl.col("kind")
    side = (
        pl.when(kind == "sync").then(_SIDE_SYNC)
        .when(kind == "gpu_annotation").then(_SIDE_RANGES)
        .when(kind.is_in(list(GPU_KINDS))).then(_SIDE_GPU)
        .otherwise(_SIDE_CPU)
    )
    cpu_side = pl.col("_side") == _SIDE_CPU
    frame = intervals.with_columns(_side=side.cast(pl.Int8)).with_columns(
        _a=pl.when(cpu_side).then(pl.col("pid")).otherwise(pl.col("device").cast(pl.Int64)),
        _b=pl.when(cpu_side).then(pl.col("tid")).otherwise(pl.col("stream")),
    )
    keys = ["rank", "_side", "_a", "_b"]
    tracks = frame.group_by(keys).agg(_first=pl.col("start_ns").min())
    cpu = (
        tracks.filter(pl.col("_side") == _SIDE_CPU)
        .sort("rank", "_first", "_a", "_b", nulls_last=True)
        .with_columns(_i=pl.int_range(pl.len()).over("rank"), _pids=pl.col("_a").n_unique().over("rank"))
        .with_columns(
            _tid=(TID_CPU + pl.col("_i")).cast(pl.Int64),
            _sort=(1000 + 10 * pl.col("_i")).cast(pl.Int64),
            _label=pl.when(pl.col("_b").is_null()).then(pl.lit("no thread"))
            .otherwise(pl.format("thread {}", pl.col("_b")))
            + pl.when(pl.col("_pids") > 1).then(pl.format(" (pid {})", pl.col("_a").fill_null(-1)))
            .otherwise(pl.lit("")),
        )
    )
    streams = (
        tracks.filter(pl.col("_side") != _SIDE_CPU).select("rank", "_a", "_b").unique()
        .sort("rank", "_a", "_b", nulls_last=True)
        .with_columns(_i=pl.int_range(pl.len()).over("rank"))
    )
    stream_label = pl.format(
        "GPU {} · {}",
        pl.col("_a").cast(pl.String).fill_null("?"),
        pl.when(pl.col("_b").is_null()).then(pl.lit("no stream")).otherwise(pl.format("stream {}", pl.col("_b"))),
    )
    suffix = pl.col("_side").replace_strict(
        {_SIDE_GPU: "", _SIDE_RANGES: " · ranges", _SIDE_SYNC: " · sync"}, return_dtype=pl.String
    )
    gpu = (
        tracks.filter(pl.col("_side") != _SIDE_CPU)
        .join(streams, on=["rank", "_a", "_b"], nulls_equal=True)
        .with_columns(
            _tid=(TID_GPU + 3 * pl.col("_i") + pl.col("_side") - 1).cast(pl.Int64),
            _sort=(1_000_000 + 30 * pl.col("_i") + 10 * (pl.col("_side") - 1)).cast(pl.Int64),
            _label=stream_label + suffix,
        )
    )
    columns = [*keys, "_tid", "_sort", "_label"]
    table = pl.concat([cpu.select(columns), gpu.select(columns)])
    frame = frame.join(table.select(*keys, "_tid"), on=keys, how="left", nulls_equal=True)
    return frame.drop("_side", "_a", "_b"), table.select("rank", "_tid", "_sort", "_label")


def _nesting_lanes(starts, ends) -> list[int]:
    """Lane per slice (sorted by start, longer first) so that each lane nests properly.

    A slice stays in lane 0 unless it would end after the slice enclosing it there (two ranges
    that overlap without nesting, or a 1 ns rounding overlap); then it moves to the first lane
    where it nests. Viewers draw improperly nested slices of one thread wrongly or drop them.
    """
    stacks: list[list[int]] = [[]]
    out = []
    for start, end in zip(starts, ends):
        for lane, stack in enumerate(stacks):
            while stack and stack[-1] <= start:
                stack.pop()
            if not stack or end <= stack[-1]:
                stack.append(end)
                out.append(lane)
                break
        else:
            stacks.append([end])
            out.append(len(stacks) - 1)
    return out


def _split_misnested(frame: pl.DataFrame, threads: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Move slices that break nesting on their thread to extra ``… · overlapping`` threads."""
    frame = frame.sort("rank", "_tid", "_ts", "_dur", descending=[False, False, False, True])
    starts = frame.get_column("_ts").to_numpy()
    ends = (frame.get_column("_ts") + frame.get_column("_dur")).to_numpy()
    track = frame.select(pl.struct("rank", "_tid").rle_id()).to_series().to_numpy()
    lanes = [0] * frame.height
    boundaries = [0, *(i for i in range(1, len(track)) if track[i] != track[i - 1]), len(track)]
    for lo, hi in zip(boundaries[:-1], boundaries[1:]):
        if hi - lo < 2:
            continue
        track_lanes = _nesting_lanes(starts[lo:hi].tolist(), ends[lo:hi].tolist())
        if any(track_lanes):
            lanes[lo:hi] = track_lanes
    frame = frame.with_columns(_lane=pl.Series(lanes, dtype=pl.Int32))
    extra = frame.filter(pl.col("_lane") > 0).select("rank", "_tid", "_lane").unique()
    if extra.is_empty():
        return frame.drop("_lane"), threads
    extra = extra.sort("rank", "_tid", "_lane").with_columns(
        _new=(TID_OVERFLOW + pl.int_range(pl.len()).over("rank")).cast(pl.Int64)
    ).join(threads, on=["rank", "_tid"], how="left")
    frame = frame.join(extra.select("rank", "_tid", "_lane", "_new"), on=["rank", "_tid", "_lane"], how="left")
    frame = frame.with_columns(_tid=pl.coalesce("_new", "_tid")).drop("_new", "_lane")
    added = extra.select(
        "rank", pl.col("_new").alias("_tid"), (pl.col("_sort") + pl.col("_lane").clip(upper_bound=9)).alias("_sort"),
        pl.format("{} · overlapping {}", pl.col("_label"), pl.col("_lane")).alias("_label"),
    )
    return frame, pl.concat([threads, added.cast(threads.schema)])


# --------------------------------------------------------------------------------------------
# Interval events, built column-wise
# --------------------------------------------------------------------------------------------


def _arg(key: str, value: pl.Expr) -> pl.Expr:
    """``"key":value`` where ``value`` is already JSON text, null where it is null."""
    return pl.when(value.is_not_null()).then(pl.lit(f"{_encode(key).decode()}:") + value)


def _interval_lines(intervals: pl.DataFrame, offsets: dict[int, int], base: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The interval events: ``_ts`` (aligned ns - base), ``_dur``, ``_cat``, ``_line`` (JSON),
    and the thread table (``rank, _tid, _sort, _label``)."""
    frame, threads = _with_tracks(intervals)
    offset = pl.col("rank").replace_strict(offsets, default=0, return_dtype=pl.Int64)
    frame = frame.with_columns(
        _ts=pl.col("start_ns") + offset - base,
        _dur=pl.col("end_ns") - pl.col("start_ns"),
        _cat=pl.when((pl.col("kind") == "cuda_api") & (pl.col("detail") == "driver"))
        .then(pl.lit("cuda_driver"))
        .otherwise(pl.col("kind").replace_strict(CATEGORY_BY_KIND, default=None, return_dtype=pl.String))
        .fill_null(pl.col("kind")),
    )
    frame, threads = _split_misnested(frame, threads)
    kind = pl.col("kind")
    names = frame.select(
        pl.when(kind == "kernel").then(pl.coalesce("detail", "name")).otherwise(pl.col("name"))
    ).to_series()
    name = _json_text(names).fill_null('""')
    details = frame.select(pl.when(kind.is_in(["cpu_op", "annotation", "python", "osrt"])).then(pl.col("detail"))).to_series()
    dims_raw, detail_text = _raw_json_or_none(details)
    sync_kind = frame.select(pl.when(kind == "sync").then(pl.col("detail").replace(_SYNC_KIND))).to_series()
    frame = frame.with_columns(
        _name=name,
        _dims=dims_raw,
        _detail_text=detail_text,
        _sync_kind=_json_text(sync_kind),
        _domain=_json_text(frame.get_column("domain")),
        _comm_op=_json_text(frame.get_column("comm_op")),
        _comm_group=_json_text(frame.get_column("comm_group")),
        _in_split=_json_text(frame.get_column("comm_in_split")),
        _out_split=_json_text(frame.get_column("comm_out_split")),
    )
    text = lambda column: pl.col(column).cast(pl.String)  # noqa: E731
    gpu_side = pl.col("kind").is_in(list(GPU_KINDS) + ["sync"])
    stream_text = pl.when(gpu_side).then(
        pl.when(pl.col("stream").is_not_null()).then(text("stream"))
        .when(pl.col("kind") == "sync").then(pl.lit(str(_NO_STREAM)))
    )
    args = pl.concat_str(
        [
            _arg("External id", text("external_id")),
            _arg("correlation", text("correlation")),
            _arg("device", pl.when(gpu_side).then(text("device"))),
            _arg("stream", stream_text),
            _arg("bytes", pl.when(pl.col("kind").is_in(["memcpy", "memset"])).then(text("bytes"))),
            _arg("cuda_sync_kind", pl.col("_sync_kind")),
            _arg("Input Dims", pl.col("_dims")),
            _arg("detail", pl.col("_detail_text")),
            _arg("domain", pl.col("_domain")),
            _arg("Collective name", pl.col("_comm_op")),
            _arg("In msg nelems", text("comm_in_nelems")),
            _arg("Out msg nelems", text("comm_out_nelems")),
            _arg("Group size", text("comm_group_size")),
            _arg("Process Group Name", pl.col("_comm_group")),
            _arg("Seq", text("comm_seq")),
            _arg("In split size", pl.col("_in_split")),
            _arg("Out split size", pl.col("_out_split")),
        ],
        separator=",",
        ignore_nulls=True,
    )
    line = pl.concat_str(
        [
            pl.lit('{"ph":"X","cat":"'), pl.col("_cat"), pl.lit('","name":'), pl.col("_name"),
            pl.lit(',"pid":'), (pl.col("rank").cast(pl.Int64) + 1).cast(pl.String),
            pl.lit(',"tid":'), text("_tid"),
            pl.lit(',"ts":'), _us_expr(pl.col("_ts")),
            pl.lit(',"dur":'), _us_expr(pl.col("_dur")),
            pl.lit(',"args":{'), args.fill_null(""), pl.lit("}}"),
        ]
    )
    return frame.select("rank", "kind", "start_ns", "end_ns", "_tid", "_ts", "_dur", "_cat", _line=line), threads


# --------------------------------------------------------------------------------------------
# Findings tracks
# --------------------------------------------------------------------------------------------


def _step_events(findings: Findings, ranks: list[int], steps: tuple[int, int] | None,
                 offsets: dict[int, int]) -> list[tuple[int, int, int, str, dict]]:
    """One ``(rank, aligned_start, aligned_end, name, args)`` per step slice to draw."""
    anomalies = {(a["rank"], a["step"]): a for a in anomaly_records(findings.anomalies.filter(pl.col("kind") == "step"))}
    frame = findings.steps.filter(pl.col("rank").is_in(ranks))
    if steps is not None:
        frame = frame.filter(pl.col("step").is_between(*steps))
    out = []
    for row in frame.sort("rank", "start_ns").iter_rows(named=True):
        anomaly = anomalies.get((row["rank"], row["step"]))
        name = f"step {row['step']}" + (f" ANOMALOUS: {anomaly['cause']}" if anomaly else "")
        args = {
            "step": row["step"], "label": row["label"], "duration_ms": round(row["duration_ns"] / 1e6, 4),
            "breakdown_ms": {c[:-3]: round(row[c] / 1e6, 4) for c in row if c.endswith("_ns")
                             and c not in ("start_ns", "end_ns", "marker_end_ns", "duration_ns", "baseline_ns")},
            "anomalous": bool(row.get("anomalous")),
        }
        if anomaly:
            args["anomaly"] = _jsonable({k: v for k, v in anomaly.items() if k != "ranges"})
        offset = offsets.get(row["rank"], 0)
        out.append((row["rank"], row["start_ns"] + offset, row["end_ns"] + offset, name, args))
    return out


def _anomaly_range_events(findings: Findings, ranks: list[int], steps: tuple[int, int] | None,
                          offsets: dict[int, int]) -> list[tuple[int, int, int, str, dict]]:
    ranges = [a for a in anomaly_records(findings.anomalies.filter(pl.col("kind") == "range")) if a["rank"] in ranks
              and (steps is None or (a["step"] is not None and steps[0] <= a["step"] <= steps[1]))]
    if not ranges or findings.range_instances.is_empty():
        return []
    out = []
    instances = findings.range_instances
    for anomaly in ranges:
        match = instances.filter(
            (pl.col("rank") == anomaly["rank"]) & (pl.col("name") == anomaly_range(anomaly))
            & (pl.col("start_ns") == anomaly["start_ns"])
        )
        if match.is_empty():
            continue
        end = match.item(0, "end_ns")
        offset = offsets.get(anomaly["rank"], 0)
        out.append((anomaly["rank"], anomaly["start_ns"] + offset, end + offset,
                    f"{anomaly['where']} ANOMALOUS: {anomaly['cause']}", _jsonable(anomaly)))
    return out


def _wait_rows(findings: Findings, ranks: list[int], steps: tuple[int, int] | None, *, min_wait_ns: int = 1_000):
    """Collective rows where a rank waited, with the straggler's kernel (own clock, stream)."""
    collectives = findings.collectives
    if collectives is None or collectives.is_empty() or "wait_ns" not in collectives.columns:
        return []
    waited = collectives.filter(
        (pl.col("wait_ns") >= min_wait_ns) & (pl.col("rank") != pl.col("straggler")) & pl.col("rank").is_in(ranks)
    )
    if steps is not None:
        waited = waited.filter(pl.col("step").is_between(*steps))
    if waited.is_empty():
        return []
    stragglers = collectives.filter(pl.col("rank") == pl.col("straggler")).select(
        "key", pl.col("start_ns").alias("s_start_ns"), pl.col("end_ns").alias("s_end_ns")
    ).unique("key", keep="first")
    waited = waited.join(stragglers, on="key", how="left")
    return waited.sort("rank", "start_ns").to_dicts()


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _process_label(row: dict, show_host: bool) -> str:
    gpus = list(dict.fromkeys(row.get("gpu_names") or []))
    gpu = ", ".join(gpus) if gpus else "no GPU named"
    if show_host:
        host = f"host {row['hostname']}" if row.get("hostname") else "host unknown"
    else:
        host = "host hidden"
    return f"rank {row['rank']} · {gpu} · {host}"


def merged_trace(
    model: TraceModel,
    findings: Findings,
    *,
    steps: tuple[int, int] | None = None,
    ranks: Iterable[int] | None = None,
    min_cpu_us: float = 0.0,
    show_host: bool = False,
) -> MergedTrace:
    """The merged Chrome trace of ``model``: JSON bytes, event counts and notes.

    Parameters
    ----------
    model, findings
        The loaded traces and ``analyze(model)``; the alignment's offsets put every rank on the
        common clock.
    steps
        ``(first, last)`` step numbers: keep only events overlapping the span from the first to
        the last of those steps on each rank (and the findings of those steps).
    ranks
        Keep only these ranks (the alignment still comes from all of them).
    min_cpu_us
        Drop ``cpu_op``, ``python`` and ``osrt`` events shorter than this.
    show_host
        Put host names into the process names and metadata.

    Returns
    -------
    MergedTrace

    Examples
    --------
    >>> model = traceinsight.load("traces/")  # doctest: +SKIP
    >>> merged = merged_trace(model, analyze(model), steps=(20, 30))  # doctest: +SKIP
    >>> merged.counts["kernel"], merged.counts["flows"]  # doctest: +SKIP
    (6213, 41)
    """
    notes: list[str] = []
    all_ranks = model.rank_ids
    if ranks is None:
        chosen = all_ranks
    else:
        wanted = sorted(set(int(r) for r in ranks))
        missing = [r for r in wanted if r not in all_ranks]
        if missing:
            raise TraceInputError(f"rank(s) {', '.join(map(str, missing))} not in the traces (ranks: "
                                  f"{', '.join(map(str, all_ranks))})")
        chosen = wanted
    alignment = findings.alignment
    offsets = {r: 0 for r in all_ranks}
    if alignment is not None:
        offsets.update({int(k): int(v) for k, v in alignment.offsets.items()})
    spans = _step_spans(findings, steps, chosen)
    if spans is not None:
        left_out = sorted(set(chosen) - set(spans.get_column("rank").to_list()))
        if left_out:
            notes.append(f"rank(s) {', '.join(map(str, left_out))} have no step in {steps[0]}-{steps[1]}: left out")
        chosen = sorted(spans.get_column("rank").to_list())
    intervals = _select(model, chosen, spans, int(round(min_cpu_us * 1000)))

    step_rows = _step_events(findings, chosen, steps, offsets)
    anomaly_rows = _anomaly_range_events(findings, chosen, steps, offsets)
    wait_rows = _wait_rows(findings, chosen, steps)

    # One global base: the earliest aligned time written.
    candidates = []
    if intervals.height:
        offset = pl.col("rank").replace_strict(offsets, default=0, return_dtype=pl.Int64)
        candidates.append(intervals.select((pl.col("start_ns") + offset).min()).item())
    candidates += [row[1] for row in step_rows] + [row[1] for row in anomaly_rows]
    candidates += [row["start_ns"] + offsets.get(row["rank"], 0) for row in wait_rows]
    base = int(min(c for c in candidates if c is not None)) if any(c is not None for c in candidates) else 0

    lines, track_table = _interval_lines(intervals, offsets, base) if intervals.height else (None, None)

    counts: dict[str, int] = {}
    if lines is not None:
        for cat, n in lines.group_by("_cat").len().sort("_cat").iter_rows():
            counts[cat] = n

    # Findings events: (ts_ns, dur_ns or -1 for non-X, line)
    extra: list[tuple[int, int, str]] = []
    threads: dict[tuple[int, int], tuple[str, int]] = {}  # (pid, tid) -> (name, sort index)
    for rank, start, end, name, args in step_rows:
        pid = rank + 1
        threads[(pid, TID_STEPS)] = ("traceinsight · steps", 0)
        extra.append((start - base, end - start,
                      _event("X", name, pid, TID_STEPS, start - base, cat="traceinsight.step",
                             dur_ns=end - start, args=args)))
    counts["traceinsight.step"] = len(step_rows)

    by_rank: dict[int, list] = {}
    for row in anomaly_rows:
        by_rank.setdefault(row[0], []).append(row)
    for rank, rows in by_rank.items():
        rows.sort(key=lambda r: (r[1], -r[2]))
        for (rank_, start, end, name, args), lane in zip(rows, _lanes([r[1] for r in rows], [r[2] for r in rows])):
            pid, tid = rank + 1, TID_ANOMALIES + lane
            threads[(pid, tid)] = ("traceinsight · anomalies" + (f" {lane + 1}" if lane else ""), 50 + lane)
            extra.append((start - base, end - start,
                          _event("X", name, pid, tid, start - base, cat="traceinsight.anomaly",
                                 dur_ns=end - start, args=args)))
    counts["traceinsight.anomaly"] = len(anomaly_rows)

    # The thread of each straggler's collective kernel, where it was written.
    targets: dict[tuple[int, int, int], int] = {}
    if wait_rows and lines is not None:
        wanted = pl.DataFrame(
            {"rank": [r["straggler"] for r in wait_rows], "start_ns": [r["s_start_ns"] for r in wait_rows],
             "end_ns": [r["s_end_ns"] for r in wait_rows]},
            schema={"rank": pl.Int32, "start_ns": pl.Int64, "end_ns": pl.Int64},
        ).drop_nulls().unique()
        found = lines.filter(pl.col("kind") == "kernel").select("rank", "start_ns", "end_ns", "_tid").join(
            wanted, on=["rank", "start_ns", "end_ns"], how="semi"
        )
        targets = {(r, s, e): t for r, s, e, t in found.iter_rows()}
    flows = 0
    waits_by_rank: dict[int, list[dict]] = {}
    for row in wait_rows:
        waits_by_rank.setdefault(row["rank"], []).append(row)
    for rank, rows in waits_by_rank.items():
        offset = offsets.get(rank, 0)
        lanes = _lanes([r["start_ns"] for r in rows], [r["end_ns"] for r in rows])
        for row, lane in zip(rows, lanes):
            pid, tid = rank + 1, TID_WAITS + lane
            threads[(pid, tid)] = ("traceinsight · waits" + (f" {lane + 1}" if lane else ""), 1 + lane)
            start = row["start_ns"] + offset - base
            duration = row["end_ns"] - row["start_ns"]
            wait = min(int(row["wait_ns"]), duration)
            label = row["label"] or "collective"
            phase = row.get("phase")
            common = {"key": row["key"], "step": row["step"], "collective": label, "phase": phase,
                      "waiting_for_rank": row["straggler"], "wait_ms": round(row["wait_ns"] / 1e6, 4),
                      "transfer_ms": round(row["transfer_ns"] / 1e6, 4)}
            extra.append((start, duration, _event(
                "X", f"{label} ({phase})" if phase else label, pid, tid, start, cat="traceinsight.collective",
                dur_ns=duration, args={**common, "participants": row["participants"],
                                       "rows_sent": row.get("rows_sent"), "rows_received": row.get("rows_received")})))
            extra.append((start, wait, _event(
                "X", f"wait for rank {row['straggler']}", pid, tid, start, cat="traceinsight.wait",
                dur_ns=wait, args=common)))
            straggler = row["straggler"]
            target = targets.get((straggler, row.get("s_start_ns"), row.get("s_end_ns")))
            if target is not None and wait > 0:
                flows += 1
                s_ts = start + min(wait // 2, 1000)
                s_dur = row["s_end_ns"] - row["s_start_ns"]
                f_ts = row["s_start_ns"] + offsets.get(straggler, 0) - base + min(s_dur // 2, 1000)
                flow_name = f"rank {rank} waited for rank {straggler}"
                extra.append((s_ts, -1, _event("s", flow_name, pid, tid, s_ts, cat="traceinsight.wait",
                                               id=flows, bp="e")))
                extra.append((f_ts, -1, _event("f", flow_name, straggler + 1, target, f_ts,
                                               cat="traceinsight.wait", id=flows, bp="e")))
    counts["traceinsight.collective"] = sum(len(v) for v in waits_by_rank.values())
    counts["traceinsight.wait"] = counts["traceinsight.collective"]
    counts["flows"] = flows

    # Metadata events.
    rank_rows = {row["rank"]: row for row in findings.ranks.to_dicts()} if findings.ranks.height else {}
    meta: list[str] = []
    for rank in chosen:
        pid = rank + 1
        row = rank_rows.get(rank, {"rank": rank})
        meta.append(_event("M", "process_name", pid, 0, None, args={"name": _process_label(row, show_host)}))
        meta.append(_event("M", "process_labels", pid, 0, None, args={"labels": f"rank {rank}"}))
        meta.append(_event("M", "process_sort_index", pid, 0, None, args={"sort_index": rank}))
    if track_table is not None:
        for rank, tid, sort, label in track_table.iter_rows():
            threads[(rank + 1, tid)] = (label, sort)
    for (pid, tid), (label, sort) in sorted(threads.items()):
        meta.append(_event("M", "thread_name", pid, tid, None, args={"name": label}))
        meta.append(_event("M", "thread_sort_index", pid, tid, None, args={"sort_index": sort}))
    counts["metadata"] = len(meta)

    # Order: metadata, then everything by time (longer first at equal start, so parents precede).
    body: list[str] = []
    if lines is not None:
        extra_frame = pl.DataFrame(
            {"_ts": [e[0] for e in extra], "_dur": [e[1] for e in extra], "_line": [e[2] for e in extra]},
            schema={"_ts": pl.Int64, "_dur": pl.Int64, "_line": pl.String},
        )
        ordered = pl.concat([lines.select("_ts", "_dur", "_line"), extra_frame]).sort(
            ["_ts", "_dur"], descending=[False, True]
        )
        body_text = ordered.get_column("_line").str.join(",\n").item() if ordered.height else ""
    else:
        extra.sort(key=lambda e: (e[0], -e[1]))
        body_text = ",\n".join(e[2] for e in extra)
    body = [",\n".join(meta)] if meta else []
    if body_text:
        body.append(body_text)

    origins = {}
    for rank, row in rank_rows.items():
        origins[str(rank)] = row.get("clock_origin_ns")
    reference = alignment.reference_rank if alignment is not None else (all_ranks[0] if all_ranks else 0)
    reference_origin = rank_rows.get(reference, {}).get("clock_origin_ns")
    epoch_at_zero = None if reference_origin is None else int(reference_origin) + base
    processes = {}
    for rank in chosen:
        row = rank_rows.get(rank, {})
        entry = {"rank": rank, "world_size": row.get("world_size"), "gpus": row.get("gpu_names") or [],
                 "devices": row.get("devices") or [], "source": row.get("source"), "format": row.get("format"),
                 "rank_source": row.get("rank_source")}
        if show_host:
            entry["hostname"] = row.get("hostname")
        processes[str(rank + 1)] = entry
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "traceinsight_version": __version__,
        "clock_base_ns": base,
        "reference_rank": reference,
        "offsets_ns": {str(r): offsets.get(r, 0) for r in all_ranks},
        "clock_origin_ns": origins,
        "epoch_ns_at_ts0": epoch_at_zero,
        "alignment": None if alignment is None else {
            "method": alignment.method, "matched": alignment.matched,
            "residual_p50_us": None if alignment.residual_p50_ns is None else round(alignment.residual_p50_ns / 1e3, 3),
            "residual_max_us": None if alignment.residual_max_ns is None else round(alignment.residual_max_ns / 1e3, 3),
        },
        "processes": processes,
        "step_source": findings.step_source,
        "filters": {"steps": list(steps) if steps else None, "ranks": None if ranks is None else chosen,
                    "min_cpu_us": float(min_cpu_us)},
        "time": ("ts and dur are µs on the aligned clock; a rank's own-clock ns = ts*1000 + clock_base_ns "
                 "- offsets_ns[rank]; its Unix-epoch ns = that + clock_origin_ns[rank]"),
        "notes": notes,
    }
    head = b'{"schemaVersion":1,"displayTimeUnit":"ns","traceinsight":' + _encode(metadata)
    if epoch_at_zero is not None:
        head += b',"baseTimeNanoseconds":' + str(epoch_at_zero).encode()
    head += b',\n"traceEvents":[\n'
    data = head + ",\n".join(body).encode("utf-8") + b"\n]}\n"
    return MergedTrace(data=data, counts=counts, ranks=list(chosen), notes=notes)


def write_merged(
    path: str,
    model: TraceModel,
    findings: Findings,
    **options,
) -> MergeResult:
    """Write :func:`merged_trace` to ``path`` atomically (gzip when it ends in ``.gz``)."""
    from traceinsight.report.output import write_atomic

    merged = merged_trace(model, findings, **options)
    data = merged.data
    if str(path).endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    write_atomic(path, data)
    return MergeResult(path=str(path), bytes_written=len(data), json_bytes=len(merged.data),
                       counts=merged.counts, events=merged.events, ranks=merged.ranks, notes=merged.notes)
