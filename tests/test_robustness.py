"""Every failure a user can cause: the exact message they see, the exit code, and no
output or temporary file left behind; trace files are never modified; hostile strings print
literally; host names stay hidden; pathological traces finish in bounded time.

Messages are asserted in full, as ``traceinsight: error: PATH: ...`` on stderr.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import SAMPLE_TRACES, shared
from mutate import (
    complete_events,
    flip_bytes,
    kineto_json,
    overwrite_page,
    sqlite_edit,
    truncate,
    write_json,
)
from traceinsight.cli import main
from traceinsight.errors import OptionError, TraceFormatError, TraceTooLargeError
from traceinsight.ingest import guard

SINGLE_NSYS = SAMPLE_TRACES / "moe_single_nsys.sqlite"
RANK0_JSON = SAMPLE_TRACES / "moe_2rank" / "rank0.json.gz"
KERNEL = "CUPTI_ACTIVITY_KIND_KERNEL"
RUNTIME = "CUPTI_ACTIVITY_KIND_RUNTIME"
#: Kernels in moe_single_nsys.sqlite (sample_traces/README.md).
SINGLE_KERNELS = 3272


def cli(*args, env: dict | None = None):
    """Run the CLI in-process without the cache; stderr is kept apart from stdout."""
    return CliRunner().invoke(main, ["--no-cache", *map(str, args)], env=env)


def error_of(result, code: int = 2) -> str:
    """The one error line on stderr, after checking the exit code and that nothing else
    (no traceback) was printed."""
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    assert "Traceback" not in result.output + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def analyze_json(tmp_path: Path, *paths, extra=(), env=None) -> dict:
    out = tmp_path / "out.json"
    result = cli("analyze", *paths, "--json", out, "--quiet", *extra, env=env)
    assert result.exit_code == 0, (result.output, result.stderr)
    assert "Traceback" not in result.output + result.stderr
    return json.loads(out.read_text())


def folder_listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- paths -------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere.sqlite"
    assert error_of(cli("analyze", missing)) == f"traceinsight: error: {missing}: no such file"
    assert error_of(cli("info", missing)) == f"traceinsight: error: {missing}: no such file"


def test_missing_path_with_the_cache_on(tmp_path):
    missing = tmp_path / "nowhere.json"
    result = CliRunner().invoke(main, ["--cache-dir", str(tmp_path / "cache"), "analyze", str(missing)])
    line = error_of(result)
    assert line.startswith(f"traceinsight: error: {missing}: ") and "no such file" in line.lower()


def test_folder_without_traces(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "config.json").write_text('{"lr": 0.1}')  # JSON, but not a trace
    assert error_of(cli("analyze", tmp_path)) == (
        f"traceinsight: error: {tmp_path}: folder holds no trace files (*.sqlite, *.json, *.json.gz)"
    )


def test_empty_file(tmp_path):
    path = tmp_path / "rank0.json"
    path.write_bytes(b"")
    assert error_of(cli("analyze", path)) == (
        f"traceinsight: error: {path}: empty file (0 bytes); was the profiler stopped before it "
        "wrote the trace?"
    )


EXPECTED = (
    "expected an Nsight Systems SQLite export (nsys export --type sqlite) or a PyTorch profiler "
    "JSON trace (.json / .json.gz)"
)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("plot.png", b"\x89PNG\r\n\x1a\n" + bytes(200), f"not a trace: the file is a PNG image; {EXPECTED}"),
        ("noise.bin", bytes(range(1, 256)) * 20, f"not a trace: {EXPECTED}"),
        ("zeros.sqlite", bytes(4096), "file holds only blank or zero bytes (never written, or damaged)"),
        (
            "run.nsys-rep",
            b"NVIDIA Tegra Profiler Report 36398880.\n\x0bLocal (CLI)" + bytes(100),
            "not a trace: the file is an Nsight Systems report, not its SQLite export; convert it "
            "first: nsys export --type sqlite FILE",
        ),
        (
            "trace.json.zst",
            b"(\xb5/\xfd" + bytes(100),
            "not a trace: the file is zstd-compressed; decompress it first (zstd -d FILE); gzip is "
            "read directly",
        ),
        ("config.json", b'{"learning_rate": 0.1}', "JSON object has no traceEvents: not a PyTorch profiler trace"),
        ("list.json", b"[1, 2, 3]", "not a PyTorch profiler trace: wrong JSON type (Expected `object`, got `int` - at `$[0]`)"),
        ("events.json", b'{"traceEvents": {"a": 1}}', "traceEvents is not a list of events: not a PyTorch profiler trace"),
        (
            "blob.json.gz",
            gzip.compress(b"hello world, not json", mtime=0),
            "gzip file does not hold a JSON trace (expected a PyTorch profiler trace)",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) and len(value) < 20 else None,
)
def test_wrong_format(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    assert error_of(cli("analyze", path)) == f"traceinsight: error: {path}: {message}"


def test_sqlite_database_that_is_not_an_nsys_export(tmp_path):
    path = tmp_path / "app.sqlite"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE users (id INTEGER, name TEXT)")
    connection.commit()
    connection.close()
    assert error_of(cli("analyze", path)) == (
        f"traceinsight: error: {path}: SQLite database is not an Nsight Systems export (no StringIds "
        "and no nsys tables); create one with `nsys export --type sqlite`"
    )


def test_deeply_nested_json_is_refused_not_a_crash(tmp_path):
    path = tmp_path / "deep.json"
    depth = 100_000
    path.write_text('{"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "a", "ts": 1, "dur": 1, '
                    '"pid": 1, "tid": 1, "args": {"x": ' + "[" * depth + "]" * depth + "}}]}")
    assert error_of(cli("analyze", path)) == (
        f"traceinsight: error: {path}: JSON nested deeper than any profiler trace (over "
        f"{sys.getrecursionlimit():,} levels); not a PyTorch profiler trace"
    )


# -- truncated and corrupt files, --salvage -------------------------------------------------------


def test_truncated_json_without_and_with_salvage(tmp_path):
    text = gzip.decompress(RANK0_JSON.read_bytes())
    path = tmp_path / "rank0.json"
    path.write_bytes(text[:2_000_000])
    assert error_of(cli("analyze", path)) == (
        f"traceinsight: error: {path}: truncated or invalid JSON at byte 2,000,000 (the text ends in "
        "the middle of a value); if the job crashed mid-write, retry with --salvage"
    )
    findings = analyze_json(tmp_path, path, extra=["--salvage"])
    salvaged = [w for w in findings["warnings"] if w.startswith("salvaged a truncated trace")]
    assert len(salvaged) == 1
    kept = int(salvaged[0].split("kept ")[1].split(" complete")[0].replace(",", ""))
    dropped = int(salvaged[0].split("dropped the last ")[1].split(" bytes")[0].replace(",", ""))
    assert 0 < kept < 16_926 and 0 < dropped < 2_000  # at most one event lost
    assert salvaged[0] == f"salvaged a truncated trace: kept {kept:,} complete events, dropped the last {dropped:,} bytes"


def test_truncated_gzip_without_and_with_salvage(tmp_path):
    path = truncate(RANK0_JSON, tmp_path / "rank0.json.gz", 0.5)
    line = error_of(cli("analyze", path))
    prefix = f"traceinsight: error: {path}: gzip data ends early, after "
    assert line.startswith(prefix)
    inflated = line[len(prefix):].split(" ")[0]
    assert line == (f"{prefix}{inflated} decompressed bytes (file cut short?); if the job crashed "
                    "mid-write, retry with --salvage")
    findings = analyze_json(tmp_path, path, extra=["--salvage"])
    assert f"gzip stream is truncated; decompressed its first {inflated} bytes" in findings["warnings"]
    assert any(w.startswith("salvaged a truncated trace: kept ") for w in findings["warnings"])
    assert findings["top_kernels"]


def test_gzip_cut_before_any_json(tmp_path):
    path = truncate(RANK0_JSON, tmp_path / "rank0.json.gz", 0.00001)
    assert error_of(cli("analyze", path, "--salvage")) == (
        f"traceinsight: error: {path}: gzip file is cut short before its first bytes of JSON; "
        "nothing can be read"
    )


def test_corrupt_gzip(tmp_path):
    data = bytearray(RANK0_JSON.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path = tmp_path / "rank0.json.gz"
    path.write_bytes(bytes(data))
    assert error_of(cli("analyze", path)) == (
        f"traceinsight: error: {path}: gzip data is corrupt (checksum mismatch); the "
        "file was damaged after it was written; --salvage reads what precedes the damage"
    )
    findings = analyze_json(tmp_path, path, extra=["--salvage"])
    read = [w for w in findings["warnings"] if w.startswith("gzip data is corrupt")]
    assert read and read[0].startswith("gzip data is corrupt (checksum mismatch); read the ")
    assert read[0].endswith(" decompressed bytes before the damage")


def test_truncated_sqlite(tmp_path):
    path = truncate(SINGLE_NSYS, tmp_path / "trace.sqlite", 0.5)
    size, full = path.stat().st_size, SINGLE_NSYS.stat().st_size
    assert error_of(cli("analyze", path)) == (
        f"traceinsight: error: {path}: the SQLite file is truncated: it holds {size:,} of the "
        f"{full:,} bytes its header announces; copy it again or export it again (nsys export --type sqlite)"
    )


def test_corrupt_sqlite_pages(tmp_path):
    path = overwrite_page(SINGLE_NSYS, tmp_path / "trace.sqlite", page=1)
    assert error_of(cli("analyze", path)) == (
        f"traceinsight: error: {path}: the SQLite file is damaged (database disk image is malformed): "
        "it was cut short or corrupted after nsys wrote it; export it again (nsys export --type "
        "sqlite REPORT.nsys-rep)"
    )


def test_damaged_schema_with_bytes_that_are_not_text(tmp_path):
    # Found by fuzzing: SQLite's error message quotes the damaged schema, whose bytes are not
    # UTF-8, and Python failed to decode the message itself.
    path = tmp_path / "trace.sqlite"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE StringIds (id INTEGER PRIMARY KEY, value TEXT)")
    connection.execute("CREATE TABLE NVTX_EVENTS (start INTEGER, zzzzzzzz INTEGER)")
    connection.commit()
    connection.close()
    path.write_bytes(path.read_bytes().replace(b"zzzzzzzz INTEGER", b"`" + b"\xad" * 7 + b" INTEGER"))
    assert error_of(cli("analyze", path)) == (
        f"traceinsight: error: {path}: the SQLite file is damaged (malformed database schema): it was "
        "cut short or corrupted after nsys wrote it; export it again (nsys export --type sqlite "
        "REPORT.nsys-rep)"
    )


def test_corrupt_sqlite_bytes_in_the_middle(tmp_path):
    # Garbage over the middle of a real export: refused with the damaged-file message, or (if
    # the bytes land in unused space) read; never a crash.
    for seed in range(6):
        path = flip_bytes(SINGLE_NSYS, tmp_path / f"trace{seed}.sqlite", seed=seed, count=1, width=4096,
                          skip=SINGLE_NSYS.stat().st_size // 4)
        result = cli("analyze", path, "--json", tmp_path / f"out{seed}.json", "-q")
        assert result.exit_code in (0, 2), result.stderr
        if result.exit_code == 2:
            assert "the SQLite file is damaged" in error_of(result)


def test_invalid_utf8_in_a_json_trace_is_read_with_a_warning(tmp_path):
    document = kineto_json(RANK0_JSON)
    complete_events(document)[0]["name"] = "KERNEL_NAME_MARK"
    path = write_json(document, tmp_path / "rank0.json")
    path.write_bytes(path.read_bytes().replace(b"KERNEL_NAME_MARK", b"bad\xff\xfebytes"))
    findings = analyze_json(tmp_path, path)
    assert "the file holds text that is not valid UTF-8; the bad bytes were read as U+FFFD" in findings["warnings"]


# -- wrong types, NULLs, missing tables and columns: degrade and say so ---------------------------


def _nsys_warnings(tmp_path, *statements) -> list[str]:
    path = sqlite_edit(SINGLE_NSYS, tmp_path / "edited.sqlite", *statements)
    return analyze_json(tmp_path, path)["warnings"]


def test_nsys_string_timestamps(tmp_path):
    warnings = _nsys_warnings(tmp_path, f"UPDATE {KERNEL} SET start = 'soon', \"end\" = 'later'")
    assert (f"skipped {SINGLE_KERNELS:,} events (kernel {SINGLE_KERNELS:,}) whose start or end time is "
            "missing or not a number") in warnings


def test_nsys_numbers_written_as_text_are_read(tmp_path):
    path = sqlite_edit(SINGLE_NSYS, tmp_path / "text.sqlite", f"UPDATE {KERNEL} SET start = CAST(start AS TEXT)")
    findings = analyze_json(tmp_path, path)
    assert not [w for w in findings["warnings"] if w.startswith("skipped")]
    original = analyze_json(tmp_path, SINGLE_NSYS)
    assert findings["top_kernels"] == original["top_kernels"]


def test_nsys_negative_durations(tmp_path):
    warnings = _nsys_warnings(tmp_path, f"UPDATE {KERNEL} SET \"end\" = start - 1000 WHERE rowid % 2 = 0")
    assert f"skipped {SINGLE_KERNELS // 2:,} events (kernel {SINGLE_KERNELS // 2:,}) that end before they start" in warnings


def test_nsys_nulls_in_key_columns(tmp_path):
    warnings = _nsys_warnings(
        tmp_path,
        f"UPDATE {KERNEL} SET start = NULL WHERE rowid % 4 = 0",
        "UPDATE NVTX_EVENTS SET globalTid = NULL",
        "UPDATE StringIds SET value = NULL",
    )
    assert f"skipped {SINGLE_KERNELS // 4:,} events (kernel {SINGLE_KERNELS // 4:,}) whose start or end time is missing or not a number" in warnings
    assert any(w.startswith("skipped ") and w.endswith(" that belong to no process (no pid)") and "annotation" in w
               for w in warnings)
    assert any(w.endswith("without a name (missing from the trace or its string table) are called <unnamed>")
               for w in warnings)


def test_nsys_times_past_int64_arithmetic(tmp_path):
    warnings = _nsys_warnings(tmp_path, f"UPDATE {KERNEL} SET start = 9223372036854775000, \"end\" = 9223372036854775807")
    assert (f"skipped {SINGLE_KERNELS:,} events (kernel {SINGLE_KERNELS:,}) with times beyond ±73 years of "
            "the clock origin") in warnings


def test_nsys_missing_tables_degrade_with_a_note(tmp_path):
    warnings = _nsys_warnings(tmp_path, "DROP TABLE StringIds", f"DROP TABLE {KERNEL}")
    assert "the export has no StringIds table: kernel, CUDA API and range names are unknown" in warnings
    assert "no CUPTI_ACTIVITY_KIND_KERNEL table: the export has no GPU kernels (profile with --trace=cuda to record them)" in warnings


def test_nsys_missing_key_column_degrades_with_a_note(tmp_path):
    warnings = _nsys_warnings(tmp_path, f"ALTER TABLE {KERNEL} DROP COLUMN globalPid")
    assert f"table {KERNEL} lacks column(s) globalPid; its rows were skipped" in warnings


def test_nsys_missing_optional_column_is_not_an_error(tmp_path):
    path = sqlite_edit(SINGLE_NSYS, tmp_path / "old.sqlite", f"ALTER TABLE {KERNEL} DROP COLUMN shortName")
    findings = analyze_json(tmp_path, path)
    assert findings["top_kernels"]  # named by their full signature instead


def test_kineto_wrong_types(tmp_path):
    from traceinsight.ingest.kineto import KIND_BY_CATEGORY

    document = kineto_json(RANK0_JSON)
    # Events of the categories that become intervals (others are skipped anyway).
    events = [e for e in complete_events(document) if e.get("cat") in KIND_BY_CATEGORY]
    for index, event in enumerate(events):
        if index % 5 == 0:
            event["ts"] = "not a time"
        elif index % 5 == 1:
            event["ts"] = str(event["ts"])  # a number as text: read
        elif index % 5 == 2:
            event["dur"] = -abs(event.get("dur", 1)) - 1
    findings = analyze_json(tmp_path, write_json(document, tmp_path / "rank0.json"))
    no_time = [w for w in findings["warnings"] if w.endswith(") whose start or end time is missing or not a number")]
    backwards = [w for w in findings["warnings"] if w.endswith(") that end before they start")]
    assert no_time and no_time[0].startswith(f"skipped {len(range(0, len(events), 5)):,} events (")
    assert backwards and backwards[0].startswith(f"skipped {len(range(2, len(events), 5)):,} events (")


def test_kineto_absurd_numbers(tmp_path):
    document = kineto_json(RANK0_JSON)
    events = complete_events(document)
    events[0]["ts"] = 1e300
    events[1]["dur"] = 1e308
    events[2]["ts"] = 10**30
    document["distributedInfo"] = {"rank": 10**12, "world_size": -3}
    findings = analyze_json(tmp_path, write_json(document, tmp_path / "rank0.json"))
    assert findings["ranks"][0]["rank"] == 0  # the absurd rank is not believed
    assert any(w.startswith("skipped 3 events (") for w in findings["warnings"])


# -- regexes and ranks ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("(", "--step-marker '(' is not a valid regular expression (missing ), unterminated subpattern at position 0)"),
        ("step", "--step-marker 'step' has no capture group; it needs exactly 1, around the step number, "
                 r"e.g. 'train_step_(\d+)' (write (?:...) for other groups)"),
        (r"(step)_(\d+)", r"--step-marker '(step)_(\d+)' has 2 capture groups; it needs exactly 1, around the "
                          r"step number, e.g. 'train_step_(\d+)' (write (?:...) for other groups)"),
        (r"(?<=step )(\d+)", r"--step-marker '(?<=step )(\d+)' cannot be used: look-around, including look-ahead "
                             "and look-behind, is not supported in polars' regex engine (no look-around, no "
                             "back-references)"),
    ],
)
@pytest.mark.parametrize("command", ["analyze", "info"])
def test_bad_step_marker(tmp_path, pattern, message, command):
    out = tmp_path / "out.json"
    extra = ["--json", out] if command == "analyze" else []
    assert error_of(cli(command, SINGLE_NSYS, "--step-marker", pattern, *extra)) == f"traceinsight: error: {message}"
    assert not out.exists()


def test_bad_comm_pattern():
    assert error_of(cli("analyze", SINGLE_NSYS, "--comm-pattern", "[nccl")) == (
        "traceinsight: error: --comm-pattern '[nccl' is not a valid regular expression (unterminated "
        "character set at position 0)"
    )


def test_step_marker_that_matches_nothing_warns(tmp_path):
    findings = analyze_json(tmp_path, SINGLE_NSYS, extra=["--step-marker", r"no_such_step_(\d+)"])
    assert any(w.startswith(r"step marker 'no_such_step_(\\d+)' matched no annotation") for w in findings["warnings"])
    assert findings["step_source"] == "whole trace"


def test_check_pattern_is_an_option_error():
    with pytest.raises(OptionError):
        from traceinsight.errors import check_pattern

        check_pattern("(a)(b)", option="--step-marker", groups=1)


def test_ranks_that_do_not_overlap_in_time_warn(tmp_path):
    # Two recordings made 20 s apart, no collective in common: aligned by their clocks only.
    findings = analyze_json(tmp_path, SINGLE_NSYS, SAMPLE_TRACES / "moe_2rank_nsys" / "rank0.sqlite")
    notes = [w for w in findings["warnings"] if "do not overlap in time" in w]
    assert len(notes) == 1
    assert notes[0].startswith("ranks 0 and 1 do not overlap in time: rank 1 starts ")
    assert notes[0].endswith(" s after rank 0 ends; were the files recorded in the same run? Cross-rank "
                             "waits and comparisons are not meaningful")


def test_ranks_of_one_run_do_not_warn(tmp_path):
    findings = analyze_json(tmp_path, SAMPLE_TRACES / "moe_2rank")
    assert not [w for w in findings["warnings"] if "overlap" in w]


# -- outputs --------------------------------------------------------------------------------------


def test_output_in_a_missing_folder(tmp_path):
    out = tmp_path / "no" / "such" / "out.json"
    assert error_of(cli("analyze", SINGLE_NSYS, "--json", out)) == (
        f"traceinsight: error: cannot write {out}: folder {out.parent} does not exist; create it or "
        "choose another path"
    )
    assert not out.parent.exists()


def test_output_that_is_a_folder(tmp_path):
    assert error_of(cli("analyze", SINGLE_NSYS, "--json", tmp_path)) == (
        f"traceinsight: error: cannot write {tmp_path}: it is a folder; give a file name"
    )


def test_output_is_checked_before_the_trace_is_read(tmp_path):
    # The bad output path is reported even though the trace is broken too: nobody waits for
    # a long read to learn that the output cannot be written.
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    out = tmp_path / "missing" / "out.json"
    assert "cannot write" in error_of(cli("analyze", broken, "--json", out))


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from traceinsight.report import output

    def no_space(source, target):
        raise OSError(errno.ENOSPC, "No space left on device", target)

    monkeypatch.setattr(output.os, "replace", no_space)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "findings.json"
    assert error_of(cli("analyze", SINGLE_NSYS, "--json", out, "-q")) == (
        f"traceinsight: error: {out}: No space left on device"
    )
    assert folder_listing(out_dir) == []


def test_failure_after_rendering_leaves_no_output(tmp_path, monkeypatch):
    # The terminal summary fails after the JSON was rendered: the JSON must not be written.
    import traceinsight.report.terminal as terminal

    def broken(*args, **kwargs):
        raise RuntimeError("renderer bug\nsecond line of the message")

    monkeypatch.setattr(terminal, "render_findings", broken)
    out = tmp_path / "findings.json"
    result = cli("analyze", SINGLE_NSYS, "--json", out)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "traceinsight: internal error: RuntimeError: renderer bug",
        "traceinsight: this is a bug; please report it, with the traceback that --debug shows "
        "(traceinsight --debug ...)",
    ]
    assert folder_listing(tmp_path) == []
    debug = CliRunner().invoke(main, ["--no-cache", "--debug", "analyze", str(SINGLE_NSYS), "--json", str(out)])
    assert isinstance(debug.exception, RuntimeError)  # --debug lets the traceback through
    assert folder_listing(tmp_path) == []


def test_second_output_failing_removes_the_first(tmp_path, monkeypatch):
    import traceinsight.report.html as html

    monkeypatch.setattr(html, "render_html", lambda *a, **k: (_ for _ in ()).throw(ValueError("html bug")))
    result = cli("analyze", SINGLE_NSYS, "--json", tmp_path / "f.json", "--html", tmp_path / "r.html", "-q")
    assert result.exit_code == 1 and "ValueError: html bug" in result.stderr
    assert folder_listing(tmp_path) == []


def _fingerprint(path: Path) -> tuple:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_mode, hashlib.sha256(path.read_bytes()).hexdigest()


def test_trace_files_are_never_modified(tmp_path):
    # Writable copies: the reader could write to them if it tried (SQLite journals, rewrites).
    folder = tmp_path / "traces"
    folder.mkdir()
    copies = [folder / "single.sqlite", folder / "rank0.json.gz", folder / "rank1.json"]
    copies[0].write_bytes(SINGLE_NSYS.read_bytes())
    copies[1].write_bytes(RANK0_JSON.read_bytes())
    copies[2].write_bytes(gzip.decompress((SAMPLE_TRACES / "moe_2rank" / "rank1.json.gz").read_bytes()))
    old = int(time.time()) - 3600
    for path in copies:
        os.utime(path, (old, old))
    before = {path: _fingerprint(path) for path in copies}
    for args in (["info", folder], ["analyze", folder, "-q"], ["analyze", copies[0], "-q"],
                 ["explain", copies[0], "--step", "3"]):
        result = CliRunner().invoke(main, ["--cache-dir", str(tmp_path / "cache"), *map(str, args)])
        assert result.exit_code == 0, result.stderr
    assert {path: _fingerprint(path) for path in copies} == before
    assert folder_listing(folder) == sorted(p.name for p in copies)  # no journal, no temp file


# -- resource limits ------------------------------------------------------------------------------


def test_trace_larger_than_memory_fails_early(tmp_path):
    size = RANK0_JSON.stat().st_size
    isize = int.from_bytes(RANK0_JSON.read_bytes()[-4:], "little")
    env = {guard.MEMORY_LIMIT_ENV: "1M"}
    assert error_of(cli("analyze", RANK0_JSON, env=env)) == (
        f"traceinsight: error: {RANK0_JSON}: reading it needs about {guard.human_bytes(isize)} of memory "
        f"(a {guard.human_bytes(size)} gzip file holding about {guard.human_bytes(isize)} of JSON) but only "
        "1.0 MiB are allowed by TRACEINSIGHT_MEMORY_LIMIT; raise TRACEINSIGHT_MEMORY_LIMIT, or set "
        "TRACEINSIGHT_NO_MEMORY_CHECK=1 to try anyway"
    )
    line = error_of(cli("analyze", SINGLE_NSYS, env={guard.MEMORY_LIMIT_ENV: "1M"}))
    assert line.startswith(f"traceinsight: error: {SINGLE_NSYS}: reading it needs about ")
    assert " rows in its event and string tables) but only 1.0 MiB are allowed by TRACEINSIGHT_MEMORY_LIMIT" in line
    # The override reads it anyway.
    env = {guard.MEMORY_LIMIT_ENV: "1M", guard.NO_MEMORY_CHECK_ENV: "1"}
    assert analyze_json(tmp_path, SINGLE_NSYS, env=env)["top_kernels"]


def test_memory_limit_that_is_not_a_size():
    assert error_of(cli("analyze", SINGLE_NSYS, env={guard.MEMORY_LIMIT_ENV: "lots"})) == (
        "traceinsight: error: TRACEINSIGHT_MEMORY_LIMIT='lots' is not a size; write e.g. 8G, 512M or bytes"
    )


def test_available_memory_is_known_here():
    available = guard.available_memory()
    assert available is None or available > 0
    assert guard.parse_size("1.5G") == int(1.5 * 2**30) and guard.parse_size("512") == 512


def test_gzip_bomb_with_a_lying_trailer_stops_at_the_limit(tmp_path):
    # 64 MiB of spaces inside a JSON trace compress to about 64 KiB; the trailer is rewritten
    # to claim 1 KiB, so only the inflate limit can catch it.
    body = b'{"traceEvents": [' + b" " * (64 * 2**20) + b"]}"
    data = bytearray(gzip.compress(body, compresslevel=9, mtime=0))
    data[-4:] = (1024).to_bytes(4, "little")
    path = tmp_path / "bomb.json.gz"
    path.write_bytes(bytes(data))
    # Read as a stream, the text is never held whole: the limit is the budget itself.
    with pytest.raises(TraceTooLargeError, match="decompresses to more than 32.0 MiB of JSON"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(guard.MEMORY_LIMIT_ENV, "32M")
            from traceinsight.ingest.kineto import read_kineto

            read_kineto(path)


@pytest.mark.parametrize(
    ("compressed", "isize", "expected"),
    [
        (1000, 16_000, 16_000),  # a believable trailer
        (1000, 100, 4_000),  # no size that agrees is believable: the floor (4x the file)
        (2**31, 5, 5 + 2 * 2**32),  # a 2 GiB file: the trailer counts modulo 4 GiB
        (1000, None, 4_000),
    ],
)
def test_inflated_size_estimate(compressed, isize, expected):
    assert guard.inflated_size_estimate(compressed, isize) == expected


def _timed_analyze(tmp_path, path, limit_s=20.0):
    started = time.perf_counter()
    result = cli("analyze", path, "--json", tmp_path / "out.json", "-q")
    elapsed = time.perf_counter() - started
    assert "Traceback" not in result.stderr
    assert elapsed < limit_s, f"{path.name} took {elapsed:.1f} s"
    return result


def test_a_million_nested_ranges_kineto(tmp_path):
    n = 1_000_000
    path = tmp_path / "nested.json"
    with path.open("w") as out:
        out.write('{"traceEvents": [')
        out.write(",".join(
            f'{{"ph":"X","cat":"user_annotation","name":"r{i % 7}","pid":1,"tid":1,"ts":{i},"dur":{2 * n - 2 * i}}}'
            for i in range(n)
        ))
        out.write("]}")
    result = _timed_analyze(tmp_path, path)
    assert result.exit_code == 0, result.stderr


def test_a_million_nested_ranges_nsys(tmp_path):
    n = 1_000_000
    path = tmp_path / "nested.sqlite"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE StringIds (id INTEGER PRIMARY KEY, value TEXT)")
    connection.execute('CREATE TABLE NVTX_EVENTS (start INTEGER, "end" INTEGER, eventType INTEGER, '
                       "text TEXT, globalTid INTEGER, domainId INTEGER, textId INTEGER)")
    tid = (1 << 48) | (100 << 24) | 100
    connection.executemany("INSERT INTO NVTX_EVENTS VALUES (?, ?, 59, ?, ?, 0, NULL)",
                           ((i, 2 * n - i, f"step {i}" if i % 1000 == 0 else "r", tid) for i in range(n)))
    connection.commit()
    connection.close()
    result = _timed_analyze(tmp_path, path)
    assert result.exit_code == 0, result.stderr


def test_one_huge_string(tmp_path):
    huge = "k" * 50_000_000
    path = tmp_path / "huge.json"
    path.write_text(json.dumps({"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": f"void {huge}<int>(float*)", "pid": 0, "tid": 7, "ts": 10, "dur": 5,
         "args": {"device": 0, "stream": 7, "correlation": 1}},
        {"ph": "X", "cat": "cpu_op", "name": huge, "pid": 1, "tid": 1, "ts": 0, "dur": 50},
    ]}))
    result = _timed_analyze(tmp_path, path)
    assert result.exit_code == 0, result.stderr
    findings = json.loads((tmp_path / "out.json").read_text())
    assert "2 names longer than 65,536 characters were shortened" in findings["warnings"]
    assert len(findings["top_kernels"][0]["name"]) <= guard.MAX_TEXT


def test_huge_strings_in_an_nsys_string_table(tmp_path):
    path = tmp_path / "huge.sqlite"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE StringIds (id INTEGER PRIMARY KEY, value TEXT)")
    connection.execute(f'CREATE TABLE {KERNEL} (start INTEGER, "end" INTEGER, deviceId INTEGER, streamId INTEGER, '
                       "correlationId INTEGER, globalPid INTEGER, shortName INTEGER, demangledName INTEGER)")
    connection.execute("INSERT INTO StringIds VALUES (1, ?), (2, ?)", ("k" * 50_000_000, "<" * 5_000_000))
    connection.executemany(f"INSERT INTO {KERNEL} VALUES (?, ?, 0, 7, ?, ?, 1, 2)",
                           ((i * 10, i * 10 + 5, i, (1 << 48) | (100 << 24)) for i in range(1000)))
    connection.commit()
    connection.close()
    result = _timed_analyze(tmp_path, path)
    assert result.exit_code == 0, result.stderr


# -- untrusted strings ------------------------------------------------------------------------------


HOSTILE = "[bold]x[/bold] \x1b[2J\x1b]0;pwned\x07 [red]evil"


def _hostile_nsys(tmp_path: Path) -> Path:
    """The sample export with its most-used kernel renamed to markup and terminal escapes."""
    connection = sqlite3.connect(f"file:{SINGLE_NSYS}?mode=ro", uri=True)
    (short_id,) = connection.execute(
        f"SELECT shortName FROM {KERNEL} GROUP BY shortName ORDER BY sum(\"end\" - start) DESC LIMIT 1"
    ).fetchone()
    connection.close()
    return sqlite_edit(SINGLE_NSYS, tmp_path / "hostile.sqlite",
                       f"UPDATE StringIds SET value = '{HOSTILE}' WHERE id = {short_id}")


def _hostile_kineto(tmp_path: Path) -> Path:
    """The 2-rank sample's rank 0 with its annotations (range names) renamed likewise."""
    document = kineto_json(RANK0_JSON)
    for event in complete_events(document):
        if event.get("cat") == "user_annotation" and not event["name"].startswith("ProfilerStep"):
            event["name"] = HOSTILE
    return write_json(document, tmp_path / "hostile.json")


def _assert_literal(output: str) -> None:
    assert "[bold]x[/bold]" in output and "[red]evil" in output
    assert "\x1b" not in output and "\x07" not in output  # no escape reaches the terminal
    assert "\ufffd[2J" in output  # it is shown, harmlessly


@pytest.mark.parametrize("command", ["analyze", "info"])
def test_markup_in_kernel_names_prints_literally(tmp_path, command):
    path = _hostile_nsys(tmp_path)
    result = CliRunner().invoke(main, ["--no-cache", command, str(path)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.stderr
    _assert_literal(result.output)


def test_markup_in_range_names_prints_literally(tmp_path):
    result = CliRunner().invoke(main, ["--no-cache", "analyze", str(_hostile_kineto(tmp_path))],
                                env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.stderr
    _assert_literal(result.output)


def test_html_report_escapes_trace_strings(tmp_path):
    document = kineto_json(RANK0_JSON)
    for event in complete_events(document):
        if event.get("cat") == "user_annotation" and not event["name"].startswith("ProfilerStep"):
            event["name"] = "<script>alert('x')</script><img src=x onerror=alert(1)>"
    path = write_json(document, tmp_path / "hostile.json")
    report = tmp_path / "report.html"
    result = cli("analyze", path, "--html", report, "-q")
    assert result.exit_code == 0, result.stderr
    html = report.read_text()
    assert "<script>alert('x')</script>" not in html and "<img src=x onerror" not in html


def test_export_without_events(tmp_path):
    path = tmp_path / "empty-export.sqlite"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE StringIds (id INTEGER PRIMARY KEY, value TEXT)")
    connection.commit()
    connection.close()
    assert error_of(cli("analyze", path)) == (
        "traceinsight: error: the traces hold no events (no CUDA, NVTX, OS runtime or CPU sample rows): "
        "nothing to analyze; `traceinsight info` shows what they hold"
    )
    result = cli("info", "--json", path)  # info describes it, with the notes
    assert result.exit_code == 0
    warnings = json.loads(result.output)["traces"][0]["warnings"]
    assert "no events: the export has no CUDA, NVTX, OS runtime or CPU sampling rows" in warnings


def _secrets(path: Path) -> dict[str, str]:
    """Host name and a few environment values recorded in an nsys export."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master")}
        found = {}
        if "TARGET_INFO_SYSTEM_ENV" in tables:
            for name, value in connection.execute("SELECT name, value FROM TARGET_INFO_SYSTEM_ENV"):
                if name == "Hostname" and value:
                    found["hostname"] = str(value)
        if "META_DATA_CAPTURE" in tables:
            for (value,) in connection.execute(
                "SELECT value FROM META_DATA_CAPTURE WHERE name LIKE '%ENVIRONMENT_VARIABLE'"
            ):
                variable, _, content = str(value).partition("=")
                content = content.strip().strip('"')
                if variable in ("HOME", "USER", "LOGNAME", "PATH", "PWD", "HOSTNAME", "LD_LIBRARY_PATH") \
                        and len(content) >= 6 and content not in str(path):
                    found[variable] = content
        return found
    finally:
        connection.close()


@pytest.mark.parametrize(
    "name",
    ["fuser-h100-nvtx-2024.6.sqlite", "cutlass-a100-cpusampling-2023.2.sqlite", "p4arth-rtx3060-2025.5.sqlite",
     "uvmtorch-a5000-osrt-backtraces-2025.3.sqlite"],
)
def test_host_names_and_environment_stay_hidden(tmp_path, name):
    path = shared(f"nsys/{name}")
    secrets = _secrets(path)
    assert "hostname" in secrets
    outputs = []
    for args in (["info", path], ["info", "--json", path], ["analyze", path],
                 ["analyze", path, "--json", tmp_path / "out.json", "--html", tmp_path / "out.html", "-q"]):
        result = CliRunner().invoke(main, ["--no-cache", *map(str, args)], env={"COLUMNS": "300"})
        assert result.exit_code == 0, result.stderr
        outputs.append(result.output + result.stderr)
    outputs += [(tmp_path / "out.json").read_text(), (tmp_path / "out.html").read_text()]
    for what, value in secrets.items():
        assert not any(value in text for text in outputs), f"{what} {value!r} leaked"
    # Asked for, the host name is there.
    shown = CliRunner().invoke(main, ["--no-cache", "info", "--json", "--show-host", str(path)])
    assert secrets["hostname"] in shown.output


# -- the command line in a real process -------------------------------------------------------------


def test_real_process_stderr_and_exit_codes(tmp_path):
    missing = tmp_path / "absent.sqlite"
    run = subprocess.run([sys.executable, "-m", "traceinsight.cli", "--no-cache", "analyze", str(missing)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr == f"traceinsight: error: {missing}: no such file\n"
    assert run.stdout == ""


def test_real_process_delivers_all_output_before_its_quick_exit(tmp_path):
    # The command ends with os._exit once its work is done (cli.run): whatever it printed or
    # wrote must all be there, with the exit code click chose.
    trace = str(SAMPLE_TRACES / "moe_2rank")
    out = tmp_path / "f.json"
    run = subprocess.run([sys.executable, "-m", "traceinsight.cli", "--no-cache", "analyze", trace, "--json", "-"],
                         capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr
    in_process = CliRunner().invoke(main, ["--no-cache", "analyze", trace, "--json", "-"])
    assert run.stdout.decode() == in_process.output
    assert json.loads(run.stdout)["steps"]
    run = subprocess.run([sys.executable, "-m", "traceinsight.cli", "--no-cache", "analyze", trace, "-q",
                          "--json", str(out)], capture_output=True, timeout=300)
    assert run.returncode == 0 and json.loads(out.read_text()) == json.loads(in_process.output)
    run = subprocess.run([sys.executable, "-m", "traceinsight.cli", "--no-such-option"], capture_output=True,
                         timeout=120)
    assert run.returncode == 2 and b"No such option" in run.stderr


def test_quick_exit_waits_for_what_needs_the_regular_exit(tmp_path):
    # In a fresh interpreter: this one may hold Ray, threads or finalizers of other tests.
    check = """
import tempfile, threading, sys
from traceinsight.cli import _needs_regular_exit
assert not _needs_regular_exit()
folder = tempfile.TemporaryDirectory(dir=sys.argv[1])  # removed by a finalizer at exit
assert _needs_regular_exit()
folder.cleanup()
assert not _needs_regular_exit()
release = threading.Event()
worker = threading.Thread(target=release.wait)
worker.start()
assert _needs_regular_exit()
release.set()
worker.join()
assert not _needs_regular_exit()
sys.modules["ray"] = None  # Ray's shutdown runs at exit
assert _needs_regular_exit()
print("checked")
"""
    run = subprocess.run([sys.executable, "-c", check, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout == "checked\n", run.stderr


def test_closed_pipe_is_quiet():
    # `traceinsight analyze ... | head -1`: the reader goes away mid-output.
    process = subprocess.Popen(
        [sys.executable, "-m", "traceinsight.cli", "--no-cache", "analyze", str(SAMPLE_TRACES / "moe_2rank")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "300"},
    )
    process.stdout.read(1)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) in (0, 1)
    assert stderr == ""


def test_error_classes_survive_pickling():
    import pickle

    error = TraceFormatError("empty file", path="/x/y.json")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is TraceFormatError and str(copy) == "/x/y.json: empty file" and copy.path == "/x/y.json"
