#!/usr/bin/env bash
# The 256-token MNIST study on one GPU (configs/mnist.py:study): timesteps + samplers (~8 min of an
# H200, sized from FLOPs in the config's docstring), then difficulty and context (seconds).
#   bash launch/study_gpu.sh /path/to/mnist /tmp/study_gpu [wheels_dir]
# /path/to/mnist holds t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz. Nothing here imports
# TensorFlow. Packages the GPU image lacks (e.g. ml-collections, grain) install from wheels_dir,
# filled beforehand on a machine with network:
#   pip download ml-collections grain array-record cloudpickle portpicker -d wheels --python-version 3.11 --only-binary=:all:
# Rerunning the same command resumes; results land in <workdir>/report.md and <workdir>/<study>/.
set -euo pipefail
DATA=${1:?MNIST IDX directory}; WORKDIR=${2:?workdir}; WHEELS=${3:-}
cd "$(dirname "$0")/.."
missing=$(python - <<'EOF'
import importlib.util
need = {"ml_collections": "ml-collections", "grain": "grain", "array_record": "array-record",
        "cloudpickle": "cloudpickle", "portpicker": "portpicker", "etils": "etils[epath]", "orbax": "orbax-checkpoint",
        "optax": "optax", "flax": "flax", "scipy": "scipy", "sklearn": "scikit-learn", "tqdm": "tqdm", "PIL": "pillow"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [[ -n "$missing" ]]; then
  [[ -n "$WHEELS" ]] || { echo "missing packages: $missing (give a wheels directory as the third argument)"; exit 2; }
  pip install --no-index --find-links "$WHEELS" $missing
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9} TF_CPP_MIN_LOG_LEVEL=3
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
time python -m patch_forcing.study --study=timesteps,samplers,difficulty,context --config=configs/mnist.py:study \
    --config.data.data_dir="$DATA" --workdir="$WORKDIR"
