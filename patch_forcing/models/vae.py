"""KL-f8 autoencoder of Stable Diffusion (`stabilityai/sd-vae-ft-ema`) in flax NNX, NHWC.

The module tree mirrors diffusers' `AutoencoderKL` attribute for attribute, so a diffusers
state_dict key names our parameter directly: `encoder.down_blocks.0.resnets.0.conv1.weight`
is `vae.encoder.down_blocks[0].resnets[0].conv1.kernel` (OIHW -> HWIO, linear transposed).

    vae = load_vae()                          # or load_vae(local_path='.../diffusion_pytorch_model.safetensors')
    z = vae.encode(x)                         # x (B, 256, 256, 3) in [-1, 1] -> (B, 32, 32, 4), scaled by 0.18215
    x = vae.decode(z)                         # decoder(post_quant_conv(z / 0.18215))

Weights are read with `safetensors.numpy` (no torch); the Hugging Face hub is contacted only
inside `load_vae`, never at import time.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save_file

from patch_forcing import paths

DEFAULT_REPO = "stabilityai/sd-vae-ft-ema"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
ENV_WEIGHTS = "PF_VAE_WEIGHTS"


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Sizes of the autoencoder; the defaults are SD's KL-f8 (sd-vae-ft-ema)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    scale_factor: float = 0.18215

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any]) -> "VAEConfig":
        """From a diffusers `config.json` dict (AutoencoderKL with down/up EncoderBlock2D)."""
        for name in ("down_block_types", "up_block_types"):
            bad = [b for b in cfg.get(name, ()) if b not in ("DownEncoderBlock2D", "UpDecoderBlock2D")]
            if bad:
                raise ValueError(f"vae config {name}={bad} is not one of ['DownEncoderBlock2D', 'UpDecoderBlock2D']")
        if cfg.get("act_fn", "silu") != "silu":
            raise ValueError(f"vae config act_fn={cfg['act_fn']!r} is not one of ['silu']")
        if cfg.get("shift_factor") is not None:
            raise ValueError(f"vae config shift_factor={cfg['shift_factor']!r} is not one of [None]")
        return cls(
            in_channels=cfg.get("in_channels", 3),
            out_channels=cfg.get("out_channels", 3),
            block_out_channels=tuple(cfg.get("block_out_channels", (64,))),
            layers_per_block=cfg.get("layers_per_block", 1),
            latent_channels=cfg.get("latent_channels", 4),
            norm_num_groups=cfg.get("norm_num_groups", 32),
            scale_factor=cfg.get("scaling_factor", 0.18215),
        )


    def to_diffusers(self) -> dict[str, Any]:
        """A diffusers AutoencoderKL `config.json` dict for this config."""
        n = len(self.block_out_channels)
        return {"_class_name": "AutoencoderKL", "in_channels": self.in_channels, "out_channels": self.out_channels,
                "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
                "block_out_channels": list(self.block_out_channels), "layers_per_block": self.layers_per_block,
                "act_fn": "silu", "latent_channels": self.latent_channels, "norm_num_groups": self.norm_num_groups,
                "scaling_factor": self.scale_factor}


def tiny_config() -> VAEConfig:
    """A few-kB autoencoder for tests (downsampling 2, 8 norm groups)."""
    return VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)


# ----------------------------------------------------------------------------- layers


def _conv(cin, cout, k, rngs, dtype, stride=1, padding=None):
    pad = ((k // 2, k // 2),) * 2 if padding is None else padding
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=pad, dtype=dtype, rngs=rngs)


def _norm(c, cfg, rngs, dtype):
    # Exact two-pass variance: matches torch.nn.GroupNorm to float32 rounding.
    return nnx.GroupNorm(c, num_groups=cfg.norm_num_groups, epsilon=cfg.norm_eps, use_fast_variance=False,
                         dtype=dtype, rngs=rngs)


class ResnetBlock(nnx.Module):
    """norm-silu-conv twice, plus a 1x1 shortcut when the width changes."""

    def __init__(self, cin, cout, cfg, *, rngs, dtype=None):
        self.norm1 = _norm(cin, cfg, rngs, dtype)
        self.conv1 = _conv(cin, cout, 3, rngs, dtype)
        self.norm2 = _norm(cout, cfg, rngs, dtype)
        self.conv2 = _conv(cout, cout, 3, rngs, dtype)
        self.conv_shortcut = _conv(cin, cout, 1, rngs, dtype) if cin != cout else None

    def __call__(self, x):  # (B, H, W, Cin) -> (B, H, W, Cout)
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class Attention(nnx.Module):
    """Single-head self-attention over all H*W positions, with a residual connection."""

    def __init__(self, c, cfg, *, rngs, dtype=None):
        self.group_norm = _norm(c, cfg, rngs, dtype)
        self.to_q = nnx.Linear(c, c, dtype=dtype, rngs=rngs)
        self.to_k = nnx.Linear(c, c, dtype=dtype, rngs=rngs)
        self.to_v = nnx.Linear(c, c, dtype=dtype, rngs=rngs)
        self.to_out = nnx.List([nnx.Linear(c, c, dtype=dtype, rngs=rngs)])

    def __call__(self, x):  # (B, H, W, C)
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) / np.sqrt(c)
        attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = self.to_out[0](jnp.einsum("bqk,bkc->bqc", attn, v))
        return x + out.reshape(b, h, w, c)


class Downsample(nnx.Module):
    """Stride-2 3x3 conv after padding one row/column at the bottom/right (as diffusers)."""

    def __init__(self, c, *, rngs, dtype=None):
        self.conv = _conv(c, c, 3, rngs, dtype, stride=2, padding=((0, 1), (0, 1)))

    def __call__(self, x):
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, c, *, rngs, dtype=None):
        self.conv = _conv(c, c, 3, rngs, dtype)

    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class Block(nnx.Module):
    """A down (encoder) or up (decoder) block: resnets, then an optional resampler."""

    def __init__(self, cin, cout, n, cfg, resample, *, rngs, dtype=None):
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, cfg, rngs=rngs, dtype=dtype)
                                 for i in range(n)])
        if resample == "down":
            self.downsamplers = nnx.List([Downsample(cout, rngs=rngs, dtype=dtype)])
        elif resample == "up":
            self.upsamplers = nnx.List([Upsample(cout, rngs=rngs, dtype=dtype)])

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        for name in ("downsamplers", "upsamplers"):
            for s in getattr(self, name, ()):
                x = s(x)
        return x


class MidBlock(nnx.Module):
    def __init__(self, c, cfg, *, rngs, dtype=None):
        self.attentions = nnx.List([Attention(c, cfg, rngs=rngs, dtype=dtype)])
        self.resnets = nnx.List([ResnetBlock(c, c, cfg, rngs=rngs, dtype=dtype) for _ in range(2)])

    def __call__(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs, dtype=None):
        ch = cfg.block_out_channels
        self.conv_in = _conv(cfg.in_channels, ch[0], 3, rngs, dtype)
        self.down_blocks = nnx.List([
            Block(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, cfg, "down" if i < len(ch) - 1 else None,
                  rngs=rngs, dtype=dtype) for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], cfg, rngs=rngs, dtype=dtype)
        self.conv_norm_out = _norm(ch[-1], cfg, rngs, dtype)
        self.conv_out = _conv(ch[-1], 2 * cfg.latent_channels, 3, rngs, dtype)

    def __call__(self, x):  # (B, H, W, 3) -> (B, H/f, W/f, 2 * latent_channels)
        h = self.conv_in(x)
        for blk in self.down_blocks:
            h = blk(h)
        h = self.mid_block(h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs, dtype=None):
        ch = tuple(reversed(cfg.block_out_channels))
        self.conv_in = _conv(cfg.latent_channels, ch[0], 3, rngs, dtype)
        self.mid_block = MidBlock(ch[0], cfg, rngs=rngs, dtype=dtype)
        self.up_blocks = nnx.List([
            Block(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, cfg, "up" if i < len(ch) - 1 else None,
                  rngs=rngs, dtype=dtype) for i in range(len(ch))])
        self.conv_norm_out = _norm(ch[-1], cfg, rngs, dtype)
        self.conv_out = _conv(ch[-1], cfg.out_channels, 3, rngs, dtype)

    def __call__(self, z):  # (B, h, w, latent_channels) -> (B, h*f, w*f, 3)
        h = self.mid_block(self.conv_in(z))
        for blk in self.up_blocks:
            h = blk(h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class AutoencoderKL(nnx.Module):
    """SD's KL autoencoder. `encode`/`decode` work on *scaled* latents (x `scale_factor`)."""

    def __init__(self, config: VAEConfig = VAEConfig(), *, rngs: nnx.Rngs | None = None, dtype=None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config, rngs=rngs, dtype=dtype)
        self.decoder = Decoder(config, rngs=rngs, dtype=dtype)
        self.quant_conv = _conv(2 * c, 2 * c, 1, rngs, dtype)
        self.post_quant_conv = _conv(c, c, 1, rngs, dtype)

    def moments(self, x):
        """Posterior N(mean, exp(logvar)) of the *unscaled* latent; x (B, H, W, 3) in [-1, 1]."""
        m = self.quant_conv(self.encoder(x)).astype(jnp.float32)
        mean, logvar = jnp.split(m, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)  # each (B, H/f, W/f, C)

    def encode(self, x, key: jax.Array | None = None, sample: bool = False):
        """Scaled latent: posterior mean, or a posterior sample when `sample` (needs `key`)."""
        mean, logvar = self.moments(x)
        if sample:
            if key is None:
                raise ValueError("encode(sample=True) needs key=jax.random.key(...)")
            mean = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        return mean * self.config.scale_factor  # (B, H/f, W/f, C)

    def decode(self, z):
        """Image in ~[-1, 1] from a scaled latent z (B, h, w, C) -> (B, h*f, w*f, 3)."""
        return self.decoder(self.post_quant_conv(z / self.config.scale_factor)).astype(jnp.float32)


# ----------------------------------------------------------------------------- weights

# Attention names of diffusers < 0.14 (and of checkpoints saved then, like sd-vae-ft-ema).
_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _param_keys(model: AutoencoderKL) -> dict[str, tuple]:
    """diffusers key -> our nnx state path, for every parameter of `model`."""
    out = {}
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        *mods, leaf = (str(p) for p in path)
        out[".".join(mods + ["weight" if leaf in ("kernel", "scale") else leaf])] = tuple(path)
    return out


def _canonical(key: str) -> str:
    parts = key.split(".")
    if len(parts) >= 2 and "attentions" in parts and parts[-2] in _LEGACY:
        parts = parts[:-2] + _LEGACY[parts[-2]].split(".") + parts[-1:]
    return ".".join(parts)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], model: AutoencoderKL) -> AutoencoderKL:
    """Load a diffusers AutoencoderKL state_dict (numpy arrays) into `model`, in place; returns it.

    Every key must map and every parameter must be covered; shapes are checked."""
    targets = _param_keys(model)
    given = {}
    for k, v in state_dict.items():
        given[_canonical(k)] = (k, np.asarray(v))
    missing = sorted(set(targets) - set(given))
    unexpected = sorted(given[k][0] for k in set(given) - set(targets))
    if missing or unexpected:
        raise ValueError(f"vae state_dict does not match the config: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    new = {}
    for key, path in targets.items():
        src, v = given[key]
        want = flat[path].value.shape
        if v.ndim == 4 and len(want) == 2 and v.shape[2:] == (1, 1):  # legacy 1x1-conv attention
            v = v[:, :, 0, 0]
        if v.ndim == 4:
            v = v.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif v.ndim == 2:
            v = v.T  # (out, in) -> (in, out)
        if v.shape != want:
            raise ValueError(f"vae weight {src!r} has shape {v.shape} after conversion, expected {want}")
        new[path] = jnp.asarray(v, dtype=jnp.float32)
    for path, val in new.items():
        flat[path].value = val
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def to_state_dict(model: AutoencoderKL) -> dict[str, np.ndarray]:
    """Our parameters as a diffusers-layout state_dict of float32 numpy arrays (inverse of convert)."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = {}
    for key, path in _param_keys(model).items():
        v = np.asarray(flat[path].value, dtype=np.float32)
        out[key] = np.ascontiguousarray(v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T if v.ndim == 2 else v)
    return out


def save_vae(model: AutoencoderKL, directory: str) -> str:
    """Writes `config.json` and `diffusion_pytorch_model.safetensors` (diffusers layout); returns the file."""

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(model.config.to_diffusers(), f, indent=1)
    path = os.path.join(directory, WEIGHTS_FILE)
    save_file(to_state_dict(model), path)
    return path


def _resolve_weights(path_or_repo: str, local_path: str | None) -> str:
    """The weights file: a local or gs:// file/folder, else a hub download."""
    local = local_path or os.environ.get(ENV_WEIGHTS)
    if local:
        local = str(local)
        if paths.path(local).is_dir():
            cands = [paths.path(local) / WEIGHTS_FILE, paths.path(local) / "vae" / WEIGHTS_FILE]
            found = [str(c) for c in cands if c.is_file()]
            if not found:
                raise FileNotFoundError(f"vae_path={local!r} holds no {WEIGHTS_FILE} (nor vae/{WEIGHTS_FILE})")
            return found[0]
        if not paths.path(local).is_file():
            raise FileNotFoundError(f"vae_path={local!r} does not exist")
        return local
    if paths.path(path_or_repo).exists():
        return _resolve_weights(path_or_repo, path_or_repo)
    try:
        return huggingface_hub.hf_hub_download(path_or_repo, WEIGHTS_FILE)
    except Exception as e:  # offline, unknown repo, no cache, ...
        raise FileNotFoundError(
            f"cannot get {WEIGHTS_FILE} of Hugging Face repo {path_or_repo!r} ({type(e).__name__}); "
            f"download it elsewhere and pass --vae_path=/path/to/{WEIGHTS_FILE} or set {ENV_WEIGHTS}") from None


def load_vae(path_or_repo: str = DEFAULT_REPO, local_path: str | None = None, config: VAEConfig | None = None,
             dtype=None) -> AutoencoderKL:
    """The pretrained VAE: `local_path` (file or folder), else env PF_VAE_WEIGHTS, else the hub.

    The config comes from `config`, else a diffusers `config.json` beside the weights, else SD's."""
    path = _resolve_weights(path_or_repo, local_path)
    if config is None:
        cfg_file = paths.path(path).parent / "config.json"
        if cfg_file.is_file():
            config = VAEConfig.from_diffusers(json.loads(cfg_file.read_text()))
        else:
            config = VAEConfig()

    model = nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0), dtype=dtype))
    # eval_shape leaves ShapeDtypeStructs; converting fills every Param (all are covered).
    return convert_state_dict(load_safetensors(paths.path(path).read_bytes()), model)


def load_decoder(spec: str, dtype=None):
    """(decode(params, z) -> pixels clipped to [-1, 1], params) for the VAE `spec`: a local
    safetensors file/folder, or a hub repo id (fetched only now, never at import)."""
    local = paths.path(spec).exists()  # a local or gs:// file/folder, else a hub repo id
    model = load_vae(local_path=spec, dtype=dtype) if local else load_vae(spec, dtype=dtype)
    graphdef, params = nnx.split(model)
    return (lambda p, z: jnp.clip(nnx.merge(graphdef, p).decode(z), -1.0, 1.0)), params


def make_decoder(spec: str):
    """jit(latents -> pixels in [-1, 1]) with the VAE `spec` (local file/folder or hub id); the
    identity for pixel models (an empty spec)."""
    if not spec:
        return lambda x: x
    decode, params = load_decoder(spec)
    return jax.jit(lambda z: decode(params, z))
