"""DINOv2 ViT (Oquab et al. 2023) as a frozen Flax NNX encoder: the target network of REPA.

`load_dinov2(path)` reads local torch.hub (.pth) or transformers (folder / .safetensors) weights;
`make_encoder(cfg, params)` gives a pure, jit-able `features(params, images)`: images in [-1, 1]
(B, H, W, 3) -> bicubic 224x224 -> ImageNet mean/std -> patch tokens (B, 256, D) after the final
norm. The one thing to know: the pretrained 37x37 position grid is resized to the input grid with
torch's exact bicubic (`resize_matrix`), and torch.hub models without registers do it with a +0.1
scale offset that transformers' `Dinov2Model` omits (`DinoV2Config.interpolate_offset`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from patch_forcing.models import dit, layers

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_ARCHS = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "g": (1536, 40, 24)}  # D, depth, heads
_HF_NAMES = {"s": "small", "b": "base", "l": "large", "g": "giant"}
PRESETS = tuple(f"dinov2_vit{a}14{r}" for a in _ARCHS for r in ("", "_reg")) + ("dinov2_tiny",)


@dataclasses.dataclass(frozen=True)
class DinoV2Config:
    """Architecture and position-embedding resampling of a DINOv2 ViT (defaults: ViT-B/14)."""

    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    patch_size: int = 14
    mlp_ratio: float = 4.0
    swiglu: bool = False  # SwiGLU MLP with hidden round8(2/3 * mlp_ratio * D): ViT-g/14 only
    num_register_tokens: int = 0
    layer_scale: bool = True
    image_size: int = 518  # pretraining size: position grid (518 / 14)^2 = 37x37
    interpolate_offset: float = 0.0  # 0.1 for torch.hub models without registers
    interpolate_antialias: bool = False  # True for all register models
    layer_norm_eps: float = 1e-6
    dtype: str = "float32"  # compute dtype; params are always float32
    attention_impl: str | None = None

    def __post_init__(self):
        checks = [(getattr(self, k) >= 1, f"{k} must be >= 1, got {getattr(self, k)}")
                  for k in ("hidden_size", "depth", "num_heads", "patch_size", "image_size")] + [
            (self.hidden_size % self.num_heads == 0, f"num_heads={self.num_heads} must divide hidden_size"),
            (self.num_register_tokens >= 0, f"num_register_tokens={self.num_register_tokens} must be >= 0"),
            (self.image_size % self.patch_size == 0, f"patch_size={self.patch_size} must divide image_size"),
            (self.dtype in dit.DTYPES, f"dtype={self.dtype!r} is not one of {list(dit.DTYPES)}"),
            (self.attention_impl in dit.ATTENTION_IMPLS,
             f"attention_impl={self.attention_impl!r} is not one of {list(dit.ATTENTION_IMPLS)}")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def pos_grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        hidden = int(self.hidden_size * self.mlp_ratio)
        return (int(hidden * 2 / 3) + 7) // 8 * 8 if self.swiglu else hidden

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DinoV2Config":
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown DinoV2Config fields {unknown}; allowed: {names}")
        return cls(**d)


def preset(name: str, **overrides) -> DinoV2Config:
    """torch.hub names ('dinov2_vitb14', 'dinov2_vitb14_reg', ...) with torch.hub's position
    resampling, or 'dinov2_tiny' (D=32, 2 blocks, patch 4, 4x4 grid) for tests."""
    if name not in PRESETS:
        raise ValueError(f"DINOv2 variant={name!r} is not one of {list(PRESETS)}")
    if name == "dinov2_tiny":
        fields = dict(hidden_size=32, depth=2, num_heads=4, patch_size=4, image_size=16)
    else:
        (d, depth, heads), reg = _ARCHS[name[10]], name.endswith("_reg")  # 'dinov2_vit' + s/b/l/g
        fields = dict(hidden_size=d, depth=depth, num_heads=heads, swiglu=name[10] == "g",
                      num_register_tokens=4 if reg else 0, interpolate_offset=0.0 if reg else 0.1,
                      interpolate_antialias=reg)
    return DinoV2Config.from_dict({**fields, **overrides})


def where_to_get(variant: str = "dinov2_vitb14_reg") -> str:
    a, reg = variant[10], variant.endswith("_reg")
    url = f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{a}14/dinov2_vit{a}14{'_reg4' * reg}_pretrain.pth"
    repo = f"facebook/dinov2-{'with-registers-' * reg}{_HF_NAMES[a]}"
    return f"download {url} (torch.hub layout) or the Hugging Face repo {repo} (config.json + weights)"


# ----------------------------------------------------------------------------- torch's bicubic


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def resize_matrix(n_in: int, n_out: int, antialias: bool = False, scale: float | None = None) -> np.ndarray:
    """(n_out, n_in) float64 weights of torch's F.interpolate(mode='bicubic', align_corners=False)
    on one axis, for size=n_out or, if given, scale_factor=scale (source step 1/scale).
    antialias=False: Keys cubic a=-0.75 on 4 taps, out-of-range taps clamped to the border, no
    smoothing even when shrinking. antialias=True: PIL's a=-0.5 kernel widened by the shrink
    factor, taps renormalised over the pixels inside (a copy when n_in == n_out)."""
    step = 1.0 / scale if scale else n_in / n_out
    out = np.arange(n_out, dtype=np.float64)
    m = np.zeros((n_out, n_in))
    if not antialias:
        src = (out + 0.5) * step - 0.5
        taps = np.floor(src)[:, None] + np.arange(-1, 3)  # (n_out, 4)
        w = _keys_cubic(taps - src[:, None], -0.75)
        rows = np.repeat(np.arange(n_out), 4)
        np.add.at(m, (rows, np.clip(taps, 0, n_in - 1).astype(int).ravel()), w.ravel())
        return m
    if n_in == n_out:  # torch's antialiased kernel copies then, whatever the scale
        return np.eye(n_in)
    support, widen = (2.0 * step, step) if step >= 1 else (2.0, 1.0)
    for i, c in enumerate((out + 0.5) * step):
        lo, hi = max(int(c - support + 0.5), 0), min(int(c + support + 0.5), n_in)
        w = _keys_cubic((np.arange(lo, hi) - c + 0.5) / widen, -0.5)
        m[i, lo:hi] = w / w.sum()
    return m


def resize(x: jnp.ndarray, hw: tuple[int, int], antialias: bool = False, scale=None) -> jnp.ndarray:
    """(B, H, W, C) -> (B, h, w, C) float32, torch's bicubic (`resize_matrix`); scale: None or
    torch's scale_factor (sh, sw)."""
    sh, sw = scale if scale is not None else (None, None)
    mh = jnp.asarray(resize_matrix(x.shape[1], hw[0], antialias, sh), jnp.float32)
    mw = jnp.asarray(resize_matrix(x.shape[2], hw[1], antialias, sw), jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", mh, x.astype(jnp.float32), precision=hi)
    return jnp.einsum("pw,bowc->bopc", mw, x, precision=hi)


def preprocess(images: jnp.ndarray, size: int = 224) -> jnp.ndarray:
    """REPA's input: (B, H, W, 3) in [-1, 1] -> [0, 1] -> torch-bicubic (no antialias, as
    F.interpolate's default, also when shrinking 256 -> 224) to size x size -> ImageNet mean/std."""
    x = resize((images.astype(jnp.float32) + 1.0) / 2.0, (size, size))
    return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)  # (B, size, size, 3)


# ----------------------------------------------------------------------------- modules


class LayerNorm(nnx.Module):
    def __init__(self, f: layers.Factory, d: int, eps: float):
        self.eps = eps
        self.scale = f.param(nnx.initializers.ones_init(), (d,), ("embed",))
        self.bias = f.param(nnx.initializers.zeros_init(), (d,), ("embed",))

    def __call__(self, x):  # float32 in and out
        y = layers.layer_norm(x.astype(jnp.float32), self.eps)
        return y * layers.use(self.scale[...], jnp.float32) + layers.use(self.bias[...], jnp.float32)


class Mlp(nnx.Module):
    """GELU (exact erf) MLP fc1/fc2, or SwiGLU w12 (gate | up) / w3 as in torch.hub's ViT-g."""

    def __init__(self, f: layers.Factory, d: int, hidden: int, swiglu: bool):
        self.swiglu = swiglu
        if swiglu:
            self.w12 = f.linear(d, 2 * hidden, ("embed", "mlp"))
            self.w3 = f.linear(hidden, d, ("mlp", "embed"))
        else:
            self.fc1 = f.linear(d, hidden, ("embed", "mlp"))
            self.fc2 = f.linear(hidden, d, ("mlp", "embed"))

    def __call__(self, x):
        if self.swiglu:
            gate, up = jnp.split(self.w12(x), 2, axis=-1)
            return self.w3(jax.nn.silu(gate) * up)
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
    """Pre-norm ViT block: x + ls1 * attn(norm1(x)), then x + ls2 * mlp(norm2(x))."""

    def __init__(self, f: layers.Factory, cfg: DinoV2Config):
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.norm1 = LayerNorm(f, d, eps)
        self.attn = layers.Attention(f, d, cfg.num_heads, cfg.attention_impl)
        self.norm2 = LayerNorm(f, d, eps)
        self.mlp = Mlp(f, d, cfg.mlp_hidden, cfg.swiglu)
        self.layer_scale = cfg.layer_scale
        if cfg.layer_scale:
            self.ls1 = f.param(nnx.initializers.ones_init(), (d,), ("embed",))
            self.ls2 = f.param(nnx.initializers.ones_init(), (d,), ("embed",))

    def __call__(self, x):  # (B, T, D) float32 residual stream
        h = self.attn(self.norm1(x)).astype(jnp.float32)
        x = x + (h * layers.use(self.ls1[...], jnp.float32) if self.layer_scale else h)
        h = self.mlp(self.norm2(x)).astype(jnp.float32)
        return x + (h * layers.use(self.ls2[...], jnp.float32) if self.layer_scale else h)


class DinoV2(nnx.Module):
    """DinoV2(cfg, rngs=...) -> call on ImageNet-normalised (B, H, W, 3), H, W multiples of the
    patch. Parameters carry layers.py's logical names ('embed', 'mlp'); we replicate them (frozen,
    86M for B/14), i.e. build outside a mesh or under sharding.logical_axis_rules(fsdp=False)."""

    def __init__(self, config: DinoV2Config | None = None, *, rngs: nnx.Rngs | None = None, **kwargs):
        cfg = self.config = dataclasses.replace(config or DinoV2Config(), **kwargs)
        f = layers.Factory(cfg.dtype, rngs if rngs is not None else nnx.Rngs(0), "DINOv2")
        d, r, g = cfg.hidden_size, cfg.num_register_tokens, cfg.pos_grid
        normal = nnx.initializers.normal(0.02)
        self.patch_embed = layers.PatchEmbed(f, cfg.patch_size, 3, d)
        self.cls_token = f.param(normal, (1, 1, d), (None, None, "embed"))
        if r:
            self.register_tokens = f.param(normal, (1, r, d), (None, None, "embed"))
        self.pos_embed = f.param(normal, (1, 1 + g * g, d), (None, None, "embed"))
        self.blocks = nnx.List([Block(f, cfg) for _ in range(cfg.depth)])
        self.norm = LayerNorm(f, d, cfg.layer_norm_eps)

    def position_embedding(self, gh: int, gw: int) -> jnp.ndarray:
        """(1, 1 + gh*gw, D) float32: the cls position, then the pretrained grid resampled to gh x gw
        (unchanged at the pretraining grid, as both references)."""
        cfg, m = self.config, self.config.pos_grid
        pos = layers.use(self.pos_embed[...], jnp.float32)
        if (gh, gw) == (m, m):
            return pos
        off = cfg.interpolate_offset
        scale = ((gh + off) / m, (gw + off) / m) if off else None  # torch.hub's scale_factor form
        grid = resize(pos[:, 1:].reshape(1, m, m, -1), (gh, gw), cfg.interpolate_antialias, scale)
        return jnp.concatenate([pos[:, :1], grid.reshape(1, gh * gw, -1)], axis=1)

    def __call__(self, x) -> dict:
        """x (B, H, W, 3) -> float32 {'patch_tokens' (B, N, D), 'cls' (B, D), 'registers' (B, R, D)},
        all after the final norm; N = (H/p)(W/p) in raster order."""
        cfg, p = self.config, self.config.patch_size
        if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] % p or x.shape[2] % p:
            raise ValueError(f"DINOv2 input must be (B, H, W, 3) with H, W multiples of patch_size={p}, "
                             f"got {tuple(x.shape)}")
        tok = self.patch_embed(x).astype(jnp.float32)  # (B, N, D)
        cls = jnp.zeros_like(tok[:, :1]) + layers.use(self.cls_token[...], jnp.float32)
        tok = jnp.concatenate([cls, tok], axis=1) + self.position_embedding(x.shape[1] // p, x.shape[2] // p)
        r = cfg.num_register_tokens
        if r:  # registers go after cls, without a position embedding
            regs = jnp.zeros_like(tok[:, :1]) + layers.use(self.register_tokens[...], jnp.float32)
            tok = jnp.concatenate([tok[:, :1], regs, tok[:, 1:]], axis=1)
        for block in self.blocks:
            tok = block(tok)
        tok = self.norm(tok)  # (B, 1 + R + N, D)
        return {"patch_tokens": tok[:, 1 + r:], "cls": tok[:, 0], "registers": tok[:, 1:1 + r]}


# ----------------------------------------------------------------------------- pure encoder


def _abstract(cfg: DinoV2Config):
    return nnx.split(nnx.eval_shape(lambda: DinoV2(cfg, rngs=nnx.Rngs(0))))


def param_shapes(cfg: DinoV2Config) -> dict[str, tuple]:
    """{'blocks/0/attn/qkv/kernel': shape, ...} of our parameters (nothing materialised)."""
    return layers.flat_shapes(nnx.to_pure_dict(_abstract(cfg)[1]))


def make_encoder(cfg: DinoV2Config, params: dict, resolution: int = 224):
    """Checks that `params` (a pure dict, as load_dinov2 returns) fit `cfg`; returns the pure
    features(params, images): (B, H, W, 3) in [-1, 1] -> `preprocess` to resolution -> DINOv2
    patch tokens (B, (resolution / p)^2, D) float32 after the final norm."""
    graphdef, state = _abstract(cfg)
    want, got = layers.flat_shapes(nnx.to_pure_dict(state)), layers.flat_shapes(params)
    if want != got:
        bad = [k for k in want if got.get(k) != want[k]] or sorted(set(got) - set(want))
        raise ValueError(f"params do not fit the DINOv2 config: {bad[0]} is {got.get(bad[0])}, "
                         f"expected {want.get(bad[0])}")

    def features(params, images):
        s = jax.tree.map(lambda a: a, state)
        nnx.replace_by_pure_dict(s, params)
        return nnx.merge(graphdef, s)(preprocess(images, resolution))["patch_tokens"]

    return features


def match_tokens(features: jnp.ndarray, grid_hw: tuple[int, int]) -> jnp.ndarray:
    """(B, N, D) on DINO's square grid -> (B, h*w, D) on the DiT's token grid (h, w). Unchanged
    when they agree (ImageNet-256: 32x32 latents at patch 2 and DINOv2 at 224/14 are both 16x16);
    otherwise the feature map is resized bilinearly (jax.image.resize 'linear', half-pixel
    centres, antialiased when shrinking)."""
    b, n, d = features.shape
    g, (h, w) = math.isqrt(n), grid_hw
    if g * g != n:
        raise ValueError(f"features must lie on a square grid, got N={n} tokens")
    if (g, g) == (h, w):
        return features
    grid = jax.image.resize(features.reshape(b, g, g, d), (b, h, w, d), "linear")
    return grid.reshape(b, h * w, d)


# ----------------------------------------------------------------------------- converters

_IGNORED = {"hub": ("mask_token",), "hf": ("embeddings.mask_token",)}  # masking is for pretraining
_HF_TOP = {"patch_embed": "embeddings.patch_embeddings.projection", "cls_token": "embeddings.cls_token",
           "register_tokens": "embeddings.register_tokens", "pos_embed": "embeddings.position_embeddings",
           "norm": "layernorm"}
_HF_BLOCK = {  # our module -> alternatives (checkpoint files on the hub first, then transformers 5 names)
    "attn/qkv": (("attention.attention.query", "attention.attention.key", "attention.attention.value"),
                 ("attention.q_proj", "attention.k_proj", "attention.v_proj")),
    "attn/proj": (("attention.output.dense",), ("attention.o_proj",)),
    "ls1": (("layer_scale1.lambda1",),), "ls2": (("layer_scale2.lambda1",),),
    "mlp/w12": (("mlp.weights_in",), ("mlp.gate_proj", "mlp.up_proj")),
    "mlp/w3": (("mlp.weights_out",), ("mlp.down_proj",)),
}


def _source_keys(path: str, layout: str) -> list[tuple[str, ...]]:
    """Our parameter path -> alternatives, each a tuple of keys concatenated on our last axis."""
    *mod, leaf = path.split("/")
    if leaf not in ("kernel", "scale", "bias"):
        mod, leaf = [*mod, leaf], None
    suffix = "" if leaf is None else (".bias" if leaf == "bias" else ".weight")
    if layout == "hub":
        key = ".".join(mod).replace("patch_embed", "patch_embed.proj")
        return [(key + (".gamma" if re.fullmatch(r"blocks\.\d+\.ls[12]", key) else suffix),)]
    if mod[0] != "blocks":
        return [(_HF_TOP[mod[0]] + suffix,)]
    prefix, name = f"encoder.layer.{mod[1]}.", "/".join(mod[2:])
    alts = _HF_BLOCK.get(name, ((name.replace("/", "."),),))
    return [tuple(prefix + k + suffix for k in alt) for alt in alts]


def convert(state_dict: dict, cfg: DinoV2Config, layout: str) -> dict:
    """A torch.hub ('hub') or transformers ('hf') state dict of arrays -> our pure params dict.
    ValueError on a missing or unused tensor, or naming the first tensor of the wrong shape."""
    flat, used = {}, set(_IGNORED[layout])
    for path, shape in param_shapes(cfg).items():
        alts = _source_keys(path, layout)
        keys = next((a for a in alts if all(k in state_dict for k in a)), None)
        if keys is None:
            raise ValueError(f"{layout} state dict has no {' + '.join(alts[-1])} ({path}); wrong variant?")
        perm = (2, 3, 1, 0) if path == "patch_embed/kernel" else (1, 0) if path.endswith("kernel") else None
        parts = []
        for k in keys:
            part = shape[:-1] + (shape[-1] // len(keys),)
            want = tuple(part[perm.index(j)] for j in range(len(perm))) if perm else part
            arr = np.asarray(state_dict[k], np.float32)
            if arr.shape != want:
                raise ValueError(f"{k} has shape {arr.shape} in the file, expected {want} for this config")
            parts.append(arr.transpose(perm) if perm else arr)
        flat[path] = np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
        used.update(keys)
    extra = sorted(set(state_dict) - used)
    if extra:
        raise ValueError(f"{len(extra)} tensors of the {layout} state dict are unused, e.g. {extra[:3]}; "
                         "wrong variant or layout?")
    params: dict = {}
    for path, arr in flat.items():
        *parents, leaf = [int(p) if p.isdigit() else p for p in path.split("/")]
        node = params
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = arr
    return params


def _read(path: str) -> tuple[dict, dict | None]:
    """(state dict of numpy arrays, transformers config.json or None)."""

    def _read_torch(path):
        import torch  # optional dependency: only to read .pth / .bin files

        sd = torch.load(path, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in sd.items()}

    hf_config = None
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            with open(os.path.join(path, "config.json")) as f:
                hf_config = json.load(f)
        st, bin_ = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
        if not (os.path.isfile(st) or os.path.isfile(bin_)):
            raise FileNotFoundError(f"DINOv2 folder {path!r} holds no model.safetensors or pytorch_model.bin")
        return (load_file(st) if os.path.isfile(st) else _read_torch(bin_)), hf_config
    return (load_file(path) if path.endswith(".safetensors") else _read_torch(path)), None


def _infer_config(sd: dict, layout: str, hf_config: dict | None) -> DinoV2Config:
    if hf_config is not None:
        c, reg = hf_config, hf_config.get("model_type") == "dinov2_with_registers"
        if c.get("hidden_act", "gelu") != "gelu" or not c.get("qkv_bias", True):
            raise ValueError("config.json: only hidden_act='gelu' with qkv_bias=true is supported")
        return DinoV2Config(
            hidden_size=c["hidden_size"], depth=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
            patch_size=c["patch_size"], mlp_ratio=c.get("mlp_ratio", 4.0), image_size=c["image_size"],
            swiglu=c.get("use_swiglu_ffn", False), num_register_tokens=c.get("num_register_tokens", 4) * reg,
            interpolate_antialias=reg, layer_norm_eps=c.get("layer_norm_eps", 1e-6))
    names = ("cls_token", "register_tokens", "pos_embed", "patch_embed/kernel")
    key = {p: _source_keys(p, layout)[0][0] for p in names}
    d = sd[key["cls_token"]].shape[-1]
    if d % 64:  # every DINOv2 has 64-dim heads
        raise ValueError(f"cannot tell the heads of a width-{d} DINOv2; pass variant= (a preset or config)")
    regs = sd[key["register_tokens"]].shape[1] if key["register_tokens"] in sd else 0
    patch, grid = sd[key["patch_embed/kernel"]].shape[-1], math.isqrt(sd[key["pos_embed"]].shape[1] - 1)
    depth = len({m[1] for k in sd if (m := re.match(r"(?:blocks|encoder\.layer)\.(\d+)\.", k))})
    swiglu = any(re.search(r"mlp\.(w12|weights_in|gate_proj)\.", k) for k in sd)
    return DinoV2Config(hidden_size=d, depth=depth, num_heads=d // 64, patch_size=patch, swiglu=swiglu,
                        num_register_tokens=regs, image_size=grid * patch, interpolate_antialias=regs > 0,
                        interpolate_offset=0.1 if layout == "hub" and not regs else 0.0)


def load_dinov2(path: str, variant: str | DinoV2Config | None = None,
                dtype: str = "float32") -> tuple[DinoV2Config, dict]:
    """(config, params) from a local torch.hub .pth or a transformers folder / .safetensors (the
    layout is told by the keys); never downloads. variant: a preset name or config to use instead
    of the one read from config.json / the shapes (e.g. torch.hub's resampling for HF weights)."""
    if not os.path.exists(path):
        name = variant if isinstance(variant, str) and variant != "dinov2_tiny" else "dinov2_vitb14_reg"
        raise FileNotFoundError(f"DINOv2 weights not found at {path!r}; {where_to_get(name)}")
    sd, hf_config = _read(path)
    layout = "hf" if "embeddings.cls_token" in sd else "hub" if "cls_token" in sd else None
    if layout is None:
        raise ValueError(f"{path!r} is neither a torch.hub DINOv2 (cls_token) nor a transformers one "
                         "(embeddings.cls_token)")
    cfg = preset(variant) if isinstance(variant, str) else variant or _infer_config(sd, layout, hf_config)
    cfg = dataclasses.replace(cfg, dtype=dtype)
    return cfg, convert(sd, cfg, layout)
