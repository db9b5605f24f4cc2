"""A config read into the objects it describes (model config of its family, timestep sampler,
SamplerConfig, Conditioning) and checked: `validate(config, mode)` runs before anything is
compiled or read, and a bad field fails with one line naming the field and the allowed values. Config files themselves import only
`patch_forcing.presets`.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from etils import epath

from patch_forcing import conditioning as cond_lib
from patch_forcing.data import captioned, pipeline, text_embeddings
from patch_forcing.flow import samplers, timesteps
from patch_forcing.models import dinov2, dit, families, text_encoder

MODES = ("train", "sample", "evaluate")
GLOBAL_TIMESTEPS = ("uniform", "logit_normal")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def model_family(config) -> families.Family:
    """`config.model.family`: 'dit' (class labels; the default) or 't2i' (text)."""
    name = config.model.get("family", families.DEFAULT)
    _require(name in families.FAMILIES, f"config.model.family={name!r} is not one of {list(families.FAMILIES)}")
    return families.get(name)


def model_config(config) -> dit.DiTConfig:
    """The DiTConfig (or T2IConfig) spelled out in `config.model` (`preset` is informational,
    `family` picks the class)."""
    cls = model_family(config).config
    fields = {f.name for f in dataclasses.fields(cls)}
    block = {k: v for k, v in config.model.items() if k not in ("preset", "family")}
    block["attention_impl"] = block.get("attention_impl") or None  # "" in configs = JAX's choice
    fields -= {"repa_depth", "repa_z_dim", "repa_projector_dim"}  # set from config.repa
    unknown = sorted(set(block) - fields)
    _require(not unknown, f"config.model has unknown fields {unknown}; allowed: {sorted(fields)} "
                          "(REPA's projector: config.repa)")
    if repa_enabled(config):
        _require(cls is dit.DiTConfig, f"config.repa.encoder_depth={config.repa.encoder_depth}: REPA's projector "
                 f"exists on the class-conditional DiT only, not config.model.family={config.model.get('family')!r}; "
                 "set config.repa.encoder_depth=0")
    block.update(_repa_model_fields(config, block.get("depth")))
    try:
        return cls(**block)
    except ValueError as e:
        raise ValueError(f"config.model.{e}") from None


# ----------------------------------------------------------------------------- REPA
def repa_enabled(config) -> bool:
    """Whether the DiT has a REPA projector (config.repa.encoder_depth > 0; configs without a
    `repa` block have none)."""
    r = config.get("repa")
    return r is not None and int(r.get("encoder_depth", 0)) != 0


def repa_aligns(config) -> bool:
    """Whether the train step adds the alignment term (a projector and repa.coeff > 0)."""
    return repa_enabled(config) and float(config.repa.coeff) > 0


def _repa_model_fields(config, depth) -> dict:
    """The DiTConfig fields config.repa sets: projector depth and sizes (none when REPA is off)."""
    if not repa_enabled(config):
        return {}
    r = config.repa
    k = r.encoder_depth
    _require(isinstance(k, int) and isinstance(depth, int) and 1 <= k <= depth,
             f"config.repa.encoder_depth={k!r} must be an int in [0, config.model.depth={depth}] (0 = REPA off)")
    for field in ("z_dim", "projector_dim"):
        _require(isinstance(r[field], int) and r[field] >= 1, f"config.repa.{field}={r[field]!r} must be an int >= 1")
    return dict(repa_depth=k, repa_z_dim=r.z_dim, repa_projector_dim=r.projector_dim)


def check_repa(config, mode: str = "train") -> None:
    """The `repa` block (configs/common.py repa_block): one-line ValueError naming the field.
    The target encoder and its images are checked only for training with coeff > 0; nothing is read."""
    if not repa_enabled(config):
        return
    r = config.repa
    _require(isinstance(r.coeff, (int, float)) and r.coeff >= 0, f"config.repa.coeff={r.coeff!r} must be >= 0")
    if mode != "train" or not repa_aligns(config):
        return
    encoders = [*dinov2.PRESETS, "classifier"]
    _require(r.encoder in encoders, f"config.repa.encoder={r.encoder!r} is not one of {encoders}")
    latents = config.data.name == "latents"
    if r.encoder == "classifier":
        _require(not latents, "config.repa.encoder='classifier' reads pixel data, not data.name='latents': "
                              "use a DINOv2 encoder (e.g. 'dinov2_vitb14_reg')")
    else:
        enc = dinov2.preset(r.encoder)
        _require(r.z_dim == enc.hidden_size,
                 f"config.repa.z_dim={r.z_dim} must equal {r.encoder}'s feature size {enc.hidden_size}")
        res, patch = r.resolution, enc.patch_size
        _require(isinstance(res, int) and res >= patch and res % patch == 0,
                 f"config.repa.resolution={r.resolution!r} must be a positive multiple of the patch size "
                 f"{enc.patch_size}")
        where = dinov2.where_to_get(r.encoder) if r.encoder != "dinov2_tiny" else "a local file"
        _require(bool(r.encoder_path), f"config.repa.encoder_path is empty: REPA's target {r.encoder} needs local "
                                       f"weights; {where}")
    if latents:
        _require(bool(config.data.get("with_pixels", False)),
                 "config.data.with_pixels=False: REPA's encoder reads the images, but data.name='latents' holds "
                 "latents only; extract them with `extract_latents --pixels` and set data.with_pixels=True")


def timestep_sampler(config):
    """fn(key, batch, num_patches) -> (B, N) for config.flow.timesteps and its parameter block."""
    name = config.flow.timesteps
    _require(name in timesteps.SAMPLERS,
             f"config.flow.timesteps={name!r} is not one of {sorted(timesteps.SAMPLERS)}")
    params = dict(config.flow.get(name, {}))
    return timesteps.make_timestep_sampler(name, **params)


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
    if model_family(config).conditioning == "label":
        _require(d.num_classes == mcfg.num_classes,
                 f"config.data.num_classes={d.num_classes} must equal config.model.num_classes={mcfg.num_classes}")
    else:
        check_text(config, mcfg, mode)
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
    pipeline.check_config(d)
    check_repa(config, mode)
    if "eval" in config and model_family(config).name == "dit":  # FID; text models: prompt accuracy
        check_eval(config.eval)
        _require(not (d.name == "latents" and config.eval.reference == "data"),
                 "config.eval.reference='data' needs pixel data, not config.data.name='latents': give a reference "
                 ".npz of real images (for ImageNet 256 ADM's VIRTUAL_imagenet256_labeled.npz)")
    sampler_config(config, mcfg)


def check_eval(e) -> None:
    """The `eval` block (configs/common.py eval_block): one-line ValueError naming the field."""
    for field, low in (("num_samples", 2), ("batch_size", 1), ("fid_every_steps", 0), ("fid_num_samples", 2)):
        v = e[field]
        _require(isinstance(v, (int, np.integer)) and v >= low, f"config.eval.{field}={v!r} must be an int >= {low}")
    for field in ("reference", "feature_network"):
        _require(isinstance(e[field], str) and bool(e[field]),
                 f"config.eval.{field}={e[field]!r} must be a non-empty string")


def sampler_config(config, mcfg: dit.DiTConfig | None = None, cond: cond_lib.Conditioning | None = None):
    """`config.sampler` completed from the model (patch size; null class, or `cond.null` for text
    models), validated; the sampler must fit the model: `euler` for global-time models, a per-patch
    sampler otherwise. Without `cond` a text model's sampler is checked but cannot guide yet."""
    mcfg = mcfg or model_config(config)
    if model_family(config).conditioning == "label":
        null = dict(null_class=mcfg.num_classes)
    else:
        null = dict(null_class=None, null=None if cond is None else cond.null)
    scfg = samplers.validate_sampler_config(samplers.as_sampler_config(
        config.sampler, patch_size=mcfg.patch_size, **null), null_later=cond is None)
    if (scfg.name == "euler") == mcfg.per_patch:
        fit = "a per-patch sampler (euler_pf, dual_loop, look_ahead, ...)" if mcfg.per_patch else "'euler'"
        kind = "per-patch" if mcfg.per_patch else "global-time"
        raise ValueError(f"config.sampler.name={scfg.name!r} does not fit a {kind} model: use {fit}")
    return scfg


def inference_dir(config, workdir) -> epath.Path:
    """The inference checkpoint that sampling and evaluation read: config.sample.checkpoint, else
    <workdir>/inference (where training leaves its EMA weights)."""
    ckpt = str(config.sample.get("checkpoint", "") or "")
    return epath.Path(ckpt) if ckpt else epath.Path(workdir) / "inference"


# ----------------------------------------------------------------------------- conditioning
TEXT_SPECS = "'random' (a frozen random Qwen3) or a local Qwen3(-VL) folder"


def check_text(config, mcfg, mode: str) -> None:
    """The `text` block of a text-to-image config (configs/t2i.py); nothing is read here."""
    _require("text" in config, "a config with config.model.family='t2i' needs a config.text block (configs/t2i.py)")
    t = config.text
    _require(isinstance(t.encoder, str) and bool(t.encoder),
             f"config.text.encoder={t.encoder!r} must be {TEXT_SPECS}")
    _require(isinstance(t.tokenizer, str) and bool(t.tokenizer), f"config.text.tokenizer={t.tokenizer!r} must be "
             "'words' (captioned digits) or a folder with tokenizer.json")
    _require(t.max_length >= 1, f"config.text.max_length must be >= 1, got {t.max_length}")
    _require(0 <= t.dropout < 1, f"config.text.dropout must be in [0, 1), got {t.dropout}")
    _require(t.dtype in text_encoder.DTYPES,
             f"config.text.dtype={t.dtype!r} is not one of {list(text_encoder.DTYPES)}")
    if t.encoder == "random":
        _require(t.width == mcfg.txt_in_dim,
                 f"config.text.width={t.width} must equal config.model.txt_in_dim={mcfg.txt_in_dim}")
    if config.data.name == "captioned_digits":
        _require(t.max_length >= captioned.MAX_TOKENS, f"config.text.max_length={t.max_length} must be >= "
                 f"{captioned.MAX_TOKENS} (captioned digits' tokens)")
    _require(not (mode == "train" and "eval" in config and config.eval.fid_every_steps > 0),
             "config.eval.fid_every_steps must be 0 for text models (score them with "
             "patch_forcing.evaluation.prompt_accuracy)")
    _require(mode != "evaluate", "--mode=evaluate is for class-conditional models; text models are scored with "
             "patch_forcing.evaluation.prompt_accuracy")


def conditioning(config) -> cond_lib.Conditioning:
    """The model's conditioning: class labels with config.loss.label_dropout, or text through the
    frozen encoder of config.text (loaded here) with config.text.dropout (caption dropout)."""
    if model_family(config).conditioning == "label":
        return cond_lib.labels(model_config(config).num_classes, config.loss.label_dropout)
    t = config.text
    enc, tok = _text_encoder(t.encoder, t.tokenizer, t.dtype, t.width, t.layers, t.seed)
    text_dir = str(config.data.get("text_dir", "") or "")
    null = text_embeddings.read_null(text_dir) if text_dir else None
    return cond_lib.text(enc, tok, t.max_length, t.use_mask, t.dropout, null=null, meta=t.to_dict())


@functools.lru_cache(maxsize=2)
def _text_encoder(encoder: str, tokenizer: str, dtype: str, width: int, layers: int, seed: int):
    """(TextEncoder, tokenizer), loaded once per process (the train step and the evaluator share it)."""
    tok = captioned.WordTokenizer() if tokenizer == "words" else text_encoder.load_tokenizer(tokenizer)
    if encoder != "random":
        return text_encoder.load_text_encoder(encoder, dtype=dtype), tok
    vocab = len(tok.vocab) if tokenizer == "words" else tok.get_vocab_size()
    cfg = text_encoder.tiny_config(vocab_size=vocab, hidden_size=width, num_layers=layers, dtype=dtype)
    return text_encoder.random_text_encoder(cfg, seed=seed), tok
