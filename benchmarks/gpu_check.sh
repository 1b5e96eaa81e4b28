#!/usr/bin/env bash
# The one script to run when a GPU is lent: the whole test suite natively on CUDA, then the
# benchmarks. Everything is written under $OUT (default: benchmarks/results/local); commit the
# results (results.csv / results.jsonl / run-*.json / *.png / logs) under benchmarks/results/.
#
#   OUT=/some/dir benchmarks/gpu_check.sh            # about 8 minutes on an H100
#
# Each step has its own time limit so that a slow step cannot eat the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/local}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

# The device has torch and triton but no package registry: install without dependencies, and fall
# back to the source checkout (xclip_fast maps kernels/ itself) if even that fails.
if ! $PY -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
  echo "editable install failed (see install.log); using the source checkout" | tee -a "$OUT/install.log"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
{ nvidia-smi; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } >"$OUT/device.txt" 2>&1
git rev-parse HEAD >>"$OUT/device.txt" 2>/dev/null

status=0
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)" | tee -a "$OUT/summary.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
  tail -n 3 "$OUT/$name.log" | sed 's/^/   /' | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || status=1
}

step tests 240 $PY -m pytest -q -x tests -p no:cacheprovider
# attention vs every SDPA backend (and xformers when carried), X-CLIP shapes, bf16, fwd and fwd+bwd
step bench-attention 90 $PY -m xclip_fast.cli bench --level attention --dtype bfloat16 --out "$OUT" \
  --providers sdpa-flash,sdpa-efficient,sdpa-cudnn,xformers,xclip-fast-torch,xclip-fast-triton
# one block at the released T (with torch.compile), then long clips without the compile warm-ups
step bench-block 150 $PY -m xclip_fast.cli bench --level block --model b16 --frames 8,32 --batch 8 \
  --dtype bfloat16 --out "$OUT"
step bench-block-long 60 $PY -m xclip_fast.cli bench --level block --model b16 --frames 128,512 --dtype bfloat16 \
  --out "$OUT" --providers sdpa-flash,xclip-fast-torch,xclip-fast-triton
# the whole encoder (inference) against T, unchunked and chunked
step bench-encoder 90 $PY -m xclip_fast.cli bench --level encoder --model b16 --frames 8,32,128,512,1024 \
  --dtype bfloat16 --out "$OUT" --providers xclip-fast-triton,xclip-fast-triton-chunked
exit $status
