"""Tests of the Kineto (PyTorch profiler) JSON reader.

Real traces come from ``../shared/traces`` beside the checkout (skipped where absent); the
expected numbers are recomputed here from the raw JSON with the standard ``json`` module, so
the reader is checked against an independent parse rather than against itself.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest

from traceinsight.errors import TraceInputError
from traceinsight.ingest.kineto import read_kineto
from traceinsight.model import INTERVAL_SCHEMA, RANK_SCHEMA

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "traces"
KINETO = SHARED / "kineto"
TWO_RANK = SHARED / "device" / "h200_2rank_torch"
KINETO_FILES = sorted(KINETO.rglob("*.json.gz")) if KINETO.is_dir() else []

needs_shared = pytest.mark.skipif(not KINETO_FILES, reason="../shared/traces not available")


def raw_events(path: Path) -> list[dict]:
    """All events of a trace file, parsed with the standard library."""
    data = json.loads(gzip.decompress(path.read_bytes()))
    return data if isinstance(data, list) else data["traceEvents"]


def complete(events: list[dict], *categories: str) -> list[dict]:
    return [e for e in events if e.get("ph") == "X" and e.get("cat") in categories]


@pytest.fixture(scope="module")
def two_rank():
    """Both ranks of the H200 2-rank trace: (model, raw JSON top level) per rank."""
    if not TWO_RANK.is_dir():
        pytest.skip("../shared/traces/device/h200_2rank_torch not available")
    out = []
    for rank in (0, 1):
        path = TWO_RANK / f"rank{rank}.json.gz"
        out.append((read_kineto(str(path)), json.loads(gzip.decompress(path.read_bytes()))))
    return out


# --------------------------------------------------------------------------------------------
# Every real file
# --------------------------------------------------------------------------------------------


@needs_shared
@pytest.mark.parametrize(
    "path", KINETO_FILES, ids=[str(p.relative_to(KINETO)) for p in KINETO_FILES]
)
def test_every_kineto_file_reads_with_independent_counts(path: Path) -> None:
    model = read_kineto(str(path))
    events = raw_events(path)
    intervals = model.intervals
    assert intervals.schema == pl.Schema(INTERVAL_SCHEMA)
    assert model.ranks.schema == pl.Schema(RANK_SCHEMA)
    assert model.ranks.height == 1 and model.samples.is_empty()
    assert model.ranks.get_column("format").to_list() == ["kineto-json"]

    def count(kind: str) -> int:
        return intervals.filter(pl.col("kind") == kind).height

    assert count("kernel") == len(complete(events, "kernel", "Kernel"))
    assert count("memcpy") == len(complete(events, "gpu_memcpy", "Memcpy"))
    assert count("memset") == len(complete(events, "gpu_memset", "Memset"))
    assert count("cuda_api") == len(complete(events, "cuda_runtime", "Runtime", "cuda_driver"))
    assert count("python") == len(complete(events, "python_function"))
    ops = complete(events, "cpu_op", "Operator", "user_annotation")
    assert count("cpu_op") + count("annotation") == len(ops)
    steps = [e for e in ops if e["name"].startswith("ProfilerStep#")]
    annotations = intervals.filter(pl.col("kind") == "annotation")
    assert annotations.filter(pl.col("name").str.starts_with("ProfilerStep#")).height == len(steps)

    assert intervals.filter(pl.col("end_ns") < pl.col("start_ns")).is_empty()
    assert intervals.get_column("start_ns").null_count() == 0
    gpu = intervals.filter(pl.col("kind").is_in(["kernel", "memcpy", "memset"]))
    assert gpu.get_column("device").null_count() == 0
    assert gpu.get_column("stream").null_count() == 0
    assert gpu.get_column("tid").null_count() == gpu.height
    cpu = intervals.filter(pl.col("kind").is_in(["cpu_op", "annotation", "cuda_api", "python"]))
    assert cpu.get_column("device").null_count() == cpu.height
    assert cpu.get_column("depth").null_count() == 0


@needs_shared
def test_absolute_fractional_timestamps_keep_every_nanosecond() -> None:
    """hta_ns_resolution_v100 writes epoch µs with 3 decimals: too many digits for a float."""
    path = next((KINETO / "hta_ns_resolution_v100").glob("*.json.gz"))
    raw = json.loads(gzip.decompress(path.read_bytes()), parse_float=Decimal)
    assert "baseTimeNanoseconds" not in raw
    kernels = complete(raw["traceEvents"], "kernel")
    expected = Counter(
        (int(Decimal(e["ts"]) * 1000), int(Decimal(e["dur"]) * 1000)) for e in kernels
    )
    # The test is only meaningful if float64 really loses digits on this file.
    assert any(round(float(e["ts"]) * 1000) != int(e["ts"] * 1000) for e in kernels)

    model = read_kineto(str(path))
    origin = model.ranks.get_column("clock_origin_ns")[0]
    got = model.intervals.filter(pl.col("kind") == "kernel").select(
        (pl.col("start_ns") + origin).alias("start"), (pl.col("end_ns") - pl.col("start_ns"))
    )
    assert Counter(got.iter_rows()) == expected
    assert origin % 1000 == 0 and origin <= min(start for start, _ in expected)


def test_base_time_gives_start_plus_origin_equal_to_base_plus_rounded_ts(two_rank) -> None:
    model, raw = two_rank[0]
    base = raw["baseTimeNanoseconds"]
    assert model.ranks.get_column("clock_origin_ns")[0] == base
    kernels = complete(raw["traceEvents"], "kernel")
    expected = Counter(base + round(e["ts"] * 1000) for e in kernels)
    starts = model.intervals.filter(pl.col("kind") == "kernel").get_column("start_ns") + base
    assert Counter(starts.to_list()) == expected


# --------------------------------------------------------------------------------------------
# Format eras
# --------------------------------------------------------------------------------------------


@needs_shared
def test_2020_bare_list_with_stream_tids_and_lower_case_external_id() -> None:
    path = KINETO / "kineto_tb_plugin_resnet50_2020_list" / "worker0.pt.trace.json.gz"
    assert gzip.decompress(path.read_bytes()).lstrip()[:1] == b"["
    model = read_kineto(str(path))
    intervals = model.intervals
    kernels = intervals.filter(pl.col("kind") == "kernel")
    assert kernels.get_column("stream").unique().to_list() == [7]  # from tid "stream 7"
    assert kernels.get_column("device").unique().to_list() == [0]
    ops = intervals.filter(pl.col("kind") == "cpu_op")
    assert ops.get_column("tid").null_count() == 0  # CPU tids were strings like "4093687616"
    assert ops.get_column("detail").drop_nulls().str.starts_with("[").all()  # "Input dims"
    # lower-case "external id" links runtime calls to the op that made them
    api = intervals.filter(pl.col("kind") == "cuda_api")
    linked = api.join(ops, on="external_id", how="semi")
    assert linked.height > 0.9 * api.get_column("external_id").drop_nulls().len() > 0
    rank = model.ranks.row(0, named=True)
    assert (rank["rank"], rank["rank_source"], rank["world_size"]) == (0, "file order", None)
    assert rank["clock_origin_ns"] > 1_600_000_000 * 10**9  # epoch ns, December 2020


@needs_shared
def test_rocm_trace_devices_names_and_rccl_collectives() -> None:
    path = KINETO / "tracelens_mi300x_resnet_act_checkpoint" / "resnet_act_checkpoint.json.gz"
    model = read_kineto(str(path))
    rank = model.ranks.row(0, named=True)
    assert rank["devices"] == [2]  # ROCm numbers the GPU after the CPU agents
    assert rank["gpu_names"] == ["AMD Instinct MI300X"]
    api_names = model.intervals.filter(pl.col("kind") == "cuda_api").get_column("name")
    assert api_names.str.starts_with("hip").any()
    rccl = model.intervals.filter(
        (pl.col("kind") == "kernel") & (pl.col("name") == "ncclDevKernel_Generic")
    )
    assert rccl.height == 17
    assert rccl.get_column("comm_op").drop_nulls().len() == 12  # 5 cannot be linked to an op


@needs_shared
def test_dlrm_eight_ranks_from_distributed_info() -> None:
    rows = []
    for path in sorted((KINETO / "param_dlrm_8rank_v100").glob("*.json.gz")):
        model = read_kineto(str(path))
        rows.append(model.ranks.row(0, named=True))
        assert model.warnings  # External id == correlation era: said, and the ids dropped
        launched = model.intervals.filter(pl.col("kind").is_in(["cuda_api", "kernel"]))
        assert launched.get_column("external_id").null_count() == launched.height
    assert sorted(row["rank"] for row in rows) == list(range(8))
    assert {row["rank_source"] for row in rows} == {"distributedInfo"}
    assert {row["world_size"] for row in rows} == {8}
    assert all(row["devices"] == [row["rank"]] for row in rows)


@needs_shared
@pytest.mark.parametrize("folder", ["hta_nccl_parser_config_a100", "tracelens_b200_eager"])
def test_record_param_comms_fields(folder: str) -> None:
    path = next((KINETO / folder).glob("*.json.gz"))
    raw = complete(raw_events(path), "cpu_op")
    expected = [e["args"] for e in raw if e["name"] == "record_param_comms"]
    expected = [a for a in expected if "Collective name" in a]
    assert expected
    model = read_kineto(str(path))
    comms = model.intervals.filter(
        (pl.col("kind") == "cpu_op") & (pl.col("name") == "record_param_comms")
    ).sort("start_ns")
    assert comms.height == len(expected)
    got = Counter(
        comms.select(
            "comm_op", "comm_in_nelems", "comm_out_nelems", "comm_group_size", "comm_group"
        ).iter_rows()
    )
    want = Counter(
        (
            a["Collective name"],
            a["In msg nelems"],
            a["Out msg nelems"],
            a["Group size"],
            a.get("Process Group Name"),
        )
        for a in expected
    )
    assert got == want
    assert comms.get_column("comm_in_split").drop_nulls().len() > 0
    assert comms.get_column("detail").drop_nulls().str.starts_with("[[").all()
    # 2024+ Kineto copies the collective args onto the NCCL kernel it launches
    nccl = model.intervals.filter(
        (pl.col("kind") == "kernel") & pl.col("name").str.starts_with("nccl")
    )
    assert nccl.get_column("comm_op").drop_nulls().len() > 0


@needs_shared
def test_b200_allgather_values() -> None:
    path = KINETO / "tracelens_b200_eager" / "eager_trace.json.gz"
    model = read_kineto(str(path))
    row = (
        model.intervals.filter(pl.col("name") == "record_param_comms")
        .select("comm_op", "comm_in_nelems", "comm_out_nelems", "comm_group_size", "comm_group")
        .row(0)
    )
    assert row == ("_allgather_base", 25136, 201088, 8, "3")
    rank = model.ranks.row(0, named=True)
    assert "CUDA runtime 12.9" in rank["tool_version"]
    assert (rank["rank"], rank["world_size"], rank["gpu_names"]) == (0, 8, ["NVIDIA B200"])


@needs_shared
def test_cuda_sync_rows_keep_stream_and_take_the_waiting_thread() -> None:
    path = next((KINETO / "hta_critical_path_alexnet_a100").glob("*.json.gz"))
    model = read_kineto(str(path))
    syncs = model.intervals.filter(pl.col("kind") == "sync")
    assert syncs.height == 41
    assert set(syncs.get_column("detail")) == {"Stream sync", "Stream wait sync", "Context sync"}
    assert set(syncs.get_column("name")) == {
        "cudaStreamSynchronize",
        "cudaStreamWaitEvent",
        "cudaDeviceSynchronize",
    }
    assert syncs.get_column("tid").null_count() == 0
    assert syncs.get_column("device").null_count() == 0
    # a context-wide sync has no stream (CUPTI writes 2**32 - 1)
    context = syncs.filter(pl.col("detail") == "Context sync")
    assert context.get_column("stream").null_count() == context.height


def test_two_rank_correlation_links_and_profiler_steps(two_rank) -> None:
    for rank, (model, raw) in enumerate(two_rank):
        intervals = model.intervals
        kernels = intervals.filter(pl.col("kind") == "kernel")
        api = intervals.filter(pl.col("kind") == "cuda_api").select("correlation")
        linked = kernels.join(api, on="correlation", how="semi").height
        assert linked > 0.95 * kernels.height
        # 2024+: kernels and launches point at the op that made them
        ops = intervals.filter(pl.col("kind") == "cpu_op").select("external_id")
        assert kernels.join(ops, on="external_id", how="semi").height > 0.95 * kernels.height

        steps = intervals.filter(pl.col("name").str.starts_with("ProfilerStep#"))
        cpu_steps = steps.filter(pl.col("kind") == "annotation")
        raw_steps = [
            e
            for e in complete(raw["traceEvents"], "user_annotation")
            if e["name"].startswith("ProfilerStep#")
        ]
        assert cpu_steps.height == len(raw_steps) == 30
        numbers = sorted(int(n.split("#")[1]) for n in cpu_steps.get_column("name"))
        assert numbers == list(range(1, 31))
        assert cpu_steps.get_column("depth").unique().to_list() == [0]
        assert steps.filter(pl.col("kind") == "cpu_op").is_empty()

        row = model.ranks.row(0, named=True)
        assert (row["rank"], row["rank_source"], row["world_size"]) == (
            rank,
            "distributedInfo",
            2,
        )
        assert row["gpu_names"] == ["NVIDIA H200"] and row["devices"] == [rank]
        assert row["pid"] == intervals.filter(pl.col("kind") == "cpu_op")["pid"].mode()[0]


def test_kernel_names_are_short_with_the_signature_in_detail(two_rank) -> None:
    kernels = two_rank[0][0].intervals.filter(pl.col("kind") == "kernel")
    names = set(kernels.get_column("name"))
    assert "ncclDevKernel_SendRecv" in names
    # Issue 14: namespace and template head kept, template and call arguments cut.
    assert not any("(" in name.replace("(anonymous namespace)", "") for name in names)
    assert all(name.count("<") == name.count("<...>") for name in names if "<unnamed>" not in name)
    assert not any(name.startswith("void ") for name in names)
    assert any("::" in name and name.endswith("<...>") for name in names)
    signatures = kernels.filter(pl.col("name") == "ncclDevKernel_SendRecv")["detail"]
    assert signatures[0] == "ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)"


# --------------------------------------------------------------------------------------------
# Hand-built traces
# --------------------------------------------------------------------------------------------

BASE_NS = 1_700_000_000_000_000_000


def op(name: str, ts: float, dur: float, **extra) -> dict:
    event = {"ph": "X", "cat": "cpu_op", "name": name, "pid": 11, "tid": 12, "ts": ts}
    event["dur"] = dur
    event.update(extra)
    return event


def write(tmp_path: Path, content, *, name: str = "trace.json", gz: bool = False) -> str:
    text = content if isinstance(content, (str, bytes)) else json.dumps(content, indent=2)
    data = text.encode() if isinstance(text, str) else text
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if gz else data)
    return str(path)


def trace(events: list[dict], **top) -> dict:
    return {"schemaVersion": 1, "baseTimeNanoseconds": BASE_NS, **top, "traceEvents": events}


def test_nested_ops_get_exact_depths_and_zero_length_rows_survive(tmp_path: Path) -> None:
    events = [
        op("ProfilerStep#7", 0, 100, cat="user_annotation"),
        op("outer", 0.5, 99),
        op("child", 10, 40),
        op("grandchild", 20, 10),
        op("instant", 25, 0),
        op("sibling", 60, 30),
        op("py", 61, 5, cat="python_function"),
    ]
    model = read_kineto(write(tmp_path, trace(events)))
    depth = dict(model.intervals.select("name", "depth").iter_rows())
    assert depth == {
        "ProfilerStep#7": 0,
        "outer": 0,
        "child": 1,
        "grandchild": 2,
        "instant": 3,
        "sibling": 1,
        "py": 2,
    }
    zero = model.intervals.filter(pl.col("name") == "instant").row(0, named=True)
    assert zero["start_ns"] == zero["end_ns"] == 25_000
    outer = model.intervals.filter(pl.col("name") == "outer").row(0, named=True)
    assert (outer["start_ns"], outer["end_ns"]) == (500, 99_500)
    assert model.ranks.get_column("clock_origin_ns")[0] == BASE_NS


def test_profiler_step_as_cpu_op_is_an_annotation(tmp_path: Path) -> None:
    events = [op("ProfilerStep#3", 0, 10), op("ProfilerStep#3x", 0, 10, cat="Operator")]
    kinds = dict(
        read_kineto(write(tmp_path, trace(events))).intervals.select("name", "kind").rows()
    )
    assert kinds["ProfilerStep#3"] == "annotation"


def test_missing_args_cat_and_odd_types_are_tolerated(tmp_path: Path) -> None:
    events = [
        {"ph": "X", "name": "no cat", "pid": 1, "tid": 1, "ts": 1, "dur": 1},
        {"ph": "X", "cat": "cpu_op", "name": "no args", "pid": 1, "tid": 1, "ts": 2, "dur": 1},
        {"ph": "X", "cat": "cpu_op", "name": "no dur", "pid": 1, "tid": 1, "ts": 3},
        {
            "ph": "X",
            "cat": "cuda_runtime",
            "name": "cudaLaunchKernel",
            "pid": "1",
            "tid": "1",
            "ts": 4,
            "dur": 1,
            "args": {"correlation": 5, "Comms Id": 10159970886766084423},
        },
        {"ph": "i", "s": "t", "name": "[memory]", "pid": 1, "tid": 1, "ts": 5},
        {
            "ph": "X",
            "cat": "kernel",
            "name": "k",
            "pid": 0,
            "tid": 7,
            "ts": 6,
            "dur": 2,
            "args": {
                "correlation": 5,
                "device": 0,
                "stream": 7,
                "External id": 10159970886766084423,
            },
        },
    ]
    model = read_kineto(write(tmp_path, trace(events)))
    rows = {r["name"]: r for r in model.intervals.iter_rows(named=True)}
    assert set(rows) == {"no args", "no dur", "cudaLaunchKernel", "k"}
    assert rows["no dur"]["end_ns"] == rows["no dur"]["start_ns"]
    assert rows["cudaLaunchKernel"]["pid"] == 1 and rows["cudaLaunchKernel"]["tid"] == 1
    assert rows["k"]["external_id"] is None  # larger than int64: dropped, not an error
    assert any("no cat" in w or "<none>" in w for w in model.warnings)


def test_unexpected_json_types_fall_back_to_a_lenient_read(tmp_path: Path) -> None:
    events = [
        op("a", 1, 2, args={"External id": "17", "Input Dims": [[1, 2]]}),
        op("b", 2, 1, args=None),
        op("c", 3.5, "1.5"),
        {
            "ph": "X",
            "cat": "kernel",
            "name": "k",
            "pid": 0,
            "tid": 7,
            "ts": 6,
            "dur": 2,
            "args": {"correlation": 5.0, "device": "0", "stream": 7},
        },
    ]
    model = read_kineto(write(tmp_path, trace(events)))
    rows = {r["name"]: r for r in model.intervals.iter_rows(named=True)}
    assert rows["a"]["external_id"] == 17 and rows["a"]["detail"] == "[[1, 2]]"
    assert rows["c"]["end_ns"] - rows["c"]["start_ns"] == 1500
    assert (rows["k"]["correlation"], rows["k"]["device"]) == (5, 0)


def test_gzip_detected_by_content_and_metadata_after_events(tmp_path: Path) -> None:
    events = [op("a", 1.25, 1)]
    text = json.dumps(
        {
            "traceEvents": events,
            "baseTimeNanoseconds": BASE_NS,
            "distributedInfo": {"rank": 3, "world_size": 4},
        }
    )
    model = read_kineto(write(tmp_path, text, name="looks_plain.json", gz=True))
    row = model.ranks.row(0, named=True)
    assert (row["rank"], row["world_size"], row["clock_origin_ns"]) == (3, 4, BASE_NS)
    assert model.intervals.get_column("start_ns").to_list() == [1250]


def test_relative_times_without_base_have_no_wall_clock(tmp_path: Path) -> None:
    model = read_kineto(write(tmp_path, {"traceEvents": [op("a", 5000.5, 1), op("b", 7000, 1)]}))
    assert model.ranks.get_column("clock_origin_ns")[0] is None
    assert model.intervals.get_column("start_ns").to_list() == [500, 2_000_000]
    assert any("relative" in w for w in model.warnings)


def test_rank_from_record_param_comms_when_no_distributed_info(tmp_path: Path) -> None:
    comms = op(
        "record_param_comms",
        1,
        1,
        args={"Collective name": "allreduce", "Rank": 5, "Group size": 8, "Seq": 12},
    )
    model = read_kineto(write(tmp_path, trace([comms])))
    row = model.ranks.row(0, named=True)
    assert (row["rank"], row["rank_source"]) == (5, "record_param_comms")
    assert model.intervals.select("comm_op", "comm_group_size", "comm_seq").row(0) == (
        "allreduce",
        8,
        12,
    )


def kineto_text(n_events: int) -> str:
    """A trace written the way Kineto writes it: metadata, events, then late keys."""
    events = [op(f"op{i}", i * 10, 5, args={"External id": i}) for i in range(n_events)]
    body = ",\n".join("  " + json.dumps(e) for e in events)
    return (
        '{\n  "schemaVersion": 1,\n  "distributedInfo": {"rank": 1, "world_size": 2},\n'
        f'  "traceEvents": [\n{body}\n  ],\n  "traceName": "x.json",\n'
        f'  "baseTimeNanoseconds": {BASE_NS}\n}}\n'
    )


def test_truncated_json_names_the_byte_and_suggests_salvage(tmp_path: Path) -> None:
    text = kineto_text(50)
    cut = text.index('"op40"') + 3
    with pytest.raises(TraceInputError, match=r"byte [\d,]+.*--salvage") as error:
        read_kineto(write(tmp_path, text[:cut]))
    assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("gz", [False, True], ids=["json", "gzip"])
def test_salvage_recovers_complete_events_and_warns(tmp_path: Path, gz: bool) -> None:
    text = kineto_text(50)
    cut = text.index('"op40"') + 3  # inside event 40: events 0..39 are complete
    model = read_kineto(write(tmp_path, text[:cut], gz=gz), salvage=True)
    names = model.intervals.get_column("name").to_list()
    assert names == [f"op{i}" for i in range(40)]
    assert any("salvaged" in w and "40 complete events" in w for w in model.warnings)
    # the time base sits after the events and was cut off: times stay relative, no origin
    assert model.ranks.get_column("clock_origin_ns")[0] is None
    assert model.ranks.get_column("rank")[0] == 1


def test_salvage_keeps_late_metadata_that_survived_the_cut(tmp_path: Path) -> None:
    text = kineto_text(20)
    cut = text.rindex("\n}")  # the closing brace of the top-level object is missing
    model = read_kineto(write(tmp_path, text[:cut]), salvage=True)
    assert model.intervals.height == 20
    assert model.ranks.get_column("clock_origin_ns")[0] == BASE_NS


def test_salvage_of_compact_and_bare_list_json(tmp_path: Path) -> None:
    events = [op(f"op{i}", i, 1, args={"Input Dims": [[i, 2]]}) for i in range(10)]
    compact = json.dumps(events, separators=(",", ":"))
    cut = compact.index('"op7"')
    model = read_kineto(write(tmp_path, compact[:cut]), salvage=True)
    assert model.intervals.height == 7
    assert model.intervals.get_column("detail")[6] == "[[6, 2]]"


def test_salvage_is_a_no_op_on_a_healthy_file(tmp_path: Path) -> None:
    path = write(tmp_path, kineto_text(5))
    assert read_kineto(path, salvage=True).warnings == []


def test_truncated_gzip_is_an_input_error(tmp_path: Path) -> None:
    data = gzip.compress(kineto_text(2000).encode())
    path = write(tmp_path, data[: len(data) // 2], name="cut.json.gz")
    with pytest.raises(TraceInputError, match="gzip.*--salvage"):
        read_kineto(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"foo": 1}', "no traceEvents"),
        ('{"traceEvents": {"a": 1}}', "not a list of events"),
        ('{"traceEvents": [1, 2]}', "not a PyTorch profiler trace"),
        ('[{"a": 1}]', "no event has a 'ph'"),
        ("3", "not a JSON trace"),
        ("hello", "not a JSON trace"),
        ("  \n", "whitespace"),
        ("", "empty file"),
        ('{"traceEvents": [ {"ph": "X",, }]}', "invalid JSON at byte"),
    ],
)
def test_not_a_trace_is_an_input_error(tmp_path: Path, content: str, message: str) -> None:
    with pytest.raises(TraceInputError, match=re.escape(message)):
        read_kineto(write(tmp_path, content))


def test_missing_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(TraceInputError, match="no such file"):
        read_kineto(str(tmp_path / "absent.json"))


def test_empty_event_list_gives_an_empty_model(tmp_path: Path) -> None:
    model = read_kineto(write(tmp_path, "[]"))
    assert model.intervals.is_empty() and model.ranks.height == 1


def test_multi_member_gzip_reads_every_member(tmp_path: Path) -> None:
    text = kineto_text(30).encode()
    half = len(text) // 2
    data = gzip.compress(text[:half]) + gzip.compress(text[half:]) + b"\x00" * 8
    model = read_kineto(write(tmp_path, data, name="two_members.json.gz"))
    assert model.intervals.height == 30


# --------------------------------------------------------------------------------------------
# Streaming: the text is decompressed a block at a time and the event array decoded a chunk
# at a time, each chunk prepared on arrival; results never depend on either size
# --------------------------------------------------------------------------------------------


def _tricky_events() -> list[dict]:
    """Events whose text holds ``},`` and ``}]`` inside strings and nested args."""
    events = []
    for i in range(40):
        events.append(
            op(
                'op "},{" #' + str(i) + " }, ]",
                i * 10,
                5,
                args={
                    "External id": i,
                    "Input Dims": [[i, 2], []],
                    "nested": [{"a": {"b": [1, {"c": "},"}]}}, {"d": 2}],
                },
            )
        )
        events.append({"ph": "f", "id": i, "pid": 11, "tid": 12, "ts": i * 10, "cat": "fwdbwd"})
        events.append(
            {
                "ph": "X",
                "cat": "kernel",
                "name": "void k<int>(float*)",
                "pid": 0,
                "tid": 7,
                "ts": i * 10 + 1,
                "dur": 2,
                "args": {"correlation": i, "device": 0, "stream": 7, "External id": i},
            }
        )
    return events


def _models_equal(a, b) -> None:
    from polars.testing import assert_frame_equal

    assert_frame_equal(a.intervals, b.intervals)
    assert_frame_equal(a.ranks, b.ranks)
    assert a.warnings == b.warnings


def _whole_file_read(monkeypatch: pytest.MonkeyPatch, path: str, **kwargs):
    """The reference: the same file through the whole-file path only."""
    from traceinsight.ingest import kineto

    with monkeypatch.context() as patch:
        patch.setattr(kineto, "_read_streaming", lambda *args, **kw: None)
        return kineto.read_kineto(path, **kwargs)


def _streamed_read(monkeypatch: pytest.MonkeyPatch, path: str, *, chunk_bytes: int, block_bytes: int):
    """The file through the streaming path, failing if the whole text is ever read."""
    from traceinsight.ingest import kineto

    def no_whole_file_path(*args, **kwargs):
        raise AssertionError("the whole-file path was taken")

    with monkeypatch.context() as patch:
        patch.setattr(kineto.streaming, "_CHUNK_BYTES", chunk_bytes)
        patch.setattr(kineto.streaming, "_STREAM_BLOCK", block_bytes)
        patch.setattr(kineto, "_read_file", no_whole_file_path)
        patch.setattr(kineto, "_decode", no_whole_file_path)
        return kineto.read_kineto(path)


@pytest.mark.parametrize("indent", [None, 2])
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(("chunk_bytes", "block_bytes"), [(1, 1), (37, 5), (500, 64), (1 << 22, 1 << 22)])
def test_streamed_read_matches_the_whole_file_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, indent, gz: bool, chunk_bytes: int, block_bytes: int
) -> None:
    top = trace(
        _tricky_events(),
        note='"traceEvents": [ in a string first',
        distributedInfo={"rank": 2, "world_size": 4},
    )
    text = json.dumps(top, indent=indent, separators=None if indent else (",", ":"))
    path = write(tmp_path, text, gz=gz)
    streamed = _streamed_read(monkeypatch, path, chunk_bytes=chunk_bytes, block_bytes=block_bytes)
    _models_equal(_whole_file_read(monkeypatch, path), streamed)
    assert streamed.of_kind("kernel").height == 40
    assert streamed.ranks.get_column("rank").to_list() == [2]


@pytest.mark.parametrize(("chunk_bytes", "block_bytes"), [(1, 3), (200, 50)])
def test_streamed_read_takes_keys_written_after_the_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_bytes: int, block_bytes: int
) -> None:
    events = [op(f"a{i}", 1000 + i, 1) for i in range(30)]
    text = json.dumps({"schemaVersion": 1, "traceEvents": events})
    # Re-serialising tools (and some Kineto versions) write metadata after the events.
    text = text[:-1] + ', "distributedInfo": {"rank": 5, "world_size": 8}, "baseTimeNanoseconds": 1700000000000000000}'
    path = write(tmp_path, text, gz=True)
    streamed = _streamed_read(monkeypatch, path, chunk_bytes=chunk_bytes, block_bytes=block_bytes)
    _models_equal(_whole_file_read(monkeypatch, path), streamed)
    assert streamed.ranks.row(0, named=True)["rank"] == 5
    assert streamed.ranks.row(0, named=True)["clock_origin_ns"] == 1700000000000000000
    assert streamed.intervals.get_column("start_ns").min() == 1_000_000


def test_streamed_read_gathers_origin_and_warnings_over_all_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No baseTimeNanoseconds: the clock origin is the earliest complete event's time, here
    # one of a category that is no interval, dropped in its own chunk before any other
    # chunk is read; ignored categories are counted over every chunk into one warning.
    events = [op("odd", 5, 1, cat="weird_category")]
    events += [op(f"a{i}", 100 + i, 1) for i in range(40)]
    events += [op("odd", 200 + i, 1, cat="weird_category") for i in range(29)]
    path = write(tmp_path, {"traceEvents": events})
    streamed = _streamed_read(monkeypatch, path, chunk_bytes=64, block_bytes=16)
    whole = _whole_file_read(monkeypatch, path)
    _models_equal(whole, streamed)
    assert "ignored complete events of categories with no interval kind: weird_category (30)" in streamed.warnings
    assert streamed.intervals.get_column("start_ns").min() == 95_000  # 100 µs after the odd event at 5 µs
    assert sum("weird_category" in w for w in streamed.warnings) == 1


def test_streamed_read_of_gzip_members_with_zero_padding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = json.dumps(trace([op(f"a{i}", i, 1) for i in range(30)])).encode()
    cut = len(text) // 3
    data = gzip.compress(text[:cut]) + b"\0" * 7 + gzip.compress(text[cut:]) + b"\0" * 5
    path = tmp_path / "members.json.gz"
    path.write_bytes(data)
    streamed = _streamed_read(monkeypatch, str(path), chunk_bytes=10, block_bytes=7)
    assert streamed.intervals.height == 30
    _models_equal(_whole_file_read(monkeypatch, str(path)), streamed)


@pytest.mark.parametrize("damage", ["cut", "corrupt"])
def test_damaged_gzip_met_while_streaming_gives_the_whole_file_message(tmp_path: Path, damage: str) -> None:
    data = bytearray(gzip.compress(json.dumps(trace([op(f"a{i}", i, 1) for i in range(2000)])).encode()))
    if damage == "cut":
        data = data[: len(data) * 2 // 3]
        message = "gzip data ends early"
    else:
        data[len(data) // 2] ^= 0xFF
        message = "gzip data is corrupt"
    path = tmp_path / "damaged.json.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(TraceInputError, match=message):
        read_kineto(path)
    assert 0 < read_kineto(path, salvage=True).intervals.height < 2000


@pytest.mark.parametrize("chunk_bytes", [1, 300])
def test_chunked_decode_falls_back_for_odd_types_late_in_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_bytes: int
) -> None:
    from traceinsight.ingest import kineto

    events = [op(f"a{i}", i, 1, args={"External id": i}) for i in range(30)]
    events.append(op("late", 40, "1.5", args={"External id": "17"}))  # a lenient read
    monkeypatch.setattr(kineto.streaming, "_CHUNK_BYTES", chunk_bytes)
    model = kineto.read_kineto(write(tmp_path, trace(events)))
    rows = {r["name"]: r for r in model.intervals.iter_rows(named=True)}
    assert len(rows) == 31
    assert rows["late"]["external_id"] == 17
    assert rows["late"]["end_ns"] - rows["late"]["start_ns"] == 1500


def test_chunked_decode_keeps_truncation_errors_and_salvage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from traceinsight.ingest import kineto

    monkeypatch.setattr(kineto.streaming, "_CHUNK_BYTES", 64)
    text = json.dumps(trace([op(f"a{i}", i, 1) for i in range(20)]), indent=2)
    path = write(tmp_path, text[: len(text) * 2 // 3], gz=True)
    with pytest.raises(TraceInputError, match="truncated or invalid JSON"):
        kineto.read_kineto(path)
    salvaged = kineto.read_kineto(path, salvage=True)
    assert 0 < salvaged.intervals.height < 20
    assert any("salvaged a truncated trace" in w for w in salvaged.warnings)


@pytest.mark.skipif(not TWO_RANK.is_dir(), reason="../shared/traces not available")
def test_streamed_read_of_a_real_trace_matches_the_whole_file_read(monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(TWO_RANK / "rank0.json.gz")
    streamed = _streamed_read(monkeypatch, path, chunk_bytes=1 << 20, block_bytes=1 << 16)
    _models_equal(_whole_file_read(monkeypatch, path), streamed)
    assert streamed.of_kind("kernel").height > 10_000

SMALL_KINETO_FILES = [p for p in KINETO_FILES if p.stat().st_size < 5 * 2**20]


@pytest.mark.skipif(not SMALL_KINETO_FILES, reason="../shared/traces not available")
def test_every_real_kineto_file_streams_to_the_whole_file_result(monkeypatch: pytest.MonkeyPatch) -> None:
    from traceinsight.ingest import kineto

    streaming = kineto._read_streaming
    outcomes = []

    def recorded(*args, **kwargs):
        outcomes.append(streaming(*args, **kwargs))
        return outcomes[-1]

    for path in SMALL_KINETO_FILES:
        with monkeypatch.context() as patch:
            # Small chunks and blocks: every file is cut in many places.
            patch.setattr(kineto.streaming, "_CHUNK_BYTES", 1 << 18)
            patch.setattr(kineto.streaming, "_STREAM_BLOCK", 1 << 15)
            patch.setattr(kineto, "_read_streaming", recorded)
            streamed = kineto.read_kineto(path)
        _models_equal(_whole_file_read(monkeypatch, str(path)), streamed)
    streamed_files = sum(outcome is not None for outcome in outcomes)
    # Every era streams, the 2020 bare list and the absolute fractional µs of
    # hta_ns_resolution_v100 included.
    assert streamed_files == len(SMALL_KINETO_FILES), (streamed_files, len(SMALL_KINETO_FILES))


@pytest.mark.parametrize(("chunk_bytes", "block_bytes"), [(1, 7), (300, 64)])
def test_streamed_bare_list_and_exact_times(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_bytes, block_bytes) -> None:
    # A 2020-style bare list with absolute epoch µs written with a nanosecond fraction:
    # float64 would lose the last digits, so the stamps are re-read exactly, chunk by chunk.
    # The first stamp's fraction (.001) is below float64's 0.25 µs step there: only the
    # text shows it.
    stamps = [f"1712195495519{i:03d}.{(7 * i + 1) % 1000:03d}" for i in range(40)]
    text = "[" + ",".join(
        f'{{"ph": "X", "cat": "cpu_op", "name": "op{i}", "pid": 1, "tid": 2, "ts": {ts}, "dur": 1.001}}'
        for i, ts in enumerate(stamps)
    ) + "]"
    path = write(tmp_path, text, gz=True)
    streamed = _streamed_read(monkeypatch, path, chunk_bytes=chunk_bytes, block_bytes=block_bytes)
    _models_equal(_whole_file_read(monkeypatch, path), streamed)
    origin = streamed.ranks.row(0, named=True)["clock_origin_ns"]
    starts = sorted(origin + v for v in streamed.intervals.get_column("start_ns").to_list())
    assert starts == sorted(int(Decimal(ts) * 1000) for ts in stamps)
    assert set(streamed.intervals.get_column("end_ns") - streamed.intervals.get_column("start_ns")) == {1001}


def test_stamps_turning_fractional_late_are_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from traceinsight.ingest import kineto

    events = [op(f"a{i}", 1712195495519000 + i, 1) for i in range(30)]
    # .123 is below float64's 0.25 µs step there: only the text shows the fraction.
    events += [{**op("late", 0, 1), "ts": Decimal("1712195495519100.123")}]
    text = json.dumps({"traceEvents": events}, default=str).replace('"1712195495519100.123"', "1712195495519100.123")
    path = write(tmp_path, text)
    taken = []
    whole_file = kineto._decode

    def recorded(*args, **kwargs):
        taken.append(True)
        return whole_file(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(kineto.streaming, "_CHUNK_BYTES", 200)
        patch.setattr(kineto, "_decode", recorded)
        model = kineto.read_kineto(path)
    assert taken  # the first chunks decided integer stamps: the late fraction is read whole
    late = model.intervals.filter(pl.col("name") == "late").row(0, named=True)
    assert late["start_ns"] + model.ranks.row(0, named=True)["clock_origin_ns"] == 1712195495519100123
