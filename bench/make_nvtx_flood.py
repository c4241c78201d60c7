"""Make an nsys export of the ``torch.autograd.profiler.emit_nvtx()`` shape from a real one.

Megatron / TransformerEngine users record with ``emit_nvtx``: every aten op becomes an NVTX
push/pop range whose text carries ``seq = N, op_id = M, sizes = [...]``, so nearly every
range name is distinct and a 100k-kernel run holds some 400k ranges. This script copies a
real export and adds such ranges to its ``NVTX_EVENTS``, on the threads that made the CUDA
calls, with valid nesting:

- every block of back-to-back runtime calls on a thread (their union) is wrapped in an op
  range (``aten::mm, seq = 17, op_id = 40, sizes = [[2048, 4096], [4096, 4096]]`` or, on the
  other thread, the backward node's name); a block holding a kernel / copy / memset launch
  also gets a parent op (``aten::linear, ...``) around that;
- with ``--factor K`` (K > 1), (K - 1) x as many again as kernel-less ops (``aten::view``,
  ``aten::t``...) placed side by side in the host time between blocks, so the range count
  grows K-fold while the nesting depth stays the same;
- no new range straddles a boundary of the export's own ranges (``step N``, ``layerL
  attention``...) or a runtime call: each sits strictly inside the free time around its
  block, so the export's ranges and step markers keep their meaning.

Usage::

    python bench/make_nvtx_flood.py ../shared/traces/device/h200_single_nsys/trace.sqlite \\
        /tmp/flood_x1.sqlite [--factor 2]

The output is large (tens of MB): write it to a temporary folder, never into the repository.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys

import numpy as np

_PUSH_POP = 59  # NvtxPushPopRange in every nsys version's ENUM_NSYS_EVENT_TYPE
_LAUNCH_API = ("LaunchKernel", "Memset", "Memcpy", "cuLaunch")

_FORWARD_OPS = {  # launch kernel family -> (parent op, op)
    "gemm": ("aten::linear", "aten::mm"),
    "elementwise": ("aten::add", "aten::add_"),
    "memset": ("aten::zeros", "aten::zero_"),
    "memcpy": ("aten::to", "aten::copy_"),
    "other": ("aten::softmax", "aten::_softmax"),
}
_BACKWARD_OPS = {
    "gemm": ("MmBackward0", "aten::mm"),
    "elementwise": ("AddBackward0", "aten::add"),
    "memset": ("aten::zeros_like", "aten::zero_"),
    "memcpy": ("ToCopyBackward0", "aten::copy_"),
    "other": ("SoftmaxBackward0", "aten::_softmax_backward_data"),
}
_PLAIN_OPS = ("aten::view", "aten::t", "aten::reshape", "aten::empty", "aten::as_strided",
              "aten::transpose", "aten::split", "aten::detach")
_SIZES = ("[[2048, 4096], [4096, 4096]]", "[[2048, 1024], [1024, 4096], []]", "[[64, 2048, 1024]]",
          "[[2048, 64], []]", "[[131072]]", "[[8, 2048, 128], [8, 128, 2048]]", "[]")


def _runtime_calls(db: sqlite3.Connection) -> tuple[np.ndarray, ...]:
    """(thread, start, end, launch family) of every runtime call, sorted by thread, start."""
    strings = dict(db.execute("SELECT id, value FROM StringIds"))
    launched = {corr: strings.get(name) for corr, name in
                db.execute("SELECT correlationId, shortName FROM CUPTI_ACTIVITY_KIND_KERNEL")}
    for table, label in (("CUPTI_ACTIVITY_KIND_MEMSET", "memset"), ("CUPTI_ACTIVITY_KIND_MEMCPY", "memcpy")):
        launched.update((corr, label) for (corr,) in db.execute(f"SELECT correlationId FROM {table}"))
    rows = db.execute(
        "SELECT globalTid, start, end, nameId, correlationId FROM CUPTI_ACTIVITY_KIND_RUNTIME "
        "WHERE globalTid IS NOT NULL ORDER BY globalTid, start"
    ).fetchall()
    tid = np.array([r[0] for r in rows], dtype=np.int64)
    start = np.array([r[1] for r in rows], dtype=np.int64)
    end = np.array([r[2] for r in rows], dtype=np.int64)
    family = np.array([_family(strings.get(r[3], ""), launched.get(r[4])) for r in rows], dtype=object)
    return tid, start, end, family


def _family(api: str, launched: str | None) -> str | None:
    if launched is None or not any(word in api for word in _LAUNCH_API):
        return None
    if launched in ("memset", "memcpy"):
        return launched
    lowered = launched.lower()
    if any(word in lowered for word in ("gemm", "nvjet", "cutlass", "splitk")):
        return "gemm"
    if "elementwise" in lowered or "vectorized" in lowered:
        return "elementwise"
    return "other"


def _blocks(start: np.ndarray, end: np.ndarray, family: np.ndarray):
    """Union of one thread's calls: (block start, block end, family of its last launch)."""
    running = np.maximum.accumulate(end)
    new = np.empty(start.size, dtype=bool)
    new[0] = True
    new[1:] = start[1:] > running[:-1]
    first = np.flatnonzero(new)
    last = np.append(first[1:], start.size) - 1
    block_family = np.full(first.size, None, dtype=object)
    has = np.flatnonzero(family != None)  # noqa: E711 - elementwise
    owner = np.searchsorted(first, has, side="right") - 1
    block_family[owner] = family[has]  # the last launch of a block wins
    return start[first], running[last], block_family


def flood_rows(db: sqlite3.Connection, factor: int, seed: int = 17) -> list[tuple]:
    rng = np.random.default_rng(seed)
    tid, start, end, family = _runtime_calls(db)
    existing = db.execute(
        "SELECT globalTid, start, end FROM NVTX_EVENTS WHERE end IS NOT NULL AND globalTid IS NOT NULL"
    ).fetchall()
    marker_threads = {r[0] for r in db.execute(
        "SELECT DISTINCT globalTid FROM NVTX_EVENTS WHERE text LIKE 'step %'")}
    rows: list[tuple] = []
    seq = 0
    op_id = 0
    for thread in np.unique(tid):
        on = tid == thread
        b_start, b_end, b_family = _blocks(start[on], end[on], family[on])
        bounds = np.unique(np.array([v for t, s, e in existing if t == thread for v in (s, e)],
                                    dtype=np.int64))
        # Free time on each side of a block: up to the neighbouring block or the nearest
        # boundary of an existing range, whichever is closer.
        prev_end = np.concatenate([[b_start[0] - 10_000], b_end[:-1]])
        next_start = np.concatenate([b_start[1:], [b_end[-1] + 10_000]])
        if bounds.size:
            before = np.searchsorted(bounds, b_start, side="right") - 1
            prev_end = np.maximum(prev_end, np.where(before >= 0, bounds[np.clip(before, 0, None)], prev_end))
            after = np.searchsorted(bounds, b_end, side="left")
            next_start = np.minimum(next_start, np.where(after < bounds.size,
                                                         bounds[np.clip(after, 0, bounds.size - 1)], next_start))
            # A boundary inside the block itself: leave that block alone.
            inside = np.searchsorted(bounds, b_start, side="right") != np.searchsorted(bounds, b_end, side="left")
        else:
            inside = np.zeros(b_start.size, dtype=bool)
        lead = np.minimum((b_start - prev_end) // 3, 2_000)
        trail = np.minimum((next_start - b_end) // 3, 2_000)
        ok = ~inside & (lead >= 2) & (trail >= 2)
        backward = thread not in marker_threads
        table = _BACKWARD_OPS if backward else _FORWARD_OPS
        sizes = rng.integers(0, len(_SIZES), size=b_start.size)
        for j in np.flatnonzero(ok):
            kind = b_family[j]
            s, e, lo, hi = int(b_start[j]), int(b_end[j]), int(lead[j]), int(trail[j])
            seq += 1
            size = _SIZES[sizes[j]]
            if kind is None:
                op_id += 1
                rows.append((s - lo // 2, e + hi // 2, f"{_PLAIN_OPS[j % len(_PLAIN_OPS)]}, seq = {seq}, "
                             f"op_id = {op_id}, sizes = {size}", int(thread)))
                continue
            parent, child = table[kind]
            op_id += 2
            tag = f"seq = {seq}" if not backward else f"seq = {seq}, op_id = {op_id - 1}"
            rows.append((s - lo, e + hi, f"{parent}, {tag}, op_id = {op_id - 1}, sizes = {size}", int(thread)))
            rows.append((s - lo // 2, e + hi // 2,
                         f"{child}, seq = {seq}, op_id = {op_id}, sizes = {size}, input_op_ids = [{op_id - 1}]",
                         int(thread)))
        if factor > 1:
            # Kernel-less ops side by side in the free time after each block (past its
            # wrapper), so that the total grows `factor`-fold at the same depth.
            wanted = (factor - 1) * sum(1 for r in rows if r[3] == int(thread))
            free_lo = b_end + trail
            free_hi = next_start - 1
            room = np.where(ok, free_hi - free_lo, 0)
            usable = np.flatnonzero(room >= 8)
            if usable.size:
                per = np.full(usable.size, wanted // usable.size, dtype=np.int64)
                per[: wanted % usable.size] += 1
                per = np.minimum(per, room[usable] // 4)
                for j, n in zip(usable, per):
                    if n <= 0:
                        continue
                    step = int(room[j]) // int(n)
                    base = int(free_lo[j])
                    for i in range(int(n)):
                        seq += 1
                        op_id += 1
                        a = base + i * step + 1
                        rows.append((a, a + max(step // 2, 1),
                                     f"{_PLAIN_OPS[(j + i) % len(_PLAIN_OPS)]}, seq = {seq}, op_id = {op_id}, "
                                     f"sizes = {_SIZES[(j + i) % len(_SIZES)]}", int(thread)))
    return rows


def make_flood(source: str, output: str, *, factor: int = 1) -> dict:
    """Copy ``source`` to ``output`` and add the emit_nvtx ranges; returns row counts."""
    shutil.copyfile(source, output)
    db = sqlite3.connect(output)
    try:
        rows = flood_rows(db, factor)
        db.executemany(
            "INSERT INTO NVTX_EVENTS (start, end, eventType, text, globalTid, domainId) "
            f"VALUES (?, ?, {_PUSH_POP}, ?, ?, 0)", rows)
        db.commit()
        counts = {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                  for table in ("CUPTI_ACTIVITY_KIND_KERNEL", "CUPTI_ACTIVITY_KIND_RUNTIME", "NVTX_EVENTS",
                                "COMPOSITE_EVENTS")}
        counts["distinct NVTX names"] = db.execute(
            "SELECT count(DISTINCT coalesce(text, textId)) FROM NVTX_EVENTS").fetchone()[0]
    finally:
        db.close()
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a real nsys SQLite export with CUDA runtime calls")
    parser.add_argument("output", help="where to write the flooded copy (a temporary folder)")
    parser.add_argument("--factor", type=int, default=1, help="ranges multiplied by this (1, 2, 4...)")
    args = parser.parse_args()
    if os.path.abspath(args.source) == os.path.abspath(args.output):
        parser.error("output must differ from source")
    counts = make_flood(args.source, args.output, factor=args.factor)
    print(", ".join(f"{name} {count:,}" for name, count in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
