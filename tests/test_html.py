"""The HTML report: self-contained, escapes every trace string, draws in a real browser."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from conftest import SAMPLE_TRACES, SHARED_TRACES, annotation, build_model, kernel, launch, page_figures, shared
import traceinsight
from traceinsight.analysis.categories import CATEGORIES
from traceinsight.analysis.pipeline import analyze
from traceinsight.analysis.places import anomaly_range
from traceinsight.analysis.timeline import (
    TIMELINE_SCHEMA,
    PackedTimelineRows,
    step_timeline,
    timelines_for_report,
)
from traceinsight.analysis.timeline import typical_steps
from traceinsight.cli import main
from traceinsight.report.html import CATEGORY_COLORS, MAX_CARDS, esc, render_html, script_json
from traceinsight.analysis.schemas import IMBALANCE_SCHEMA, STRAGGLER_SCHEMA, WAIT_SCHEMA, by_rank, frame_of
from traceinsight.report.records import anomaly_records, wait_records

SINGLE = SAMPLE_TRACES / "moe_single_nsys.sqlite"
SCRIPT_NAME = "<script>alert(1)</script>"
IMG_NAME = "</script><img src=x onerror=alert(1)>"
RICH_NAME = "[bold]x[/bold]"
LINE_SEP_NAME = "sep\u2028arator\u2029 & <b>more</b>"


# ----------------------------------------------------------------------------- helpers

class _Tags(HTMLParser):
    """Every start tag with its attributes (script bodies are raw text to the parser)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _tags(page: str) -> list[tuple[str, dict]]:
    parser = _Tags()
    parser.feed(page)
    return parser.tags


def _figures(page: str) -> list[dict]:
    return page_figures(page)


def _outside_scripts(page: str) -> str:
    return re.sub(r"<script\b[^>]*>.*?</script>", "", page, flags=re.S)


def _check_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # plotly.js inlined exactly once, no other script element, nothing loaded from anywhere
    assert page.count("plotly.js v") == 1
    scripts = [attrs for tag, attrs in _tags(page) if tag == "script"]
    assert len(scripts) == 4 and page.count("</script>") == 4
    for tag, attrs in _tags(page):
        for name in ("src", "href", "data", "action", "srcset", "poster"):
            value = attrs.get(name) or ""
            assert not re.match(r"\s*(https?:)?//", value), f"<{tag} {name}={value}> loads a resource"
            if tag in ("script", "img", "iframe", "link", "embed", "object"):
                assert not value or value.startswith("#") or value.startswith("data:"), (tag, name, value)
    assert "default-src 'none'" in page  # the page policy forbids network access


@pytest.fixture(scope="module")
def single():
    model = traceinsight.load(SINGLE)
    findings = analyze(model)
    return model, findings, timelines_for_report(model, findings)


@pytest.fixture(scope="module")
def single_page(single):
    _, findings, timelines = single
    return render_html(findings, timelines)


def _hostile_model():
    """Eight 10 ms steps; step 5 waits 30 ms inside a range before launching. Names are hostile."""
    rows, corr = [], 1
    for k in range(8):
        t0 = k * 60_000
        slow = 30_000 if k == 5 else 0
        rows.append(annotation(f"step {k}", t0, t0 + 10_000 + slow))
        rows.append(annotation(IMG_NAME, t0 + 100, t0 + 9_000 + slow))
        rows.append(annotation(LINE_SEP_NAME, t0 + 150, t0 + 1_000 + slow))
        for j in range(4):
            start = t0 + 200 + slow + j * 2_000
            rows.append(launch("cudaLaunchKernel", start, start + 10, corr))
            rows.append(kernel(SCRIPT_NAME if j % 2 else RICH_NAME, start + 20, start + 1_800, corr))
            corr += 1
    return build_model(rows)


@pytest.fixture(scope="module")
def hostile():
    model = _hostile_model()
    findings = analyze(model)
    return model, findings, render_html(findings, timelines_for_report(model, findings))


# ----------------------------------------------------------------------------- escaping helpers

def test_script_json_cannot_close_a_script_element():
    text = json.dumps({"name": IMG_NAME + "\u2028\u2029&"}, ensure_ascii=False)
    safe = script_json(text)
    assert "<" not in safe and ">" not in safe and "&" not in safe
    assert "\u2028" not in safe and "\u2029" not in safe
    assert json.loads(safe) == json.loads(text)


def test_esc_escapes_and_shortens():
    assert esc(SCRIPT_NAME) == "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert esc('a"b') == "a&quot;b"
    assert esc("x" * 500, 10) == "x" * 9 + "…"


# ----------------------------------------------------------------------------- timelines

def test_step_timeline_is_bounded_and_relative_to_the_step(single):
    model, findings, _ = single
    anomaly = anomaly_records(findings.anomalies)[0]
    frame = step_timeline(model, findings, rank=anomaly["rank"], step=anomaly["step"], max_events=300)
    assert frame.schema == pl.Schema(TIMELINE_SCHEMA)
    assert 0 < frame.height <= 300 + 20
    row = findings.steps.filter((pl.col("rank") == anomaly["rank"]) & (pl.col("step") == anomaly["step"])).row(0, named=True)
    duration = row["duration_ns"] / 1e6
    assert frame.get_column("start_ms").min() >= 0
    assert frame.get_column("end_ms").max() <= duration + 1e-3
    assert (frame.get_column("end_ms") >= frame.get_column("start_ms")).all()
    kinds = set(frame.get_column("kind").to_list())
    assert {"annotation", "launch", "kernel", "cpu_gap"} <= kinds
    # merged blocks still account for every GPU activity of the step
    gpu = frame.filter(pl.col("kind").is_in(["kernel", "comm_kernel", "memcpy", "memset"]))
    assert gpu.get_column("count").sum() > gpu.height
    # the anomaly's range is among the annotations
    assert anomaly_range(anomaly) in frame.filter(kind="annotation").get_column("name").to_list()
    assert anomaly["where"].endswith(anomaly_range(anomaly))


def test_unknown_step_gives_an_empty_timeline(single):
    model, findings, _ = single
    assert step_timeline(model, findings, rank=0, step=10_000).is_empty()


def test_timelines_for_report_cover_anomalies_and_typical_steps(single):
    _, findings, timelines = single
    for anomaly in anomaly_records(findings.anomalies)[:12]:
        assert (anomaly["rank"], anomaly["step"]) in timelines
        typical = typical_steps(findings).get(anomaly["rank"])
        assert (anomaly["rank"], typical) in timelines
        flagged = findings.steps.filter((pl.col("rank") == anomaly["rank"]) & (pl.col("step") == typical))
        assert not flagged.get_column("anomalous").any()


@pytest.mark.parametrize("path", [SINGLE, SAMPLE_TRACES / "moe_2rank"], ids=["nsys", "kineto-2rank"])
def test_timelines_from_the_packed_rows_equal_those_from_the_whole_model(path):
    # The CLI has the analysis pack the rows the timelines read just before it empties the
    # model (one rank: in the rank's last phase; several: when the model is split by rank).
    from traceinsight.analysis.engine import analyze_model

    model = traceinsight.load(path)
    expected = timelines_for_report(model, analyze(model))
    assert expected and any(frame.height for frame in expected.values())
    packed = []

    def pack(whole):
        assert whole is model and not whole.intervals.is_empty()
        packed.append(PackedTimelineRows(whole))

    findings = analyze_model(model, free_model=True, before_freeing=pack)
    assert model.intervals.is_empty()
    assert len(packed) == 1
    timelines = timelines_for_report(packed[0], findings)
    assert timelines.keys() == expected.keys()
    for key, frame in expected.items():
        assert timelines[key].equals(frame), key


# ----------------------------------------------------------------------------- pages

def test_sample_report_is_self_contained_and_explains_each_anomaly(single, single_page):
    _, findings, _ = single
    page = single_page
    _check_self_contained(page)
    assert anomaly_records(findings.anomalies)
    for anomaly in anomaly_records(findings.anomalies)[:MAX_CARDS]:
        assert esc(anomaly["where"]) in page
        assert esc(anomaly["cause"]) in page
    for c in CATEGORIES:
        assert CATEGORY_COLORS[c] in page
    figures = _figures(page)
    # overview, durations, breakdown, and one timeline per anomaly card
    assert len(figures) == 3 + min(len(anomaly_records(findings.anomalies)), 12)
    for figure in figures:
        layout = figure["fig"]["layout"]
        for key, axis in layout.items():
            if key.startswith("xaxis") and "title" in axis:
                assert re.search(r"\b(ms|step|%)\b", axis["title"]["text"]), axis["title"]
    size = len(page.encode())
    from plotly.offline import get_plotlyjs

    assert size - len(get_plotlyjs()) < 3_000_000


def test_h200_report_names_its_anomalies():
    path = shared("device/h200_single_nsys/trace.sqlite")
    model = traceinsight.load(path)
    findings = analyze(model)
    page = render_html(findings, timelines_for_report(model, findings))
    _check_self_contained(page)
    assert len(anomaly_records(findings.anomalies)) >= 4
    for anomaly in anomaly_records(findings.anomalies):
        assert esc(anomaly["where"]) in page and esc(anomaly["cause"]) in page
    assert "step 7 on rank 0 was" in page  # a headline sentence


@pytest.fixture(scope="module")
def two_rank_page():
    """(findings, page) of the 2-rank H200 torch trace, or None where ../shared is absent."""
    folder = SHARED_TRACES / "device/h200_2rank_torch"
    if not (folder / "rank0.json.gz").exists():
        return None
    model = traceinsight.load([folder / "rank0.json.gz", folder / "rank1.json.gz"])
    findings = analyze(model)
    return findings, render_html(findings, timelines_for_report(model, findings))


def test_two_rank_report_has_waits_and_anomalies(two_rank_page):
    if two_rank_page is None:
        pytest.skip("../shared/traces/device/h200_2rank_torch not available")
    findings, page = two_rank_page
    _check_self_contained(page)
    assert '<section id="waits">' in page
    for anomaly in anomaly_records(findings.anomalies)[:MAX_CARDS]:
        assert esc(anomaly["where"]) in page and esc(anomaly["cause"]) in page
    durations = _figures(page)[1]["fig"]["data"]
    assert [t["name"] for t in durations[:2]] == ["rank 0", "rank 1"]


def test_hostile_names_are_only_shown_as_text(hostile):
    _, findings, page = hostile
    _check_self_contained(page)
    assert anomaly_records(findings.anomalies), "the slow step must be flagged"
    # no raw markup from the data anywhere, and no extra script end tag
    assert "<img" not in page.lower()  # no img element at all (the plotly bundle has none either)...
    assert "<script>alert" not in page and "alert(1)</script" not in page
    assert page.count("</script>") == 4
    for body in re.findall(r"<script\b[^>]*>(.*?)</script>", page, flags=re.S):
        assert "\u2028" not in body and "\u2029" not in body  # JavaScript line terminators stay escaped
    # ...but the names are shown, escaped, in the HTML
    visible = _outside_scripts(page)
    assert esc(IMG_NAME) in visible
    assert esc(SCRIPT_NAME) in visible
    assert RICH_NAME in visible  # no markup language of any kind applied
    # and in the figures, escaped for plotly (which renders a few tags in hover text)
    hover = [t for f in _figures(page) for trace in f["fig"]["data"] for t in (trace.get("hovertext") or [])]
    assert any(esc(IMG_NAME, 120) in t for t in hover)
    assert any(esc(SCRIPT_NAME, 120) in t for t in hover)
    assert not any("<img" in t or "<script" in t for t in hover)


def test_host_names_only_with_show_host(single):
    _, findings, timelines = single
    secret = "secret-host-1234"
    findings = dataclasses.replace(findings, ranks=findings.ranks.with_columns(hostname=pl.lit(secret)))
    assert secret not in render_html(findings, timelines)
    assert secret in render_html(findings, timelines, show_host=True)


def _synthetic_waits(findings) -> pl.DataFrame:
    waits = []
    for step in findings.steps.get_column("step").to_list():
        for rank in (0, 1, 2):
            late = step % 3
            if rank == late:
                continue
            waits.append({"step": step, "rank": rank, "waiting_for_rank": late, "phase": "layer0 dispatch",
                          "wait_ms": 1.5 + rank, "collective": "all_to_all"})
            waits.append({"step": step, "rank": rank, "waiting_for_rank": late, "phase": IMG_NAME,
                          "wait_ms": 0.25, "collective": SCRIPT_NAME})
    return frame_of(waits, WAIT_SCHEMA)


def test_waits_render_heatmap_stragglers_and_phase_table(single):
    _, findings, timelines = single
    extra = {}
    names = {f.name for f in dataclasses.fields(findings)}
    if "stragglers" in names:
        extra["stragglers"] = frame_of([{"step": 3, "collective": SCRIPT_NAME, "phase": "layer0 dispatch", "straggler": 0,
                                         "max_wait_ms": 3.5, "reason": "cpu_gap", "reason_excess_ms": 3.4,
                                         "before_ms": by_rank({"1": 1.0, "0": 4.5}, "ms"),
                                         "rows_sent": by_rank({"0": 10, "1": 2}, "rows")}], STRAGGLER_SCHEMA)
    if "imbalance" in names:
        extra["imbalance"] = frame_of([{"step": s, "modeled_ms": 5.0, "balanced_ms": 4.0, "saving_ms": 1.0,
                                        "measured_ms": 9.0} for s in findings.steps.get_column("step").to_list()],
                                      IMBALANCE_SCHEMA)
    findings = dataclasses.replace(findings, waits=_synthetic_waits(findings), **extra)
    page = render_html(findings, timelines)
    _check_self_contained(page)
    assert '<section id="waits">' in page and 'href="#waits"' in page
    visible = _outside_scripts(page)
    assert "layer0 dispatch" in visible and esc(IMG_NAME) in visible and esc(SCRIPT_NAME) in visible
    heatmaps = [(f, t) for f in _figures(page) for t in f["fig"]["data"] if t.get("type") == "heatmap"]
    assert heatmaps
    figure, heatmap = heatmaps[-1]
    assert heatmap["y"] == [0, 1, 2]
    stragglers = [t for t in figure["fig"]["data"] if t.get("name") == "straggler (waited for)"]
    assert stragglers and stragglers[0]["x"]
    if "stragglers" in extra:
        assert "Why the stragglers were late" in page and "0: 4.50, 1: 1.00" in page
    if "imbalance" in extra:
        # the saving itself is plotted (bars on their own axis), not a line under the measured one
        savings = [t for f in _figures(page) for t in f["fig"]["data"]
                   if t.get("name") == "saving with balanced load (ms)"]
        assert savings and savings[0]["type"] == "bar" and set(savings[0]["y"]) == {1.0}
    waits_total = sum(w["wait_ms"] for w in wait_records(findings.waits))
    assert f"{waits_total:,.0f}" in page or f"{waits_total:.1f}" in page


def test_many_ranks_use_heatmaps_and_stay_small(single):
    """64 ranks × 200 steps of synthetic findings: heatmap, capped views, small page."""
    _, findings, _ = single
    row = findings.steps.row(0, named=True)
    steps = pl.DataFrame([
        {**row, "rank": r, "step": s, "label": f"step {s}", "start_ns": s * 50_000_000,
         "end_ns": s * 50_000_000 + row["duration_ns"], "anomalous": (r * 7 + s) % 97 == 0}
        for r in range(64) for s in range(200)
    ], schema=findings.steps.schema)
    ranks = pl.concat([findings.ranks.with_columns(rank=pl.lit(r, pl.Int32)) for r in range(64)])
    big = dataclasses.replace(findings, steps=steps, ranks=ranks, anomalies=findings.anomalies.clear(),
                              waits=findings.waits.clear())
    page = render_html(big, {})
    figures = _figures(page)
    durations = figures[1]["fig"]["data"]
    assert durations[0]["type"] == "heatmap"
    from plotly.offline import get_plotlyjs

    assert len(page.encode()) - len(get_plotlyjs()) < 1_500_000


# ----------------------------------------------------------------------------- CLI

def test_cli_html_flag_writes_the_default_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["analyze", str(SINGLE), "--quiet", "--html"])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "traceinsight-report.html").read_text(encoding="utf-8")
    _check_self_contained(page)
    out = tmp_path / "named.html"
    result = CliRunner().invoke(main, ["analyze", str(SINGLE), "--html", str(out)])
    assert result.exit_code == 0, result.output
    assert out.exists() and "report written to" in result.output


def test_cli_html_never_overwrites_a_trace(tmp_path):
    victim = tmp_path / "rank1.sqlite"
    victim.write_bytes(b"not html")
    result = CliRunner().invoke(main, ["analyze", "--html", str(victim), str(SINGLE), "--quiet"])
    assert result.exit_code == 2
    assert victim.read_bytes() == b"not html"


# ----------------------------------------------------------------------------- real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _browser_dom(page: str, tmp_path: Path) -> str:
    path = tmp_path / "report.html"
    path.write_text(page, encoding="utf-8")
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
               "--dump-dom", path.as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _root_attributes(dom: str) -> dict:
    match = re.search(r"<html\b([^>]*)>", dom)
    assert match, dom[:500]
    return dict(re.findall(r'([\w-]+)="([^"]*)"', match.group(1)))


#: Test-only probe: once every figure is drawn, hover the first bar whose tooltip holds the
#: hostile name and record what plotly shows (text, and whether it made any element of it).
_HOVER_PROBE = """<script>(function(){function probe(){
 if(!document.documentElement.getAttribute('data-figures-drawn')){setTimeout(probe,50);return;}
 var figs=document.querySelectorAll('.fig');
 for(var f=0;f<figs.length;f++){var el=figs[f];if(!el.data)continue;
  for(var c=0;c<el.data.length;c++){var t=el.data[c].hovertext||[];
   for(var k=0;k<t.length;k++){if(String(t[k]).indexOf('img src')>=0){
    Plotly.Fx.hover(el,[{curveNumber:c,pointNumber:k}]);
    var layer=el.querySelector('.hoverlayer');
    document.body.setAttribute('data-hover-text',layer?layer.textContent:'');
    document.body.setAttribute('data-hover-elements',layer?String(layer.querySelectorAll('img,script').length):'-1');
    return;}}}}
 document.body.setAttribute('data-hover-text','no tooltip with the name');}
 probe();})();</script></body>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium; .ci/run does)")
def test_headless_chromium_draws_every_figure_without_errors(single_page, hostile, two_rank_page, tmp_path):
    probed = hostile[2].replace("</body>", _HOVER_PROBE)
    pages = [("sample", single_page), ("hostile", probed)]
    if two_rank_page is not None:
        pages.append(("two-rank", two_rank_page[1]))
    for name, page in pages:
        folder = tmp_path / name
        folder.mkdir()
        dom = _browser_dom(page, folder)
        attributes = _root_attributes(dom)
        assert "data-js-errors" not in attributes, attributes.get("data-js-errors")
        expected = len(_figures(page))
        assert attributes.get("data-figures-expected") == str(expected)
        assert attributes.get("data-figures-drawn") == str(expected), attributes
        assert dom.count('class="main-svg"') >= expected  # plotly drew an SVG per figure
        if name == "hostile":
            body = dom[dom.index("<body"):]
            assert "<img" not in body  # the name never became an element
            assert esc(IMG_NAME) in body
            # plotly's tooltip shows the name literally, as text
            tag = re.search(r"<body\b[^>]*>", body).group(0)
            hover = dict(re.findall(r'([\w-]+)="([^"]*)"', tag))
            assert esc(IMG_NAME) in hover.get("data-hover-text", ""), hover
            assert hover.get("data-hover-elements") == "0"


def _typical_step_reference(steps: pl.DataFrame, rank: int) -> int | None:
    """The rule in plain Python: the rank's unflagged steps (all of them if every step is
    flagged), ordered by duration then step number, and the lower middle one."""
    rows = [r for r in steps.iter_rows(named=True) if r["rank"] == rank]
    normal = [r for r in rows if r["anomalous"] is False] or rows
    ordered = sorted(normal, key=lambda r: (r["duration_ns"], r["step"]))
    return ordered[(len(ordered) - 1) // 2]["step"] if ordered else None


def test_typical_steps_follow_the_rule_on_every_rank(single):
    _, findings, _ = single
    edge = pl.DataFrame({
        "rank": [0, 0, 0, 1, 1, 2, 2, 2, 2],
        "step": [1, 2, 3, 1, 2, 5, 6, 7, 8],
        "duration_ns": [30, 10, 10, 7, 9, 4, 4, 4, 4],
        "anomalous": [False, False, True, True, True, None, False, False, True],
    })
    for steps in (findings.steps, edge):
        got = typical_steps(dataclasses.replace(findings, steps=steps))
        ranks = sorted(set(steps.get_column("rank").to_list()))
        assert got == {r: _typical_step_reference(steps, r) for r in ranks}
    # every rank flagged: the median of all its steps; ties broken by the step number
    assert typical_steps(dataclasses.replace(findings, steps=edge))[1] == 1
    assert typical_steps(dataclasses.replace(findings, steps=edge))[2] == 6
