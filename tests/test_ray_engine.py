"""``--engine ray`` gives the same JSON findings as the local engine (on a local Ray, 2 CPUs)."""

from __future__ import annotations

import glob
import os

import pytest

from conftest import SAMPLE_TRACES, shared
import traceinsight
from traceinsight.analysis.engine import analyze_model
from traceinsight.analysis.options import Options
from traceinsight.report.json_report import render_json

ray = pytest.importorskip("ray", reason="the ray extra is not installed")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _both(paths):
    from traceinsight.engines.ray_engine import analyze_with_ray

    remote = render_json(analyze_with_ray(paths, options=Options()))
    local = render_json(analyze_model(traceinsight.load(paths), Options()))
    return remote, local


def test_two_rank_findings_are_identical():
    remote, local = _both([str(SAMPLE_TRACES / "moe_2rank")])
    assert remote == local
    assert b'"waits"' in local and b'"waiting_for_rank"' in local


def test_h200_two_rank_findings_are_identical():
    folder = shared("device/h200_2rank_torch")
    remote, local = _both([str(folder / "rank0.json.gz"), str(folder / "rank1.json.gz")])
    assert remote == local


def test_eight_rank_findings_are_identical():
    files = sorted(glob.glob(str(shared("kineto/param_dlrm_8rank_v100") / "*.json.gz")))
    remote, local = _both(files)
    assert remote == local


def test_a_bad_file_is_a_clear_error(tmp_path):
    from traceinsight.engines.ray_engine import analyze_with_ray
    from traceinsight.errors import TraceInputError

    bad = tmp_path / "rank0.json"
    bad.write_text('{"traceEvents": [')
    with pytest.raises(TraceInputError, match="rank0.json"):
        analyze_with_ray([str(bad)])
