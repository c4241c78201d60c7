"""The committed sample traces (the README's example) against their answer keys, through the CLI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import SAMPLE_TRACES
from traceinsight.cli import main

SINGLE = SAMPLE_TRACES / "moe_single_nsys.sqlite"


def _faults(truth_path):
    truth = json.loads(truth_path.read_text())
    return {f["step"]: f for f in truth["faults"]}


def _analyze(tmp_path, *paths) -> dict:
    out = tmp_path / "findings.json"
    result = CliRunner().invoke(main, ["analyze", *map(str, paths), "--json", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def test_single_gpu_sample_flags_each_fault_with_its_cause(tmp_path):
    data = _analyze(tmp_path, SINGLE)
    faults = _faults(SAMPLE_TRACES / "truth.json")
    expected = {"host_memory_allocation": "cpu_gap.memory_allocation", "blocked_host_thread": "cpu_gap.blocked",
                "gc_pause": "cpu_gap.garbage_collection"}
    flagged = {a["step"]: a for a in data["anomalies"] if a["kind"] == "step"}
    assert set(flagged) == set(faults)
    for step, fault in faults.items():
        assert flagged[step]["cause"] == expected[fault["kind"]], (step, flagged[step])
        assert flagged[step]["where"].split(" › ")[-1] == fault["where"], step
    steps = [s for s in data["steps"] if s["anomalous"]]
    assert sorted(s["step"] for s in steps) == sorted(faults)


@pytest.mark.parametrize("folder", ["moe_2rank", "moe_2rank_nsys"])
def test_two_rank_samples_name_the_stalled_rank_and_the_waiting_one(tmp_path, folder):
    data = _analyze(tmp_path, SAMPLE_TRACES / folder)
    assert [r["rank"] for r in data["ranks"]] == [0, 1]
    faults = _faults(SAMPLE_TRACES / folder / "truth_rank0.json")
    stall = next(step for step, f in faults.items() if f["kind"].startswith("host_stall"))
    big = [w for w in data["waits"] if w["step"] == stall and w["wait_ms"] > 10]
    assert [(w["rank"], w["waiting_for_rank"]) for w in big] == [(1, 0)]
    assert "layer1" in big[0]["phase"] and "dispatch" in big[0]["phase"]
    causes = {(a["rank"], a["step"]): a["cause"] for a in data["anomalies"] if a["kind"] == "step"}
    assert causes[(0, stall)].startswith("cpu_gap")
    assert causes[(1, stall)] == "cross_rank_wait"
    imbalanced = [step for step, f in faults.items() if f["kind"] == "batch_imbalance"]
    dispatch_waits = lambda rank: sum(w["wait_ms"] for w in data["waits"]
                                      if w["rank"] == rank and w["step"] in imbalanced and "dispatch" in w["phase"])
    assert dispatch_waits(1) > 3 * dispatch_waits(0)


def test_info_json_counts_kernels_of_every_sample(tmp_path):
    import sqlite3

    result = CliRunner().invoke(main, ["info", "--json", str(SINGLE), str(SAMPLE_TRACES / "moe_2rank")])
    assert result.exit_code == 0, result.output
    traces = json.loads(result.output)["traces"]
    assert [t["format"] for t in traces] == ["nsys-sqlite", "kineto-json", "kineto-json"]
    with sqlite3.connect(f"file:{SINGLE}?mode=ro", uri=True) as db:
        assert traces[0]["kernels"] == db.execute("SELECT COUNT(*) FROM CUPTI_ACTIVITY_KIND_KERNEL").fetchone()[0]
    assert traces[1]["ranks"] == [0] and traces[2]["ranks"] == [1]
    assert traces[0]["steps"]["numbers"] == list(range(2, 10))


def test_explain_tells_the_post_mortem_of_a_faulty_step(tmp_path):
    faults = _faults(SAMPLE_TRACES / "truth.json")
    step = next(s for s, f in faults.items() if f["kind"] == "blocked_host_thread")
    out = tmp_path / "pm.json"
    result = CliRunner().invoke(main, ["explain", str(SINGLE), "--step", str(step), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert f"Step {step} on rank 0" in result.output
    report = json.loads(out.read_text())
    assert report["cause"] == "cpu_gap.blocked" and report["where"].endswith(" › " + faults[step]["where"])
    assert report["range_lag"]["range"] == faults[step]["where"]
    assert report["range_lag"]["lag_ms"] > 40  # the 50 ms sleep before the GEMMs
    assert report["cpu_gaps"][0]["cause"] == "blocked"
    categories = {c["category"]: c for c in report["categories"]}
    assert categories["cpu_gap"]["ms"] - categories["cpu_gap"]["typical_ms"] > 40


def test_explain_of_a_missing_step_is_a_clear_error():
    result = CliRunner().invoke(main, ["explain", str(SINGLE), "--step", "99"])
    assert result.exit_code == 2
    assert "no step 99" in result.output and "steps found: 2, 3, 4" in result.output
