"""Step detection and the per-step breakdown on hand-built traces with known answers."""

from __future__ import annotations

import polars as pl
import pytest

from conftest import US, annotation, build_model, kernel, launch
from traceinsight.analysis.analyzers.step_breakdown import step_breakdown
from traceinsight.analysis.analyzers.steps import find_steps
from traceinsight.analysis.categories import CATEGORIES


def _breakdown(model, **kwargs):
    table = find_steps(model, **kwargs)
    return step_breakdown(model, table)


def _step(result, step, rank=0):
    row = result.steps.filter((pl.col("step") == step) & (pl.col("rank") == rank)).row(0, named=True)
    return {c: row[f"{c}_ns"] / US for c in CATEGORIES} | {"duration": row["duration_ns"] / US}


def test_step_markers_of_every_spelling_are_found():
    rows = [annotation(name, i * 100, i * 100 + 50) for i, name in enumerate(
        ["ProfilerStep#12", "step 7", "Iteration_3", "iter#9", "stepper 1", "my step 2"])]
    table = find_steps(build_model(rows))
    assert table.source == "marker"
    assert table.steps.get_column("step").to_list() == [3, 7, 9, 12]


def test_custom_marker_and_fallback_to_one_step():
    rows = [annotation("fwd-bwd 5", 0, 50), kernel("k", 10, 20, 1), launch("cudaLaunchKernel", 5, 6, 1)]
    assert find_steps(build_model(rows), pattern=r"fwd-bwd (\d+)").steps["step"].to_list() == [5]
    fallback = find_steps(build_model(rows))
    assert fallback.source == "whole trace"
    assert fallback.steps.row(0, named=True)["start_ns"] == 0


def test_breakdown_partitions_a_step_exactly():
    # step 1: [0, 1000) µs on the CPU.
    #  compute kernel 100-300 (launched at 50), memcpy 300-350 alone, a kernel launched at 600
    #  runs 620-700 (the GPU ran dry at 350 and waited for the host: 350-620 is a cpu_gap),
    #  a sync 700-760 during which the GPU runs dry at 700 (host_sync until the next kernel
    #  at 780, launched 770), an nccl kernel 800-900 alone (communication), a kernel queued at
    #  790 behind a dependency runs 950-990 (900-950 idle: work was queued), tail 990-1000 idle.
    rows = [
        annotation("step 1", 0, 1000),
        launch("cudaLaunchKernel", 50, 55, 1), kernel("gemm", 100, 300, 1),
        launch("cudaMemcpyAsync", 290, 295, 2), dict(kind="memcpy", name="Memcpy DtoD", start_ns=300 * US, end_ns=350 * US, correlation=2),
        launch("cudaLaunchKernel", 600, 605, 3), kernel("gemm", 620, 700, 3),
        launch("cudaStreamSynchronize", 690, 760, 90),
        launch("cudaLaunchKernel", 770, 775, 4), kernel("relu", 780, 800, 4),
        launch("ncclAllReduce", 776, 779, 5), kernel("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 800, 900, 5),
        launch("cudaLaunchKernel", 785, 790, 6), kernel("late", 950, 990, 6, stream=9),
    ]
    step = _step(_breakdown(build_model(rows)), 1)
    assert step == {
        "gpu_compute": 200 + 80 + 20 + 40,
        "gpu_memory": 50,
        "communication": 100,
        "cross_rank_wait": 0,
        "host_sync": 80,
        "cpu_gap": 100 + 270,  # 0-100 before the first kernel, 350-620
        "idle": 50 + 10,
        "duration": 1000,
    }
    assert sum(v for k, v in step.items() if k != "duration") == step["duration"]


def test_long_work_after_a_sync_is_a_cpu_gap_beyond_the_refill_allowance():
    rows = [
        annotation("step 0", 0, 2000),
        launch("cudaLaunchKernel", 0, 5, 1), kernel("a", 10, 100, 1),
        launch("cudaDeviceSynchronize", 20, 105, 50),
        launch("cudaLaunchKernel", 1000, 1005, 2), kernel("b", 1010, 2000, 2),
    ]
    step = _step(_breakdown(build_model(rows)), 0)
    # GPU dry at 100 inside the sync (returns 105): host_sync 100 .. 105+100 = 205.
    assert step["host_sync"] == 105
    assert step["cpu_gap"] == 10 + (1010 - 205)
    assert step["gpu_compute"] == 90 + 990


def test_compute_hides_overlapping_communication_and_waits_split_it():
    rows = [
        annotation("step 3", 0, 100),
        launch("cudaLaunchKernel", 0, 1, 1), kernel("gemm", 0, 50, 1),
        launch("cudaLaunchKernel", 1, 2, 2), kernel("ncclDevKernel_SendRecv", 20, 100, 2, stream=20),
    ]
    model = build_model(rows)
    table = find_steps(model)
    waits = pl.DataFrame({"rank": [0], "start_ns": [40 * US], "end_ns": [70 * US]},
                         schema={"rank": pl.Int32, "start_ns": pl.Int64, "end_ns": pl.Int64})
    result = step_breakdown(model, table, waits=waits)
    step = _step(result, 3)
    assert step["gpu_compute"] == 50
    assert step["cross_rank_wait"] == 20  # 50-70: the wait hidden under compute does not count
    assert step["communication"] == 30


def test_step_window_extends_to_the_gpu_work_it_launched_but_not_past_the_next_step():
    rows = [
        annotation("step 0", 0, 100), launch("cudaLaunchKernel", 10, 12, 1), kernel("k", 50, 180, 1),
        annotation("step 1", 150, 200), launch("cudaLaunchKernel", 160, 162, 2), kernel("k", 180, 400, 2),
    ]
    steps = find_steps(build_model(rows)).steps
    assert steps.select("step", "start_ns", "end_ns").rows() == [(0, 0, 150 * US), (1, 150 * US, 400 * US)]


def test_every_gap_piece_is_labelled_with_its_step_and_launching_thread():
    rows = [
        annotation("step 0", 0, 100), launch("cudaLaunchKernel", 40, 41, 1, tid=7), kernel("gemm", 50, 100, 1),
    ]
    gaps = _breakdown(build_model(rows)).gaps
    assert gaps.select("step", "start_ns", "end_ns", "category", "tid", "next_name").rows() == [
        (0, 0, 50 * US, "cpu_gap", 7, "gemm")
    ]


@pytest.mark.parametrize("name", ["ncclDevKernel_SendRecv", "void deep_ep::intranode::dispatch<8>(int*)",
                                  "ncclKernel_AllReduce_RING_LL_Sum_float"])
def test_communication_kernels_are_recognised(name):
    rows = [annotation("step 0", 0, 10), launch("cudaLaunchKernel", 0, 1, 1), kernel(name, 0, 10, 1)]
    assert _step(_breakdown(build_model(rows)), 0)["communication"] == 10
