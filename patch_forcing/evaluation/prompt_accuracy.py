"""Prompt accuracy of captioned-digits samples (GenEval in miniature), and their classifier FID.

A region classifier (models/classifier.py, trained by `features.train_classifier` on the 16 x 16
halves of real canvases, one joint class per (digit, colour, size)) reads the left and the right
half of a generated canvas; the image matches its prompt when both halves show the prompt's digit,
colour and size in the prompt's order (`captioned.parse`). The shuffled-prompt control scores the
same images against other prompts: what matching by chance gives. FID features are the
classifier's `pool` features of both halves side by side (256-d).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from patch_forcing.data import captioned
from patch_forcing.evaluation import features, metrics
from patch_forcing.models import classifier

REGIONS_FILE = "regions.npz"
ATTRIBUTES = ("digit", "colour", "size")


def real_canvases(split: str, start: int, num: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Canvases [start, start + num) of `split`: uint8 (N, 16, 32, 3), attrs (N, 2, 3), captions."""
    draws = [captioned.draw(split, i) for i in range(start, start + num)]
    return (np.stack([d[0] for d in draws]), np.stack([d[1] for d in draws]),
            [captioned.caption(d[1], d[2]) for d in draws])


def _region_arrays(split: str, num_canvases: int) -> tuple[np.ndarray, np.ndarray]:
    images, attrs, _ = real_canvases(split, 0, num_canvases)
    return (captioned.regions(images).reshape(-1, captioned.REGION, captioned.REGION, 3),
            captioned.region_class(attrs).reshape(-1).astype(np.int32))


def region_classifier(directory: str, seed: int = 0, steps: int = 1500, num_train: int = 10_000,
                      num_test: int = 1_000, verbose: bool = False) -> features.FeatureNetwork:
    """The region classifier in `directory`, trained there first when absent (deterministic for a
    seed): regions of `num_train` train canvases (their digits: sklearn's first 1500), tested on
    `num_test` test canvases (the other 297 digits)."""
    if not classifier.exists(directory):
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, REGIONS_FILE)
        (xtr, ytr), (xte, yte) = _region_arrays("train", num_train), _region_arrays("test", num_test)
        np.savez(path, train_images=xtr, train_labels=ytr, test_images=xte, test_labels=yte)
        data = ml_collections.ConfigDict(dict(
            name="arrays", data_dir=path, split_train="train", split_eval="test",
            num_classes=captioned.NUM_REGION_CLASSES, batch_size=1024, channels=3, pad=0, hflip=False,
            num_workers=0, source="auto", image_size=(captioned.REGION, captioned.REGION)))
        features.train_classifier(data, directory, steps=steps, seed=seed, verbose=verbose)
    return features.load_classifier(directory)


def classify(fnet: features.FeatureNetwork, images: np.ndarray, batch: int = 1024) -> dict[str, np.ndarray]:
    """Canvases uint8 (N, 16, 32, 3) -> {'attrs': (N, 2, 3) read back, 'features': (N, 2 * D)}."""
    fn = jax.jit(fnet.apply)
    reg = captioned.regions(images)  # (N, 2, 16, 16, 3)
    flat = reg.reshape(-1, *reg.shape[2:])
    outs = [jax.device_get(fn(fnet.params, jnp.asarray(flat[i:i + batch]))) for i in range(0, len(flat), batch)]
    logits = np.concatenate([o["logits"] for o in outs])
    pool = np.concatenate([o["pool"] for o in outs])
    n = len(images)
    return {"attrs": captioned.region_attrs(np.argmax(logits, -1)).reshape(n, 2, 3),
            "features": pool.reshape(n, -1)}


def scores(read: np.ndarray, attrs: np.ndarray) -> dict[str, float]:
    """Read-back attrs vs the prompts' (N, 2, 3): prompt accuracy (all six right), layout accuracy
    (both colours and sizes right, in order: digits aside) and per attribute."""
    hit = read == attrs  # (N, 2, 3)
    out = {"prompt_accuracy": float(hit.all(axis=(1, 2)).mean()), "region_accuracy": float(hit.all(-1).mean()),
           "layout_accuracy": float(hit[..., 1:].all(axis=(1, 2)).mean())}
    out.update({f"{a}_accuracy": float(hit[..., i].mean()) for i, a in enumerate(ATTRIBUTES)})
    return out


def shuffled(attrs: np.ndarray, seed: int = 0) -> np.ndarray:
    """The prompts' attrs permuted over the batch (each image gets another prompt's truth)."""
    return attrs[np.random.default_rng(seed).permutation(len(attrs))]


def fid(feats: np.ndarray, ref: dict) -> float:
    """FID of (N, D) features against reference statistics {'mu', 'sigma'}."""
    mu, sigma = metrics.feature_stats(feats)
    return float(metrics.frechet_distance(mu, sigma, ref["mu"], ref["sigma"]))


def reference_stats(fnet: features.FeatureNetwork, num: int = 5_000) -> dict[str, np.ndarray]:
    """Feature statistics of `num` train canvases (the FID reference)."""
    images, _, _ = real_canvases("train", 0, num)
    mu, sigma = metrics.feature_stats(classify(fnet, images)["features"])
    return {"mu": mu, "sigma": sigma}
