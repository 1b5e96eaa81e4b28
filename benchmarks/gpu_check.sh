#!/usr/bin/env bash
# The one prepared call for a lent GPU: the most valuable facts first, each step time-boxed, and
# everything packed into ONE archive under $OUT (the device hands back at most 8 files).
#
#   OUT=/some/dir benchmarks/gpu_check.sh            # on a GPU: at most 7.5 minutes (GPU_CHECK_BUDGET)
#   OUT=/some/dir benchmarks/gpu_check.sh --dry-run  # anywhere (and automatically without CUDA):
#                                                    # every step on tiny sizes, in about a minute
#
# Steps, in order of value: device facts; the kernel lab (benchmarks/gpu_lab.py: our kernels against SDPA's
# backends, one block step and one training step, GPU time without Python in it and host time apart; its
# short table is copied into the summary); the test suite on CUDA (bf16, opcheck and torch.compile
# through the kernels included; the kernels' own tests in a step of their own first); attention and block benchmarks (bf16,
# against SDPA, xformers when carried); training steps at the recompute levels (MFU, GPU idle, CUDA
# graphs); the long-clip encoder; torch.compile of the block; the tile-tuning sweep (writes
# tune/tuned.json: copy it to xclip_fast/kernels/tuned.json); every kernel on small shapes under
# compute-sanitizer's memcheck (tests/sanitize.py: it says so when the machine's sanitizer refuses
# the device); a CUDA .pt2 package of the triton backend. A step that outlives its limit gets SIGINT. Results land
# in $OUT/gpu-check.tar.gz with $OUT/summary.txt beside it, also when a step fails or runs out of time. Environment: PYTHON
# (default python3), XCLIP_FAST_COMMIT (the commit, where the copy has no .git), GPU_CHECK_BUDGET
# (seconds for all steps, default 450), GPU_CHECK_KEEP (keep the working folder after packing), GPU_CHECK_STEPS
# (comma-separated step names: run only those, in the order above, e.g. bench-attention,bench-train,bench-encoder
# when the tests already ran on an earlier machine; an unknown name stops the script before anything runs).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/local}
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-450}
# every step name below, in order (tests/test_gpu_check.py checks that this list and the steps agree)
ALL_STEPS="lab tests-kernels racecheck tests bench-attention bench-block bench-train bench-encoder bench-block-compiled
  bench-train-graphs tune sanitize export-cuda"
ALL_STEPS=$(echo $ALL_STEPS)  # one line, single spaces
ONLY=" $(echo "${GPU_CHECK_STEPS:-}" | tr ',' ' ') "
for name in $ONLY; do
  case " $ALL_STEPS " in *" $name "*) ;; *) echo "GPU_CHECK_STEPS: no step named '$name' (steps: $ALL_STEPS)" >&2
    exit 2 ;; esac
done
if [ -n "${GPU_CHECK_STEPS:-}" ] && [ -z "$(echo $ONLY)" ]; then
  echo "GPU_CHECK_STEPS names no step (steps: $ALL_STEPS)" >&2
  exit 2
fi
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
if [ $DRY -eq 0 ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "no CUDA device: running the dry mode"
  DRY=1
fi
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/xclip-gpu-check.XXXXXX")
SUMMARY="$WORK/summary.txt"
export PYTHONUNBUFFERED=1 XCLIP_FAST_COMMIT=${XCLIP_FAST_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
START=$SECONDS
FAILED=0

pack() {  # runs on every exit: the archive and the summary are what come back
  echo "== total ${SECONDS}s, $FAILED step(s) failed, dry=$DRY, commit $XCLIP_FAST_COMMIT" >>"$SUMMARY"
  if tar -czf "$OUT/gpu-check.tar.gz" -C "$WORK" . && cp "$SUMMARY" "$OUT/summary.txt"; then
    echo "packed $OUT/gpu-check.tar.gz ($(du -h "$OUT/gpu-check.tar.gz" | cut -f1)) and $OUT/summary.txt"
    [ -n "${GPU_CHECK_KEEP:-}" ] || rm -rf "$WORK"
  else
    echo "packing failed: the results are in $WORK"
  fi
}
trap pack EXIT

step() {  # step NAME SECONDS COMMAND...: time-boxed (within what is left of the budget), logged
  local name=$1 limit=$2; shift 2
  if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ "$ONLY" != *" $name "* ]]; then
    echo "== $name: SKIPPED (not in GPU_CHECK_STEPS)" | tee -a "$SUMMARY"
    return
  fi
  local left=$((BUDGET - (SECONDS - START)))
  if [ $left -lt 15 ]; then
    echo "== $name: SKIPPED (budget of ${BUDGET}s spent)" | tee -a "$SUMMARY"
    return
  fi
  [ $limit -gt $left ] && limit=$left
  echo "== $name (limit ${limit}s)" | tee -a "$SUMMARY"
  local t0=$SECONDS
  # SIGINT first: pytest (and any Python step) stops as after Ctrl-C, printing its summary of
  # failures and writing its report, instead of dying with nothing said
  timeout -s INT --kill-after=15 "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "   TIMED OUT after ${limit}s" | tee -a "$SUMMARY"
  echo "   rc=$rc in $((SECONDS - t0))s" | tee -a "$SUMMARY"
  tail -n 4 "$WORK/$name.log" | sed 's/^/   /' | tee -a "$SUMMARY"
  [ $rc -eq 0 ] || FAILED=$((FAILED + 1))
}

# install: the device has torch and triton but no package registry; fall back to the checkout
if ! $PY -m pip install --no-deps --no-build-isolation -e . >"$WORK/install.log" 2>&1; then
  echo "editable install failed (see install.log); using the source checkout" >>"$WORK/install.log"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{ nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton',
triton.__version__); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  echo "commit $XCLIP_FAST_COMMIT, dry=$DRY, steps=${GPU_CHECK_STEPS:-all}, $(date -u +%Y-%m-%dT%H:%M:%SZ)"; } >"$WORK/device.txt" 2>&1
cat "$WORK/device.txt" >>"$SUMMARY"

BENCH="$PY -m xclip_fast.cli bench --out $WORK/bench"
EXPORT_CUDA_TEST=test_pt2_package_on_cuda_carries_the_triton_kernels  # its own step, last (AOT compiles)
show_lab() {  # the lab's short table, into the summary (the reply of a device call shows its end)
  [ -f "$WORK/lab/table.txt" ] && sed 's/^/   /' "$WORK/lab/table.txt" | tee -a "$SUMMARY"
  return 0
}
if [ $DRY -eq 1 ]; then
  step lab 120 $PY benchmarks/gpu_lab.py --dry-run --out "$WORK/lab"
  show_lab
  step tests 120 $PY -m pytest -q -p no:cacheprovider tests/test_compile.py -k "opcheck and attention_fwd-extra" \
    --junitxml="$WORK/junit.xml"
  step sanitize 120 $PY tests/sanitize.py --memcheck --quick
  step bench-attention 120 $BENCH --device cpu --quick --level attention --providers xclip-fast-torch
  step bench-block 120 $BENCH --device cpu --quick --level block --frames 2 --providers xclip-fast-torch
  step bench-block-compiled 120 $BENCH --device cpu --quick --level block --frames 2 --mode fwdbwd \
    --providers reference-compiled,xclip-fast-torch-compiled
  step tune 120 $PY benchmarks/tune.py --dry-run --out "$WORK/tune"
  step bench-encoder 120 $BENCH --device cpu --quick --level encoder --frames 2 \
    --providers xclip-fast-torch,xclip-fast-torch-chunked
  step bench-train 120 $BENCH --device cpu --quick --level train --frames 2 --providers xclip-fast-lean
  step export-cuda 120 $PY -m pytest -q -p no:cacheprovider tests/test_export.py -k "$EXPORT_CUDA_TEST"
  exit $((FAILED > 0))
fi

# 0. the kernel lab: what our kernels, one block step and one training step cost here, each figure without
#    Python in it (CUDA-graph replay, the profiler's kernel times), host time apart; at most 300 s
step lab 300 $PY benchmarks/gpu_lab.py --out "$WORK/lab" --budget 280
show_lab
# 1. correctness on CUDA: the kernels' own tests first (their own step: with xdist, files named first are not
#    run first), then the rest of the suite (bf16, large shapes, opcheck, compile with Inductor)
PYTEST_OPTS=""
$PY -c "import xdist" 2>/dev/null && PYTEST_OPTS="-n 12"
$PY -c "import pytest_timeout" 2>/dev/null && PYTEST_OPTS="$PYTEST_OPTS --timeout 120"
FIRST="tests/test_attention_kernel.py tests/test_ops.py tests/test_quick_gelu.py tests/test_recompute_backward.py
  tests/test_vmap.py tests/test_blocks.py"
step tests-kernels 90 $PY -m pytest -q -p no:cacheprovider $FIRST $PYTEST_OPTS --junitxml="$WORK/junit-kernels.xml"
# the shapes where fp16 gradients were wrong on the first GPU run, under compute-sanitizer's racecheck
# (shared-memory hazards inside our kernels only: the test's PyTorch reference runs cuDNN's attention,
# in which racecheck reported 12 hazards on the second run); exit code 9 on a hazard
step racecheck 60 compute-sanitizer --tool racecheck --kernel-name kns=_attention_ --error-exitcode 9 \
  --print-limit 20 $PY -m pytest -q \
  -p no:cacheprovider tests/test_attention_kernel.py -k "test_matches_float64_reference and SK70"
step tests 170 $PY -m pytest -q -p no:cacheprovider tests $(printf -- "--ignore=%s " $FIRST) $PYTEST_OPTS \
  --maxfail=30 --junitxml="$WORK/junit.xml" --deselect "tests/test_export.py::$EXPORT_CUDA_TEST"
# 2. attention against every SDPA backend (and xformers when carried), bf16, fwd and fwd+bwd
step bench-attention 40 $BENCH --level attention --dtype bfloat16 \
  --providers sdpa-flash,sdpa-efficient,sdpa-cudnn,xformers,xclip-fast-torch,xclip-fast-triton
# 3. the block at the released T, eager (both modes), both backends (what backend="auto" should pick)
step bench-block 35 $BENCH --level block --model b16 --frames 8 --batch 8 --dtype bfloat16 \
  --providers sdpa-flash,xformers,xclip-fast-torch,xclip-fast-triton
# 4. training steps (B/16, T = 8, batch 8, bf16 autocast) at the recompute levels against the original with
#    selective checkpointing, and the default level under activation offloading (save_on_cpu, pinned):
#    MFU, GPU idle fraction, host time
step bench-train 80 $BENCH --level train --model b16 --frames 8 --batch 8 \
  --providers reference-sac,xclip-fast-none,xclip-fast-lean,xclip-fast-min,xclip-fast-lean-offload
# 5. long clips: the encoder against T, unchunked and chunked
step bench-encoder 40 $BENCH --level encoder --model b16 --frames 8,128,1024 --dtype bfloat16 \
  --providers xclip-fast-triton,xclip-fast-triton-chunked
# 6. torch.compile of the block against the compiled original (fwd+bwd)
step bench-block-compiled 70 $BENCH --level block --model b16 --frames 8 --batch 8 --dtype bfloat16 --mode fwdbwd \
  --providers reference-compiled,xclip-fast-triton,xclip-fast-triton-compiled
# 7. the default level's training step under torch.compile(mode="reduce-overhead") (CUDA graphs; its own
#    step: compiling the B/16 encoder takes a while), checked against the original like every provider
step bench-train-graphs 80 $BENCH --level train --model b16 --frames 8 --batch 8 \
  --providers xclip-fast-lean,xclip-fast-cudagraphs
# 8. tile tuning at the X-CLIP shapes
step tune 60 $PY benchmarks/tune.py --out "$WORK/tune" --budget 45
# 9. every kernel (fwd, both backward passes, packed/plain, extra token or not, odd lengths) under memcheck
step sanitize 45 $PY tests/sanitize.py --memcheck --quick
# 10. a CUDA .pt2 package of the triton backend (AOTInductor): kernels inside, parity, loads with torch alone
step export-cuda 60 $PY -m pytest -q -p no:cacheprovider tests/test_export.py -k "$EXPORT_CUDA_TEST"
exit $((FAILED > 0))
