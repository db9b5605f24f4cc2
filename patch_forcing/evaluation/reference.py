"""Reference statistics for FID/sFID and features for precision/recall (`config.eval.reference`):

  'data'                the statistics of config.data.split_eval, computed with the same feature
                        network and cached in <workdir>/eval/ (pixel data only);
  <file.npz>            mu, sigma [, mu_s, sigma_s, pool], or one of ADM's reference batches (its
                        arr_0 images give the precision/recall features, cached beside the others).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from patch_forcing import UserError, pictures, sharding
from patch_forcing.data import pipeline
from patch_forcing.evaluation import metrics
from patch_forcing.evaluation.features import FeatureNetwork

REF_POOL = 10_000  # reference features kept for precision/recall (ADM's reference batches: 10k)
ADM_REFERENCE_URL = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
                     "VIRTUAL_imagenet256_labeled.npz")


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", s).strip("_")


def _data_batches(config, split: str, batch_size: int):
    for b in pipeline.make_eval_batches(config.data, split, batch_size=batch_size):
        yield pictures.to_uint8(b["image"])


def _cache_fits(cache, fnet: FeatureNetwork, image_shape) -> bool:
    """Whether a cached reference exists with the feature sizes the network now gives."""
    if not cache.exists():
        return False
    dims = jax.eval_shape(fnet.apply, fnet.params, jax.ShapeDtypeStruct((2, *image_shape), jnp.uint8))
    with cache.open("rb") as f, np.load(f) as z:
        fits = z["mu"].shape == dims["pool"].shape[1:] and (
            "mu_s" not in z.files or z["mu_s"].shape == dims["spatial"].shape[1:])
    if not fits:
        logging.warning("%s has other feature sizes than %s gives now: recomputing it", cache, fnet.name)
    return fits


def reference_stats(config, workdir, fnet: FeatureNetwork) -> tuple[dict, str]:
    """(stats with mu, sigma [, mu_s, sigma_s, pool, count], description) of `config.eval.reference`."""
    ref = str(config.eval.reference)
    out_dir = epath.Path(workdir) / "eval"
    if ref == "data":
        return _data_reference(config, out_dir, fnet)
    if not epath.Path(ref).exists():
        raise FileNotFoundError(f"config.eval.reference={ref!r}: no such file (use 'data' for pixel data or a "
                                f"reference .npz, local or gs://; ImageNet 256: {ADM_REFERENCE_URL})")
    return _npz_reference(ref, out_dir, fnet, int(config.eval.batch_size)), f"npz:{ref}"


def _data_reference(config, out_dir, fnet: FeatureNetwork) -> tuple[dict, str]:
    """Statistics of config.data.split_eval, computed once per feature network and cached."""
    if config.data.name == "latents":
        raise UserError("config.eval.reference='data' needs pixel data, not data.name='latents': give a "
                         "reference .npz of real images (e.g. ADM's VIRTUAL_imagenet256_labeled.npz)")
    split = str(config.data.split_eval)
    cache = out_dir / f"reference-{_slug(f'{config.data.name}-{split}')}-{_slug(fnet.name)}.npz"
    shape = (*tuple(config.data.image_size), int(config.data.channels))
    if sharding.is_chief() and not _cache_fits(cache, fnet, shape):  # the others wait at the sync
        out_dir.mkdir(parents=True, exist_ok=True)
        stats = metrics.reference_stats_from_images(
            _data_batches(config, split, int(config.eval.batch_size)), fnet.host_fn(),
            keep_pool=REF_POOL, network=fnet.name)
        with cache.open("wb") as f:
            metrics.save_reference_stats(f, stats)
    sharding.sync("reference")  # on every process, whether or not the cache was there
    with cache.open("rb") as f:
        return metrics.load_reference_stats(f), f"data:{config.data.name}:{split}"


def _npz_reference(ref: str, out_dir, fnet: FeatureNetwork, batch_size: int) -> dict:
    """A reference .npz; an ADM reference batch's images give the precision/recall features."""
    stats = metrics.load_reference_stats(ref)
    if "network" in stats and str(stats["network"]) != fnet.name:
        raise UserError(f"config.eval.reference={ref!r} holds statistics of {stats['network']!r}, "
                         f"not of config.eval.feature_network's {fnet.name!r}")
    if "pool" in stats:
        return stats
    with epath.Path(ref).open("rb") as fo, np.load(fo) as f:
        has_images = "arr_0" in f.files
    if not has_images:
        logging.warning("%s has no reference features or images: no precision/recall", ref)
        return stats
    cache = out_dir / f"reference-{_slug(epath.Path(ref).stem)}-{_slug(fnet.name)}-pool.npz"
    if sharding.is_chief() and not cache.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        feats = metrics.extract_features(metrics.iter_npz_batches(ref, batch_size), fnet.host_fn())
        with cache.open("wb") as f:
            np.savez(f, pool=feats["pool"][:REF_POOL])
    sharding.sync("reference_pool")
    with cache.open("rb") as f, np.load(f) as z:
        stats["pool"] = z["pool"]
    return stats
