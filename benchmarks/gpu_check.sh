#!/usr/bin/env bash
# What only a GPU can show, for a lent GPU machine with a time limit: the GPU tests,
# `mupopt verify` on CUDA, `mupopt bench` on CUDA. Each stage has its own time limit and the
# script goes on after a failing stage, so one broken stage still leaves the others' results.
#
#   PYTHONPATH=$PWD bash benchmarks/gpu_check.sh OUTDIR [STAGE...]
#
# Stages (default: all but tune, in this order): tests verify bench-elementwise bench-matrix;
# "tune" (only when named) sweeps the Triton elementwise chunk size and warps
# (benchmarks/tune_triton.py, AdamW on one 2^26 tensor, JSON in OUTDIR/tune-triton.json);
# "crosscheck" (only when named) times one 2^26 fp32 AdamW step of torch fused, cuda and triton
# with the harnesses' Timer, bare CUDA events, triton's do_bench and the host enqueue time, in
# several fresh rows each, then runs `mupopt bench` and tune_triton's sweep on it alternately
# (benchmarks/timing_crosscheck.py, issue 16 item 1; OUTDIR/timing-crosscheck.{txt,json}).
# Time limits (seconds) from the environment: TESTS_S (240), VERIFY_S (60), BENCH_S (180 each,
# a hard limit), BENCH_MAX_S (120 each: no new case group after it, so results are written),
# TUNE_S (150) and CROSSCHECK_S (300).
# PYTEST_ARGS adds pytest arguments (e.g. -k to rerun a few tests).
#
# Runs the package from the working tree: the GPU machine has no network, so torch, triton,
# pytest (with pytest-xdist and pytest-timeout), ninja and nvcc must be there already. Tests that
# compare against torch-adopt / sophia-opt / mup skip where those are missing.
set -u
OUT_DIR=${1:-gpu-check-out}
shift || true
STAGES=${*:-tests verify bench-elementwise bench-matrix}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

stage() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

stage "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
nvcc --version | tail -1

# nvcc builds the CUDA library while the tests compile their Triton kernels; tests that need it
# wait on torch's build lock.
(timeout 300 python3 -m mupopt.kernels.cpp.build --cuda > "$OUT_DIR/build.txt" 2>&1
 echo "build exit $?" >> "$OUT_DIR/build.txt") &
BUILD=$!

if has tests; then
  stage "GPU tests"
  # shellcheck disable=SC2086
  timeout "${TESTS_S:-240}" python3 -m pytest -q -m gpu -p no:cacheprovider -n 8 --timeout 150 --tb=short -rfEs \
      ${PYTEST_ARGS:-} tests > "$OUT_DIR/pytest.txt" 2>&1
  tail -40 "$OUT_DIR/pytest.txt"
fi
wait $BUILD
stage "csrc build"
tail -15 "$OUT_DIR/build.txt"

if has verify; then
  stage "mupopt verify --device cuda"
  timeout "${VERIFY_S:-60}" python3 -m mupopt.cli verify --device cuda --json "$OUT_DIR/verify-cuda.json"
fi
for part in elementwise matrix; do
  has "bench-$part" || continue
  [ $part = elementwise ] && opts=adamw,adopt,lamb,sophia,sophia_hessian || opts=muon,ns,shampoo,roots
  stage "mupopt bench --device cuda --quick --optimizers $opts"
  timeout "${BENCH_S:-180}" python3 -m mupopt.cli bench --device cuda --quick --keep-going \
      --max-seconds "${BENCH_MAX_S:-120}" --optimizers $opts --out "$OUT_DIR/bench-$part" --note "benchmarks/gpu_check.sh"
done
if has tune; then
  stage "benchmarks/tune_triton.py (AdamW, one 2^26 tensor)"
  timeout "${TUNE_S:-150}" python3 benchmarks/tune_triton.py --case one --optimizers adamw \
      --json "$OUT_DIR/tune-triton.json"
fi
if has crosscheck; then
  stage "benchmarks/timing_crosscheck.py (one 2^26 fp32 AdamW step, every timing method, both harnesses)"
  timeout "${CROSSCHECK_S:-300}" python3 benchmarks/timing_crosscheck.py --json "$OUT_DIR/timing-crosscheck.json" \
      > "$OUT_DIR/timing-crosscheck.txt" 2>&1
  echo "crosscheck exit $?"
  tail -40 "$OUT_DIR/timing-crosscheck.txt"
fi
stage "done"
