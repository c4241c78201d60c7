"""Range statistics on hand-built traces: lag to the first kernel and launched GPU time."""

from __future__ import annotations

import polars as pl

from conftest import US, annotation, build_model, kernel, launch
from traceinsight.analysis.analyzers.range_instances import range_instances
from traceinsight.analysis.analyzers.range_statistics import range_statistics


def test_lag_from_range_start_to_first_kernel_and_gpu_time():
    rows = [
        annotation("GroupedLinear forward layer0.fc1", 0, 300),
        launch("cudaLaunchKernel", 200, 205, 1), kernel("gemm", 210, 260, 1),
        launch("cudaLaunchKernel", 206, 210, 2), kernel("gemm", 260, 290, 2),
        annotation("GroupedLinear forward layer0.fc1", 400, 450),
        launch("cudaLaunchKernel", 401, 405, 3), kernel("gemm", 406, 416, 3),
        annotation("empty range", 500, 510),
        launch("cudaLaunchKernel", 900, 905, 4), kernel("late", 906, 910, 4),
    ]
    inst = range_instances(build_model(rows)).sort("start_ns")
    assert inst.select("name", "launches", "gpu_ns", "first_gpu_lag_ns", "gpu_span_ns").rows() == [
        ("GroupedLinear forward layer0.fc1", 2, 80 * US, 210 * US, 80 * US),
        ("GroupedLinear forward layer0.fc1", 1, 10 * US, 6 * US, 10 * US),
        ("empty range", 0, 0, None, None),
    ]
    stats = range_statistics(inst).filter(pl.col("name") == "GroupedLinear forward layer0.fc1").row(0, named=True)
    assert stats["count"] == 2
    assert stats["max_ms"] == 0.3
    assert stats["lag_max_ms"] == 0.21


def test_nested_ranges_each_see_the_launches_inside_them():
    rows = [
        annotation("layer0 experts", 0, 100), annotation("GroupedLinear forward layer0.fc1", 10, 50),
        launch("cudaLaunchKernel", 20, 21, 1), kernel("a", 30, 40, 1),
        launch("cudaLaunchKernel", 60, 61, 2), kernel("b", 70, 75, 2),
    ]
    inst = range_instances(build_model(rows)).sort("start_ns")
    assert inst.select("name", "depth", "launches", "first_gpu_lag_ns").rows() == [
        ("layer0 experts", 0, 2, 30 * US), ("GroupedLinear forward layer0.fc1", 1, 1, 20 * US)]
