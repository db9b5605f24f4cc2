"""Config validation and the objects a config describes (model config, timestep sampler, mesh).

`validate(config, mode)` runs before anything is compiled or read: a bad field fails with one line
naming the field and the allowed values.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from patch_forcing import timesteps
from patch_forcing.models import dit

MODES = ("train", "sample", "evaluate")
GLOBAL_TIMESTEPS = ("uniform", "logit_normal")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def model_config(config) -> dit.DiTConfig:
    """The DiTConfig spelled out in `config.model` (the `preset` field is informational)."""
    fields = {f.name for f in dataclasses.fields(dit.DiTConfig)}
    block = {k: v for k, v in config.model.items() if k != "preset"}
    block["attention_impl"] = block.get("attention_impl") or None  # "" in configs = JAX's choice
    unknown = sorted(set(block) - fields)
    _require(not unknown, f"config.model has unknown fields {unknown}; allowed: {sorted(fields)}")
    try:
        return dit.DiTConfig(**block)
    except ValueError as e:
        raise ValueError(f"config.model.{e}") from None


def timestep_sampler(config):
    """fn(key, batch, num_patches) -> (B, N) for config.flow.timesteps and its parameter block."""
    name = config.flow.timesteps
    _require(name in timesteps.SAMPLERS,
             f"config.flow.timesteps={name!r} is not one of {sorted(timesteps.SAMPLERS)}")
    params = dict(config.flow.get(name, {}))
    return timesteps.make_timestep_sampler(name, **params)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """A ('data', 'fsdp') mesh; -1 in one axis takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp)]
    _require(sum(s == -1 for s in sizes) <= 1 and all(s == -1 or s >= 1 for s in sizes),
             f"config.mesh.data={sizes[0]} and config.mesh.fsdp={sizes[1]}: each must be >= 1 or -1 (at most one -1)")
    fixed = int(np.prod([s for s in sizes if s != -1]))
    _require(len(devices) % fixed == 0,
             f"config.mesh (data={sizes[0]}, fsdp={sizes[1]}) does not divide the {len(devices)} devices")
    sizes = [len(devices) // fixed if s == -1 else s for s in sizes]
    _require(int(np.prod(sizes)) == len(devices),
             f"config.mesh (data={sizes[0]}, fsdp={sizes[1]}) must use all {len(devices)} devices")
    arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)


def validate(config, mode: str = "train") -> None:
    """One-line ValueError naming the first bad field; nothing is compiled or read here."""
    _require(mode in MODES, f"--mode={mode!r} is not one of {list(MODES)}")
    mcfg = model_config(config)
    timestep_sampler(config)
    if not mcfg.per_patch:
        _require(config.flow.timesteps in GLOBAL_TIMESTEPS,
                 f"config.flow.timesteps={config.flow.timesteps!r} needs a per-patch model; a global model "
                 f"(config.model.per_patch=False) trains with one of {list(GLOBAL_TIMESTEPS)}")
    d = config.data
    _require(tuple(d.image_size) == tuple(mcfg.image_size),
             f"config.data.image_size={tuple(d.image_size)} must equal config.model.image_size={mcfg.image_size}")
    _require(d.channels == mcfg.in_channels,
             f"config.data.channels={d.channels} must equal config.model.in_channels={mcfg.in_channels}")
    _require(d.num_classes == mcfg.num_classes,
             f"config.data.num_classes={d.num_classes} must equal config.model.num_classes={mcfg.num_classes}")
    _require(d.batch_size >= 1, f"config.data.batch_size must be >= 1, got {d.batch_size}")
    o = config.optim
    _require(o.lr > 0, f"config.optim.lr must be > 0, got {o.lr}")
    _require(o.warmup_steps >= 0, f"config.optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    _require(o.weight_decay >= 0, f"config.optim.weight_decay must be >= 0, got {o.weight_decay}")
    _require(o.grad_clip > 0, f"config.optim.grad_clip must be > 0, got {o.grad_clip}")
    _require(0 <= config.ema.decay < 1, f"config.ema.decay must be in [0, 1), got {config.ema.decay}")
    _require(0 <= config.loss.label_dropout < 1,
             f"config.loss.label_dropout must be in [0, 1), got {config.loss.label_dropout}")
    _require(config.loss.nll_weight >= 0, f"config.loss.nll_weight must be >= 0, got {config.loss.nll_weight}")
    _require(config.train.num_steps >= 1, f"config.train.num_steps must be >= 1, got {config.train.num_steps}")
    for field in ("every_steps", "eval_every_steps", "sample_every_steps", "num_samples", "num_eval_examples"):
        _require(config.log[field] >= 1, f"config.log.{field} must be >= 1, got {config.log[field]}")
    _require(config.checkpoint.every_steps >= 1,
             f"config.checkpoint.every_steps must be >= 1, got {config.checkpoint.every_steps}")
    _require(config.checkpoint.keep >= 1, f"config.checkpoint.keep must be >= 1, got {config.checkpoint.keep}")
    from patch_forcing import data, evaluate  # heavy-ish imports, only when validating

    data.check_config(d)
    if "eval" in config:
        evaluate.check_eval_config(config.eval)
    sampler_config(config, mcfg)


def sampler_config(config, mcfg: dit.DiTConfig | None = None):
    """`config.sampler` completed from the model (patch size, null class), validated; the sampler
    must fit the model: `euler` for global-time models, a per-patch sampler otherwise."""
    from patch_forcing import samplers

    mcfg = mcfg or model_config(config)
    scfg = samplers.validate_sampler_config(samplers.as_sampler_config(
        config.sampler, null_class=mcfg.num_classes, patch_size=mcfg.patch_size))
    if (scfg.name == "euler") == mcfg.per_patch:
        fit = "a per-patch sampler (euler_pf, dual_loop, look_ahead, ...)" if mcfg.per_patch else "'euler'"
        kind = "per-patch" if mcfg.per_patch else "global-time"
        raise ValueError(f"config.sampler.name={scfg.name!r} does not fit a {kind} model: use {fit}")
    return scfg
