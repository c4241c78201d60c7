# SPDX-License-Identifier: Apache-2.0
"""Fault plans, imbalance schedules and answer-key helpers for ``record_samples.py``.

Pure Python (no torch), so that the tests can check the schedules and the answer keys without a
GPU or torch. ``record_samples.py`` imports it from the same folder.

Cause categories used by the answer keys (``expected_cause``): ``garbage_collection``,
``memory_allocation``, ``blocked``, ``io``, ``host_sync``, ``launch_overhead``, ``gpu`` (GPU work
grew), and for the N-rank set ``imbalance`` / ``straggler`` kinds described in its schedule.
"""
from __future__ import annotations

import sqlite3

CAUSES = ("garbage_collection", "memory_allocation", "blocked", "io", "host_sync", "launch_overhead", "gpu")

# --------------------------------------------------------------------------------------------
# te-moe: TransformerEngine-style nesting, un-numbered step range 'train_step'
# --------------------------------------------------------------------------------------------

TE_STEP_RANGE = "train_step"


def te_layer_path(layer: int, *inner: str) -> list[str]:
    return [TE_STEP_RANGE, "forward", f"decoder.layers.{layer}", *inner]


def te_fault_plan() -> dict[int, dict]:
    """Faults by recorded-step index (the k-th ``train_step`` range of the trace, 0-based)."""
    return {
        2: dict(kind="cuda_allocator_churn", expected_cause="memory_allocation",
                where_path=te_layer_path(3, "mlp", "experts", "GroupedLinear fc1"),
                detail="torch.cuda.empty_cache(), then 160 rounds of: allocate a new 64-223 MiB CUDA tensor, "
                       "free it, torch.cuda.empty_cache() (cudaMalloc + cudaFree each round); the cache is "
                       "empty afterwards, so the rest of the step re-allocates its activations with cudaMalloc"),
        4: dict(kind="file_io", expected_cause="io",
                where_path=[TE_STEP_RANGE, "optimizer"],
                detail="after optimizer.step(): a 'checkpoint' of 96 x 1 MiB write() calls to a file on the "
                       "training thread, then os.fsync(), then the file is removed"),
        5: dict(kind="host_sync", expected_cause="host_sync",
                where_path=te_layer_path(2, "mlp", "router"),
                detail="2000 x (small GPU reduction + .item()) on the router probabilities: 2000 device syncs"),
        7: dict(kind="gc_pause", expected_cause="garbage_collection",
                where_path=te_layer_path(5, "self_attention", "core_attention"),
                detail="gc.collect() with ~1,500,000 extra live gc-tracked objects (automatic gc disabled "
                       "during the loop), before the SDPA call"),
        8: dict(kind="gpu_backward_excess", expected_cause="gpu",
                where_path=[TE_STEP_RANGE, "backward"],
                detail="the output of decoder.layers.1 GroupedLinear fc1 goes through an autograd Function "
                       "whose backward launches 600 extra 4096x4096x4096 bf16 matmuls and 300 small "
                       "elementwise kernels on autograd's backward thread; forward launches unchanged"),
    }


# --------------------------------------------------------------------------------------------
# dense: dense model, many-small-kernel optimizer, CUDA graph replay, data-loader thread
# --------------------------------------------------------------------------------------------

DENSE_STEP_RANGE = "iteration"


def dense_fault_plan() -> dict[int, dict]:
    return {
        2: dict(kind="queue_wait", expected_cause="blocked",
                where_path=[DENSE_STEP_RANGE, "data"],
                detail="the data-loader thread holds this step's batch back until the training thread has "
                       "started the previous step, then sleeps 0.25 s before queue.put(), so the training "
                       "thread blocks in queue.get() (queue maxsize 2)"),
        4: dict(kind="cuda_allocator_churn", expected_cause="memory_allocation",
                where_path=[DENSE_STEP_RANGE, "forward"],
                detail="at the start of forward: torch.cuda.empty_cache(), then 32 rounds of allocate a new "
                       "256-287 MiB CUDA tensor, free it, empty_cache(); the rest of the step re-allocates "
                       "its activations with cudaMalloc"),
        6: dict(kind="host_sync", expected_cause="host_sync",
                where_path=[DENSE_STEP_RANGE, "optimizer"],
                detail="before optimizer.step(): 3 passes of per-parameter grad-norm logging, "
                       "p.grad.norm().item() for every parameter (3 x n_params device syncs)"),
        8: dict(kind="file_io", expected_cause="io",
                where_path=[DENSE_STEP_RANGE],
                detail="at the end of the iteration, outside its sub-ranges: 1500 x 16 KiB write() calls "
                       "of a metrics log on the training thread with an os.fsync() after every 10th"),
    }


def plan_faults_list(plan: dict[int, dict], measured: dict[int, float]) -> list[dict]:
    out = []
    for k, f in sorted(plan.items()):
        out.append(dict(step=k, kind=f["kind"], where=" › ".join(f["where_path"]), where_path=f["where_path"],
                        expected_cause=f["expected_cause"], detail=f["detail"],
                        measured_fault_s=round(measured[k], 6) if k in measured else None))
    return out


def median(xs):
    xs = sorted(xs)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def slow_steps(steps: list[dict], factor: float = 1.2) -> list[int]:
    """Recorded steps whose wall time exceeds ``factor`` x the median clean recorded step."""
    rec = [s for s in steps if s.get("in_trace")]
    clean = [s["wall_time_s"] for s in rec if not s.get("fault")]
    m = median(clean)
    if m is None:
        return []
    return [s["step"] for s in rec if s["wall_time_s"] > factor * m]


# --------------------------------------------------------------------------------------------
# N-rank expert-parallel inference: imbalance schedule
# --------------------------------------------------------------------------------------------


def nrank_schedule(world: int, n_steps: int, base_seqs: int = 2) -> list[dict]:
    """Per loop iteration: sequences per rank, attention repeats per rank, routing skew, stalls, slow link.

    Iterations 0 and 1 are the profiler's wait/warmup (or outside the nsys capture). The plan needs
    ``n_steps >= 20``; faults that need two or three distinct ranks are left out when ``world`` is
    too small (and say so in ``skipped``). Ranks are chosen from the end so that rank 0 is not
    always the odd one: heavy = world-1, hot-expert rank = world//2, stragglers = 1 and world-2,
    stalled = 0, slow link = world//2 - 1 (or 0).
    """
    assert n_steps >= 20, "the imbalance schedule needs at least 20 loop iterations"
    W = world
    heavy = W - 1
    hot = W // 2 if W > 1 else 0
    stragglers = sorted({1 % W, (W - 2) % W}) if W >= 3 else ([0, 1] if W == 2 else [0])
    stalled = 0
    slow = max(W // 2 - 1, 0)
    plan = []
    for k in range(n_steps):
        s = dict(step=k, seqs_per_rank=[base_seqs] * W, attn_repeat=[1] * W, hot_rank=None, hot_bias=0.0,
                 stall_rank=None, stall_layer=None, slow_link_rank=None, faults=[], skipped=[])
        plan.append(s)

    def add(ks, kind, ranks, detail, **kw):
        for k in ks:
            if k < n_steps:
                plan[k].update(kw)
                plan[k]["faults"].append(dict(kind=kind, ranks=ranks, detail=detail))

    if W >= 2:
        add([4, 5], "heavy_rank_batch", [heavy],
            f"rank {heavy} gets 3x the sequences of every other rank ({3 * base_seqs} vs {base_seqs})")
        for k in (4, 5):
            plan[k]["seqs_per_rank"] = [base_seqs] * W
            plan[k]["seqs_per_rank"][heavy] = 3 * base_seqs
        add([8, 9], "receive_skew_hot_experts", [hot],
            f"equal batches; the router's logits get +4.0 on the experts of rank {hot}, so most tokens "
            f"of every rank are sent to rank {hot}", hot_rank=hot, hot_bias=4.0)
        add([12], "two_stragglers", stragglers,
            f"ranks {stragglers} run each layer's attention 3 times (two late arrivals at the dispatch)")
        for r in stragglers:
            plan[12]["attn_repeat"][r] = 3
    else:
        for k, kind in ((4, "heavy_rank_batch"), (8, "receive_skew_hot_experts"), (12, "two_stragglers")):
            plan[k]["skipped"].append(kind)
    add([15], "host_stall", [stalled], f"rank {stalled} calls time.sleep(0.03) right before the layer-1 dispatch",
        stall_rank=stalled, stall_layer=1)
    add([18], "slow_link", [slow],
        f"rank {slow} copies its dispatch payload device->host->device 3 times inside each layer's dispatch "
        "range before the all_to_all (a slow link simulated by extra copy work)", slow_link_rank=slow)
    return plan


def route_bias(n_experts: int, world: int, hot_rank: int | None, bias: float) -> list[float]:
    """Additive router-logit bias: +bias on every expert owned by ``hot_rank`` (experts are split in
    contiguous blocks of n_experts // world)."""
    el = n_experts // world
    out = [0.0] * n_experts
    if hot_rank is not None:
        for e in range(hot_rank * el, (hot_rank + 1) * el):
            out[e] = bias
    return out


def splits_from_counts(counts: list[int], world: int) -> list[int]:
    """Tokens sent to each rank from per-expert counts (experts in contiguous blocks per rank)."""
    el = len(counts) // world
    return [sum(counts[r * el:(r + 1) * el]) for r in range(world)]


def layer_record(layer: int, send_splits: list[int], recv_matrix: list[list[int]]) -> dict:
    """Answer-key entry of one layer on one rank. ``recv_matrix[src][local_expert]``."""
    recv = [sum(row) for row in recv_matrix]
    n_local = len(recv_matrix[0]) if recv_matrix else 0
    per_e = [sum(recv_matrix[s][e] for s in range(len(recv_matrix))) for e in range(n_local)]
    return dict(layer=layer, tokens_sent_to_rank=list(send_splits), tokens_sent=sum(send_splits),
                tokens_received_from_rank=recv, tokens_received=sum(recv), tokens_per_local_expert=per_e)


def check_all_to_all_consistency(per_rank_layers: list[list[dict]]) -> list[str]:
    """For one step: rank r's tokens_sent_to_rank[q] must equal rank q's tokens_received_from_rank[r]."""
    errs = []
    W = len(per_rank_layers)
    for L in range(len(per_rank_layers[0]) if W else 0):
        for r in range(W):
            for q in range(W):
                a = per_rank_layers[r][L]["tokens_sent_to_rank"][q]
                b = per_rank_layers[q][L]["tokens_received_from_rank"][r]
                if a != b:
                    errs.append(f"layer {L}: rank {r} sent {a} to rank {q}, which received {b}")
    return errs


# --------------------------------------------------------------------------------------------
# scrubbing nsys SQLite exports
# --------------------------------------------------------------------------------------------

_KEEP_ENV = ("CUDA_VISIBLE_DEVICES", "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS",
             "PYTHONUNBUFFERED", "CUDA_VERSION", "NCCL_VERSION")
_HOST_KEYS = {"Hostname", "EXPORT_HOST", "DEVICE_DISPLAY_NAME", "EXPORT_USER", "PROCESS_0:USER_NAME", "SystemUID"}


def _scrub_env(value: str) -> str:
    kept = []
    for item in (value or "").split(";"):
        name = item.split("=", 1)[0]
        if name in _KEEP_ENV:
            kept.append(item)
    return ";".join(kept)


def scrub_nsys_sqlite(path: str) -> dict:
    """Remove host names and environment variables from an nsys SQLite export, in place.

    ``TARGET_INFO_SYSTEM_ENV``: ``DeviceEnvironment`` keeps only the variables named in
    ``_KEEP_ENV``; ``Hostname``/``SystemUID`` become 'scrubbed'. ``META_DATA_CAPTURE`` /
    ``META_DATA_EXPORT``: host and user names become 'scrubbed', environment entries are filtered the
    same way. Returns counts of what was changed. The file is VACUUMed."""
    con = sqlite3.connect(path)
    changed = {}
    tabs = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
    if "TARGET_INFO_SYSTEM_ENV" in tabs:
        cols = [r[1] for r in con.execute("pragma table_info(TARGET_INFO_SYSTEM_ENV)")]
        if "name" in cols and "value" in cols:
            for name, value in con.execute("select name, value from TARGET_INFO_SYSTEM_ENV").fetchall():
                new = value
                if name in ("DeviceEnvironment", "Environment") or "ENV" in str(name).upper():
                    new = _scrub_env(value)
                elif name in _HOST_KEYS:
                    new = "scrubbed"
                if new != value:
                    con.execute("update TARGET_INFO_SYSTEM_ENV set value=? where name=?", (new, name))
                    changed[f"TARGET_INFO_SYSTEM_ENV.{name}"] = 1
    for t in ("META_DATA_CAPTURE", "META_DATA_EXPORT"):
        if t not in tabs:
            continue
        cols = [r[1] for r in con.execute(f"pragma table_info({t})")]
        if "name" not in cols or "value" not in cols:
            continue
        for name, value in con.execute(f"select name, value from {t}").fetchall():
            new = value
            if name in _HOST_KEYS or name.endswith("USER_NAME"):
                new = "scrubbed"
            elif "ENV" in name.upper() and isinstance(value, str) and "=" in value:
                new = _scrub_env(value)
            if new != value:
                con.execute(f"update {t} set value=? where name=?", (new, name))
                changed[f"{t}.{name}"] = changed.get(f"{t}.{name}", 0) + 1
    if "StringIds" in tabs:
        # a bare environment assignment that landed in the string table (e.g. an OSRT argument)
        import re
        env_re = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")
        for sid, value in con.execute("select id, value from StringIds where value like '%=%'").fetchall():
            if isinstance(value, str) and env_re.match(value) and value.split("=", 1)[0] not in _KEEP_ENV:
                con.execute("update StringIds set value='scrubbed' where id=?", (sid,))
                changed["StringIds"] = changed.get("StringIds", 0) + 1
    con.commit()
    con.execute("vacuum")
    con.close()
    return changed


if __name__ == "__main__":  # python3 scripts/record_plan.py scrub FILE.sqlite...
    import sys

    if len(sys.argv) >= 3 and sys.argv[1] == "scrub":
        for p in sys.argv[2:]:
            print(p, scrub_nsys_sqlite(p))
    else:
        print(__doc__)
