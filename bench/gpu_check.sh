#!/usr/bin/env bash
# The whole GPU check in one command, for a short lease on a GPU machine:
#   1. the tests that use CUDA (tests/test_cuda.py: model and pipeline in fp32/fp16/bf16 on the
#      GPU against CPU fp32; the device-side metrics test of tests/test_metrics.py);
#   2. bench.gpu at SD-1.5 sizes, fp16, 512 and 1024 px: ours vs the official loop, the actor,
#      per-component TFLOP/s against the measured peak, a profile of one call;
#   3. torch.compile of the UNet, last, with what time is left.
# Each part has its own time limit and the next part runs whatever the last one did, so one
# failure still leaves the others' results. Everything lands in $OUT (default gpu-check/):
# run.log (all output), gpu-512.json, gpu-1024.json, gpu-compile.json, profile-*.txt.
#
#   OUT=gpu-check PYTHON=python3 bash bench/gpu_check.sh
# Rehearsal on a CPU (tiny sizes, fp32; the CUDA tests skip):
#   BENCH_EXTRA="--device cpu --tiny --dtypes fp32 --resolutions 64" bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
PY=${PYTHON:-python3}
BENCH_EXTRA=${BENCH_EXTRA:-}
mkdir -p "$OUT"
LOG="$OUT/run.log"
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=token RAY_DATA_PARQUET_FOOTER_NUM_ACTORS=1

part() {  # part NAME SECONDS COMMAND...: run with a limit, log it, never stop the script
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "=== $name: rc $rc in $((SECONDS - start)) s" | tee -a "$LOG"
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$PY" -c 'import sys, torch, ray, diffusers, transformers; print(sys.version.split()[0],
        "torch", torch.__version__, "cuda", torch.version.cuda, "ray", ray.__version__,
        "diffusers", diffusers.__version__, "transformers", transformers.__version__)'
} >>"$LOG" 2>&1

part tests "${GPU_CHECK_TESTS_S:-170}" "$PY" -m pytest -q -p no:cacheprovider -s -rA \
    tests/test_cuda.py tests/test_metrics.py
part bench-512 "${GPU_CHECK_512_S:-130}" "$PY" -m bench.gpu --resolutions 512 --dtypes fp16 \
    --batch-sizes 1,2,4,8,16 --iters 3 --json "$OUT/gpu-512.json" --profile-dir "$OUT" $BENCH_EXTRA
part bench-1024 "${GPU_CHECK_1024_S:-140}" "$PY" -m bench.gpu --resolutions 1024 --dtypes fp16 \
    --batch-sizes 1,2,4,8 --iters 3 --optimisation-batch-size 4 --json "$OUT/gpu-1024.json" \
    --profile-dir "$OUT" $BENCH_EXTRA
part compile "${GPU_CHECK_COMPILE_S:-90}" "$PY" -m bench.gpu --resolutions 512 --dtypes fp16 \
    --only-optimisations --compile --iters 3 --json "$OUT/gpu-compile.json" $BENCH_EXTRA
grep -E "^(ours|official|actor) |^  [a-z_]+ +[0-9.]+ ms|x[0-9.]+ \(target|passed|failed|=== " \
    "$LOG" | tail -60
