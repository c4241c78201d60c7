"""The diagnosis on traces it was not shaped on: steps without numbers, noise-aware flags, the
last step, flag floods, places (nesting paths, GPU work where it was launched) and causes.

The labelled sets under ``sample_traces/`` (``te_moe_*``, ``dense_*``) were recorded after the
analysis was written, with answer keys written before it was run on them.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

import traceinsight
from conftest import SAMPLE_TRACES, shared
from traceinsight.analysis.analyzers.step_flags import flag_steps
from traceinsight.analysis.analyzers.steps import find_steps
from traceinsight.analysis.classify import range_group_expr
from traceinsight.analysis.pipeline import analyze
from traceinsight.analysis.postmortem import step_postmortem
from traceinsight.model import TraceModel
from traceinsight.report.records import anomaly_records

TE_NSYS = SAMPLE_TRACES / "te_moe_nsys" / "trace.sqlite"
TE_TORCH = SAMPLE_TRACES / "te_moe_torch" / "trace.json.gz"
DENSE_NSYS = SAMPLE_TRACES / "dense_nsys" / "trace.sqlite"
DENSE_TORCH = SAMPLE_TRACES / "dense_torch" / "trace.json.gz"


def _truth(path) -> dict:
    return json.loads((path.parent / "truth.json").read_text())


def _faults(path) -> dict[int, dict]:
    return {f["step"]: f for f in _truth(path)["faults"]}


@pytest.fixture(scope="module")
def te_nsys():
    return analyze(traceinsight.load(TE_NSYS))


@pytest.fixture(scope="module")
def two_rank():
    return analyze(traceinsight.load(SAMPLE_TRACES / "moe_2rank"))


@pytest.fixture(scope="module")
def dense_nsys():
    return analyze(traceinsight.load(DENSE_NSYS))


def _step_findings(findings) -> dict[int, dict]:
    return {a["step"]: a for a in anomaly_records(findings.anomalies) if a["kind"] == "step"}


# --- steps found without being told ---------------------------------------------------------


def test_an_unnumbered_range_around_every_iteration_marks_the_steps(te_nsys):
    truth = _truth(TE_NSYS)
    assert te_nsys.step_source == "repeated range 'train_step'"
    assert te_nsys.steps.get_column("step").to_list() == [s["step"] for s in truth["steps"] if s["in_trace"]]
    assert any("repeated range 'train_step'" in w for w in te_nsys.warnings)


def test_numbered_markers_renamed_to_one_name_give_the_same_steps():
    model = traceinsight.load(SAMPLE_TRACES / "moe_single_nsys.sqlite")
    numbered = find_steps(model).steps
    renamed = model.intervals.with_columns(
        name=pl.when((pl.col("kind") == "annotation") & pl.col("name").str.contains(r"^step \d+$"))
        .then(pl.lit("fwd_bwd")).otherwise(pl.col("name"))
    )
    table = find_steps(TraceModel(intervals=renamed, samples=model.samples, ranks=model.ranks))
    assert table.source == "repeated range 'fwd_bwd'"
    assert table.steps.get_column("start_ns").to_list() == numbered.get_column("start_ns").to_list()
    assert table.steps.get_column("step").to_list() == list(range(numbered.height))


def test_traces_without_a_loop_stay_one_step():
    # One-off ranges (compilation passes, a TensorRT engine) repeat, but do not wrap the work.
    for name in ("fuser-h100-nvtx-2024.6.sqlite", "centerformer-titanrtx-trt-nvtx-2022.4.sqlite",
                 "dlprof-rtx2070-pytorch-nvtx-2022.1.sqlite"):
        assert find_steps(traceinsight.load(shared(f"nsys/{name}"))).source == "whole trace", name


def test_emit_nvtx_suffixes_are_grouped_and_the_raw_name_kept(dense_nsys):
    names = pl.Series(["aten::mm, seq = 47555, op_id = 12, sizes = [[2048, 4096], []]",
                       "aten::mm, seq = 9, op_id = 3", "MmBackward0, stashed seq = 4", "layer0.fc1"])
    grouped = pl.DataFrame({"name": names}).select(range_group_expr()).to_series().to_list()
    assert grouped == ["aten::mm", "aten::mm", "MmBackward0", "layer0.fc1"]
    # The dense_nsys recording used emit_nvtx(record_shapes=True): ranges are grouped by op.
    ranges = dense_nsys.ranges
    assert not ranges.filter(pl.col("name").str.contains("seq = ")).height
    mm = ranges.filter(pl.col("name") == "aten::mm")
    assert mm.height and mm.item(0, "count") > 100
    assert dense_nsys.range_instances.filter(pl.col("raw_name").str.contains(", seq = ")).height > 0


# --- noise-aware flags ------------------------------------------------------------------------


def _steps_frame(durations_ms) -> pl.DataFrame:
    return pl.DataFrame({"rank": [0] * len(durations_ms), "step": list(range(len(durations_ms))),
                         "duration_ns": [int(d * 1e6) for d in durations_ms]},
                        schema={"rank": pl.Int32, "step": pl.Int64, "duration_ns": pl.Int64})


@pytest.mark.parametrize("seed", range(5))
def test_thirty_percent_on_a_steady_run_is_flagged_twenty_on_a_noisy_one_is_not(seed):
    rng = np.random.default_rng(seed)
    steady = 100 * (1 + rng.uniform(-0.03, 0.03, 30))
    steady[15] = 130
    assert flag_steps(_steps_frame(steady)).filter("anomalous").get_column("step").to_list() == [15]
    noisy = 100 * (1 + rng.uniform(-0.07, 0.07, 30))
    noisy[15] = 120
    assert flag_steps(_steps_frame(noisy)).filter("anomalous").height == 0


def test_sample_2rank_steps_at_plus_fifty_percent_are_flagged(two_rank):
    flagged = set(two_rank.steps.filter("anomalous").get_column("step").to_list())
    faulty = {f["step"] for f in json.loads((SAMPLE_TRACES / "moe_2rank" / "truth_rank0.json").read_text())["faults"]}
    assert flagged == faulty


@pytest.mark.parametrize("folder", ["hta_negative_queue_length_a100_80gb", "tracelens_mi300x_resnet_act_checkpoint"])
def test_the_last_step_is_not_flagged_for_draining_the_gpu_queue(folder):
    model = traceinsight.load(shared(f"kineto/{folder}"))
    findings = analyze(model)
    steps = findings.steps.sort("step")
    last = steps.row(-1, named=True)
    # Its window holds the queue drain, so it is longer than the others ...
    assert last["duration_ns"] > steps.get_column("duration_ns").head(steps.height - 1).median()
    # ... but it is judged on its marker and the GPU work it launched, and is no anomaly.
    assert last["judged_ns"] < last["duration_ns"]
    assert not steps.get_column("anomalous").any()


def test_no_flag_flood_on_a_trace_without_a_loop():
    findings = analyze(traceinsight.load(shared("nsys/fuser-h200-nvtx-2025.1.sqlite")))
    assert len([a for a in anomaly_records(findings.anomalies) if a["kind"] == "range"]) <= 3


# --- places and causes on the labelled sets ---------------------------------------------------


def test_every_slowed_step_of_the_te_run_is_flagged_with_its_place_and_cause(te_nsys):
    faults = _faults(TE_NSYS)
    found = _step_findings(te_nsys)
    flagged = set(te_nsys.steps.filter("anomalous").get_column("step").to_list())
    clean = [s["wall_time_s"] for s in _truth(TE_NSYS)["steps"] if s["in_trace"] and not s["fault"]]
    for step in flagged - set(faults):  # any other flag is a step that really was slow
        wall = next(s["wall_time_s"] for s in _truth(TE_NSYS)["steps"] if s["step"] == step)
        assert wall > 1.2 * float(np.median(clean)), step
    expected = {"cuda_allocator_churn": ("cuda_allocator",), "file_io": ("cpu_gap.io",),
                "host_sync": ("host_sync",), "gc_pause": ("cpu_gap.garbage_collection",),
                "gpu_backward_excess": ("gpu_compute",)}
    for step, fault in faults.items():
        anomalies = [a for a in anomaly_records(te_nsys.anomalies) if a["step"] == step]
        assert anomalies, step
        innermost = fault["where_path"][-1]
        assert any(a["where"].split(" › ")[-1].startswith(innermost) for a in anomalies), (step, anomalies[0]["where"])
        assert any(any(e in a["cause"] for e in expected[fault["kind"]]) for a in anomalies), (step, anomalies[0]["cause"])


def test_gpu_work_grown_in_backward_is_placed_there_with_its_kernels(te_nsys):
    step = next(s for s, f in _faults(TE_NSYS).items() if f["kind"] == "gpu_backward_excess")
    finding = _step_findings(te_nsys)[step]
    assert finding["cause"] == "gpu_compute"
    assert " › backward" in finding["where"]
    top = finding["places"][0]
    assert top["side"] == "gpu" and top["kernels"]
    assert top["kernels"][0]["count"] > 10 * top["kernels"][0]["typical_count"]
    assert top["kernels"][0]["name"] in finding["evidence"]


def test_a_range_that_only_waited_for_the_gpu_is_not_blamed(two_rank):
    # Step 7 of the 2-rank sample: rank 1 ran its attention 4x; the router after it holds the
    # next host sync and grew as much, but launched nothing more.
    findings = two_rank
    finding = next(a for a in anomaly_records(findings.anomalies) if a["kind"] == "step" and (a["rank"], a["step"]) == (1, 7))
    assert "attention" in finding["where"] and finding["cause"] == "gpu_compute"
    assert not [a for a in anomaly_records(findings.anomalies) if a["kind"] == "range" and a["step"] == 7 and "router" in a["where"]]


def test_file_io_and_a_queue_wait_are_named_from_os_calls(dense_nsys):
    faults = _faults(DENSE_NSYS)
    found = _step_findings(dense_nsys)
    io = next(s for s, f in faults.items() if f["kind"] == "file_io")
    assert found[io]["cause"] == "cpu_gap.io"
    assert "fsync" in found[io]["evidence"] or "write" in found[io]["evidence"]
    wait = next(s for s, f in faults.items() if f["kind"] == "queue_wait")
    assert found[wait]["cause"] == "cpu_gap.blocked" and found[wait]["where"].endswith("› data")


def test_the_cuda_allocator_is_its_own_cause_with_the_calls_named(dense_nsys):
    step = next(s for s, f in _faults(DENSE_NSYS).items() if f["kind"] == "cuda_allocator_churn")
    finding = _step_findings(dense_nsys)[step]
    assert finding["cause"] == "cpu_gap.cuda_allocator"
    assert "cudaMalloc" in finding["evidence"] or "cudaFree" in finding["evidence"]


def test_a_host_sync_is_the_same_cause_in_analyze_and_explain(te_nsys):
    step = next(s for s, f in _faults(TE_NSYS).items() if f["kind"] == "host_sync")
    assert _step_findings(te_nsys)[step]["cause"] == "host_sync"
    assert step_postmortem(te_nsys, step=step)["cause"] == "host_sync"


def test_one_stall_is_one_finding_at_the_deepest_range(te_nsys):
    step = next(s for s, f in _faults(TE_NSYS).items() if f["kind"] == "gc_pause")
    ranges = [a for a in anomaly_records(te_nsys.anomalies) if a["kind"] == "range" and a["step"] == step]
    # forward, decoder.layers.5 and self_attention all hold the pause; core_attention is named.
    assert [a["name"] for a in ranges] == ["core_attention"]
    assert ranges[0]["where"] == "train_step › forward › decoder.layers.5 › self_attention › core_attention"


def test_evidence_never_cites_the_range_under_judgement(te_nsys):
    for finding in anomaly_records(te_nsys.anomalies):
        if finding["kind"] == "range" and "ops:" in finding["evidence"]:
            assert f"ops: {finding['name']} (" not in finding["evidence"]
    torch = analyze(traceinsight.load(TE_TORCH))
    for finding in anomaly_records(torch.anomalies):
        name = finding.get("name") or finding["where"].split(" › ")[-1]
        assert f"ops: {name} (" not in finding["evidence"]
