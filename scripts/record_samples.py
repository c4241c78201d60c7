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

``te-moe-torch`` / ``te-moe-nsys``
    Single-GPU MoE training shaped like Megatron-Core + TransformerEngine: 6 layers x 16 experts,
    ranges ``train_step`` (same name every step, no number) > ``forward`` > ``decoder.layers.N`` >
    ``self_attention`` > ``core_attention`` | ``mlp`` > ``router`` | ``experts`` > ``GroupedLinear
    fc1|fc2``; expert GEMMs on 4 side streams. Faults (``record_plan.te_fault_plan``): CUDA allocator
    churn, file I/O + fsync, 2000 ``.item()`` host syncs, a gc pause in ``core_attention``, extra GPU
    work launched in backward. torch variant: no ProfilerStep markers.
``dense-torch`` / ``dense-nsys``
    Single-GPU dense training: per-parameter Adam (many small kernels), a CUDA-graph EMA replay, a
    data-loader thread + queue; the nsys variant runs under ``emit_nvtx(record_shapes=True)``.
    Faults (``record_plan.dense_fault_plan``): queue wait, allocator churn, host syncs, file I/O.
``nrank-torch`` / ``nrank-nsys``
    N-rank (``torchrun --nproc_per_node=N``) attention-DP + expert-EP inference with the imbalance
    schedule of ``record_plan.nrank_schedule`` (heavy rank 3x tokens, receive skew by routing, two
    stragglers, host stall, slow link); ``--backend gloo`` lets several ranks share one GPU (or run on
    the CPU) as a test of the logic.

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


# --------------------------------------------------------------------------------------
# shared helpers of the issue-13/18 modes
# --------------------------------------------------------------------------------------

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import record_plan as plan  # noqa: E402


def set_thread_name(name: str) -> None:
    """Name the calling OS thread (what nsys's ThreadNames shows); Linux only, best effort."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except Exception:  # pragma: no cover
        pass


def fault_allocator_churn(device: torch.device, rounds: int, base_mib: int) -> float:
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for i in range(rounds):
        t = torch.empty((base_mib + i) * 2**20, dtype=torch.uint8, device=device)
        t[:1].zero_()
        del t
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return time.perf_counter() - t0


def fault_file_io(path: str, n_writes: int, chunk: int, fsync_every: int) -> float:
    t0 = time.perf_counter()
    buf = os.urandom(chunk)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for i in range(n_writes):
            os.write(fd, buf)
            if fsync_every and (i + 1) % fsync_every == 0:
                os.fsync(fd)
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(path)
    return time.perf_counter() - t0


class TorchOrNsys:
    """Start/stop of the capture: nsys (cudaProfilerStart/Stop) or torch.profiler without a schedule
    (so the Kineto trace holds no ProfilerStep#k markers: the un-numbered step range is the only one)."""

    def __init__(self, kind: str, device: torch.device, trace_path: str):
        self.kind, self.device, self.trace_path = kind, device, trace_path
        self.prof = None

    def start(self):
        sync(self.device)
        if self.kind == "torch":
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts, record_shapes=True, with_stack=False)
            self.prof.start()
        elif self.device.type == "cuda":
            torch.cuda.profiler.start()

    def stop(self):
        sync(self.device)
        if self.kind == "torch" and self.prof is not None:
            self.prof.stop()
            os.makedirs(os.path.dirname(os.path.abspath(self.trace_path)), exist_ok=True)
            raw = self.trace_path[:-3] if self.trace_path.endswith(".gz") else self.trace_path
            self.prof.export_chrome_trace(raw)
            if raw != self.trace_path:
                import gzip
                import shutil
                with open(raw, "rb") as f, gzip.open(self.trace_path, "wb", compresslevel=9) as g:
                    shutil.copyfileobj(f, g)
                os.unlink(raw)
        elif self.device.type == "cuda":
            torch.cuda.profiler.stop()


def step_entry(k: int, in_trace: bool, range_name: str, wall: float, fplan: dict, measured: dict, **extra) -> dict:
    f = fplan.get(k) if in_trace else None
    fault = None
    if f is not None:
        fault = dict(kind=f["kind"], where=" › ".join(f["where_path"]), where_path=f["where_path"],
                     expected_cause=f["expected_cause"], detail=f["detail"],
                     measured_fault_s=round(measured[k], 6) if k in measured else None)
    return dict(step=k, in_trace=in_trace, step_range=range_name, wall_time_s=round(wall, 6), fault=fault, **extra)


# --------------------------------------------------------------------------------------
# te-moe: TransformerEngine-style MoE training, GEMMs on several streams, 'train_step' ranges
# --------------------------------------------------------------------------------------


class MultiStreamGroupedLinear(nn.Module):
    """Per-expert weights; expert e's GEMM runs on side stream e % n_streams (like TE's multi-stream
    grouped GEMM); the result is joined back on the current stream."""

    def __init__(self, n_experts, d_in, d_out, label, rng: Ranges, streams, hook=None):
        super().__init__()
        self.label, self.rng, self.streams, self.hook = label, rng, streams, hook
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.randn(d_in, d_out) * d_in ** -0.5) for _ in range(n_experts)])

    def forward(self, x, split_sizes):
        with self.rng(f"GroupedLinear {self.label}"):
            if self.hook is not None:
                self.hook(self.label)
            chunks = torch.split(x, split_sizes)
            if not self.streams:
                return torch.cat([c @ w for c, w in zip(chunks, self.weights)])
            cur = torch.cuda.current_stream()
            for s in self.streams:
                s.wait_stream(cur)
            outs = []
            for e, (c, w) in enumerate(zip(chunks, self.weights)):
                s = self.streams[e % len(self.streams)]
                with torch.cuda.stream(s):
                    o = c @ w
                o.record_stream(cur)
                outs.append(o)
            for s in self.streams:
                cur.wait_stream(s)
            return torch.cat(outs)


class _GradNoise(torch.autograd.Function):
    """Identity forward; backward launches extra GPU work (the GPU-excess fault)."""

    work: dict = {}

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        w = _GradNoise.work
        acc = w["acc"]
        for _ in range(w["mm"]):
            acc.add_((w["a"] @ w["b"])[0, :8].float())
        for _ in range(w["small"]):
            acc.mul_(0.5)
        return g


class TELayer(nn.Module):
    def __init__(self, idx, d, ffn, heads, n_experts, rng, streams, hook):
        super().__init__()
        self.idx, self.rng, self.heads = idx, rng, heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.ln2 = nn.LayerNorm(d)
        self.gate = nn.Linear(d, n_experts, bias=False)
        self.n_experts = n_experts
        self.fc1 = MultiStreamGroupedLinear(n_experts, d, ffn, "fc1", rng, streams, hook)
        self.fc2 = MultiStreamGroupedLinear(n_experts, ffn, d, "fc2", rng, streams, hook)
        self.hooks: dict = {}
        self.last_counts: list[int] = []

    def forward(self, x, seq):
        r = self.rng
        t, d = x.shape
        b = t // seq
        with r(f"decoder.layers.{self.idx}"):
            with r("self_attention"):
                h = self.ln1(x)
                q, k, v = self.qkv(h).view(b, seq, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
                with r("core_attention"):
                    if "core_attention" in self.hooks:
                        self.hooks["core_attention"]()
                    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                x = x + self.proj(o.transpose(1, 2).reshape(t, d))
            with r("mlp"):
                h = self.ln2(x)
                with r("router"):
                    probs = torch.softmax(self.gate(h).float(), dim=-1)
                    if "router" in self.hooks:
                        self.hooks["router"](probs)
                    gate, idx = probs.max(dim=-1)
                    order = torch.argsort(idx, stable=True)
                    counts = torch.bincount(idx, minlength=self.n_experts).tolist()
                    self.last_counts = counts
                with r("experts"):
                    hs = h[order]
                    y = self.fc1(hs, counts)
                    if "after_fc1" in self.hooks:
                        y = self.hooks["after_fc1"](y)
                    y = F.gelu(y)
                    y = self.fc2(y, counts)
                    y = y[torch.argsort(order)] * gate.to(y.dtype).unsqueeze(-1)
            return x + y


def run_te(args) -> None:
    device = torch.device(args.device)
    tiny = device.type == "cpu"
    profiler = "torch" if args.mode.endswith("torch") else "nsys"
    cfg = dict(layers=6, experts=16, hidden=1024, ffn=1536, heads=16, batch=4, seq=1024, n_streams=4,
               dtype="bfloat16", optimizer="AdamW(lr=1e-4, fused=True)", warmup_steps=args.warmup,
               recorded_steps=args.steps, churn_rounds=160, churn_base_mib=64, io_writes=96, io_chunk=2**20,
               item_syncs=2000, gc_live_objects=1_500_000, extra_mm=600, extra_mm_dim=4096, extra_small=300)
    if tiny:
        cfg.update(hidden=64, ffn=96, heads=4, batch=2, seq=32, churn_rounds=4, churn_base_mib=1, io_writes=4,
                   io_chunk=4096, item_syncs=20, gc_live_objects=20_000, extra_mm=2, extra_mm_dim=64, extra_small=5)
    fplan = plan.te_fault_plan()
    assert args.steps > max(fplan), "the fault steps must be inside the recording"
    rng = Ranges("record_function" if profiler == "torch" else ("nvtx" if device.type == "cuda" else "none"))
    streams = [torch.cuda.Stream(device) for _ in range(cfg["n_streams"])] if device.type == "cuda" else []
    torch.manual_seed(0)
    dtype = torch.bfloat16
    state = {"k": None}
    measured: dict[int, float] = {}

    layers = nn.ModuleList([TELayer(i, cfg["hidden"], cfg["ffn"], cfg["heads"], cfg["experts"], rng, streams,
                                    None) for i in range(cfg["layers"])]).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(layers.parameters(), lr=1e-4, fused=device.type == "cuda")
    D = cfg["extra_mm_dim"]
    _GradNoise.work = dict(a=torch.randn(D, D, device=device, dtype=dtype), b=torch.randn(D, D, device=device, dtype=dtype),
                           acc=torch.zeros(8, device=device), mm=cfg["extra_mm"], small=cfg["extra_small"])
    T = cfg["batch"] * cfg["seq"]
    ckpt = os.path.join(args.out_dir, ".ckpt_fault.bin")
    os.makedirs(args.out_dir, exist_ok=True)

    def install(k):
        for layer in layers:
            layer.hooks = {}
            layer.fc1.hook = None
        f = fplan.get(k)
        if f is None:
            return
        if f["kind"] == "cuda_allocator_churn":
            def h(label, _k=k):
                if label == "fc1":
                    measured[_k] = fault_allocator_churn(device, cfg["churn_rounds"], cfg["churn_base_mib"])
            layers[3].fc1.hook = h
        elif f["kind"] == "host_sync":
            def h(probs, _k=k):
                t0 = time.perf_counter()
                s = 0.0
                for i in range(cfg["item_syncs"]):
                    s += probs[i % probs.shape[0], :4].sum().item()
                measured[_k] = time.perf_counter() - t0
            layers[2].hooks["router"] = h
        elif f["kind"] == "gc_pause":
            layers[5].hooks["core_attention"] = lambda _k=k: measured.__setitem__(_k, fault_gc())
        elif f["kind"] == "gpu_backward_excess":
            layers[1].hooks["after_fc1"] = _GradNoise.apply

    make_gc_junk(cfg["gc_live_objects"])
    gc.collect()
    cap = TorchOrNsys(profiler, device, os.path.join(args.out_dir, "trace.json.gz"))
    steps = []
    gc.disable()
    try:
        n_total = args.warmup + args.steps
        for i in range(n_total):
            k = i - args.warmup  # recorded index; warm-ups are negative
            if k == 0:
                cap.start()
            in_trace = k >= 0
            install(k if in_trace else None)
            x = torch.randn(T, cfg["hidden"], device=device, dtype=dtype)
            sync(device)
            t0 = time.perf_counter()
            with rng(plan.TE_STEP_RANGE):
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
                    if in_trace and fplan.get(k, {}).get("kind") == "file_io":
                        measured[k] = fault_file_io(ckpt, cfg["io_writes"], cfg["io_chunk"], 0)
                sync(device)
            dt = time.perf_counter() - t0
            steps.append(step_entry(k, in_trace, plan.TE_STEP_RANGE, dt, fplan, measured, tokens=T,
                                    tokens_per_expert_by_layer=[layer.last_counts for layer in layers]))
            print(f"[te] step {k}: {1e3 * dt:.2f} ms {fplan.get(k, {}).get('kind', '') if in_trace else 'warmup'}"
                  + (f" fault {1e3 * measured[k]:.1f} ms" if in_trace and k in measured else ""), flush=True)
    finally:
        gc.enable()
        cap.stop()

    rec = [s for s in steps if s["in_trace"]]
    clean = [s["wall_time_s"] for s in rec if s["fault"] is None]
    trace = "trace.json.gz" if profiler == "torch" else "trace.sqlite"
    truth = dict(
        trace=trace, mode=args.mode, profiler=profiler,
        workload=dict(cfg, description=(
            "single-GPU MoE training in the shape of Megatron-Core + TransformerEngine: 6 decoder layers of "
            "[self_attention (LayerNorm, QKV, core_attention = causal SDPA, out proj), mlp (router: top-1 "
            "softmax over 16 experts, counts.tolist() host sync; experts: GroupedLinear fc1 -> GELU -> "
            "GroupedLinear fc2, each a torch.split + one GEMM per expert, expert e on CUDA side stream "
            "e % 4)], then loss.backward() (autograd runs each GEMM's backward on its forward stream) and "
            "fused AdamW")),
        ranges=("train_step (same name every iteration, no number) > forward > decoder.layers.N > "
                "self_attention > core_attention | mlp > router | experts > GroupedLinear fc1 | GroupedLinear fc2; "
                "train_step > backward; train_step > optimizer. " + (
                    "record_function ranges; no ProfilerStep markers (profiler started/stopped around the loop, "
                    "prof.step() never called)" if profiler == "torch" else "NVTX push/pop ranges")),
        step_numbering=(
            f"Steps are the 'train_step' ranges in trace order, numbered 0..{args.steps - 1} (step = that index). "
            f"{args.warmup} warm-up iterations (steps -{args.warmup}..-1) ran before the capture started "
            "and are not in the trace. Wall time = time.perf_counter() around the step, after "
            "torch.cuda.synchronize() before it and at the end of (inside) the 'train_step' range. Automatic "
            "Python gc is disabled during the loop."),
        faults=plan.plan_faults_list(fplan, measured),
        clean_step_wall_time_s_median=round(float(np.median(clean)), 6) if clean else None,
        slow_steps_over_1_2x_clean_median=plan.slow_steps(steps),
        steps=steps, env=env_info(device), argv=sys.argv)
    write_json(os.path.join(args.out_dir, "truth.json"), truth)


# --------------------------------------------------------------------------------------
# dense: dense model, per-parameter optimizer, CUDA-graph EMA, data-loader thread, emit_nvtx
# --------------------------------------------------------------------------------------


class DenseBlock(nn.Module):
    def __init__(self, d, ffn):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.up = nn.Linear(d, ffn)
        self.down = nn.Linear(ffn, d)
        # small per-channel parameters: many tiny tensors for the per-parameter optimizer
        self.scales = nn.ParameterList([nn.Parameter(torch.ones(d)) for _ in range(6)])

    def forward(self, x):
        h = self.down(F.gelu(self.up(self.ln(x))))
        for s in self.scales:
            h = h * s
        return x + h


def run_dense(args) -> None:
    import queue
    import threading

    device = torch.device(args.device)
    tiny = device.type == "cpu"
    profiler = "torch" if args.mode.endswith("torch") else "nsys"
    cfg = dict(layers=8, hidden=2048, ffn=8192, tokens=4096, dtype="bfloat16",
               optimizer="Adam(lr=1e-4, foreach=False): one set of small kernels per parameter",
               ema="EMA of the parameters (torch._foreach_lerp_) captured once in a CUDA graph, replayed every step",
               loader="a 'data_loader' thread puts CPU batches (pinned) into queue.Queue(maxsize=2)",
               warmup_steps=args.warmup, recorded_steps=args.steps, loader_delay_s=0.25, churn_rounds=32,
               churn_base_mib=256, grad_norm_passes=3, io_writes=1500, io_chunk=16384, io_fsync_every=10,
               emit_nvtx=profiler == "nsys" and device.type == "cuda")
    if tiny:
        cfg.update(hidden=64, ffn=128, tokens=128, loader_delay_s=0.05, churn_rounds=3, churn_base_mib=1,
                   io_writes=20, io_chunk=1024, io_fsync_every=10)
    fplan = plan.dense_fault_plan()
    assert args.steps > max(fplan)
    rng = Ranges("record_function" if profiler == "torch" else ("nvtx" if device.type == "cuda" else "none"))
    torch.manual_seed(0)
    dtype = torch.bfloat16
    model = nn.Sequential(*[DenseBlock(cfg["hidden"], cfg["ffn"]) for _ in range(cfg["layers"])]).to(device, dtype)
    params = list(model.parameters())
    cfg["n_params"] = len(params)
    opt = torch.optim.Adam(params, lr=1e-4, foreach=False)
    ema = [p.detach().clone() for p in params]
    n_total = args.warmup + args.steps
    measured: dict[int, float] = {}
    os.makedirs(args.out_dir, exist_ok=True)
    logf = os.path.join(args.out_dir, ".metrics_fault.log")

    # data loader thread
    q: "queue.Queue" = queue.Queue(maxsize=2)
    pool = [torch.randn(cfg["tokens"], cfg["hidden"], dtype=dtype) for _ in range(3)]
    if device.type == "cuda":
        pool = [p.pin_memory() for p in pool]
    delay_batch = args.warmup + min(k for k, f in fplan.items() if f["kind"] == "queue_wait")
    # the loader holds the delayed batch back until the trainer has started the step before it, then
    # sleeps: the wait does not depend on how far ahead the loader was (or on a slow capture start)
    go = threading.Event()

    def loader():
        set_thread_name("data_loader")
        for i in range(n_total):
            b = pool[i % len(pool)].clone()
            if device.type == "cuda":
                b = b.pin_memory()
            time.sleep(0.002)
            if i == delay_batch:
                go.wait(timeout=60)
                time.sleep(cfg["loader_delay_s"])
            q.put(b)

    th = threading.Thread(target=loader, name="data_loader", daemon=True)

    def ema_eager():
        torch._foreach_lerp_(ema, [p.detach() for p in params], 0.001)

    graph = None

    def train_iter(k, in_trace):
        f = fplan.get(k) if in_trace else None
        kind = f["kind"] if f else None
        with rng("data"):
            t0 = time.perf_counter()
            b = q.get()
            if kind == "queue_wait":
                measured[k] = time.perf_counter() - t0
            x = b.to(device, non_blocking=True)
        with rng("forward"):
            if kind == "cuda_allocator_churn":
                measured[k] = fault_allocator_churn(device, cfg["churn_rounds"], cfg["churn_base_mib"])
            loss = model(x).float().pow(2).mean()
        with rng("backward"):
            loss.backward()
        with rng("optimizer"):
            if kind == "host_sync":
                t0 = time.perf_counter()
                norms = [p.grad.norm().item() for _ in range(cfg["grad_norm_passes"]) for p in params]
                assert len(norms) == cfg["grad_norm_passes"] * len(params)
                measured[k] = time.perf_counter() - t0
            opt.step()
            opt.zero_grad(set_to_none=False)
        with rng("ema_update"):
            if graph is not None:
                graph.replay()
            else:
                ema_eager()
        if kind == "file_io":
            measured[k] = fault_file_io(logf, cfg["io_writes"], cfg["io_chunk"], cfg["io_fsync_every"])

    cap = TorchOrNsys(profiler, device, os.path.join(args.out_dir, "trace.json.gz"))
    steps = []
    th.start()
    nvtx_ctx = contextlib.nullcontext()
    try:
        for i in range(n_total):
            k = i - args.warmup
            in_trace = k >= 0
            if i == 1 and device.type == "cuda":
                # capture the EMA update once (after one eager warm-up step: grads and Adam state exist)
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    ema_eager()
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    ema_eager()
            if k == 0:
                cap.start()
                if cfg["emit_nvtx"]:
                    nvtx_ctx = torch.autograd.profiler.emit_nvtx(record_shapes=True)
                    nvtx_ctx.__enter__()
            if i == delay_batch - 1:
                go.set()
            sync(device)
            t0 = time.perf_counter()
            with rng(plan.DENSE_STEP_RANGE):
                train_iter(k, in_trace)
                sync(device)
            dt = time.perf_counter() - t0
            steps.append(step_entry(k, in_trace, plan.DENSE_STEP_RANGE, dt, fplan, measured,
                                    profiler_step=None))
            print(f"[dense] step {k}: {1e3 * dt:.2f} ms {fplan.get(k, {}).get('kind', '') if in_trace else 'warmup'}"
                  + (f" fault {1e3 * measured[k]:.1f} ms" if in_trace and k in measured else ""), flush=True)
    finally:
        if cfg["emit_nvtx"] and not isinstance(nvtx_ctx, contextlib.nullcontext):
            nvtx_ctx.__exit__(None, None, None)
        cap.stop()
        th.join(timeout=5)

    rec = [s for s in steps if s["in_trace"]]
    clean = [s["wall_time_s"] for s in rec if s["fault"] is None]
    truth = dict(
        trace="trace.json.gz" if profiler == "torch" else "trace.sqlite", mode=args.mode, profiler=profiler,
        workload=dict(cfg, description=(
            "single-GPU dense training: 8 residual blocks [LayerNorm, Linear 2048->8192 (+bias), GELU, "
            "Linear 8192->2048 (+bias), 6 per-channel scale vectors], loss = mean(h^2); Adam with "
            "foreach=False (a few small kernels per parameter, 12 parameters a block); an EMA of the parameters "
            "replayed from a CUDA graph; batches from a data-loader thread through a queue")),
        ranges=("'iteration' (same name every iteration, no number) > data | forward | backward | optimizer | "
                "ema_update. " + ("record_function ranges; no ProfilerStep markers (the profiler ran without a "
                                  "schedule, so torch's prof.step() recorded none)" if profiler == "torch" else
                                  "NVTX push/pop ranges; in the captured steps torch.autograd.profiler.emit_nvtx("
                                  "record_shapes=True) is on, so every aten op is an NVTX range too "
                                  "('aten::mm, seq = N, op_id = M, sizes = [...]' style names; backward ops on "
                                  "autograd's thread)")),
        step_numbering=(
            f"Steps are the 'iteration' ranges in trace order, numbered 0..{args.steps - 1}"
            + f". {args.warmup} warm-up iterations (steps -{args.warmup}..-1) ran before the capture. Wall "
            "time = time.perf_counter() around the step, after torch.cuda.synchronize() before and at the end "
            "of (inside) the 'iteration' range. The data_loader thread runs ahead (queue of 2) and sleeps "
            "between batches."),
        faults=plan.plan_faults_list(fplan, measured),
        clean_step_wall_time_s_median=round(float(np.median(clean)), 6) if clean else None,
        slow_steps_over_1_2x_clean_median=plan.slow_steps(steps),
        steps=steps, env=env_info(device), argv=sys.argv)
    write_json(os.path.join(args.out_dir, "truth.json"), truth)


# --------------------------------------------------------------------------------------
# N-rank expert-parallel inference (issue 18)
# --------------------------------------------------------------------------------------


class NRankLayer(nn.Module):
    def __init__(self, idx, d, ffn, heads, n_experts, world, rank, rng: Ranges):
        super().__init__()
        self.idx, self.rng, self.world, self.rank = idx, rng, world, rank
        self.n_experts = n_experts
        self.n_local = n_experts // world
        g = torch.random.get_rng_state()
        torch.manual_seed(1000 + idx)
        self.attn = Attention(d, heads)
        self.norm = nn.LayerNorm(d)
        self.gate = nn.Linear(d, n_experts, bias=False)
        torch.manual_seed(2000 + 100 * idx + rank)
        self.fc1 = GroupedLinear(self.n_local, d, ffn, f"layer{idx}.fc1", rng)
        self.fc2 = GroupedLinear(self.n_local, ffn, d, f"layer{idx}.fc2", rng)
        torch.random.set_rng_state(g)

    def r(self, what):
        return self.rng(f"layer{self.idx} {what}", f"layer{self.idx}.{what}")

    def forward(self, x, seq, attn_repeat=1, bias=None, before_dispatch=None, slow_copies=0):
        import torch.distributed as dist
        W, El = self.world, self.n_local
        with self.r("attention"):
            a = x
            for _ in range(attn_repeat):
                a = self.attn(x, seq)
            x = a
        with self.r("router"):
            h = self.norm(x)
            logits = self.gate(h).float()
            if bias is not None:
                logits = logits + bias
            probs = torch.softmax(logits, dim=-1)
            gate, idx = probs.max(dim=-1)
            order = torch.argsort(idx, stable=True)
            counts = torch.bincount(idx, minlength=self.n_experts)
            counts_host = counts.tolist()
            hs = h[order].contiguous()
            send_splits = plan.splits_from_counts(counts_host, W)
        if before_dispatch is not None:
            before_dispatch()
        with self.r("dispatch"):
            for _ in range(slow_copies):  # slow link: extra copy work of the payload
                hs = hs.to("cpu").to(hs.device) if hs.device.type == "cuda" else hs.clone()
            recv_counts = torch.empty_like(counts)
            dist.all_to_all_single(recv_counts, counts)
            recv_mat = recv_counts.view(W, El).tolist()
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
            per_e = [torch.split(ye, [recv_mat[s][e] for s in range(W)]) for e, ye in enumerate(torch.split(y, sizes))]
            back = torch.cat([per_e[e][s] for s in range(W) for e in range(El)])
        with self.r("combine"):
            out = hs.new_empty(hs.shape)
            dist.all_to_all_single(out, back, send_splits, recv_splits)
            x = x + out[torch.argsort(order)] * gate.to(x.dtype).unsqueeze(-1)
        return x, plan.layer_record(self.idx, send_splits, recv_mat)


def run_nrank(args) -> None:
    import torch.distributed as dist

    backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    tiny = device.type == "cpu"
    profiler = "torch" if args.mode.endswith("torch") else "nsys"
    rng = Ranges("record_function" if profiler == "torch" else ("nvtx" if device.type == "cuda" else "none"))
    cfg = dict(layers=2, experts_per_rank=4, experts=4 * world, hidden=1024, ffn=2048, heads=8, seq=2048,
               base_seqs_per_rank=2, dtype="bfloat16", world_size=world, backend=backend, sleep_s=0.03,
               slow_link_copies=3)
    if tiny:
        cfg.update(hidden=64, ffn=128, heads=4, seq=32, sleep_s=0.003)
    if args.seq:
        cfg["seq"] = args.seq
    n_steps = args.steps
    sched = plan.nrank_schedule(world, n_steps, cfg["base_seqs_per_rank"])
    dtype = torch.bfloat16
    torch.manual_seed(0)
    layers = nn.ModuleList([NRankLayer(i, cfg["hidden"], cfg["ffn"], cfg["heads"], cfg["experts"], world, rank, rng)
                            for i in range(cfg["layers"])]).to(device=device, dtype=dtype)
    layers.eval()
    fault_s: dict[int, float] = {}

    def one_step(k, label, s):
        gen = torch.Generator(device=device).manual_seed(10_000 * (k + 7) + rank)
        T = s["seqs_per_rank"][rank] * cfg["seq"]
        x = torch.randn(T, cfg["hidden"], generator=gen, device=device, dtype=dtype)
        bias = None
        if s["hot_rank"] is not None:
            bias = torch.tensor(plan.route_bias(cfg["experts"], world, s["hot_rank"], s["hot_bias"]), device=device)
        stats = []
        sync(device)
        t0 = time.perf_counter()
        with rng(label):
            h = x
            for layer in layers:
                hook = None
                if s["stall_rank"] == rank and s["stall_layer"] == layer.idx:
                    def hook():
                        fault_s[k] = fault_sleep(cfg["sleep_s"])
                h, st = layer(h, cfg["seq"], attn_repeat=s["attn_repeat"][rank], bias=bias, before_dispatch=hook,
                              slow_copies=cfg["slow_link_copies"] if s["slow_link_rank"] == rank else 0)
                stats.append(st)
            sync(device)
        return T, stats, time.perf_counter() - t0

    steps = []
    with torch.no_grad():
        # un-numbered warm-ups: balanced, 3x heavy, hot-expert routing and 3x attention shapes
        warm = [sched[0], sched[4] if world >= 2 else sched[0], sched[8] if world >= 2 else sched[0],
                sched[12] if world >= 2 else sched[0]]
        for w in range(args.warmup):
            one_step(-1 - w, f"warmup {w}", dict(warm[w % len(warm)], stall_rank=None, slow_link_rank=None))
        dist.barrier()
        sync(device)
        prof = None
        if profiler == "torch":
            acts = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            trace_path = os.path.join(args.out_dir, f"rank{rank}.json")
            os.makedirs(args.out_dir, exist_ok=True)
            prof = torch.profiler.profile(
                activities=acts, schedule=torch.profiler.schedule(wait=1, warmup=1, active=n_steps - 2, repeat=1),
                record_shapes=True, on_trace_ready=lambda p: p.export_chrome_trace(trace_path))
            prof.start()
        capturing = False
        for k in range(n_steps):
            if profiler == "nsys" and k == 2 and device.type == "cuda":
                sync(device)
                torch.cuda.profiler.start()
                capturing = True
            s = sched[k]
            T, stats, dt = one_step(k, f"step {k}", s)
            mine = [f for f in s["faults"] if rank in f["ranks"]]
            steps.append(dict(step=k, profiler_step=f"ProfilerStep#{k}" if profiler == "torch" else None,
                              nvtx_range=None if profiler == "torch" else f"step {k}", in_trace=k >= 2,
                              tokens_per_rank=[n * cfg["seq"] for n in s["seqs_per_rank"]], tokens_this_rank=T,
                              attn_repeat_this_rank=s["attn_repeat"][rank], layers=stats, wall_time_s=round(dt, 6),
                              faults_this_step=[f["kind"] for f in s["faults"]],
                              faults_on_this_rank=[f["kind"] for f in mine],
                              measured_fault_s=round(fault_s[k], 6) if k in fault_s else None))
            print(f"[rank{rank}] step {k}: T={T} sent={[st['tokens_sent'] for st in stats]} "
                  f"recv={[st['tokens_received'] for st in stats]} {1e3 * dt:.2f} ms {[f['kind'] for f in mine]}",
                  flush=True)
            if prof is not None:
                prof.step()
        if prof is not None:
            prof.stop()
        if capturing:
            sync(device)
            torch.cuda.profiler.stop()
    if profiler == "torch":
        import gzip
        import shutil
        raw = os.path.join(args.out_dir, f"rank{rank}.json")
        if os.path.exists(raw):
            with open(raw, "rb") as f, gzip.open(raw + ".gz", "wb", compresslevel=9) as g:
                shutil.copyfileobj(f, g)
            os.unlink(raw)

    all_walls = [None] * world
    dist.all_gather_object(all_walls, [s["wall_time_s"] for s in steps])
    all_layers = [None] * world
    dist.all_gather_object(all_layers, [s["layers"] for s in steps])
    consistency = [e for k in range(n_steps) for e in plan.check_all_to_all_consistency([al[k] for al in all_layers])]
    name = f"moe_{world}rank" + ("" if profiler == "torch" else "_nsys")
    truth = dict(
        trace=f"{name}/rank{rank}." + ("json.gz" if profiler == "torch" else "sqlite"), mode=args.mode, rank=rank,
        world_size=world, backend=backend,
        workload=dict(cfg, description=(
            f"{world}-rank MoE inference (torch.no_grad), attention data-parallel + expert-parallel: per step "
            f"{cfg['layers']} layers of [attention (replicated weights, local tokens), router (top-1 over "
            f"{cfg['experts']} experts, optional logit bias for the hot-expert steps), dispatch (all_to_all_single "
            "of the per-expert counts, then of the expert-sorted hidden states), experts (GroupedLinear fc1 -> "
            "GELU -> fc2 over the local experts, split + one matmul per expert), combine (all_to_all_single back, "
            "un-sort, gate)]"),
            ranges=("record_function 'step k' inside ProfilerStep#k; 'layerL.attention|router|dispatch|experts|"
                    "combine', 'GroupedLinear forward layerL.fc1|fc2'" if profiler == "torch" else
                    "NVTX 'step k', 'layerL attention|router|dispatch|experts|combine', "
                    "'GroupedLinear forward layerL.fc1|fc2'")),
        step_numbering=("Loop iteration k is ProfilerStep#k (schedule wait=1, warmup=1) and NVTX/record_function "
                        f"'step k'; iterations 0 and 1 are not recorded. {args.warmup} un-numbered warm-ups ran "
                        "before (balanced, heavy-rank, hot-expert and 3x-attention shapes). Wall time = "
                        "time.perf_counter() around the step after torch.cuda.synchronize() before and at its end "
                        "(no barrier; the all_to_alls couple the ranks)."),
        recorded_steps=list(range(2, n_steps)),
        schedule=[dict(step=s["step"], seqs_per_rank=s["seqs_per_rank"], attn_repeat=s["attn_repeat"],
                       hot_rank=s["hot_rank"], stall_rank=s["stall_rank"], slow_link_rank=s["slow_link_rank"],
                       faults=s["faults"], skipped=s["skipped"]) for s in sched],
        faults=[dict(step=s["step"], **f) for s in sched for f in s["faults"]],
        steps=steps, wall_time_s_all_ranks=all_walls, all_to_all_consistency_errors=consistency,
        env=env_info(device), argv=sys.argv)
    write_json(os.path.join(args.out_dir, f"truth_rank{rank}.json"), truth)
    dist.barrier()
    dist.destroy_process_group()


MODES = ["single-nsys", "two-rank-torch", "two-rank-nsys", "te-moe-torch", "te-moe-nsys", "dense-torch",
         "dense-nsys", "nrank-torch", "nrank-nsys"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu = dry run, tiny sizes")
    p.add_argument("--steps", type=int, default=None,
                   help="single: profiled steps (default 8); two-rank: loop iterations incl. the 2 "
                        "unrecorded ones (default 12)")
    p.add_argument("--seq", type=int, default=None, help="two-rank: sequence length (default 8192)")
    p.add_argument("--backend", default=None, help="n-rank: process-group backend (default nccl on cuda, gloo on cpu)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up iterations outside the trace (default: single 2, two-rank 3)")
    args = p.parse_args(argv)
    defaults = {"single-nsys": (8, 2), "two-rank-torch": (12, 3), "two-rank-nsys": (12, 3),
                "te-moe-torch": (10, 3), "te-moe-nsys": (10, 3), "dense-torch": (10, 3), "dense-nsys": (10, 3),
                "nrank-torch": (22, 4), "nrank-nsys": (22, 4)}
    if args.steps is None:
        args.steps = defaults[args.mode][0]
    if args.warmup is None:
        args.warmup = defaults[args.mode][1]
    if args.mode == "single-nsys":
        run_single(args)
    elif args.mode.startswith("two-rank"):
        run_two_rank(args)
    elif args.mode.startswith("te-moe"):
        run_te(args)
    elif args.mode.startswith("dense"):
        run_dense(args)
    else:
        run_nrank(args)


if __name__ == "__main__":
    main()
