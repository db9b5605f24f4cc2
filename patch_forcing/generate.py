"""--mode=sample: draw class-conditional samples from an inference checkpoint (EMA weights).

Latent models (ImageNet) decode with the SD-VAE named by `config.sample.vae` (a local
safetensors file/folder, or a hub repo id such as stabilityai/sd-vae-ft-ema); pixel models leave
it empty. Writes to <workdir>/samples/<sampler name>/ (e.g. `dual_loop-q40-n4-s50-cfg4.0`):
  grid.png          the first images as a grid
  samples.npz       ADM-compatible: arr_0 uint8 (N, H, W, C), plus labels
  difficulty.png    for a few samples: the image beside its per-patch difficulty heatmap at
                    several steps (and the certain/uncertain mask for adaptive samplers)
Each batch is split over every device of every host (a 1-D mesh) and gathered; only process 0
writes. The images do not depend on the device or host count.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from absl import logging
from etils import epath
from tqdm import tqdm

from patch_forcing import checkpoint, config_lib, pictures, sharding
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


def sample_and_save(config, workdir: str, *, devices=None) -> epath.Path:
    workdir = epath.Path(workdir)
    mcfg, apply, params, _ = checkpoint.load_model(config_lib.inference_dir(config, workdir))
    scfg = config_lib.sampler_config(config, mcfg)
    name = samplers.sampler_name(scfg)
    out = workdir / "samples" / name

    mesh = sharding.flat_mesh(devices)
    split = sharding.batch_sharding(mesh)
    n = int(config.sample.num_images)
    bs = math.ceil(int(config.sample.batch_size) / mesh.size) * mesh.size  # a multiple of the devices
    key = jax.random.key(config.seed)
    labels = class_labels(config, n, mcfg.num_classes, jax.random.fold_in(key, 0))
    h, w = mcfg.image_size
    sample_fn = samplers.make_sample_fn(apply, scfg, return_trajectory=False)
    traj_fn = samplers.make_sample_fn(apply, scfg, return_trajectory=True)
    params = sharding.replicate(params, mesh)
    decode, vae_params = vae.load_decoder(config.sample.vae) if config.sample.vae else (None, None)
    decode = jax.jit(decode) if decode else None
    vae_params = sharding.replicate(vae_params, mesh) if decode else None

    def global_array(x):  # the same host array on every process -> split over the mesh
        return jax.make_array_from_callback(x.shape, split, lambda idx: x[idx])

    images, nfe = [], None
    for i in tqdm(range(0, n, bs), desc=f"sampling {name}", unit="batch", disable=not sharding.is_chief()):
        b = min(bs, n - i)
        bkey = jax.random.fold_in(key, i + 1)
        noise = np.asarray(jax.random.normal(bkey, (bs, h, w, mcfg.in_channels)))
        y = np.resize(labels[i:i + b], bs).astype(np.int32)
        fn = traj_fn if i == 0 else sample_fn
        x, info = fn(params, global_array(noise), global_array(y), jax.random.fold_in(bkey, 1))
        x = decode(vae_params, x) if decode else x
        x, info = sharding.to_host((x, info))
        if i == 0 and sharding.is_chief():
            pic = pictures.trajectory_picture(x, info, mcfg.patch_size, mcfg.image_size[0],
                                              int(config.sample.num_difficulty_rows))
            if pic is not None:
                out.mkdir(parents=True, exist_ok=True)
                pictures.save_png(out / "difficulty.png", pic)
        nfe = int(info["nfe"])
        images.append(pictures.to_uint8(x[:b]))
    images = np.concatenate(images)
    if sharding.is_chief():
        out.mkdir(parents=True, exist_ok=True)
        pictures.save_png(out / "grid.png", pictures.image_grid(images[:64], min_size=32))
        with (out / "samples.npz").open("wb") as f:
            np.savez(f, arr_0=images, labels=labels)
        logging.info("wrote %d samples (%s, NFE %d per image) to %s", n, name, nfe, out)
        print(f"{n} samples, sampler {name}, NFE {nfe} -> {out}")
    return out
