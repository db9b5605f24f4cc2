"""DiT / SiT backbone with per-patch time conditioning and a difficulty head (the paper's PF-DiT).

One implementation, two conditioning modes:
  per_patch=True  (Patch Forcing): t (B, N); every token gets its own time embedding plus the class
                  embedding, adaLN shift/scale/gate are per token (B, N, D); the final linear emits
                  p*p*(C+1) values per token -> velocity v (B, H, W, C) and log-variance s (B, H, W, 1).
  per_patch=False (DiT/SiT baseline): t (B,); adaLN per sample; the head emits p*p*C -> (v, None).

Parameter tree (nnx.state(model, nnx.Param).to_pure_dict()), kernels stored (in, out):
  x_embedder.{kernel (p,p,C,D), bias}        t_embedder.{fc1, fc2}.{kernel, bias}
  y_embedder.embedding (num_classes+1, D)    blocks[i].attn.{qkv, proj}, blocks[i].mlp.{fc1, fc2},
  blocks[i].adaLN_modulation                 final_layer.{adaLN_modulation, linear}
REPA option (repa_depth > 0): `projector.{fc1, fc2, fc3}` maps the hidden tokens after block
`repa_depth` (1-based) through Linear(D, P), SiLU, Linear(P, P), SiLU, Linear(P, z_dim) to `z`
(B, N, z_dim), returned only by `model(x, t, y, return_z=True)` -> (v, s, z); every other caller
gets (v, s) as before. The reference's `REPAPatchForcingDiT` projector.{0, 2, 4} converts to it.
The fixed 2-D sin-cos position embedding `pos_embed` (1, N, D) is a `FixedEmbedding` variable, not
an nnx.Param: select parameters with `nnx.Param` when differentiating / optimising / averaging.

Logical sharding names on every variable: 'embed' (model width D), 'mlp' (3D/4D/6D/2D fan-out),
'vocab' (class-table rows), None otherwise. `sharding.logical_axis_rules(fsdp)` maps them onto a
mesh; build the model inside `jax.set_mesh(mesh)` and `nnx.logical_axis_rules(rules)` to shard it
eagerly. `init` / `from_params` give the model as a pure `apply(params, x, t, y)` and its params.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from patch_forcing import presets
from patch_forcing.flow.interpolant import unpatchify
from patch_forcing.models import layers
from patch_forcing.models.layers import Attention, FixedEmbedding, PatchEmbed, layer_norm, use
from patch_forcing.sharding import explicit_mesh

FREQ_DIM = 256  # sinusoidal time-embedding size
MAX_PERIOD = 10000.0
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = (None, "xla", "cudnn")


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Architecture of a DiT; JSON-able via to_dict/from_dict (stored in inference checkpoints)."""

    image_size: Any  # (H, W) or int; normalised to a tuple (H, W)
    in_channels: int
    patch_size: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float = presets.DIT_DEFAULTS["mlp_ratio"]
    num_classes: int = presets.DIT_DEFAULTS["num_classes"]
    per_patch: bool = True
    dtype: str = presets.DIT_DEFAULTS["dtype"]  # compute dtype; params are always float32
    attention_impl: str | None = presets.DIT_DEFAULTS["attention_impl"]  # dot_product_attention(implementation=)
    repa_depth: int = 0  # REPA projector after this block (1-based); 0 = no projector
    repa_z_dim: int = presets.REPA["z_dim"]  # projector output = the target encoder's feature size
    repa_projector_dim: int = presets.REPA["projector_dim"]

    def __post_init__(self):
        size = self.image_size
        if isinstance(size, (int, np.integer)):
            size = (int(size), int(size))
        if not (isinstance(size, (tuple, list)) and len(size) == 2
                and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size)):
            raise ValueError(f"image_size must be an int or (H, W) of ints, got {self.image_size!r}")
        object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
        h, w = self.image_size
        fields = ("in_channels", "patch_size", "depth", "num_heads")
        checks = [(getattr(self, k) >= 1, f"{k} must be >= 1, got {getattr(self, k)}") for k in fields]
        checks += [
            (h >= 1 and w >= 1, f"image_size must be positive, got {self.image_size}"),
            (self.num_classes >= 0, f"num_classes must be >= 0, got {self.num_classes}"),
            (self.mlp_ratio > 0, f"mlp_ratio must be > 0, got {self.mlp_ratio}"),
            (self.dtype in DTYPES, f"dtype={self.dtype!r} is not one of {list(DTYPES)}"),
            (self.attention_impl in ATTENTION_IMPLS,
             f"attention_impl={self.attention_impl!r} is not one of {list(ATTENTION_IMPLS)}"),
            (self.attention_impl != "cudnn" or self.dtype != "float32",
             "attention_impl='cudnn' needs dtype 'bfloat16' or 'float16', got dtype='float32'"),
            (0 <= self.repa_depth <= self.depth,
             f"repa_depth={self.repa_depth} must be in [0, depth={self.depth}] (0 = no REPA projector)"),
            (self.repa_z_dim >= 1 and self.repa_projector_dim >= 1,
             f"repa_z_dim={self.repa_z_dim} and repa_projector_dim={self.repa_projector_dim} must be >= 1"),
            (self.hidden_size >= 4 and self.hidden_size % 4 == 0,
             f"hidden_size must be a positive multiple of 4 (2-D sin-cos position embedding), "
             f"got {self.hidden_size}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide image_size={self.image_size}")

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def out_channels(self) -> int:
        return self.in_channels + 1 if self.per_patch else self.in_channels

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown DiTConfig fields {unknown}; allowed: {names}")
        return cls(**d)


PRESETS = presets.DIT_PRESETS


def preset(name: str, **overrides) -> DiTConfig:
    """'PF-B/2' (per-patch) or 'DiT-B/2' (global); ImageNet-256 latent defaults (32x32x4, 1000
    classes); any DiTConfig field can be overridden, e.g. preset('PF-Tiny/2', image_size=8)."""
    return DiTConfig(**presets.dit_fields(name, **overrides))


# ----------------------------------------------------------------------------- pure helpers


def sincos_pos_embed(hidden_size: int, grid_h: int, grid_w: int) -> np.ndarray:
    """MAE's fixed 2-D sin-cos embedding, (grid_h * grid_w, D) in raster token order.

    As in the reference (meshgrid with w first): the first D/2 features encode the column index,
    the last D/2 the row index; each half is [sin(pos * omega), cos(pos * omega)],
    omega_k = 10000^(-k / (D/4)), computed in float64.
    """
    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / MAX_PERIOD ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.outer(pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))
    return np.concatenate([one_d(hidden_size // 2, cols), one_d(hidden_size // 2, rows)], axis=1)


def timestep_embedding(t: jnp.ndarray, dim: int = FREQ_DIM) -> jnp.ndarray:
    """t (...,) in [0, 1] as is -> (..., dim) [cos, sin], freqs exp(-ln(10000) k / (dim/2))."""
    half = dim // 2
    freqs = jnp.exp(-math.log(MAX_PERIOD) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


# ----------------------------------------------------------------------------- modules


class LabelEmbed(nnx.Module):
    """Class table with num_classes + 1 rows; the last row is the null class (CFG)."""

    def __init__(self, f: layers.Factory, rows: int, d: int):
        self.dtype = f.dtype
        self.embedding = f.param(nnx.initializers.normal(0.02), (rows, d), ("vocab", "embed"))

    def __call__(self, y):  # (B,) int -> (B, D)
        table = use(self.embedding[...], self.dtype)
        y = y.astype(jnp.int32)
        if explicit_mesh():
            return table.at[y].get(out_sharding=jax.P(*jax.typeof(y).sharding.spec, None))
        return table[y]


class TimestepEmbedder(nnx.Module):
    def __init__(self, f: layers.Factory, d: int):
        init = nnx.initializers.normal(0.02)
        self.fc1 = f.linear(FREQ_DIM, d, (None, "embed"), init)
        self.fc2 = f.linear(d, d, (None, "embed"), init)

    def __call__(self, t):  # (...,) -> (..., D)
        return self.fc2(nnx.silu(self.fc1(timestep_embedding(t))))


class Mlp(nnx.Module):
    def __init__(self, f: layers.Factory, d: int, hidden: int):
        self.fc1 = f.linear(d, hidden, ("embed", "mlp"))
        self.fc2 = f.linear(hidden, d, ("mlp", "embed"))

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class DiTBlock(nnx.Module):
    """adaLN-Zero block; c is (B, N, D) per token or (B, 1, D) per sample."""

    def __init__(self, f: layers.Factory, cfg: DiTConfig):
        d = cfg.hidden_size
        self.attn = Attention(f, d, cfg.num_heads, cfg.attention_impl)
        self.mlp = Mlp(f, d, int(d * cfg.mlp_ratio))
        self.adaLN_modulation = f.linear(d, 6 * d, ("embed", "mlp"), nnx.initializers.zeros_init())

    def __call__(self, x, c):
        mods = self.adaLN_modulation.chunks(nnx.silu(c), 6)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa * self.attn(modulate(layer_norm(x), shift_msa, scale_msa))
        x = x + gate_mlp * self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nnx.Module):
    def __init__(self, f: layers.Factory, cfg: DiTConfig):
        d, p = cfg.hidden_size, cfg.patch_size
        zeros = nnx.initializers.zeros_init()
        self.adaLN_modulation = f.linear(d, 2 * d, ("embed", "mlp"), zeros)
        self.linear = f.linear(d, p * p * cfg.out_channels, ("embed", None), zeros)

    def __call__(self, x, c):  # -> (B, N, p*p*out_channels), per token laid out (p, p, C_out)
        shift, scale = jnp.split(self.adaLN_modulation(nnx.silu(c)), 2, axis=-1)
        return self.linear(modulate(layer_norm(x), shift, scale))


class Projector(nnx.Module):
    """REPA's per-token MLP: Linear(D, P), SiLU, Linear(P, P), SiLU, Linear(P, z_dim)."""

    def __init__(self, f: layers.Factory, d: int, hidden: int, z_dim: int):
        self.fc1 = f.linear(d, hidden, ("embed", "mlp"))
        self.fc2 = f.linear(hidden, hidden, (None, "mlp"))
        self.fc3 = f.linear(hidden, z_dim, ("mlp", None))

    def __call__(self, x):  # (B, N, D) -> (B, N, z_dim) float32
        return self.fc3(nnx.silu(self.fc2(nnx.silu(self.fc1(x))))).astype(jnp.float32)


class DiT(nnx.Module):
    """DiT(cfg, rngs=nnx.Rngs(0)) or DiT(**DiTConfig fields, rngs=...); see the module docstring."""

    def __init__(self, config: DiTConfig | None = None, *, rngs: nnx.Rngs | None = None, **kwargs):
        if config is None:
            config = DiTConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        cfg = self.config = config
        f = layers.Factory(cfg.dtype, rngs if rngs is not None else nnx.Rngs(0), "DiT")
        d, p, c = cfg.hidden_size, cfg.patch_size, cfg.in_channels
        self.x_embedder = PatchEmbed(f, p, c, d)
        self.t_embedder = TimestepEmbedder(f, d)
        self.y_embedder = LabelEmbed(f, cfg.num_classes + 1, d)
        pos = jnp.asarray(sincos_pos_embed(d, *cfg.grid), jnp.float32)[None]  # (1, N, D)
        self.pos_embed = FixedEmbedding(
            pos, out_sharding=(None, None, "embed"), eager_sharding=f.eager
        )
        self.blocks = nnx.List([DiTBlock(f, cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(f, cfg)
        if cfg.repa_depth:  # created last: the other parameters draw the same numbers as without it
            self.projector = Projector(f, d, cfg.repa_projector_dim, cfg.repa_z_dim)

    def _check_inputs(self, x, t, y):
        cfg = self.config
        h, w = cfg.image_size
        if x.ndim != 4 or x.shape[1:] != (h, w, cfg.in_channels):
            raise ValueError(
                f"x must have shape (B, H, W, C)=(B, {h}, {w}, {cfg.in_channels}) for this config, "
                f"got {tuple(x.shape)}"
            )
        b, n = x.shape[0], cfg.num_patches
        want = (b, n) if cfg.per_patch else (b,)
        if tuple(t.shape) != want:
            kind, dims = ("per-patch", "(B, N)") if cfg.per_patch else ("global", "(B,)")
            raise ValueError(f"t must have shape {dims}={want} for a {kind} model, got {tuple(t.shape)}")
        if tuple(y.shape) != (b,):
            raise ValueError(f"y must have shape (B,)=({b},), got {tuple(y.shape)}")

    def __call__(self, x, t, y, *, return_z: bool = False):
        """x (B, H, W, C), t (B, N) per-patch or (B,) global, y (B,) int in [0, num_classes]
        (num_classes = the null class) -> v (B, H, W, C) float32, s (B, H, W, 1) float32 or None;
        with return_z also z (B, N, repa_z_dim) float32, the REPA projection."""
        self._check_inputs(x, t, y)
        cfg = self.config
        if return_z and not cfg.repa_depth:
            raise ValueError("return_z=True needs a REPA projector (DiTConfig.repa_depth >= 1)")
        (h, w), p, c_in = cfg.image_size, cfg.patch_size, cfg.in_channels
        tok = self.x_embedder(x)  # (B, N, D) in the compute dtype
        tok = tok + use(self.pos_embed[...], jnp.float32)  # the residual stream stays float32
        temb = self.t_embedder(t if cfg.per_patch else t[:, None])  # (B, N or 1, D)
        cond = temb + self.y_embedder(y)[:, None, :]  # (B, N or 1, D)
        z = None
        for i, block in enumerate(self.blocks):
            tok = block(tok, cond)
            if return_z and i + 1 == cfg.repa_depth:
                z = self.projector(tok)  # (B, N, z_dim)
        out = self.final_layer(tok, cond).astype(jnp.float32)  # (B, N, p*p*C_out)
        img = unpatchify(out, p, h, w)  # (B, H, W, C_out)
        v, s = (img[..., :c_in], img[..., c_in:]) if cfg.per_patch else (img, None)
        return (v, s, z) if return_z else (v, s)


def load_params(model: DiT, params: dict) -> DiT:
    """Write a pure nested dict of parameters into the model in place (see layers.load_params)."""
    return layers.load_params(model, params)


def param_count(cfg: DiTConfig) -> int:
    """Trainable (nnx.Param) parameters, counted on an abstract model (nothing materialised)."""
    abstract = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    return int(sum(math.prod(leaf.shape) for leaf in leaves))


# ----------------------------------------------------------------------------- pure apply
def make_apply(graphdef, rest, return_z: bool = False):
    """apply(params, x, t, y) -> (v, s): the model as a pure function of its nnx.Param state;
    with return_z -> (v, s, z), z the REPA projection (B, N, repa_z_dim)."""

    def apply(params, x, t, y):
        return nnx.merge(graphdef, params, rest)(x, t, y, return_z=return_z)

    return apply


def init(cfg: DiTConfig, key):
    """A fresh model split as (graphdef, params, rest); rest holds the fixed position embedding."""
    return nnx.split(DiT(cfg, rngs=nnx.Rngs(key)), nnx.Param, ...)


def from_params(cfg: DiTConfig, params: dict):
    """(apply, params as nnx.State) for a pure nested dict of parameters (inference checkpoints)."""
    graphdef, state, rest = nnx.split(load_params(DiT(cfg, rngs=nnx.Rngs(0)), params), nnx.Param, ...)
    return make_apply(graphdef, rest), state
