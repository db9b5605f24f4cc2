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

PRESETS = ("", "smoke", "repa", "smoke,repa", "study", "study_cpu")


def get_config(arg: str = ""):
    args = [a for a in arg.split(",") if a]
    if any(a not in ("smoke", "repa", "study", "study_cpu") for a in args):
        raise ValueError(f"configs/mnist.py argument {arg!r}: each of its comma-separated parts must be "
                         "one of ['smoke', 'repa', 'study', 'study_cpu']")
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
    if "study" in args:
        _study_gpu(c)
    if "study_cpu" in args:
        _study_cpu(c)
    if "repa" in args:  # the classifier's last conv map (8x8x64) stands in for DINOv2
        c.repa = common.repa_block(encoder_depth=1 if "smoke" in args else 2, encoder="classifier", z_dim=64,
                                   projector_dim=256)
    return c


def _study_gpu(c):
    """python -m patch_forcing.study on one GPU (launch/study_gpu.sh): MNIST at 32x32 with p = 2, i.e.
    256 tokens, the token grid of ImageNet-256 latents; a 4.2M DiT (D 192, depth 6), bf16.

    Sized from FLOPs for ~8 minutes of one H200 for timesteps + samplers: a per-patch image costs
    2.5 GFLOP forward (36 D^2 + 4 N D per token and block), 7.4 GFLOP per training example; 24 runs
    x 1,000 steps x 128 images = 23 PFLOP, the samplers' 15 evaluations x 1,000 samples x 153 NFE
    and the timesteps' 24 x 1,000 x 21 NFE another 6.9 PFLOP: ~250 s at 120 TFLOP/s (15% of the
    H200's bf16 peak, a small model), plus ~3 min of start-up and compiles (the persistent compile
    cache serves the second and third seed). Unmeasured: no GPU was lent when this was written.
    """
    c.model = common.model_block("PF-Tiny/2", image_size=32, in_channels=1, num_classes=10,
                                 hidden_size=192, depth=6, num_heads=3, dtype="bfloat16")
    c.data.source, c.data.batch_size = "idx", 128  # the IDX files: no tfds, no TensorFlow
    c.optim.lr, c.optim.warmup_steps = 1e-3, 100
    c.ema.decay = 0.995
    c.train.num_steps = 1000
    c.checkpoint.every_steps = 1000
    c.log.every_steps, c.log.eval_every_steps, c.log.sample_every_steps = 100, 1000, 1000
    c.log.num_eval_examples = 512
    c.study.num_samples, c.study.batch_size, c.study.budgets = 1000, 1000, (9, 21, 42, 81)


def _study_cpu(c):
    """python -m patch_forcing.study on this 2-core CPU: 64 tokens (p = 4 on 32x32), a 0.33M DiT."""
    c.model = common.model_block("PF-Tiny/4", image_size=32, in_channels=1, num_classes=10,
                                 hidden_size=64, depth=4, num_heads=4)
    c.data.batch_size = 64
    c.optim.lr, c.optim.warmup_steps = 2e-3, 100
    c.ema.decay = 0.99  # a short run: the EMA must not lag behind by much
    c.train.num_steps = 700
    c.checkpoint.every_steps = 350
    c.log.every_steps, c.log.eval_every_steps, c.log.sample_every_steps = 50, 700, 700
    c.log.num_eval_examples = 256
    c.study.num_samples, c.study.budgets = 1000, (9, 21)
    c.data.source = "idx"  # the IDX files: no tfds, no TensorFlow import
