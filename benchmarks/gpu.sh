#!/usr/bin/env bash
# The checks that need a GPU, on a machine with CUDA (CI has none, so they never run there):
#   1. tests/test_cuda.py: the engine's backends and precisions on the GPU, the GPU's masks against
#      the CPU's, training on the GPU, a live server on the GPU through a key rotation;
#   2. the server tests again with every server on the GPU (in-process ones pick it with
#      --device auto, live ones through SEGLOCK_TEST_DEVICE=cuda);
#   3. benchmarks/serve.py on the GPU (its figures are GPU figures: bf16 autocast, one worker).
# Each step is bounded in time; logs go to OUT_DIR (default ./gpu-check).
#
#   bash benchmarks/gpu.sh [OUT_DIR]
set -uo pipefail
out=${1:-gpu-check}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 SEGLOCK_TEST_DEVICE=cuda
status=0

step() {  # step NAME SECONDS COMMAND...: run it, log to OUT_DIR/NAME.log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | tail -"${TAIL:-25}"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || { echo "no GPU"; exit 2; }
"$python" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name())" || exit 2

step cuda-tests "${CUDA_TESTS_S:-150}" "$python" -m pytest -q -rA -s tests/test_cuda.py
parallel=()  # pytest-xdist where installed: the files' module fixtures stay whole (--dist loadfile)
"$python" -c "import xdist" 2>/dev/null && parallel=(-n "${JOBS:-8}" --dist loadfile)
step server-tests-on-cuda "${SERVER_TESTS_S:-150}" "$python" -m pytest -q "${parallel[@]}" \
    tests/test_server_api.py tests/test_v2_api.py tests/test_modes.py tests/test_registry.py \
    tests/test_client_e2e.py tests/test_encryption_torch.py
step serve-benchmark "${SERVE_S:-200}" "$python" benchmarks/serve.py --device cuda --rounds "${ROUNDS:-2}" \
    --requests 256 --compile-budget "${COMPILE_BUDGET:-0}" --json "$out/serve.json"
exit $status
