"""Accuracy of the diagnosis on labelled traces, and the flags it raises on unlabelled ones.

Runs ``traceinsight analyze`` (default options, as a user would) on every labelled trace in
``../shared/traces/device`` and ``sample_traces/`` and compares its findings with the answer
keys written when the traces were recorded:

- per trace: the steps the key says were slowed by an injected fault (measured wall time at
  least ``SLOW_RATIO`` times the median of the steps without a fault) against the steps the
  tool flagged; flagged steps without a fault are listed with their measured wall-time ratio;
- per injected fault: whether a finding (a step or a range instance) exists for it, whether
  its place (``where`` or one of the step's ``places``) names the layer and block the key
  names, and whether its cause is the one the fault's kind implies.

Then it runs the same analysis on every public trace in ``../shared/traces/nsys`` and
``../shared/traces/kineto`` (no injected faults) and lists every step flag with its ratio to
the step's baseline, and the number of range flags: each must be defensible from the raw
step times.

The answer keys are read here, by the checker, and nowhere in the analysis.

Usage::

    python bench/accuracy.py [--markdown docs/accuracy_table.md] [--public/--no-public]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "traces"
#: A fault "slowed its step" when the step's measured wall time is at least this ratio of the
#: median wall time of the steps without a fault (the checker's definition, not the tool's).
SLOW_RATIO = 1.2

#: What each injected fault kind should be diagnosed as (substring of the finding's cause).
EXPECTED_CAUSE = {
    "host_malloc": "memory_allocation",
    "host_memory_allocation": "memory_allocation",
    "host_sync": "host_sync",
    "gc_pause": "garbage_collection",
    "split_overhead": "launch_overhead",
    "sleep_stall": "blocked",
    "blocked_host_thread": "blocked",
    "host_stall": "blocked",
    "gpu_heavy": "gpu",
    "gpu_excess": "gpu",
    "io": "io",
    "file_io": "io",
    "cuda_allocator": "alloc",
    "allocator_churn": "alloc",
    "queue_wait": "blocked",
    "cuda_allocator_churn": "alloc",
    "gpu_backward_excess": "gpu",
    "heavy_attention": "gpu",
    "attention_unbalance": "gpu",
    "host_stall_before_dispatch": "blocked",
}


@dataclass
class Fault:
    step: int  # in the tool's numbering
    kind: str
    where: str | None
    rank: int | None = None


@dataclass
class Labelled:
    name: str
    paths: list[Path]
    faults: list[Fault]
    #: measured wall time per (rank, tool step); rank None when the key has one rank
    wall_ms: dict[tuple[int | None, int], float] = field(default_factory=dict)


def _device_single(folder: str, offset: int) -> Labelled | None:
    base = SHARED / "device" / folder
    if not base.exists():
        return None
    truth = json.loads((base / "truth.json").read_text())
    trace = next(p for p in sorted(base.iterdir()) if p.name.startswith("trace."))
    faults = [Fault(int(step) + offset, f["kind"], f.get("what")) for step, f in truth["faults"].items()]
    wall = {(None, i + offset): ms for i, ms in enumerate(truth["wall_ms"])}
    return Labelled(f"device/{folder}", [trace], faults, wall)


def _sample_single() -> Labelled | None:
    truth_path = ROOT / "sample_traces" / "truth.json"
    if not truth_path.exists():
        return None
    truth = json.loads(truth_path.read_text())
    faults = [Fault(f["step"], f["kind"], f.get("where")) for f in truth["faults"]]
    wall = {(None, s["step"]): s["wall_time_s"] * 1e3 for s in truth["steps"] if s.get("in_trace")}
    return Labelled("sample_traces/moe_single_nsys", [ROOT / "sample_traces" / truth["trace"]], faults, wall)


def _multi_rank(base: Path, name: str, offset: int) -> Labelled | None:
    keys = sorted(base.glob("truth_rank*.json"))
    if not keys:
        return None
    faults, wall = [], {}
    for key in keys:
        truth = json.loads(key.read_text())
        rank = truth["rank"]
        for s in truth["steps"]:
            ms = s.get("wall_ms", s.get("wall_time_s", 0) * 1e3 if s.get("wall_time_s") is not None else None)
            if ms is not None:
                wall[(rank, s["step"] + offset)] = ms
        if rank == 0 and "faults" not in truth and isinstance(truth.get("schedule"), dict):
            faults += _faults_from_schedule(truth["schedule"], offset)
        if rank == 0:
            for f in truth.get("faults", []):
                ranks = f.get("ranks") or []
                faults.append(Fault(f["step"] + offset, f["kind"], f.get("where") or f.get("detail"),
                                    ranks[0] if len(ranks) == 1 and f["kind"] != "batch_imbalance" else None))
    paths = sorted(p for p in base.iterdir() if p.suffix in (".gz", ".sqlite", ".json") and not p.name.startswith("truth"))
    return Labelled(name, paths, faults, wall)


def _faults_from_schedule(schedule: dict, offset: int) -> list[Fault]:
    """Faults from a key that describes them in words: ``"steps 10-14: rank 0 ..."``."""
    out = []
    for kind, text in schedule.items():
        span = re.search(r"steps?\s+(\d+)(?:\s*-\s*(\d+))?", text)
        if not span:
            continue
        first, last = int(span.group(1)), int(span.group(2) or span.group(1))
        rank = re.search(r"rank\s+(\d+)", text)
        for step in range(first, last + 1):
            out.append(Fault(step + offset, kind, text,
                             int(rank.group(1)) if rank and kind != "batch_unbalance" else None))
    return out


def _extra_sets() -> list[Labelled]:
    """Sample folders with one trace and a ``truth.json`` (faults with the step in the
    tool's numbering, ``kind``, ``where``; per-step ``wall_time_s``)."""
    out = []
    for truth_path in sorted((ROOT / "sample_traces").glob("*/truth.json")):
        truth = json.loads(truth_path.read_text())
        folder = truth_path.parent
        trace = folder / truth["trace"]
        if not trace.exists():
            continue
        faults = [Fault(f["step"], f["kind"], f.get("where"), f.get("rank")) for f in truth["faults"]]
        for f, raw in zip(faults, truth["faults"]):
            if f.kind not in EXPECTED_CAUSE and raw.get("expected_cause"):
                EXPECTED_CAUSE[f.kind] = raw["expected_cause"]
        wall = {(None, s["step"]): s["wall_time_s"] * 1e3 for s in truth["steps"]
                if s.get("in_trace", True) and s.get("wall_time_s") is not None}
        out.append(Labelled(f"sample_traces/{folder.name}", [trace], faults, wall))
    return out


def labelled_traces() -> list[Labelled]:
    found = [
        _device_single("h200_single_nsys", 0),
        _device_single("h200_single_torch", 1),  # ProfilerStep#k is step k-1
        _sample_single(),
        _multi_rank(SHARED / "device" / "h200_2rank_torch", "device/h200_2rank_torch", 1),
        _multi_rank(ROOT / "sample_traces" / "moe_2rank", "sample_traces/moe_2rank", 0),
        _multi_rank(ROOT / "sample_traces" / "moe_2rank_nsys", "sample_traces/moe_2rank_nsys", 0),
        *(_multi_rank(folder, f"sample_traces/{folder.name}", 0)
          for folder in sorted((ROOT / "sample_traces").glob("moe_nrank_*"))),
        *_extra_sets(),
    ]
    return [item for item in found if item is not None]


def run_analyze(paths: list[Path]) -> tuple[dict | None, float, str]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "findings.json"
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "traceinsight.cli", "analyze", *map(str, paths), "--json", str(out), "-q"],
            capture_output=True, text=True, cwd=ROOT,
        )
        elapsed = time.perf_counter() - started
        if proc.returncode != 0 or not out.exists():
            return None, elapsed, (proc.stderr.strip().splitlines() or ["?"])[-1]
        return json.loads(out.read_text()), elapsed, ""


def _squash(text: str | None) -> str:
    return re.sub(r"[^a-z0-9]", "", (text or "").lower())


def _place_keys(where: str | None) -> list[str]:
    """What a key's place text pins down: ``layer 2`` and the block (fc1, fc2, attention,
    router, experts), squashed so that every marker convention compares alike."""
    if not where:
        return []
    if " › " in where:  # a nesting path: its innermost range, and any numbered element (the layer)
        parts = [p.strip() for p in where.split(" › ")]
        return [_squash(parts[-1])] + [_squash(p) for p in parts[:-1] if re.search(r"\d", p)]
    text = where.lower()
    keys = []
    if m := re.search(r"layer\s*(\d+)", text):
        keys.append(f"layer{m.group(1)}")
    if m := re.search(r"\b(fc\d)\b", text):
        keys.append(m.group(1))
    elif m := re.search(r"\b(attention|router|experts?|dispatch|combine)\b", text):
        keys.append(m.group(1).rstrip("s"))
    return keys


def _finding_places(finding: dict) -> list[str]:
    places = [finding.get("where") or ""]
    places += [p.get("where") or "" for p in finding.get("places") or []]
    return [_squash(p) for p in places]


def _cause_text(finding: dict) -> str:
    causes = [finding.get("cause") or ""] + [p.get("cause") or "" for p in finding.get("places") or []]
    return " ".join(causes)


def score(item: Labelled, findings: dict) -> dict:
    anomalies = findings.get("anomalies", [])
    steps = findings.get("steps", [])
    flagged = sorted({(s["rank"], s["step"]) for s in steps if s.get("anomalous")})
    flagged_steps = sorted({s for _, s in flagged})
    fault_steps = {f.step for f in item.faults}
    clean = [ms for (rank, step), ms in item.wall_ms.items() if step not in fault_steps]
    typical = statistics.median(clean) if clean else None
    slow = sorted({
        step for (rank, step), ms in item.wall_ms.items()
        if step in fault_steps and typical and ms >= SLOW_RATIO * typical
    })
    extra = []
    for step in flagged_steps:
        if step in fault_steps:
            continue
        walls = [ms for (rank, s), ms in item.wall_ms.items() if s == step]
        ratio = max(walls) / typical if walls and typical else None
        extra.append((step, ratio))
    rows = []
    for fault in sorted(item.faults, key=lambda f: f.step):
        at_step = [a for a in anomalies if a.get("step") == fault.step
                   and (fault.rank is None or a.get("rank") == fault.rank)]
        keys = _place_keys(fault.where)
        where_ok = None
        if at_step and keys:
            where_ok = any(all(k in place for k in keys) for a in at_step for place in _finding_places(a))
        expected = EXPECTED_CAUSE.get(fault.kind)
        cause_ok = None
        if at_step and expected:
            cause_ok = any(expected in _cause_text(a) for a in at_step)
        best = max(at_step, key=lambda a: a.get("excess_ms") or 0) if at_step else None
        rows.append({
            "step": fault.step, "kind": fault.kind, "slow": fault.step in slow,
            "flagged": fault.step in flagged_steps, "found": bool(at_step),
            "where_ok": where_ok, "cause_ok": cause_ok, "expected_cause": expected,
            "where": best.get("where") if best else None, "cause": best.get("cause") if best else None,
        })
    return {
        "slow": slow, "flagged": flagged_steps, "extra": extra, "faults": rows,
        "range_findings": sum(1 for a in anomalies if a.get("kind") == "range"),
    }


def public_sets() -> list[tuple[str, list[Path]]]:
    out = []
    for path in sorted((SHARED / "nsys").glob("*.sqlite")):
        out.append((f"nsys/{path.name}", [path]))
    kineto = SHARED / "kineto"
    for folder in sorted(p for p in kineto.iterdir() if p.is_dir()):
        files = sorted(folder.rglob("*.json*"))
        if not files:
            continue
        subfolders = sorted({f.parent for f in files})
        if len(subfolders) > 1:  # separate runs side by side (hta_trace_diff_2022): one each
            for sub in subfolders:
                out.append((f"kineto/{sub.relative_to(kineto)}", sorted(sub.glob("*.json*"))))
        else:
            out.append((f"kineto/{folder.name}", files))
    return out


def _fmt(value) -> str:
    return "-" if value is None else ("yes" if value is True else "no" if value is False else str(value))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", help="also write the tables to this file")
    parser.add_argument("--no-public", action="store_true", help="skip the unlabelled public traces")
    args = parser.parse_args(argv)
    lines = ["## Labelled traces", "",
             "| trace | slowed steps (key) | flagged steps | flagged without a fault (wall ratio) | range findings | time |",
             "|---|---|---|---|---|---|"]
    fault_lines = ["", "| trace | step | fault | slowed | step flagged | finding | where ok | cause ok (expected) | where / cause said |",
                   "|---|---|---|---|---|---|---|---|---|"]
    totals = {"faults": 0, "found": 0, "where": 0, "where_n": 0, "cause": 0, "cause_n": 0, "slow": 0, "slow_flagged": 0}
    for item in labelled_traces():
        findings, elapsed, error = run_analyze(item.paths)
        if findings is None:
            lines.append(f"| {item.name} | error: {error} | | | | {elapsed:.1f} s |")
            continue
        result = score(item, findings)
        extra = ", ".join(f"{s} ({r:.2f}x)" if r else f"{s}" for s, r in result["extra"]) or "none"
        lines.append(f"| {item.name} | {result['slow']} | {result['flagged']} | {extra} | "
                     f"{result['range_findings']} | {elapsed:.1f} s |")
        for row in result["faults"]:
            totals["faults"] += 1
            totals["found"] += row["found"]
            totals["slow"] += row["slow"]
            totals["slow_flagged"] += row["slow"] and row["flagged"]
            if row["where_ok"] is not None:
                totals["where_n"] += 1
                totals["where"] += row["where_ok"]
            if row["cause_ok"] is not None:
                totals["cause_n"] += 1
                totals["cause"] += row["cause_ok"]
            said = f"{row['where']} / {row['cause']}" if row["found"] else "-"
            fault_lines.append(
                f"| {item.name} | {row['step']} | {row['kind']} | {_fmt(row['slow'])} | {_fmt(row['flagged'])} | "
                f"{_fmt(row['found'])} | {_fmt(row['where_ok'])} | {_fmt(row['cause_ok'])} ({row['expected_cause']}) | "
                f"{said.replace('|', '/')} |"
            )
    summary = (f"\nFaults {totals['faults']}: found {totals['found']}; slowed steps flagged "
               f"{totals['slow_flagged']}/{totals['slow']}; where right {totals['where']}/{totals['where_n']}; "
               f"cause right {totals['cause']}/{totals['cause_n']}")
    out = lines + fault_lines + [summary]
    if not args.no_public:
        out += ["", "## Public traces (no injected faults)", "",
                "| trace | step source | steps | flagged steps (ratio to baseline) | range findings | time |",
                "|---|---|---|---|---|---|"]
        for name, paths in public_sets():
            findings, elapsed, error = run_analyze(paths)
            if findings is None:
                out.append(f"| {name} | error: {error} | | | | {elapsed:.1f} s |")
                continue
            steps = findings.get("steps", [])
            flags = [f"r{s['rank']} s{s['step']} ({s.get('ratio') or 0:.2f}x)" for s in steps if s.get("anomalous")]
            ranges = sum(1 for a in findings.get("anomalies", []) if a.get("kind") == "range")
            source = findings.get("step_source")
            out.append(f"| {name} | {source} | {len(steps)} | {', '.join(flags) or 'none'} | {ranges} | {elapsed:.1f} s |")
    text = "\n".join(out)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
