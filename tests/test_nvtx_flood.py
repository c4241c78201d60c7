"""The emit_nvtx benchmark export: distinct names, valid nesting, the export's own ranges kept."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import polars as pl

from conftest import SAMPLE_TRACES
from traceinsight.analysis.analyzers.steps import find_steps
from traceinsight.ingest.nsys import read_nsys

_spec = importlib.util.spec_from_file_location(
    "make_nvtx_flood", Path(__file__).resolve().parents[1] / "bench" / "make_nvtx_flood.py")
flood = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flood)


def _properly_nested(annotations: pl.DataFrame) -> bool:
    """No two ranges of a thread overlap without one containing the other."""
    for _, thread in annotations.group_by("rank", "pid", "tid"):
        thread = thread.sort(["start_ns", "end_ns"], descending=[False, True])
        open_ends: list[int] = []
        for start, end in thread.select("start_ns", "end_ns").iter_rows():
            while open_ends and open_ends[-1] <= start:
                open_ends.pop()
            if open_ends and end > open_ends[-1]:
                return False
            open_ends.append(end)
    return True


def test_flood_shape(tmp_path):
    source = str(SAMPLE_TRACES / "moe_single_nsys.sqlite")
    original = read_nsys(source)
    counts = {}
    for factor in (1, 2):
        out = str(tmp_path / f"x{factor}.sqlite")
        counts[factor] = flood.make_flood(source, out, factor=factor)
        model = read_nsys(out)
        assert model.warnings == original.warnings
        annotations = model.of_kind("annotation")
        added = annotations.height - original.of_kind("annotation").height
        if factor == 1:
            launches = original.of_kind("kernel").height
            assert added >= launches  # every launch wrapped, and more
            emitted = annotations.filter(pl.col("name").str.contains(", seq = "))
            assert emitted.select(pl.col("name").n_unique()).item() == emitted.height
            assert _properly_nested(annotations)
        # The export's own step markers and ranges are untouched.
        assert find_steps(model).steps.equals(find_steps(original).steps)
        assert model.of_kind("kernel").equals(original.of_kind("kernel"))
    grown = counts[2]["NVTX_EVENTS"] - counts[1]["NVTX_EVENTS"]
    assert 0.8 < grown / counts[1]["NVTX_EVENTS"] <= 1.0
