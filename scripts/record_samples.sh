#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Record the sample traces of sample_traces/ on a GPU machine (the default set needs >= 2 NVIDIA GPUs;
# RECORD=te-moe,dense and RECORD=nrank-1gpu need one, RECORD=nrank needs NPROC, default 8).
#
#   scripts/record_samples.sh [RESULT_DIR]      (default: $OUT, else ./recorded)
#   RECORD=te-moe,dense,nrank-1gpu scripts/record_samples.sh [RESULT_DIR]   (only those workloads)
#
# RECORD (comma list) picks the workloads; default: the original three (two-rank-torch, single-nsys,
# two-rank-nsys). Others: te-moe, dense (single GPU, torch.profiler + nsys each), nrank (NPROC ranks,
# default 8, torch.profiler + nsys), nrank-1gpu (the N-rank mode with world size 1 as a smoke test,
# plus NPROC_GLOO ranks, default 2, sharing the one GPU over gloo).
# Writes RESULT_DIR/results.tar.gz (the sample_traces/ layout), RESULT_DIR/raw.tar.gz (the .nsys-rep
# reports, when small) and RESULT_DIR/log.txt; with RECORD set, one RESULT_DIR/<workload>.tar.xz per
# workload instead of results.tar.gz. nsys SQLite exports are scrubbed of host names and environment
# variables (scripts/record_plan.py scrub).
# Needs: python3 with torch (CUDA) + numpy, torchrun, Nsight Systems (NSYS=... to override).
# If nsys's importer lacks libdw.so.1, put libdw1/libelf1 .deb files in .device/debs/ (or DEBS_DIR).
#
# Internal: scripts/record_samples.sh --nsys-rank DIR ARGS...  wraps one torchrun rank in nsys.
set -u
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
NSYS=${NSYS:-/opt/nvidia/nsight-compute/2025.3.1/host/target-linux-x64/nsys}
[ -x "$NSYS" ] || NSYS=$(command -v nsys || echo nsys)

if [ "${1:-}" = "--nsys-rank" ]; then
  outdir=$2; shift 2
  exec "$NSYS" profile -t cuda,nvtx,osrt --sample=none --cpuctxsw=none \
    --capture-range=cudaProfilerApi --capture-range-end=stop --force-overwrite=true \
    -o "$outdir/rank${RANK}" python3 "$here/record_samples.py" "$@"
fi

RES=${1:-${OUT:-$repo/recorded}}
mkdir -p "$RES"
W=/tmp/record_samples; rm -rf "$W"; mkdir -p "$W/sample_traces" "$W/raw"
S=$W/sample_traces
exec > >(tee "$RES/log.txt") 2>&1

# libdw for nsys's QdstrmImporter (carried as .deb files, unpacked outside /)
DEBS_DIR=${DEBS_DIR:-$repo/.device/debs}
if ls "$DEBS_DIR"/*.deb >/dev/null 2>&1; then
  rm -rf /tmp/dw; for f in "$DEBS_DIR"/*.deb; do dpkg -x "$f" /tmp/dw; done
  export LD_LIBRARY_PATH=/tmp/dw/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi

RECORD=${RECORD:-}
want() { [ -z "$RECORD" ] && [ "$1" = default ] && return 0; case ",$RECORD," in *",$1,"*) return 0;; esac; return 1; }
finish() {
  echo "== sizes"; (cd "$W" && find sample_traces raw -type f -exec ls -l {} \;)
  if [ -z "$RECORD" ]; then
    (cd "$W" && tar czf "$RES/results.tar.gz" sample_traces raw/versions.txt)
    (cd "$W" && tar czf "$RES/raw.tar.gz" raw)
  else
    # one archive per workload folder while they are few (the device tool returns at most 8 files)
    n_dirs=$(find "$W/sample_traces" -mindepth 1 -maxdepth 1 -type d | wc -l)
    if [ "$n_dirs" -le 5 ]; then
      for d in "$W"/sample_traces/*/; do
        n=$(basename "$d"); [ -n "$(ls -A "$d")" ] || continue
        (cd "$W/sample_traces" && tar cJf "$RES/$n.tar.xz" "$n")
      done
    else
      (cd "$W" && tar cJf "$RES/sample_traces.tar.xz" sample_traces)
    fi
    cp "$W/raw/versions.txt" "$RES/" 2>/dev/null
  fi
  ls -l "$RES"
}
scrub() { for f in "$@"; do [ -f "$f" ] && python3 "$here/record_plan.py" scrub "$f"; done; }
DEV="--device ${REC_DEVICE:-cuda}"   # REC_DEVICE=cpu: dry run of the new workloads' logic (no GPU)
nsys_single() {  # nsys_single NAME MODE OUTDIR: one single-process nsys capture + SQLite export + scrub
  local name=$1 mode=$2 out=$3 t=$SECONDS
  mkdir -p "$out"
  CUDA_VISIBLE_DEVICES=0 timeout 200 "$NSYS" profile -t cuda,nvtx,osrt -s cpu --backtrace=dwarf $SF \
    --capture-range=cudaProfilerApi --capture-range-end=stop --force-overwrite=true \
    -o "$W/raw/$name" python3 "$here/record_samples.py" --mode "$mode" $DEV --out-dir "$out"
  echo "rc=$? in $((SECONDS - t)) s"
  if [ ! -f "$W/raw/$name.nsys-rep" ] && [ -f "$W/raw/$name.qdstrm" ]; then
    timeout 120 "$(dirname "$NSYS")/QdstrmImporter" -i "$W/raw/$name.qdstrm"
  fi
  timeout 150 "$NSYS" export --type sqlite --force-overwrite=true -o "$out/trace.sqlite" "$W/raw/$name.nsys-rep"
  echo "export rc=$? in $((SECONDS - t)) s"
  scrub "$out/trace.sqlite"
}
trap finish EXIT

echo "== env"
nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import torch,numpy;print("torch",torch.__version__,"cuda",torch.version.cuda,"nccl",torch.cuda.nccl.version(),"gpus",torch.cuda.device_count(),"numpy",numpy.__version__)'
"$NSYS" --version
"$NSYS" status -e
{ nvidia-smi; python3 -VV; "$NSYS" --version; uname -a; } > "$W/raw/versions.txt" 2>&1
SF="--sampling-frequency=1000"
"$NSYS" profile --help 2>&1 | grep -q -- '--sampling-frequency' || SF="--sampling-period=1000000"
echo "sampling flag: $SF"

if want default; then
mkdir -p "$S/moe_2rank" "$S/moe_2rank_nsys"
echo "== two-rank torch.profiler"
t=$SECONDS
timeout 150 torchrun --nproc_per_node=2 --master_port=29511 "$here/record_samples.py" \
  --mode two-rank-torch --out-dir "$S/moe_2rank"
echo "rc=$? in $((SECONDS - t)) s"

echo "== single-GPU nsys"
t=$SECONDS
CUDA_VISIBLE_DEVICES=0 timeout 240 "$NSYS" profile -t cuda,nvtx,osrt -s cpu --backtrace=dwarf $SF \
  --capture-range=cudaProfilerApi --capture-range-end=stop --force-overwrite=true \
  -o "$W/raw/moe_single" python3 "$here/record_samples.py" --mode single-nsys --out-dir "$S"
echo "rc=$? in $((SECONDS - t)) s"
ls -l "$W/raw"
qi="$(dirname "$NSYS")/QdstrmImporter"
if [ ! -f "$W/raw/moe_single.nsys-rep" ] && [ -f "$W/raw/moe_single.qdstrm" ]; then
  echo "import by hand"; timeout 120 "$qi" -i "$W/raw/moe_single.qdstrm"
fi
timeout 120 "$NSYS" export --type sqlite --force-overwrite=true -o "$S/moe_single_nsys.sqlite" "$W/raw/moe_single.nsys-rep"
echo "export rc=$? in $((SECONDS - t)) s"

echo "== two-rank nsys"
t=$SECONDS
timeout 200 torchrun --nproc_per_node=2 --master_port=29512 --no-python bash "$here/record_samples.sh" \
  --nsys-rank "$W/raw" --mode two-rank-nsys --out-dir "$S/moe_2rank_nsys"
echo "rc=$? in $((SECONDS - t)) s"
for r in 0 1; do
  if [ ! -f "$W/raw/rank$r.nsys-rep" ] && [ -f "$W/raw/rank$r.qdstrm" ]; then
    timeout 120 "$qi" -i "$W/raw/rank$r.qdstrm"
  fi
  timeout 120 "$NSYS" export --type sqlite --force-overwrite=true -o "$S/moe_2rank_nsys/rank$r.sqlite" "$W/raw/rank$r.nsys-rep"
  echo "export rank$r rc=$?"
done
echo "done in $((SECONDS - t)) s"
fi

if want te-moe; then
  echo "== te-moe torch.profiler"; t=$SECONDS
  CUDA_VISIBLE_DEVICES=0 timeout 150 python3 "$here/record_samples.py" --mode te-moe-torch $DEV --out-dir "$S/te_moe_torch"
  echo "rc=$? in $((SECONDS - t)) s"
  echo "== te-moe nsys"
  nsys_single te_moe te-moe-nsys "$S/te_moe_nsys"
fi
if want dense; then
  echo "== dense torch.profiler"; t=$SECONDS
  CUDA_VISIBLE_DEVICES=0 timeout 150 python3 "$here/record_samples.py" --mode dense-torch $DEV --out-dir "$S/dense_torch"
  echo "rc=$? in $((SECONDS - t)) s"
  echo "== dense nsys (emit_nvtx)"
  nsys_single dense dense-nsys "$S/dense_nsys"
fi
if want nrank; then
  NP=${NPROC:-8}
  echo "== ${NP}-rank torch.profiler"; t=$SECONDS
  timeout 240 torchrun --nproc_per_node=$NP --master_port=29521 "$here/record_samples.py" \
    --mode nrank-torch $DEV --out-dir "$S/moe_${NP}rank"
  echo "rc=$? in $((SECONDS - t)) s"
  echo "== ${NP}-rank nsys"; t=$SECONDS
  timeout 300 torchrun --nproc_per_node=$NP --master_port=29522 --no-python bash "$here/record_samples.sh" \
    --nsys-rank "$W/raw" --mode nrank-nsys $DEV --out-dir "$S/moe_${NP}rank_nsys"
  echo "rc=$? in $((SECONDS - t)) s"
  for r in $(seq 0 $((NP - 1))); do
    timeout 120 "$NSYS" export --type sqlite --force-overwrite=true -o "$S/moe_${NP}rank_nsys/rank$r.sqlite" "$W/raw/rank$r.nsys-rep"
    scrub "$S/moe_${NP}rank_nsys/rank$r.sqlite"
  done
fi
if want nrank-1gpu; then
  echo "== N-rank mode, world size 1 (NCCL), torch.profiler"; t=$SECONDS
  timeout 120 torchrun --nproc_per_node=1 --master_port=29531 "$here/record_samples.py" \
    --mode nrank-torch $DEV --out-dir "$S/nrank_w1_torch"
  echo "rc=$? in $((SECONDS - t)) s"
  echo "== N-rank mode, world size 1 (NCCL), nsys"; t=$SECONDS
  timeout 150 torchrun --nproc_per_node=1 --master_port=29532 --no-python bash "$here/record_samples.sh" \
    --nsys-rank "$W/raw" --mode nrank-nsys $DEV --out-dir "$S/nrank_w1_nsys"
  echo "rc=$? in $((SECONDS - t)) s"
  timeout 120 "$NSYS" export --type sqlite --force-overwrite=true -o "$S/nrank_w1_nsys/rank0.sqlite" "$W/raw/rank0.nsys-rep"
  scrub "$S/nrank_w1_nsys/rank0.sqlite"
  NG=${NPROC_GLOO:-2}
  echo "== N-rank mode, $NG ranks sharing the one GPU over gloo"; t=$SECONDS
  OMP_NUM_THREADS=2 timeout 300 torchrun --nproc_per_node=$NG --master_port=29533 "$here/record_samples.py" \
    --mode nrank-torch $DEV --backend gloo --out-dir "$S/moe_nrank_${NG}rank_gloo_1gpu"
  echo "rc=$? in $((SECONDS - t)) s"
fi

echo "== row counts"
python3 - "$S" <<'EOF'
import sqlite3, sys, glob, os, gzip, json
for f in sorted(glob.glob(sys.argv[1] + "/**/*.sqlite", recursive=True)):
    c = sqlite3.connect(f)
    tabs = [r[0] for r in c.execute("select name from sqlite_master where type='table'")]
    counts = {t: c.execute(f"select count(*) from [{t}]").fetchone()[0] for t in tabs}
    big = {t: n for t, n in sorted(counts.items(), key=lambda x: -x[1])[:12]}
    print(os.path.basename(f), os.path.getsize(f), big)
for f in sorted(glob.glob(sys.argv[1] + "/**/*.json.gz", recursive=True)):
    ev = json.load(gzip.open(f))["traceEvents"]
    print(f, os.path.getsize(f), len(ev), sorted({e["name"] for e in ev if str(e.get("name", "")).startswith("ProfilerStep")}))
EOF
# keep the raw .nsys-rep files only while they are small (for a possible re-export)
find "$W/raw" -name '*.qdstrm' -delete
find "$W/raw" -name '*.nsys-rep' -size +12M -delete
