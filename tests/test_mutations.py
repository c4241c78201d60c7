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
    flip_bytes,
    kineto_json,
    overwrite_page,
    run_cli_case,
    sqlite_edit,
    sqlite_tables,
    truncate,
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
