"""Side-by-side benchmark: traceinsight against the physical floor and against peers.

Every case runs as its own process, one after the other, in the same invocation (this machine
is noisy: compare ratios from one run, not figures from different runs). Wall time and the
peak resident memory of that process alone (``os.wait4``) are recorded.

Cases, per input:

- **floor** (Kineto): gzip decompression + ``orjson.loads`` of the same bytes, nothing else.
- **floor** (nsys): a plain ``sqlite3`` scan of the kernel, runtime, NVTX, OS-runtime and
  sampling tables (every row fetched).
- **hta**: Holistic Trace Analysis parsing the trace (``TraceAnalysis``), when installed.
- **info**, **analyze**: ``traceinsight info --json`` and ``traceinsight analyze --json``.

``--growth`` also measures the floor and ``analyze`` on the trace repeated 1x, 2x and 4x
(copies shifted in time, step numbers and correlation ids renumbered, written as compact
JSON) to show time and memory grow linearly. An input may be a folder of rank files.

Usage::

    pip install '.[bench]'
    python bench/run.py ../shared/traces/device/h200_single_torch/trace.json.gz --growth
    python bench/run.py ../shared/traces/device/h200_2rank_torch      # a folder: every rank
    python bench/run.py ../shared/traces/device/h200_single_nsys/trace.sqlite --markdown bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

FLOOR_KINETO = """
import gzip, sys, orjson
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\\x1f\\x8b":
        data = gzip.decompress(data)
    obj = orjson.loads(data)
    print(len(obj["traceEvents"]) if isinstance(obj, dict) else len(obj))
    del data, obj
"""

FLOOR_NSYS = """
import sqlite3, sys
db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
rows = 0
for t in ("CUPTI_ACTIVITY_KIND_KERNEL", "CUPTI_ACTIVITY_KIND_RUNTIME", "NVTX_EVENTS", "OSRT_API",
          "COMPOSITE_EVENTS", "SAMPLING_CALLCHAINS", "StringIds"):
    if t in tables:
        rows += len(db.execute(f"SELECT * FROM {t}").fetchall())
print(rows)
"""

HTA = """
import os, shutil, sys, tempfile
from hta.trace_analysis import TraceAnalysis
folder = tempfile.mkdtemp()
for rank, path in enumerate(sys.argv[1:]):
    shutil.copy(path, os.path.join(folder, f"rank-{rank}.json.gz" if path.endswith(".gz") else f"rank-{rank}.json"))
analyzer = TraceAnalysis(trace_dir=folder)
print(sum(len(analyzer.t.get_trace(rank)) for rank in analyzer.t.get_ranks()))
"""


@dataclass
class Result:
    case: str
    seconds: float
    peak_mb: float
    ok: bool
    note: str = ""


def run_case(case: str, argv: list[str], *, timeout: float = 1800) -> Result:
    """Run ``argv`` as a child process; wall time and its own peak RSS."""
    start = time.perf_counter()
    with open(os.devnull, "wb") as devnull:
        proc = subprocess.Popen(argv, stdout=devnull, stderr=subprocess.PIPE)
    deadline = start + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.01)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read().decode(errors="replace").strip().splitlines() if proc.stderr else []
    ok = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    # ru_maxrss is in KiB on Linux.
    return Result(case, seconds, usage.ru_maxrss / 1024, ok, "" if ok else (stderr[-1] if stderr else "failed"))


def trace_files(path: str) -> list[str]:
    """The trace files of an input: the file itself, or a folder's ``*.json[.gz]`` files."""
    if os.path.isdir(path):
        return sorted(os.path.join(path, name) for name in os.listdir(path)
                      if name.endswith((".json", ".json.gz")) and not name.startswith("truth"))
    return [path]


def is_sqlite(path: str) -> bool:
    if os.path.isdir(path):
        return False
    with open(path, "rb") as handle:
        return handle.read(16).startswith(b"SQLite format 3")


def json_mib(path: str) -> float | None:
    """Decompressed size of a Kineto input's JSON (all its files), in MiB; None for nsys."""
    if is_sqlite(path):
        return None
    total = 0
    for name in trace_files(path):
        with open(name, "rb") as handle:
            if handle.read(2) != b"\x1f\x8b":
                total += os.path.getsize(name)
                continue
        with gzip.open(name, "rb") as handle:
            while block := handle.read(1 << 24):
                total += len(block)
    return total / 2**20


def hta_available(python: str) -> bool:
    probe = subprocess.run([python, "-c", "import hta.trace_analysis"], capture_output=True)
    return probe.returncode == 0


def cases_for(path: str, out_dir: str, *, with_hta: bool, hta_python: str = sys.executable,
              nsys_ai: str | None = None) -> list[tuple[str, list[str]]]:
    python = sys.executable
    # --no-cache: measure parsing, not the cache; the cached case is measured on its own below.
    traceinsight = [python, "-m", "traceinsight.cli", "--no-cache"]
    cases: list[tuple[str, list[str]]] = []
    if is_sqlite(path):
        cases.append(("floor: sqlite3 scan", [python, "-c", FLOOR_NSYS, path]))
        if nsys_ai:
            # nsys-ai writes indexes into the profile it reads: give it a private copy.
            copy = os.path.join(out_dir, "nsys-ai-copy.sqlite")
            shutil.copy(path, copy)
            cases.append(("nsys-ai analyze --format json", [nsys_ai, "analyze", "--format", "json", copy]))
    else:
        cases.append(("floor: gunzip + orjson.loads", [python, "-c", FLOOR_KINETO, *trace_files(path)]))
        if with_hta:
            cases.append(("HTA TraceAnalysis parse", [hta_python, "-c", HTA, *trace_files(path)]))
    cases.append(("traceinsight info --json", [*traceinsight, "info", "--json", path]))
    cases.append(("traceinsight analyze --json", [*traceinsight, "analyze", path, "--quiet",
                                                  "--json", os.path.join(out_dir, "findings.json")]))
    cached = [python, "-m", "traceinsight.cli", "--cache-dir", os.path.join(out_dir, "cache"), "analyze", path,
              "--quiet", "--json", os.path.join(out_dir, "findings.json")]
    cases.append(("(fill the cache)", cached))
    cases.append(("traceinsight analyze, cached", cached))
    return cases


def repeat_trace(path: str, copies: int, out_path: str) -> None:
    """Write ``path`` repeated ``copies`` times back to back (Kineto JSON)."""
    import orjson

    with open(path, "rb") as handle:
        data = handle.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    trace = orjson.loads(data)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    timed = [e for e in events if isinstance(e.get("ts"), (int, float)) and e.get("ph") != "M"]
    span = max(e["ts"] + float(e.get("dur", 0) or 0) for e in timed) - min(e["ts"] for e in timed)
    steps = [int(e["name"].split("#")[1]) for e in events
             if str(e.get("name", "")).startswith("ProfilerStep#")]
    step_span = (max(steps) - min(steps) + 1) if steps else 0
    out = list(events)
    for copy in range(1, copies):
        shift = copy * (span + 1000.0)
        id_shift = copy * 10_000_000
        for event in timed:
            clone = dict(event)
            clone["ts"] = event["ts"] + shift
            name = str(clone.get("name", ""))
            if name.startswith("ProfilerStep#"):
                clone["name"] = f"ProfilerStep#{int(name.split('#')[1]) + copy * step_span}"
            args = clone.get("args")
            if isinstance(args, dict):
                args = dict(args)
                for key in ("correlation", "External id", "external id"):
                    if isinstance(args.get(key), int):
                        args[key] += id_shift
                clone["args"] = args
            if clone.get("ph") in ("s", "f") and isinstance(clone.get("id"), int):
                clone["id"] += id_shift
            out.append(clone)
    if isinstance(trace, dict):
        trace["traceEvents"] = out
    else:
        trace = out
    with gzip.open(out_path, "wb", compresslevel=1) as handle:
        handle.write(orjson.dumps(trace))


def markdown(rows: list[tuple[str, Result]], ratios: list[str]) -> str:
    lines = ["| input | case | wall s | peak RSS MiB | ok |", "|---|---|---:|---:|---|"]
    for name, result in rows:
        lines.append(f"| {name} | {result.case} | {result.seconds:.2f} | {result.peak_mb:,.0f} | "
                     f"{'yes' if result.ok else 'no: ' + result.note} |")
    return "\n".join(lines + [""] + [f"- {r}" for r in ratios]) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("traces", nargs="+")
    parser.add_argument("--growth", action="store_true", help="also run analyze on 1x, 2x, 4x copies (Kineto)")
    parser.add_argument("--no-hta", action="store_true", help="skip Holistic Trace Analysis even if installed")
    parser.add_argument("--hta-python", default=sys.executable,
                        help="python that has HolisticTraceAnalysis installed (e.g. of its own venv)")
    parser.add_argument("--nsys-ai", metavar="EXE", help="nsys-ai executable to compare with on nsys inputs")
    parser.add_argument("--markdown", metavar="FILE", help="append the results table to FILE")
    args = parser.parse_args()
    with_hta = not args.no_hta and hta_available(args.hta_python)
    out_dir = tempfile.mkdtemp(prefix="traceinsight-bench-")
    rows: list[tuple[str, Result]] = []
    ratios: list[str] = []
    try:
        for path in args.traces:
            name = os.path.relpath(path)
            size_mb = sum(os.path.getsize(f) for f in trace_files(path)) / 2**20
            json_size = json_mib(path)
            holding = f", {json_size:,.0f} MiB of JSON" if json_size else ""
            print(f"== {name} ({size_mb:.1f} MiB on disk{holding})", flush=True)
            results = {}
            for case, argv in cases_for(path, out_dir, with_hta=with_hta, hta_python=args.hta_python,
                                        nsys_ai=args.nsys_ai):
                result = run_case(case, argv)
                results[case.split(":")[0].split(" ")[0] if case.startswith("floor") else case] = result
                rows.append((name, result))
                print(f"  {case:32s} {result.seconds:8.2f} s {result.peak_mb:9,.0f} MiB"
                      f"{'' if result.ok else '  FAILED: ' + result.note}", flush=True)
            floor = results.get("floor")
            analyze = results.get("traceinsight analyze --json")
            if floor and analyze and floor.seconds > 0:
                ratios.append(f"{name}: analyze / floor = {analyze.seconds / floor.seconds:.2f}x time, "
                              f"{analyze.peak_mb / max(floor.peak_mb, 1):.2f}x memory")
            if json_size and analyze:
                ratios.append(f"{name}: analyze peak RSS / JSON size = {analyze.peak_mb:,.0f} / {json_size:,.0f} MiB "
                              f"= {analyze.peak_mb / json_size:.2f}")
            peer = next((r for c, r in results.items() if c.startswith("nsys-ai")), None)
            if peer and analyze and peer.ok:
                ratios.append(f"{name}: nsys-ai / traceinsight analyze = {peer.seconds / analyze.seconds:.1f}x time")
            hta = results.get("HTA TraceAnalysis parse")
            if hta and analyze and hta.ok:
                ratios.append(f"{name}: HTA parse / traceinsight analyze = {hta.seconds / analyze.seconds:.1f}x time")
            if args.growth and not is_sqlite(path) and not os.path.isdir(path):
                for copies in (1, 2, 4):
                    grown = os.path.join(out_dir, f"x{copies}.json.gz")
                    # Build the copy in its own process: a child's peak RSS counts the memory
                    # its parent held when it forked, so the parent must stay small.
                    subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                                    "from run import repeat_trace; repeat_trace(sys.argv[2], int(sys.argv[3]), sys.argv[4])",
                                    os.path.dirname(os.path.abspath(__file__)), path, str(copies), grown], check=True)
                    grown_json = json_mib(grown)
                    floor = run_case(f"floor {copies}x", [sys.executable, "-c", FLOOR_KINETO, grown])
                    rows.append((name, floor))
                    print(f"  {floor.case:32s} {floor.seconds:8.2f} s {floor.peak_mb:9,.0f} MiB", flush=True)
                    result = run_case(f"analyze {copies}x ({grown_json:,.0f} MiB of JSON)",
                                      [sys.executable, "-m", "traceinsight.cli", "--no-cache", "analyze",
                                       grown, "--quiet", "--json", os.path.join(out_dir, "g.json")])
                    rows.append((name, result))
                    print(f"  {result.case:32s} {result.seconds:8.2f} s {result.peak_mb:9,.0f} MiB "
                          f"({result.peak_mb / grown_json:.2f}x the JSON)", flush=True)
                    ratios.append(f"{name} {copies}x: analyze / floor = {result.seconds / floor.seconds:.2f}x time; "
                                  f"peak RSS / JSON size = {result.peak_mb / grown_json:.2f}")
                    os.unlink(grown)
        for line in ratios:
            print(line)
        if args.markdown:
            with open(args.markdown, "a", encoding="utf-8") as handle:
                handle.write(markdown(rows, ratios))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return 0 if all(r.ok for _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
