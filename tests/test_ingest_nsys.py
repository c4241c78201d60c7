"""Tests of the Nsight Systems SQLite reader (traceinsight.ingest.nsys).

Two kinds of input:

- the real exports in ``../shared/traces`` beside the checkout (2021 legacy to 2026.2, Linux,
  Windows, WSL2, one and two processes); every expected figure is computed here
  independently with SQL on the same file, so the tests do not trust the reader's own joins;
- tiny exports built in ``tmp_path`` that pin the edge cases exactly (NVTX nesting, ranges
  that end on another thread, zero-length events, missing tables, bad files).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import sqlite3
from pathlib import Path

import polars as pl
import pytest

from traceinsight.errors import TraceInputError
from traceinsight.ingest.nsys import read_nsys
from traceinsight.model import INTERVAL_SCHEMA, RANK_SCHEMA, SAMPLE_SCHEMA, TraceModel

SHARED_TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces"
NSYS_DIR = SHARED_TRACES / "nsys"
DEVICE_TRACE = SHARED_TRACES / "device" / "h200_single_nsys" / "trace.sqlite"

PUSH_POP, START_END, MARK, DOMAIN_CREATE = 59, 60, 34, 75


def _real_exports() -> list:
    files = sorted(NSYS_DIR.glob("*.sqlite")) if NSYS_DIR.is_dir() else []
    if DEVICE_TRACE.is_file():
        files.append(DEVICE_TRACE)
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"{SHARED_TRACES} is absent"))]
    return [
        pytest.param(path, id=path.name if path != DEVICE_TRACE else "device-h200")
        for path in files
    ]


def _shared(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"shared trace {path} is absent")
    return path


@functools.lru_cache(maxsize=None)
def _model(path: Path) -> TraceModel:
    # Several tests look at the same large export; read it once.
    return read_nsys(str(path))


def _sql(path: Path, query: str, parameters: tuple = ()) -> list[tuple]:
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    connection.text_factory = lambda raw: raw.decode("utf-8", "replace")
    try:
        return connection.execute(query, parameters).fetchall()
    finally:
        connection.close()


def _tables(path: Path) -> set[str]:
    return {name for (name,) in _sql(path, "SELECT name FROM sqlite_master WHERE type='table'")}


def _count(path: Path, table: str, where: str = "") -> int:
    if table not in _tables(path):
        return 0
    return _sql(path, f"SELECT COUNT(*) FROM {table} {where}")[0][0]


# -- every real export -------------------------------------------------------------------


@pytest.mark.parametrize("path", _real_exports())
def test_real_export_counts_match_sql(path: Path) -> None:
    model = _model(path)
    kinds = dict(model.intervals.group_by("kind").len().iter_rows())

    assert kinds.get("kernel", 0) == _count(path, "CUPTI_ACTIVITY_KIND_KERNEL")
    assert kinds.get("cuda_api", 0) == _count(path, "CUPTI_ACTIVITY_KIND_RUNTIME")
    assert kinds.get("memcpy", 0) == _count(path, "CUPTI_ACTIVITY_KIND_MEMCPY")
    assert kinds.get("memset", 0) == _count(path, "CUPTI_ACTIVITY_KIND_MEMSET")
    assert kinds.get("sync", 0) == _count(path, "CUPTI_ACTIVITY_KIND_SYNCHRONIZATION")
    assert kinds.get("osrt", 0) == _count(path, "OSRT_API")
    # Ranges need an end; marks are instants and are kept with zero length.
    annotations = _count(
        path,
        "NVTX_EVENTS",
        "WHERE (eventType IN (59, 60, 70, 71) AND end IS NOT NULL) OR eventType IN (34, 65)",
    )
    assert kinds.get("annotation", 0) == annotations
    assert set(kinds) <= {"kernel", "cuda_api", "memcpy", "memset", "sync", "osrt", "annotation"}

    if "CUPTI_ACTIVITY_KIND_MEMCPY" in _tables(path):
        # CUDA_MEMCPY_KIND_* ids (ddl/enums.txt); 11 and 12 are unified-memory migrations.
        directions = {1: "HtoD", 2: "DtoH", 8: "DtoD", 10: "PtoP", 11: "UVM HtoD", 12: "UVM DtoH"}
        expected = {
            directions.get(kind, f"kind {kind}"): count
            for kind, count in _sql(
                path, "SELECT copyKind, COUNT(*) FROM CUPTI_ACTIVITY_KIND_MEMCPY GROUP BY 1"
            )
        }
        copies = model.of_kind("memcpy")
        assert dict(copies.group_by("detail").len().iter_rows()) == expected
        assert (copies.get_column("name") == "Memcpy " + copies.get_column("detail")).all()
        total_bytes = _sql(path, "SELECT SUM(bytes) FROM CUPTI_ACTIVITY_KIND_MEMCPY")[0][0]
        assert copies.get_column("bytes").sum() == total_bytes


@pytest.mark.parametrize("path", _real_exports())
def test_real_export_ranks_are_the_processes_with_events(path: Path) -> None:
    model = _model(path)
    tables = _tables(path)
    expected_pids: set[int] = set()
    for table, column in [
        ("CUPTI_ACTIVITY_KIND_KERNEL", "globalPid"),
        ("CUPTI_ACTIVITY_KIND_MEMCPY", "globalPid"),
        ("CUPTI_ACTIVITY_KIND_MEMSET", "globalPid"),
        ("CUPTI_ACTIVITY_KIND_SYNCHRONIZATION", "globalPid"),
        ("CUPTI_ACTIVITY_KIND_RUNTIME", "globalTid"),
        ("NVTX_EVENTS", "globalTid"),
        ("OSRT_API", "globalTid"),
    ]:
        if table in tables:
            expected_pids |= {
                pid
                for (pid,) in _sql(
                    path, f"SELECT DISTINCT ({column} >> 24) & 16777215 FROM {table}"
                )
            }
    ranks = model.ranks
    assert set(ranks.get_column("pid").to_list()) == expected_pids
    assert ranks.get_column("rank").n_unique() == ranks.height
    if model.intervals.height:
        assert ranks.height > 0
        # Every event belongs to a listed rank.
        assert model.intervals.get_column("rank").null_count() == 0
        assert set(model.intervals.get_column("rank").unique().to_list()) <= set(
            ranks.get_column("rank").to_list()
        )
    assert dict(ranks.schema) == RANK_SCHEMA
    assert (ranks.get_column("format") == "nsys-sqlite").all()
    assert (ranks.get_column("source") == str(path)).all()

    version = None
    for metadata in ("META_DATA_EXPORT", "EXPORT_META_DATA"):
        if metadata in tables:
            query = f"SELECT value FROM {metadata} WHERE name = 'EXPORT_PRODUCT_VERSION'"
            version = _sql(path, query)[0][0]
    origin = None
    if "TARGET_INFO_SESSION_START_TIME" in tables:
        # No export here was made with --ts-normalize or --ts-shift.
        origin = _sql(path, "SELECT utcEpochNs FROM TARGET_INFO_SESSION_START_TIME")[0][0]
    assert set(ranks.get_column("tool_version").to_list()) <= {version}
    assert set(ranks.get_column("clock_origin_ns").to_list()) <= {origin}


@pytest.mark.parametrize("path", _real_exports())
def test_real_export_frames_are_well_formed(path: Path) -> None:
    model = _model(path)
    assert dict(model.intervals.schema) == INTERVAL_SCHEMA
    assert dict(model.samples.schema) == SAMPLE_SCHEMA
    intervals = model.intervals
    assert intervals.filter(pl.col("end_ns") < pl.col("start_ns")).height == 0
    if "CUPTI_ACTIVITY_KIND_RUNTIME" in _tables(path):
        # One version suffix comes off: cudaGetDeviceProperties_v2_v12000 is the API
        # cudaGetDeviceProperties_v2 in its v12000 revision.
        raw = _sql(
            path,
            "SELECT s.value, COUNT(*) FROM CUPTI_ACTIVITY_KIND_RUNTIME r "
            "JOIN StringIds s ON s.id = r.nameId GROUP BY 1",
        )
        expected: dict[str, int] = {}
        for name, count in raw:
            stripped = re.sub(r"_v\d+$", "", name)
            expected[stripped] = expected.get(stripped, 0) + count
        got = dict(
            intervals.filter(pl.col("kind") == "cuda_api").group_by("name").len().iter_rows()
        )
        assert got == expected
    gpu = intervals.filter(pl.col("kind").is_in(["kernel", "memcpy", "memset"]))
    assert gpu.get_column("tid").null_count() == gpu.height
    assert gpu.get_column("device").null_count() == 0
    cpu = intervals.filter(pl.col("kind").is_in(["cuda_api", "annotation", "osrt"]))
    assert cpu.get_column("tid").null_count() == 0
    # Samples only of the profiled processes, and frames/modules line up.
    samples = model.samples
    assert set(samples.get_column("pid").unique().to_list()) <= set(
        model.ranks.get_column("pid").to_list()
    )
    assert samples.filter(pl.col("frames").list.len() != pl.col("modules").list.len()).height == 0


def test_legacy_and_empty_exports() -> None:
    cardiac = _shared(NSYS_DIR / "cardiac-rtx3060m-legacy-2021.sqlite")
    model = _model(cardiac)
    assert model.intervals.is_empty() and model.ranks.is_empty()
    assert any("no events" in warning for warning in model.warnings)

    openacc = _shared(NSYS_DIR / "openacc-rtx3080-legacy.sqlite")
    ranks = _model(openacc).ranks
    assert ranks.get_column("tool_version").to_list() == [None]
    assert ranks.get_column("clock_origin_ns").to_list() == [None]
    assert ranks.get_column("gpu_names").to_list() == [["NVIDIA GeForce RTX 3080"]]


def test_rank_metadata_of_a_single_process_export() -> None:
    path = _shared(NSYS_DIR / "fuser-h100-nvtx-2024.6.sqlite")
    ranks = _model(path).ranks
    (row,) = ranks.to_dicts()
    # This capture recorded RANK=0 and WORLD_SIZE=1 in the launched process's environment.
    assert row["rank"] == 0 and row["rank_source"] == "env:RANK" and row["world_size"] == 1
    assert row["tool_version"] == "2024.6.2.25"
    assert (
        row["clock_origin_ns"]
        == _sql(path, "SELECT utcEpochNs FROM TARGET_INFO_SESSION_START_TIME")[0][0]
    )
    # Eight H100s are listed on the host; the process used one.
    assert row["devices"] == [0] and row["gpu_names"] == ["NVIDIA H100 80GB HBM3"]
    assert row["hostname"]


def test_windows_export_lists_only_the_gpu_used() -> None:
    path = _shared(NSYS_DIR / "windows-rtx5070ti-2025.5.sqlite")
    (row,) = _model(path).ranks.to_dicts()
    assert row["gpu_names"] == ["NVIDIA GeForce RTX 5070 Ti Laptop GPU"]
    assert row["rank_source"] == "process order"


# -- the large single-GPU device trace ----------------------------------------------------


def test_device_trace_kernels_link_to_their_launch_calls() -> None:
    model = _model(_shared(DEVICE_TRACE))
    kernels = model.of_kind("kernel").select("rank", "correlation", "start_ns")
    calls = model.of_kind("cuda_api").select(
        "rank", "correlation", pl.col("start_ns").alias("api_start"), pl.col("name").alias("api")
    )
    linked = kernels.join(calls, on=["rank", "correlation"], how="inner")
    assert linked.height > 0.99 * kernels.height
    # A kernel runs after the call that launched it started.
    assert linked.filter(pl.col("start_ns") < pl.col("api_start")).height == 0
    assert linked.get_column("api").str.contains("Launch").mean() > 0.99


def test_device_trace_sync_rows_sit_on_the_calling_thread() -> None:
    path = _shared(DEVICE_TRACE)
    syncs = _model(path).of_kind("sync")
    assert syncs.height == _count(path, "CUPTI_ACTIVITY_KIND_SYNCHRONIZATION")
    assert syncs.get_column("tid").null_count() == 0
    # The enum of this export calls these "Stream wait sync"; the API that waited says better.
    assert set(syncs.get_column("name").to_list()) == {"cudaStreamSynchronize"}
    assert set(syncs.get_column("detail").to_list()) == {"Stream sync"}


def test_device_trace_nvtx_nesting_depths() -> None:
    model = _model(_shared(DEVICE_TRACE))
    annotations = model.of_kind("annotation").filter(pl.col("domain").is_null())
    steps = annotations.filter(pl.col("name").str.contains(r"^step \d+$"))
    assert steps.height == 40
    assert set(steps.get_column("depth").to_list()) == {0}

    layers = annotations.filter(
        pl.col("name").str.contains(r"^layer\d+ (attention|router|experts)$")
    )
    grouped = annotations.filter(
        pl.col("name").str.contains(r"^GroupedLinear forward layer\d+\.fc\d$")
    )
    assert layers.height and grouped.height
    # Inside a step, a layer range is one deeper; the GroupedLinear under "layerL experts"
    # is deeper than that experts range. Pair each GroupedLinear with its enclosing range.
    experts = layers.filter(pl.col("name").str.ends_with("experts")).with_columns(
        layer=pl.col("name").str.extract(r"^layer(\d+)")
    )
    grouped = grouped.with_columns(layer=pl.col("name").str.extract(r"layer(\d+)\."))
    pairs = grouped.join(experts, on=["tid", "layer"], suffix="_outer").filter(
        (pl.col("start_ns_outer") <= pl.col("start_ns"))
        & (pl.col("end_ns") <= pl.col("end_ns_outer"))
    )
    assert pairs.height == grouped.height
    assert (pairs.get_column("depth") == pairs.get_column("depth_outer") + 1).all()
    in_steps = layers.join(
        steps.select("tid", "start_ns", "end_ns"), on="tid", suffix="_step"
    ).filter(
        (pl.col("start_ns_step") <= pl.col("start_ns"))
        & (pl.col("end_ns") <= pl.col("end_ns_step"))
    )
    assert in_steps.height > 0 and set(in_steps.get_column("depth").to_list()) == {1}


def test_device_trace_nvtx_domains_are_named() -> None:
    annotations = _model(_shared(DEVICE_TRACE)).of_kind("annotation")
    domains = set(annotations.get_column("domain").drop_nulls().to_list())
    assert domains == {"cuBLAS", "CCCL"}
    assert set(annotations.filter(pl.col("domain") == "CCCL").get_column("name").to_list()) == {
        "cub::DeviceRadixSort"
    }


# -- CPU samples and OS runtime stacks ------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [NSYS_DIR / "cutlass-a100-cpusampling-2023.2.sqlite", DEVICE_TRACE],
    ids=["cutlass-2023.2", "device-h200"],
)
def test_sample_stacks_are_innermost_first(path: Path) -> None:
    path = _shared(path)
    samples = _model(path).samples
    pids = set(_model(path).ranks.get_column("pid").to_list())
    rows = _sql(
        path,
        "SELECT (c.globalTid >> 24) & 16777215, c.globalTid & 16777215, c.start, s.value, "
        "(SELECT COUNT(*) FROM SAMPLING_CALLCHAINS d WHERE d.id = c.id) "
        "FROM COMPOSITE_EVENTS c JOIN SAMPLING_CALLCHAINS sc ON sc.id = c.id AND sc.stackDepth = 0 "
        "JOIN StringIds s ON s.id = sc.symbol",
    )
    expected = sorted(
        (tid, start, leaf, depth) for pid, tid, start, leaf, depth in rows if pid in pids
    )
    got = sorted(
        samples.select(
            "tid",
            "time_ns",
            pl.col("frames").list.first().alias("leaf"),
            pl.col("frames").list.len().alias("depth"),
        ).iter_rows()
    )
    assert len(expected) > 100
    assert got == expected
    assert (
        samples.get_column("frames").list.len() == samples.get_column("modules").list.len()
    ).all()
    # Modules are file names, not paths.
    assert not samples.get_column("modules").explode().drop_nulls().str.contains("/").any()
    assert samples.get_column("state").null_count() == 0


def test_osrt_stacks_follow_the_callchain() -> None:
    path = _shared(NSYS_DIR / "uvmtorch-a5000-osrt-backtraces-2025.3.sqlite")
    osrt = _model(path).of_kind("osrt")
    with_stack = osrt.filter(pl.col("stack").is_not_null())
    expected = _count(path, "OSRT_API", "WHERE callchainId IN (SELECT id FROM OSRT_CALLCHAINS)")
    assert with_stack.height == expected > 0
    chain_length = dict(_sql(path, "SELECT id, COUNT(*) FROM OSRT_CALLCHAINS GROUP BY id"))
    frames = _sql(
        path,
        "SELECT c.id, c.stackDepth, s.value, m.value FROM OSRT_CALLCHAINS c "
        "JOIN StringIds s ON s.id = c.symbol JOIN StringIds m ON m.id = c.module",
    )
    lengths = set(with_stack.get_column("stack").list.len().to_list())
    assert lengths <= set(chain_length.values())
    # Innermost first: every stack starts with the called function's own frame (a resolved
    # libc/pthread symbol here); unresolved addresses are replaced by their module's name.
    innermost = {symbol for _, depth, symbol, _ in frames if depth == 0}
    assert set(with_stack.get_column("stack").list.first().to_list()) <= innermost
    all_frames = with_stack.get_column("stack").explode()
    assert not all_frames.str.contains(r"^0x[0-9a-fA-F]+$").any()
    unresolved_modules = {
        os.path.basename(module) for _, _, symbol, module in frames if symbol.startswith("0x")
    }
    assert unresolved_modules & set(all_frames.to_list())


# -- two processes in one report ----------------------------------------------------------------


def test_two_process_report_has_two_ranks_and_keeps_correlations_apart() -> None:
    path = _shared(NSYS_DIR / "nsysai-h100x2-nccl-2026.2.sqlite")
    model = _model(path)
    ranks = model.ranks.sort("rank")
    assert ranks.get_column("rank").to_list() == [0, 1]
    assert ranks.get_column("pid").n_unique() == 2
    assert ranks.get_column("devices").to_list() == [[0], [1]]

    # The same correlation id occurs in both processes: a join without the process is wrong.
    collisions = _sql(
        path,
        "SELECT COUNT(*) FROM (SELECT correlationId FROM CUPTI_ACTIVITY_KIND_KERNEL "
        "GROUP BY correlationId HAVING COUNT(DISTINCT globalPid) > 1)",
    )[0][0]
    assert collisions > 0

    kernels = model.of_kind("kernel").select("rank", "correlation", "device", "start_ns")
    calls = model.of_kind("cuda_api").select(
        "rank", "correlation", pl.col("start_ns").alias("api_start")
    )
    for rank in (0, 1):
        mine = kernels.filter(pl.col("rank") == rank)
        linked = mine.join(calls, on=["rank", "correlation"], how="inner")
        assert linked.height > 0.95 * mine.height
        assert linked.filter(pl.col("start_ns") < pl.col("api_start")).height == 0
        assert mine.get_column("device").n_unique() == 1


# -- hand-built exports ------------------------------------------------------------------------

# Column lists as in real exports (ddl/*.sql), trimmed to what the reader may look at.
NVTX_COLUMNS = (
    "start",
    "end",
    "eventType",
    "rangeId",
    "category",
    "color",
    "text",
    "globalTid",
    "endGlobalTid",
    "textId",
    "domainId",
)
RUNTIME_COLUMNS = (
    "start",
    "end",
    "eventClass",
    "globalTid",
    "correlationId",
    "nameId",
    "returnValue",
    "callchainId",
)
SYNC_COLUMNS = (
    "start",
    "end",
    "deviceId",
    "contextId",
    "streamId",
    "correlationId",
    "globalPid",
    "syncType",
    "eventId",
)


def _global_tid(pid: int, tid: int) -> int:
    return (1 << 48) | (pid << 24) | tid


def _build_export(path: Path, tables: dict[str, tuple[tuple[str, ...], list[dict]]]) -> Path:
    """Write an SQLite file with ``tables``: name -> (columns, rows as column->value dicts).

    A StringIds table is always created, as every nsys export has one.
    """
    tables = {"StringIds": (("id", "value"), []), **tables}
    connection = sqlite3.connect(path)
    for name, (columns, rows) in tables.items():
        connection.execute(f"CREATE TABLE {name} ({', '.join(columns)})")
        placeholders = ", ".join("?" for _ in columns)
        connection.executemany(
            f"INSERT INTO {name} VALUES ({placeholders})",
            [tuple(row.get(column) for column in columns) for row in rows],
        )
    connection.commit()
    connection.close()
    return path


def _strings(*values: tuple[int, str]) -> dict:
    return {"StringIds": (("id", "value"), [{"id": i, "value": v} for i, v in values])}


def _nvtx_export(path: Path, rows: list[dict], *, table: str = "NVTX_EVENTS", **extra) -> Path:
    return _build_export(path, {table: (NVTX_COLUMNS, rows), **extra})


def _nvtx(start, end, name, *, pid=100, tid=100, event_type=PUSH_POP, **columns) -> dict:
    return {
        "start": start,
        "end": end,
        "eventType": event_type,
        "text": name,
        "globalTid": _global_tid(pid, tid),
        "domainId": 0,
        **columns,
    }


def test_nested_push_pop_ranges_get_exact_depths(tmp_path: Path) -> None:
    rows = [
        _nvtx(0, 100, "step"),
        _nvtx(10, 50, "forward"),
        _nvtx(20, 30, "attention"),
        _nvtx(30, 40, "mlp"),  # starts exactly where its sibling ends
        _nvtx(60, 90, "backward"),
        _nvtx(200, 300, "other thread", tid=101),
    ]
    model = read_nsys(str(_nvtx_export(tmp_path / "nested.sqlite", rows)))
    depth = dict(model.of_kind("annotation").select("name", "depth").iter_rows())
    assert depth == {
        "step": 0,
        "forward": 1,
        "attention": 2,
        "mlp": 2,
        "backward": 1,
        "other thread": 0,
    }
    (rank,) = model.ranks.to_dicts()
    assert rank["rank"] == 0 and rank["rank_source"] == "process order" and rank["pid"] == 100
    assert rank["clock_origin_ns"] is None and rank["tool_version"] is None


def test_registered_strings_and_domains(tmp_path: Path) -> None:
    rows = [
        _nvtx(-5, None, "NCCL", event_type=DOMAIN_CREATE, domainId=1),
        _nvtx(0, 10, None, textId=7, domainId=1),
        _nvtx(0, 20, "user range"),
        _nvtx(30, 40, None, textId=8, domainId=2),  # domain 2 was never created in this slice
        # The same domain id in another process is another domain, unnamed there.
        _nvtx(50, 60, None, textId=8, domainId=1, pid=200, tid=200),
    ]
    strings = _strings((7, "ncclAllReduce"), (8, "x"))
    model = read_nsys(str(_nvtx_export(tmp_path / "domains.sqlite", rows, **strings)))
    annotations = model.of_kind("annotation").sort("start_ns")
    assert annotations.select("name", "domain").rows() == [
        ("ncclAllReduce", "NCCL"),
        ("user range", None),
        ("x", None),
        ("x", None),
    ]
    assert any("domain names missing for 2" in warning for warning in model.warnings)


def test_start_end_range_across_threads_and_zero_length_events(tmp_path: Path) -> None:
    rows = [
        _nvtx(0, 100, "outer"),
        _nvtx(10, 70, "async work", event_type=START_END, endGlobalTid=_global_tid(100, 102)),
        _nvtx(20, 20, "empty range"),
        _nvtx(30, None, "marker", event_type=MARK),
        _nvtx(40, None, "never ended"),
    ]
    model = read_nsys(str(_nvtx_export(tmp_path / "ranges.sqlite", rows)))
    annotations = {row["name"]: row for row in model.of_kind("annotation").to_dicts()}
    assert set(annotations) == {"outer", "async work", "empty range", "marker"}
    # A start/end range belongs to the thread that started it, wherever it ended.
    assert annotations["async work"]["tid"] == 100
    assert (annotations["async work"]["start_ns"], annotations["async work"]["end_ns"]) == (10, 70)
    assert annotations["marker"]["start_ns"] == annotations["marker"]["end_ns"] == 30
    assert annotations["empty range"]["end_ns"] == 20
    assert annotations["outer"]["depth"] == 0
    assert annotations["async work"]["depth"] == 1
    assert annotations["empty range"]["depth"] == 2
    assert annotations["marker"]["depth"] == 2
    assert any("1 NVTX range(s) never ended" in warning for warning in model.warnings)


def test_versioned_table_names_are_resolved(tmp_path: Path) -> None:
    path = _nvtx_export(tmp_path / "v2.sqlite", [_nvtx(0, 5, "a")], table="NVTX_EVENTS_V2")
    assert read_nsys(str(path)).of_kind("annotation").get_column("name").to_list() == ["a"]


def _call(start, end, pid, tid, correlation, name_id, *, event_class=0) -> dict:
    return {
        "start": start,
        "end": end,
        "eventClass": event_class,
        "globalTid": _global_tid(pid, tid),
        "correlationId": correlation,
        "nameId": name_id,
        "returnValue": 0,
    }


def test_missing_nvtx_table_is_not_an_error(tmp_path: Path) -> None:
    calls = [_call(5, 9, 300, 301, 1, 1), _call(10, 12, 300, 301, 2, 2, event_class=1)]
    path = _build_export(
        tmp_path / "runtime-only.sqlite",
        {
            **_strings((1, "cudaLaunchKernel_v7000"), (2, "cuLaunchKernelEx")),
            "CUPTI_ACTIVITY_KIND_RUNTIME": (RUNTIME_COLUMNS, calls),
        },
    )
    model = read_nsys(str(path))
    calls = model.of_kind("cuda_api").sort("start_ns")
    assert calls.get_column("name").to_list() == ["cudaLaunchKernel", "cuLaunchKernelEx"]
    assert calls.get_column("detail").to_list() == ["runtime", "driver"]
    assert calls.select("pid", "tid").unique().rows() == [(300, 301)]
    assert model.of_kind("annotation").is_empty()


def test_correlation_joins_stay_within_a_process(tmp_path: Path) -> None:
    # Two processes reuse correlation id 1; each sync must find its own process's thread.
    calls = [_call(0, 50, 10, 11, 1, 1), _call(0, 60, 20, 22, 1, 2)]
    no_stream = 0xFFFFFFFF
    syncs = [
        {"start": 5, "end": 50, "deviceId": 0, "streamId": 7, "correlationId": 1,
         "globalPid": _global_tid(10, 0), "syncType": 3},
        {"start": 5, "end": 60, "deviceId": 1, "streamId": no_stream, "correlationId": 1,
         "globalPid": _global_tid(20, 0), "syncType": 4},
    ]  # fmt: skip
    path = _build_export(
        tmp_path / "two.sqlite",
        {
            **_strings((1, "cudaStreamSynchronize_v3020"), (2, "cudaDeviceSynchronize_v3020")),
            "CUPTI_ACTIVITY_KIND_RUNTIME": (RUNTIME_COLUMNS, calls),
            "CUPTI_ACTIVITY_KIND_SYNCHRONIZATION": (SYNC_COLUMNS, syncs),
        },
    )
    model = read_nsys(str(path))
    syncs = {row["pid"]: row for row in model.of_kind("sync").to_dicts()}
    assert syncs[10]["tid"] == 11 and syncs[10]["name"] == "cudaStreamSynchronize"
    assert syncs[10]["stream"] == 7 and syncs[10]["detail"] == "Stream sync"
    assert syncs[20]["tid"] == 22 and syncs[20]["name"] == "cudaDeviceSynchronize"
    assert syncs[20]["stream"] is None and syncs[20]["detail"] == "Context sync"
    ranks = model.ranks.sort("rank")
    assert ranks.select("rank", "pid").rows() == [(0, 10), (1, 20)]


def _name_values(*pairs: tuple[str, str]) -> tuple[tuple[str, ...], list[dict]]:
    return ("name", "value"), [{"name": name, "value": value} for name, value in pairs]


def test_rank_from_captured_environment(tmp_path: Path) -> None:
    variable = "PROCESS_0:ENVIRONMENT_VARIABLE"
    path = _nvtx_export(
        tmp_path / "env.sqlite",
        [_nvtx(0, 5, "a")],
        META_DATA_CAPTURE=_name_values(
            ("PROCESS_0:PID", "0"),
            (variable, 'PATH="/usr/bin"'),
            (variable, 'LOCAL_RANK="1"'),
            (variable, 'RANK="5"'),
            (variable, 'WORLD_SIZE="8"'),
        ),
        META_DATA_EXPORT=_name_values(
            ("EXPORT_PRODUCT_VERSION", "2026.2.1.210"), ("EXPORT_PARAM_TIME_SHIFT", "1000")
        ),
        TARGET_INFO_SESSION_START_TIME=(("utcEpochNs",), [{"utcEpochNs": 1_700_000_000 * 10**9}]),
    )
    (rank,) = read_nsys(str(path)).ranks.to_dicts()
    assert (rank["rank"], rank["rank_source"], rank["world_size"]) == (5, "env:RANK", 8)
    assert rank["tool_version"] == "2026.2.1.210"
    # --ts-shift moved every timestamp 1000 ns later, so the zero is 1000 ns earlier.
    assert rank["clock_origin_ns"] == 1_700_000_000 * 10**9 - 1000


def test_launcher_environment_does_not_number_its_children(tmp_path: Path) -> None:
    # torchrun under nsys: the recorded environment is the launcher's, not the ranks'.
    path = _nvtx_export(
        tmp_path / "launcher.sqlite",
        [_nvtx(0, 5, "a", pid=300, tid=300), _nvtx(0, 5, "b", pid=301, tid=301)],
        META_DATA_CAPTURE=_name_values(("PROCESS_0:ENVIRONMENT_VARIABLE", 'RANK="3"')),
    )
    ranks = read_nsys(str(path)).ranks.sort("rank")
    assert ranks.select("rank", "pid", "rank_source").rows() == [
        (0, 300, "process order"),
        (1, 301, "process order"),
    ]


def test_file_with_only_string_ids_gives_an_empty_model(tmp_path: Path) -> None:
    path = _build_export(tmp_path / "strings.sqlite", _strings((1, "x")))
    model = read_nsys(str(path))
    assert model.intervals.is_empty() and model.samples.is_empty() and model.ranks.is_empty()
    assert dict(model.intervals.schema) == INTERVAL_SCHEMA
    assert any("no events" in warning for warning in model.warnings)


def test_sqlite_database_of_another_program_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "app.sqlite"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE users (id INTEGER, name TEXT)")
    connection.commit()
    connection.close()
    with pytest.raises(TraceInputError, match="not an Nsight Systems export") as caught:
        read_nsys(str(path))
    assert caught.value.path == str(path)
    assert "\n" not in str(caught.value)


def _corrupt_copy(tmp_path: Path) -> Path:
    source = _nvtx_export(tmp_path / "good.sqlite", [_nvtx(0, 5, "a")] * 50)
    data = bytearray(source.read_bytes())
    # Keep the SQLite header, wreck the schema page and everything after it.
    data[100:] = b"\xff" * (len(data) - 100)
    target = tmp_path / "corrupt.sqlite"
    target.write_bytes(bytes(data))
    return target


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda tmp: _write(tmp / "text.sqlite", b"hello, this is not a database\n" * 40),
            id="text",
        ),
        pytest.param(
            lambda tmp: _write(tmp / "head.sqlite", b"SQLite format 3\x00" + b"\x00" * 20),
            id="truncated",
        ),
        pytest.param(_corrupt_copy, id="corrupt-pages"),
    ],
)
def test_unreadable_files_raise_trace_input_error(tmp_path: Path, make) -> None:
    path = make(tmp_path)
    with pytest.raises(TraceInputError) as caught:
        read_nsys(str(path))
    assert caught.value.path == str(path)
    assert "\n" not in str(caught.value)


def test_missing_file_raises_trace_input_error(tmp_path: Path) -> None:
    with pytest.raises(TraceInputError, match="no such file"):
        read_nsys(str(tmp_path / "absent.sqlite"))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _fingerprint(path: Path) -> tuple[int, int, str]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size, hashlib.sha256(path.read_bytes()).hexdigest()


def test_reading_leaves_the_file_unchanged(tmp_path: Path) -> None:
    built = _nvtx_export(tmp_path / "tiny.sqlite", [_nvtx(0, 5, "a")])
    candidates = [built]
    real = NSYS_DIR / "p4arth-rtx3060-2025.5.sqlite"
    if real.is_file():
        # A writable copy, so that only the reader's read-only mode can keep it unchanged.
        copy = tmp_path / "p4arth-copy.sqlite"
        shutil.copy2(real, copy)
        candidates.append(copy)
    for path in candidates:
        before = _fingerprint(path)
        read_nsys(str(path))
        assert _fingerprint(path) == before
        assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name)) == [
            path.name
        ]


def test_path_with_uri_special_characters(tmp_path: Path) -> None:
    folder = tmp_path / "odd #dir% ?"
    folder.mkdir()
    path = _nvtx_export(folder / "trace.sqlite", [_nvtx(0, 5, "a")])
    assert read_nsys(str(path)).of_kind("annotation").height == 1


def _read_with_sqlite3_only(path: Path, monkeypatch) -> TraceModel:
    from traceinsight.ingest import nsys

    with monkeypatch.context() as patch:
        patch.setattr(nsys._Export, "_arrow_connection", lambda self: None)
        return read_nsys(str(path))


def _assert_same_models(fast: TraceModel, slow: TraceModel) -> None:
    from polars.testing import assert_frame_equal

    assert_frame_equal(fast.intervals, slow.intervals)
    assert_frame_equal(fast.samples, slow.samples)
    assert_frame_equal(fast.ranks, slow.ranks)
    assert fast.warnings == slow.warnings


@pytest.mark.parametrize("path", _real_exports()[:4] + _real_exports()[-3:])
def test_arrow_reading_gives_the_frames_of_sqlite3(path: Path, monkeypatch) -> None:
    # The ADBC path is only a faster way to the same model: every frame equal, row for row.
    from traceinsight.ingest import nsys

    used = []
    real = nsys._Export._arrow_read

    def counted(self, *args):
        frame = real(self, *args)
        used.append(frame is not None)
        return frame

    monkeypatch.setattr(nsys._Export, "_arrow_read", counted)
    fast = read_nsys(str(path))
    assert all(used), "every table read went through Arrow"
    assert used or fast.intervals.is_empty()  # a file of metadata tables only reads none
    _assert_same_models(fast, _read_with_sqlite3_only(path, monkeypatch))


def test_arrow_reading_hands_what_it_cannot_read_the_same_to_sqlite3(tmp_path: Path, monkeypatch) -> None:
    # Text that is not UTF-8, a real in an integer column and a number in a text column:
    # the Arrow read of those tables gives way to sqlite3, which decodes leniently and
    # converts, so the model is the one sqlite3 alone gives.
    rows = [
        _nvtx(0, 100, "step"),
        _nvtx(10.7, 50, "forward"),
        _nvtx(20, 30, 1234),
        _nvtx(30, 40, None, textId=7),
    ]
    path = _nvtx_export(tmp_path / "mixed.sqlite", rows)
    connection = sqlite3.connect(path)
    connection.execute("INSERT INTO StringIds VALUES (7, CAST(X'61FF62' AS TEXT))")
    connection.commit()
    connection.close()
    from traceinsight.ingest import nsys

    answers = []
    real = nsys._Export._arrow_read
    monkeypatch.setattr(nsys._Export, "_arrow_read", lambda self, *a: answers.append(real(self, *a)) or answers[-1])
    fast = read_nsys(str(path))
    assert any(answer is None for answer in answers)
    names = fast.of_kind("annotation").sort("start_ns").get_column("name").to_list()
    assert names == ["step", "forward", "1234", "a\ufffdb"]
    assert fast.of_kind("annotation").sort("start_ns").get_column("start_ns").to_list() == [0, 10, 20, 30]
    _assert_same_models(fast, _read_with_sqlite3_only(path, monkeypatch))


def test_reading_reserves_no_address_space_beyond_the_tables(tmp_path: Path) -> None:
    # The Arrow driver reserves a batch's rows up front: a batch sized far past the table
    # once reserved hundreds of GiB of address space, and every fork after it (a subprocess
    # with preexec_fn) failed with ENOMEM. Sized to the table, the peak stays ordinary.
    import subprocess
    import sys

    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc")
    code = ("import sys\nfrom traceinsight.ingest.nsys import read_nsys\nread_nsys(sys.argv[1])\n"
            "print(next(l for l in open('/proc/self/status') if l.startswith('VmPeak')).split()[1])")
    sample = Path(__file__).resolve().parents[1] / "sample_traces" / "moe_single_nsys.sqlite"
    done = subprocess.run([sys.executable, "-c", code, str(sample)], capture_output=True, text=True, check=True)
    assert int(done.stdout.strip()) < 8 * 2**20  # KiB: 8 GiB (polars' thread pool alone is ~1 GiB)


@pytest.mark.parametrize("path", _real_exports())
def test_rows_are_in_rank_and_start_order_ties_in_table_order(path):
    """The reader's sort (an order, then a gather column by column) is stable: rows starting
    together on a rank stay in the order of the tables they were read from."""
    intervals = _model(path).intervals
    table_order = {"kernel": 0, "memcpy": 1, "memset": 2, "sync": 3, "cuda_api": 4, "annotation": 5, "osrt": 6}
    keyed = intervals.select(
        "rank", "start_ns", pl.col("kind").replace_strict(table_order, return_dtype=pl.Int8).alias("table"))
    assert keyed.equals(keyed.sort("rank", "start_ns", maintain_order=True))
    ties = keyed.filter(pl.struct("rank", "start_ns").is_duplicated())
    assert ties.equals(ties.sort("rank", "start_ns", "table", maintain_order=True))
