"""--mode=sample: draw class-conditional samples from an inference checkpoint (EMA weights).

Latent models (ImageNet) decode with the SD-VAE named by `config.sample.vae` (a local
safetensors file/folder, or a hub repo id such as stabilityai/sd-vae-ft-ema); pixel models leave
it empty. Writes to <workdir>/samples/<sampler name>/ (e.g. `dual_loop-q40-n4-s50-cfg4.0`):
  grid.png          the first images as a grid
  samples.npz       ADM-compatible: arr_0 uint8 (N, H, W, C), plus labels
  difficulty.png    for a few samples: the image beside its per-patch difficulty heatmap at
                    several steps (and the certain/uncertain mask for adaptive samplers)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from tqdm import tqdm

from patch_forcing import checkpoint as ckpt_lib
from patch_forcing import config_lib, pictures, samplers
from patch_forcing.models import dit


def load_model(directory):
    """(DiTConfig, apply(params, x, t, y), params) from an inference checkpoint."""
    model_cfg, params, _ = ckpt_lib.load_inference(directory)
    mcfg = dit.DiTConfig.from_dict(model_cfg)
    model = dit.load_params(dit.DiT(mcfg, rngs=nnx.Rngs(0)), params)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return mcfg, (lambda p, x, t, y: nnx.merge(graphdef, p, rest)(x, t, y)), params


def class_labels(config, num: int, num_classes: int, key) -> np.ndarray:
    """The configured classes cycled to `num`, or uniform random classes from `key`."""
    classes = tuple(config.sample.classes)
    bad = [c for c in classes if not 0 <= int(c) < num_classes]
    if bad:
        raise ValueError(f"config.sample.classes has {bad}; classes must be in [0, {num_classes})")
    if classes:
        return np.resize(np.asarray(classes, np.int32), num)
    return np.asarray(jax.random.randint(key, (num,), 0, num_classes), np.int32)


def trajectory_picture(images, info: dict, mcfg: dit.DiTConfig, rows: int):
    """Samples beside their per-patch difficulty over the trajectory (and certain masks), or None."""
    if not mcfg.per_patch or rows <= 0 or "difficulty" not in info:
        return None
    images = np.asarray(images[:rows])
    uint8 = images if images.dtype == np.uint8 else pictures.to_uint8(images)
    masks = info["certain"][:rows] if "certain" in info else None
    scale = uint8.shape[1] // mcfg.image_size[0]  # decoded latents: pixels per latent cell
    return pictures.difficulty_picture(uint8, info["difficulty"][:rows], masks=masks,
                                       patch_size=mcfg.patch_size * scale, times=info["times"][:rows])


def make_decoder(vae_spec: str):
    """Jitted latents -> pixels in [-1, 1] with the SD-VAE `vae_spec` (local file/folder or hub id)."""
    from patch_forcing import vae as vae_lib

    decode, vae_params = vae_lib.load_decoder(vae_spec)
    return jax.jit(lambda z: decode(vae_params, z))


def sample_and_save(config, workdir: str) -> epath.Path:
    workdir = epath.Path(workdir)
    ckpt_dir = epath.Path(config.sample.checkpoint) if config.sample.checkpoint else workdir / "inference"
    mcfg, apply, params = load_model(ckpt_dir)
    scfg = config_lib.sampler_config(config, mcfg)
    name = samplers.sampler_name(scfg)
    out = workdir / "samples" / name
    out.mkdir(parents=True, exist_ok=True)

    n, bs = int(config.sample.num_images), int(config.sample.batch_size)
    key = jax.random.key(config.seed)
    labels = class_labels(config, n, mcfg.num_classes, jax.random.fold_in(key, 0))
    h, w = mcfg.image_size
    sample_fn = samplers.make_sample_fn(apply, scfg, return_trajectory=False)
    traj_fn = samplers.make_sample_fn(apply, scfg, return_trajectory=True)

    decode = make_decoder(config.sample.vae) if config.sample.vae else (lambda x: x)
    images, nfe = [], None
    for i in tqdm(range(0, n, bs), desc=f"sampling {name}", unit="batch"):
        b = min(bs, n - i)
        bkey = jax.random.fold_in(key, i + 1)
        noise = jax.random.normal(bkey, (bs, h, w, mcfg.in_channels))
        y = jnp.asarray(np.resize(labels[i:i + b], bs))
        fn = traj_fn if i == 0 else sample_fn
        x, info = fn(params, noise, y, jax.random.fold_in(bkey, 1))
        x = decode(x)
        if i == 0:
            pic = trajectory_picture(x, jax.device_get(info), mcfg, int(config.sample.num_difficulty_rows))
            if pic is not None:
                pictures.save_png(out / "difficulty.png", pic)
        nfe = int(info["nfe"])
        images.append(pictures.to_uint8(np.asarray(x[:b])))
    images = np.concatenate(images)
    pictures.save_png(out / "grid.png", pictures.image_grid(images[:64], min_size=32))
    with (out / "samples.npz").open("wb") as f:
        np.savez(f, arr_0=images, labels=labels)
    logging.info("wrote %d samples (%s, NFE %d per image) to %s", n, name, nfe, out)
    print(f"{n} samples, sampler {name}, NFE {nfe} -> {out}")
    return out
