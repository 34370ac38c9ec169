#!/usr/bin/env bash
# The whole GPU run in one call, repeatable by any session on a GPU machine (no network there):
#   1. installs the carried pure-Python wheels (.whl/, made by ../shared/gpu/wheels.sh),
#   2. builds the extension strictly for the local GPU (CUDA kernels included),
#   3. runs the full test suite, which adds the CUDA device to every op test,
#   4. runs the benchmark suite and writes JSON + markdown + plots.
# Usage: DPFAST_COMMIT=<sha> bash benchmarks/gpu_run.sh [OUT_DIR] [STAGE ...]
#   OUT_DIR defaults to $OUT or ./gpu_out. Stages, in the order given (default: all of them):
#     tests       the test suite with CUDA (about 5 min)
#     kernels     benchmarks/kernels: Triton and op micro-benchmarks
#     throughput  benchmarks/throughput.py: ViT-B/16 and BiT-R50x1, every mode, TF32
#     max_batch   benchmarks/max_batch.py: ViT-B/16, every mode, TF32, with throughput at the max
#     profile     benchmarks/profile.py: ViT-B/16 phases per mode (the paper's Table A3)
#   Each stage fits in one 10-minute device call; the build before them is repeated per call
#   (incremental when the machine is still warm).
# Optional: TESTS_TIMEOUT, BENCH_TIMEOUT (s, per benchmark script).
set -uo pipefail
out=${1:-${OUT:-gpu_out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export TORCH_DPFAST_STRICT_BUILD=1 TORCH_DPFAST_BUILD_CUDA=1 MAX_JOBS=16
export TORCH_DPFAST_REQUIRE_CPP=1 TORCH_DPFAST_REQUIRE_CUDA_BUILD=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python3 -c \
  "import torch; print('.'.join(map(str, torch.cuda.get_device_capability())))")}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/info.txt"
python3 -m pip install --no-build-isolation --no-deps -e . > /tmp/dpfast_build.log 2>&1 \
  || { echo "build failed:"; tail -40 /tmp/dpfast_build.log; exit 1; }
python3 -m torch_dpfast.info | tee -a "$out/info.txt"
stages=("${@:2}")
[ ${#stages[@]} -gt 0 ] || stages=(tests kernels throughput max_batch profile)
test_rc=0
bench_rc=0
bench() { timeout "${BENCH_TIMEOUT:-540}" python3 "$@" --out "$out" || bench_rc=1; }
for stage in "${stages[@]}"; do
case $stage in
tests)
# Tests compile one Triton configuration per kernel (tuning every test shape takes minutes).
# The CPU-only end-to-end suites (multi-process gloo, the command line, the examples, the
# benchmark scripts' CPU smoke runs) are left
# to CI: they do not touch the GPU and would eat the 10-minute call.
TORCH_DPFAST_TRITON_AUTOTUNE=0 timeout "${TESTS_TIMEOUT:-300}" python3 -m pytest -q -rfs \
  --tb=short -p no:cacheprovider tests --ignore=tests/test_distributed.py \
  --ignore=tests/test_cli.py --ignore=tests/test_examples.py \
  --ignore=tests/test_benchmark_suite.py --ignore=tests/test_soundness_cli.py \
  --ignore=tests/test_soundness_distributed.py 2>&1 \
  | tee "$out/gpu_tests.log" | tail -40
test_rc=${PIPESTATUS[0]} ;;
kernels) bench benchmarks/kernels/bench_triton.py; bench benchmarks/kernels/bench_ops.py
  # the tensor-core CUDA layer kernels run at TF32 and bf16 only
  for p in tf32 bf16; do
    timeout "${BENCH_TIMEOUT:-540}" python3 benchmarks/kernels/bench_ops.py --precision $p \
      --groups layer_backends --out "$out/layers-$p" || bench_rc=1
  done ;;
throughput)
  bench benchmarks/throughput.py --device cuda --models vit_base,bit_50x1 --precisions tf32 \
    --physical 64 --logical 256 --steps 4 --repeats 2 ;;
max_batch) bench benchmarks/max_batch.py --device cuda --models vit_base --precision tf32 \
    --cap 1024 --throughput --logical 256 ;;
profile) bench benchmarks/profile.py --device cuda --model vit_base --physical 32 --precision tf32 ;;
*) echo "gpu_run: unknown stage $stage (tests kernels throughput max_batch profile)"; exit 2 ;;
esac
done
echo "gpu_run: tests exit $test_rc, benchmarks exit $bench_rc"
exit $(( test_rc || bench_rc ))
