"""The FLUX.2 autoencoder (diffusers' `AutoencoderKLFlux2`) in flax NNX, NHWC, with the reference's
latent normalisation.

Architecture: the SD KL autoencoder of `patch_forcing.vae` (same diffusers Encoder/Decoder, reused)
at 32 latent channels, 8x down, plus `bn`: BatchNorm running statistics over the 2x2-patchified
latent (128 channels). The authors' `jutils/nn/ae_flux2.py` (`FLUX2AutoencoderKL`, adapted from
BFL's flux2 autoencoder; diffusers' Flux2 pipeline does the same) encodes an image in [-1, 1] to
the posterior mean, folds each 2x2 patch into channels ordered (c, i, j) -> c*4 + i*2 + j,
normalises with (z - running_mean) / sqrt(running_var + 1e-4), and unfolds again. So the latent
the reference's T2I DiT sees (in_dim 32, its own patch 2) is unpatchified: (B, 32, 32, 32) for
256 px, here NHWC (B, H/8, W/8, 32). `decode` inverts the normalisation, then decodes.

    vae = load_flux2_vae('/path/FLUX.2-dev/vae')     # local folder or safetensors file
    z = vae.encode(x)                                # (B, 256, 256, 3) -> (B, 32, 32, 32)
    x = vae.decode(z)
    encode, decode, params = vae_functions(vae)      # pure: encode(params, x), decode(params, z)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open  # its flax backend reads bf16 (numpy has no bfloat16)

from patch_forcing.models import vae as vae_lib

HF_REPO = "black-forest-labs/FLUX.2-dev"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
DTYPES = ("float32", "bfloat16")
_BN_KEYS = ("bn.running_mean", "bn.running_var")
_GET_WEIGHTS = (f"get the diffusers VAE with `huggingface-cli download {HF_REPO} --include 'vae/*' "
                f"--local-dir DIR` and pass DIR/vae")


@dataclasses.dataclass(frozen=True)
class Flux2VAEConfig:
    """Sizes of the FLUX.2 VAE; the defaults are diffusers' `AutoencoderKLFlux2` (= FLUX.2's)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_block_out_channels: tuple[int, ...] | None = None  # None: block_out_channels
    layers_per_block: int = 2
    latent_channels: int = 32
    norm_num_groups: int = 32
    batch_norm_eps: float = 1e-4
    patch_size: int = 2  # the 2x2 fold of the normalisation
    dtype: str = "float32"  # compute dtype; params are float32

    def __post_init__(self):
        for name in ("block_out_channels", "decoder_block_out_channels"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.dtype not in DTYPES:
            raise ValueError(f"Flux2VAEConfig.dtype={self.dtype!r} is not one of {list(DTYPES)}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def backbone(self, decoder: bool = False) -> vae_lib.VAEConfig:
        """The `patch_forcing.vae` config of the encoder (or decoder) tower."""
        ch = (self.decoder_block_out_channels or self.block_out_channels) if decoder else self.block_out_channels
        return vae_lib.VAEConfig(in_channels=self.in_channels, out_channels=self.out_channels,
                                 block_out_channels=ch, layers_per_block=self.layers_per_block,
                                 latent_channels=self.latent_channels, norm_num_groups=self.norm_num_groups,
                                 scale_factor=1.0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Flux2VAEConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown Flux2VAEConfig fields {unknown}; allowed: {names}")
        return cls(**d)

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any], dtype: str = "float32") -> "Flux2VAEConfig":
        """From a diffusers `AutoencoderKLFlux2` `config.json` dict."""
        fixed = {"_class_name": "AutoencoderKLFlux2", "act_fn": "silu", "use_quant_conv": True,
                 "use_post_quant_conv": True, "mid_block_add_attention": True}
        for key, want in fixed.items():
            if cfg.get(key, want) != want:
                raise ValueError(f"flux2 vae config {key}={cfg[key]!r} is not one of [{want!r}]")
        for name, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            bad = [b for b in cfg.get(name, ()) if b != want]
            if bad:
                raise ValueError(f"flux2 vae config {name}={bad} is not one of [{want!r}]")
        patch = tuple(cfg.get("patch_size", (2, 2)))
        if len(patch) != 2 or patch[0] != patch[1]:
            raise ValueError(f"flux2 vae config patch_size={list(patch)} must be square, e.g. [2, 2]")
        d = cls()
        return cls(in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
                   block_out_channels=tuple(cfg.get("block_out_channels", d.block_out_channels)),
                   decoder_block_out_channels=cfg.get("decoder_block_out_channels"),
                   layers_per_block=cfg.get("layers_per_block", 2),
                   latent_channels=cfg.get("latent_channels", 32),
                   norm_num_groups=cfg.get("norm_num_groups", 32),
                   batch_norm_eps=cfg.get("batch_norm_eps", 1e-4), patch_size=patch[0], dtype=dtype)


# ----------------------------------------------------------------------------- normalisation


def fold(z: jnp.ndarray, p: int) -> jnp.ndarray:
    """(B, H, W, C) -> (B, H/p, W/p, C*p*p), channel c*p*p + i*p + j (as the reference's BN)."""
    b, h, w, c = z.shape
    z = z.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4)
    return z.reshape(b, h // p, w // p, c * p * p)


def unfold(z: jnp.ndarray, p: int) -> jnp.ndarray:
    """The inverse of `fold`."""
    b, h, w, k = z.shape
    z = z.reshape(b, h, w, k // (p * p), p, p).transpose(0, 1, 4, 2, 5, 3)
    return z.reshape(b, h * p, w * p, k // (p * p))


def normalize(mean, running_mean, running_var, eps: float, p: int):
    """Raw posterior mean (B, H, W, C) -> the DiT's latent: BN (eval) over the p x p fold."""
    z = (fold(mean, p) - running_mean) / jnp.sqrt(running_var + eps)
    return unfold(z, p)


def denormalize(z, running_mean, running_var, eps: float, p: int):
    """The inverse of `normalize`."""
    return unfold(fold(z, p) * jnp.sqrt(running_var + eps) + running_mean, p)


# ----------------------------------------------------------------------------- model


class BatchNormStats(nnx.Module):
    """The frozen running statistics of diffusers' `bn` (affine=False BatchNorm2d)."""

    def __init__(self, n: int):
        self.running_mean = nnx.BatchStat(jnp.zeros((n,), jnp.float32))
        self.running_var = nnx.BatchStat(jnp.ones((n,), jnp.float32))


class Flux2AutoencoderKL(nnx.Module):
    """Attribute names mirror diffusers' `AutoencoderKLFlux2`, so its state_dict keys name ours."""

    def __init__(self, config: Flux2VAEConfig = Flux2VAEConfig(), *, rngs: nnx.Rngs | None = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.config = cfg = config
        c, dtype = cfg.latent_channels, jnp.dtype(cfg.dtype)
        self.encoder = vae_lib.Encoder(cfg.backbone(), rngs=rngs, dtype=dtype)
        self.decoder = vae_lib.Decoder(cfg.backbone(decoder=True), rngs=rngs, dtype=dtype)
        self.quant_conv = nnx.Conv(2 * c, 2 * c, (1, 1), dtype=dtype, rngs=rngs)
        self.post_quant_conv = nnx.Conv(c, c, (1, 1), dtype=dtype, rngs=rngs)
        self.bn = BatchNormStats(c * cfg.patch_size**2)

    def _stats(self):
        cfg = self.config
        return self.bn.running_mean[...], self.bn.running_var[...], cfg.batch_norm_eps, cfg.patch_size

    def posterior_mean(self, x):
        """The raw (unnormalised) posterior mean; x (B, H, W, 3) in [-1, 1] -> (B, H/8, W/8, C)."""
        moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)
        return jnp.split(moments, 2, axis=-1)[0]

    def encode(self, x):
        """x (B, H, W, 3) in [-1, 1] -> normalised latent (B, H/8, W/8, C) float32."""
        return normalize(self.posterior_mean(x), *self._stats())

    def decode(self, z):
        """Normalised latent (B, h, w, C) -> image (B, 8h, 8w, 3) float32, ~[-1, 1]."""
        raw = denormalize(z.astype(jnp.float32), *self._stats())
        return self.decoder(self.post_quant_conv(raw)).astype(jnp.float32)


def vae_functions(model: Flux2AutoencoderKL):
    """(encode(params, x), decode(params, z), params): pure and jittable."""
    graphdef, params = nnx.split(model)
    return (lambda p, x: nnx.merge(graphdef, p).encode(x)), (lambda p, z: nnx.merge(graphdef, p).decode(z)), params


# ----------------------------------------------------------------------------- weights


def convert_state_dict(state_dict: Mapping[str, np.ndarray], model: Flux2AutoencoderKL) -> Flux2AutoencoderKL:
    """Fill `model` in place from a diffusers `AutoencoderKLFlux2` state_dict of numpy arrays."""
    rest = {k: v for k, v in state_dict.items() if not k.startswith("bn.")}
    n = model.config.latent_channels * model.config.patch_size**2
    for key in _BN_KEYS:
        if key not in state_dict:
            raise ValueError(f"flux2 vae state_dict lacks tensor {key!r} (the latent normalisation)")
        v = np.asarray(state_dict[key], np.float32)
        if v.shape != (n,):
            raise ValueError(f"flux2 vae tensor {key!r} has shape {v.shape}, expected {(n,)}")
        getattr(model.bn, key.split(".")[1]).value = jnp.asarray(v)
    vae_lib.convert_state_dict(rest, model)  # every nnx.Param; one-line errors name the tensor
    return model


def _resolve(path: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"flux2 vae path {path!r} does not exist; {_GET_WEIGHTS}")
    if os.path.isdir(path):
        found = [c for c in (os.path.join(path, WEIGHTS_FILE), os.path.join(path, "vae", WEIGHTS_FILE))
                 if os.path.isfile(c)]
        if not found:
            raise FileNotFoundError(f"{path!r} holds no {WEIGHTS_FILE} (nor vae/{WEIGHTS_FILE}); {_GET_WEIGHTS}")
        return found[0]
    return path


def _read(file: str) -> dict[str, np.ndarray]:

    with jax.default_device(jax.devices("cpu")[0]), safe_open(file, framework="flax") as f:
        return {k: np.asarray(f.get_tensor(k).astype(jnp.float32)) for k in f.keys()}


def load_flux2_vae(path: str, dtype: str = "float32") -> Flux2AutoencoderKL:
    """From a local diffusers folder (config.json + diffusion_pytorch_model.safetensors, or its
    parent with `vae/`) or the safetensors file itself (config.json beside it, else defaults)."""
    file = _resolve(path)
    config = Flux2VAEConfig(dtype=dtype)
    cfg_file = os.path.join(os.path.dirname(file), "config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            config = Flux2VAEConfig.from_diffusers(json.load(f), dtype=dtype)
    model = nnx.eval_shape(lambda: Flux2AutoencoderKL(config, rngs=nnx.Rngs(0)))
    return convert_state_dict(_read(file), model)
