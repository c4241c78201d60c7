#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Record every sample trace of sample_traces/ on a machine with >= 2 NVIDIA GPUs.
#
#   scripts/record_samples.sh [RESULT_DIR]      (default: $OUT, else ./recorded)
#
# Writes RESULT_DIR/results.tar.gz (the sample_traces/ layout), RESULT_DIR/raw.tar.gz (the .nsys-rep
# reports, when small) and RESULT_DIR/log.txt.
# Needs: python3 with torch (CUDA) + numpy, torchrun, Nsight Systems (NSYS=... to override).
# If nsys's importer lacks libdw.so.1, put libdw1/libelf1 .deb files in .device/debs/.
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
W=/tmp/record_samples; rm -rf "$W"; mkdir -p "$W/sample_traces/moe_2rank" "$W/sample_traces/moe_2rank_nsys" "$W/raw"
S=$W/sample_traces
exec > >(tee "$RES/log.txt") 2>&1

# libdw for nsys's QdstrmImporter (carried as .deb files, unpacked outside /)
if ls "$repo"/.device/debs/*.deb >/dev/null 2>&1; then
  rm -rf /tmp/dw; for f in "$repo"/.device/debs/*.deb; do dpkg -x "$f" /tmp/dw; done
  export LD_LIBRARY_PATH=/tmp/dw/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi

finish() {
  echo "== sizes"; (cd "$W" && find sample_traces raw -type f -exec ls -l {} \;)
  (cd "$W" && tar czf "$RES/results.tar.gz" sample_traces raw/versions.txt)
  (cd "$W" && tar czf "$RES/raw.tar.gz" raw)
  ls -l "$RES"
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

echo "== row counts"
python3 - "$S" <<'EOF'
import sqlite3, sys, glob, os, gzip, json
for f in sorted(glob.glob(sys.argv[1] + "/**/*.sqlite", recursive=True)):
    c = sqlite3.connect(f)
    tabs = [r[0] for r in c.execute("select name from sqlite_master where type='table'")]
    counts = {t: c.execute(f"select count(*) from [{t}]").fetchone()[0] for t in tabs}
    big = {t: n for t, n in sorted(counts.items(), key=lambda x: -x[1])[:12]}
    print(os.path.basename(f), os.path.getsize(f), big)
for f in sorted(glob.glob(sys.argv[1] + "/moe_2rank/*.json.gz")):
    ev = json.load(gzip.open(f))["traceEvents"]
    print(f, os.path.getsize(f), len(ev), sorted({e["name"] for e in ev if str(e.get("name", "")).startswith("ProfilerStep")}))
EOF
# keep the raw .nsys-rep files only while they are small (for a possible re-export)
find "$W/raw" -name '*.qdstrm' -delete
find "$W/raw" -name '*.nsys-rep' -size +12M -delete
