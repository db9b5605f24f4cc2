#!/usr/bin/env bash
# Train on the GPUs of one node (or one node of several). Run with --help for the whole story.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu_node.sh [--dry-run] [--foreground] CONFIG[:ARG] WORKDIR [main.py flags...]

Train patch_forcing on this node's GPUs: data parallel over all of them by default, FSDP with
--config.mesh.data=1 --config.mesh.fsdp=-1. Runs from the repository (it changes into it), with
${PYTHON:-python3} (Python >= 3.11 with `pip install -r requirements.txt "jax[cuda12]"`).

  --foreground   run attached (inside SLURM, tmux, or to watch it); default: nohup in the background
  --dry-run      print the commands and stop
  -h, --help     this text

The log goes to WORKDIR/logs/<host>.log (for a gs:// WORKDIR to ~/pf-logs/<run>/). WORKDIR is the
run's identity: starting again with the same WORKDIR resumes from its latest checkpoint.

cuDNN's fused attention (--config.model.attention_impl=cudnn) is added only when the config
computes in bfloat16 or float16 (it has no float32 kernel: MNIST and digits stay on XLA's);
an attention_impl of your own wins.

Several nodes:
  SLURM (one task per GPU):  srun launch/gpu_node.sh --foreground CONFIG WORKDIR ...
      JAX reads SLURM_* itself (see launch/slurm_example.sbatch); nothing to set.
  Otherwise, on every node:  COORDINATOR=node0:1234 NUM_NODES=N NODE_RANK=i launch/gpu_node.sh ...
      (passed as --coordinator_address/--num_processes/--process_id; JAX reads no process count
      or id from the environment).
Environment JAX and XLA read: XLA_PYTHON_CLIENT_MEM_FRACTION (0.92 here unless set),
CUDA_VISIBLE_DEVICES, JAX_COORDINATOR_ADDRESS.

Preemption: SIGTERM makes the trainer save where it can (SLURM: --signal=TERM@120 warns 120 s
ahead); otherwise the run resumes from its last periodic checkpoint.
EOF
}

die() { echo "gpu_node.sh: $*" >&2; exit 2; }

DRY=0; FOREGROUND=0; POS=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY=1 ;;
    --foreground) FOREGROUND=1 ;;
    *) POS=("$@"); break ;;
  esac
  shift
done
((${#POS[@]} >= 2)) || { usage >&2; exit 2; }
CONFIG=${POS[0]}; WORKDIR=${POS[1]}; EXTRA=("${POS[@]:2}")
PYTHON=${PYTHON:-python3}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cfg_file=${CONFIG%%:*}  # paths relative to where this was started stay valid after the cd below
[[ -f $cfg_file && $cfg_file != /* ]] && CONFIG=$PWD/$CONFIG
[[ $WORKDIR != *://* && $WORKDIR != /* ]] && WORKDIR=$PWD/$WORKDIR
cd "$REPO"
((DRY)) && echo "+ cd $(printf '%q' "$REPO")"

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'); jax >= 0.7 needs >= 3.11 (set PYTHON=)"

config_dtype() {  # the config's model.dtype, after a --config.model.dtype= override
  local arg
  for arg in "${EXTRA[@]}"; do [[ $arg == --config.model.dtype=* ]] && { echo "${arg#*=}"; return; }; done
  "$PYTHON" - "$CONFIG" <<'PY'
import importlib.util, sys
path, _, arg = sys.argv[1].partition(":")
spec = importlib.util.spec_from_file_location("launch_config", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print((module.get_config(arg) if arg else module.get_config()).model.dtype)
PY
}

FLAGS=(--config="$CONFIG" --workdir="$WORKDIR")
dtype=$(config_dtype) || die "cannot read model.dtype of --config=$CONFIG"
if [[ $dtype == bfloat16 || $dtype == float16 ]] && [[ " ${EXTRA[*]} " != *" --config.model.attention_impl="* ]]; then
  FLAGS+=(--config.model.attention_impl=cudnn)
fi
if [[ -n ${NUM_NODES:-} && ${NUM_NODES} -gt 1 ]]; then
  [[ -n ${COORDINATOR:-} && -n ${NODE_RANK:-} ]] || die "NUM_NODES=$NUM_NODES needs COORDINATOR=host:port and NODE_RANK"
  FLAGS+=(--multihost=on --coordinator_address="$COORDINATOR" --num_processes="$NUM_NODES" --process_id="$NODE_RANK")
else
  FLAGS+=(--multihost=auto)  # a SLURM step with several tasks is found by JAX itself
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

host=$(hostname)${SLURM_PROCID:+-$SLURM_PROCID}${NODE_RANK:+-$NODE_RANK}
if [[ $WORKDIR == *://* ]]; then LOGS=$HOME/pf-logs/$(basename "$WORKDIR"); else LOGS=$WORKDIR/logs; fi
LOG=$LOGS/$host.log
CMD=("$PYTHON" -m patch_forcing.main "${FLAGS[@]}" "${EXTRA[@]}")
if ((DRY)); then
  echo "+ XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION $(printf '%q ' "${CMD[@]}")> $(printf '%q' "$LOG") 2>&1"
  exit 0
fi
mkdir -p "$LOGS"
if ((FOREGROUND)); then
  "${CMD[@]}" 2>&1 | tee -a "$LOG"
  exit "${PIPESTATUS[0]}"
fi
nohup "${CMD[@]}" >> "$LOG" 2>&1 &
echo "training in $WORKDIR (pid $!), log $LOG: tail -f $(printf '%q' "$LOG")"
