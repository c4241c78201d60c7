"""Issue 14: N ranks, not 2. Synthetic jobs of 16 and 64 ranks built from one real rank file
(``kineto/param_dlrm_8rank_v100`` worker 0), with clock skews and waits known by construction,
and the real 8-rank set end to end."""

from __future__ import annotations

import glob
import io

import polars as pl
import pytest
from rich.console import Console

from conftest import US, shared
import traceinsight
from traceinsight.analysis.pipeline import analyze
from traceinsight.analysis.postmortem import step_postmortem
from traceinsight.model import TraceModel
from traceinsight.report.html import render_html
from traceinsight.report.terminal import render_findings

COMM = "(?i)nccl"


@pytest.fixture(scope="module")
def worker0() -> TraceModel:
    files = sorted(glob.glob(str(shared("kineto/param_dlrm_8rank_v100") / "worker0_*.json.gz")))
    return traceinsight.load(files[0])


def _early_us(rank: int, collective: int, n: int) -> int:
    """How much earlier (µs) rank ``rank`` reaches collective ``collective``: a permutation of
    0..n-1 per collective, so every collective has another straggler."""
    return ((rank * 7 + collective * 3) % n) * 2


def _skew_ns(rank: int) -> int:
    return (rank * 37_311) % 900_001 - 450_000  # up to +-0.45 ms of clock skew


def synthetic_job(worker: TraceModel, n: int) -> TraceModel:
    """``n`` copies of one real rank: copy r arrives ``_early_us(r, k)`` earlier at its k-th
    collective (its communication kernel starts that much earlier, ends as before) and its
    clock reads ``_skew_ns(r)`` ahead. Each copy is its own file (its own clock)."""
    intervals = worker.intervals
    comm = intervals.filter((pl.col("kind") == "kernel") & pl.col("name").str.contains(COMM)).sort("start_ns")
    order = {start: k for k, start in enumerate(comm.get_column("start_ns").to_list())}
    parts = []
    for rank in range(n):
        early = {start: _early_us(rank, k, n) * US for start, k in order.items()}
        is_comm = (pl.col("kind") == "kernel") & pl.col("name").str.contains(COMM)
        shifted = intervals.with_columns(
            start_ns=pl.when(is_comm).then(pl.col("start_ns") - pl.col("start_ns").replace_strict(early, default=0))
            .otherwise(pl.col("start_ns")) + _skew_ns(rank),
            end_ns=pl.col("end_ns") + _skew_ns(rank),
            rank=pl.lit(rank, pl.Int32),
        )
        ranks = worker.ranks.with_columns(rank=pl.lit(rank, pl.Int32), world_size=pl.lit(n, pl.Int32),
                                          source=pl.lit(f"synthetic/rank{rank}.json"))
        parts.append(TraceModel(intervals=shifted, samples=worker.samples.head(0), ranks=ranks))
    return TraceModel.concat(parts)


@pytest.mark.parametrize("n", [16, 64])
def test_synthetic_jobs_recover_skews_and_waits_known_by_construction(worker0, n):
    findings = analyze(synthetic_job(worker0, n))
    alignment = findings.alignment
    assert alignment.trusted and alignment.method == "collectives"
    assert sorted(alignment.offsets) == list(range(n))
    # Every clock skew recovered exactly (the copies' collectives end together).
    for rank in range(n):
        assert alignment.offsets[rank] == -(_skew_ns(rank) - _skew_ns(0))
        assert alignment.per_rank[rank]["residual_max_ns"] == 0
    collectives = findings.collectives
    n_collectives = worker0.intervals.filter(
        (pl.col("kind") == "kernel") & pl.col("name").str.contains(COMM)).height
    assert collectives.get_column("key").n_unique() == n_collectives
    assert (collectives.get_column("participants") == n).all()
    # Waits and stragglers exactly as built.
    keys = collectives.group_by("key").agg(first=pl.col("last_arrival_ns").first()).sort("first").get_column("key")
    for k, key in enumerate(keys.to_list()):
        part = collectives.filter(pl.col("key") == key)
        early = {r: _early_us(r, k, n) for r in range(n)}
        late = min(early, key=early.get)
        assert part.get_column("straggler").unique().to_list() == [late]
        got = dict(zip(part.get_column("rank").to_list(), part.get_column("wait_ns").to_list()))
        assert got == {r: (early[r] - early[late]) * US for r in range(n)}
    # The breakdown counts each waiting nanosecond once, as exposed waiting (where a wait that
    # starts earlier overlaps other GPU work of the same rank, that work takes precedence).
    exposed = findings.steps.get_column("cross_rank_wait_ns").sum()
    total = collectives.get_column("wait_ns").sum()
    assert 0.9 * total <= exposed <= total


def test_synthetic_16_ranks_render_in_terminal_html_and_explain(worker0):
    findings = analyze(synthetic_job(worker0, 16))
    buffer = io.StringIO()
    render_findings(findings, Console(file=buffer, width=160, color_system=None))
    text = buffer.getvalue()
    assert "Clock alignment per rank" in text and "Cross-rank waiting per step" in text
    page = render_html(findings)
    assert "Clock alignment per rank" in page
    step = int(findings.collectives.get_column("step").drop_nulls().mode()[0])
    report = step_postmortem(findings, step=step)
    assert report["rank_chosen_as"] == "straggler"
    assert all(len(w["arrivals"]) == 16 for w in report["waits"])


def test_eight_rank_dlrm_every_view():
    files = sorted(glob.glob(str(shared("kineto/param_dlrm_8rank_v100") / "*.json.gz")))
    findings = analyze(traceinsight.load(files))
    assert findings.alignment.pairing == "order" and findings.alignment.trusted
    assert set(findings.alignment.per_rank) == set(range(8))
    assert all(info["residual_max_ns"] <= 10_000 for info in findings.alignment.per_rank.values())
    assert not any("of the job's" in w or "not one job" in w for w in findings.warnings)
    buffer = io.StringIO()
    render_findings(findings, Console(file=buffer, width=160, color_system=None))
    assert "Clock alignment per rank" in buffer.getvalue()
    assert "Clock alignment per rank" in render_html(findings)
