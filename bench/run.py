"""Side-by-side benchmark: traceinsight against the physical floor and against peers.

Every case runs as its own process, one after the other, in the same invocation (this machine
is noisy: compare ratios from one run, not figures from different runs). Wall time and the
peak resident memory of that process alone (``os.wait4``) are recorded; with ``--repeat N``
the cases run N times interleaved and the median time (and the largest peak) is reported.

Cases, per input:

- **floor** (Kineto): gzip decompression + ``orjson.loads`` of the same bytes, nothing else.
- **floor** (nsys): a plain ``sqlite3`` ``fetchall`` of every table traceinsight reads
  (kernels, copies, memsets, syncs, runtime, NVTX, OS runtime and its callchains, CPU samples
  and their callchains, strings), one table at a time, each dropped before the next.
- **fetch, rows kept** (nsys): the same fetch keeping every table's rows, as anything that
  analyzes them must hold them; its peak memory is the second yardstick for ``analyze``'s.
- **hta**: Holistic Trace Analysis parsing the trace (``TraceAnalysis``), when installed.
- **nsys-ai** (nsys, ``--nsys-ai EXE``): ``nsys-ai analyze --format json`` as users run it,
  on a private copy of the file: *cold* (first run: it builds its Parquet cache beside the
  copy) and *warm* (the same copy again, cache present); ``--nsys-ai-direct`` adds its
  no-cache mode (``NSYS_AI_CACHE_MODE=direct``, another fresh copy). nsys-ai reads the file
  through DuckDB's sqlite extension, which DuckDB downloads at run time; offline it is
  found from the ``duckdb-ext-sqlite`` package in nsys-ai's environment (a private HOME whose
  ``.duckdb/extensions`` points at it). Without it nsys-ai falls back to plain sqlite3 and
  says so on stderr; the table then marks its rows ``(no DuckDB)``.
- **info**, **analyze**: ``traceinsight info --json`` and ``traceinsight analyze --json``
  (``--no-cache``); ``analyze`` as a user's first run does it, with the default caches
  (an empty cache folder before each run: the model and the findings are written, and the
  findings keep the HTML report's timelines); and ``analyze`` again with a warm cache of the
  parsed model.

The findings nsys-ai and ``analyze`` write are removed before each run and compared after:
the same command on the same file writes the same bytes, so a run that wrote other findings
(or none) did other work, and a time from it is not comparable. A case whose runs differ
gets a NOTE, and nsys-ai cold against warm, or ``analyze`` without a cache against its first
run with the caches on or its run with the model cached, a WARNING among the ratios. nsys-ai needs it: on the emit_nvtx flood its findings
change from one fresh copy of the file to the next (37, 32, 17 or 6 findings, or an error
that the profile has no kernels), and a warm run over a cache that lacks tables is fast
because it skips analyses (2.97 s once, against 8.4-11.3 s).

Every case runs with compiled bytecode, as an installed package does: a machine that sets
``PYTHONDONTWRITEBYTECODE`` would otherwise compile traceinsight's sources in every run
(0.1-0.2 s, most of what a second question costs beyond the imports). traceinsight's package
is compiled in place (``__pycache__``, which Python reads whatever that variable says) once
before the first case; nothing else in the environment changes, so the peers and the
libraries keep the bytecode they were installed with.

``--growth`` also measures the floor and ``analyze`` on the trace repeated 1x, 2x and 4x
(copies shifted in time, step numbers and correlation ids renumbered, written as compact
JSON) to show time and memory grow linearly. An input may be a folder of rank files.

``--nvtx-flood EXPORT`` adds the emit_nvtx case: a copy of the nsys export with some 400k
distinct-named NVTX ranges around its CUDA calls (``bench/make_nvtx_flood.py``, written to
the temporary folder and removed afterwards), measured like an nsys input; with ``--growth``
at 1x, 2x and 4x the ranges (the 2x and 4x copies: the floor and ``analyze`` only). The ratio
reported is ``analyze`` to the bare fetch.

Usage::

    pip install '.[bench]'
    python bench/run.py ../shared/traces/device/h200_single_torch/trace.json.gz --growth
    python bench/run.py ../shared/traces/device/h200_2rank_torch      # a folder: every rank
    python bench/run.py ../shared/traces/device/h200_single_nsys/trace.sqlite --markdown bench/RESULTS.md
    python bench/run.py --nvtx-flood ../shared/traces/device/h200_single_nsys/trace.sqlite --growth \\
        --nsys-ai /tmp/nsysaivenv/bin/nsys-ai --repeat 3
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
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
keep = sys.argv[2:] == ["keep"]
tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
rows, kept = 0, []
for t in ("CUPTI_ACTIVITY_KIND_KERNEL", "CUPTI_ACTIVITY_KIND_MEMCPY", "CUPTI_ACTIVITY_KIND_MEMSET",
          "CUPTI_ACTIVITY_KIND_SYNCHRONIZATION", "CUPTI_ACTIVITY_KIND_RUNTIME", "NVTX_EVENTS", "OSRT_API",
          "OSRT_CALLCHAINS", "COMPOSITE_EVENTS", "SAMPLING_CALLCHAINS", "StringIds"):
    if t in tables:
        fetched = db.execute(f"SELECT * FROM {t}").fetchall()
        rows += len(fetched)
        if keep:
            kept.append(fetched)
        del fetched
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
    #: digest of the output file the case names (its first run's), ``""`` where none
    output: str = ""


def run_case(case: str, argv: list[str], *, timeout: float = 1800, env: dict | None = None) -> Result:
    """Run ``argv`` as a child process; wall time and its own peak RSS."""
    # stderr to a file, not a pipe: a chatty child would block on a full pipe.
    with tempfile.TemporaryFile() as errors, open(os.devnull, "wb") as devnull:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=devnull, stderr=errors, env=env)
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
        errors.seek(0)
        stderr = errors.read().decode(errors="replace").strip().splitlines()
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


@dataclass
class Case:
    """One measured command; ``setup`` runs (unmeasured) before every run of it. ``output``,
    a file the command writes, is removed before every run and its content compared across
    the runs: a run much faster than the others that wrote other findings (or none) did
    other work, and the report says so."""

    name: str
    argv: list[str]
    setup: object = None
    env: dict | None = None
    output: str | None = None


def nsys_ai_home(nsys_ai: str, out_dir: str) -> str | None:
    """A private HOME whose DuckDB extension folder is the ``duckdb-ext-sqlite`` package's
    in nsys-ai's environment (DuckDB would download its sqlite extension otherwise)."""
    python = os.path.join(os.path.dirname(os.path.abspath(nsys_ai)), "python")
    probe = subprocess.run(
        [python, "-c", "import importlib.util, os; spec = importlib.util.find_spec('duckdb_ext'); "
         "print(os.path.join(list(spec.submodule_search_locations)[0], 'extensions') if spec else '')"],
        capture_output=True, text=True)
    extensions = probe.stdout.strip() if probe.returncode == 0 else ""
    if not extensions or not os.path.isdir(extensions):
        return None
    home = os.path.join(out_dir, "nsys-ai-home")
    os.makedirs(os.path.join(home, ".duckdb"), exist_ok=True)
    link = os.path.join(home, ".duckdb", "extensions")
    if not os.path.lexists(link):
        os.symlink(extensions, link)
    return home


def nsys_ai_cases(path: str, out_dir: str, nsys_ai: str, *, direct: bool) -> list[Case]:
    """nsys-ai as users run it: on a private copy (it writes its cache beside the file),
    cold (no cache yet), then warm (the same copy again); optionally its no-cache mode."""
    home = nsys_ai_home(nsys_ai, out_dir)
    env = {**os.environ, "HOME": home} if home else None
    label = "" if home else " (no DuckDB)"
    folder = os.path.join(out_dir, "nsys-ai")
    copy = os.path.join(folder, "profile.sqlite")

    def fresh_copy() -> None:
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        shutil.copyfile(path, copy)

    output = os.path.join(out_dir, "nsys-ai.json")
    command = [nsys_ai, "analyze", "--format", "json", "-o", output, copy]
    cases = [Case(f"nsys-ai analyze, cold cache{label}", command, fresh_copy, env, output),
             Case(f"nsys-ai analyze, warm cache{label}", command, None, env, output)]
    if direct:
        cases.append(Case(f"nsys-ai analyze, direct (no cache){label}", command, fresh_copy,
                          {**(env or os.environ), "NSYS_AI_CACHE_MODE": "direct"}, output))
    return cases


def cases_for(path: str, out_dir: str, *, with_hta: bool, hta_python: str = sys.executable,
              nsys_ai: str | None = None, nsys_ai_direct: bool = False,
              with_info: bool = True, growth_only: bool = False) -> list[Case]:
    python = sys.executable
    # --no-cache: measure parsing, not the cache; the cached case is measured on its own below.
    traceinsight = [python, "-m", "traceinsight.cli", "--no-cache"]
    cases: list[Case] = []
    if is_sqlite(path):
        cases.append(Case("floor: sqlite3 fetch", [python, "-c", FLOOR_NSYS, path]))
        # The same rows all held at once, as an analysis of them must hold them.
        cases.append(Case("fetch, rows kept: sqlite3 fetch", [python, "-c", FLOOR_NSYS, path, "keep"]))
        if nsys_ai and not growth_only:
            cases += nsys_ai_cases(path, out_dir, nsys_ai, direct=nsys_ai_direct)
    else:
        cases.append(Case("floor: gunzip + orjson.loads", [python, "-c", FLOOR_KINETO, *trace_files(path)]))
        if with_hta:
            cases.append(Case("HTA TraceAnalysis parse", [hta_python, "-c", HTA, *trace_files(path)]))
    if with_info:
        cases.append(Case("traceinsight info --json", [*traceinsight, "info", "--json", path]))
    findings_json = os.path.join(out_dir, "findings.json")
    cases.append(Case("traceinsight analyze --json", [*traceinsight, "analyze", path, "--quiet",
                                                      "--json", findings_json], output=findings_json))
    if growth_only:  # the larger copies of a growth series: the floor and analyze suffice
        return cases
    # A user's first run: the caches on (the default), empty before each run.
    first_cache = os.path.join(out_dir, "first-run-cache")
    cases.append(Case("traceinsight analyze, first run (caches on)",
                      [python, "-m", "traceinsight.cli", "--cache-dir", first_cache, "analyze", path,
                       "--quiet", "--json", findings_json],
                      lambda: shutil.rmtree(first_cache, ignore_errors=True), output=findings_json))
    cache = os.path.join(out_dir, "cache")
    cached = [python, "-m", "traceinsight.cli", "--cache-dir", cache, "analyze", path,
              "--quiet", "--json", findings_json]
    # The parsed model is cached; the findings cache (if any) is emptied before each run, so
    # this case measures the analysis itself.
    cases.append(Case("traceinsight analyze, cached model", cached,
                      lambda: _fill_cache(cached, cache), output=findings_json))
    # A second question after that analyze: answered from the findings it cached. Its
    # floor on this machine: starting Python and importing the libraries every answer needs
    # (then leaving at once, as the command does: see traceinsight.cli.run).
    cases.append(Case("second-question floor: python + import polars, numpy",
                      [python, "-c", "import os, polars, numpy; os._exit(0)"]))
    explain = [python, "-m", "traceinsight.cli", "--cache-dir", cache, "explain", path, "--step", "0",
               "--json", os.path.join(out_dir, "explain.json")]
    cases.append(Case("then explain --step N (cached findings)", explain,
                      lambda: explain.__setitem__(explain.index("--step") + 1, _some_step(findings_json))))
    cases.append(Case("then analyze --html (cached findings)",
                      [python, "-m", "traceinsight.cli", "--cache-dir", cache, "analyze", path, "--quiet",
                       "--html", os.path.join(out_dir, "report.html")]))
    cases.append(Case("then diff (cached findings)",
                      [python, "-m", "traceinsight.cli", "--cache-dir", cache, "diff", path, "--against", path,
                       "--quiet", "--json", os.path.join(out_dir, "diff.json")]))
    return cases


def _some_step(findings_json: str) -> str:
    """The slowest step of the findings (a step ``explain`` will accept)."""
    import json

    with open(findings_json, encoding="utf-8") as handle:
        steps = json.load(handle).get("steps") or [{}]
    return str(max(steps, key=lambda s: s.get("duration_ms", 0)).get("step", 0))


def _fill_cache(argv: list[str], cache: str) -> None:
    """Make sure the model cache holds the input, and no findings are cached."""
    if not os.path.isdir(cache) or not any(not n.startswith(".") for n in os.listdir(cache)):
        # The first run parses and caches the model (and its findings, removed below).
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for root, folders, _ in os.walk(cache):
        for folder in folders:
            if folder.startswith("findings-"):
                shutil.rmtree(os.path.join(root, folder), ignore_errors=True)


def measure(cases: list[Case], repeat: int) -> list[Result]:
    """Run the cases ``repeat`` times, interleaved; median time and largest peak per case."""
    runs: dict[str, list[Result]] = {case.name: [] for case in cases}
    outputs: dict[str, list[str]] = {case.name: [] for case in cases}
    for _ in range(repeat):
        for case in cases:
            if callable(case.setup):
                case.setup()
            if case.output and os.path.exists(case.output):
                os.remove(case.output)
            result = run_case(case.name, case.argv, env=case.env)
            runs[case.name].append(result)
            if case.output:
                outputs[case.name].append(_digest(case.output))
    out = []
    for case in cases:
        results = sorted(runs[case.name], key=lambda r: r.seconds)
        middle = results[len(results) // 2]
        note = next((r.note for r in results if not r.ok), "")
        if len(set(outputs[case.name])) > 1:
            written = ", ".join(f"{r.seconds:.2f} s: {d}" for r, d in zip(runs[case.name], outputs[case.name]))
            note = (note + "; " if note else "") + f"its runs wrote different outputs ({written})"
        out.append(Result(case.name, middle.seconds, max(r.peak_mb for r in results),
                          all(r.ok for r in results), note, outputs[case.name][0] if outputs[case.name] else ""))
    return out


def _digest(path: str) -> str:
    """The first 12 hex digits of the SHA-256 of ``path``'s content and its size, or
    ``missing``."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError:
        return "missing"
    return f"{hashlib.sha256(data).hexdigest()[:12]} ({len(data):,} B)"


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
        status = ("yes" + (f" ({result.note})" if result.note else "")) if result.ok else "no: " + result.note
        lines.append(f"| {name} | {result.case} | {result.seconds:.2f} | {result.peak_mb:,.0f} | {status} |")
    return "\n".join(lines + [""] + [f"- {r}" for r in ratios]) + "\n"


def report(name: str, results: list[Result], rows: list, ratios: list[str], *, json_size: float | None) -> None:
    """Print and record one input's results and its ratios."""
    by_case = {}
    for result in results:
        rows.append((name, result))
        by_case[result.case.split(":")[0] if result.case.startswith(("floor", "fetch")) else result.case] = result
        print(f"  {result.case:44s} {result.seconds:8.2f} s {result.peak_mb:9,.0f} MiB"
              f"{'' if result.ok else '  FAILED: ' + result.note}", flush=True)
        if result.ok and result.note:
            print(f"    NOTE: {result.note}", flush=True)
    floor = by_case.get("floor")
    analyze = by_case.get("traceinsight analyze --json")
    cached = by_case.get("traceinsight analyze, cached model")
    if floor and analyze and floor.seconds > 0:
        ratios.append(f"{name}: analyze / floor = {analyze.seconds / floor.seconds:.2f}x time, "
                      f"{analyze.peak_mb / max(floor.peak_mb, 1):.2f}x memory"
                      + (f"; with the model cached {cached.seconds / floor.seconds:.2f}x time" if cached else ""))
    first = by_case.get("traceinsight analyze, first run (caches on)")
    if floor and first and floor.seconds > 0:
        ratios.append(f"{name}: analyze's first run with the caches on (the default) / floor = "
                      f"{first.seconds / floor.seconds:.2f}x time, {first.peak_mb / max(floor.peak_mb, 1):.2f}x memory")
    kept = by_case.get("fetch, rows kept")
    if kept and analyze:
        ratios.append(f"{name}: analyze / the fetch holding every table's rows at once = "
                      f"{analyze.peak_mb / max(kept.peak_mb, 1):.2f}x memory"
                      + (f" (first run with the caches on: {first.peak_mb / max(kept.peak_mb, 1):.2f}x)" if first else ""))
    if json_size and analyze:
        ratios.append(f"{name}: analyze peak RSS / JSON size = {analyze.peak_mb:,.0f} / {json_size:,.0f} MiB "
                      f"= {analyze.peak_mb / json_size:.2f}")
    for case, result in by_case.items():
        if case.startswith("nsys-ai") and analyze and result.ok:
            ratios.append(f"{name}: {case} / traceinsight analyze = {result.seconds / analyze.seconds:.2f}x time")
    # The same command on the same file writes the same findings: one that did not (a cold
    # and a warm run apart, or the analysis without a cache against the first run with the
    # caches on or the run with the model cached) did other work.
    for one_case, other_case in (("nsys-ai analyze, cold cache", "nsys-ai analyze, warm cache"),
                                 ("traceinsight analyze --json", "traceinsight analyze, cached model"),
                                 ("traceinsight analyze --json", "traceinsight analyze, first run (caches on)")):
        one, other = by_case.get(one_case), by_case.get(other_case)
        if one and other and one.output and other.output and one.output != other.output:
            ratios.append(f"{name}: WARNING: {one_case} and {other_case} wrote different outputs "
                          f"({one.output} and {other.output})")
    start = by_case.get("second-question floor: python + import polars, numpy")
    for case, result in by_case.items():
        if case.startswith("then ") and start and result.ok:
            ratios.append(f"{name}: {case}: {result.seconds:.2f} s, {result.seconds - start.seconds:.2f} s beyond "
                          f"starting Python and importing polars and numpy ({start.seconds:.2f} s)")
    hta = by_case.get("HTA TraceAnalysis parse")
    if hta and analyze and hta.ok:
        ratios.append(f"{name}: HTA parse / traceinsight analyze = {hta.seconds / analyze.seconds:.1f}x time")


def compile_traceinsight() -> None:
    """Compile traceinsight's package in place, as installing it would: every case then
    reads its bytecode (only writing bytecode is what ``PYTHONDONTWRITEBYTECODE`` stops)."""
    import importlib.util

    # Found, not imported: the children's peak memory would count the parent's polars.
    package = importlib.util.find_spec("traceinsight").submodule_search_locations[0]
    subprocess.run([sys.executable, "-m", "compileall", "-q", package], check=True, stdout=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("traces", nargs="*")
    parser.add_argument("--growth", action="store_true",
                        help="also run analyze on 1x, 2x, 4x copies (Kineto) or 1x, 2x, 4x ranges (--nvtx-flood)")
    parser.add_argument("--no-hta", action="store_true", help="skip Holistic Trace Analysis even if installed")
    parser.add_argument("--hta-python", default=sys.executable,
                        help="python that has HolisticTraceAnalysis installed (e.g. of its own venv)")
    parser.add_argument("--nsys-ai", metavar="EXE", help="nsys-ai executable to compare with on nsys inputs")
    parser.add_argument("--nsys-ai-direct", action="store_true", help="also run nsys-ai's no-cache direct mode")
    parser.add_argument("--nvtx-flood", metavar="EXPORT",
                        help="add the emit_nvtx case made from this nsys export (bench/make_nvtx_flood.py)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each case, interleaved (median reported)")
    parser.add_argument("--markdown", metavar="FILE", help="append the results table to FILE")
    args = parser.parse_args()
    if not args.traces and not args.nvtx_flood:
        parser.error("give trace paths, --nvtx-flood EXPORT, or both")
    with_hta = not args.no_hta and hta_available(args.hta_python)
    out_dir = tempfile.mkdtemp(prefix="traceinsight-bench-")
    compile_traceinsight()
    rows: list[tuple[str, Result]] = []
    ratios: list[str] = []
    options = dict(with_hta=with_hta, hta_python=args.hta_python, nsys_ai=args.nsys_ai,
                   nsys_ai_direct=args.nsys_ai_direct)
    try:
        for path in args.traces:
            name = os.path.relpath(path)
            size_mb = sum(os.path.getsize(f) for f in trace_files(path)) / 2**20
            json_size = json_mib(path)
            holding = f", {json_size:,.0f} MiB of JSON" if json_size else ""
            print(f"== {name} ({size_mb:.1f} MiB on disk{holding})", flush=True)
            case_dir = tempfile.mkdtemp(dir=out_dir)
            report(name, measure(cases_for(path, case_dir, **options), args.repeat), rows, ratios,
                   json_size=json_size)
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
                    print(f"  {floor.case:44s} {floor.seconds:8.2f} s {floor.peak_mb:9,.0f} MiB", flush=True)
                    result = run_case(f"analyze {copies}x ({grown_json:,.0f} MiB of JSON)",
                                      [sys.executable, "-m", "traceinsight.cli", "--no-cache", "analyze",
                                       grown, "--quiet", "--json", os.path.join(out_dir, "g.json")])
                    rows.append((name, result))
                    print(f"  {result.case:44s} {result.seconds:8.2f} s {result.peak_mb:9,.0f} MiB "
                          f"({result.peak_mb / grown_json:.2f}x the JSON)", flush=True)
                    ratios.append(f"{name} {copies}x: analyze / floor = {result.seconds / floor.seconds:.2f}x time; "
                                  f"peak RSS / JSON size = {result.peak_mb / grown_json:.2f}")
                    os.unlink(grown)
        if args.nvtx_flood:
            for factor in (1, 2, 4) if args.growth else (1,):
                flood = os.path.join(out_dir, f"nvtx_flood_x{factor}.sqlite")
                made = subprocess.run(
                    [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "make_nvtx_flood.py"),
                     args.nvtx_flood, flood, "--factor", str(factor)],
                    check=True, capture_output=True, text=True).stdout.strip()
                name = f"emit_nvtx flood {factor}x ranges"
                print(f"== {name} ({os.path.getsize(flood) / 2**20:.1f} MiB: {made})", flush=True)
                case_dir = tempfile.mkdtemp(dir=out_dir)
                cases = cases_for(flood, case_dir, **options, growth_only=factor > 1)
                report(name, measure(cases, args.repeat), rows, ratios, json_size=None)
                os.unlink(flood)
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
