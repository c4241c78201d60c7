#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Record the small real GPU traces kept under ``sample_traces/``.

One script holds every workload; ``scripts/record_samples.sh`` runs them all on a
GPU machine (it wraps the nsys and torchrun command lines).

Modes
-----
``single-nsys``
    Single-GPU MoE-like *training* loop (forward + backward + AdamW), NVTX ranges
    ``step k`` / ``layerL attention|router|experts`` / ``GroupedLinear forward
    layerL.fc1|fc2``. Meant to run under ``nsys profile --capture-range=cudaProfilerApi``:
    the capture starts after the warm-up steps. Host-side faults are injected in
    chosen steps (host allocation, blocked thread, gc pass).
``two-rank-torch``
    2-rank expert-parallel MoE *inference* loop (attention data parallel, experts split
    over the ranks, NCCL all_to_all dispatch/combine) under ``torch.profiler``;
    launch with ``torchrun --nproc_per_node=2``. Writes ``rank{R}.json.gz``.
``two-rank-nsys``
    The same 2-rank workload with NVTX ranges instead of ``record_function``; each rank is
    meant to run under its own ``nsys profile --capture-range=cudaProfilerApi``.

Every mode writes an answer key (``truth*.json``) beside its trace: step numbering,
injected faults, token counts and measured per-step wall times.

``--device cpu`` runs the same code on the CPU (gloo instead of NCCL, no NVTX, no CUDA
profiler calls) with tiny sizes, as a dry run of the logic.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import time

# NVLink multicast must stay off on the shared machines (see the device notes).
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# --------------------------------------------------------------------------------------
# ranges: NVTX (nsys modes) or torch.profiler.record_function (torch mode)
# --------------------------------------------------------------------------------------


class Ranges:
    """Named host ranges. ``kind`` is 'nvtx', 'record_function' or 'none'."""

    def __init__(self, kind: str):
        self.kind = kind

    @contextlib.contextmanager
    def __call__(self, nvtx_name: str, rf_name: str | None = None):
        if self.kind == "nvtx":
            torch.cuda.nvtx.range_push(nvtx_name)
            try:
                yield
            finally:
                torch.cuda.nvtx.range_pop()
        elif self.kind == "record_function":
            with torch.profiler.record_function(rf_name or nvtx_name):
                yield
        else:
            yield


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------
# model pieces
# --------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, seq: int) -> torch.Tensor:
        t, d = x.shape
        b = t // seq
        h = self.norm(x)
        q, k, v = self.qkv(h).view(b, seq, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o = o.transpose(1, 2).reshape(t, d)
        return x + self.proj(o)


class GroupedLinear(nn.Module):
    """Per-expert weights; forward = torch.split of the token tensor + one GEMM per expert."""

    def __init__(self, n_experts: int, d_in: int, d_out: int, name: str, rng: Ranges, hook=None):
        super().__init__()
        self.name = name
        self.rng = rng
        self.hook = hook
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.randn(d_in, d_out) * d_in ** -0.5) for _ in range(n_experts)]
        )

    def forward(self, x: torch.Tensor, split_sizes: list[int]) -> torch.Tensor:
        with self.rng(f"GroupedLinear forward {self.name}"):
            if self.hook is not None:
                self.hook(self.name)
            chunks = torch.split(x, split_sizes)
            outs = [c @ w for c, w in zip(chunks, self.weights)]
            return torch.cat(outs)


class Router(nn.Module):
    def __init__(self, d: int, n_experts: int):
        super().__init__()
        self.gate = nn.Linear(d, n_experts, bias=False)
        self.n_experts = n_experts

    def forward(self, x: torch.Tensor):
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        gate, idx = probs.max(dim=-1)
        order = torch.argsort(idx, stable=True)
        counts = torch.bincount(idx, minlength=self.n_experts)
        counts_host = counts.tolist()  # split sizes must be known on the host (syncs)
        return gate.to(x.dtype), order, counts, counts_host


# --------------------------------------------------------------------------------------
# fault helpers
# --------------------------------------------------------------------------------------

_GC_JUNK: list = []


def make_gc_junk(n: int) -> None:
    """Keep ``n`` small gc-tracked objects alive so a full gc pass has work to do."""
    _GC_JUNK.clear()
    _GC_JUNK.extend([i] for i in range(n))


def fault_host_alloc(nbytes: int) -> float:
    t0 = time.perf_counter()
    buf = np.empty(nbytes // 8, dtype=np.float64)
    buf.fill(1.0)  # touch every page
    s = float(buf[:: 4096 // 8].sum())
    del buf
    assert s > 0
    return time.perf_counter() - t0


def fault_sleep(seconds: float) -> float:
    t0 = time.perf_counter()
    time.sleep(seconds)
    return time.perf_counter() - t0


def fault_gc() -> float:
    t0 = time.perf_counter()
    gc.collect()
    return time.perf_counter() - t0


def env_info(device: torch.device) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "numpy": np.__version__,
        "host": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # pragma: no cover
            pass
    return info


def write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


# --------------------------------------------------------------------------------------
# single-GPU training loop (nsys)
# --------------------------------------------------------------------------------------


class TrainLayer(nn.Module):
    def __init__(self, idx: int, d: int, ffn: int, heads: int, n_experts: int, rng: Ranges, hook):
        super().__init__()
        self.idx = idx
        self.rng = rng
        self.attn = Attention(d, heads)
        self.norm = nn.LayerNorm(d)
        self.router = Router(d, n_experts)
        self.fc1 = GroupedLinear(n_experts, d, ffn, f"layer{idx}.fc1", rng, hook)
        self.fc2 = GroupedLinear(n_experts, ffn, d, f"layer{idx}.fc2", rng, hook)
        self.last_counts: list[int] = []

    def forward(self, x: torch.Tensor, seq: int) -> torch.Tensor:
        L = self.idx
        with self.rng(f"layer{L} attention"):
            x = self.attn(x, seq)
        with self.rng(f"layer{L} router"):
            h = self.norm(x)
            gate, order, _counts, counts = self.router(h)
            self.last_counts = counts
            hs = h[order]
        with self.rng(f"layer{L} experts"):
            y = self.fc1(hs, counts)
            y = F.gelu(y)
            y = self.fc2(y, counts)
            inv = torch.argsort(order)
            y = y[inv] * gate.unsqueeze(-1)
        return x + y


def run_single(args) -> None:
    device = torch.device(args.device)
    tiny = device.type == "cpu"
    cfg = dict(
        layers=2, experts=16, hidden=1024, ffn=2048, heads=8, batch=8, seq=512,
        dtype="bfloat16", optimizer="AdamW(lr=1e-4, foreach=True)",
        warmup_steps=args.warmup, profiled_steps=args.steps,
        host_alloc_bytes=400 * 1024 * 1024, sleep_s=0.05, gc_live_objects=1_000_000,
    )
    if tiny:
        cfg.update(hidden=64, ffn=128, heads=4, batch=2, seq=64, host_alloc_bytes=8 * 1024 * 1024,
                   gc_live_objects=10_000, sleep_s=0.005)
    torch.manual_seed(0)
    rng = Ranges("nvtx" if device.type == "cuda" else "none")
    n_total = args.warmup + args.steps
    # faults at fixed loop iterations (NVTX 'step 3', 'step 5', 'step 6')
    assert args.warmup <= 3 and n_total >= 7, "fault steps 3, 5, 6 must be inside the trace"
    faults_by_step = {
        3: dict(kind="host_memory_allocation", where="GroupedLinear forward layer1.fc1",
                              detail=f"numpy allocates and touches {cfg['host_alloc_bytes'] // 2**20} MiB "
                                     "before the expert GEMMs, then frees it"),
        5: dict(kind="blocked_host_thread", where="GroupedLinear forward layer0.fc2",
                              detail=f"time.sleep({cfg['sleep_s']}) before the expert GEMMs"),
        6: dict(kind="gc_pause", where="GroupedLinear forward layer1.fc2",
                              detail=f"gc.collect() with ~{cfg['gc_live_objects']:,} extra live gc-tracked "
                                     "objects (automatic gc is disabled during the loop)"),
    }
    state = {"step": -1, "fault_s": {}}

    def hook(name: str) -> None:
        f = faults_by_step.get(state["step"])
        if f is None or f["where"] != f"GroupedLinear forward {name}":
            return
        if f["kind"] == "host_memory_allocation":
            dt = fault_host_alloc(cfg["host_alloc_bytes"])
        elif f["kind"] == "blocked_host_thread":
            dt = fault_sleep(cfg["sleep_s"])
        else:
            dt = fault_gc()
        state["fault_s"][state["step"]] = dt

    dtype = torch.bfloat16
    layers = nn.ModuleList(
        [TrainLayer(i, cfg["hidden"], cfg["ffn"], cfg["heads"], cfg["experts"], rng, hook)
         for i in range(cfg["layers"])]
    ).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(layers.parameters(), lr=1e-4, foreach=True)
    T = cfg["batch"] * cfg["seq"]
    make_gc_junk(cfg["gc_live_objects"])
    gc.collect()

    steps = []
    capturing = False
    gc.disable()
    try:
        for k in range(n_total):
            state["step"] = k
            if k == args.warmup and device.type == "cuda":
                sync(device)
                torch.cuda.profiler.start()  # nsys --capture-range=cudaProfilerApi starts here
                capturing = True
            x = torch.randn(T, cfg["hidden"], device=device, dtype=dtype)
            sync(device)
            t0 = time.perf_counter()
            label = f"step {k}" if k >= args.warmup else f"warmup {k}"
            with rng(label):
                with rng("forward"):
                    h = x
                    for layer in layers:
                        h = layer(h, cfg["seq"])
                    loss = h.float().pow(2).mean()
                with rng("backward"):
                    loss.backward()
                with rng("optimizer"):
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                sync(device)
            t1 = time.perf_counter()
            f = faults_by_step.get(k)
            steps.append(dict(
                step=k,
                nvtx_range=label,
                in_trace=k >= args.warmup,
                tokens=T,
                tokens_per_expert_by_layer=[layer.last_counts for layer in layers],
                wall_time_s=round(t1 - t0, 6),
                fault=None if f is None else dict(f, measured_fault_s=round(state["fault_s"].get(k, 0.0), 6)),
            ))
            print(f"[single] {label}: {1e3 * (t1 - t0):.2f} ms"
                  + (f"  fault={f['kind']} ({1e3 * state['fault_s'].get(k, 0):.1f} ms)" if f else ""),
                  flush=True)
    finally:
        gc.enable()
        if capturing:
            sync(device)
            torch.cuda.profiler.stop()

    clean = [s["wall_time_s"] for s in steps if s["in_trace"] and s["fault"] is None]
    truth = dict(
        trace="moe_single_nsys.sqlite",
        mode="single-nsys",
        workload=dict(cfg, description=(
            "single-GPU MoE-like training loop: per step, 2 layers of [attention (LayerNorm, QKV, "
            "causal SDPA, out proj), router (top-1 softmax gate), experts (GroupedLinear fc1 -> GELU -> "
            "GroupedLinear fc2, each = torch.split of the expert-sorted tokens + one matmul per expert)], "
            "then loss.backward() and AdamW step")),
        nvtx_ranges=["step k", "forward", "backward", "optimizer", "layerL attention", "layerL router",
                     "layerL experts", "GroupedLinear forward layerL.fc1", "GroupedLinear forward layerL.fc2"],
        step_numbering=(
            f"NVTX 'step k' is loop iteration k (0-based). Iterations 0..{args.warmup - 1} are warm-ups "
            f"(NVTX 'warmup k') run before cudaProfilerStart and are not in the trace; the trace "
            f"(nsys --capture-range=cudaProfilerApi) holds 'step {args.warmup}'..'step {n_total - 1}'. "
            "Wall time = time.perf_counter() around the step, after torch.cuda.synchronize() before "
            "and inside the end of the 'step k' range; layer ranges cover the forward pass only "
            "(backward runs on autograd's thread with no layer ranges)."),
        faults=[dict(step=k, **v, measured_fault_s=round(state["fault_s"].get(k, 0.0), 6))
                for k, v in sorted(faults_by_step.items())],
        clean_step_wall_time_s_median=round(float(np.median(clean)), 6) if clean else None,
        steps=steps,
        env=env_info(device),
        argv=sys.argv,
    )
    write_json(os.path.join(args.out_dir, "truth.json"), truth)


# --------------------------------------------------------------------------------------
# 2-rank expert-parallel inference loop (torch.profiler or nsys)
# --------------------------------------------------------------------------------------


class EPLayer(nn.Module):
    def __init__(self, idx, d, ffn, heads, n_experts, world, rank, rng: Ranges):
        super().__init__()
        self.idx = idx
        self.rng = rng
        self.world = world
        self.rank = rank
        self.n_local = n_experts // world
        # attention + router replicated on every rank (same seed), experts sharded
        g = torch.random.get_rng_state()
        torch.manual_seed(1000 + idx)
        self.attn = Attention(d, heads)
        self.norm = nn.LayerNorm(d)
        self.router = Router(d, n_experts)
        torch.manual_seed(2000 + 100 * idx + rank)
        self.fc1 = GroupedLinear(self.n_local, d, ffn, f"layer{idx}.fc1", rng)
        self.fc2 = GroupedLinear(self.n_local, ffn, d, f"layer{idx}.fc2", rng)
        torch.random.set_rng_state(g)

    def r(self, what: str):
        # NVTX 'layerL what' / record_function 'layerL.what'
        return self.rng(f"layer{self.idx} {what}", f"layer{self.idx}.{what}")

    def forward(self, x, seq, attn_repeat=1, before_dispatch=None):
        import torch.distributed as dist
        W, El = self.world, self.n_local
        with self.r("attention"):
            a = x
            for _ in range(attn_repeat):
                a = self.attn(x, seq)
            x = a
        with self.r("router"):
            h = self.norm(x)
            gate, order, counts, counts_host = self.router(h)
            hs = h[order].contiguous()
            send_splits = [sum(counts_host[r * El:(r + 1) * El]) for r in range(W)]
        if before_dispatch is not None:
            before_dispatch()
        with self.r("dispatch"):
            recv_counts = torch.empty_like(counts)
            dist.all_to_all_single(recv_counts, counts)  # per-expert token counts
            recv_mat = recv_counts.view(W, El).tolist()  # [src][local expert]
            recv_splits = [sum(row) for row in recv_mat]
            recv_x = hs.new_empty(sum(recv_splits), hs.shape[1])
            dist.all_to_all_single(recv_x, hs, recv_splits, send_splits)
        with self.r("experts"):
            chunks = torch.split(recv_x, [c for row in recv_mat for c in row])
            by_expert = [torch.cat([chunks[s * El + e] for s in range(W)]) for e in range(El)]
            sizes = [sum(recv_mat[s][e] for s in range(W)) for e in range(El)]
            y = self.fc1(torch.cat(by_expert), sizes)
            y = F.gelu(y)
            y = self.fc2(y, sizes)
            per_e = [torch.split(ye, [recv_mat[s][e] for s in range(W)])
                     for e, ye in enumerate(torch.split(y, sizes))]
            back = torch.cat([per_e[e][s] for s in range(W) for e in range(El)])
        with self.r("combine"):
            out = hs.new_empty(hs.shape)
            dist.all_to_all_single(out, back, send_splits, recv_splits)
            inv = torch.argsort(order)
            x = x + out[inv] * gate.unsqueeze(-1)
        stats = dict(layer=self.idx, tokens_sent_to_rank=send_splits, tokens_received_from_rank=recv_splits,
                     tokens_received=sum(recv_splits), tokens_per_local_expert=sizes)
        return x, stats


def run_two_rank(args) -> None:
    import torch.distributed as dist

    device_type = args.device
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    tiny = device.type == "cpu"
    use_torch_prof = args.mode == "two-rank-torch"
    if use_torch_prof:
        rng = Ranges("record_function")
    else:
        rng = Ranges("nvtx" if device.type == "cuda" else "none")

    # long sequences so that attention (and the 6x / 4x faults) weigh on the GPU, not only the host
    cfg = dict(layers=2, experts=16, experts_per_rank=16 // world, hidden=1024, ffn=2048, heads=8, seq=8192,
               base_seqs_per_rank=4, dtype="bfloat16", world_size=world, sleep_s=0.03)
    if tiny:
        cfg.update(hidden=64, ffn=128, heads=4, seq=32, sleep_s=0.003)
    if args.seq:
        cfg["seq"] = args.seq
    n_steps = args.steps  # loop iterations numbered 0..n_steps-1
    base = cfg["base_seqs_per_rank"]
    # fault plan (same on every rank); steps 0 and 1 are the profiler's wait / warmup (or outside the
    # nsys capture), the recorded steps are 2..n_steps-1
    imb = (4, 5)
    heavy_attn_step = 7
    stall_step = 9
    assert n_steps >= 11
    seqs_per_rank = {}
    for k in range(n_steps):
        seqs_per_rank[k] = [base] * world
        if k in imb:
            seqs_per_rank[k] = [12, 2] + [base] * (world - 2)  # rank 0 gets 6x the tokens of rank 1
    faults = [
        dict(step=imb[0], kind="batch_imbalance", ranks=[0, 1],
             detail="rank 0 gets 6x the tokens of rank 1 (12 vs 2 sequences of %d)" % cfg["seq"]),
        dict(step=imb[1], kind="batch_imbalance", ranks=[0, 1],
             detail="rank 0 gets 6x the tokens of rank 1 (12 vs 2 sequences of %d)" % cfg["seq"]),
        dict(step=heavy_attn_step, kind="heavy_attention", ranks=[1],
             detail="rank 1 runs each layer's attention block 4 times (4x attention work)"),
        dict(step=stall_step, kind="host_stall_before_dispatch", ranks=[0],
             detail=f"rank 0 calls time.sleep({cfg['sleep_s']}) right before the layer-1 dispatch"),
    ]

    dtype = torch.bfloat16
    torch.manual_seed(0)
    layers = nn.ModuleList(
        [EPLayer(i, cfg["hidden"], cfg["ffn"], cfg["heads"], cfg["experts"], world, rank, rng)
         for i in range(cfg["layers"])]
    ).to(device=device, dtype=dtype)
    layers.eval()

    fault_s: dict[int, float] = {}

    def one_step(k: int, label: str, seqs: list[int] | None = None, attn_repeat: int | None = None):
        # inputs are drawn on the device (cheap), so no rank spends host time between steps that its
        # peer would see as a wait inside its own timed step
        gen = torch.Generator(device=device).manual_seed(10_000 * (k + 7) + rank)
        T = (seqs or seqs_per_rank[k])[rank] * cfg["seq"]
        x = torch.randn(T, cfg["hidden"], generator=gen, device=device, dtype=dtype)
        if attn_repeat is None:
            attn_repeat = 4 if (k == heavy_attn_step and rank == 1) else 1
        stats = []
        sync(device)
        t0 = time.perf_counter()
        with rng(label):
            h = x
            for layer in layers:
                hook = None
                if k == stall_step and rank == 0 and layer.idx == 1:
                    def hook():
                        fault_s[k] = fault_sleep(cfg["sleep_s"])
                h, st = layer(h, cfg["seq"], attn_repeat=attn_repeat, before_dispatch=hook)
                stats.append(st)
            sync(device)
        t1 = time.perf_counter()
        return T, stats, t1 - t0

    steps = []
    with torch.no_grad():
        # unprofiled warm-ups (NCCL communicators, cuBLAS handles, caching allocator); not numbered as
        # steps. The middle one uses the imbalanced shapes and the 4x attention, so that the fault steps
        # pay no first-time cost for their new shapes.
        for w in range(args.warmup):
            odd = w == args.warmup // 2
            one_step(-1 - w, f"warmup {w}", seqs=seqs_per_rank[imb[0]] if odd else [base] * world,
                     attn_repeat=(4 if rank == 1 else 1) if odd else 1)
        dist.barrier()
        sync(device)

        def record(k, T, stats, dt, in_trace):
            my_faults = [f for f in faults if f["step"] == k and rank in f["ranks"]]
            steps.append(dict(
                step=k,
                profiler_step=f"ProfilerStep#{k}" if use_torch_prof else None,
                nvtx_range=None if use_torch_prof else f"step {k}",
                in_trace=in_trace,
                tokens_per_rank=[s * cfg["seq"] for s in seqs_per_rank[k]],
                tokens_this_rank=T,
                layers=stats,
                wall_time_s=round(dt, 6),
                faults_on_this_rank=[f["kind"] for f in my_faults],
                measured_fault_s=round(fault_s[k], 6) if k in fault_s else None,
            ))
            print(f"[rank{rank}] step {k}: T={T} recv={[s['tokens_received'] for s in stats]} "
                  f"{1e3 * dt:.2f} ms {[f['kind'] for f in my_faults]}", flush=True)

        if use_torch_prof:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            trace_path = os.path.join(args.out_dir, f"rank{rank}.json.gz")
            os.makedirs(args.out_dir, exist_ok=True)
            sched = torch.profiler.schedule(wait=1, warmup=1, active=n_steps - 2, repeat=1)
            with torch.profiler.profile(
                activities=acts, schedule=sched, record_shapes=True, with_stack=False,
                on_trace_ready=lambda p: p.export_chrome_trace(trace_path),
            ) as prof:
                for k in range(n_steps):
                    T, stats, dt = one_step(k, f"step {k}")
                    record(k, T, stats, dt, in_trace=k >= 2)
                    prof.step()
        else:
            capturing = False
            for k in range(n_steps):
                if k == 2 and device.type == "cuda":
                    sync(device)
                    torch.cuda.profiler.start()
                    capturing = True
                T, stats, dt = one_step(k, f"step {k}")
                record(k, T, stats, dt, in_trace=k >= 2)
            if capturing:
                sync(device)
                torch.cuda.profiler.stop()

    all_walls = [None] * world
    dist.all_gather_object(all_walls, [s["wall_time_s"] for s in steps])
    if use_torch_prof:
        numbering = (
            "ProfilerStep#k is loop iteration k (0-based): torch.profiler schedule(wait=1, warmup=1, "
            f"active={n_steps - 2}, repeat=1) with prof.step() after each iteration, so the trace holds "
            f"ProfilerStep#2..ProfilerStep#{n_steps - 1}; iterations 0 and 1 (wait, warmup) are not "
            f"recorded. {args.warmup} un-numbered warm-up iterations ran before the profiler was created "
            "(the middle one with the imbalanced shapes and the 4x attention, so fault steps pay no "
            "first-shape cost).")
        trace = f"moe_2rank/rank{rank}.json.gz"
    else:
        numbering = (
            "NVTX 'step k' is loop iteration k (0-based), the same numbering as the torch.profiler "
            "variant's ProfilerStep#k. nsys --capture-range=cudaProfilerApi starts before 'step 2', so the "
            f"report holds 'step 2'..'step {n_steps - 1}'; iterations 0 and 1 ran outside the capture. "
            f"{args.warmup} un-numbered warm-up iterations (NVTX 'warmup w', outside the capture) ran before "
            "them (the middle one with the imbalanced shapes and the 4x attention).")
        trace = f"moe_2rank_nsys/rank{rank}.sqlite"
    truth = dict(
        trace=trace,
        mode=args.mode,
        rank=rank,
        world_size=world,
        workload=dict(cfg, description=(
            "2-rank MoE inference (torch.no_grad), attention data-parallel + expert-parallel: per step, "
            "2 layers of [attention (replicated weights, local tokens), router (top-1 over 16 experts), "
            "dispatch (all_to_all_single of the per-expert token counts, then all_to_all_single of the "
            "expert-sorted hidden states), experts (8 local experts; GroupedLinear fc1 -> GELU -> fc2, "
            "torch.split + one matmul per expert), combine (all_to_all_single back, un-sort, gate)]. "
            "NCCL backend, NCCL_NVLS_ENABLE=0."),
            ranges=("record_function: 'layerL.attention', 'layerL.router', 'layerL.dispatch', "
                    "'layerL.experts', 'layerL.combine', 'GroupedLinear forward layerL.fc1|fc2'"
                    if use_torch_prof else
                    "NVTX: 'step k', 'layerL attention', 'layerL router', 'layerL dispatch', "
                    "'layerL experts', 'layerL combine', 'GroupedLinear forward layerL.fc1|fc2'")),
        step_numbering=numbering + (
            " Wall time = time.perf_counter() around the step, after torch.cuda.synchronize() before and "
            "at the end of the step (no barrier; ranks are coupled by the all_to_alls)."),
        recorded_steps=list(range(2, n_steps)),
        faults=faults,
        steps=steps,
        wall_time_s_all_ranks=all_walls,
        env=env_info(device),
        argv=sys.argv,
    )
    write_json(os.path.join(args.out_dir, f"truth_rank{rank}.json"), truth)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", required=True, choices=["single-nsys", "two-rank-torch", "two-rank-nsys"])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu = dry run, tiny sizes")
    p.add_argument("--steps", type=int, default=None,
                   help="single: profiled steps (default 8); two-rank: loop iterations incl. the 2 "
                        "unrecorded ones (default 12)")
    p.add_argument("--seq", type=int, default=None, help="two-rank: sequence length (default 8192)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up iterations outside the trace (default: single 2, two-rank 3)")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 8 if args.mode == "single-nsys" else 12
    if args.warmup is None:
        args.warmup = 2 if args.mode == "single-nsys" else 3
    if args.mode == "single-nsys":
        run_single(args)
    else:
        run_two_rank(args)


if __name__ == "__main__":
    main()
