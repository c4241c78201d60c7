"""Reports that do not mislead (issue #15): honest busy fraction, one time scale per anomaly
card, named range lanes, log scale / cut axis for outliers, a breakdown bar for single-step
traces, the load-balance saving plotted, the diff page consistent with the terminal and
fitting 1,400 and 900 px. Drawn in headless chromium where it is installed."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from rich.console import Console

import traceinsight
from conftest import SAMPLE_TRACES, page_figures, shared
from traceinsight.analysis.diff import diff_findings
from traceinsight.analysis.pipeline import analyze
from traceinsight.analysis.timeline import step_timeline, timelines_for_report, typical_steps
from traceinsight.report.diff_report import render_diff
from traceinsight.report.html import render_diff_html, render_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None,
                                   reason="chromium not installed (apt-get install chromium; .ci/run does)")

#: Test-only probe: once every figure is drawn, record per figure its section, axes (type,
#: range, tick labels), annotations and trace kinds, and where each table ends on the page.
_PROBE = """<script>(function(){function probe(){
 if(!document.documentElement.getAttribute('data-figures-drawn')){setTimeout(probe,50);return;}
 var out={figs:[],tables:[],width:document.documentElement.clientWidth};
 Array.prototype.forEach.call(document.querySelectorAll('.fig'),function(el){var L=el._fullLayout||{},axes={};
  Object.keys(L).forEach(function(k){if(/^[xy]axis[0-9]*$/.test(k)){axes[k]={type:L[k].type,range:L[k].range,
   ticks:(L[k]._vals||[]).map(function(v){return String(v.text);})};}});
  out.figs.push({section:(el.closest('section')||{}).id||'',axes:axes,
   ann:(L.annotations||[]).map(function(a){return String(a.text);}),
   traces:(el.data||[]).map(function(t){return t.type+'/'+(t.orientation||'');})});});
 Array.prototype.forEach.call(document.querySelectorAll('table'),function(t){var r=t.getBoundingClientRect();
  var w=(t.parentElement||t).getBoundingClientRect();
  out.tables.push({section:(t.closest('section')||{}).id||'',right:r.right,shown:w.right});});
 document.body.setAttribute('data-probe',JSON.stringify(out));}
 probe();})();</script></body>"""


def _draw(page: str, tmp_path: Path, width: int = 1400) -> dict:
    """Draw ``page`` at ``width`` px; the probe's findings (fails on any JavaScript error)."""
    folder = tmp_path / f"w{width}"
    folder.mkdir(exist_ok=True)
    path = folder / "report.html"
    path.write_text(page.replace("</body>", _PROBE), encoding="utf-8")
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               f"--user-data-dir={folder / 'profile'}", "--virtual-time-budget=15000",
               f"--window-size={width},1000", "--dump-dom", path.as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    root = dict(re.findall(r'([\w-]+)="([^"]*)"', re.search(r"<html\b([^>]*)>", result.stdout).group(1)))
    assert "data-js-errors" not in root, root.get("data-js-errors")
    assert root.get("data-figures-drawn") == root.get("data-figures-expected"), root
    body = re.search(r"<body\b[^>]*>", result.stdout).group(0)
    probe = re.search(r'data-probe="([^"]*)"', body)
    assert probe, "the probe did not run"
    return json.loads(html.unescape(probe.group(1)))


def _figure_json(page: str) -> list[dict]:
    return page_figures(page)


@pytest.fixture(scope="module")
def single_nsys():
    """The single-GPU sample: steps of 22-33 ms and two of 160 and 243 ms (8x the median)."""
    model = traceinsight.load(SAMPLE_TRACES / "moe_single_nsys.sqlite")
    findings = analyze(model)
    return model, findings, render_html(findings, timelines_for_report(model, findings))


@pytest.fixture(scope="module")
def one_step():
    """A real trace without step markers: the whole trace is one step window (MIT, HTA)."""
    findings = analyze(traceinsight.load(shared("kineto/hta_critical_path_alexnet_a100")))
    return findings, render_html(findings, {})


@pytest.fixture(scope="module")
def rank_diff():
    """Steps 16-20 against 11-15 of the 2-rank H200 run: rank 0 computes more, rank 1 less."""
    findings = analyze(traceinsight.load(shared("device/h200_2rank_torch")))
    result = diff_findings(findings, findings, steps_before=(16, 20), steps_after=(11, 15))
    return result, render_diff_html(result, before_label="steps 16-20", after_label="steps 11-15")


# ----------------------------------------------------------------------------- timelines


def test_merged_gpu_blocks_carry_their_busy_fraction_and_lanes_say_how_busy(single_nsys):
    model, findings, _ = single_nsys
    step = typical_steps(findings)[0]
    frame = step_timeline(model, findings, rank=0, step=step, max_events=600, resolution=1 / 1500)
    gpu = frame.filter(pl.col("kind").is_in(["kernel", "memcpy", "memset", "comm_kernel"]))
    merged = gpu.filter(pl.col("count") > 1)
    assert merged.height and merged.get_column("busy").min() < 0.9  # a merged block is not solid
    assert gpu.filter(pl.col("count") == 1).get_column("busy").to_list() == [1.0] * gpu.filter(pl.col("count") == 1).height
    # the lane's busy share is the union of the stream's GPU work over the step window
    window = findings.steps.filter((pl.col("rank") == 0) & (pl.col("step") == step)).row(0, named=True)
    w0, w1 = window["start_ns"], window["end_ns"]
    work = (model.intervals.filter(pl.col("kind").is_in(["kernel", "memcpy", "memset"])
                                   & (pl.col("end_ns") > w0) & (pl.col("start_ns") < w1))
            .select(pl.col("start_ns").clip(w0, w1), pl.col("end_ns").clip(w0, w1)).sort("start_ns"))
    covered, reach = 0, w0
    for start, end in work.iter_rows():
        covered += max(0, end - max(start, reach))
        reach = max(reach, end)
    label = gpu.get_column("lane")[0]
    assert label.endswith(f"busy {covered / (w1 - w0):.0%}"), label
    # the report draws each block with an opacity that grows with its busy fraction
    assert 0.05 < covered / (w1 - w0) < 0.5


def test_anomaly_cards_share_one_x_scale_and_name_their_range_lanes(single_nsys):
    _, findings, page = single_nsys
    timelines = [f["fig"] for f in _figure_json(page) if "xaxis2" in f["fig"]["layout"]]
    assert timelines
    for fig in timelines:
        layout = fig["layout"]
        assert layout["xaxis"]["range"] == layout["xaxis2"]["range"]
        assert layout["xaxis2"].get("matches") == "x"
        labels = layout["yaxis"]["ticktext"] + layout["yaxis2"]["ticktext"]
        assert not any(re.search(r"range L\d", label) for label in labels)
        assert any("step " in label for label in labels)  # the top range lane: the step marker
        ranges = [t for t in fig["data"] if t["name"] == "range"]
        assert ranges and all(t.get("text") for t in ranges)
        busy = [t for t in fig["data"] if t["name"] == "kernel"]
        opacity = [o for t in busy for o in np.atleast_1d(t["marker"]["opacity"])]
        assert min(opacity) < 0.9 <= max(opacity)  # merged blocks faint, single kernels solid


# ----------------------------------------------------------------------------- outliers


@needs_browser
def test_an_outlier_step_gets_a_log_scale_and_a_cut_breakdown_axis(single_nsys, tmp_path):
    _, findings, page = single_nsys
    durations = findings.steps.get_column("duration_ns").to_numpy() / 1e6
    assert durations.max() > 5 * np.median(durations)  # the case: 243 ms against a 31 ms median
    probe = _draw(page, tmp_path)
    steps = next(f for f in probe["figs"] if f["section"] == "steps")
    assert steps["axes"]["yaxis"]["type"] == "log"
    assert set(steps["axes"]["yaxis"]["ticks"]) >= {"20", "50", "100", "200"}
    breakdown = next(f for f in probe["figs"] if f["section"] == "breakdown")
    top = breakdown["axes"]["yaxis"]["range"][1]
    assert np.median(durations) * 2 < top < durations.max()
    cut = [a for a in breakdown["ann"] if "⇡" in a]
    assert len(cut) == int((durations > top).sum()) and f"{durations.max():,.0f} ms" in " ".join(cut)
    # the anomaly cards' panels keep one scale once drawn (plotly may not re-range one of them)
    for fig in probe["figs"]:
        if "xaxis2" in fig["axes"] and fig["section"] == "anomalies":
            assert fig["axes"]["xaxis"]["range"] == fig["axes"]["xaxis2"]["range"]


# ----------------------------------------------------------------------------- single step


@needs_browser
def test_a_single_step_trace_gets_a_breakdown_bar_not_broken_charts(one_step, tmp_path):
    findings, page = one_step
    assert findings.steps.height == 1 and findings.step_source == "whole trace"
    assert 'id="breakdown"' not in page and 'href="#breakdown"' not in page
    assert "The step window" in page
    probe = _draw(page, tmp_path)
    steps = [f for f in probe["figs"] if f["section"] == "steps"]
    assert len(steps) == 1
    assert set(steps[0]["traces"]) == {"bar/h"} and "heatmap/" not in steps[0]["traces"]
    ticks = steps[0]["axes"]["xaxis"]["ticks"] + steps[0]["axes"]["yaxis"]["ticks"]
    assert "−0.5" not in ticks and "0.5" not in ticks and "rank 0" in ticks
    assert steps[0]["axes"]["xaxis"]["range"][1] >= findings.steps.get_column("duration_ns")[0] / 1e6 * 0.99


def test_a_single_step_page_puts_its_notes_first_and_says_what_the_window_is(one_step):
    findings, page = one_step
    summary = page[page.index('<section id="summary">'):page.index("Headline findings")]
    assert summary.index("Notes on the input") < summary.index("<dl class=\"facts\">")
    assert "no step markers: the whole trace is one step window per rank" in summary
    assert summary.count("<li>") == len(set(findings.warnings))


# ----------------------------------------------------------------------------- diff page


def test_diff_page_says_what_the_terminal_says(rank_diff):
    result, page = rank_diff
    console = Console(record=True, width=200)
    render_diff(result, console)
    terminal = console.export_text()
    lines = result.summary["step_change_lines"]
    assert any(l.startswith("rank 0 gpu_compute") and "(+40%), slower" in l for l in lines), lines
    assert any(l.startswith("rank 1 gpu_compute") and "(-34%), faster" in l for l in lines), lines
    visible = html.unescape(re.sub(r"<[^>]+>", "", page))
    for line in lines:
        assert line in terminal
        assert line.replace(" -> ", " → ") in visible
    # the verdict line of both says the same, with the steps the noise rests on
    verdict = result.summary["step_verdict"]
    assert f"({result.summary['step_change_pct']:+.1f}%), {verdict} (noise" in visible
    assert "from 5 + 5 steps" in visible and "from 5 + 5 steps" in " ".join(terminal.split())


def test_diff_page_lists_new_kernels_with_their_mean_per_step(rank_diff):
    result, page = rank_diff
    assert result.new_kernels.height
    section = page[page.index('id="new-vanished"'):page.index('id="launches"')]
    cells = re.findall(r'<td class="num" data-v="([^"]+)">', section)
    assert cells and all(float(v) > 0 for v in cells)  # no "0.000 ms" / "0 launches" rows


@needs_browser
@pytest.mark.parametrize("width", [1400, 900])
def test_diff_tables_fit_the_page(rank_diff, tmp_path, width):
    _, page = rank_diff
    probe = _draw(page, tmp_path, width)
    per_rank = [t for t in probe["tables"] if t["section"] == "per-rank"]
    assert len(per_rank) == 3
    for table in probe["tables"]:
        # nothing runs past the box that shows it (its wrapper scrolls: a cut-off column)
        assert table["right"] <= min(table["shown"], probe["width"]) + 0.5, (table, probe["width"])


@needs_browser
def test_report_tables_fit_a_900_px_window(single_nsys, tmp_path):
    _, _, page = single_nsys
    probe = _draw(page, tmp_path, 900)
    assert len(probe["tables"]) >= 5
    for table in probe["tables"]:
        assert table["right"] <= min(table["shown"], probe["width"]) + 0.5, (table, probe["width"])
