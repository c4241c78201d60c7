"""CPU-gap attribution on hand-built traces: each evidence source and its precedence."""

from __future__ import annotations

import polars as pl

from conftest import US, annotation, build_model, kernel, launch
from traceinsight.analysis.analyzers.cause_totals import summarize_causes
from traceinsight.analysis.analyzers.cpu_gap_causes import attribute_cpu_gaps
from traceinsight.analysis.analyzers.step_breakdown import step_breakdown
from traceinsight.analysis.analyzers.steps import find_steps
from traceinsight.model import SAMPLE_SCHEMA, TraceModel, conform


def _attributed(model):
    return attribute_cpu_gaps(model, step_breakdown(model, find_steps(model)).gaps)


def _base_rows():
    # The GPU runs dry at 100 µs and the next kernel is launched at 1000 µs: a 900 µs cpu_gap
    # on thread 1 (plus the 0-10 µs before the first kernel).
    return [
        annotation("step 0", 0, 2000),
        annotation("GroupedLinear forward layer2.fc1", 50, 1500),
        launch("cudaLaunchKernel", 0, 5, 1), kernel("gemm", 10, 100, 1),
        launch("cudaLaunchKernel", 1000, 1005, 2), kernel("gemm", 1010, 2000, 2),
    ]


def _with_samples(model: TraceModel, samples: list[tuple[float, list[str], list[str]]]) -> TraceModel:
    frame = conform(pl.DataFrame({
        "rank": [0] * len(samples), "pid": [1] * len(samples), "tid": [1] * len(samples),
        "time_ns": [int(t * US) for t, _, _ in samples], "state": ["Running"] * len(samples),
        "frames": [f for _, f, _ in samples], "modules": [m for _, _, m in samples],
    }), SAMPLE_SCHEMA)
    return TraceModel(intervals=model.intervals, samples=frame, ranks=model.ranks)


def _big_gap(result):
    return result.sort("duration_ns", descending=True).row(0, named=True)


def test_cpu_samples_name_the_allocation():
    model = _with_samples(build_model(_base_rows()), [
        (200, ["_int_malloc", "malloc", "PyArray_Zeros", "_PyEval_EvalFrameDefault"], ["libc.so.6"] * 3 + ["libpython3.11.so"]),
        (300, ["clear_page_erms", "do_anonymous_page", "__memset_avx2"], ["vmlinux"] * 3),
        (400, ["_int_malloc", "malloc"], ["libc.so.6"] * 2),
        (500, ["_PyEval_EvalFrameDefault"], ["libpython3.11.so"]),
    ])
    gap = _big_gap(_attributed(model))
    assert (gap["start_ns"], gap["end_ns"]) == (100 * US, 1010 * US)
    assert gap["cause"] == "memory_allocation"
    assert gap["evidence_source"] == "cpu samples"
    assert gap["evidence"].startswith("_int_malloc (50%)")


def test_os_runtime_sleep_marks_a_blocked_thread():
    rows = _base_rows() + [dict(kind="osrt", name="clock_nanosleep", start_ns=120 * US, end_ns=990 * US)]
    gap = _big_gap(_attributed(build_model(rows)))
    assert gap["cause"] == "blocked"
    assert gap["evidence"] == "clock_nanosleep (96%)"


def test_garbage_collection_from_python_functions():
    rows = _base_rows() + [
        dict(kind="python", name="train.py(88): forward", start_ns=60 * US, end_ns=1400 * US),
        dict(kind="python", name="<built-in method collect of module gc object at 0x7f>", start_ns=150 * US, end_ns=950 * US),
    ]
    gap = _big_gap(_attributed(build_model(rows)))
    assert gap["cause"] == "garbage_collection"
    assert gap["evidence_source"] == "python functions"


def test_an_annotation_alone_says_where_but_not_why():
    gap = _big_gap(_attributed(build_model(_base_rows())))
    assert gap["cause"] == "unknown"
    # The range around the gap is where it happened, not what the host did: never evidence.
    assert gap["evidence"] is None and gap["evidence_source"] == "none"


def test_many_small_ops_and_launches_are_launch_overhead():
    rows = _base_rows()
    for i in range(40):  # aten::split and tiny launches fill the gap
        t = 110 + i * 22
        rows.append(dict(kind="cpu_op", name="aten::split", start_ns=t * US, end_ns=(t + 20) * US))
        rows.append(launch("cudaLaunchKernel", t + 5, t + 8, 100 + i))
    gap = _big_gap(_attributed(build_model(rows)))
    assert gap["cause"] == "launch_overhead"
    assert gap["launches"] == 41  # and the launch that ends the gap
    assert gap["evidence"].startswith("aten::split")


def test_summary_adds_up_per_cause():
    rows = _base_rows() + [dict(kind="osrt", name="nanosleep", start_ns=120 * US, end_ns=990 * US)]
    summary = summarize_causes(_attributed(build_model(rows)))
    blocked = summary.filter(pl.col("cause") == "blocked").row(0, named=True)
    assert blocked["gap_ns"] == 910 * US
