#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: copy this checkout to every host, then run the same command on
# all of them (jax.distributed initialises from the TPU environment). Usage:
#   TPU=my-v4-32 ZONE=us-central2-b BUCKET=gs://my-bucket bash launch/tpu_pod.sh configs/imagenet.py:XL [--config.x=y ...]
set -euo pipefail
CONFIG=${1:-configs/imagenet.py}
shift || true
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET to a gs:// path}"
RUN=${RUN:-$(basename "${CONFIG%%.py*}")-$(date +%Y%m%d-%H%M%S)}
REPO=$(cd "$(dirname "$0")/.." && pwd)
tar -C "$REPO" --exclude=.git -czf /tmp/patch_forcing.tgz .
gcloud compute tpus tpu-vm scp /tmp/patch_forcing.tgz "$TPU":~/ --zone "$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e; mkdir -p ~/patch_forcing && tar -C ~/patch_forcing -xzf ~/patch_forcing.tgz && cd ~/patch_forcing
  pip install -q -r requirements.txt 'jax[tpu]'
  python -m patch_forcing.main --config=$CONFIG --workdir=$BUCKET/$RUN \
      --config.data.data_dir=$BUCKET/imagenet256-latents $*
"
