"""The paper's ImageNet-256 recipe: PF-B/2 on SD-VAE ft-EMA latents (32x32x4).

  python -m patch_forcing.main --config=configs/imagenet.py --workdir=gs://BUCKET/runs/imagenet-B \
      --config.data.data_dir=gs://BUCKET/imagenet256-latents
  python -m patch_forcing.main --config=configs/imagenet.py:XL ...        # PF-XL/2
  python -m patch_forcing.main --config=configs/imagenet.py:B,sit ...     # SiT-B/2 global baseline
  python -m patch_forcing.main --config=configs/imagenet.py:XL,cfg4 ...   # guidance 4.0 (pictures)
  python -m patch_forcing.main --config=configs/imagenet.py:xl_repa ... \
      --config.data.data_dir=gs://BUCKET/imagenet256-latents-with-pixels \
      --config.repa.encoder_path=/ckpt/dinov2_vitb14_reg4_pretrain.pth  # PF-XL/2 + REPA (:b_repa)

AdamW 1e-4, no weight decay, 1,000 warm-up steps then constant, clip 1.0, EMA 0.9999 every step,
bf16 compute, batch 256, 400k steps. data.data_dir holds `train/` and `validation/` latent
directories from `python -m patch_forcing.tools.extract_latents` (flip pairs stored); the
validation loss reads ImageNet's validation images, never training ones (the reference
validates on its validation shards too).

Evaluation defaults are the paper's headline protocol (Table 1): FID-50k without guidance
(cfg 1.0), 100 sampling steps, uniform classes, Inception features against ADM's reference batch
VIRTUAL_imagenet256_labeled.npz (download it from
https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz
and give its path, local or gs://, as --config.eval.reference). Expected for B/2 at 400k steps:
27.9 euler_pf / 26.0 dual_loop / 24.2 look_ahead (the default sampler here). `,cfg4` is the
guided setting of the pictures (cfg 4.0).
REPA (`:xl_repa`, `:b_repa`, also `,sit`, `,cfg4`): the released REPAPatchForcingDiT's projector after
block 8 aligned with weight 0.5 to DINOv2-B/14-reg patch tokens computed on the fly from the 256 px
images stored beside the latents (`extract_latents --pixels`; data.with_pixels). Paper: PF-XL/2 +
look-ahead + REPA FID 6.7 without guidance (SiT-XL/2 + REPA 7.9); 2.00 with guidance, 200 epochs.
"""

from configs import common

SIZES = ("B", "L", "XL")
OPTIONS = ("sit", "cfg4")
PRESETS = tuple(f"{s}{o}" for s in SIZES + tuple(f"{z.lower()}_repa" for z in SIZES)
                for o in ("", ",sit", ",cfg4", ",sit,cfg4"))
ADM_REFERENCE = "VIRTUAL_imagenet256_labeled.npz"


def get_config(arg: str = "B"):
    parts = [a for a in (arg or "B").split(",") if a]
    size, repa = parts[0], parts[0].lower().endswith("_repa")
    size = size[:-len("_repa")].upper() if repa else size
    if size not in SIZES or any(a not in OPTIONS for a in parts[1:]):
        raise ValueError(f"configs/imagenet.py argument {arg!r}: size must be one of {list(SIZES)} (or "
                         f"b_repa, l_repa, xl_repa), optionally followed by options from {list(OPTIONS)}, "
                         "e.g. 'XL,cfg4'")
    sit = "sit" in parts[1:]
    c = common.base_config()
    c.data.name, c.data.data_dir = "latents", ""
    c.data.split_train, c.data.split_eval = "train", "validation"
    c.data.image_size, c.data.channels, c.data.num_classes = (32, 32), 4, 1000
    c.data.hflip = True  # picks one of each stored flip pair
    c.data.batch_size = 256
    c.data.num_workers = 8
    c.model = common.model_block(f"{'DiT' if sit else 'PF'}-{size}/2", dtype="bfloat16")
    if sit:  # SiT baseline: global uniform time, no difficulty head
        c.flow.timesteps = "uniform"
    c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay, c.optim.grad_clip = 1e-4, 1000, 0.0, 1.0
    c.ema.decay = 0.9999
    c.train.num_steps = 400_000
    c.checkpoint.every_steps, c.checkpoint.keep = 10_000, 3
    c.log.every_steps, c.log.eval_every_steps, c.log.sample_every_steps = 100, 10_000, 10_000
    c.log.num_samples, c.log.num_eval_examples = 32, 1024
    c.sampler.name = "euler" if sit else "look_ahead"
    c.sampler.steps, c.sampler.cfg_scale = 100, 4.0 if "cfg4" in parts[1:] else 1.0
    c.sample.vae = "stabilityai/sd-vae-ft-ema"  # or a local/gs:// diffusion_pytorch_model.safetensors
    c.eval.num_samples, c.eval.feature_network, c.eval.reference = 50_000, "inception", ADM_REFERENCE
    if repa:  # encoder_path: the user's local DINOv2 weights (validation names where to get them)
        c.repa = common.repa_block(encoder_depth=8)
        c.data.with_pixels = True
    return c
