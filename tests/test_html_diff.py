"""The before/after page (``traceinsight diff --html``): complete, self-contained, escaped, drawn."""

from __future__ import annotations

import errno
import os
import re

import polars as pl
import pytest
from click.testing import CliRunner

import traceinsight
from conftest import SAMPLE_TRACES, annotation, build_model, kernel, launch
from test_html import (CHROMIUM, IMG_NAME, LINE_SEP_NAME, SCRIPT_NAME, _browser_dom, _check_self_contained,
                       _figures, _outside_scripts, _root_attributes)
from traceinsight.analysis.categories import CATEGORIES
from traceinsight.analysis.diff import diff_findings, diff_to_dict
from traceinsight.analysis.pipeline import analyze
from traceinsight.cli import main
from traceinsight.report.html import CATEGORY_COLORS, esc, render_diff_html, render_html

TWO_RANK = SAMPLE_TRACES / "moe_2rank"
SINGLE = SAMPLE_TRACES / "moe_single_nsys.sqlite"


@pytest.fixture(scope="module")
def two_rank():
    """Steps 2-3 against steps 4-5 of the 2-rank sample (4 and 5 are the slow, imbalanced ones)."""
    findings = analyze(traceinsight.load(TWO_RANK))
    result = diff_findings(findings, findings, steps_before=(2, 3), steps_after=(4, 5))
    return result, render_diff_html(result, before_label="moe_2rank steps 2-3", after_label="moe_2rank steps 4-5")


def _hostile_run(slow_us: float, extra_kernel: str):
    """One rank, six 1 ms steps; a hostile range and hostile kernels, ``slow_us`` of extra GEMM."""
    rows, corr = [], 0
    for step in range(6):
        t0 = step * 2_000.0
        rows.append(annotation(f"ProfilerStep#{step}", t0, t0 + 1_500))
        rows.append(annotation(IMG_NAME, t0 + 10, t0 + 300 + slow_us))
        rows.append(annotation(LINE_SEP_NAME, t0 + 20, t0 + 200))
        for name, length in ((SCRIPT_NAME, 100 + slow_us), ("plain_kernel", 50.0), (extra_kernel, 30.0)):
            corr += 1
            rows.append(launch("cudaLaunchKernel", t0 + 20 + corr % 3, t0 + 25 + corr % 3, corr))
            start = t0 + 100 + 400 * (corr % 3)
            rows.append(kernel(name, start, start + length, corr))
    return analyze(build_model(rows))


@pytest.fixture(scope="module")
def hostile():
    result = diff_findings(_hostile_run(0, IMG_NAME), _hostile_run(200, LINE_SEP_NAME))
    return result, render_diff_html(result, before_label=IMG_NAME, after_label=SCRIPT_NAME)


# ----------------------------------------------------------------------------- content

def test_page_is_self_contained_and_has_every_part(two_rank):
    result, page = two_rank
    _check_self_contained(page)
    summary = result.summary
    assert summary["step_verdict"] == "slower"
    before, after, pct = summary["median_step_ms_before"], summary["median_step_ms_after"], summary["step_change_pct"]
    headline = f"median step {before:.1f} → {after:.1f} ms ({pct:+.1f}%), "
    assert headline in page and '<span class="v v-slower">slower</span>' in page
    for anchor in ("verdict", "categories", "changes", "ranges", "kernels", "new-vanished", "launches", "per-rank"):
        assert f'<section id="{anchor}">' in page and f'href="#{anchor}"' in page
    assert page.count('class="sortable') >= 7
    # every range and kernel that changed, and every new and vanished kernel, is named
    data = diff_to_dict(result, max_rows=None)
    changed = [r for key in ("ranges", "kernels") for r in data[key]
               if r["rank"] is None and r["verdict"] != "unchanged"]
    assert changed
    for row in changed + data["new_kernels"] + data["vanished_kernels"]:
        assert esc(row["name"], None) in page, row["name"]
    assert f"{summary['new_kernels']} new kernel(s), {summary['vanished_kernels']} vanished" in page
    # verdicts are colored and marked
    assert '<span class="v-faster">faster</span>' in page and '<span class="v-unchanged">unchanged</span>' in page
    # the page is a few hundred kB besides plotly.js
    from plotly.offline import get_plotlyjs

    assert len(page.encode()) - len(get_plotlyjs()) < 600_000


def test_category_figure_uses_the_report_colors_units_and_rank_views(two_rank):
    result, page = two_rank
    figures = _figures(page)
    assert len(figures) == 2  # categories, largest changes
    category = figures[0]["fig"]
    bars = [t for t in category["data"] if t.get("x") and t["x"][0] is not None]
    assert [t["x"] for t in bars] == [list(CATEGORIES)] * 2
    for trace in bars:
        assert trace["marker"]["color"] == [CATEGORY_COLORS[c] for c in CATEGORIES]
    overall = result.categories.filter(pl.col("rank").is_null())
    gpu = overall.filter(pl.col("name") == "gpu_compute").row(0, named=True)
    assert bars[0]["y"][0] == pytest.approx(gpu["before_ns"] / 1e6, abs=1e-3)
    assert bars[1]["y"][0] == pytest.approx(gpu["after_ns"] / 1e6, abs=1e-3)
    buttons = category["layout"]["updatemenus"][0]["buttons"]
    assert [b["label"] for b in buttons] == ["mean of ranks", "rank 0", "rank 1"]
    for figure in figures:
        layout = figure["fig"]["layout"]
        titles = [a["title"]["text"] for k, a in layout.items() if k[:5] in ("xaxis", "yaxis") and "title" in a]
        assert any("(ms)" in t for t in titles), titles
    changes = figures[1]["fig"]["data"][0]
    assert len(changes["x"]) == min(20, len([1 for key in ("ranges", "kernels") for r in
                                             getattr(result, key).filter(pl.col("rank").is_null()).iter_rows(named=True)
                                             if r["verdict"] != "unchanged"]))
    assert changes["x"] == sorted(changes["x"], key=lambda v: -abs(v))


def test_a_run_against_itself_reads_unchanged():
    findings = analyze(traceinsight.load(SINGLE))
    page = render_diff_html(diff_findings(findings, findings), before_label="a", after_label="a")
    _check_self_contained(page)
    assert '<span class="v v-unchanged">unchanged</span>' in page
    assert "No change beyond the step-to-step noise." in page
    assert '<section id="changes">' not in page and '<section id="per-rank">' not in page  # one rank, no change
    assert "No kernel changed its launch count per step." in page
    assert len(_figures(page)) == 1


def test_the_json_shape_renders_the_same_page(two_rank):
    result, page = two_rank
    data = diff_to_dict(result, max_rows=None)
    assert render_diff_html(data, before_label="moe_2rank steps 2-3", after_label="moe_2rank steps 4-5") == page


def test_analyze_page_has_no_diff_parts():
    findings = analyze(traceinsight.load(SINGLE))
    page = render_html(findings)
    assert ".verdict-line" not in page and "v-slower" not in page


def test_hostile_names_are_only_shown_as_text(hostile):
    result, page = hostile
    _check_self_contained(page)
    assert result.vanished_kernels.get_column("name").to_list() == [IMG_NAME]
    assert "<img" not in page.lower()
    assert "<script>alert" not in page and "alert(1)</script" not in page
    assert page.count("</script>") == 4
    for body in re.findall(r"<script\b[^>]*>(.*?)</script>", page, flags=re.S):
        assert "\u2028" not in body and "\u2029" not in body
    visible = _outside_scripts(page)
    for name in (IMG_NAME, SCRIPT_NAME):
        assert esc(name, None) in visible
    assert "<title>traceinsight diff: " + esc(IMG_NAME) in page
    # in the figures: escaped in names, hover text and tick labels
    texts = []
    for figure in _figures(page):
        for trace in figure["fig"]["data"]:
            texts += [trace.get("name") or ""] + list(trace.get("hovertext") or [])
        for key, axis in figure["fig"]["layout"].items():
            if key.startswith("yaxis"):
                texts += list(axis.get("ticktext") or [])
    assert any(esc(IMG_NAME) in t for t in texts) and any(esc(SCRIPT_NAME) in t for t in texts)
    assert not any("<img" in t or "<script" in t for t in texts)


# ----------------------------------------------------------------------------- CLI

def _no_temporary_files(folder) -> None:
    assert not [p for p in os.listdir(folder) if p.startswith(".traceinsight-")]


def test_cli_writes_the_default_file_and_a_named_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["diff", str(TWO_RANK), "--against", str(TWO_RANK), "--steps-before", "2-3", "--steps-after", "4-5"]
    result = CliRunner().invoke(main, [*args, "--quiet", "--html"])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "traceinsight-diff.html").read_text(encoding="utf-8")
    _check_self_contained(page)
    assert "moe_2rank steps 2-3 → moe_2rank steps 4-5" in page
    out = tmp_path / "named.html"
    result = CliRunner().invoke(main, [*args, "--html", str(out)])
    assert result.exit_code == 0, result.output
    assert "report written to" in result.output and out.exists()
    _no_temporary_files(tmp_path)


def test_cli_html_is_written_atomically(tmp_path, monkeypatch):
    out = tmp_path / "d.html"
    out.write_text("the previous report")

    def broken_fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out))

    monkeypatch.setattr("traceinsight.report.output.os.fsync", broken_fsync)
    result = CliRunner().invoke(main, ["diff", str(SINGLE), "--against", str(SINGLE), "--quiet", "--html", str(out)])
    assert result.exit_code != 0
    assert out.read_text() == "the previous report"  # the old file stays whole
    _no_temporary_files(tmp_path)


def test_cli_html_never_overwrites_a_trace(tmp_path):
    victim = tmp_path / "rank1.sqlite"
    victim.write_bytes(b"not html")
    # "--html rank1.sqlite": not an .html name, so it is a trace path (read, and refused as no trace)
    result = CliRunner().invoke(main, ["diff", "--html", str(victim), str(SINGLE), "--against", str(SINGLE)])
    assert result.exit_code == 2 and "rank1.sqlite: not a trace" in result.output
    assert victim.read_bytes() == b"not html"
    # "--html=rank1.sqlite" names the output explicitly: refused before anything is written
    result = CliRunner().invoke(main, ["diff", f"--html={victim}", str(SINGLE), "--against", str(SINGLE)])
    assert result.exit_code == 2 and "not an .html file" in result.output
    assert victim.read_bytes() == b"not html"


# ----------------------------------------------------------------------------- real browser

#: Test-only probe: once every figure is drawn, apply every view of every dropdown menu (as a
#: click would) and record errors the page hooks did not see.
_MENU_PROBE = """<script>(function(){function probe(){
 if(!document.documentElement.getAttribute('data-figures-drawn')){setTimeout(probe,50);return;}
 var figs=document.querySelectorAll('.fig'),done=0,chain=Promise.resolve();
 Array.prototype.forEach.call(figs,function(el){var menus=(el.layout&&el.layout.updatemenus)||[];
  menus.forEach(function(m){(m.buttons||[]).forEach(function(b){chain=chain.then(function(){
   return Plotly.restyle(el,b.args[0],b.args[1]).then(function(){done++;});});});});});
 chain.then(function(){document.body.setAttribute('data-menu-views',String(done));},
  function(e){document.body.setAttribute('data-menu-views','error: '+((e&&e.message)||e));});}
 probe();})();</script></body>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium; .ci/run does)")
def test_headless_chromium_draws_every_figure_without_errors(two_rank, hostile, tmp_path):
    for name, page in (("two-rank", two_rank[1]), ("hostile", hostile[1])):
        folder = tmp_path / name
        folder.mkdir()
        dom = _browser_dom(page.replace("</body>", _MENU_PROBE), folder)
        attributes = _root_attributes(dom)
        assert "data-js-errors" not in attributes, attributes.get("data-js-errors")
        expected = len(_figures(page))
        assert attributes.get("data-figures-expected") == str(expected)
        assert attributes.get("data-figures-drawn") == str(expected), attributes
        assert dom.count('class="main-svg"') >= expected
        body = dom[dom.index("<body"):]
        views = dict(re.findall(r'([\w-]+)="([^"]*)"', re.search(r"<body\b[^>]*>", body).group(0)))
        menus = sum(len(m["buttons"]) for f in _figures(page) for m in f["fig"]["layout"].get("updatemenus", []))
        assert views.get("data-menu-views") == str(menus), views
        if name == "hostile":
            assert "<img" not in body and esc(IMG_NAME) in body
