"""``traceinsight merge``: a strict Trace Event Format check, and the round trip through the
project's own Kineto reader (same steps, same waits, within a microsecond)."""

from __future__ import annotations

import gzip
import json
import math
import re
from collections import Counter, defaultdict

import polars as pl
import pytest
from click.testing import CliRunner

import traceinsight
from conftest import SAMPLE_TRACES, US, annotation, build_model, kernel, launch, shared
from traceinsight.analysis.pipeline import analyze
from traceinsight.cli import main
from traceinsight.ingest.merged import load_merged, split_merged
from traceinsight.report.chrome_trace import merged_trace
from traceinsight.report.records import anomaly_records

TWO_RANK = "device/h200_2rank_torch"
DLRM = "kineto/param_dlrm_8rank_v100"

# --------------------------------------------------------------------------------------------
# The strict Trace Event Format check
# --------------------------------------------------------------------------------------------

_PHASES = {"X", "B", "E", "i", "I", "s", "t", "f", "M", "C", "b", "e", "n"}
_METADATA = {
    "process_name": ("name", str),
    "process_labels": ("labels", str),
    "process_sort_index": ("sort_index", int),
    "thread_name": ("name", str),
    "thread_sort_index": ("sort_index", int),
}
# ts/dur exactly as the writer promises: whole ns, three decimals (M events: a plain 0).
_TIME_TEXT = re.compile(rb'"(ts|dur)":(-?[0-9][0-9.eE+-]*)')


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_trace_event_format(data: bytes) -> dict:
    """Fail (assert) unless ``data`` is a well-formed Chrome Trace Event Format document.

    Checks: valid UTF-8 JSON object with a ``traceEvents`` list; every event has ``ph`` (a
    known phase), ``name`` (string), ``pid``/``tid`` (integers), ``ts`` (finite number);
    ``X`` events have ``dur >= 0``; ``args`` are objects; ``M`` events are one of the five
    metadata kinds with their typed argument; flow ``s``/``f`` events carry ``cat`` and ``id``,
    ids are unique per phase and every start has exactly one finish with the same id and cat,
    at or after it; ``X`` slices of each thread nest properly; every thread with slices is
    named, and so is its process; ``ts``/``dur`` are written with three decimals.

    Returns counts: events per phase, and ``threads``.
    """
    text = data.decode("utf-8")  # raises on invalid UTF-8
    document = json.loads(text)
    assert isinstance(document, dict), "top level must be an object"
    events = document["traceEvents"]
    assert isinstance(events, list) and events, "traceEvents must be a non-empty list"
    phases: Counter = Counter()
    starts: dict = {}
    finishes: dict = {}
    slices = defaultdict(list)
    named_threads, named_processes = set(), set()
    for index, event in enumerate(events):
        where = f"event {index}: {str(event)[:200]}"
        assert isinstance(event, dict), where
        ph = event.get("ph")
        assert ph in _PHASES, where
        phases[ph] += 1
        assert isinstance(event.get("name"), str), where
        assert isinstance(event.get("pid"), int) and not isinstance(event["pid"], bool), where
        assert isinstance(event.get("tid"), int) and not isinstance(event["tid"], bool), where
        assert _number(event.get("ts")), where
        if "args" in event:
            assert isinstance(event["args"], dict), where
        if ph == "X":
            assert _number(event.get("dur")) and event["dur"] >= 0, where
            assert isinstance(event.get("cat"), str) and event["cat"], where
            start = round(event["ts"] * 1000)
            slices[(event["pid"], event["tid"])].append((start, start + round(event["dur"] * 1000), event["name"]))
        elif ph == "M":
            assert event["name"] in _METADATA, where
            key, kind = _METADATA[event["name"]]
            assert isinstance(event.get("args"), dict) and isinstance(event["args"].get(key), kind), where
            if event["name"] == "thread_name":
                named_threads.add((event["pid"], event["tid"]))
            if event["name"] == "process_name":
                named_processes.add(event["pid"])
        elif ph in ("s", "f"):
            assert isinstance(event.get("cat"), str), where
            assert isinstance(event.get("id"), (int, str)), where
            table = starts if ph == "s" else finishes
            assert event["id"] not in table, f"duplicate flow id: {where}"
            table[event["id"]] = event
    assert set(starts) == set(finishes), "flow starts and finishes must pair up"
    for flow_id, start in starts.items():
        finish = finishes[flow_id]
        assert start["cat"] == finish["cat"], flow_id
        assert finish["ts"] >= start["ts"] or math.isclose(finish["ts"], start["ts"]), flow_id
    for (pid, tid), track in slices.items():
        assert (pid, tid) in named_threads, f"thread {pid}/{tid} has no thread_name"
        assert pid in named_processes, f"process {pid} has no process_name"
        track.sort(key=lambda s: (s[0], -s[1]))
        stack: list[int] = []
        for start, end, name in track:
            while stack and stack[-1] <= start:
                stack.pop()
            assert not stack or end <= stack[-1], f"{name!r} on {pid}/{tid} overlaps its parent without nesting"
            stack.append(end)
    for match in _TIME_TEXT.finditer(data):
        value = match.group(2)
        assert re.fullmatch(rb"-?\d+\.\d{3}", value) or value == b"0", match.group(0)
    return {**phases, "threads": len(named_threads)}


def _read(path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


# --------------------------------------------------------------------------------------------
# Fixtures: each input analyzed once; each merge written once through the CLI
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_rank():
    model = traceinsight.load(shared(TWO_RANK))
    return model, analyze(model)


@pytest.fixture(scope="module")
def dlrm():
    model = traceinsight.load(shared(DLRM))
    return model, analyze(model)


def _merge(tmp_path_factory, name, *args):
    out = tmp_path_factory.mktemp("merge") / name
    result = CliRunner().invoke(main, ["merge", *map(str, args), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture(scope="module")
def two_rank_merged(tmp_path_factory):
    return _merge(tmp_path_factory, "two_rank.json.gz", shared(TWO_RANK))


@pytest.fixture(scope="module")
def dlrm_merged(tmp_path_factory):
    return _merge(tmp_path_factory, "dlrm.json", shared(DLRM))


# --------------------------------------------------------------------------------------------
# Round trip helpers
# --------------------------------------------------------------------------------------------


def _aligned_waits(findings, clock_base: int) -> pl.DataFrame:
    """Waits keyed by (key, rank) with the start on the merged file's clock."""
    offsets = findings.alignment.offsets
    return pl.DataFrame(findings.waits).with_columns(
        aligned_start=pl.col("start_ns")
        + pl.col("rank").replace_strict(offsets, default=0, return_dtype=pl.Int64)
        - clock_base
    ).select("key", "step", "rank", "waiting_for_rank", "phase", "collective", "wait_ms", "transfer_ms",
             "aligned_start")


def _assert_round_trip(findings, merged_path, *, steps: tuple[int, int] | None = None):
    again = analyze(load_merged(merged_path))
    metadata = json.loads(_read(merged_path))["traceinsight"]
    clock_base = metadata["clock_base_ns"]
    original = findings.steps.select("rank", "step", "duration_ns")
    reread = again.steps.select("rank", "step", "duration_ns")
    if steps is not None:
        original = original.filter(pl.col("step").is_between(*steps))
        reread = reread.filter(pl.col("step").is_between(*steps))
    joined = original.join(reread, on=["rank", "step"], how="full", suffix="_merged")
    assert joined.filter(pl.col("duration_ns").is_null() | pl.col("duration_ns_merged").is_null()).is_empty(), joined
    worst_step = joined.select((pl.col("duration_ns") - pl.col("duration_ns_merged")).abs().max()).item()
    assert worst_step <= 1 * US, worst_step

    before = _aligned_waits(findings, clock_base)
    after = _aligned_waits(again, 0)
    if steps is not None:
        before = before.filter(pl.col("step").is_between(*steps))
        after = after.filter(pl.col("step").is_between(*steps))
    assert before.height > 0
    waits = before.join(after, on=["key", "rank"], how="full", suffix="_merged")
    assert waits.filter(pl.col("wait_ms").is_null() | pl.col("wait_ms_merged").is_null()).is_empty(), waits
    assert (waits["waiting_for_rank"] == waits["waiting_for_rank_merged"]).all()
    assert (waits["phase"] == waits["phase_merged"]).all()
    assert (waits["collective"] == waits["collective_merged"]).all()
    assert (waits["wait_ms"] - waits["wait_ms_merged"]).abs().max() <= 0.001  # 1 µs
    assert (waits["transfer_ms"] - waits["transfer_ms_merged"]).abs().max() <= 0.001
    assert (waits["aligned_start"] - waits["aligned_start_merged"]).abs().max() <= 1 * US
    return again, worst_step, before.height


# --------------------------------------------------------------------------------------------
# Done-when: both sets pass the strict check and come back with the same steps and waits
# --------------------------------------------------------------------------------------------


def test_two_rank_merge_is_strict_trace_event_format(two_rank_merged):
    path, output = two_rank_merged
    counts = check_trace_event_format(_read(path))
    assert counts["X"] > 100_000 and counts["s"] == counts["f"] > 100
    assert "merged 2 rank(s)" in output and "MiB" in output and "kernel" in output and "arrows" in output


def test_two_rank_merge_reads_back_with_the_same_steps_and_waits(two_rank, two_rank_merged):
    _, findings = two_rank
    again, worst, waits = _assert_round_trip(findings, two_rank_merged[0])
    assert again.steps.height == findings.steps.height == 60
    assert waits == len(findings.waits) > 200


def test_dlrm_merge_is_strict_trace_event_format(dlrm_merged):
    path, output = dlrm_merged
    counts = check_trace_event_format(_read(path))
    assert counts["s"] == counts["f"] > 0
    assert "merged 8 rank(s)" in output


def test_dlrm_merge_reads_back_with_the_same_steps_and_waits(dlrm, dlrm_merged):
    _, findings = dlrm
    again, _, waits = _assert_round_trip(findings, dlrm_merged[0])
    assert sorted(again.ranks.get_column("rank").to_list()) == list(range(8))
    assert waits == len(findings.waits)


def test_step_range_merge_reads_back_the_selected_steps(two_rank, tmp_path_factory):
    _, findings = two_rank
    path, _ = _merge(tmp_path_factory, "steps.json", shared(TWO_RANK), "--steps", "20-24")
    check_trace_event_format(_read(path))
    again = analyze(load_merged(path))
    assert set(range(20, 25)) <= set(again.steps.get_column("step").to_list())
    # The last selected step's window is no longer cut by the next step, so compare the inner ones.
    _assert_round_trip(findings, path, steps=(20, 23))


# --------------------------------------------------------------------------------------------
# Layout, findings tracks, clock, options
# --------------------------------------------------------------------------------------------


def _events(path):
    return json.loads(_read(path))["traceEvents"]


def test_metadata_states_offsets_and_recovers_each_ranks_own_clock(dlrm, dlrm_merged):
    model, findings = dlrm
    document = json.loads(_read(dlrm_merged[0]))
    metadata = document["traceinsight"]
    offsets = {int(k): v for k, v in metadata["offsets_ns"].items()}
    assert offsets == findings.alignment.offsets
    assert metadata["reference_rank"] == findings.alignment.reference_rank
    assert metadata["epoch_ns_at_ts0"] == document["baseTimeNanoseconds"]
    # Every kernel's own-clock start comes back from ts, the base and the rank's offset.
    kernels = model.intervals.filter(pl.col("kind") == "kernel").select("rank", "start_ns")
    written = pl.DataFrame(
        [(e["pid"] - 1, round(e["ts"] * 1000)) for e in document["traceEvents"] if e.get("cat") == "kernel"],
        schema={"rank": pl.Int32, "ts_ns": pl.Int64}, orient="row",
    ).with_columns(
        start_ns=pl.col("ts_ns") + metadata["clock_base_ns"]
        - pl.col("rank").replace_strict(offsets, return_dtype=pl.Int64)
    )
    assert written.height == kernels.height
    assert written.select("rank", "start_ns").sort("rank", "start_ns").equals(kernels.sort("rank", "start_ns"))


def test_processes_threads_and_streams_are_kept_apart(dlrm_merged):
    events = _events(dlrm_merged[0])
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert names[4] == "rank 3 · Tesla V100-SXM2-32GB · host hidden"
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"}
    kernel_tracks = {(e["pid"], e["tid"]) for e in events if e.get("cat") == "kernel"}
    cpu_tracks = {(e["pid"], e["tid"]) for e in events if e.get("cat") in ("cpu_op", "cuda_runtime")}
    assert kernel_tracks and cpu_tracks and not kernel_tracks & cpu_tracks
    assert all(threads[t].startswith("GPU ") for t in kernel_tracks)
    assert all(threads[t].startswith("thread ") for t in cpu_tracks)
    assert all(e["args"]["device"] == e["pid"] - 1 for e in events if e.get("cat") == "kernel")  # rank r: GPU r


def test_anomalous_steps_are_named_with_their_cause(two_rank, two_rank_merged):
    _, findings = two_rank
    steps = [e for e in _events(two_rank_merged[0]) if e.get("cat") == "traceinsight.step"]
    assert len(steps) == findings.steps.height
    flagged = {(a["rank"], a["step"]): a["cause"] for a in anomaly_records(findings.anomalies) if a["kind"] == "step"}
    assert flagged
    named = {(e["pid"] - 1, e["args"]["step"]): e["name"] for e in steps}
    for (rank, step), cause in flagged.items():
        assert named[(rank, step)] == f"step {step} ANOMALOUS: {cause}"
    plain = [e for e in steps if "ANOMALOUS" not in e["name"]]
    assert plain and all("anomaly" not in e["args"] for e in plain)
    assert all(e["args"]["anomaly"]["evidence"] for e in steps if "ANOMALOUS" in e["name"])


def test_waits_sit_inside_their_collective_and_arrows_reach_the_stragglers_kernel(two_rank, two_rank_merged):
    _, findings = two_rank
    events = _events(two_rank_merged[0])
    by_track = defaultdict(list)
    for e in events:
        if e["ph"] == "X":
            by_track[(e["pid"], e["tid"])].append(e)

    def enclosing(pid, tid, ts, cat):
        return [e for e in by_track[(pid, tid)] if e["cat"] == cat and e["ts"] <= ts <= e["ts"] + e["dur"]]

    waits = [e for e in events if e.get("cat") == "traceinsight.wait" and e["ph"] == "X"]
    assert len(waits) == len(findings.waits)
    for wait in waits[:300]:
        (collective,) = enclosing(wait["pid"], wait["tid"], wait["ts"], "traceinsight.collective")
        assert collective["ts"] == wait["ts"] and wait["dur"] <= collective["dur"]
        assert wait["name"] == f"wait for rank {wait['args']['waiting_for_rank']}"
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    finishes = {e["id"]: e for e in events if e["ph"] == "f"}
    assert len(starts) == len(waits)
    for flow_id, start in starts.items():
        finish = finishes[flow_id]
        (wait,) = enclosing(start["pid"], start["tid"], start["ts"], "traceinsight.wait")
        assert finish["pid"] - 1 == wait["args"]["waiting_for_rank"] != start["pid"] - 1
        (target,) = enclosing(finish["pid"], finish["tid"], finish["ts"], "kernel")
        assert target["name"].startswith("ncclDevKernel")
        assert start["bp"] == finish["bp"] == "e"


def test_rank_subset_and_min_cpu_duration(dlrm, tmp_path_factory):
    model, _ = dlrm
    path, output = _merge(tmp_path_factory, "subset.json.gz", shared(DLRM), "--ranks", "0,3", "--min-cpu-us", "50")
    data = _read(path)
    check_trace_event_format(data)
    events = json.loads(data)["traceEvents"]
    assert {e["pid"] for e in events} == {1, 4}
    assert "merged 2 rank(s)" in output
    cpu_ops = [e for e in events if e.get("cat") == "cpu_op"]
    assert cpu_ops and min(e["dur"] for e in cpu_ops) >= 50
    kept = model.intervals.filter(pl.col("rank").is_in([0, 3]) & (pl.col("kind") == "kernel")).height
    assert sum(e.get("cat") == "kernel" for e in events) == kept  # GPU work is never dropped
    assert sum(e.get("cat") == "cuda_runtime" for e in events) > 0  # nor the launch calls


def test_bad_options_exit_2(tmp_path):
    runner = CliRunner()
    for extra in (["--ranks", "9"], ["--steps", "40-50"], ["--steps", "5-1"], ["--ranks", "a"]):
        result = runner.invoke(main, ["merge", str(shared(DLRM)), "-o", str(tmp_path / "x.json"), *extra])
        assert result.exit_code == 2, (extra, result.output)
    assert not (tmp_path / "x.json").exists()
    result = runner.invoke(main, ["merge", str(shared(DLRM)), "-o", str(tmp_path / "missing" / "x.json")])
    assert result.exit_code == 2


def test_nsys_inputs_merge_and_show_hosts_only_when_asked(tmp_path):
    folder = SAMPLE_TRACES / "moe_2rank_nsys"
    if not folder.exists():
        pytest.skip("sample traces absent")
    model = traceinsight.load(folder)
    findings = analyze(model)
    hidden = merged_trace(model, findings)
    counts = check_trace_event_format(hidden.data)
    assert counts["s"] > 0 and hidden.counts["kernel"] == model.intervals.filter(pl.col("kind") == "kernel").height
    names = [e["args"]["name"] for e in json.loads(hidden.data)["traceEvents"] if e["name"] == "process_name"]
    assert all(name.endswith("host hidden") for name in names)
    hosts = [h for h in model.ranks.get_column("hostname").to_list() if h]
    shown = merged_trace(model, findings, show_host=True)
    names = [e["args"]["name"] for e in json.loads(shown.data)["traceEvents"] if e["name"] == "process_name"]
    assert all("host hidden" not in name for name in names)
    if hosts:
        assert any(hosts[0] in name for name in names)
        assert hosts[0].encode() not in hidden.data


def test_any_name_is_written_safely_and_nesting_is_repaired():
    hostile = 'k"\\\n</script>\t[bold]ü\u2028'
    rows = [
        annotation("ProfilerStep#1", 0, 100, tid=1),
        annotation("outer", 10, 60, tid=1),
        annotation(hostile, 50, 90, tid=1),  # overlaps "outer" without nesting
        launch("cudaLaunchKernel", 20, 25, 1, tid=1),
        kernel(hostile, 30, 40, 1, detail=None),
    ]
    model = build_model(rows)
    merged = merged_trace(model, analyze(model))
    check_trace_event_format(merged.data)
    events = json.loads(merged.data)["traceEvents"]
    assert sum(e["name"] == hostile for e in events) == 2
    moved = [e for e in events if e["name"] == hostile and e["cat"] == "user_annotation"][0]
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert "overlapping" in threads[(moved["pid"], moved["tid"])]


def test_split_refuses_files_not_written_by_merge(tmp_path):
    path = tmp_path / "plain.json"
    path.write_text(json.dumps({"traceEvents": [{"ph": "X", "name": "a", "pid": 1, "tid": 1, "ts": 0, "dur": 1}]}))
    from traceinsight.errors import TraceInputError

    with pytest.raises(TraceInputError):
        split_merged(path)
