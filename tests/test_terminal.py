"""The terminal summaries at 80 columns (``COLUMNS=80``): nothing cut, notes first, steps
summarised per rank, ``--width``, ``--all-steps``, ``--html`` before the paths, progress."""

from __future__ import annotations

import json
import os
import re

import pytest
from click.testing import CliRunner
from rich.console import Console

import traceinsight
from conftest import SAMPLE_TRACES, annotation, build_model, kernel, launch, shared
from traceinsight.analysis.inventory import describe
from traceinsight.analysis.pipeline import analyze
from traceinsight.cli import main
from traceinsight.progress import _offsets
from traceinsight.report.terminal import middle, render_findings, render_info
from traceinsight.report.records import wait_records

TWO_RANK = SAMPLE_TRACES / "moe_2rank"
NARROW = {"COLUMNS": "80"}


def _run(*args, env=NARROW):
    result = CliRunner().invoke(main, list(map(str, args)), env=env)
    assert result.exit_code == 0, result.output
    return result


def _fits(text: str, width: int = 80) -> None:
    lines = text.splitlines()
    assert lines and max(len(line) for line in lines) <= width, max(lines, key=len)
    # no number cut by an ellipsis ("159…", "32.…")
    assert not re.search(r"[\d.,]…|…[\d.,]*$", "\n".join(l for l in lines if "_" not in l)), text


@pytest.fixture(scope="module")
def two_rank_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("j") / "f.json"
    _run("analyze", TWO_RANK, "-q", "--json", out)
    return json.loads(out.read_text())


def test_analyze_at_80_columns_cuts_no_number_and_no_name(two_rank_json):
    text = _run("analyze", TWO_RANK).output
    _fits(text)
    # the steps per rank: count, median, p90, max, the flagged steps
    block = text[text.index("Steps per rank"):]
    for rank in (0, 1):
        row = next(l for l in block.splitlines() if re.match(rf"\s*{rank}\s+10\s", l))
        durations = [s["duration_ms"] for s in two_rank_json["steps"] if s["rank"] == rank]
        assert f"{max(durations):.2f}" in row
        flagged = [s["step"] for s in two_rank_json["steps"] if s["rank"] == rank and s["anomalous"]]
        assert row.rstrip().endswith(f"{len(flagged)}: " + ", ".join(map(str, flagged)))
    # names whose ends tell them apart are whole (fc1 and fc2 can be told apart)
    assert "GroupedLinear forward layer1.fc1" in text.replace("\n", " ") or "layer1.fc1" in text
    assert "layer1.fc2" in text


def test_causes_are_never_folded_mid_word():
    # cpu_gap.garbage_collection is one identifier: at 80 columns it used to end the line
    # as "cpu_gap.garbage_collectio" with the "n" on the next.
    findings_json = json.loads(_run("--no-cache", "analyze", SAMPLE_TRACES / "moe_single_nsys.sqlite", "-q",
                                    "--json", "-").output)
    causes = {a["cause"] for a in findings_json["anomalies"]}
    assert "cpu_gap.garbage_collection" in causes  # the sample's injected GC pause
    text = _run("--no-cache", "analyze", SAMPLE_TRACES / "moe_single_nsys.sqlite").output
    assert max(len(line) for line in text.splitlines()) <= 80
    table = text[text.index("Anomalies"):text.index("\n\n", text.index("Anomalies"))]
    rows = [line for line in table.splitlines() if re.match(r"\s+\d+\s+\d+\s+(step|range)\s", line)]
    assert rows
    for row in rows:
        assert row.split()[-1] in causes, row  # the last word of the row: a whole cause


def test_step_table_lists_only_flagged_steps_unless_all_steps(two_rank_json):
    flagged = sum(s["anomalous"] for s in two_rank_json["steps"])
    assert 0 < flagged < len(two_rank_json["steps"]) == 20

    def breakdown_rows(text: str) -> int:
        block = text[text.index("where the time went"):text.index("Anomalies")]
        return sum(1 for l in block.splitlines() if re.match(r"\s*[01]\s+\d+\s+[\d.,]+\s", l))

    text = _run("analyze", TWO_RANK).output
    assert breakdown_rows(text) == flagged
    assert f"{flagged} of 20 steps shown; --all-steps lists the others" in " ".join(text.split())
    every = _run("analyze", TWO_RANK, "--all-steps").output
    _fits(every)
    assert breakdown_rows(every) == 20


def test_width_option_and_columns(two_rank_json):
    wide = _run("analyze", TWO_RANK, "--width", "132").output
    assert 80 < max(len(l) for l in wide.splitlines()) <= 132
    narrow = _run("analyze", TWO_RANK, env={"COLUMNS": "60"}).output
    _fits(narrow, 60)
    # even at 60 columns every figure of the per-rank summary is whole
    assert f"{max(s['duration_ms'] for s in two_rank_json['steps'] if s['rank'] == 0):.2f}" in narrow


def test_notes_come_first_and_the_header_says_what_the_steps_are():
    text = _run("analyze", shared("kineto/hta_critical_path_alexnet_a100")).output
    _fits(text)
    header, rest = text.split("\n", 1)
    assert "whole trace is one step per rank" in header and "steps per rank 1" not in text
    assert rest.lstrip().startswith("note:") and rest.index("note: no step markers") < rest.index("Ranks")
    # every note is told before the first table
    notes = [n for n in " ".join(rest.split()).split("note: ")[1:]]
    assert len(notes) == 2 and "whole trace is one step" in notes[-1].split(" Ranks ")[0]


def test_notes_shared_by_every_rank_are_told_once():
    text = _run("analyze", shared("kineto/hta_trace_filter_2rank")).output
    assert text.count("carry their own correlation id") == 1


def test_info_says_gpus_unknown_when_the_trace_does_not_name_them():
    text = _run("info", shared("kineto/hta_trace_filter_2rank/sampled_rank-0.json.gz")).output
    _fits(text)
    assert re.search(r"GPUs\s+unknown \(GPU work recorded", text) and "GPUs         none" not in text
    assert re.search(r"GPUs\s+NVIDIA H200", _run("info", TWO_RANK / "rank0.json.gz").output)


def test_info_says_no_gpu_work_when_there_is_none():
    model = build_model([annotation("ProfilerStep#1", 0, 100)])
    console = Console(record=True, width=80)
    render_info([describe(model, path="x.json", fmt="kineto")], console)
    assert re.search(r"GPUs\s+no GPU work recorded", console.export_text())


def test_html_before_the_paths_takes_no_trace_and_says_where_the_report_went(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _run("analyze", "-q", "--html", TWO_RANK)
    assert (tmp_path / "traceinsight-report.html").stat().st_size > 100_000
    assert "report written to traceinsight-report.html" in result.stderr and result.stdout == ""
    result = _run("analyze", "-q", "--html", "named.html", TWO_RANK)
    assert (tmp_path / "named.html").exists() and "report written to named.html" in result.stderr
    result = _run("analyze", "--json", "-", "--html", TWO_RANK)  # stdout stays pure JSON
    assert json.loads(result.stdout)["steps"] and "report written to" in result.stderr


def test_waits_come_largest_first():
    findings = analyze(traceinsight.load(TWO_RANK))
    waits = [w["wait_ms"] for w in wait_records(findings.waits)]
    assert len(waits) > 10 and waits == sorted(waits, reverse=True)
    top = max(wait_records(findings.waits), key=lambda w: w["wait_ms"])
    assert wait_records(findings.waits)[0] == top and top["wait_ms"] > 10


def test_explain_lists_only_kernels_beyond_the_noise():
    report = json.loads(_run("explain", TWO_RANK, "--step", "9", "--rank", "0", "--json", "-").stdout)
    rows = report["kernels"]
    assert rows and all("noise_ms" in r for r in rows)
    quiet = [r for r in rows if not r["beyond_noise"]]
    assert quiet  # step 9 is a CPU stall: most kernels ran as usual
    text = _run("explain", TWO_RANK, "--step", "9", "--rank", "0").output
    _fits(text)
    table = text[text.index("Kernels"):text.index("Largest CPU gaps")]
    listed = [l for l in table.splitlines() if "±" in l]  # one per kernel row (names fold below it)
    assert len(listed) == len(rows) - len(quiet)
    for row in rows:
        if row["beyond_noise"]:
            assert f"{row['excess_ms']:+.2f}" in table


def test_progress_only_on_a_terminal_or_when_forced():
    quiet = CliRunner().invoke(main, ["analyze", "-q", str(TWO_RANK)])
    assert quiet.exit_code == 0 and quiet.stderr == ""
    # Without the findings cache (the run above filled it): there is reading and analysis to show.
    forced = CliRunner().invoke(main, ["--no-cache", "analyze", "-q", "--progress", str(TWO_RANK)])
    assert forced.exit_code == 0 and "reading" in forced.stderr and "analyzing" in forced.stderr
    assert forced.stdout == ""


def test_bytes_read_come_from_the_open_file_offsets(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * 100_000)
    real = os.path.realpath(path)
    if not os.path.isdir("/proc/self/fdinfo"):
        pytest.skip("no /proc")
    with open(path, "rb", buffering=0) as handle:
        handle.read(12_345)
        assert _offsets({real}) == {real: 12_345}
    assert _offsets({real}) == {}


def test_middle_keeps_both_ends():
    name = "GroupedLinear.forward[layer1.fc1]" * 4
    short = middle(name, 30)
    assert len(short) == 30 and short.startswith("GroupedLinear") and short.endswith("layer1.fc1]")
    assert middle("short", 30) == "short"


def test_diff_at_80_columns_cuts_nothing():
    text = _run("diff", TWO_RANK, "--against", SAMPLE_TRACES / "moe_2rank_nsys").output
    _fits(text)
    flat = " ".join(text.split())
    assert "rank 'all' = mean of the ranks" in flat and re.search(r"noise ±[\d.]+ ms: the spread of the two medians, "
                                                                   r"from 10 \+ 10 steps", flat)
    for row in (r"all\s+step", r"0\s+step", r"1\s+step"):  # the step rows of the category table are whole
        assert re.search(rf"\b{row}\s+[\d.]+\s+[\d.]+\s+[+-]?[\d.]+\s+[+-][\d.]+%\s+±[\d.]+\s+\w+", text), row
