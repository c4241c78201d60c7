# SPDX-License-Identifier: Apache-2.0
"""The recording script's pure parts (fault plans, N-rank imbalance schedule, answer-key helpers,
SQLite scrubbing, raw trace facts) and the answer keys of the issue-13/18 sample recordings.
No torch and no GPU needed."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sqlite3
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_traces"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


plan = _load("record_plan")
facts = _load("trace_facts")


# ---------------------------------------------------------------------------------------------
# single-GPU fault plans
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fplan, step_range", [(plan.te_fault_plan(), plan.TE_STEP_RANGE),
                                                (plan.dense_fault_plan(), plan.DENSE_STEP_RANGE)])
def test_fault_plans_are_well_formed(fplan, step_range):
    assert len(fplan) >= 4
    kinds = [f["kind"] for f in fplan.values()]
    assert len(set(kinds)) == len(kinds)
    for k, f in fplan.items():
        assert 0 <= k < 10
        assert f["expected_cause"] in plan.CAUSES
        assert f["where_path"][0] == step_range
        assert f["detail"]
    # no two faults in adjacent steps, so a fault's after-effect never lands on another fault step
    ks = sorted(fplan)
    assert all(b - a >= 1 for a, b in zip(ks, ks[1:]))


def test_te_plan_covers_the_requested_shapes():
    causes = {f["expected_cause"] for f in plan.te_fault_plan().values()}
    assert {"memory_allocation", "io", "host_sync", "garbage_collection", "gpu"} <= causes
    gc_fault = [f for f in plan.te_fault_plan().values() if f["kind"] == "gc_pause"][0]
    assert len(gc_fault["where_path"]) >= 5  # nested deep inside a layer
    assert {f["expected_cause"] for f in plan.dense_fault_plan().values()} >= {"blocked", "memory_allocation"}


def test_plan_faults_list_joins_paths_and_keeps_unmeasured_null():
    out = plan.plan_faults_list(plan.te_fault_plan(), {2: 0.0412})
    by = {f["step"]: f for f in out}
    assert by[2]["measured_fault_s"] == 0.0412
    assert by[8]["measured_fault_s"] is None
    assert by[7]["where"] == " › ".join(by[7]["where_path"])


def test_slow_steps():
    steps = [dict(step=i, in_trace=True, wall_time_s=w, fault=None) for i, w in enumerate([1.0, 1.1, 0.9, 1.0])]
    steps[3]["wall_time_s"] = 2.0
    steps[3]["fault"] = {"kind": "x"}
    steps.append(dict(step=-1, in_trace=False, wall_time_s=9.0, fault=None))
    assert plan.slow_steps(steps) == [3]
    assert plan.median([]) is None and plan.median([3, 1, 2]) == 2 and plan.median([1, 2, 3, 4]) == 2.5


# ---------------------------------------------------------------------------------------------
# N-rank schedule
# ---------------------------------------------------------------------------------------------

def _by_kind(sched):
    out = {}
    for s in sched:
        for f in s["faults"]:
            out.setdefault(f["kind"], []).append((s["step"], f))
    return out


@pytest.mark.parametrize("world", [2, 4, 8, 16])
def test_nrank_schedule_imbalances(world):
    sched = plan.nrank_schedule(world, 22, base_seqs=2)
    assert [s["step"] for s in sched] == list(range(22))
    kinds = _by_kind(sched)
    assert set(kinds) == {"heavy_rank_batch", "receive_skew_hot_experts", "two_stragglers", "host_stall", "slow_link"}
    # every fault is inside the recorded steps (0 and 1 are the profiler's wait/warmup)
    assert all(k >= 2 for v in kinds.values() for k, _ in v)
    # one heavy rank with 3x the tokens, everyone else equal
    for k, f in kinds["heavy_rank_batch"]:
        seqs = sched[k]["seqs_per_rank"]
        (heavy,) = f["ranks"]
        assert seqs[heavy] == 3 * 2 and all(n == 2 for r, n in enumerate(seqs) if r != heavy)
    # receive skew: equal batches, biased routing towards one rank's experts
    for k, f in kinds["receive_skew_hot_experts"]:
        s = sched[k]
        assert len(set(s["seqs_per_rank"])) == 1
        assert s["hot_rank"] == f["ranks"][0] and s["hot_bias"] > 0
    # two distinct stragglers at once (3x attention), nobody else slowed
    (k, f), = kinds["two_stragglers"]
    if world >= 3:
        assert len(f["ranks"]) == 2
        assert [r for r, a in enumerate(sched[k]["attn_repeat"]) if a > 1] == f["ranks"]
    (k, f), = kinds["host_stall"]
    assert sched[k]["stall_rank"] == f["ranks"][0] and sched[k]["stall_layer"] == 1
    (k, f), = kinds["slow_link"]
    assert sched[k]["slow_link_rank"] == f["ranks"][0]
    # fault steps are separated by clean steps
    fault_steps = sorted({k for v in kinds.values() for k, _ in v})
    clean = [s["step"] for s in sched if not s["faults"] and s["step"] >= 2]
    assert len(clean) >= 10 and not set(fault_steps) & set(clean)


def test_nrank_schedule_single_rank_skips_what_needs_peers():
    sched = plan.nrank_schedule(1, 20)
    skipped = {k for s in sched for k in s["skipped"]}
    assert skipped == {"heavy_rank_batch", "receive_skew_hot_experts", "two_stragglers"}
    assert {f["kind"] for s in sched for f in s["faults"]} == {"host_stall", "slow_link"}
    with pytest.raises(AssertionError):
        plan.nrank_schedule(8, 12)


def test_route_bias_and_splits():
    b = plan.route_bias(32, 8, 3, 4.0)
    assert [i for i, x in enumerate(b) if x] == [12, 13, 14, 15] and set(b) == {0.0, 4.0}
    assert plan.route_bias(8, 2, None, 4.0) == [0.0] * 8
    assert plan.splits_from_counts([1, 2, 3, 4, 5, 6, 7, 8], 4) == [3, 7, 11, 15]


def test_layer_record_and_consistency():
    # 2 ranks, 2 local experts each; rank r's send splits and the recv matrices that match them
    send = {0: [5, 7], 1: [3, 9]}
    recv = {0: [[2, 3], [1, 2]], 1: [[4, 3], [5, 4]]}  # [src][local expert]
    recs = [[plan.layer_record(0, send[r], recv[r])] for r in (0, 1)]
    assert recs[0][0]["tokens_received_from_rank"] == [5, 3]
    assert recs[0][0]["tokens_per_local_expert"] == [3, 5]
    assert recs[1][0]["tokens_received"] == 16 and recs[1][0]["tokens_sent"] == 12
    assert plan.check_all_to_all_consistency(recs) == []
    recs[1][0]["tokens_received_from_rank"][0] = 6
    assert plan.check_all_to_all_consistency(recs) == ["layer 0: rank 0 sent 7 to rank 1, which received 6"]


# ---------------------------------------------------------------------------------------------
# scrubbing
# ---------------------------------------------------------------------------------------------

def test_scrub_nsys_sqlite(tmp_path):
    p = tmp_path / "t.sqlite"
    c = sqlite3.connect(p)
    c.execute("create table TARGET_INFO_SYSTEM_ENV(globalVid, devStateName, name, nameEnum, value)")
    c.executemany("insert into TARGET_INFO_SYSTEM_ENV values (1, 'x', ?, 0, ?)", [
        ("DeviceEnvironment", "HOME=/root;CONTAINER_NAME=abc;NCCL_NVLS_ENABLE=0;CUDA_VISIBLE_DEVICES=0"),
        ("Hostname", "node-17"), ("CpuCores", "32")])
    c.execute("create table META_DATA_CAPTURE(name, value)")
    c.executemany("insert into META_DATA_CAPTURE values (?, ?)", [
        ("DEVICE_DISPLAY_NAME", "node-17"), ("PROCESS_0:ENVIRONMENT_VARIABLE", "SECRET=1"),
        ("PROCESS_0:USER_NAME", "alice"), ("PROCESS_0:COMMAND", "python3")])
    c.execute("create table META_DATA_EXPORT(name, value)")
    c.execute("insert into META_DATA_EXPORT values ('EXPORT_HOST', 'node-17')")
    c.execute("create table StringIds(id integer primary key, value text)")
    c.executemany("insert into StringIds values (?, ?)", [
        (1, "HOME=/root"), (2, "aten::mm, seq = 4, op_id = 1"), (3, "NCCL_NVLS_ENABLE=0"), (4, "sm90_gemm")])
    c.commit()
    c.close()
    changed = plan.scrub_nsys_sqlite(str(p))
    assert changed
    c = sqlite3.connect(p)
    env = dict(c.execute("select name, value from TARGET_INFO_SYSTEM_ENV").fetchall())
    assert env["DeviceEnvironment"] == "NCCL_NVLS_ENABLE=0;CUDA_VISIBLE_DEVICES=0"
    assert env["Hostname"] == "scrubbed" and env["CpuCores"] == "32"
    cap = c.execute("select name, value from META_DATA_CAPTURE").fetchall()
    assert ("PROCESS_0:ENVIRONMENT_VARIABLE", "") in cap and ("PROCESS_0:USER_NAME", "scrubbed") in cap
    assert ("DEVICE_DISPLAY_NAME", "scrubbed") in cap and ("PROCESS_0:COMMAND", "python3") in cap
    assert c.execute("select value from META_DATA_EXPORT").fetchone()[0] == "scrubbed"
    assert dict(c.execute("select id, value from StringIds").fetchall()) == {
        1: "scrubbed", 2: "aten::mm, seq = 4, op_id = 1", 3: "NCCL_NVLS_ENABLE=0", 4: "sm90_gemm"}
    assert "node-17" not in p.read_bytes().decode("latin-1")


# ---------------------------------------------------------------------------------------------
# the committed recordings and their answer keys
# ---------------------------------------------------------------------------------------------

SINGLE = {"te_moe_torch": "train_step", "te_moe_nsys": "train_step", "dense_torch": "iteration",
          "dense_nsys": "iteration"}


@pytest.mark.parametrize("name", sorted(SINGLE))
def test_single_gpu_keys(name):
    t = json.loads((SAMPLES / name / "truth.json").read_text())
    assert (SAMPLES / name / t["trace"]).exists()
    rec = [s for s in t["steps"] if s["in_trace"]]
    assert [s["step"] for s in rec] == list(range(10))
    assert all(s["wall_time_s"] > 0 and s["step_range"] == SINGLE[name] for s in t["steps"])
    fplan = plan.te_fault_plan() if name.startswith("te") else plan.dense_fault_plan()
    assert {f["step"] for f in t["faults"]} == set(fplan)
    clean = statistics.median(s["wall_time_s"] for s in rec if s["fault"] is None)
    for s in rec:
        f = s["fault"]
        if f is None:
            continue
        assert f["expected_cause"] in plan.CAUSES and f["where"] == " › ".join(f["where_path"])
        assert f["where_path"] == fplan[s["step"]]["where_path"]
        # every injected fault slowed its step clearly in these recordings
        assert s["wall_time_s"] > 1.5 * clean, (s["step"], s["wall_time_s"], clean)
        assert f["measured_fault_s"] is not None or f["kind"] == "gpu_backward_excess"
    assert all("trace_facts" in s for s in rec)


@pytest.mark.parametrize("name", ["te_moe_nsys", "dense_nsys"])
def test_scrubbed_and_facts_reproduce(name):
    path = SAMPLES / name / "trace.sqlite"
    c = sqlite3.connect(path)
    env = dict(c.execute("select name, value from TARGET_INFO_SYSTEM_ENV").fetchall())
    kept = {kv.split("=", 1)[0] for kv in env["DeviceEnvironment"].split(";") if kv}
    assert kept <= set(plan._KEEP_ENV)
    assert env["Hostname"] == "scrubbed"
    c.close()
    t = json.loads((SAMPLES / name / "truth.json").read_text())
    got = facts.nsys_facts(str(path), SINGLE[name])
    want = [s["trace_facts"] for s in t["steps"] if s["in_trace"]]
    assert got == want
    by_kind = {s["fault"]["kind"]: s["trace_facts"] for s in t["steps"] if s["in_trace"] and s["fault"]}
    clean = [s["trace_facts"] for s in t["steps"] if s["in_trace"] and not s["fault"]]
    assert by_kind["cuda_allocator_churn"].get("cuda_malloc", 0) > 100
    assert all(f.get("cuda_malloc", 0) <= 1 for f in clean)
    assert by_kind["file_io"]["osrt_fsync"] >= 1 and by_kind["file_io"]["osrt_write"] >= 96
    assert by_kind["host_sync"]["syncs"] > 10 * max(f["syncs"] for f in clean)
    if name == "te_moe_nsys":
        assert all(f["kernel_streams"] == 5 for f in want)
        g = by_kind["gpu_backward_excess"]
        assert g["kernels_ms"] > 10 * max(f["kernels_ms"] for f in clean)
        assert g["launches_other_threads"] > 2 * max(f["launches_other_threads"] for f in clean)
    else:
        assert by_kind["queue_wait"]["osrt_sem_wait_ms"] > 150
        assert all(f["graph_launches"] == 1 for f in want)


def test_nrank_gloo_keys():
    d = SAMPLES / "moe_nrank_2rank_gloo_1gpu"
    keys = [json.loads((d / f"truth_rank{r}.json").read_text()) for r in (0, 1)]
    assert [k["rank"] for k in keys] == [0, 1] and all(k["world_size"] == 2 for k in keys)
    assert keys[0]["schedule"] == keys[1]["schedule"] == [
        {k: s[k] for k in ("step", "seqs_per_rank", "attn_repeat", "hot_rank", "stall_rank", "slow_link_rank",
                           "faults", "skipped")} for s in plan.nrank_schedule(2, 22, 2)]
    for k in range(22):
        per_rank = [keys[r]["steps"][k]["layers"] for r in (0, 1)]
        assert plan.check_all_to_all_consistency(per_rank) == []
    for k in (8, 9):  # receive skew: rank 1 receives every token, rank 0 none
        assert [keys[r]["steps"][k]["layers"][0]["tokens_received"] for r in (0, 1)] == [0, 8192]
    for k in (4, 5):
        assert keys[1]["steps"][k]["tokens_this_rank"] == 3 * keys[0]["steps"][k]["tokens_this_rank"]
    walls = keys[0]["wall_time_s_all_ranks"]
    rec = range(2, 22)
    clean = statistics.median(walls[0][k] for k in rec if not keys[0]["steps"][k]["faults_this_step"])
    for k in (4, 15, 18):  # heavy rank, host stall, slow link slow both ranks down
        assert min(walls[0][k], walls[1][k]) > 1.5 * clean


def test_nrank_8rank_gloo_keys():
    d = SAMPLES / "moe_nrank_8rank_gloo_1gpu"
    keys = [json.loads((d / f"truth_rank{r}.json").read_text()) for r in range(8)]
    assert all(k["world_size"] == 8 and k["rank"] == r for r, k in enumerate(keys))
    want = [{k: s[k] for k in ("step", "seqs_per_rank", "attn_repeat", "hot_rank", "stall_rank", "slow_link_rank",
                               "faults", "skipped")} for s in plan.nrank_schedule(8, 22, 2)]
    assert all(k["schedule"] == want for k in keys)
    for k in range(22):
        assert plan.check_all_to_all_consistency([keys[r]["steps"][k]["layers"] for r in range(8)]) == []
    hot = want[8]["hot_rank"]
    for k in (8, 9):
        recv = [keys[r]["steps"][k]["layers"][0]["tokens_received"] for r in range(8)]
        assert recv[hot] == 8 * 4096 and sum(recv) == recv[hot]
    heavy = [f for f in want[4]["faults"] if f["kind"] == "heavy_rank_batch"][0]["ranks"][0]
    assert keys[heavy]["steps"][4]["tokens_this_rank"] == 3 * 4096
    assert keys[0]["steps"][15]["measured_fault_s"] > 0.029
    assert all((d / f"rank{r}.json.gz").exists() for r in range(8))
