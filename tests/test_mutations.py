"""A corpus of damaged real traces through ``traceinsight analyze --json``.

Real files of both formats (the sample traces and small ones from ../shared/traces) are cut
at many points, have random bytes flipped (seeded), tables dropped, columns NULLed or given
the wrong type. Each mutated trace goes through the command line in a pool of worker
processes with a time bound, and every case must end in one of two ways:

- exit 0, having written a valid JSON with the documented top-level keys, or
- exit 2 with one ``traceinsight: error: ...`` line on stderr, and no output file (nor any
  temporary file) left behind.

Never a traceback, never exit 1 (an internal error), never a hang.
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from conftest import SAMPLE_TRACES, SHARED_TRACES
from mutate import (
    complete_events,
    endless_view,
    flip_bytes,
    forged_names,
    gzip_bomb_after_a_valid_member,
    gzip_whitespace_bomb,
    kineto_json,
    overwrite_page,
    run_cli_case,
    sqlite_edit,
    sqlite_tables,
    truncate,
    wal_database,
    write_json,
)

#: Seconds one case may take (they take 0.05-0.5 s); past this it counts as a hang.
CASE_LIMIT_S = 30.0
#: Top-level keys every findings JSON has (traceinsight/report/json_report.py).
DOCUMENTED_KEYS = {"ranks", "steps", "anomalies", "waits", "warnings", "top_kernels", "step_source"}

KERNEL = "CUPTI_ACTIVITY_KIND_KERNEL"
RUNTIME = "CUPTI_ACTIVITY_KIND_RUNTIME"
NVTX = "NVTX_EVENTS"

#: Source files: small real traces of both formats (paths relative to their root).
NSYS_SOURCES = {
    "single": SAMPLE_TRACES / "moe_single_nsys.sqlite",
    "rank0": SAMPLE_TRACES / "moe_2rank_nsys" / "rank0.sqlite",
    "p4arth": SHARED_TRACES / "nsys" / "p4arth-rtx3060-2025.5.sqlite",
    "dlprof": SHARED_TRACES / "nsys" / "dlprof-rtx2070-pytorch-nvtx-2022.1.sqlite",
    "legacy": SHARED_TRACES / "nsys" / "mordred-quadro6000-legacy.sqlite",
}
KINETO_SOURCES = {
    "moe": SAMPLE_TRACES / "moe_2rank" / "rank0.json.gz",
    "mi250": SHARED_TRACES / "kineto" / "hta_amd_mi250_rocm62" / "mi250_minitoy_train_ROCm6_2_kineto.json.gz",
    "annot": SHARED_TRACES / "kineto" / "hta_gpu_user_annotation" / "step_based_trace_2543932.json.gz",
    "dlrm": SHARED_TRACES / "kineto" / "param_dlrm_8rank_v100" / "worker0_step_12.1694128201545.pt.trace.json.gz",
}


@dataclass
class Case:
    id: str
    source: Path
    build: Callable[[Path, Path], Path]  # (source, folder) -> the mutated file
    extra: list[str] = field(default_factory=list)


CASES: list[Case] = []


def case(source_key: str, name: str, *, extra=(), kineto: bool = False):
    sources = KINETO_SOURCES if kineto else NSYS_SOURCES

    def register(build):
        CASES.append(Case(f"{source_key}-{name}", sources[source_key], build, list(extra)))
        return build

    return register


# -- nsys: truncations, flipped bytes, damaged pages ---------------------------------------------

for key in ("single", "rank0", "p4arth", "legacy"):
    for fraction in (0.0001, 0.03, 0.3, 0.6, 0.97):
        case(key, f"cut{fraction:g}")(
            lambda source, folder, f=fraction: truncate(source, folder / "trace.sqlite", f)
        )
    for seed in range(3):
        case(key, f"flip{seed}")(
            lambda source, folder, s=seed: flip_bytes(source, folder / "trace.sqlite", seed=s, count=8, skip=100)
        )
        case(key, f"garbage{seed}")(
            lambda source, folder, s=seed: flip_bytes(
                source, folder / "trace.sqlite", seed=100 + s, count=1, width=4096, skip=4096
            )
        )
    case(key, "page1")(lambda source, folder: overwrite_page(source, folder / "trace.sqlite", page=1))
    case(key, "page2")(lambda source, folder: overwrite_page(source, folder / "trace.sqlite", page=2, fill=b"\x00"))

# -- nsys: dropped tables, NULLed columns, wrong types --------------------------------------------

_DROPS = ["StringIds", KERNEL, RUNTIME, NVTX, "OSRT_API", "TARGET_INFO_GPU", "META_DATA_EXPORT",
          "TARGET_INFO_SESSION_START_TIME", "COMPOSITE_EVENTS", "SAMPLING_CALLCHAINS", "ENUM_NSYS_EVENT_TYPE"]
_NULLS = {
    "kernel-start": f"UPDATE {KERNEL} SET start = NULL",
    "kernel-end": f'UPDATE {KERNEL} SET "end" = NULL WHERE rowid % 3 = 0',
    "kernel-pid": f"UPDATE {KERNEL} SET globalPid = NULL",
    "kernel-names": f"UPDATE {KERNEL} SET shortName = NULL, demangledName = NULL",
    "kernel-device": f"UPDATE {KERNEL} SET deviceId = NULL, streamId = NULL",
    "runtime-tid": f"UPDATE {RUNTIME} SET globalTid = NULL WHERE rowid % 2 = 0",
    "runtime-correlation": f"UPDATE {RUNTIME} SET correlationId = NULL",
    "nvtx-text": f"UPDATE {NVTX} SET text = NULL, textId = NULL",
    "nvtx-tid": f"UPDATE {NVTX} SET globalTid = NULL",
    "nvtx-end": f'UPDATE {NVTX} SET "end" = NULL',
    "strings": "UPDATE StringIds SET value = NULL",
}
_TYPES = {
    "text-times": f"UPDATE {KERNEL} SET start = 'soon', \"end\" = 'later'",
    "numeric-text": f"UPDATE {KERNEL} SET start = CAST(start AS TEXT)",
    "real-times": f"UPDATE {RUNTIME} SET start = start + 0.5",
    "blob-times": f"UPDATE {NVTX} SET start = x'00ff'",
    "backwards": f'UPDATE {KERNEL} SET "end" = start - 1000',
    "huge-times": f'UPDATE {KERNEL} SET start = 9223372036854775807, "end" = -9223372036854775808',
    "text-ids": f"UPDATE {KERNEL} SET globalPid = 'pid', shortName = 'name'",
    "blob-strings": "UPDATE StringIds SET value = x'1b5b324a00ff'",
    "hostile-strings": "UPDATE StringIds SET value = '[bold]' || value || char(27) || '[2J'",
}


def _nsys_edit(statement: str, table: str | None):
    def build(source: Path, folder: Path) -> Path:
        present = sqlite_tables(source)
        if table is not None and table not in present:
            pytest.skip(f"{source.name} has no {table}")
        return sqlite_edit(source, folder / "trace.sqlite", statement)

    return build


for key, drops in (("single", _DROPS), ("dlprof", _DROPS[:4] + _DROPS[5:6] + _DROPS[7:8])):
    for table in drops:
        case(key, f"drop-{table}")(_nsys_edit(f'DROP TABLE "{table}"', table))
    for name, statement in {**_NULLS, **_TYPES}.items():
        table = statement.split()[1].strip('"')
        case(key, name)(_nsys_edit(statement, table))
for key in ("rank0", "p4arth"):
    for name in ("kernel-start", "runtime-tid", "strings", "text-times", "backwards"):
        statement = {**_NULLS, **_TYPES}[name]
        case(key, name)(_nsys_edit(statement, statement.split()[1].strip('"')))
    case(key, "drop-column-globalPid")(_nsys_edit(f"ALTER TABLE {KERNEL} DROP COLUMN globalPid", KERNEL))
    case(key, "drop-column-start")(_nsys_edit(f"ALTER TABLE {RUNTIME} DROP COLUMN start", RUNTIME))

# -- Kineto: truncations (with and without --salvage), flipped bytes ----------------------------------


def _json_text(source: Path) -> bytes:
    import gzip

    raw = source.read_bytes()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


for key in KINETO_SOURCES:
    for fraction in (0.001, 0.2, 0.5, 0.8, 0.999):
        for salvage in ((), ("--salvage",)):
            label = f"cut{fraction:g}" + ("-salvage" if salvage else "")
            case(key, f"gz-{label}", kineto=True, extra=salvage)(
                lambda source, folder, f=fraction: truncate(source, folder / "trace.json.gz", f)
            )
            case(key, f"json-{label}", kineto=True, extra=salvage)(
                lambda source, folder, f=fraction: _write(
                    folder / "trace.json", (text := _json_text(source))[: int(len(text) * f)]
                )
            )
    for seed in range(3):
        case(key, f"gz-flip{seed}", kineto=True)(
            lambda source, folder, s=seed: flip_bytes(source, folder / "trace.json.gz", seed=s, count=2, skip=20)
        )
        case(key, f"gz-flip{seed}-salvage", kineto=True, extra=["--salvage"])(
            lambda source, folder, s=seed: flip_bytes(source, folder / "trace.json.gz", seed=s, count=2, skip=20)
        )
        case(key, f"json-flip{seed}", kineto=True)(
            lambda source, folder, s=seed: flip_bytes(
                _write(folder / "plain.json", _json_text(source)), folder / "trace.json", seed=s, count=6
            )
        )


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- Kineto: wrong types, NULLs, missing fields --------------------------------------------------------


def _events_edit(edit):
    def build(source: Path, folder: Path) -> Path:
        document = kineto_json(source)
        edit(document)
        return write_json(document, folder / "trace.json")

    return build


def _each(field_name, value_of):
    def edit(document):
        for index, event in enumerate(complete_events(document)):
            if index % 3 == 0:
                if value_of is None:
                    event.pop(field_name, None)
                else:
                    event[field_name] = value_of(event)
    return edit


_KINETO_EDITS = {
    "ts-text": _each("ts", lambda e: "later"),
    "ts-numeric-text": _each("ts", lambda e: str(e.get("ts"))),
    "ts-null": _each("ts", lambda e: None),
    "ts-huge": _each("ts", lambda e: 1e300),
    "ts-bigint": _each("ts", lambda e: 10**30),
    "dur-negative": _each("dur", lambda e: -5),
    "dur-missing": _each("dur", None),
    "dur-inf-like": _each("dur", lambda e: 1e308),
    "name-null": _each("name", lambda e: None),
    "name-number": _each("name", lambda e: 42),
    "name-hostile": _each("name", lambda e: "[bold]x[/bold]\x1b[2J"),
    "cat-null": _each("cat", lambda e: None),
    "pid-text": _each("pid", lambda e: "process"),
    "tid-object": _each("tid", lambda e: {"a": 1}),
    "ph-missing": _each("ph", None),
    "args-list": _each("args", lambda e: [1, 2]),
    "args-wrong": _each("args", lambda e: {"External id": "x", "device": 10**12, "stream": [], "correlation": -1}),
    "no-events": lambda d: d.__setitem__("traceEvents", []),
    "events-object": lambda d: d.__setitem__("traceEvents", {"a": 1}),
    "events-mixed": lambda d: d["traceEvents"].extend([1, "x", None, []]),
    "rank-absurd": lambda d: d.__setitem__("distributedInfo", {"rank": 10**12, "world_size": "many"}),
    "base-time-text": lambda d: d.__setitem__("baseTimeNanoseconds", "yesterday"),
    "device-properties": lambda d: d.__setitem__("deviceProperties", [1, {"id": "x", "name": 5}]),
}
for key in ("moe", "dlrm"):
    for name, edit in _KINETO_EDITS.items():
        case(key, name, kineto=True)(_events_edit(edit))


# -- hostile files (issue #16): each must end in 0 or 2 in bounded time like the rest -----------------

for key in ("single", "rank0"):
    for table in (KERNEL, "StringIds", NVTX):
        case(key, f"endless-view-{table}")(lambda source, folder, t=table: endless_view(source, folder / "trace.sqlite", t))
    case(key, "wal")(lambda source, folder: wal_database(
        source, folder / "trace.sqlite", f"UPDATE {KERNEL} SET start = start + 1", "DELETE FROM StringIds WHERE id % 2 = 0"))
case("moe", "gzip-bomb-10gib", kineto=True)(lambda source, folder: gzip_whitespace_bomb(folder / "trace.json.gz"))
case("moe", "gzip-bomb-member", kineto=True)(
    lambda source, folder: gzip_bomb_after_a_valid_member(source, folder / "trace.json.gz"))
case("moe", "forged-names", kineto=True)(lambda source, folder: forged_names(source, folder / "trace.json"))


# -- running the corpus ------------------------------------------------------------------------------


def _run_all(jobs: list[tuple[str, list[str], str]]) -> dict[str, dict]:
    """Run (id, args, output) jobs in two spawned workers; a job past the limit is a hang."""
    context = multiprocessing.get_context("spawn")
    results: dict[str, dict] = {}
    pending = list(jobs)
    while pending:
        pool = context.Pool(2)
        try:
            handles = [(job, pool.apply_async(run_cli_case, (job[1], job[2]))) for job in pending]
            pending = []
            for position, (job, handle) in enumerate(handles):
                try:
                    results[job[0]] = handle.get(timeout=CASE_LIMIT_S * 2)
                except multiprocessing.TimeoutError:
                    results[job[0]] = {"hang": True}
                    for other, other_handle in handles[position + 1 :]:
                        if other_handle.ready():
                            results[other[0]] = other_handle.get()
                        else:
                            pending.append(other)
                    break
        finally:
            pool.terminate()
            pool.join()
    return results


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("mutations")
    jobs, skipped = [], {}
    for item in CASES:
        if not item.source.exists():
            skipped[item.id] = {"skipped": f"{item.source} not available"}
            continue
        folder = root / item.id
        folder.mkdir()
        try:
            path = item.build(item.source, folder)
        except pytest.skip.Exception as reason:
            skipped[item.id] = {"skipped": str(reason)}
            continue
        out_folder = folder / "out"
        out_folder.mkdir()
        output = str(out_folder / "findings.json")
        jobs.append((item.id, ["--no-cache", "analyze", str(path), "--json", output, "--quiet", *item.extra], output))
    results = _run_all(jobs)
    for item_id, _, output in jobs:
        results[item_id]["output"] = output
    results.update(skipped)
    return results


@pytest.mark.parametrize("item", CASES, ids=[c.id for c in CASES])
def test_mutated_trace(corpus, item):
    result = corpus[item.id]
    if "skipped" in result:
        pytest.skip(result["skipped"])
    assert not result.get("hang"), f"{item.id}: no answer within {CASE_LIMIT_S * 2:.0f} s"
    assert result["seconds"] < CASE_LIMIT_S, f"{item.id} took {result['seconds']:.1f} s"
    everything = result["stdout"] + result["stderr"] + (result["exception"] or "")
    assert "Traceback" not in everything
    assert result["exception"] is None, result["exception"]
    assert result["exit_code"] in (0, 2), f"exit {result['exit_code']}: {result['stderr']}"
    if result["exit_code"] == 0:
        assert result["beside_output"] == ["findings.json"]
        findings = json.loads(Path(result["output"]).read_text())
        assert DOCUMENTED_KEYS <= set(findings)
        assert result["stderr"] == ""
    else:
        assert result["beside_output"] == [], "a failed run left files behind"
        lines = result["stderr"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("traceinsight: error: "), lines


def test_corpus_size_and_outcomes(corpus):
    ran = {k: v for k, v in corpus.items() if "skipped" not in v and not v.get("hang")}
    nsys = [k for k in ran if any(k.startswith(f"{s}-") for s in NSYS_SOURCES)]
    kineto = [k for k in ran if any(k.startswith(f"{s}-") for s in KINETO_SOURCES)]
    assert len(nsys) >= 20 and len(kineto) >= 20, (len(nsys), len(kineto))
    codes = Counter(v["exit_code"] for v in ran.values())
    slowest = max(ran.items(), key=lambda kv: kv[1]["seconds"])
    print(f"\nmutation corpus: {len(ran)} cases ({len(nsys)} nsys, {len(kineto)} kineto), exit codes "
          f"{dict(sorted(codes.items()))}, slowest {slowest[0]} {slowest[1]['seconds']:.2f} s")
    assert set(codes) <= {0, 2}
    assert codes[0] and codes[2]  # both outcomes are exercised


@pytest.mark.parametrize("case_id", ["single-cut0.3", "moe-gz-cut0.5", "moe-json-flip0", "single-text-times"])
def test_real_process_answers(tmp_path, case_id):
    """A few cases through a real process: the real stderr and exit code."""
    item = next(c for c in CASES if c.id == case_id)
    if not item.source.exists():
        pytest.skip(f"{item.source} not available")
    path = item.build(item.source, tmp_path)
    output = tmp_path / "out" / "findings.json"
    output.parent.mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "traceinsight.cli", "--no-cache", "analyze", str(path), "--json", str(output), "-q"],
        capture_output=True, text=True, timeout=CASE_LIMIT_S * 2,
    )
    assert "Traceback" not in run.stderr
    assert run.returncode in (0, 2)
    if run.returncode == 2:
        assert run.stderr.startswith(f"traceinsight: error: {path}: ") and run.stderr.count("\n") == 1
        assert not output.exists()
    else:
        assert DOCUMENTED_KEYS <= set(json.loads(output.read_text()))


# == Hostile input and conditions (issue #16): what each case must do, exactly ======================

import errno  # noqa: E402
import hashlib  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sqlite3  # noqa: E402
import time  # noqa: E402

from click.testing import CliRunner  # noqa: E402

from mutate import ENDLESS_VIEW, FORGED  # noqa: E402
from traceinsight.cli import main  # noqa: E402

SINGLE = SAMPLE_TRACES / "moe_single_nsys.sqlite"
RANK0 = SAMPLE_TRACES / "moe_2rank" / "rank0.json.gz"
RANK1 = SAMPLE_TRACES / "moe_2rank" / "rank1.json.gz"
REPO = Path(__file__).resolve().parents[1]


def _cli(*args, env=None):
    return CliRunner().invoke(main, ["--no-cache", *map(str, args)], env=env)


def _one_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("traceinsight: error: "), lines
    return lines[0]


def _fingerprints(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.iterdir()) if p.is_file()}


def _process(args, *, timeout=60, env=None, preexec_fn=None, driver: str | None = None):
    """The CLI in a real process (or ``driver`` code that patches it first, then runs it)."""
    code = (driver or "") + "\nfrom traceinsight.cli import main\nmain()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)


# -- an output path that is one of the inputs: refused before anything is read ----------------------


def _copy(source: Path, target: Path) -> Path:
    target.write_bytes(source.read_bytes())
    return target


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "relative", "in-folder"])
@pytest.mark.parametrize("command", ["analyze-json", "analyze-html", "merge", "explain", "diff-json", "diff-after"])
def test_an_output_that_is_an_input_is_refused(tmp_path, monkeypatch, command, how):
    folder = tmp_path / "traces"
    folder.mkdir()
    trace = _copy(RANK0, folder / "rank0.json.gz")
    other = _copy(RANK1, folder / "rank1.json.gz")
    monkeypatch.chdir(tmp_path)
    output = {"same": trace, "symlink": tmp_path / "link.json", "hardlink": tmp_path / "hard.json",
              "relative": Path("traces/../traces/rank0.json.gz"), "in-folder": trace}[how]
    if how == "symlink":
        output.symlink_to(trace)
    if how == "hardlink":
        os.link(trace, output)
    given = folder if how == "in-folder" else trace
    missing = tmp_path / "not-read-yet.json"  # would fail the run if anything were read first
    args = {
        "analyze-json": ["analyze", given, missing, "--json", output],
        # --html takes a value after a space only when it is named .html: the explicit form
        # hands it any path, a trace's too.
        "analyze-html": ["analyze", given, missing, f"--html={output}"],
        "merge": ["merge", given, missing, "-o", output],
        "explain": ["explain", given, missing, "--step", "3", "--json", output],
        "diff-json": ["diff", given, "--against", other, missing, "--json", output],
        "diff-after": ["diff", other, missing, "--against", given, "--json", output],
    }[command]
    before = _fingerprints(folder)
    line = _one_error(_cli(*args))
    option = {"analyze-html": "--html", "merge": "-o"}.get(command, "--json")
    if how == "in-folder":
        assert line == (f"traceinsight: error: {option} {output} is a file in the input folder {folder}; writing it "
                        "would destroy a trace; choose another output path")
    else:
        assert line == (f"traceinsight: error: {option} {output} is one of the input traces ({given}); writing it "
                        "would destroy the trace; choose another output path")
    assert _fingerprints(folder) == before


def test_two_outputs_that_are_one_file_are_refused(tmp_path):
    out = tmp_path / "report.html"
    assert _one_error(_cli("analyze", RANK0, "--json", out, "--html", out)) == (
        f"traceinsight: error: --json and --html name the same file ({out}); give each output its own path")


# -- SQLite: nothing in or beside the input changes; its SQL is never run ----------------------------


def test_a_wal_database_is_read_whole_and_left_untouched(tmp_path):
    folder = tmp_path / "traces"
    folder.mkdir()
    path = wal_database(SINGLE, folder / "trace.sqlite",
                        f"UPDATE StringIds SET value = 'ONLY_IN_THE_WAL' WHERE id = (SELECT shortName FROM {KERNEL} "
                        'GROUP BY shortName ORDER BY sum("end" - start) DESC LIMIT 1)')
    before = _fingerprints(folder)
    assert set(before) == {"trace.sqlite", "trace.sqlite-wal"}
    out = tmp_path / "out.json"
    result = _cli("analyze", path, "--json", out, "-q")
    assert result.exit_code == 0, result.stderr
    findings = json.loads(out.read_text())
    assert findings["top_kernels"][0]["name"] == "ONLY_IN_THE_WAL"  # the log's content was read
    assert any("read from a private copy" in w for w in findings["warnings"])
    assert _fingerprints(folder) == before  # no checkpoint, no -shm, nothing else beside it
    info = _cli("info", path)
    assert info.exit_code == 0 and _fingerprints(folder) == before


def test_a_plain_database_is_opened_without_creating_anything_beside_it(tmp_path):
    folder = tmp_path / "traces"
    folder.mkdir()
    path = _copy(SINGLE, folder / "trace.sqlite")
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode=WAL")  # a WAL-mode header, no log beside it
    connection.close()
    before = _fingerprints(folder)
    assert _cli("analyze", path, "-q").exit_code == 0
    assert _fingerprints(folder) == before


@pytest.mark.parametrize("command", ["analyze", "info"])
def test_an_endless_view_in_place_of_a_table_is_ignored_not_run(tmp_path, command):
    path = endless_view(SINGLE, tmp_path / "view.sqlite", KERNEL)
    started = time.perf_counter()
    result = _cli(command, path, *(["--json", tmp_path / "out.json", "-q"] if command == "analyze" else []))
    assert time.perf_counter() - started < 30
    assert result.exit_code == 0, result.stderr
    text = (tmp_path / "out.json").read_text() if command == "analyze" else result.output
    assert f"1 view(s) or virtual table(s) ignored ({KERNEL})" in text
    assert "only tables are read, the SQL of an untrusted file is not run" in " ".join(text.split())


def test_every_nsys_query_has_a_deadline(tmp_path, monkeypatch):
    from traceinsight.ingest import nsys

    monkeypatch.setattr(nsys.sqlite_export, "SQLITE_DEADLINE_S", 0.0)  # past as soon as a query runs a while
    monkeypatch.setattr(nsys.sqlite_export, "SQLITE_DEADLINE_S_PER_MIB", 0.0)
    assert _one_error(_cli("analyze", SINGLE)) == (
        f"traceinsight: error: {SINGLE}: reading the SQLite file did not finish within 0 s (a query "
        "over it does not end); it is damaged or built to hang; export it again (nsys export --type sqlite)")


def test_sigint_stops_a_query_that_never_ends():
    import threading

    from traceinsight.ingest.nsys import _interruptible

    connection = sqlite3.connect(":memory:")
    timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    started = time.perf_counter()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        with _interruptible(connection, ":memory:"):
            connection.execute("WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) "
                               "SELECT count(*) FROM r").fetchall()
    assert time.perf_counter() - started < 10
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_sigint_ends_a_real_process_stuck_in_sqlite(tmp_path):
    # The reader's table query is replaced by one that never ends (a view is no longer read):
    # Ctrl-C must still end the process, quietly.
    driver = ("from traceinsight.ingest import nsys\n"
              "nsys._Export.rows = lambda self, sql, parameters=(): self.connection.execute("
              "'WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) SELECT count(*) FROM r').fetchall()")
    code = driver + "\nfrom traceinsight.cli import main\nmain()"
    process = subprocess.Popen([sys.executable, "-c", code, "--no-cache", "analyze", str(SINGLE)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    assert process.poll() is None
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=20)
    assert process.returncode == 1 and "Traceback" not in stderr and stderr.strip() == "Aborted!", stderr


# -- inputs that are not regular files -------------------------------------------------------------


@pytest.mark.parametrize("command", ["analyze", "info", "merge"])
def test_a_fifo_is_refused_not_waited_on(tmp_path, command):
    fifo = tmp_path / "rank0.json"
    os.mkfifo(fifo)
    extra = ["-o", tmp_path / "m.json"] if command == "merge" else []
    started = time.perf_counter()
    run = _process(["--no-cache", command, fifo, *extra], timeout=60)
    assert time.perf_counter() - started < 60
    assert run.returncode == 2 and run.stderr == (
        f"traceinsight: error: {fifo}: is a FIFO (named pipe), not a trace file; reading it could block forever; "
        "save the trace to a file and pass that\n")


def test_a_device_is_refused_and_the_readers_refuse_it_too(tmp_path):
    from traceinsight.errors import TraceInputError
    from traceinsight.ingest.kineto import read_kineto
    from traceinsight.ingest.nsys import read_nsys

    assert _one_error(_cli("info", "/dev/zero")) == (
        "traceinsight: error: /dev/zero: is a character device, not a trace file; reading it could block forever; "
        "save the trace to a file and pass that")
    fifo = tmp_path / "trace.sqlite"
    os.mkfifo(fifo)
    for reader in (read_kineto, read_nsys):
        with pytest.raises(TraceInputError, match="is a FIFO"):
            reader(str(fifo))


# -- a full disk, SIGTERM: one line, and nothing half-written left ---------------------------------------


@pytest.mark.parametrize("command", ["analyze-json", "analyze-html", "merge", "explain", "diff"])
def test_no_space_left_while_writing_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, command):
    import traceinsight.report.output as output

    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            self.handle.write(data[: len(data) // 2])  # some bytes reach the disk, then it is full
            raise OSError(errno.ENOSPC, "No space left on device")  # no file name, as write(2) gives

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(output.os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k)))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    name = {"analyze-html": "r.html"}.get(command, "r.json")
    out = out_dir / name
    args = {
        "analyze-json": ["analyze", RANK0, "--json", out, "-q"],
        "analyze-html": ["analyze", RANK0, "--html", out, "-q"],
        "merge": ["merge", RANK0, RANK1, "-o", out],
        "explain": ["explain", RANK0, "--step", "3", "--json", out],
        "diff": ["diff", RANK0, "--against", RANK1, "--json", out, "-q"],
    }[command]
    assert _one_error(_cli(*args)) == f"traceinsight: error: {out}: No space left on device"
    assert os.listdir(out_dir) == []


def test_a_real_write_failure_is_one_line_and_leaves_nothing(tmp_path):
    # A real refusal of the kernel mid-write: the file size limit (EFBIG) of a process.
    import resource

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "merged.json"
    run = _process(["--no-cache", "merge", RANK0, RANK1, "-o", out], preexec_fn=small_files, timeout=120)
    assert run.returncode == 2 and run.stderr == f"traceinsight: error: {out}: File too large\n", run.stderr
    assert os.listdir(out_dir) == []


_SIGTERM_WHILE_WRITING = """
import os, signal
from traceinsight.report import output
real = output.os.fsync
def fsync(descriptor):
    os.kill(os.getpid(), signal.SIGTERM)  # while the temporary file is complete but not renamed
    real(descriptor)
output.os.fsync = fsync
"""

_SIGTERM_WHILE_CACHING = """
import os, signal, json
from traceinsight.ingest import cache
real = cache.json.dump
def dump(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)  # the entry is written, not yet renamed into place
cache.json.dump = dump
"""


@pytest.mark.parametrize("command", ["analyze", "merge", "cache"])
def test_sigterm_while_writing_leaves_no_temporary_file(tmp_path, command):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cache_dir = tmp_path / "cache"
    args = {
        "analyze": ["--no-cache", "analyze", RANK0, "--json", out_dir / "f.json", "--html", out_dir / "r.html", "-q"],
        "merge": ["--no-cache", "merge", RANK0, RANK1, "-o", out_dir / "m.json.gz"],
        "cache": ["--cache-dir", cache_dir, "analyze", RANK0, "--json", out_dir / "f.json", "-q"],
    }[command]
    driver = _SIGTERM_WHILE_CACHING if command == "cache" else _SIGTERM_WHILE_WRITING
    run = _process(args, driver=driver, timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr
    assert os.listdir(out_dir) == []
    if command == "cache":
        assert os.listdir(cache_dir) == []  # no staging folder, no entry
        again = _process(args, timeout=120)  # a later run reads the trace, stores, and trusts that
        assert again.returncode == 0, again.stderr
        assert len(os.listdir(cache_dir)) == 1 and not os.listdir(cache_dir)[0].startswith(".")


def test_a_half_written_cache_entry_is_never_trusted(tmp_path):
    from traceinsight.ingest import cache

    cache_dir = tmp_path / "cache"
    first = CliRunner().invoke(main, ["--cache-dir", str(cache_dir), "analyze", str(RANK0), "--json",
                                      str(tmp_path / "a.json"), "-q"])
    assert first.exit_code == 0, first.stderr
    (entry,) = cache_dir.iterdir()
    # The crash of a machine after the rename but before the data reached the disk: a file of
    # the entry holds other bytes (here those of another part) than meta.json says.
    (entry / "samples.parquet").write_bytes((entry / "ranks.parquet").read_bytes())
    assert cache.load_cached(str(RANK0), str(cache_dir)) is None
    assert not entry.exists()  # dropped
    second = CliRunner().invoke(main, ["--cache-dir", str(cache_dir), "analyze", str(RANK0), "--json",
                                       str(tmp_path / "b.json"), "-q"])
    assert second.exit_code == 0
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    # A staging folder left by a killed run is never read, and is removed once stale.
    stale = cache_dir / ".staging-killed"
    stale.mkdir()
    (stale / "meta.json").write_text("{")
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    cache.store(str(RANK1), cache.load_cached(str(RANK0), str(cache_dir)), str(cache_dir))
    assert not stale.exists()


# -- gzip bombs: give up early, from what the stream really inflates to --------------------------------


#: Prints the process's peak memory when it exits (``peak MiB N`` on stdout).
_REPORT_PEAK = """
import atexit, resource
atexit.register(lambda: print("peak MiB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024))
"""


def _peak_mib(run) -> int:
    return int(run.stdout.rsplit("peak MiB", 1)[1])


@pytest.mark.parametrize("kind", ["whitespace-10gib", "valid-member-then-bomb"])
def test_gzip_bombs_give_up_early(tmp_path, kind):
    path = (gzip_whitespace_bomb(tmp_path / "bomb.json.gz") if kind == "whitespace-10gib"
            else gzip_bomb_after_a_valid_member(RANK0, tmp_path / "bomb.json.gz"))
    assert path.stat().st_size < 12 * 2**20  # small on disk
    started = time.perf_counter()
    run = _process(["--no-cache", "analyze", path, "--json", tmp_path / "out.json"], timeout=120,
                   driver=_REPORT_PEAK)
    assert time.perf_counter() - started < 60
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith(f"traceinsight: error: {path}: decompresses to more than ")
    assert run.stderr.endswith("of gzip data (over 200 times; profiler traces compress 10-30 times): a gzip bomb, "
                               "not a trace; set TRACEINSIGHT_NO_MEMORY_CHECK=1 to try anyway\n")
    assert run.stderr.count("\n") == 1 and not (tmp_path / "out.json").exists()
    assert _peak_mib(run) < 1024  # it stopped after about 64-100 MiB of text


def test_a_merged_trace_that_is_a_gzip_bomb_gives_up_early(tmp_path):
    from mutate import gzip_bomb_member

    from traceinsight.errors import TraceTooLargeError
    from traceinsight.ingest import read_file

    head = b'{"traceinsight": {"format": "traceinsight-merged"}, "traceEvents": ['
    path = tmp_path / "merged.json.gz"
    path.write_bytes(gzip_bomb_member(head, 4 * 2**30, b"]}"))
    with pytest.raises(TraceTooLargeError, match="a gzip bomb"):
        read_file(str(path))


def test_whitespace_between_events_is_scanned_once(tmp_path):
    # With the checks off, 2 x 192 MiB of whitespace after an event's '}' (and then inside
    # the array) are read as a stream in linear time: each byte is searched for an event
    # boundary once (the search used to restart at the chunk's start on every 4 MiB read).
    from mutate import gzip_bomb_member

    event = b'{"ph": "X", "cat": "cpu_op", "name": "a", "pid": 1, "tid": 1, "ts": %d, "dur": 1}'
    data = (gzip_bomb_member(b'{"traceEvents": [' + event % 1, 192 * 2**20, b",", crc=True)
            + gzip_bomb_member(event % 5, 192 * 2**20, b"]}", crc=True))
    path = tmp_path / "spaces.json.gz"
    path.write_bytes(data)
    from traceinsight.ingest import kineto

    calls = []
    real = kineto.streaming._EVENT_END.search

    class Counting:
        def search(self, buffer, start=0):
            calls.append(len(buffer) - start)
            return real(buffer, start)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRACEINSIGHT_NO_MEMORY_CHECK", "1")
        patch.setattr(kineto.streaming, "_EVENT_END", Counting())
        model = kineto.read_kineto(str(path))
    assert model.intervals.height == 2
    assert sum(calls) < 1.1 * 384 * 2**20  # bytes searched: about each byte once


# -- forged lines: names with line breaks stay on their line -----------------------------------------------


def _no_forged_line(text: str) -> None:
    for line in text.splitlines():
        assert not line.lstrip(" │|").startswith("traceinsight: error: FORGED"), line
    assert FORGED not in text or "\ufffd" + FORGED in text or "\ufffd" in text


@pytest.mark.parametrize("command", ["analyze", "info", "merge", "explain"])
def test_names_with_line_breaks_cannot_forge_lines(tmp_path, command):
    path = forged_names(RANK0, tmp_path / "forged.json")
    args = {
        "analyze": ["analyze", path],
        "info": ["info", path],
        "merge": ["merge", path, "-o", tmp_path / "m.json"],
        "explain": ["explain", path, "--step", "3"],
    }[command]
    result = CliRunner().invoke(main, ["--no-cache", *map(str, args)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.stderr
    everything = result.output + result.stderr
    _no_forged_line(everything)
    assert "\ufffd" + FORGED[:30] in everything or command == "explain"
    if command in ("analyze", "merge"):  # the note naming the odd category, on one line
        assert "odd\ufffdtraceinsight: error: FORGED" in everything


# -- option values -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["merge", RANK0, "-o", "m.json", "--min-cpu-us", "nan"],
     "traceinsight: error: --min-cpu-us nan is not a finite number; give a number like 50"),
    (["diff", RANK0, "--against", RANK1, "--fail-if-slower", "nan"],
     "traceinsight: error: --fail-if-slower nan is not a finite number; give a number like 5 (percent)"),
    (["diff", RANK0, "--against", RANK1, "--fail-if-slower", "inf"],
     "traceinsight: error: --fail-if-slower inf is not a finite number; give a number like 5 (percent)"),
])
def test_numbers_that_are_not_finite_are_refused(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert _one_error(_cli(*args)) == message
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("ranks", "reason"), [
    ("0-20000000000", "'0-20000000000': rank 20,000,000,000 is beyond the largest rank number (2,147,483,647)"),
    ("0-1999999", "'0-1999999' names more than 1,000,000 ranks; list fewer"),
    ("0-600000,700000-1200000", "'0-600000,700000-1200000' names more than 1,000,000 ranks; list fewer"),
])
def test_rank_lists_that_cannot_be_held_are_refused_quickly(tmp_path, ranks, reason):
    started = time.perf_counter()
    result = _cli("merge", RANK0, "-o", tmp_path / "m.json", "--ranks", ranks)
    assert time.perf_counter() - started < 5
    assert result.exit_code == 2 and "Traceback" not in result.output + result.stderr
    assert "MemoryError" not in result.stderr
    assert reason in " ".join(result.stderr.split())
    assert os.listdir(tmp_path) == []


def test_a_wal_database_that_cannot_be_copied_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import tempfile

    from traceinsight.ingest import nsys

    path = wal_database(SINGLE, tmp_path / "trace.sqlite", f"UPDATE {KERNEL} SET start = start + 1")
    private = tmp_path / "private"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))

    def full(source, target, length=0):
        target.write(source.read(1000))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nsys.shutil, "copyfileobj", full)
    line = _one_error(_cli("analyze", path))
    assert line.startswith(f"traceinsight: error: {path}: has a wal file beside it, so it is read from a private "
                           f"copy, and copying it to {private}/traceinsight-sqlite-")
    assert line.endswith(" failed (No space left on device); free space there (or set TMPDIR), or let the "
                         "program that writes the database finish")
    assert os.listdir(private) == []  # the partial copy is gone
