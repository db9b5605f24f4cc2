"""--mode=sample: draw class-conditional or text-to-image samples from an inference checkpoint.

Latent models (ImageNet) decode with the SD-VAE named by `config.sample.vae` (a local
safetensors file/folder, or a hub repo id such as stabilityai/sd-vae-ft-ema); pixel models leave
it empty. Writes to <workdir>/samples/<sampler name>/ (e.g. `dual_loop-q40-n4-s50-cfg4.0`):
  grid.png          the first images as a grid
  samples.npz       ADM-compatible: arr_0 uint8 (N, H, W, C), plus labels
  difficulty.png    for a few samples: the image beside its per-patch difficulty heatmap at
                    several steps (and the certain/uncertain mask for adaptive samplers)
Class-conditional: each batch is split over every device of every host (a 1-D mesh) and
gathered; only process 0 writes. The images do not depend on the device or host count.
Text-to-image checkpoints sample `config.sample.images_per_prompt` images for each prompt of
`config.sample.prompt`, or of `config.sample.prompts_file` (one per line), or else the eval split's
captions (captioned digits), and write `prompt_grid.png` (a row per prompt, captioned), the
difficulty picture, and `samples.npz` (arr_0, prompts).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from absl import logging
from etils import epath
from tqdm import tqdm

from patch_forcing import UserError, checkpoint, config_lib, pictures, sharding
from patch_forcing.data import captioned, pipeline
from patch_forcing.flow import samplers
from patch_forcing.models import decoders, vae


def class_labels(config, num: int, num_classes: int, key) -> np.ndarray:
    """The configured classes cycled to `num`, or uniform random classes from `key`."""
    classes = tuple(config.sample.classes)
    bad = [c for c in classes if not 0 <= int(c) < num_classes]
    if bad:
        raise UserError(f"config.sample.classes has {bad}; classes must be in [0, {num_classes})")
    if classes:
        return np.resize(np.asarray(classes, np.int32), num)
    return np.asarray(jax.random.randint(key, (num,), 0, num_classes), np.int32)


def sample_and_save(config, workdir: str, *, devices=None) -> epath.Path:
    workdir = epath.Path(workdir)
    mcfg, apply, params, meta = checkpoint.load_model(config_lib.inference_dir(config, workdir))
    if meta.get("family") == "t2i":
        return sample_prompts(config, workdir, mcfg, apply, params)
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


def prompt_list(config) -> list[str]:
    """config.sample.prompt, else the lines of config.sample.prompts_file, else (captioned digits)
    the eval split's first captions, num_images // images_per_prompt of them."""
    s = config.sample
    if s.get("prompt", ""):
        return [str(s.prompt)]
    if s.get("prompts_file", ""):
        lines = [ln.strip() for ln in epath.Path(s.prompts_file).read_text().splitlines()]
        prompts = [ln for ln in lines if ln]
        if not prompts:
            raise UserError(f"config.sample.prompts_file={s.prompts_file!r} holds no prompt (one per line)")
        return prompts
    if config.data.name == "captioned_digits":
        source = captioned.CaptionedDigits(pipeline.parse_split(config.data.split_eval)[0])
        return [source.caption(i) for i in range(max(1, int(s.num_images) // int(s.images_per_prompt)))]
    raise UserError("text-to-image sampling needs config.sample.prompt or config.sample.prompts_file")


def sample_prompts(config, workdir, mcfg, apply, params) -> epath.Path:
    """images_per_prompt samples per prompt -> prompt_grid.png, difficulty.png, samples.npz.
    Every host samples every image (not split over hosts yet); only process 0 writes."""
    cond = config_lib.conditioning(config)
    scfg = config_lib.sampler_config(config, mcfg, cond)
    name = samplers.sampler_name(scfg)
    out, chief = epath.Path(workdir) / "samples" / name, sharding.is_chief()
    if chief:
        out.mkdir(parents=True, exist_ok=True)
    prompts, k = prompt_list(config), int(config.sample.images_per_prompt)
    flat = [p for p in prompts for _ in range(k)]
    bs, key, (h, w) = int(config.sample.batch_size), jax.random.key(config.seed), mcfg.image_size
    sample_fn = samplers.make_sample_fn(apply, scfg, return_trajectory=False)
    traj_fn = samplers.make_sample_fn(apply, scfg, return_trajectory=True)
    decode = decoders.make_decoder(config.sample.vae)
    images, nfe = [], None
    for i in tqdm(range(0, len(flat), bs), desc=f"sampling {name}", unit="batch", disable=not chief):
        batch = flat[i:i + bs]
        y = cond.encode_prompts(batch + [batch[-1]] * (bs - len(batch)))  # one static batch shape
        bkey = jax.random.fold_in(key, i + 1)
        noise = jax.random.normal(bkey, (bs, h, w, mcfg.in_channels))
        x, info = (traj_fn if i == 0 else sample_fn)(params, noise, y, jax.random.fold_in(bkey, 1))
        x = decode(x)
        if i == 0 and chief:
            pic = pictures.trajectory_picture(x, jax.device_get(info), mcfg.patch_size, h,
                                              int(config.sample.num_difficulty_rows))
            if pic is not None:
                pictures.save_png(out / "difficulty.png", pic)
        nfe = int(info["nfe"])
        images.append(pictures.to_uint8(np.asarray(x[:len(batch)])))
    images = np.concatenate(images)
    if chief:
        grid = images.reshape(len(prompts), k, *images.shape[1:])[:16]
        pictures.save_png(out / "prompt_grid.png", pictures.prompt_grid(grid, prompts[:16]))
        with (out / "samples.npz").open("wb") as f:
            np.savez(f, arr_0=images, prompts=np.asarray(flat))
        print(f"{len(flat)} samples of {len(prompts)} prompts, sampler {name}, NFE {nfe} -> {out}")
    return out
