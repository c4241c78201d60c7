"""Anomaly detection and root causes on hand-built traces with known answers."""

from __future__ import annotations

import polars as pl

from conftest import US, annotation, build_model, kernel, launch
from traceinsight.analysis.analyzers.step_flags import flag_steps
from traceinsight.analysis.pipeline import analyze
from traceinsight.analysis.postmortem import step_postmortem
from traceinsight.report.records import anomaly_records


S = 10  # every time below is in units of 10 µs: steps of 10 ms


def _training(n_steps: int, *, slow: dict[int, dict] | None = None) -> list[dict]:
    """Steps of 10 ms: a 'GroupedLinear' range launching 4 GEMMs; ``slow`` injects faults."""
    slow = slow or {}
    rows, t, corr = [], 0.0, 0
    for step in range(n_steps):
        fault = slow.get(step, {})
        pause = fault.get("pause_us", 0)
        launches = fault.get("launches", 4)
        gemm_us = fault.get("gemm_us", 50)
        length = 1000 + pause + max(0, launches - 4) * 60 + max(0, gemm_us - 50) * launches
        rows.append(annotation(f"step {step}", S * t, S * (t + length)))
        rows.append(annotation("GroupedLinear forward layer0.fc1", S * (t + 100), S * (t + 300 + pause + max(0, launches - 4) * 60)))
        if pause and fault.get("sleep"):
            rows.append(dict(kind="osrt", name="nanosleep", start_ns=int(S * (t + 110) * US), end_ns=int(S * (t + 110 + pause) * US)))
        start = t + 120 + pause
        gpu_free = 0.0  # one stream: a kernel starts when launched and the previous one is done
        for i in range(launches):
            corr += 1
            begin = max(start + i * 60 + 8, gpu_free)
            gpu_free = begin + gemm_us
            rows.append(launch("cudaLaunchKernel", S * (start + i * 60), S * (start + i * 60 + 5), corr))
            rows.append(kernel("gemm", S * begin, S * gpu_free, corr))
        t += length
    return rows


def test_jitter_is_not_flagged_but_a_stalled_step_is():
    durations = [1000 + (i % 5) * 40 for i in range(30)]  # ±8% jitter
    durations[12] = 4000
    steps = pl.DataFrame({"rank": [0] * 30, "step": list(range(30)), "duration_ns": [d * 10 * US for d in durations]},
                         schema={"rank": pl.Int32, "step": pl.Int64, "duration_ns": pl.Int64})
    flagged = flag_steps(steps).filter("anomalous").get_column("step").to_list()
    assert flagged == [12]


def test_slow_warm_up_phase_is_not_an_anomaly():
    durations = [1600, 1550, 1500, 1580, 1520] + [1000 + (i % 3) * 20 for i in range(25)]
    steps = pl.DataFrame({"rank": [0] * 30, "step": list(range(30)), "duration_ns": [d * 10 * US for d in durations]},
                         schema={"rank": pl.Int32, "step": pl.Int64, "duration_ns": pl.Int64})
    assert flag_steps(steps).filter("anomalous").height == 0
    # A spike inside the warm-up phase stands out from both sides.
    spiked = steps.with_columns(duration_ns=pl.when(pl.col("step") == 2).then(pl.col("duration_ns") * 2)
                                .otherwise(pl.col("duration_ns")))
    assert flag_steps(spiked).filter("anomalous").get_column("step").to_list() == [2]


def test_sleep_inside_a_range_is_found_with_its_lag_and_cause():
    findings = analyze(build_model(_training(20, slow={7: {"pause_us": 5000, "sleep": True}})))
    (anomaly,) = [a for a in anomaly_records(findings.anomalies) if a["kind"] == "step"]
    # ``where`` is the nesting path, from the step marker down to the range.
    assert (anomaly["step"], anomaly["where"], anomaly["cause"]) == (7, "step 7 › GroupedLinear forward layer0.fc1", "cpu_gap.blocked")
    assert anomaly["excess_ms"] == 50.0
    report = step_postmortem(findings, step=7)
    assert report["range_lag"]["lag_ms"] == 50.28  # 0.2 ms to the launch + 0.08 ms latency + the pause
    assert report["range_lag"]["cpu_in_lag"][0]["cause"] == "blocked"


def test_more_launches_than_usual_is_launch_overhead():
    # The same GPU work split into 16x more, smaller kernels (each launch costs the host time).
    findings = analyze(build_model(_training(20, slow={11: {"launches": 64, "gemm_us": 3}})))
    (anomaly,) = [a for a in anomaly_records(findings.anomalies) if a["kind"] == "step"]
    assert anomaly["step"] == 11 and anomaly["cause"] == "cpu_gap.launch_overhead"
    assert "64 GPU activities vs 4 typically (16.0x)" in anomaly["evidence"]


def test_longer_kernels_are_gpu_compute():
    findings = analyze(build_model(_training(20, slow={4: {"gemm_us": 1000}})))
    (anomaly,) = [a for a in anomaly_records(findings.anomalies) if a["kind"] == "step"]
    assert (anomaly["step"], anomaly["cause"]) == (4, "gpu_compute")


def test_a_slow_range_is_flagged_even_when_its_step_is_not():
    rows = _training(20)
    # Step 9's range launches its work 4 ms late, but the step absorbs it (the step's length
    # does not change): move the range's launches and stretch the range.
    rows = [r for r in rows if r.get("correlation") not in (37, 38, 39, 40)]
    base = 9 * 1000
    for i, corr in enumerate((37, 38, 39, 40)):
        rows.append(launch("cudaLaunchKernel", S * (base + 500 + i * 60), S * (base + 505 + i * 60), corr))
        rows.append(kernel("gemm", S * (base + 508 + i * 60), S * (base + 558 + i * 60), corr))
    rows = [r for r in rows if not (r["kind"] == "annotation" and r["name"].startswith("Grouped")
                                    and r["start_ns"] == S * (base + 100) * US)]
    rows.append(annotation("GroupedLinear forward layer0.fc1", S * (base + 100), S * (base + 800)))
    findings = analyze(build_model(rows))
    assert not [a for a in anomaly_records(findings.anomalies) if a["kind"] == "step"]
    ranges = [a for a in anomaly_records(findings.anomalies) if a["kind"] == "range"]
    assert [(a["step"], a["name"], a["where"]) for a in ranges] == [
        (9, "GroupedLinear forward layer0.fc1", "step 9 › GroupedLinear forward layer0.fc1")]
    assert ranges[0]["cause"].startswith("cpu_gap")
