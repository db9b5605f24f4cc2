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
from tqdm import tqdm

from patch_forcing import checkpoint, config_lib, pictures
from patch_forcing.flow import samplers
from patch_forcing.models import vae


def class_labels(config, num: int, num_classes: int, key) -> np.ndarray:
    """The configured classes cycled to `num`, or uniform random classes from `key`."""
    classes = tuple(config.sample.classes)
    bad = [c for c in classes if not 0 <= int(c) < num_classes]
    if bad:
        raise ValueError(f"config.sample.classes has {bad}; classes must be in [0, {num_classes})")
    if classes:
        return np.resize(np.asarray(classes, np.int32), num)
    return np.asarray(jax.random.randint(key, (num,), 0, num_classes), np.int32)


def sample_and_save(config, workdir: str) -> epath.Path:
    workdir = epath.Path(workdir)
    mcfg, apply, params, _ = checkpoint.load_model(config_lib.inference_dir(config, workdir))
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

    decode = vae.make_decoder(config.sample.vae)
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
            pic = pictures.trajectory_picture(x, jax.device_get(info), mcfg.patch_size, mcfg.image_size[0],
                                              int(config.sample.num_difficulty_rows))
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
