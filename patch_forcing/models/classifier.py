"""A small CNN classifier whose features replace Inception's on tiny 1-channel data.

Inception-v3 features mean little on 8x8 digits or 28x28 MNIST, so FID/precision/recall there use
the penultimate layer of this network (trained by `evaluation.features.train_classifier`, or
`python -m patch_forcing.tools.train_classifier`), saved as <dir>/{params.npz, classifier.json}.

Network: per stage a 3x3 conv + ReLU, 2x2 max-pool between stages, global mean pool,
Dense(feature_dim) + ReLU = `pool` features, Dense(num_classes) = `logits`. `spatial` is the
last conv map's first SPATIAL_CHANNELS channels flattened (h, w, c), an sFID analogue
(as ADM's sFID takes 7 channels of Inception's mixed_6/conv).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from patch_forcing import paths

FORMAT = "patch_forcing.classifier/1"
PARAMS_FILE, META_FILE = "params.npz", "classifier.json"
SPATIAL_CHANNELS = 8  # spatial features: 128-d on 8x8 digits, 512-d on 32x32 MNIST


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    image_size: tuple[int, int] = (8, 8)
    channels: int = 1
    num_classes: int = 10
    widths: tuple[int, ...] = (64, 128)
    depth: int = 1  # 3x3 convs per stage
    feature_dim: int = 128

    def __post_init__(self):
        down = 2 ** (len(self.widths) - 1)
        if any(s % down for s in self.image_size):
            raise ValueError(f"classifier image_size={tuple(self.image_size)} must be divisible by "
                             f"2**(len(widths) - 1) = {down}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        return cls(image_size=tuple(d["image_size"]), channels=int(d["channels"]),
                   num_classes=int(d["num_classes"]), widths=tuple(d["widths"]),
                   depth=int(d.get("depth", 1)), feature_dim=int(d["feature_dim"]))


class Classifier(nnx.Module):
    def __init__(self, cfg: ClassifierConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        chans = [cfg.channels] + [w for w in cfg.widths for _ in range(cfg.depth)]
        self.convs = nnx.List([nnx.Conv(ci, co, (3, 3), padding="SAME", rngs=rngs)
                               for ci, co in zip(chans[:-1], chans[1:])])
        down = 2 ** (len(cfg.widths) - 1)
        flat = (cfg.image_size[0] // down) * (cfg.image_size[1] // down) * cfg.widths[-1]
        self.fc = nnx.Linear(flat, cfg.feature_dim, rngs=rngs)
        self.head = nnx.Linear(cfg.feature_dim, cfg.num_classes, rngs=rngs)

    def feature_map(self, x):  # (B, H, W, C) float in [-1, 1] -> the last stage's (B, h, w, widths[-1])
        for i, conv in enumerate(self.convs):
            x = jax.nn.relu(conv(x))
            if (i + 1) % self.cfg.depth == 0 and i < len(self.convs) - 1:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        return x

    def __call__(self, x) -> dict:  # (B, H, W, C) float in [-1, 1]
        x = self.feature_map(x)
        spatial = x[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)  # (B, h*w*16)
        pool = jax.nn.relu(self.fc(x.reshape(x.shape[0], -1)))  # (B, feature_dim)
        return dict(pool=pool, spatial=spatial, logits=self.head(pool))


def to_float(images) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1]; float images are taken as already in [-1, 1]."""
    images = jnp.asarray(images)
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 127.5 - 1.0
    return images.astype(jnp.float32)


def default_config(image_size, channels: int = 1, num_classes: int = 10) -> ClassifierConfig:
    """Two wide stages for tiny images (8x8 -> 4x4), three narrow ones for larger (32 -> 8)."""
    widths = (64, 128) if max(image_size) <= 16 else (16, 32, 64)
    return ClassifierConfig(image_size=tuple(image_size), channels=int(channels),
                            num_classes=int(num_classes), widths=widths)


def init(cfg: ClassifierConfig, seed: int):
    """A fresh classifier split as (graphdef, params, rest)."""
    return nnx.split(Classifier(cfg, rngs=nnx.Rngs(seed)), nnx.Param, ...)


# ----------------------------------------------------------------------------- saving, loading


def _flat(params: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in params.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        out.update(_flat(v, name) if isinstance(v, dict) else {name: np.asarray(v)})
    return out


def save(directory: str, meta: dict, params: dict) -> None:
    """params.npz (flat 'convs/0/kernel' keys) + classifier.json with the weights' digest."""
    directory = paths.path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = _flat(params)
    meta = {**meta, "digest": _digest(flat)}
    with (directory / PARAMS_FILE).open("wb") as f:
        np.savez(f, **flat)
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def _digest(flat: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(flat):
        h.update(k.encode())
        h.update(np.ascontiguousarray(flat[k]).tobytes())
    return h.hexdigest()[:8]


def exists(directory: str) -> bool:
    return all((paths.path(directory) / f).is_file() for f in (PARAMS_FILE, META_FILE))


def load(directory: str) -> tuple[dict, dict]:
    """(metadata, params pure dict) from a directory written by `save`."""
    if not exists(directory):
        raise FileNotFoundError(f"no classifier at {directory!r} (expected {PARAMS_FILE} and {META_FILE}; "
                                f"train one: python -m patch_forcing.tools.train_classifier --config=... --workdir=...)")
    meta = json.loads((paths.path(directory) / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory}/{META_FILE} has format {meta.get('format')!r}, expected {FORMAT!r}")
    cfg = ClassifierConfig.from_dict(meta["config"])
    _, abstract, _ = nnx.eval_shape(lambda: init(cfg, 0))
    with paths.reading(paths.path(directory) / PARAMS_FILE) as fo, np.load(fo) as f:
        flat = {k: f[k] for k in f.files}
    want = {"/".join(map(str, path)): v.shape for path, v in nnx.to_flat_state(abstract)}
    bad = sorted(set(want) ^ set(flat)) + sorted(k for k in want if k in flat and flat[k].shape != want[k])
    if bad:
        raise ValueError(f"{directory}/{PARAMS_FILE} does not match the architecture in {META_FILE}: {bad[:5]}")
    nnx.replace_by_pure_dict(abstract, _unflat(flat))
    return meta, nnx.to_pure_dict(abstract)


def _unflat(flat: dict) -> dict:
    out: dict = {}
    for name, v in flat.items():
        *path, last = name.split("/")
        node = out
        for p in path:
            node = node.setdefault(int(p) if p.isdigit() else p, {})
        node[int(last) if last.isdigit() else last] = v
    return out


def features_apply(cfg: ClassifierConfig, method: str = "__call__"):
    """apply(params, images (B, H, W, C) uint8 or float [-1, 1]) -> dict(pool, spatial, logits),
    a pure function of the params (pure dict), to call inside other jitted code.
    method='feature_map': the last conv stage's map (B, h, w, widths[-1]) instead (REPA's
    stand-in target on small data)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Classifier(cfg, rngs=nnx.Rngs(0))))
    size = tuple(cfg.image_size) + (cfg.channels,)

    def apply(params, images):
        if tuple(images.shape[1:]) != size:
            raise ValueError(f"classifier features need images of shape (B, {', '.join(map(str, size))}), "
                             f"got {tuple(images.shape)}")
        state = jax.tree.map(lambda a: a, abstract)
        nnx.replace_by_pure_dict(state, params)
        return getattr(nnx.merge(graphdef, state), method)(to_float(images))

    return apply


def make_features_fn(cfg: ClassifierConfig, params: dict):
    """jit(images (B, H, W, C) uint8 or float [-1, 1]) -> dict(pool, spatial, logits) float32."""
    apply = jax.jit(features_apply(cfg))
    params = jax.tree.map(jnp.asarray, params)
    return lambda images: apply(params, images)
