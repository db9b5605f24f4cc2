"""REPA's frozen target encoder, read from `config.repa` (validated in `config_lib.check_repa`).

  repa.encoder='dinov2_vitb14_reg' (any models.dinov2 preset), repa.encoder_path = local torch.hub
      .pth or transformers folder: images -> bicubic to repa.resolution (224) -> ImageNet mean/std
      -> patch tokens after the final norm (16x16 at 224 / 14).
  repa.encoder='classifier', repa.encoder_path = a models.classifier directory, or '' to train one
      into <workdir>/repa_encoder with seed config.seed + 1 (so it is not the FID classifier that
      eval.feature_network='auto' trains with config.seed): its last conv map, one token per cell.

What a reader must know: features are computed on the fly inside the jitted train step from the
batch's clean images (`encoder_images`: batch['pixels'], uint8 stored beside latents, else the
pixel data batch['image']), so they are sharded like the batch while the encoder's parameters are
replicated; `dinov2.match_tokens` resizes them bilinearly when the encoder's grid is not the DiT's.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax.numpy as jnp
from absl import logging
from etils import epath

from patch_forcing import config_lib, sharding
from patch_forcing.evaluation import features as features_lib
from patch_forcing.models import classifier, dinov2

ENCODER_DIR = "repa_encoder"  # <workdir>/repa_encoder: the auto-trained classifier stand-in
CLASSIFIER_SEED_OFFSET = 1  # its seed is config.seed + 1 (the FID classifier's is config.seed)


class TargetEncoder(NamedTuple):
    name: str  # e.g. 'dinov2_vitb14_reg' or 'classifier-mnist-1a2b3c4d'
    features: Callable  # features(params, images) -> (B, N, z_dim) float32 on the DiT's token grid
    params: Any  # pure dict of numpy arrays (frozen)


def encoder_images(batch: dict):
    """The clean images the encoder reads: batch['pixels'] (uint8, stored beside latents) or the
    pixel data batch['image'] (float, [-1, 1])."""
    return batch["pixels"] if "pixels" in batch else batch["image"]


def _to_unit_range(images):
    """uint8 [0, 255] or float [-1, 1] -> float32 [-1, 1], grey repeated to RGB."""
    x = images.astype(jnp.float32) / 127.5 - 1.0 if images.dtype == jnp.uint8 else images.astype(jnp.float32)
    return jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def _dinov2(r, dtype: str):
    cfg, params = dinov2.load_dinov2(str(r.encoder_path), r.encoder, dtype=dtype)
    encode = dinov2.make_encoder(cfg, params, int(r.resolution))
    return (lambda p, images: encode(p, _to_unit_range(images))), params, str(r.encoder), cfg.hidden_size


def _classifier(config, workdir):
    path = str(config.repa.encoder_path) or str(epath.Path(workdir) / ENCODER_DIR)
    if not classifier.exists(path):
        if str(config.repa.encoder_path):
            raise FileNotFoundError(f"config.repa.encoder_path={path!r} holds no classifier "
                                    f"({classifier.PARAMS_FILE} + {classifier.META_FILE}); leave it empty to "
                                    "train one into <workdir>/repa_encoder")
        if sharding.is_chief():
            logging.info("repa.encoder='classifier': training the target encoder into %s", path)
            features_lib.train_classifier(config.data, path, seed=int(config.seed) + CLASSIFIER_SEED_OFFSET)
        sharding.sync("repa_encoder")
    meta, params = classifier.load(path)
    cfg = classifier.ClassifierConfig.from_dict(meta["config"])
    fmap = classifier.features_apply(cfg, "feature_map")

    def encode(p, images):
        m = fmap(p, images)  # (B, h, w, C)
        return m.reshape(m.shape[0], -1, m.shape[-1]).astype(jnp.float32)

    return encode, params, f"classifier-{meta['data']}-{meta['digest']}", cfg.widths[-1]


def target_encoder(config, workdir) -> TargetEncoder | None:
    """The frozen encoder of `config.repa`, or None when the step does not align (no projector,
    or repa.coeff == 0). Its feature size must equal repa.z_dim."""
    if not config_lib.repa_aligns(config):
        return None
    r, mcfg = config.repa, config_lib.model_config(config)
    if r.encoder == "classifier":
        encode, params, name, dim = _classifier(config, workdir)
    else:
        encode, params, name, dim = _dinov2(r, mcfg.dtype)
    if dim != int(r.z_dim):
        raise ValueError(f"config.repa.z_dim={r.z_dim} must equal the feature size {dim} of the target "
                         f"encoder {name}")
    grid = mcfg.grid

    def features(params, images):  # (B, H, W, C) -> (B, N, z_dim) on the DiT's token grid
        return dinov2.match_tokens(encode(params, images), grid)

    return TargetEncoder(name, features, params)
