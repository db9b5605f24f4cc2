#!/usr/bin/env bash
# Train on a Cloud TPU pod slice from this checkout. Run with --help for the whole story.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh [options] STEP... [-- main.py flags]

Train patch_forcing on a Cloud TPU VM slice (one or many hosts) from this checkout.

Steps (in this order when several are given; `all` = create setup train):
  create   request the TPU as a queued resource (with --spot: preemptible, cheaper) and wait
           until it is ACTIVE
  setup    copy this checkout to every host and build a Python 3.11 environment there with uv
           (TPU VM images ship Python 3.10; jax >= 0.7 and flax >= 0.12 need 3.11), then
           `uv pip install -r requirements.txt "jax[tpu]"`
  train    start `python -m patch_forcing.main --multihost=on --num_processes=HOSTS` on every host
           under nohup; each host logs to ~/pf-logs/RUN/<host>.log and copies the log to
           WORKDIR/logs/ every 5 minutes and at the end
  logs     print the last lines of worker 0's log
  delete   delete the queued resource and its TPU (also: --delete)

Options (or the environment variable in brackets):
  --name=NAME           TPU / queued-resource name [TPU_NAME]                      (required)
  --zone=ZONE           e.g. us-central2-b [ZONE]                                  (required)
  --project=PROJECT     GCP project [PROJECT] (default: gcloud's current project)
  --accelerator=TYPE    e.g. v4-32, v5p-64, v6e-16 [ACCELERATOR] (default v4-32)
  --version=VERSION     TPU software version [TPU_VERSION] (default tpu-ubuntu2204-base)
  --spot                spot (preemptible) capacity
  --hosts=N             hosts of the slice (default: derived from --accelerator)
  --bucket=gs://B       where runs live [BUCKET]; WORKDIR = gs://B/runs/RUN        (required)
  --config=FILE[:ARG]   config (default configs/imagenet.py:B)
  --run=RUN             run name (default from the config, e.g. imagenet-B); stable, so a
                        relaunch with the same RUN resumes from WORKDIR's checkpoints
  --data=gs://...       data.data_dir (default gs://B/imagenet256-latents)
  --dry-run             print every gcloud command, and the command each host runs, and stop
  --delete              same as the step `delete`
  -h, --help            this text

Everything after `--` goes to patch_forcing.main, quoted as given (e.g. --config.optim.lr=2e-4).

Preemption: spot TPUs get about 30 s notice (SIGTERM to the processes); the trainer saves a
checkpoint on SIGTERM where it can and otherwise resumes from its last periodic checkpoint
(config.checkpoint.every_steps). After a preemption: --delete, then `all` again with the same
--run: the new slice resumes in WORKDIR.

Example:
  launch/tpu_pod.sh --name=pf-v4 --zone=us-central2-b --bucket=gs://my-bucket --spot all \
      -- --config.train.num_steps=400000
EOF
}

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

NAME=${TPU_NAME:-}; ZONE=${ZONE:-}; PROJECT=${PROJECT:-}; ACCELERATOR=${ACCELERATOR:-v4-32}
VERSION=${TPU_VERSION:-tpu-ubuntu2204-base}; BUCKET=${BUCKET:-}; CONFIG=configs/imagenet.py:B
RUN=${RUN:-}; DATA=""; HOSTS=""; SPOT=0; DRY=0; STEPS=(); EXTRA=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name=*) NAME=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --project=*) PROJECT=${1#*=} ;;
    --accelerator=*) ACCELERATOR=${1#*=} ;;
    --version=*) VERSION=${1#*=} ;;
    --hosts=*) HOSTS=${1#*=} ;;
    --bucket=*) BUCKET=${1#*=} ;;
    --config=*) CONFIG=${1#*=} ;;
    --run=*) RUN=${1#*=} ;;
    --data=*) DATA=${1#*=} ;;
    --spot) SPOT=1 ;;
    --dry-run) DRY=1 ;;
    --delete) STEPS+=(delete) ;;
    --) shift; EXTRA=("$@"); break ;;
    create|setup|train|logs|delete) STEPS+=("$1") ;;
    all) STEPS+=(create setup train) ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
((${#STEPS[@]})) || { usage >&2; exit 2; }
[[ -n $NAME ]] || die "--name (or TPU_NAME) is required"
[[ -n $ZONE ]] || die "--zone (or ZONE) is required"
[[ $BUCKET == gs://* ]] || die "--bucket must be a gs:// bucket every host can reach, got '${BUCKET}'"
BUCKET=${BUCKET%/}

hosts_of() {  # TPU VM hosts of an accelerator type: v2-v5p count TensorCores (8 a host), v5e/v6e chips (4 a host)
  local kind=${1%-*} n=${1##*-}
  [[ $n =~ ^[0-9]+$ ]] || die "cannot read the size of --accelerator=$1; give --hosts"
  case "$kind" in
    v2|v3|v4|v5p) echo $(( n > 8 ? n / 8 : 1 )) ;;
    v5litepod|v5e|v6e) echo $(( n > 8 ? n / 4 : 1 )) ;;
    *) die "unknown TPU kind in --accelerator=$1; give --hosts" ;;
  esac
}
HOSTS=${HOSTS:-$(hosts_of "$ACCELERATOR")}
cfg_file=${CONFIG%%:*}; cfg_arg=${CONFIG#"$cfg_file"}; cfg_arg=${cfg_arg#:}
RUN=${RUN:-$(basename "$cfg_file" .py)${cfg_arg:+-${cfg_arg//[^A-Za-z0-9]/-}}}
WORKDIR=$BUCKET/runs/$RUN
DATA=${DATA:-$BUCKET/imagenet256-latents}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GCLOUD_TPU=(--zone="$ZONE")
[[ -n $PROJECT ]] && GCLOUD_TPU+=(--project="$PROJECT")

q() { printf '%q ' "$@"; }  # shell-quote every word, for commands that travel as one string
run() {  # run a local command, or print it with --dry-run
  if ((DRY)); then echo "+ $(q "$@")"; else "$@"; fi
}
on_hosts() {  # run a script on every host of the slice
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_TPU[@]}" --worker=all --command="$1"
  if ((DRY)); then
    for ((i = 0; i < HOSTS; i++)); do printf '[worker %d of %d] %s\n' "$i" "$HOSTS" "$1"; done
  fi
}

step_create() {
  local spot=(); ((SPOT)) && spot=(--spot)
  run gcloud compute tpus queued-resources create "$NAME" "${GCLOUD_TPU[@]}" --node-id="$NAME" \
    --accelerator-type="$ACCELERATOR" --runtime-version="$VERSION" "${spot[@]}"
  if ((DRY)); then
    echo "+ (every 30 s until ACTIVE) $(q gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_TPU[@]}" \
      --format='value(state.state)')"
    return
  fi
  local state=""
  until [[ $state == ACTIVE ]]; do
    sleep 30
    state=$(gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_TPU[@]}" --format='value(state.state)')
    echo "queued resource $NAME: $state"
    [[ $state == FAILED || $state == SUSPENDED ]] && die "queued resource $NAME is $state"
  done
}

step_setup() {
  run tar -C "$REPO" --exclude=.git --exclude=build --exclude='*.egg-info' --exclude=__pycache__ \
    -czf /tmp/patch_forcing.tgz .
  run gcloud compute tpus tpu-vm scp /tmp/patch_forcing.tgz "$NAME":patch_forcing.tgz "${GCLOUD_TPU[@]}" --worker=all
  on_hosts 'set -euo pipefail
mkdir -p ~/patch_forcing && tar -C ~/patch_forcing -xzf ~/patch_forcing.tgz
command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
export PATH="$HOME/.local/bin:$PATH"
uv venv --python 3.11 --allow-existing ~/pf-venv
cd ~/patch_forcing && uv pip install --python ~/pf-venv/bin/python -r requirements.txt "jax[tpu]"
~/pf-venv/bin/python -c "import sys, jax; print(sys.version.split()[0], jax.__version__)"'
}

step_train() {
  local main=(../pf-venv/bin/python -m patch_forcing.main --config="$CONFIG" --workdir="$WORKDIR"
              --multihost=on --num_processes="$HOSTS" --config.data.data_dir="$DATA" "${EXTRA[@]}")
  local logs="~/pf-logs/$RUN"
  on_hosts "set -euo pipefail
cd ~/patch_forcing && mkdir -p $logs && log=$logs/\$(hostname).log
if [[ -f $logs/pid ]] && kill -0 \$(cat $logs/pid) 2>/dev/null; then echo 'already training $RUN here'; exit 1; fi
nohup $(q "${main[@]}")> \$log 2>&1 &
echo \$! > $logs/pid
nohup bash -c \"while kill -0 \$! 2>/dev/null; do sleep 300; gcloud storage cp \$log $WORKDIR/logs/; done; gcloud storage cp \$log $WORKDIR/logs/\" >/dev/null 2>&1 &
echo \"\$(hostname): training $RUN in $WORKDIR, log \$log\""
}

step_logs() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_TPU[@]}" --worker=0 --command="tail -n 50 ~/pf-logs/$RUN/*.log"
}

step_delete() {
  run gcloud compute tpus queued-resources delete "$NAME" "${GCLOUD_TPU[@]}" --force --quiet
}

((DRY)) && echo "# TPU $NAME ($ACCELERATOR, $HOSTS hosts$( ((SPOT)) && echo ', spot')), run $RUN in $WORKDIR"
for s in "${STEPS[@]}"; do "step_$s"; done
