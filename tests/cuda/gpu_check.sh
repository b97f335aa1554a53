#!/usr/bin/env bash
# The GPU verification of knnfast in one prepared script, for a machine with an NVIDIA GPU,
# nvcc and a CUDA build of torch in `python3` (the device tool's H200 image: no network, no
# faiss). Not part of `make test` (CI has no GPU). Usage, from the repository root:
#
#   bash tests/cuda/gpu_check.sh                  # every stage: env build test sanitize bench
#   bash tests/cuda/gpu_check.sh build test       # some stages, in this order
#
# Stages (each appends "stage: ok|FAILED (seconds)" to summary.txt and goes on after a failure):
#   env       nvidia-smi, nvcc, torch and the GPU's compute capability
#   build     the extension with its CUDA kernels for this GPU's architecture, in place
#             (knnfast/_C*.so; CMake's incremental build, so a second call costs seconds)
#   test      every test whose id names cuda (the [cuda] parameters, tests/test_cuda_checks.py:
#             deferred checks, the CUDA-graph capture of a decoding step), per-test timeout,
#             4 worker processes where pytest-xdist is installed
#   sanitize  tests/cuda/exercise_ops.py (every op and kernel variant once, checked against
#             the reference) under compute-sanitizer memcheck, racecheck and synccheck
#   bench     benchmarks/bench_cuda.py (knn_interpolate, knn_search against the reference)
#
# Logs go to $OUT (the device tool's folder) or build/gpu-check: 8 files at most, the limit of
# what the device tool brings back. Environment: GPU_CHECK_PYTHON (default python3),
# GPU_CHECK_ARCH (default: the GPU's, e.g. 9.0), GPU_CHECK_TEST_TIMEOUT (s per test, 180),
# GPU_CHECK_WORKERS (pytest-xdist processes sharing the GPU, 4; 1: none).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=${OUT:-build/gpu-check}
mkdir -p "$OUT_DIR"
PY=${GPU_CHECK_PYTHON:-python3}
SUMMARY=$OUT_DIR/summary.txt
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PATH=$PATH:/usr/local/cuda/bin  # nvcc, compute-sanitizer where the image keeps them

stage_env() {
  nvidia-smi || return 1
  nvcc --version | tail -2
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
torch.cuda.get_device_name(), torch.cuda.get_device_capability())" || return 1
}

stage_build() {
  local arch=${GPU_CHECK_ARCH:-$("$PY" -c \
    "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
  KNNFAST_CUDA=on TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) \
    "$PY" setup.py -q build_ext --inplace || return 1
  "$PY" -c "import knnfast, json; info = knnfast.build_info(); print(json.dumps(info));
assert info['cuda_compiled'] and info['cuda_available'], 'no CUDA in this build'"
}

stage_test() {
  local extra=()
  "$PY" -c "import pytest_timeout" 2>/dev/null &&
    extra+=(-p pytest_timeout --timeout "${GPU_CHECK_TEST_TIMEOUT:-180}")
  # independent processes sharing the GPU (each has its own CUDA context and settings)
  "$PY" -c "import xdist" 2>/dev/null && [ "${GPU_CHECK_WORKERS:-4}" -gt 1 ] &&
    extra+=(-p xdist -n "${GPU_CHECK_WORKERS:-4}")
  "$PY" -m pytest tests -q -p no:cacheprovider -k cuda -rfE "${extra[@]}" \
    --continue-on-collection-errors --junitxml "$OUT_DIR/tests.xml"
}

stage_sanitize() {
  local tool failed=0
  for tool in memcheck racecheck synccheck; do
    echo "== compute-sanitizer --tool $tool"
    timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 50 \
      "$PY" tests/cuda/exercise_ops.py --device cuda || failed=1
  done
  return $failed
}

stage_bench() {
  "$PY" -m pytest benchmarks/bench_cuda.py -q -p no:cacheprovider \
    --benchmark-json "$OUT_DIR/bench_cuda.json"
}

run_stage() {
  local name=$1 start=$SECONDS status
  echo "===== $name ($(date -u +%H:%M:%S))"
  "stage_$name" > "$OUT_DIR/$name.log" 2>&1
  status=$?
  tail -n 40 "$OUT_DIR/$name.log"
  local word=ok
  [ $status -eq 0 ] || word="FAILED (exit $status)"
  echo "$name: $word ($((SECONDS - start)) s)" | tee -a "$SUMMARY"
  return $status
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(env build test sanitize bench)
overall=0
for s in "${stages[@]}"; do
  if ! declare -F "stage_$s" >/dev/null; then
    echo "gpu_check.sh: unknown stage '$s' (env build test sanitize bench)" >&2
    exit 2
  fi
  if [ "$s" != env ] && [ "$s" != build ] &&
     grep "^build:" "$SUMMARY" 2>/dev/null | tail -n 1 | grep -q FAILED; then
    echo "$s: skipped (the build failed)" | tee -a "$SUMMARY"
    continue
  fi
  run_stage "$s" || overall=1
done
exit $overall
