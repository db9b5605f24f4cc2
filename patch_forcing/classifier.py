"""A small CNN classifier whose features replace Inception's on tiny 1-channel data.

Inception-v3 features mean little on 8x8 digits or 28x28 MNIST, so FID/precision/recall there
use the penultimate layer of this network, trained by our own code on `data.split_train`:

  python -m patch_forcing.classifier --config=configs/digits.py --workdir=/tmp/pf_digits
  python -m patch_forcing.classifier --config=configs/mnist.py --workdir=/tmp/pf_mnist \
      --config.data.data_dir=../shared/data/mnist

writes <workdir>/classifier/{params.npz, classifier.json} (the JSON holds the architecture,
the data splits, the seed and the test accuracy on `data.split_eval`). Training is deterministic
for a seed (one device, fixed data order and augmentation keys).

Network: per stage a 3x3 conv + ReLU, 2x2 max-pool between stages, global mean pool,
Dense(feature_dim) + ReLU = `pool` features, Dense(num_classes) = `logits`. `spatial` is the
last conv map's first SPATIAL_CHANNELS channels flattened (h, w, c), an sFID analogue
(as ADM's sFID takes 7 channels of Inception's mixed_6/conv).
`feature_network(name_or_path)` -> (name, features_fn(images) -> dict(pool, spatial, logits)).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

FORMAT = "patch_forcing.classifier/1"
PARAMS_FILE, META_FILE = "params.npz", "classifier.json"
SPATIAL_CHANNELS = 8  # spatial features: 128-d on 8x8 digits, 512-d on 32x32 MNIST
DEFAULT_STEPS = 400


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

    def __call__(self, x) -> dict:  # (B, H, W, C) float in [-1, 1]
        for i, conv in enumerate(self.convs):
            x = jax.nn.relu(conv(x))
            if (i + 1) % self.cfg.depth == 0 and i < len(self.convs) - 1:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        spatial = x[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)  # (B, h*w*16)
        pool = jax.nn.relu(self.fc(x.reshape(x.shape[0], -1)))  # (B, feature_dim)
        return dict(pool=pool, spatial=spatial, logits=self.head(pool))


def to_float(images) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1]; float images are taken as already in [-1, 1]."""
    images = jnp.asarray(images)
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 127.5 - 1.0
    return images.astype(jnp.float32)


def _split(cfg: ClassifierConfig, seed: int):
    return nnx.split(Classifier(cfg, rngs=nnx.Rngs(seed)), nnx.Param, ...)


# ----------------------------------------------------------------------------- training


def _shift(key, x, max_shift: int):
    """Random translation by up to `max_shift` pixels per example, background (-1) fills in."""
    if max_shift == 0:
        return x
    b, h, w, c = x.shape
    s = max_shift
    xp = jnp.pad(x, ((0, 0), (s, s), (s, s), (0, 0)), constant_values=-1.0)
    off = jax.random.randint(key, (b, 2), 0, 2 * s + 1)
    crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))  # noqa: E731
    return jax.vmap(crop)(xp, off)


def split_arrays(data_cfg, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A whole split as float32 images in [-1, 1] (N, H, W, C) and int32 labels (N,)."""
    from patch_forcing import data as data_lib

    _, meta = data_lib.make_source(data_cfg, split)
    n = meta["num_examples"]
    batches = list(data_lib.make_eval_batches(data_cfg, split, batch_size=min(n, 4096)))
    return (np.concatenate([b["image"] for b in batches]).astype(np.float32),
            np.concatenate([b["label"] for b in batches]).astype(np.int32))


def default_config(image_size, channels: int = 1, num_classes: int = 10) -> ClassifierConfig:
    """Two wide stages for tiny images (8x8 -> 4x4), three narrow ones for larger (32 -> 8)."""
    widths = (64, 128) if max(image_size) <= 16 else (16, 32, 64)
    return ClassifierConfig(image_size=tuple(image_size), channels=int(channels),
                            num_classes=int(num_classes), widths=widths)


def train_classifier(data_cfg, workdir: str | None = None, steps: int | None = None, seed: int = 0,
                     *, batch_size: int = 64, lr: float = 3e-3, max_shift: int | None = None,
                     cfg: ClassifierConfig | None = None, verbose: bool = True) -> dict:
    """Train on data_cfg.split_train, test on data_cfg.split_eval; save to `workdir` if given.

    Returns the metadata dict (architecture, data, seed, steps, test_accuracy, train_seconds) with
    the params under 'params' (a pure nested dict of numpy arrays).
    """
    t0 = time.time()
    x_train, y_train = split_arrays(data_cfg, data_cfg.split_train)
    x_test, y_test = split_arrays(data_cfg, data_cfg.split_eval)
    num_classes = int(data_cfg.num_classes)
    cfg = cfg or default_config(x_train.shape[1:3], x_train.shape[3], num_classes)
    steps = int(steps or DEFAULT_STEPS)
    max_shift = (1 if max(cfg.image_size) <= 8 else 2) if max_shift is None else max_shift
    graphdef, params, rest = _split(cfg, seed)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(50, steps // 4 + 1), steps, lr * 0.01)
    tx = optax.adamw(sched, weight_decay=1e-4)
    opt_state = tx.init(params)
    key = jax.random.key(seed)

    @jax.jit
    def step(params, opt_state, x, y, k):
        x = _shift(k, x, max_shift)

        def loss_fn(p):
            logits = nnx.merge(graphdef, p, rest)(x)["logits"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    order, pos = rng.permutation(len(x_train)), 0
    bs = min(batch_size, len(x_train))
    for i in range(steps):
        if pos + bs > len(order):
            order, pos = rng.permutation(len(x_train)), 0
        idx = order[pos:pos + bs]
        pos += bs
        params, opt_state, loss = step(params, opt_state, x_train[idx], y_train[idx],
                                       jax.random.fold_in(key, i))
        if verbose and (i + 1) % max(steps // 5, 1) == 0:
            print(f"classifier step {i + 1}/{steps}: loss {float(loss):.4f}", flush=True)

    params = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
    fn = make_features_fn(cfg, params)
    acc = float(np.mean(np.concatenate([
        np.argmax(np.asarray(fn(x_test[i:i + 1024])["logits"]), -1)
        for i in range(0, len(x_test), 1024)]) == y_test))
    meta = dict(format=FORMAT, config=cfg.to_dict(), data=str(data_cfg.name),
                split_train=str(data_cfg.split_train), split_eval=str(data_cfg.split_eval),
                num_train=int(len(x_train)), num_test=int(len(x_test)), steps=steps, seed=int(seed),
                batch_size=bs, lr=lr, max_shift=max_shift, test_accuracy=acc,
                train_seconds=round(time.time() - t0, 2))
    if verbose:
        print(f"classifier ({meta['data']}, {steps} steps, seed {seed}): test accuracy {acc:.4f} "
              f"on {meta['split_eval']} ({len(x_test)} images), {meta['train_seconds']} s", flush=True)
    if workdir is not None:
        save(workdir, meta, params)
    return {**meta, "params": params}


# ----------------------------------------------------------------------------- saving, loading


def _flat(params: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in params.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        out.update(_flat(v, name) if isinstance(v, dict) else {name: np.asarray(v)})
    return out


def save(directory: str, meta: dict, params: dict) -> None:
    """params.npz (flat 'convs/0/kernel' keys) + classifier.json with the weights' digest."""
    os.makedirs(directory, exist_ok=True)
    flat = _flat(params)
    meta = {**meta, "digest": _digest(flat)}
    np.savez(os.path.join(directory, PARAMS_FILE), **flat)
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)


def _digest(flat: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(flat):
        h.update(k.encode())
        h.update(np.ascontiguousarray(flat[k]).tobytes())
    return h.hexdigest()[:8]


def exists(directory: str) -> bool:
    return all(os.path.isfile(os.path.join(directory, f)) for f in (PARAMS_FILE, META_FILE))


def load(directory: str) -> tuple[dict, dict]:
    """(metadata, params pure dict) from a directory written by `save`."""
    if not exists(directory):
        raise FileNotFoundError(f"no classifier at {directory!r} (expected {PARAMS_FILE} and {META_FILE}; "
                                f"train one: python -m patch_forcing.classifier --config=... --workdir=...)")
    with open(os.path.join(directory, META_FILE)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory}/{META_FILE} has format {meta.get('format')!r}, expected {FORMAT!r}")
    cfg = ClassifierConfig.from_dict(meta["config"])
    _, abstract, _ = nnx.eval_shape(lambda: _split(cfg, 0))
    with np.load(os.path.join(directory, PARAMS_FILE)) as f:
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


def features_apply(cfg: ClassifierConfig):
    """apply(params, images (B, H, W, C) uint8 or float [-1, 1]) -> dict(pool, spatial, logits),
    a pure function of the params (pure dict), to call inside other jitted code."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Classifier(cfg, rngs=nnx.Rngs(0))))
    size = tuple(cfg.image_size) + (cfg.channels,)

    def apply(params, images):
        if tuple(images.shape[1:]) != size:
            raise ValueError(f"classifier features need images of shape (B, {', '.join(map(str, size))}), "
                             f"got {tuple(images.shape)}")
        state = jax.tree.map(lambda a: a, abstract)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state)(to_float(images))

    return apply


def make_features_fn(cfg: ClassifierConfig, params: dict):
    """jit(images (B, H, W, C) uint8 or float [-1, 1]) -> dict(pool, spatial, logits) float32."""
    apply = jax.jit(features_apply(cfg))
    params = jax.tree.map(jnp.asarray, params)
    return lambda images: apply(params, images)


def load_feature_network(name_or_path: str):
    """(name, apply(params, images), params) for 'classifier:<dir>' or a classifier directory.

    The name records what produced the features: 'classifier-<data>-<digest>'.
    """
    path = name_or_path.split(":", 1)[1] if name_or_path.startswith("classifier:") else name_or_path
    meta, params = load(path)
    cfg = ClassifierConfig.from_dict(meta["config"])
    return f"classifier-{meta['data']}-{meta['digest']}", features_apply(cfg), params


def feature_network(name_or_path: str):
    """(name, features_fn(images uint8 or [-1, 1]) -> dict(pool, spatial, logits))."""
    name, apply, params = load_feature_network(name_or_path)
    fn = jax.jit(apply)
    params = jax.tree.map(jnp.asarray, params)
    return name, lambda images: fn(params, images)


# ----------------------------------------------------------------------------- command line


def main(argv):
    del argv
    from absl import flags

    config = flags.FLAGS.config
    out = os.path.join(flags.FLAGS.workdir, "classifier")
    meta = train_classifier(config.data, out, flags.FLAGS.steps or None,
                            config.seed if flags.FLAGS.seed is None else flags.FLAGS.seed)
    print(f"wrote {out}: test accuracy {meta['test_accuracy']:.4f}")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file (a .py with get_config()).")
    flags.DEFINE_string("workdir", None, "Writes <workdir>/classifier.")
    flags.DEFINE_integer("steps", 0, f"Training steps (0: {DEFAULT_STEPS}).")
    flags.DEFINE_integer("seed", None, "Seed (default: config.seed).")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
