"""Issue acceptance on the labelled H200 nsys trace (../shared/traces/device/h200_single_nsys).

The answer key (truth.json) lists the injected faults and each step's measured wall time; a
fault "raised" its step when the wall time is far above the median (not every fault does).
"""

from __future__ import annotations

import json
import re

import polars as pl
import pytest

from conftest import shared
import traceinsight
from traceinsight.analysis.categories import CATEGORIES
from traceinsight.analysis.pipeline import analyze
from traceinsight.analysis.postmortem import step_postmortem
from traceinsight.report.records import anomaly_records

TRACE = "device/h200_single_nsys/trace.sqlite"
TRUTH = "device/h200_single_nsys/truth.json"

# What each injected fault kind must look like (category that grows, cause of the anomaly).
EXPECTED_CAUSE = {
    "host_malloc": "cpu_gap.memory_allocation",
    "gc_pause": "cpu_gap.garbage_collection",
    "split_overhead": "cpu_gap.launch_overhead",
    "sleep_stall": "cpu_gap.blocked",
}


@pytest.fixture(scope="module")
def truth():
    return json.loads(shared(TRUTH).read_text())


@pytest.fixture(scope="module")
def findings():
    return analyze(traceinsight.load(shared(TRACE)))


def _raised_steps(truth) -> set[int]:
    walls = truth["wall_ms"]
    median = sorted(walls)[len(walls) // 2]
    return {int(step) for step in truth["faults"] if walls[int(step)] > 2 * median}


def test_forty_steps_numbered_by_their_marker(findings, truth):
    steps = findings.steps
    assert findings.step_source == "marker"
    assert steps.get_column("step").to_list() == list(range(truth["steps"]))


def test_breakdown_sums_to_each_step_and_matches_measured_wall_time(findings, truth):
    for row in findings.steps.iter_rows(named=True):
        parts = sum(row[f"{c}_ns"] for c in CATEGORIES)
        assert parts == row["duration_ns"]
        assert all(row[f"{c}_ns"] >= 0 for c in CATEGORIES)
        # The step window (NVTX range + the GPU work it launched) is the measured step.
        assert row["duration_ns"] / 1e6 == pytest.approx(truth["wall_ms"][row["step"]], rel=0.05)


def test_faults_that_slowed_their_step_show_in_cpu_gap(findings, truth):
    steps = findings.steps
    typical_gap = steps.filter(~pl.col("anomalous")).get_column("cpu_gap_ns").median()
    for step in _raised_steps(truth):
        row = steps.filter(pl.col("step") == step).row(0, named=True)
        excess = row["duration_ns"] - steps.get_column("duration_ns").median()
        assert row["cpu_gap_ns"] - typical_gap > 0.7 * excess, step


def test_exactly_the_slowed_steps_are_flagged_with_the_right_cause(findings, truth):
    flagged = {a["step"]: a for a in anomaly_records(findings.anomalies) if a["kind"] == "step"}
    assert set(flagged) == _raised_steps(truth)
    for step, anomaly in flagged.items():
        kind = truth["faults"][str(step)]["kind"]
        assert anomaly["cause"] == EXPECTED_CAUSE[kind], (step, anomaly)


def test_where_names_the_faulty_grouped_linear(findings, truth):
    flagged = {a["step"]: a for a in anomaly_records(findings.anomalies) if a["kind"] == "step"}
    for step, fault in truth["faults"].items():
        if int(step) not in flagged or "GroupedLinear" not in fault["what"]:
            continue
        what = fault["what"]
        layer, fc = re.search(r"layer\s*(\d+)", what), re.search(r"fc\d", what)
        if not (layer and fc):  # "GroupedLinear in every layer": no single place
            continue
        name = f"GroupedLinear forward layer{layer.group(1)}.{fc.group(0)}"
        anomaly = flagged[int(step)]
        if fault["kind"] == "gc_pause":
            # Building ~3M objects at the step's start triggers collections of its own that
            # outlast the explicit gc.collect() in the range: the range is a place as well.
            assert name in anomaly["evidence"], step
            assert any(place["where"].endswith(name) for place in anomaly["places"]), step
        else:
            assert anomaly["where"].split(" › ")[-1] == name, step


def test_cpu_gap_evidence_names_allocation_gc_and_sleep(findings, truth):
    gaps = findings.cpu_gaps
    kinds = {int(s): f["kind"] for s, f in truth["faults"].items()}
    wanted = {"host_malloc": "memory_allocation", "gc_pause": "garbage_collection", "sleep_stall": "blocked"}
    for step, kind in kinds.items():
        if kind not in wanted:
            continue
        largest = gaps.filter(pl.col("step") == step).sort("duration_ns", descending=True).row(0, named=True)
        assert largest["cause"] == wanted[kind], (step, largest)
        assert largest["evidence"], step
    sleep_step = next(s for s, k in kinds.items() if k == "sleep_stall")
    largest = gaps.filter(pl.col("step") == sleep_step).sort("duration_ns", descending=True).row(0, named=True)
    assert "sleep" in largest["evidence"]


def test_range_lag_points_at_the_gap_before_the_gemms(findings, truth):
    step = next(int(s) for s, f in truth["faults"].items() if f["kind"] == "sleep_stall")
    report = step_postmortem(findings, step=step)
    assert report["range_lag"]["lag_ms"] > 100
    assert report["range_lag"]["cpu_in_lag"][0]["cause"] == "blocked"
    assert report["categories"][CATEGORIES.index("cpu_gap")]["ms"] > 100


def test_a_step_lists_every_place_that_explains_its_excess(findings, truth):
    gc_step = next(int(s) for s, f in truth["faults"].items() if f["kind"] == "gc_pause")
    finding = next(a for a in anomaly_records(findings.anomalies) if a["kind"] == "step" and a["step"] == gc_step)
    wheres = [p["where"] for p in finding["places"]]
    assert wheres[0].endswith("before layer0 attention")
    assert any(w.endswith("GroupedLinear forward layer3.fc2") for w in wheres)
    assert [p["excess_ms"] for p in finding["places"]] == sorted((p["excess_ms"] for p in finding["places"]), reverse=True)
