#!/usr/bin/env bash
# Ours against the authors' PyTorch code on one GPU, in one command and without network:
#   bash benchmarks/gpu_vs_reference.sh --prepare   # here, with network: wheels -> .whl/, reference -> benchmarks/.reference/
#   bash benchmarks/gpu_vs_reference.sh             # on the GPU machine (~8 min): writes benchmarks/results/vs_reference_gpu.md/.json
#   bash benchmarks/gpu_vs_reference.sh --dry-run   # CPU: tiny models, 2 steps, both sides (CI runs this)
# Rows: PF-B/2 batch 64, PF-XL/2 batch 32 and the largest XL batch that fits; ours in bf16 with
# float32 params and cuDNN flash attention, the reference in bf16 autocast with its own
# torch.compile (compile=True) and SDPA attention. Nothing on this path imports TensorFlow.
# Carry .whl and benchmarks/.reference to the GPU machine (both git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-run}
WHEELS=.whl
# Modules the GPU image may lack (import name=wheel name); installed only where missing, offline.
NEEDED="ml_collections=ml-collections grain=grain array_record=array-record cloudpickle=cloudpickle
tree=dm-tree more_itertools=more-itertools sklearn=scikit-learn joblib=joblib
threadpoolctl=threadpoolctl einops=einops tqdm=tqdm"

case "$MODE" in
  --prepare)
    mkdir -p "$WHEELS"
    for pair in $NEEDED; do
      pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$WHEELS" "${pair#*=}"
    done
    python -c "import sys; sys.path.insert(0, '.'); from benchmarks import reference; print(reference.load().description)"
    ls -la "$WHEELS"
    ;;
  --dry-run)
    OUT=${OUT:-/tmp/vs_reference_dry}
    JAX_PLATFORMS=cpu python benchmarks/vs_reference.py --dry-run --device=cpu --out="$OUT" "${@:2}"
    ;;
  run)
    missing=""
    for pair in $NEEDED; do
      python -c "import ${pair%%=*}" 2>/dev/null || missing="$missing ${pair#*=}"
    done
    if [ -n "$missing" ]; then
      pip install --quiet --no-index --no-deps --find-links "$WHEELS" $missing
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    # Both frameworks share the GPU: JAX allocates on demand instead of taking 75% up front.
    export XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=3
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
    python benchmarks/vs_reference.py --device=gpu --rows=B,XL --batch=B=64,XL=32 --largest=XL:256/128/64 \
      --repeats=20 --warmup=3 --time-budget=300 "${@:2}"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_vs_reference.sh [--prepare | --dry-run [args] | run [args]]" >&2
    exit 2
    ;;
esac
