"""Tiny random stand-ins for the released assets, so launch/colab_sampling.ipynb runs in CI.

`write_assets(out)` writes
  out/pft-tiny_random.ckpt   a PyTorch dict in the authors' release format
                             {'config': OmegaConf {'target': ...PatchForcingDiT, 'params': {...}},
                              'state_dict': {reference key: tensor}} (from tests/models/torch_dit.py,
                             random non-zero weights so velocities and difficulties vary)
  out/vae/                   a diffusers AutoencoderKL with a tiny config (downsampling 2), random
The notebook then runs with PF_NOTEBOOK_TINY=1 PF_NOTEBOOK_ASSETS=out. Needs torch and diffusers.
"""

from __future__ import annotations

import pathlib

import torch
from diffusers import AutoencoderKL
from omegaconf import OmegaConf

from tests.models.torch_dit import TorchDiT  # the independent torch DiT with the reference key names

CKPT_NAME = "pft-tiny_random.ckpt"
VAE_DIR = "vae"
TARGET = "patch_flow.models.pf_transformer.PatchForcingDiT"
# Reference constructor arguments (the keys of the authors' configs/model/pft-*.yaml).
TINY_PARAMS = dict(
    in_channels=4, input_size=16, depth=2, hidden_size=64, patch_size=2, num_heads=4,
    num_classes=10, compile=False, predict_uncertainty=True,
)
# diffusers AutoencoderKL arguments; patch_forcing.models.vae.tiny_config() has the same sizes.
TINY_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
    latent_channels=4, norm_num_groups=8, sample_size=32,
)


def write_checkpoint(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """The tiny random PatchForcingDiT checkpoint in the release format."""
    p = TINY_PARAMS
    model = TorchDiT(
        image_size=p["input_size"], in_channels=p["in_channels"], patch_size=p["patch_size"],
        hidden_size=p["hidden_size"], depth=p["depth"], num_heads=p["num_heads"],
        num_classes=p["num_classes"], per_patch=p["predict_uncertainty"],
    ).randomize(seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = OmegaConf.create({"target": TARGET, "params": dict(p)})  # pickled as the release files are
    torch.save({"config": config, "state_dict": state}, path)
    return path


def write_vae(directory: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A tiny random diffusers AutoencoderKL (config.json + safetensors) in `directory`."""
    torch.manual_seed(seed)
    AutoencoderKL(**TINY_VAE).save_pretrained(directory, safe_serialization=True)
    return directory / "diffusion_pytorch_model.safetensors"


def write_assets(out: pathlib.Path, seed: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_checkpoint(out / CKPT_NAME, seed)
    write_vae(out / VAE_DIR, seed)
