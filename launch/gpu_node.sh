#!/usr/bin/env bash
# Train on one multi-GPU node (data parallel over all local GPUs; FSDP with
# --config.mesh.data=1 --config.mesh.fsdp=-1). For several nodes, run this on each node with
# JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i set (e.g. from SLURM).
#   bash launch/gpu_node.sh configs/imagenet.py /data/runs/pf-b2 --config.data.data_dir=/data/latents
set -euo pipefail
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec python -m patch_forcing.main --config="$CONFIG" --workdir="$WORKDIR" \
    --config.model.attention_impl=cudnn "$@"
