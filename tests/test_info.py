"""``traceinsight info`` on every real trace: it succeeds and its kernel counts equal the files' own."""

from __future__ import annotations

import gzip
import json
import sqlite3

import pytest
from click.testing import CliRunner

from conftest import SHARED_TRACES
from traceinsight.cli import main

NSYS = sorted(SHARED_TRACES.glob("nsys/*.sqlite")) + sorted(SHARED_TRACES.glob("device/*/*.sqlite"))
KINETO = sorted(p for p in SHARED_TRACES.glob("kineto/**/*.json*")) + sorted(
    p for p in SHARED_TRACES.glob("device/*/*.json.gz"))
KINETO = [p for p in KINETO if p.name != "summary.json"]


def _info(path) -> dict:
    result = CliRunner().invoke(main, ["info", "--json", str(path)])
    assert result.exit_code == 0, result.output
    (trace,) = json.loads(result.output)["traces"]
    return trace


def _kineto_kernels(path) -> int:
    raw = path.read_bytes()
    data = json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return sum(1 for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "Kernel"))


@pytest.mark.skipif(not NSYS, reason="../shared/traces not available")
@pytest.mark.parametrize("path", NSYS, ids=lambda p: p.name)
def test_info_on_every_nsys_export(path):
    trace = _info(path)
    assert trace["format"] == "nsys-sqlite"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        expected = db.execute("SELECT COUNT(*) FROM CUPTI_ACTIVITY_KIND_KERNEL").fetchone()[0] \
            if "CUPTI_ACTIVITY_KIND_KERNEL" in tables else 0
    assert trace["kernels"] == expected
    if not ({"CUPTI_ACTIVITY_KIND_KERNEL", "CUPTI_ACTIVITY_KIND_RUNTIME", "NVTX_EVENTS", "OSRT_API"} & tables):
        assert sum(trace["counts"].values()) == 0  # an export without event tables: zero events


@pytest.mark.skipif(not KINETO, reason="../shared/traces not available")
@pytest.mark.parametrize("path", [p for p in KINETO if p.stat().st_size < 5_000_000], ids=lambda p: p.parent.name + "/" + p.name)
def test_info_on_every_kineto_trace(path):
    trace = _info(path)
    assert trace["format"] == "kineto-json"
    assert trace["kernels"] == _kineto_kernels(path)
    assert len(trace["ranks"]) == 1


def test_info_never_prints_host_names_unless_asked():
    path = SHARED_TRACES / "device/h200_single_nsys/trace.sqlite"
    if not path.exists():
        pytest.skip("shared traces not available")
    trace = _info(path)
    assert all("hostname" not in r for r in trace["rank_details"])
    result = CliRunner().invoke(main, ["info", "--json", "--show-host", str(path)])
    assert "hostname" in json.loads(result.output)["traces"][0]["rank_details"][0]
