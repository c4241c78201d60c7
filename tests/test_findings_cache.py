"""The findings cache gives back exactly what the analysis found, and misses when it must."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import polars as pl
from click.testing import CliRunner

from conftest import SAMPLE_TRACES
from traceinsight.analysis import findings_cache
from traceinsight.analysis.engine import analyze_model
from traceinsight.analysis.options import Options
from traceinsight.cli import main
from traceinsight.ingest import load

TWO_RANKS = str(SAMPLE_TRACES / "moe_2rank")
NSYS = str(SAMPLE_TRACES / "moe_single_nsys.sqlite")


def _run(*args) -> bytes:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output.encode()


def _entries(cache_dir) -> list[str]:
    return [os.path.join(root, name) for root, folders, _ in os.walk(cache_dir)
            for name in folders if name.startswith("findings-")]


def test_round_trip_is_exact_for_two_ranks(tmp_path):
    # Two ranks: the alignment's offsets are int-keyed dicts, steps and waits are frames.
    paths = [os.path.join(TWO_RANKS, name) for name in ("rank0.json.gz", "rank1.json.gz")]
    model = load(paths, cache_dir=str(tmp_path))
    findings = analyze_model(model, Options())
    entry = findings_cache.entry_path(str(tmp_path), paths, Options())
    assert findings_cache.store(entry, findings)
    back, timelines = findings_cache.load(entry)
    assert timelines is None
    for field in dataclasses.fields(findings):
        mine, theirs = getattr(findings, field.name), getattr(back, field.name)
        assert findings_cache._same(mine, theirs), field.name
    assert isinstance(next(iter(back.alignment.offsets)), int)


def test_frames_read_later_are_read_on_first_use_and_equal(tmp_path):
    paths = [os.path.join(TWO_RANKS, name) for name in ("rank0.json.gz", "rank1.json.gz")]
    findings = analyze_model(load(paths, cache_dir=str(tmp_path)), Options())
    entry = findings_cache.entry_path(str(tmp_path), paths, Options())
    assert findings_cache.store(entry, findings)
    later = ("gpu", "place_cpu")
    back, _ = findings_cache.load(entry, read_later=later)
    for name in later:  # not read yet: a named file, not a frame
        assert type(object.__getattribute__(back, name)) is findings_cache._StoredFrame
    assert isinstance(object.__getattribute__(back, "steps"), pl.DataFrame)
    for field in dataclasses.fields(findings):
        assert findings_cache._same(getattr(findings, field.name), getattr(back, field.name)), field.name
    for name in later:  # read once, then kept
        assert object.__getattribute__(back, name) is getattr(back, name)
    assert findings.gpu.height and back.gpu.equals(findings.gpu)


def test_cli_answers_from_the_cache_with_identical_output(tmp_path):
    cache_dir = str(tmp_path / "cache")
    fresh_json = _run("--no-cache", "analyze", TWO_RANKS, "--json", "-")
    fresh_explain = _run("--no-cache", "explain", TWO_RANKS, "--step", "5", "--json", "-")
    fresh_html, cached_html = tmp_path / "fresh.html", tmp_path / "cached.html"
    _run("--no-cache", "analyze", TWO_RANKS, "--html", str(fresh_html), "-q")

    assert _run("--cache-dir", cache_dir, "analyze", TWO_RANKS, "--json", "-") == fresh_json
    assert len(_entries(cache_dir)) == 1
    assert len([n for n in os.listdir(cache_dir) if not n.startswith(".")]) == 2  # one per file
    assert _run("--cache-dir", cache_dir, "analyze", TWO_RANKS, "--json", "-") == fresh_json
    assert _run("--cache-dir", cache_dir, "explain", TWO_RANKS, "--step", "5", "--json", "-") == fresh_explain
    _run("--cache-dir", cache_dir, "analyze", TWO_RANKS, "--html", str(cached_html), "-q")
    assert cached_html.read_bytes() == fresh_html.read_bytes()
    assert len(_entries(cache_dir)) == 1  # the same analysis every time


def test_diff_from_the_cache_reads_no_places(tmp_path):
    # The places are kept for explain; a diff never reads them. With their files gone from
    # the entry, a diff from the cache still answers, and as without a cache.
    cache_dir = str(tmp_path / "cache")
    args = ["diff", TWO_RANKS, "--steps-before", "0-4", "--against", TWO_RANKS, "--steps-after", "5-9",
            "--json", "-", "-q"]
    fresh = _run("--no-cache", *args)
    _run("--cache-dir", cache_dir, "analyze", TWO_RANKS, "-q")
    (entry,) = _entries(cache_dir)
    with open(os.path.join(entry, "findings.json"), encoding="utf-8") as handle:
        document = json.load(handle)
    places = [document[name]["__frame__"] for name in ("place_cpu", "place_gpu", "place_tree")]
    assert places and all(os.path.exists(os.path.join(entry, name)) for name in places)
    for name in places:
        os.remove(os.path.join(entry, name))
    assert _run("--cache-dir", cache_dir, *args) == fresh
    # Answered from the entry: an entry found damaged is dropped, analyzed again and
    # stored whole, places and all.
    assert _entries(cache_dir) == [entry]
    assert not any(os.path.exists(os.path.join(entry, name)) for name in places)


def test_other_options_files_or_code_miss(tmp_path, monkeypatch):
    trace = tmp_path / "t.sqlite"
    shutil.copy(NSYS, trace)
    cache_dir = str(tmp_path / "cache")
    base = findings_cache.entry_path(cache_dir, [str(trace)], Options())
    assert findings_cache.entry_path(cache_dir, [str(trace)], Options()) == base
    assert findings_cache.entry_path(cache_dir, [str(trace)], Options(step_pattern=r"step (\d+)")) != base
    assert findings_cache.entry_path(cache_dir, [str(trace)], Options(comm_patterns=("x",))) != base
    os.utime(trace, ns=(1, 1))
    assert findings_cache.entry_path(cache_dir, [str(trace)], Options()) != base
    touched = findings_cache.entry_path(cache_dir, [str(trace)], Options())
    findings_cache.code_fingerprint.cache_clear()
    monkeypatch.setattr("traceinsight.analysis.findings_cache.__version__", "0.0.0-other")
    try:
        assert findings_cache.entry_path(cache_dir, [str(trace)], Options()) != touched
    finally:
        findings_cache.code_fingerprint.cache_clear()


def test_a_damaged_entry_is_dropped_and_analyzed_again(tmp_path):
    cache_dir = str(tmp_path / "cache")
    first = _run("--cache-dir", cache_dir, "analyze", NSYS, "--json", "-")
    (entry,) = _entries(cache_dir)
    with open(os.path.join(entry, "findings.json"), "w") as handle:
        handle.write("{not json")
    assert findings_cache.load(entry) is None
    assert not os.path.exists(entry)
    assert _run("--cache-dir", cache_dir, "analyze", NSYS, "--json", "-") == first
    assert len(_entries(cache_dir)) == 1


def test_what_cannot_be_stored_exactly_is_not_stored(tmp_path):
    model = load(NSYS, cache_dir=str(tmp_path))
    findings = analyze_model(model, Options())
    entry = findings_cache.entry_path(str(tmp_path), [NSYS], Options())
    findings.anomalies = [{"value": object()}]
    assert not findings_cache.store(entry, findings)
    findings.anomalies = [{"value": pl.Series([1])}]
    assert not findings_cache.store(entry, findings)
    assert not _entries(tmp_path)
    # Never a folder for a model that is not cached: the model cache would trust it.
    assert not findings_cache.store(os.path.join(str(tmp_path), "absent", "findings-x"), analyze_model(model, Options()))
    assert not os.path.exists(os.path.join(str(tmp_path), "absent"))


def test_tagged_json_keeps_types():
    frames: dict = {"prefix": "t"}
    value = {"a": (1, 2.5, None), 3: [float("nan"), float("inf")], "__x": "y", "s": {"k": [True]}}
    back = findings_cache._decode(findings_cache._encode(value, frames), frames)
    assert findings_cache._same(value, back)
    assert type(back["a"]) is tuple and 3 in back


def test_explain_from_kept_places_equals_explain_that_builds_them():
    # The analysis keeps its places (node numbers of later ranks moved past earlier ranks'),
    # so that `explain` of a cached analysis skips the joins; what it says must not change.
    from traceinsight.analysis.postmortem import step_postmortem

    paths = [os.path.join(TWO_RANKS, name) for name in ("rank0.json.gz", "rank1.json.gz")]
    findings = analyze_model(load(paths, cache_dir=None), Options())
    assert findings.place_cpu.width and findings.place_tree.height
    assert findings.place_tree.get_column("node").is_unique().all()
    rebuilt = dataclasses.replace(findings, place_cpu=pl.DataFrame(), place_gpu=pl.DataFrame(),
                                  place_tree=pl.DataFrame())
    flagged = findings.steps.filter(pl.col("anomalous")).select("rank", "step").rows()
    calm = findings.steps.filter(~pl.col("anomalous")).select("rank", "step").rows()[:2]
    assert flagged and calm
    for rank, step in flagged + calm:
        kept = step_postmortem(findings, step=step, rank=rank)
        assert kept == step_postmortem(rebuilt, step=step, rank=rank), (rank, step)


def test_a_stored_frame_is_checked_column_by_column_against_the_analysis(tmp_path, monkeypatch):
    # The check after writing reads each stored frame a batch of columns at a time (the
    # flood's range instances are 100 MB); it must still catch any difference of schema,
    # order or value.
    frame = pl.DataFrame({"a": [1, None, 3], "b": ["x", "y", None], "c": [0.5, float("nan"), 2.0]})
    path = str(tmp_path / "f.arrow")
    frame.write_ipc(path, compression="lz4")
    assert findings_cache._stored_frame_equals(path, frame)
    assert not findings_cache._stored_frame_equals(path, frame.with_columns(pl.col("c").fill_nan(1.0)))
    assert not findings_cache._stored_frame_equals(path, frame.with_columns(pl.col("a").cast(pl.Int32)))
    assert not findings_cache._stored_frame_equals(path, frame.select("b", "a", "c"))
    assert not findings_cache._stored_frame_equals(path, frame.head(2))
    # Frames are read back in batches of columns: with one column per batch, a difference in
    # the last batch is caught as well as in the first.
    monkeypatch.setattr(findings_cache, "CHECK_BATCH_BYTES", 1)
    assert findings_cache._column_batches(frame) == [["a"], ["b"], ["c"]]
    assert findings_cache._stored_frame_equals(path, frame)
    assert not findings_cache._stored_frame_equals(path, frame.with_columns(pl.col("c").fill_nan(1.0)))
    assert not findings_cache._stored_frame_equals(path, frame.with_columns(pl.col("a").fill_null(0)))
    monkeypatch.setattr(findings_cache, "CHECK_BATCH_BYTES", 10**9)
    assert findings_cache._column_batches(frame) == [["a", "b", "c"]]
    empty = pl.DataFrame()
    empty.write_ipc(path)
    assert findings_cache._stored_frame_equals(path, empty)
    # Within a whole entry: a frame changed on disk after writing makes the entry unequal.
    frames: dict = {"prefix": "t"}
    value = {"x": frame, "y": [1, 2]}
    document = findings_cache._encode(value, frames)
    for name, stored in frames.items():
        if name != "prefix":
            stored.write_ipc(str(tmp_path / name))
    (tmp_path / "t.json").write_text(json.dumps(document))
    assert findings_cache._reads_back_equal(str(tmp_path), "t.json", value)
    frame.with_columns(pl.col("a").fill_null(2)).write_ipc(str(tmp_path / document["x"]["__frame__"]))
    assert not findings_cache._reads_back_equal(str(tmp_path), "t.json", value)
