"""Feature networks for FID, sFID, IS and precision/recall, chosen by `config.eval.feature_network`:

  'inception'           the FID Inception-v3 (weights: $PF_INCEPTION_WEIGHTS or models.inception's
                        cache path), 'inception:<weights.pth>' names the file;
  'classifier:<dir>'    the small classifier of models/classifier.py (1-channel digits, MNIST);
  'auto'                that classifier for 1-channel images up to 64 px, trained here into
                        <workdir>/classifier when absent (deterministic for a seed); else Inception.
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx

from patch_forcing import UserError, sharding
from patch_forcing.data import pipeline
from patch_forcing.models import classifier, inception

AUTO_MAX_SIZE = 64  # 'auto': the classifier for 1-channel images up to this size
DEFAULT_STEPS = 400  # classifier training steps
SPECS = "['auto', 'inception', 'inception:<weights.pth>', 'classifier:<dir>']"


class FeatureNetwork(NamedTuple):
    name: str  # recorded beside every metric, e.g. 'classifier-mnist-1a2b3c4d'
    apply: Callable  # apply(params, images uint8 (B, H, W, C)) -> dict(pool, spatial, logits)
    params: Any
    channels: int | None  # input channels it needs (None: any, 1 is repeated to 3)

    def host_fn(self):
        """features_fn(images uint8 numpy) for evaluation.metrics (which repeats grey to RGB)."""
        fn = jax.jit(self.apply)
        c = self.channels
        return lambda images: fn(self.params, images[..., :c] if c else images)


def _inception_apply(params, images):
    if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
    return inception.features_fn(params, images)


def load_classifier(path: str) -> FeatureNetwork:
    """The classifier saved in `path` as a FeatureNetwork named 'classifier-<data>-<digest>'."""
    meta, params = classifier.load(path)
    cfg = classifier.ClassifierConfig.from_dict(meta["config"])
    return FeatureNetwork(f"classifier-{meta['data']}-{meta['digest']}", classifier.features_apply(cfg),
                          jax.tree.map(jnp.asarray, params), cfg.channels)


def feature_network(config, workdir) -> FeatureNetwork:
    """The network `config.eval.feature_network` names; 'auto' may train the classifier."""
    spec = str(config.eval.feature_network)
    if spec == "auto":
        spec = _auto(config, workdir)
    if spec == "inception" or spec.startswith("inception:"):
        try:
            params = inception.load_inception(spec.split(":", 1)[1] if ":" in spec else None)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"config.eval.feature_network={config.eval.feature_network!r} needs the "
                                    f"FID Inception weights: {e}") from None
        return FeatureNetwork(inception.network_name("adm"), _inception_apply, params, None)
    if spec.startswith("classifier:"):
        return load_classifier(spec.split(":", 1)[1])
    raise UserError(f"config.eval.feature_network={spec!r} is not one of {SPECS}")


def _auto(config, workdir) -> str:
    d = config.data
    if int(d.channels) != 1 or max(tuple(d.image_size)) > AUTO_MAX_SIZE:
        return "inception"
    path = epath.Path(workdir) / "classifier"
    if sharding.is_chief() and not classifier.exists(str(path)):  # the others wait at the sync
        logging.info("eval.feature_network='auto': training the classifier into %s", path)
        train_classifier(d, str(path), seed=int(config.seed))
    sharding.sync("classifier")  # on every process, whether or not the classifier was there
    return f"classifier:{path}"


# ----------------------------------------------------------------------------- the classifier


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
    _, meta = pipeline.make_source(data_cfg, split)
    n = meta["num_examples"]
    batches = list(pipeline.make_eval_batches(data_cfg, split, batch_size=min(n, 4096)))
    return (np.concatenate([b["image"] for b in batches]).astype(np.float32),
            np.concatenate([b["label"] for b in batches]).astype(np.int32))


def _fit(cfg, x_train, y_train, steps: int, seed: int, batch_size: int, lr: float, max_shift: int,
         verbose: bool) -> dict:
    """AdamW (warm-up + cosine) on random-shifted batches in a seeded order -> params (numpy)."""
    graphdef, params, rest = classifier.init(cfg, seed)
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
    for i in range(steps):
        if pos + batch_size > len(order):
            order, pos = rng.permutation(len(x_train)), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        params, opt_state, loss = step(params, opt_state, x_train[idx], y_train[idx],
                                       jax.random.fold_in(key, i))
        if verbose and (i + 1) % max(steps // 5, 1) == 0:
            print(f"classifier step {i + 1}/{steps}: loss {float(loss):.4f}", flush=True)
    return jax.tree.map(np.asarray, nnx.to_pure_dict(params))


def _accuracy(cfg, params, x, y) -> float:
    fn = classifier.make_features_fn(cfg, params)
    pred = [np.argmax(np.asarray(fn(x[i:i + 1024])["logits"]), -1) for i in range(0, len(x), 1024)]
    return float(np.mean(np.concatenate(pred) == y))


def train_classifier(data_cfg, workdir: str | None = None, steps: int | None = None, seed: int = 0,
                     *, batch_size: int = 64, lr: float = 3e-3, max_shift: int | None = None,
                     cfg: classifier.ClassifierConfig | None = None, verbose: bool = True) -> dict:
    """Train on data_cfg.split_train, test on data_cfg.split_eval; save to `workdir` if given.

    Returns the metadata dict (architecture, data, seed, steps, test_accuracy, train_seconds) with
    the params under 'params' (a pure nested dict of numpy arrays).
    """
    t0 = time.time()
    x_train, y_train = split_arrays(data_cfg, data_cfg.split_train)
    x_test, y_test = split_arrays(data_cfg, data_cfg.split_eval)
    cfg = cfg or classifier.default_config(x_train.shape[1:3], x_train.shape[3], int(data_cfg.num_classes))
    steps = int(steps or DEFAULT_STEPS)
    max_shift = (1 if max(cfg.image_size) <= 8 else 2) if max_shift is None else max_shift
    bs = min(batch_size, len(x_train))
    params = _fit(cfg, x_train, y_train, steps, seed, bs, lr, max_shift, verbose)
    acc = _accuracy(cfg, params, x_test, y_test)
    meta = dict(format=classifier.FORMAT, config=cfg.to_dict(), data=str(data_cfg.name),
                split_train=str(data_cfg.split_train), split_eval=str(data_cfg.split_eval),
                num_train=int(len(x_train)), num_test=int(len(x_test)), steps=steps, seed=int(seed),
                batch_size=bs, lr=lr, max_shift=max_shift, test_accuracy=acc,
                train_seconds=round(time.time() - t0, 2))
    if verbose:
        print(f"classifier ({meta['data']}, {steps} steps, seed {seed}): test accuracy {acc:.4f} "
              f"on {meta['split_eval']} ({len(x_test)} images), {meta['train_seconds']} s", flush=True)
    if workdir is not None:
        classifier.save(workdir, meta, params)
    return {**meta, "params": params}
