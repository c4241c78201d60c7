#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Raw per-step counts from a recorded trace, for the answer keys (no traceinsight code involved).

    python3 scripts/trace_facts.py TRACE STEP_RANGE_NAME [truth.json]

TRACE is an nsys SQLite export or a Kineto ``.json.gz``. Steps are the instances of the range
named STEP_RANGE_NAME (NVTX or record_function) in time order. For each step window it counts,
from the raw tables/events only: kernels (GPU start inside the window), CUDA runtime calls by kind
(kernel launches, cudaMalloc/cudaFree, stream/device syncs, D2H copies, graph launches) and their
host thread (main thread vs others, e.g. autograd's backward thread), and for nsys the OS-runtime
calls write/fsync/pthread_cond_*wait. With a truth.json it writes the counts into
``steps[].trace_facts`` (matched by order of the recorded steps) and ``trace_facts_note``.
"""
from __future__ import annotations

import gzip
import json
import sqlite3
import sys
from collections import Counter


def _rt_kind(name: str) -> str | None:
    n = name.split("_v")[0] if "_v" in name else name
    if n in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"):
        return "launches"
    if n in ("cudaMalloc", "cudaMallocAsync", "cudaHostAlloc", "cudaMallocHost"):
        return "cuda_malloc"
    if n in ("cudaFree", "cudaFreeAsync", "cudaFreeHost"):
        return "cuda_free"
    if n in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"):
        return "syncs"
    if n.startswith("cudaGraphLaunch"):
        return "graph_launches"
    if n.startswith("cudaMemcpy"):
        return "memcpy_calls"
    return None


def nsys_facts(path: str, step_name: str) -> list[dict]:
    c = sqlite3.connect(path)
    sid = {i: v for i, v in c.execute("select id, value from StringIds")}
    rows = c.execute("select start, end, globalTid, coalesce(text, ''), textId from NVTX_EVENTS "
                     "where eventType in (59, 60) order by start").fetchall()
    wins = []
    for s, e, tid, text, tx in rows:
        name = text or sid.get(tx, "")
        if name == step_name and e is not None:
            wins.append((s, e, tid))
    rt = c.execute("select start, end, globalTid, nameId from CUPTI_ACTIVITY_KIND_RUNTIME").fetchall()
    kern = c.execute("select start, end, streamId from CUPTI_ACTIVITY_KIND_KERNEL").fetchall()
    osrt = c.execute("select start, end, globalTid, nameId from OSRT_API").fetchall() if _has(c, "OSRT_API") else []
    out = []
    for s, e, main in wins:
        f: Counter = Counter()
        ft: Counter = Counter()
        for a, b, tid, nid in rt:
            if s <= a < e:
                k = _rt_kind(sid.get(nid, ""))
                if k:
                    f[k] += 1
                    ft[k] += b - a
                    if k == "launches" and tid != main:
                        f["launches_other_threads"] += 1
        streams = set()
        for a, b, st in kern:
            if s <= a < e:
                f["kernels"] += 1
                ft["kernels"] += b - a
                streams.add(st)
        for a, b, tid, nid in osrt:
            if s <= a < e and tid == main:
                n = sid.get(nid, "")
                if n in ("write", "fsync", "fdatasync", "pthread_cond_wait", "pthread_cond_timedwait", "sem_wait",
                         "sem_timedwait", "clock_nanosleep", "nanosleep"):
                    f[f"osrt_{n}"] += 1
                    ft[f"osrt_{n}"] += b - a
        out.append(_pack(s, e, f, ft, len(streams)))
    return out


def _has(c, t):
    return c.execute("select count(*) from sqlite_master where name=?", (t,)).fetchone()[0] > 0


def _pack(s, e, f, ft, n_streams, scale=1e-9):
    d = dict(window_ms=round((e - s) * scale * 1e3, 3), kernel_streams=n_streams)
    for k in sorted(f):
        d[k] = f[k]
        if k in ft:
            d[k + "_ms"] = round(ft[k] * scale * 1e3, 3)
    return d


def kineto_facts(path: str, step_name: str) -> list[dict]:
    with gzip.open(path) if path.endswith(".gz") else open(path, "rb") as fh:
        ev = json.load(fh)["traceEvents"]
    xs = [e for e in ev if e.get("ph") == "X"]
    wins = sorted((e["ts"], e["ts"] + e["dur"], e.get("tid")) for e in xs
                  if e.get("cat") == "user_annotation" and e.get("name") == step_name)
    rt = [e for e in xs if e.get("cat") == "cuda_runtime"]
    kern = [e for e in xs if e.get("cat") == "kernel"]
    out = []
    for s, e, main in wins:
        f: Counter = Counter()
        ft: Counter = Counter()
        for r in rt:
            if s <= r["ts"] < e:
                k = _rt_kind(r["name"])
                if k:
                    f[k] += 1
                    ft[k] += r["dur"]
                    if k == "launches" and r.get("tid") != main:
                        f["launches_other_threads"] += 1
        streams = set()
        for r in kern:
            if s <= r["ts"] < e:
                f["kernels"] += 1
                ft["kernels"] += r["dur"]
                streams.add(r.get("args", {}).get("stream"))
        out.append(_pack(s, e, f, ft, len(streams), scale=1e-6))
    return out


def main(argv):
    path, step_name = argv[0], argv[1]
    facts = nsys_facts(path, step_name) if path.endswith(".sqlite") else kineto_facts(path, step_name)
    if len(argv) > 2:
        t = json.load(open(argv[2]))
        rec = [s for s in t["steps"] if s["in_trace"]]
        assert len(rec) == len(facts), (len(rec), len(facts))
        for s, f in zip(rec, facts):
            s["trace_facts"] = f
        t["trace_facts_note"] = (
            "steps[].trace_facts: raw counts inside each step's range window, computed by "
            "scripts/trace_facts.py from the trace's own tables/events (no analyzer): kernels = GPU kernels "
            "starting in the window (kernels_ms their summed GPU time), launches = kernel-launch runtime calls "
            "(launches_other_threads: from threads other than the one that holds the step range, i.e. "
            "autograd's backward thread), cuda_malloc/cuda_free = cudaMalloc/cudaFree calls (and their host "
            "time), syncs = stream/device/event synchronize calls, memcpy_calls, graph_launches = "
            "cudaGraphLaunch, osrt_* = OS-runtime calls on the step's thread (nsys only), kernel_streams = "
            "distinct CUDA streams of those kernels, window_ms = the range's duration in the trace.")
        with open(argv[2], "w") as fh:
            json.dump(t, fh, indent=1)
            fh.write("\n")
    for i, f in enumerate(facts):
        print(i, f)


if __name__ == "__main__":
    main(sys.argv[1:])
