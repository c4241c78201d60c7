"""Issue acceptance on the labelled H200 PyTorch-profiler trace (../shared/traces/device/h200_single_torch).

``ProfilerStep#k`` is the answer key's step k-1. This trace has no Python stacks and no CPU
samples: it can say *that* the host held the GPU up and where, but for a sleep, an allocation or
a collector pause it cannot say why, and must answer ``cpu_gap`` rather than guess. Launch
overhead it can see (op and launch counts).
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
from traceinsight.report.records import anomaly_records

FOLDER = "device/h200_single_torch"


@pytest.fixture(scope="module")
def truth():
    return json.loads(shared(f"{FOLDER}/truth.json").read_text())


@pytest.fixture(scope="module")
def findings():
    return analyze(traceinsight.load(shared(f"{FOLDER}/trace.json.gz")))


def test_forty_steps_that_partition_exactly_and_match_wall_time(findings, truth):
    steps = findings.steps.sort("step")
    assert steps.height == truth["steps"]
    assert steps.get_column("step").to_list() == [s + 1 for s in range(truth["steps"])]
    for row in steps.iter_rows(named=True):
        assert sum(row[f"{c}_ns"] for c in CATEGORIES) == row["duration_ns"]
        assert row["duration_ns"] / 1e6 == pytest.approx(truth["wall_ms"][row["step"] - 1], rel=0.05)


def test_only_the_slowed_steps_are_flagged_with_honest_causes(findings, truth):
    walls = truth["wall_ms"]
    median = sorted(walls)[len(walls) // 2]
    slowed = {int(s) + 1: f["kind"] for s, f in truth["faults"].items() if walls[int(s)] > 2 * median}
    flagged = {a["step"]: a for a in anomaly_records(findings.anomalies) if a["kind"] == "step"}
    assert set(flagged) == set(slowed)
    for step, kind in slowed.items():
        expected = "cpu_gap.launch_overhead" if kind == "split_overhead" else "cpu_gap"
        assert flagged[step]["cause"] == expected, (step, kind, flagged[step])


def test_excess_is_cpu_gap_and_sleep_and_malloc_are_placed_in_their_range(findings, truth):
    steps = findings.steps
    typical = steps.filter(~pl.col("anomalous"))
    flagged = {a["step"]: a for a in anomaly_records(findings.anomalies) if a["kind"] == "step"}
    for truth_step, fault in truth["faults"].items():
        step = int(truth_step) + 1
        if step not in flagged:
            continue
        row = steps.filter(pl.col("step") == step).row(0, named=True)
        excess = row["duration_ns"] - typical.get_column("duration_ns").median()
        assert row["cpu_gap_ns"] - typical.get_column("cpu_gap_ns").median() > 0.7 * excess
        if fault["kind"] in ("host_malloc", "sleep_stall"):
            layer = re.search(r"layer\s*(\d+)", fault["what"]).group(1)
            fc = re.search(r"fc\d", fault["what"]).group(0)
            assert flagged[step]["where"].split(" › ")[-1] == f"GroupedLinear.forward[layer{layer}.{fc}]", flagged[step]
            assert "before its first GPU work started" in flagged[step]["evidence"]
