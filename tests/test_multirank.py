"""Clock alignment, collective matching and waits on hand-built ranks with known answers,
and on a real 2-rank trace whose clock is shifted on purpose."""

from __future__ import annotations

import polars as pl
import pytest

from conftest import US, annotation, build_model, kernel, launch, shared
import traceinsight
from traceinsight.analysis.pipeline import analyze
from traceinsight.model import TraceModel
from traceinsight.report.records import straggler_records, wait_records

MS = 1000 * US


def _rank(rank: int, *, clock_shift_us: float, arrivals_us: list[float], ends_us: list[float],
          origin_ns: int = 1_700_000_000_000_000_000) -> TraceModel:
    """One rank: step 1 holding one all-to-all per (arrival, end), times on its own clock."""
    rows = [annotation("step 1", 0 + clock_shift_us, 10_000 + clock_shift_us, rank=rank)]
    for i, (arrive, end) in enumerate(zip(arrivals_us, ends_us)):
        t = arrive + clock_shift_us
        rows += [
            annotation(f"layer{i}.dispatch", t - 20, end + clock_shift_us + 5, rank=rank),
            launch("cudaLaunchKernel", t - 10, t - 8, 10 + i, rank=rank),
            kernel("ncclDevKernel_SendRecv", t, end + clock_shift_us, 10 + i, rank=rank, stream=20),
        ]
    model = build_model(rows, ranks=[rank])
    # One file per rank, as each rank's profiler writes its own (each its own clock).
    return TraceModel(intervals=model.intervals, ranks=model.ranks.with_columns(
        clock_origin_ns=pl.lit(origin_ns, dtype=pl.Int64), source=pl.lit(f"rank{rank}.json")), samples=model.samples)


def _job(shift_us: float):
    # Rank 1 arrives 300 µs late at the first collective, rank 0 400 µs late at the second;
    # both collectives end together on the true clock. Rank 1's clock reads shift_us ahead.
    rank0 = _rank(0, clock_shift_us=0, arrivals_us=[1000, 5400], ends_us=[1500, 5700])
    rank1 = _rank(1, clock_shift_us=shift_us, arrivals_us=[1300, 5000], ends_us=[1500, 5700])
    return TraceModel.concat([rank0, rank1])


@pytest.mark.parametrize("shift_us", [0, 3000, -3000])
def test_offsets_recover_a_shifted_clock_and_waits_are_exact(shift_us):
    findings = analyze(_job(shift_us))
    assert findings.alignment.offsets == {0: 0, 1: int(-shift_us * US)}
    assert findings.alignment.corrections[1] == int(shift_us * US)
    assert findings.alignment.residual_max_ns == 0
    waits = sorted((w["rank"], w["waiting_for_rank"], w["wait_ms"], w["phase"]) for w in wait_records(findings.waits))
    assert waits == [(0, 1, 0.3, "layer0.dispatch"), (1, 0, 0.4, "layer1.dispatch")]
    breakdown = findings.steps.sort("rank")
    # The waits are exposed communication on each waiting rank.
    assert breakdown.get_column("cross_rank_wait_ns").to_list() == [300 * US, 400 * US]
    stragglers = {(s["phase"], s["straggler"]) for s in straggler_records(findings.stragglers)}
    assert stragglers == {("layer0.dispatch", 1), ("layer1.dispatch", 0)}


def test_collectives_match_by_step_and_name_not_by_time():
    # Rank 1's window starts one collective earlier (an extra all-reduce in step 0): matching by
    # step number and per-name occurrence still pairs the step-1 collectives.
    rank0 = _rank(0, clock_shift_us=0, arrivals_us=[1000], ends_us=[1500])
    rank1 = _rank(1, clock_shift_us=0, arrivals_us=[1200], ends_us=[1500])
    extra = build_model([
        annotation("step 0", -3000, -1, rank=1), launch("cudaLaunchKernel", -2000, -1999, 99, rank=1),
        kernel("ncclDevKernel_AllReduce_Sum_f32_RING_LL", -1900, -1500, 99, rank=1),
    ], ranks=[1])
    rank1 = TraceModel(intervals=pl.concat([rank1.intervals, extra.intervals]), ranks=rank1.ranks)
    findings = analyze(TraceModel.concat([rank0, rank1]))
    assert findings.alignment.matched == 1
    assert [(w["rank"], w["wait_ms"]) for w in wait_records(findings.waits)] == [(0, 0.2)]


def test_real_two_rank_trace_with_rank1_clock_shifted_by_3ms():
    folder = "device/h200_2rank_torch"
    model = traceinsight.load([shared(f"{folder}/rank0.json.gz"), shared(f"{folder}/rank1.json.gz")])
    baseline = analyze(model)
    shift = 3 * MS
    shifted = TraceModel(
        intervals=model.intervals.with_columns(
            pl.when(pl.col("rank") == 1).then(pl.col("start_ns") + shift).otherwise(pl.col("start_ns")).alias("start_ns"),
            pl.when(pl.col("rank") == 1).then(pl.col("end_ns") + shift).otherwise(pl.col("end_ns")).alias("end_ns"),
        ),
        samples=model.samples, ranks=model.ranks,
    )
    moved = analyze(shifted)
    assert abs(moved.alignment.offsets[1] - (baseline.alignment.offsets[1] - shift)) <= 1_000
    assert moved.alignment.residual_p50_ns == pytest.approx(baseline.alignment.residual_p50_ns, abs=1_000)
    before = {(w["step"], w["rank"], w["key"]): w["wait_ms"] for w in wait_records(baseline.waits)}
    after = {(w["step"], w["rank"], w["key"]): w["wait_ms"] for w in wait_records(moved.waits)}
    common = before.keys() & after.keys()
    assert len(common) >= 0.95 * len(before)
    assert max(abs(before[k] - after[k]) for k in common) <= 0.002  # within 2 µs


def test_eight_rank_dlrm_allreduce_ends_align_within_microseconds():
    import glob

    files = sorted(glob.glob(str(shared("kineto/param_dlrm_8rank_v100") / "*.json.gz")))
    findings = analyze(traceinsight.load(files))
    assert sorted(findings.ranks.get_column("rank").to_list()) == list(range(8))
    assert findings.alignment.method == "collectives"
    assert findings.alignment.matched >= 5
    assert findings.alignment.residual_max_ns <= 10_000  # the format notes: 1-7 µs
    # The files' absolute clocks already agree: the skew correction is tiny.
    assert max(abs(c) for c in findings.alignment.corrections.values()) <= 10_000
    ranks_waiting = {w["rank"] for w in wait_records(findings.waits) if "SendRecv" in w["collective"]}
    assert len(ranks_waiting) >= 6


def test_two_processes_in_one_nsys_file():
    findings = analyze(traceinsight.load(shared("nsys/nsysai-h100x2-nccl-2026.2.sqlite")))
    assert findings.ranks.height == 2
    assert findings.alignment.offsets[findings.alignment.reference_rank] == 0
    assert findings.collectives.height > 0
    assert findings.alignment.residual_p50_ns is not None and findings.alignment.residual_p50_ns < 50_000
