"""``traceinsight diff``: noise-aware before/after comparison per category, range and kernel."""

from __future__ import annotations

import json

import polars as pl
import pytest
from click.testing import CliRunner
from rich.console import Console

import traceinsight
from conftest import annotation, build_model, kernel, launch, shared
from traceinsight.analysis.diff import EXIT_SLOWER, DiffOptions, diff_findings, diff_to_dict, slower_than
from traceinsight.analysis.pipeline import analyze
from traceinsight.cli import main
from traceinsight.errors import TraceInputError
from traceinsight.report.diff_report import render_diff

SINGLE = "device/h200_single_torch"
TWO_RANK = "device/h200_2rank_torch"
HTA = "kineto/hta_trace_diff_2022"


@pytest.fixture(scope="module")
def single():
    """The 320 MB trace, analyzed once for the whole module (~8 s)."""
    return analyze(traceinsight.load(shared(SINGLE)))


@pytest.fixture(scope="module")
def two_rank():
    return analyze(traceinsight.load(shared(TWO_RANK)))


def _verdicts(frame: pl.DataFrame) -> set[str]:
    return set(frame.get_column("verdict").to_list())


# --------------------------------------------------------------------------------------------
# Done-when
# --------------------------------------------------------------------------------------------


def test_a_run_against_itself_shows_no_change(single):
    result = diff_findings(single, single)
    for frame in (result.categories, result.ranges, result.kernels):
        assert frame.height > 0
        assert _verdicts(frame) == {"unchanged"}
        assert (frame.get_column("delta_ns") == 0).all()
    assert result.new_kernels.is_empty() and result.vanished_kernels.is_empty()
    assert not result.kernels.get_column("launches_changed").any()
    assert result.summary["changed"] is False and result.summary["step_change_pct"] == 0
    assert not slower_than(result, 1)
    assert len(result.before["steps"]) == 40


def test_cli_self_diff_passes_fail_if_slower(tmp_path):
    path = shared(SINGLE)
    out = tmp_path / "diff.json"
    result = CliRunner().invoke(main, ["diff", str(path), "--against", str(path), "--fail-if-slower", "1",
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "no change beyond the step-to-step noise" in result.output
    data = json.loads(out.read_text())
    assert data["summary"]["changed"] is False
    assert {row["verdict"] for key in ("categories", "ranges", "kernels") for row in data[key]} == {"unchanged"}


def test_balanced_against_imbalanced_steps_shows_attention_and_dispatch_slower(two_rank):
    # Schedule steps 20-22 (ProfilerStep#21-23): rank 1 runs attention 4x, rank 0 waits in dispatch.
    result = diff_findings(two_rank, two_rank, steps_before=(16, 20), steps_after=(21, 23))
    slower_ranges = result.ranges.filter(pl.col("verdict") == "slower")
    names = set(slower_ranges.get_column("name").to_list())
    attention = {n for n in names if n.endswith(".attention")}
    dispatch = {n for n in names if n.endswith(".moe_dispatch")}
    assert len(attention) == 3 and dispatch, names
    # The attention grew on rank 1 (the one that ran it 4x), the dispatch on rank 0 (which waited).
    per_rank = slower_ranges.filter(pl.col("rank").is_not_null())
    assert set(per_rank.filter(pl.col("name").str.ends_with(".attention")).get_column("rank").to_list()) == {1}
    assert set(per_rank.filter(pl.col("name").str.ends_with(".moe_dispatch")).get_column("rank").to_list()) == {0}
    categories = result.categories.filter(pl.col("verdict") == "slower")
    assert "cross_rank_wait" in categories.get_column("name").to_list()
    assert result.summary["step_verdict"] == "slower" and result.summary["step_change_pct"] > 20
    # Layers that did not change stay unchanged: the router and combine of layer 0.
    steady = result.ranges.filter(pl.col("rank").is_null() & pl.col("name").is_in(["layer0.router", "layer0.moe_combine"]))
    assert _verdicts(steady) == {"unchanged"}


def test_cli_steps_options_and_fail_if_slower_exit_3(tmp_path):
    folder = str(shared(TWO_RANK))
    out = tmp_path / "d.json"
    args = ["diff", folder, "--against", folder, "--steps-before", "16-20", "--steps-after", "21-23",
            "--json", str(out), "--quiet"]
    result = CliRunner().invoke(main, [*args, "--fail-if-slower", "10"])
    assert result.exit_code == EXIT_SLOWER == 3, result.output
    assert "slower by" in result.output
    assert CliRunner().invoke(main, [*args, "--fail-if-slower", "80"]).exit_code == 0
    data = json.loads(out.read_text())
    assert set(data) >= {"before", "after", "options", "summary", "categories", "ranges", "kernels",
                         "new_kernels", "vanished_kernels"}
    assert data["before"]["steps"] == [16, 17, 18, 19, 20] and data["after"]["steps"] == [21, 22, 23]
    row = data["ranges"][0]
    assert set(row) == {"name", "rank", "before_ms", "after_ms", "delta_ms", "change_pct", "before_mad_ms",
                        "after_mad_ms", "noise_ms", "noise_known", "steps_before", "steps_after", "verdict"}
    assert (row["steps_before"], row["steps_after"]) == (5, 3)


def test_two_runs_on_different_gpus_show_kernel_differences():
    control = analyze(traceinsight.load(shared(f"{HTA}/control")))
    test = analyze(traceinsight.load(shared(f"{HTA}/test")))
    result = diff_findings(control, test)
    assert result.before["gpus"] == ["NVIDIA A100-PG509-200"] and result.after["gpus"] == ["Tesla V100-SXM2-16GB"]
    new = set(result.new_kernels.get_column("name").to_list())
    vanished = set(result.vanished_kernels.get_column("name").to_list())
    assert any(n.startswith("volta_sgemm") for n in new)
    assert any(n.startswith("ampere_sgemm") for n in vanished)
    assert not new & vanished
    both = result.kernels.filter(pl.col("rank").is_null() & (pl.col("status") == "both"))
    assert both.filter(pl.col("verdict") == "slower").height >= 5  # the same kernels run slower on the V100
    assert result.kernels.filter(pl.col("launches_changed")).height > 0
    # Different ranks on each side (3 of 8, 1 of 2): only the average rows.
    assert result.kernels.get_column("rank").null_count() == result.kernels.height
    data = diff_to_dict(result)
    assert data["summary"]["new_kernels"] == len(new) and data["new_kernels"][0]["status"] == "new"


def test_against_takes_several_paths(tmp_path):
    folder = shared(TWO_RANK)
    files = [str(folder / "rank0.json.gz"), str(folder / "rank1.json.gz")]
    out = tmp_path / "d.json"
    result = CliRunner().invoke(main, ["diff", *files, "--against", *files, "--json", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["before"]["ranks"] == data["after"]["ranks"] == [0, 1]
    assert data["summary"]["changed"] is False


# --------------------------------------------------------------------------------------------
# The verdict on hand-built runs
# --------------------------------------------------------------------------------------------


def _run(gemm_us: list[float], *, other_us: float = 50.0, extra: str | None = None):
    """One rank, one step per entry: a ``gemm`` kernel of the given length and an ``other`` one."""
    rows = []
    correlation = 0
    for step, gemm in enumerate(gemm_us):
        t0 = step * 2000.0
        rows.append(annotation(f"ProfilerStep#{step}", t0, t0 + 1500))
        rows.append(annotation("layer.attention", t0 + 10, t0 + 10 + gemm))
        for name, length in (("gemm", gemm), ("other", other_us)) + (((extra, 30.0),) if extra else ()):
            correlation += 1
            rows.append(launch("cudaLaunchKernel", t0 + 20 + correlation % 3, t0 + 25 + correlation % 3, correlation))
            start = t0 + 100 + 400 * (correlation % 3)
            rows.append(kernel(name, start, start + length, correlation))
    return analyze(build_model(rows))


def _row(frame: pl.DataFrame, name: str) -> dict:
    return frame.filter(pl.col("rank").is_null() & (pl.col("name") == name)).row(0, named=True)


def test_a_clear_change_is_called_and_its_direction_given():
    before = _run([100, 101, 99, 100, 102, 100])
    after = _run([200, 199, 201, 200, 198, 200])
    result = diff_findings(before, after)
    assert _row(result.kernels, "gemm")["verdict"] == "slower"
    assert _row(result.kernels, "other")["verdict"] == "unchanged"
    assert _row(result.ranges, "layer.attention")["verdict"] == "slower"
    assert _row(diff_findings(after, before).kernels, "gemm")["verdict"] == "faster"


def test_a_change_inside_the_step_to_step_noise_is_not_called():
    noisy = [100, 300, 120, 280, 90, 310]
    before = _run(noisy)
    after = _run([v + 40 for v in noisy])  # +40 µs median shift, spread ±100 µs
    row = _row(diff_findings(before, after).kernels, "gemm")
    assert row["delta_ns"] > 20_000 and row["delta_ns"] < row["noise_ns"]
    assert row["verdict"] == "unchanged"
    # Under the minimums (5 % and 20 µs) a steady change does not count either.
    small = _row(diff_findings(_run([1000] * 6), _run([1010] * 6)).kernels, "gemm")
    assert small["noise_ns"] == 0 and small["verdict"] == "unchanged"
    tuned = diff_findings(_run([1000] * 6), _run([1010] * 6), options=DiffOptions(min_relative=0.001, min_abs_ns=1_000))
    assert _row(tuned.kernels, "gemm")["verdict"] == "slower"


def test_new_vanished_kernels_and_launch_counts():
    before = _run([100] * 5, extra="old_kernel")
    after = _run([100] * 5, extra="new_kernel")
    result = diff_findings(before, after)
    assert result.new_kernels.get_column("name").to_list() == ["new_kernel"]
    assert result.vanished_kernels.get_column("name").to_list() == ["old_kernel"]
    new = _row(result.kernels, "new_kernel")
    assert (new["before_count"], new["after_count"], new["launches_changed"]) == (0, 1, True)
    assert _row(result.kernels, "gemm")["launches_changed"] is False


def test_step_ranges_outside_the_run_are_bad_input():
    run = _run([100] * 3)
    with pytest.raises(TraceInputError, match="no step in 10-12"):
        diff_findings(run, run, steps_before=(10, 12))
    result = CliRunner().invoke(main, ["diff", "a.json", "--against", "b.json", "--steps-before", "x"])
    assert result.exit_code == 2


def test_terminal_table_prints_trace_names_literally():
    before = _run([100] * 5, extra="[bold red]evil[/bold red]")
    after = _run([300] * 5)
    console = Console(record=True, width=200)
    render_diff(diff_findings(before, after), console)
    text = console.export_text()
    assert "[bold red]evil[/bold red]" in text
    assert "Vanished kernels" in text and "slower" in text


# --------------------------------------------------------------------------------------------
# Issue #15: one verdict, a noise band from the spread of the medians, a consistent "all" row
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pct", ["10", "30"])
def test_printed_verdict_and_fail_if_slower_agree(tmp_path, pct):
    # Steps 11-15 hold the batch-imbalance phase and a 65 ms outlier: +23.8 % on the median step.
    folder = str(shared(TWO_RANK))
    out = tmp_path / "d.json"
    result = CliRunner().invoke(main, ["diff", folder, "--against", folder, "--steps-before", "16-20",
                                       "--steps-after", "11-15", "--json", str(out), "--fail-if-slower", pct],
                                env={"COLUMNS": "80"})
    summary = json.loads(out.read_text())["summary"]
    flat = " ".join(result.output.split())  # the line wraps at 80 columns
    verdict_line = flat[flat.index("median step:"):flat.index("steps)")]
    assert summary["step_verdict"] in verdict_line
    tripped = summary["step_verdict"] == "slower" and summary["step_change_pct"] > float(pct)
    assert result.exit_code == (EXIT_SLOWER if tripped else 0), result.output
    if summary["step_verdict"] != "slower":
        assert "slower by" not in result.output
    # the band is that of the medians (from 5 and 5 steps), and the line says so
    assert (summary["steps_before"], summary["steps_after"]) == (5, 5)
    assert verdict_line.endswith("from 5 + 5 ") and "noise ±" in verdict_line


def test_noise_band_is_the_spread_of_the_median_and_narrows_with_more_steps():
    noisy = [100, 300, 120, 280, 90, 310]
    few = _row(diff_findings(_run(noisy), _run(noisy)).kernels, "gemm")
    many = _row(diff_findings(_run(noisy * 4), _run(noisy * 4)).kernels, "gemm")
    assert few["steps_before"] == 6 and many["steps_before"] == 24
    # the MAD of single steps is ~95 us; the band of the median is well below 6 MADs and halves
    # with four times the steps
    assert 0 < few["noise_ns"] < 6 * few["before_mad_ns"]
    assert many["noise_ns"] == pytest.approx(few["noise_ns"] / 2, rel=0.05)
    # the same +200 us shift: inside the band with 6 steps a side, beyond it with 24
    shifted = [v + 200 for v in noisy]
    assert _row(diff_findings(_run(noisy), _run(shifted)).kernels, "gemm")["verdict"] == "unchanged"
    assert _row(diff_findings(_run(noisy * 4), _run(shifted * 4)).kernels, "gemm")["verdict"] == "slower"


def test_all_row_is_the_mean_of_the_per_rank_rows(two_rank):
    result = diff_findings(two_rank, two_rank, steps_before=(16, 20), steps_after=(11, 15))
    for name in ("step", "gpu_compute", "cross_rank_wait"):
        rows = result.categories.filter(pl.col("name") == name)
        overall = rows.filter(pl.col("rank").is_null()).row(0, named=True)
        ranks = rows.filter(pl.col("rank").is_not_null())
        assert ranks.height == 2
        for side in ("before_ns", "after_ns"):
            assert overall[side] == pytest.approx(ranks.get_column(side).mean())
    assert result.summary["median_step_ms_after"] == pytest.approx(
        _row(result.categories, "step")["after_ns"] / 1e6, abs=1e-3)
    # the per-rank change the mean hides is told: rank 0 computed more, rank 1 less
    lines = result.summary["step_change_lines"]
    assert any(line.startswith("rank 0 gpu_compute") and "slower" in line for line in lines), lines
    assert any(line.startswith("rank 1 gpu_compute") and "faster" in line for line in lines), lines


def test_a_kernel_launched_in_some_steps_only_is_listed_with_its_mean():
    before = _run([100] * 6)
    after = _run([100] * 6, extra="rare")  # launched in every step: keep it in the first two only
    after.gpu = after.gpu.filter(~((pl.col("name") == "rare") & (pl.col("start_ns") > 4_000_000)))
    result = diff_findings(before, after)
    new = result.new_kernels.row(0, named=True)
    assert new["name"] == "rare" and new["after_ns"] == 0  # its median over 6 steps
    assert new["after_mean_ns"] == pytest.approx(30_000 * 2 / 6)
    assert new["after_mean_count"] == pytest.approx(2 / 6)
    console = Console(record=True, width=80)
    render_diff(result, console)
    text = console.export_text()
    row = next(line for line in text[text.index("New kernels"):].splitlines() if line.lstrip().startswith("rare"))
    assert row.split()[1:] == ["0.010", "0.33"], row
