"""The CPU default: a tiny Patch Forcing DiT on scikit-learn's bundled 8x8 digits (no download).

  python -m patch_forcing.main --config=configs/digits.py --workdir=/tmp/pf_digits

On the 2-core CI-class CPU this trains in a few minutes and leaves recognisable digits in
<workdir>/samples/, difficulty maps beside them, TensorBoard events, checkpoints and an
inference checkpoint in <workdir>/inference.
`--config=configs/digits.py:smoke` shrinks everything for tests (a few steps); `:repa` (or
`:smoke,repa`) adds REPA with a digit classifier trained into <workdir>/repa_encoder as the frozen
target encoder (its 4x4x128 last conv map: one 128-d feature per DiT token), so the whole REPA
path runs on a CPU.
"""

from configs import common

PRESETS = ("", "smoke", "repa", "smoke,repa")


def get_config(arg: str = ""):
    args = [a for a in arg.split(",") if a]
    if any(a not in ("smoke", "repa") for a in args):
        raise ValueError(f"configs/digits.py argument {arg!r}: each of its comma-separated parts must be "
                         "one of ['smoke', 'repa']")
    c = common.base_config()
    c.data.name = "digits"
    c.data.split_train, c.data.split_eval = "train", "test"
    c.data.image_size, c.data.channels, c.data.num_classes = (8, 8), 1, 10
    c.data.batch_size = 64
    c.model = common.model_block("PF-Tiny/2", image_size=8, in_channels=1, num_classes=10,
                                 hidden_size=128, depth=3, num_heads=4)
    c.optim.lr, c.optim.warmup_steps = 1e-3, 200
    c.ema.decay = 0.995  # a short run: the EMA must forget the zero-output initialisation
    c.train.num_steps = 2500
    c.checkpoint.every_steps = 500
    c.log.every_steps, c.log.eval_every_steps, c.log.sample_every_steps = 100, 500, 1250
    c.sampler.steps = 50
    # python -m patch_forcing.study: 24 runs of 500 steps (8 timestep samplers x 3 seeds), FID of all
    # 297 held-out digits against the 1,500 training digits (studies/results/digits_500steps/; at
    # 500 steps no model is near the data: studies/results/digits_1500steps/ trains 1,500).
    c.study.train_steps, c.study.num_samples, c.study.num_examples = 500, 297, 297
    if "smoke" in args:
        c.model = common.model_block("PF-Tiny/2", image_size=8, in_channels=1, num_classes=10,
                                     hidden_size=32, depth=1, num_heads=2)
        common.shrink_for_smoke(c)
        c.study.train_steps, c.study.num_samples, c.study.num_examples = 0, 64, 64  # train.num_steps
    if "repa" in args:  # the classifier's last conv map (4x4x128) stands in for DINOv2
        c.repa = common.repa_block(encoder_depth=1, encoder="classifier", z_dim=128, projector_dim=256)
    return c
