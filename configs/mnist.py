"""MNIST at 28x28 zero-padded to 32x32 (so p = 2, 4 and 8 all tile it; padding is -1, the
background colour, so nothing new is drawn), with a small Patch Forcing DiT.

  python -m patch_forcing.main --config=configs/mnist.py --workdir=/tmp/pf_mnist \
      --config.data.data_dir=/path/to/mnist

Reads tensorflow-datasets' `mnist` when it is prepared locally, else the original IDX files in
`data.data_dir` (data.source='auto'). Offline here, the IDX test split is the only MNIST: its first
8,000 digits train, the last 2,000 are held out (validation loss, FID reference).
Cost (benchmarks/results/train_step_cpu.md): ~1.9 s a step at batch 128 on the 2-core CPU, so
the full 20k steps are a GPU job (minutes there); `:smoke` runs anywhere.
`:repa` (or `:smoke,repa`) adds REPA with an MNIST classifier trained into <workdir>/repa_encoder
as the frozen target encoder (its 8x8x64 last conv map: one 64-d feature per DiT token).
With network and tfds: --config.data.source=tfds --config.data.split_train=train
--config.data.split_eval=test.
"""

from configs import common

PRESETS = ("", "smoke", "repa", "smoke,repa")


def get_config(arg: str = ""):
    args = [a for a in arg.split(",") if a]
    if any(a not in ("smoke", "repa") for a in args):
        raise ValueError(f"configs/mnist.py argument {arg!r}: each of its comma-separated parts must be "
                         "one of ['smoke', 'repa']")
    c = common.base_config()
    c.data.name, c.data.source = "mnist", "auto"
    c.data.split_train, c.data.split_eval = "test[:8000]", "test[8000:]"
    c.data.image_size, c.data.pad, c.data.channels, c.data.num_classes = (32, 32), 2, 1, 10
    c.data.batch_size = 128
    c.model = common.model_block("PF-Tiny/4", image_size=32, in_channels=1, num_classes=10,
                                 hidden_size=192, depth=6, num_heads=6)
    c.optim.lr, c.optim.warmup_steps = 5e-4, 500
    c.ema.decay = 0.999
    c.train.num_steps = 20000
    c.checkpoint.every_steps = 2000
    c.log.every_steps, c.log.eval_every_steps, c.log.sample_every_steps = 100, 2000, 5000
    if "smoke" in args:
        c.model = common.model_block("PF-Tiny/4", image_size=32, in_channels=1, num_classes=10,
                                     hidden_size=32, depth=1, num_heads=2)
        c.data.batch_size, c.train.num_steps = 16, 4
        c.checkpoint.every_steps = 2
        c.log.every_steps = c.log.eval_every_steps = c.log.sample_every_steps = 2
        c.log.num_samples, c.log.num_eval_examples = 8, 16
        c.sampler.steps = 4
    if "repa" in args:  # the classifier's last conv map (8x8x64) stands in for DINOv2
        c.repa = common.repa_block(encoder_depth=1 if "smoke" in args else 2, encoder="classifier", z_dim=64,
                                   projector_dim=256)
    return c
