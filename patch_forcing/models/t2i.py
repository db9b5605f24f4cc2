"""The paper's text-to-image Patch Forcing transformer (PFT T2I, SPEC §10) in Flax NNX.

An HDiT-style stack (layers in `hdit_layers`): the text (B, L, txt_in_dim) is projected and refined
by a few self-attention layers with 1-D RoPE; the latent is merged into p x p tokens; every block
is AdaRMSNorm(per-token time embedding) -> cosine self-attention with 2-D RoPE -> cross-attention
to the refined text -> SwiGLU; an RMSNorm + linear head (not time-conditioned) splits the tokens
back into p x p x (C + 1) values: velocity v and log-variance s.

Positions are per latent pixel (B, H, W, 2) as (row, col) in a canvas whose longer side spans
[-1, 1] and are averaged per patch; `canvas_positions` gives the full canvas (the default),
`crop_positions` a random crop's (its offsets then feed RoPE, as in the reference's training).
`txt_mask` (B, L) bool (True = real token) masks padded text keys in the refiner and in every
cross-attention; with None every token is attended, as in the reference.

State: nnx.Param (trainable) plus `FixedEmbedding` variables (the 2-D/1-D RoPE frequencies and the
Fourier features of the time embedding, drawn from a fixed seed). Variable paths follow the
reference's module names, with `kernel` (in, out) for its `weight` (out, in), so the converter is
a renaming plus transposes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from patch_forcing import presets
from patch_forcing.flow.interpolant import patchify, unpatchify
from patch_forcing.models import hdit_layers as L
from patch_forcing.models import layers
from patch_forcing.models.layers import FixedEmbedding

DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = (None, "xla", "cudnn")


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class T2IConfig:
    """Architecture of the T2I transformer; JSON-able via to_dict/from_dict. `latent_size` is the
    training latent grid (H, W); the model accepts any H, W divisible by patch_size."""

    in_dim: int
    depth: int
    hidden_dim: int
    head_dim: int
    mapping_dim: int
    mapping_depth: int
    patch_size: int
    txt_in_dim: int
    txt_refiner_dim: int
    txt_refiner_head_dim: int
    txt_refiner_depth: int
    latent_size: Any = (32, 32)  # (H, W) or int
    dtype: str = "float32"  # compute dtype; params are always float32
    attention_impl: str | None = None  # jax.nn.dot_product_attention(implementation=...)

    def __post_init__(self):
        size = self.latent_size
        if isinstance(size, (int, np.integer)):
            size = (int(size), int(size))
        if not (isinstance(size, (tuple, list)) and len(size) == 2):
            raise ValueError(f"latent_size must be an int or (H, W), got {self.latent_size!r}")
        object.__setattr__(self, "latent_size", (int(size[0]), int(size[1])))
        positive = ("in_dim", "depth", "hidden_dim", "head_dim", "mapping_dim", "mapping_depth",
                    "patch_size", "txt_in_dim", "txt_refiner_dim", "txt_refiner_head_dim")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        checks = [
            (self.txt_refiner_depth >= 0, f"txt_refiner_depth must be >= 0, got {self.txt_refiner_depth}"),
            (self.hidden_dim % self.head_dim == 0,
             f"hidden_dim={self.hidden_dim} must be divisible by head_dim={self.head_dim}"),
            (self.head_dim % 8 == 0, f"head_dim must be a multiple of 8 (2-D RoPE), got {self.head_dim}"),
            (self.txt_refiner_dim % self.txt_refiner_head_dim == 0,
             f"txt_refiner_dim={self.txt_refiner_dim} must be divisible by "
             f"txt_refiner_head_dim={self.txt_refiner_head_dim}"),
            (self.txt_refiner_head_dim % 4 == 0,
             f"txt_refiner_head_dim must be a multiple of 4 (1-D RoPE), got {self.txt_refiner_head_dim}"),
            (self.mapping_dim % 2 == 0, f"mapping_dim must be even (Fourier features), got {self.mapping_dim}"),
            (all(s >= 1 and s % self.patch_size == 0 for s in self.latent_size),
             f"patch_size={self.patch_size} must divide latent_size={self.latent_size}"),
            (self.dtype in DTYPES, f"dtype={self.dtype!r} is not one of {list(DTYPES)}"),
            (self.attention_impl in ATTENTION_IMPLS,
             f"attention_impl={self.attention_impl!r} is not one of {list(ATTENTION_IMPLS)}"),
            (self.attention_impl != "cudnn" or self.dtype != "float32",
             "attention_impl='cudnn' needs dtype 'bfloat16', got dtype='float32'"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def num_patches(self) -> int:
        h, w = self.latent_size
        return (h // self.patch_size) * (w // self.patch_size)

    # The names the train loop and samplers read from any model config (as DiTConfig's).
    image_size = property(lambda self: self.latent_size)
    in_channels = property(lambda self: self.in_dim)
    per_patch = property(lambda self: True)  # one time per patch, always

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["latent_size"] = list(self.latent_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "T2IConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown T2IConfig fields {unknown}; allowed: {names}")
        return cls(**d)


_PRESETS = presets.T2I_PRESETS
PRESETS = tuple(_PRESETS)


def preset(name: str, **overrides) -> T2IConfig:
    """'pft_1p2b' (the paper's 1.2B model), 'tiny' or 'digits' (presets.T2I_PRESETS); any
    T2IConfig field can be overridden."""
    if name not in _PRESETS:
        raise ValueError(f"T2I preset={name!r} is not one of {list(PRESETS)}")
    allowed = [f.name for f in dataclasses.fields(T2IConfig)]
    for key in overrides:
        if key not in allowed:
            raise ValueError(f"preset override {key!r} is not a T2IConfig field; allowed: {allowed}")
    return T2IConfig(**{**_PRESETS[name], **overrides})


# ----------------------------------------------------------------------------- positions


def canvas_positions(h: int, w: int) -> np.ndarray:
    """(h, w, 2) float32 (row, col) cell centres of an h x w grid; the longer side spans [-1, 1],
    the shorter one [-s/l, s/l] (square pixels)."""
    y_max, x_max = min(1.0, h / w), min(1.0, w / h)
    edges_y, edges_x = np.linspace(-y_max, y_max, h + 1), np.linspace(-x_max, x_max, w + 1)
    rows, cols = (edges_y[:-1] + edges_y[1:]) / 2, (edges_x[:-1] + edges_x[1:]) / 2
    return np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1).astype(np.float32)


def crop_positions(top: int, left: int, orig_h: int, orig_w: int, size, downsample: int = 8) -> np.ndarray:
    """Positions (h, w, 2) of a latent crop: `top`, `left` are the crop's pixel offsets in the resized
    image of `orig_h` x `orig_w` pixels, `size` the latent crop (int or (h, w)); all pixel values are
    floored to latent units (// downsample). The canvas is the whole resized image's latent grid."""
    h, w = (size, size) if isinstance(size, (int, np.integer)) else size
    top, left, gh, gw = (int(v) // downsample for v in (top, left, orig_h, orig_w))
    if top < 0 or left < 0 or top + h > gh or left + w > gw:
        raise ValueError(
            f"crop (top={top}, left={left}, size={(h, w)}) in latent units does not fit the "
            f"{gh}x{gw} latent grid of a {orig_h}x{orig_w} image (downsample={downsample})"
        )
    return canvas_positions(gh, gw)[top : top + h, left : left + w]


def patch_positions(pos: jnp.ndarray, p: int) -> jnp.ndarray:
    """(B, H, W, 2) per latent pixel -> (B, N, 2) per p x p token (the mean of its pixels)."""
    b, h, w, _ = pos.shape
    return patchify(pos.astype(jnp.float32), p).reshape(b, (h // p) * (w // p), p * p, 2).mean(axis=2)


# ----------------------------------------------------------------------------- model


class TokenSplit(nnx.Module):
    """RMSNorm + linear (zero-init) to p*p*(C+1) values per token, laid out (p, p, C+1)."""

    def __init__(self, f: L.Factory, d: int, out: int):
        self.norm = L.RMSNorm(f, d)
        self.proj = L.Linear(f, d, out, ("embed", None), zero=True)

    def __call__(self, x):
        return self.proj(self.norm(x))


class TokenMerge(nnx.Module):
    def __init__(self, f: L.Factory, d_in: int, d: int):
        self.proj = L.Linear(f, d_in, d, (None, "embed"))

    def __call__(self, tokens):
        return self.proj(tokens).astype(jnp.float32)  # the residual stream stays float32


class T2ITransformer(nnx.Module):
    """T2ITransformer(cfg, rngs=nnx.Rngs(0)); see the module docstring."""

    def __init__(self, config: T2IConfig, *, rngs: nnx.Rngs | None = None):
        cfg = self.config = config
        f = L.Factory(cfg.dtype, rngs if rngs is not None else nnx.Rngs(0), cfg.attention_impl)
        d, p, c = cfg.hidden_dim, cfg.patch_size, cfg.in_dim
        self.t_embedder = L.TimestepEmbedder(f, cfg.mapping_dim, cfg.mapping_depth)
        self.merge = TokenMerge(f, p * p * c, d)
        self.blocks = nnx.List([
            L.TransformerLayer(f, d, cfg.head_dim, rope="image", d_cond=cfg.mapping_dim,
                               d_ctx=cfg.txt_refiner_dim)
            for _ in range(cfg.depth)
        ])
        self.split = TokenSplit(f, d, p * p * (c + 1))
        self.txt_proj = L.Linear(f, cfg.txt_in_dim, cfg.txt_refiner_dim, (None, "embed"), bias=True)
        self.txt_refiner = nnx.List([
            L.TransformerLayer(f, cfg.txt_refiner_dim, cfg.txt_refiner_head_dim, rope="text")
            for _ in range(cfg.txt_refiner_depth)
        ])

    def _check_inputs(self, x, t, txt, txt_mask, pos):
        cfg, p = self.config, self.config.patch_size
        if x.ndim != 4 or x.shape[-1] != cfg.in_dim or x.shape[1] % p or x.shape[2] % p:
            raise ValueError(f"x must have shape (B, H, W, {cfg.in_dim}) with H, W divisible by "
                             f"patch_size={p}, got {tuple(x.shape)}")
        b, h, w, _ = x.shape
        want = (b, (h // p) * (w // p))
        if tuple(t.shape) != want:
            raise ValueError(f"t must have shape (B, N)={want} (one time per patch), got {tuple(t.shape)}")
        if txt.ndim != 3 or txt.shape[0] != b or txt.shape[2] != cfg.txt_in_dim:
            raise ValueError(f"txt must have shape (B, L, txt_in_dim)=({b}, L, {cfg.txt_in_dim}), "
                             f"got {tuple(txt.shape)}")
        if txt_mask is not None and tuple(txt_mask.shape) != txt.shape[:2]:
            raise ValueError(f"txt_mask must have shape (B, L)={txt.shape[:2]}, got {tuple(txt_mask.shape)}")
        if pos is not None and (pos.ndim != 4 or pos.shape[0] not in (1, b) or pos.shape[1:] != (h, w, 2)):
            raise ValueError(f"pos must have shape (B, H, W, 2)=({b}, {h}, {w}, 2), got {tuple(pos.shape)}")

    def __call__(self, x, t, txt, txt_mask=None, pos=None):
        """x (B, H, W, C), t (B, N) per-patch times, txt (B, L, txt_in_dim), txt_mask (B, L) bool or
        None, pos (B, H, W, 2) or None (full canvas) -> v (B, H, W, C), s (B, H, W, 1), float32."""
        self._check_inputs(x, t, txt, txt_mask, pos)
        p = self.config.patch_size
        _, h, w, c = x.shape
        mask = None if txt_mask is None else txt_mask.astype(bool)
        ctx = self.txt_proj(txt).astype(jnp.float32)  # (B, L, D_txt)
        txt_pos = jnp.arange(txt.shape[1], dtype=jnp.float32)[None]  # (1, L)
        for layer in self.txt_refiner:
            ctx = layer(ctx, txt_pos, self_mask=mask)
        cond = self.t_embedder(t)  # (B, N, mapping_dim)
        if pos is None:
            pos = jnp.asarray(canvas_positions(h, w))[None]  # (1, H, W, 2)
        pos_tok = patch_positions(pos, p)  # (B or 1, N, 2)
        tok = self.merge(patchify(x.astype(jnp.float32), p))  # (B, N, D)
        for block in self.blocks:
            tok = block(tok, pos_tok, cond, ctx, ctx_mask=mask)
        img = unpatchify(self.split(tok).astype(jnp.float32), p, h, w)  # (B, H, W, C + 1)
        return img[..., :c], img[..., c:]


def param_count(cfg: T2IConfig, variables=nnx.Param) -> int:
    """Elements of the model's `variables` (default: trainable nnx.Param; FixedEmbedding for the
    frozen ones), counted on an abstract model (nothing materialised)."""
    abstract = nnx.eval_shape(lambda: T2ITransformer(cfg, rngs=nnx.Rngs(0)))
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(abstract, variables))))


def load_state(model: T2ITransformer, state: dict) -> T2ITransformer:
    """Write a pure nested dict of every variable (nnx.to_pure_dict(nnx.state(model)), e.g. the
    converter's output) into the (possibly abstract) model in place; see layers.load_params."""
    return layers.load_params(model, state, what=...)


# ----------------------------------------------------------------------------- pure apply
# The conditioning is one pytree, as class labels are for the DiT: {'text': (B, L, txt_in_dim),
# 'text_mask': (B, L) bool} ('text_mask' may be absent: every text row is attended).


def make_apply(graphdef, rest):
    """apply(params, x, t, cond) -> (v, s): the model as a pure function of its nnx.Param state."""

    def apply(params, x, t, cond):
        return nnx.merge(graphdef, params, rest)(x, t, cond["text"], cond.get("text_mask"))

    return apply


def init(cfg: T2IConfig, key):
    """A fresh model split as (graphdef, params, rest); rest holds the fixed RoPE/Fourier tables."""
    return nnx.split(T2ITransformer(cfg, rngs=nnx.Rngs(key)), nnx.Param, ...)


def from_params(cfg: T2IConfig, params: dict):
    """(apply, params as nnx.State) for a pure nested dict of nnx.Param values (inference checkpoints)."""
    model = layers.load_params(T2ITransformer(cfg, rngs=nnx.Rngs(0)), params)
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    return make_apply(graphdef, rest), state


# ----------------------------------------------------------------------------- torch converter


def _torch_layout(cfg: T2IConfig) -> dict[str, tuple[tuple, tuple, bool]]:
    """reference key -> (our path, reference shape, transposed) for every variable of the model."""
    abstract = nnx.eval_shape(lambda: T2ITransformer(cfg, rngs=nnx.Rngs(0)))
    table = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract)):
        kernel = path[-1] == "kernel"
        key = ".".join(str(k) for k in path[:-1] + (("weight",) if kernel else path[-1:]))
        table[key] = (tuple(path), tuple(reversed(var.shape)) if kernel else tuple(var.shape), kernel)
    return table


def convert_torch_state_dict(state_dict: Mapping[str, np.ndarray], cfg: T2IConfig) -> dict:
    """The reference's PatchForcingTransformerT2I state_dict (numpy arrays) -> our nested dict of
    every variable (float32; load with `load_state`). Linear weights (out, in) become kernels
    (in, out); the RoPE frequencies must equal ours (rtol 1e-5). One-line ValueError naming the
    first missing or unexpected key or the first shape that does not fit `cfg`."""
    table = _torch_layout(cfg)
    missing = [k for k in table if k not in state_dict]
    if missing:
        raise ValueError(f"state_dict is missing key {missing[0]!r} ({len(missing)} missing keys) "
                         f"for a {cfg.depth}-block T2I model")
    unexpected = [k for k in state_dict if k not in table]
    if unexpected:
        raise ValueError(f"state_dict has unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected) "
                         f"for a {cfg.depth}-block T2I model")
    out: dict = {}
    for key, (path, shape, transposed) in table.items():
        value = np.asarray(state_dict[key], np.float32)
        if value.shape != shape:
            raise ValueError(f"state_dict[{key!r}] has shape {value.shape}, expected {shape} for this config")
        if key.endswith("pos_emb.freqs"):
            ours = L.rope_freqs_2d(cfg.head_dim, shape[1]) if len(shape) == 3 else \
                L.rope_freqs_1d(cfg.txt_refiner_head_dim, shape[0])
            if not np.allclose(value, ours, rtol=1e-5, atol=0):
                raise ValueError(f"state_dict[{key!r}] differs from the fixed RoPE frequencies we use")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value.T if transposed else value
    return out


__all__ = [
    "T2IConfig", "T2ITransformer", "PRESETS", "preset", "canvas_positions", "crop_positions",
    "patch_positions", "param_count", "load_state", "convert_torch_state_dict", "FixedEmbedding",
    "make_apply", "init", "from_params",
]
