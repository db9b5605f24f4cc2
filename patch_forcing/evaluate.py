"""--mode=evaluate: FID, sFID, IS, precision and recall of samples from an inference checkpoint.

  python -m patch_forcing.main --mode=evaluate --config=configs/mnist.py --workdir=/tmp/pf_mnist \
      --config.data.data_dir=../shared/data/mnist --config.eval.num_samples=10000

Protocol (SPEC §8): `eval.num_samples` images with uniform random classes, sampled with
`config.sampler` from `config.sample.checkpoint` (default <workdir>/inference). Sample i takes
its noise and its label from fold_in(key(config.seed), i), and each device computes only its
slice of the global batch, so the sample set does not depend on the number of devices or hosts
(the sampler's own key, which only random_order uses, is fold_in(key, batch index): it depends
on `eval.batch_size`). Latent models decode with the SD-VAE of `config.sample.vae`. Samples are quantised like ADM's
.npz files, uint8 clip(127.5 x + 128), before the feature network:

  eval.feature_network  'inception' (the FID Inception; weights from $PF_INCEPTION_WEIGHTS or the
                        cache path, see patch_forcing.inception), 'inception:<weights.pth>',
                        'classifier:<dir>' (patch_forcing.classifier), or 'auto': the classifier
                        for 1-channel images up to 64 px (trained into <workdir>/classifier when
                        absent), Inception otherwise.
  eval.reference        a reference .npz (mu, sigma [, mu_s, sigma_s, pool, or ADM's arr_0 images
                        for precision/recall]) or 'data': statistics of config.data.split_eval
                        computed with the same network, cached in <workdir>/eval/ (pixel data
                        only: latent models need a reference of real images, e.g. ADM's
                        VIRTUAL_imagenet256_labeled.npz).

Writes <workdir>/eval/<sampler name>-<N>.json and prints one line that names the protocol.
`make_fid_hook` gives train.py the same measurement every `eval.fid_every_steps` steps.
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from patch_forcing import metrics, samplers

AUTO_MAX_SIZE = 64  # 'auto': the classifier for 1-channel images up to this size
REF_POOL = 10_000  # reference features kept for precision/recall (ADM's reference batches: 10k)
IS_SPLIT = 5_000  # ADM: 50k samples -> 10 IS splits
METRICS = ("fid", "sfid", "is", "precision", "recall")


def eval_block() -> ml_collections.ConfigDict:
    """The `eval` config block (configs/common.py: `c.eval = evaluate.eval_block()`)."""
    return ml_collections.ConfigDict(dict(
        num_samples=10_000,  # --mode=evaluate: 50k for tables, 10k for ablations (SPEC §8)
        batch_size=256,  # global sampling batch; divisible by the device count
        reference="data",  # 'data' (config.data.split_eval) or a reference-statistics .npz
        feature_network="auto",  # 'auto' | 'inception' | 'inception:<pth>' | 'classifier:<dir>'
        fid_every_steps=0,  # in-training FID every this many steps (0 = off)
        fid_num_samples=1_000,  # samples of the in-training FID
        save_samples=False,  # also write <workdir>/eval/<sampler name>-<N>.npz (ADM arr_0/arr_1)
    ))


def check_eval_config(e) -> None:
    for field, low in (("num_samples", 2), ("batch_size", 1), ("fid_every_steps", 0), ("fid_num_samples", 2)):
        v = e[field]
        if not isinstance(v, (int, np.integer)) or v < low:
            raise ValueError(f"config.eval.{field}={v!r} must be an int >= {low}")
    for field in ("reference", "feature_network"):
        if not isinstance(e[field], str) or not e[field]:
            raise ValueError(f"config.eval.{field}={e[field]!r} must be a non-empty string")


def to_uint8(x):  # (B, H, W, C) in [-1, 1] -> uint8, as pictures.to_uint8 / ADM's sample files
    return jnp.clip(127.5 * x.astype(jnp.float32) + 128.0, 0, 255).astype(jnp.uint8)


def _chief() -> bool:
    return jax.process_index() == 0


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", s).strip("_")


# ----------------------------------------------------------------------------- feature network
class FeatureNetwork(NamedTuple):
    name: str  # recorded beside every metric, e.g. 'classifier-mnist-1a2b3c4d'
    apply: Callable  # apply(params, images uint8 (B, H, W, C)) -> dict(pool, spatial, logits)
    params: Any
    channels: int | None  # input channels it needs (None: any, 1 is repeated to 3)

    def host_fn(self):
        """features_fn(images uint8 numpy) for patch_forcing.metrics (which repeats grey to RGB)."""
        fn = jax.jit(self.apply)
        c = self.channels
        return lambda images: fn(self.params, images[..., :c] if c else images)


def _inception_apply(params, images):
    from patch_forcing import inception

    if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
    return inception.features_fn(params, images)


def feature_network(config, workdir) -> FeatureNetwork:
    """The network `config.eval.feature_network` names; 'auto' may train the classifier."""
    from patch_forcing import classifier

    spec = str(config.eval.feature_network)
    if spec == "auto":
        d = config.data
        if int(d.channels) == 1 and max(tuple(d.image_size)) <= AUTO_MAX_SIZE:
            path = epath.Path(workdir) / "classifier"
            if not classifier.exists(str(path)):
                if _chief():
                    logging.info("eval.feature_network='auto': training the classifier into %s", path)
                    classifier.train_classifier(d, str(path), seed=int(config.seed))
                _sync("classifier")
            spec = f"classifier:{path}"
        else:
            spec = "inception"
    if spec == "inception" or spec.startswith("inception:"):
        from patch_forcing import inception

        try:
            params = inception.load_inception(spec.split(":", 1)[1] if ":" in spec else None)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"config.eval.feature_network={config.eval.feature_network!r} needs the "
                                    f"FID Inception weights: {e}") from None
        return FeatureNetwork(inception.network_name("adm"), _inception_apply, params, None)
    if spec.startswith("classifier:"):
        name, apply, params = classifier.load_feature_network(spec)
        meta, _ = classifier.load(spec.split(":", 1)[1])
        return FeatureNetwork(name, apply, params, int(meta["config"]["channels"]))
    raise ValueError(f"config.eval.feature_network={spec!r} is not one of ['auto', 'inception', "
                     f"'inception:<weights.pth>', 'classifier:<dir>']")


# ----------------------------------------------------------------------------- reference
def _data_batches(config, split: str, batch_size: int):
    from patch_forcing import data as data_lib

    for b in data_lib.make_eval_batches(config.data, split, batch_size=batch_size):
        yield np.asarray(to_uint8(jnp.asarray(b["image"])))


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
    bs = int(config.eval.batch_size)
    if ref == "data":
        if config.data.name == "latents":
            raise ValueError("config.eval.reference='data' needs pixel data, not data.name='latents': give a "
                             "reference .npz of real images (e.g. ADM's VIRTUAL_imagenet256_labeled.npz)")
        split = str(config.data.split_eval)
        desc = f"data:{config.data.name}:{split}"
        cache = out_dir / f"reference-{_slug(f'{config.data.name}-{split}')}-{_slug(fnet.name)}.npz"
        shape = (*tuple(config.data.image_size), int(config.data.channels))
        if not _cache_fits(cache, fnet, shape):
            if _chief():
                out_dir.mkdir(parents=True, exist_ok=True)
                stats = metrics.reference_stats_from_images(
                    _data_batches(config, split, bs), fnet.host_fn(), keep_pool=REF_POOL, network=fnet.name)
                with cache.open("wb") as f:
                    metrics.save_reference_stats(f, stats)
            _sync("reference")
        with cache.open("rb") as f:
            return metrics.load_reference_stats(f), desc
    if not epath.Path(ref).exists():
        raise FileNotFoundError(f"config.eval.reference={ref!r}: no such file (use 'data' or a reference .npz)")
    stats = metrics.load_reference_stats(ref)
    if "network" in stats and str(stats["network"]) != fnet.name:
        raise ValueError(f"config.eval.reference={ref!r} holds statistics of {stats['network']!r}, "
                         f"not of config.eval.feature_network's {fnet.name!r}")
    if "pool" not in stats:
        with np.load(ref) as f:
            has_images = "arr_0" in f.files
        if has_images:  # ADM's reference batches: features of their 10k images for precision/recall
            cache = out_dir / f"reference-{_slug(epath.Path(ref).stem)}-{_slug(fnet.name)}-pool.npz"
            if not cache.exists():
                if _chief():
                    out_dir.mkdir(parents=True, exist_ok=True)
                    feats = metrics.extract_features(metrics.iter_npz_batches(ref, bs), fnet.host_fn())
                    with cache.open("wb") as f:
                        np.savez(f, pool=feats["pool"][:REF_POOL])
                _sync("reference_pool")
            with cache.open("rb") as f, np.load(f) as z:
                stats["pool"] = z["pool"]
        else:
            logging.warning("%s has no reference features or images: no precision/recall", ref)
    return stats, f"npz:{ref}"


# ----------------------------------------------------------------------------- sampling
def load_decoder(config):
    """(decode(vae_params, z) -> pixels in [-1, 1], vae_params) with the SD-VAE of
    `config.sample.vae` (a local file/folder or a hub repo id), or (None, None) for pixel models."""
    spec = str(config.sample.get("vae", "") or "")
    if not spec:
        return None, None
    from patch_forcing import vae as vae_lib

    return vae_lib.load_decoder(spec)


def make_generator(apply_fn, scfg, fnet: FeatureNetwork, image_shape, num_classes: int, seed: int,
                   decode=None):
    """jit(gen(params, aux, idx (B,) global sample indices, batch) -> (images uint8, labels,
    features dict, nfe)), aux = {'features': feature params, 'vae': decoder params or None}.
    Noise and label of sample i come from fold_in(key(seed), i)."""
    base = jax.random.key(seed)
    k_noise, k_label, k_sampler = (jax.random.fold_in(base, i) for i in (1, 2, 3))

    def gen(params, aux, idx, batch):
        noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(k_noise, i), tuple(image_shape)))(idx)
        labels = jax.vmap(lambda i: jax.random.randint(jax.random.fold_in(k_label, i), (), 0, num_classes))(idx)
        model_fn = lambda x, t, y: apply_fn(params, x, t, y)  # noqa: E731
        x, info = samplers.sample(model_fn, noise, labels, jax.random.fold_in(k_sampler, batch), scfg)
        if decode is not None:
            x = decode(aux["vae"], x)
        images = to_uint8(x)
        return images, labels, fnet.apply(aux["features"], images), info["nfe"]

    return jax.jit(gen)


def _host(tree):
    def get(x):
        if x.is_fully_addressable:
            return np.asarray(x)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)


def global_batch_size(requested: int, num: int, num_devices: int) -> int:
    if requested % num_devices:
        raise ValueError(f"config.eval.batch_size={requested} must be divisible by the {num_devices} devices")
    return min(requested, math.ceil(num / num_devices) * num_devices)


def sample_features(gen, params, aux: dict, num: int, batch_size: int, mesh: Mesh, *,
                    keep_images: bool = False, desc: str | None = None) -> dict:
    """Draw samples 0..num-1 over `mesh` (batch over all its axes): dict(pool (N, D), logits
    (N, K), spatial (Moments), nfe, and images/labels with keep_images)."""
    bs = global_batch_size(batch_size, num, mesh.size)
    sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    aux = jax.device_put(aux, NamedSharding(mesh, P()))  # no copy when already replicated there
    out: dict = {"pool": [], "logits": [], "images": [], "labels": [], "spatial": metrics.moments_init()}

    def collect(res, keep):
        images, labels, feats, nfe = _host(res)
        out["pool"].append(feats["pool"][:keep])
        out["logits"].append(feats["logits"][:keep])
        if "spatial" in feats:
            out["spatial"] = metrics.moments_update(out["spatial"], feats["spatial"][:keep])
        if keep_images:
            out["images"].append(images[:keep])
            out["labels"].append(labels[:keep])
        out["nfe"] = int(nfe)

    pending = None
    num_batches = math.ceil(num / bs)
    for b in tqdm(range(num_batches), desc=desc, unit="batch", disable=desc is None or not _chief()):
        idx = jax.make_array_from_callback(
            (bs,), sharding, lambda s, b=b: np.arange(b * bs, (b + 1) * bs, dtype=np.int32)[s])
        res = gen(params, aux, idx, b)  # dispatched; the previous batch is fetched meanwhile
        if pending is not None:
            collect(*pending)
        pending = (res, min(bs, num - b * bs))
    collect(*pending)
    result = {k: np.concatenate(out[k]) for k in ("pool", "logits")}
    result.update(spatial=out["spatial"] if out["spatial"].count else None, nfe=out["nfe"])
    if keep_images:
        result.update(images=np.concatenate(out["images"]), labels=np.concatenate(out["labels"]))
    return result


def image_features(fnet: FeatureNetwork, batches) -> dict:
    """The same dict as `sample_features` for host images (an iterable of uint8 batches)."""
    f = metrics.extract_features(batches, fnet.host_fn())
    spatial = metrics.moments_update(metrics.moments_init(), f["spatial"]) if "spatial" in f else None
    return dict(pool=f["pool"], logits=f["logits"], spatial=spatial)


def score(feats: dict, ref: dict, network: str) -> dict:
    """fid, sfid, is, precision, recall of features against reference statistics."""
    out = metrics.compute_metrics({"pool": feats["pool"], "logits": feats["logits"]}, ref, network=network,
                                  split_size=IS_SPLIT)
    if feats.get("spatial") is not None and "mu_s" in ref:
        out["sfid"] = metrics.frechet_distance(*metrics.moments_result(feats["spatial"]), ref["mu_s"],
                                               ref["sigma_s"])
    return out


# ----------------------------------------------------------------------------- --mode=evaluate
def _num(v, fmt):
    return "n/a" if v is None else format(v, fmt)


def summary_line(r: dict) -> str:
    p = r["protocol"]
    return (f"FID {_num(r.get('fid'), '.3f')}  sFID {_num(r.get('sfid'), '.3f')}  IS {_num(r.get('is'), '.2f')}  "
            f"precision {_num(r.get('precision'), '.3f')}  recall {_num(r.get('recall'), '.3f')} | sampler "
            f"{p['sampler']} ({p['steps']} steps, NFE {p['nfe']}, CFG {p['cfg_scale']}), N={p['num_samples']} "
            f"uniform classes (seed {p['seed']}), features {p['feature_network']}, reference {p['reference']} "
            f"({p['reference_count']} images)")


def evaluate(config, workdir: str, *, devices=None) -> dict:
    """Sample, score and write <workdir>/eval/<sampler name>-<N>.json; returns the record."""
    from patch_forcing import config_lib
    from patch_forcing import sample as sample_lib

    t0 = time.time()
    e = config.eval
    check_eval_config(e)
    workdir = epath.Path(workdir)
    ckpt = epath.Path(config.sample.checkpoint) if config.sample.checkpoint else workdir / "inference"
    mcfg, apply_fn, params = sample_lib.load_model(ckpt)
    ckpt_meta = json.loads((ckpt / "config.json").read_text())
    scfg = config_lib.sampler_config(config, mcfg)
    name = samplers.sampler_name(scfg)
    fnet = feature_network(config, workdir)
    ref, ref_desc = reference_stats(config, workdir, fnet)
    t_ref = time.time()

    mesh = Mesh(np.asarray(jax.devices() if devices is None else devices), ("data",))
    params = jax.device_put(params, NamedSharding(mesh, P()))
    n = int(e.num_samples)
    decode, vparams = load_decoder(config)
    gen = make_generator(apply_fn, scfg, fnet, (*mcfg.image_size, mcfg.in_channels), mcfg.num_classes,
                         int(config.seed), decode)
    feats = sample_features(gen, params, {"features": fnet.params, "vae": vparams}, n, int(e.batch_size), mesh,
                            keep_images=bool(e.save_samples), desc=f"evaluate {name}")
    t_sample = time.time()
    result = {k: v for k, v in score(feats, ref, fnet.name).items() if k in METRICS}
    out_dir = workdir / "eval"
    record = {
        **result,
        "protocol": dict(
            sampler=name, sampler_config={k: v for k, v in config.sampler.to_dict().items()},
            steps=int(scfg.steps), nfe=feats["nfe"], expected_nfe=samplers.expected_nfe(scfg),
            cfg_scale=float(scfg.cfg_scale), num_samples=n, classes="uniform", seed=int(config.seed),
            batch_size=global_batch_size(int(e.batch_size), n, mesh.size), feature_network=fnet.name,
            reference=ref_desc, reference_count=int(ref.get("count", -1)),
            reference_pool=int(len(ref["pool"])) if "pool" in ref else 0,
            decoder=str(config.sample.get("vae", "") or "") or None,
            checkpoint=str(ckpt), checkpoint_step=ckpt_meta.get("step"), model=ckpt_meta.get("model"),
            quantization="uint8 clip(127.5 x + 128)", is_split=IS_SPLIT, devices=mesh.size,
            processes=jax.process_count()),
        "seconds": dict(setup_and_reference=round(t_ref - t0, 2), sampling_and_features=round(t_sample - t_ref, 2),
                        metrics=round(time.time() - t_sample, 2)),
    }
    line = summary_line(record)
    if _chief():
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{name}-{n}.json"
        path.write_text(json.dumps(record, indent=2, default=str))
        if e.save_samples:
            with (out_dir / f"{name}-{n}.npz").open("wb") as f:
                metrics.save_samples_npz(f, feats["images"], feats["labels"])
        logging.info("%s -> %s", line, path)
        print(f"{line} -> {path}", flush=True)
    return record


# ----------------------------------------------------------------------------- in-training FID
def _count_tag(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def make_fid_hook(config, workdir, apply_fn, mesh: Mesh | None = None):
    """fn(step, ema_params) -> {'fid_1k', 'sfid_1k', 'is_1k', 'precision_1k', 'recall_1k'} (for
    eval.fid_num_samples = 1000): the --mode=evaluate measurement on the training EMA params,
    with the same fixed noise and labels at every call. Call it on every process."""
    from patch_forcing import config_lib

    e = config.eval
    check_eval_config(e)
    mcfg = config_lib.model_config(config)
    scfg = config_lib.sampler_config(config, mcfg)
    fnet = feature_network(config, workdir)
    ref, _ = reference_stats(config, workdir, fnet)
    n, tag = int(e.fid_num_samples), _count_tag(int(e.fid_num_samples))
    decode, vparams = load_decoder(config)
    gen = make_generator(apply_fn, scfg, fnet, (*mcfg.image_size, mcfg.in_channels), mcfg.num_classes,
                         int(config.seed), decode)
    aux = {"features": fnet.params, "vae": vparams}

    def hook(step, ema_params):
        nonlocal aux
        m = mesh
        if m is None:
            sh = jax.tree.leaves(ema_params)[0].sharding
            m = sh.mesh if isinstance(sh, NamedSharding) else Mesh(np.asarray(jax.devices()), ("data",))
        t = time.time()
        aux = jax.device_put(aux, NamedSharding(m, P()))  # placed once, reused by later calls
        r = score(sample_features(gen, ema_params, aux, n, int(e.batch_size), m), ref, fnet.name)
        logging.info("step %d: FID-%s %.3f (%.1f s)", step, tag, r["fid"], time.time() - t)
        return {f"{k}_{tag}": float(r[k]) for k in METRICS if k in r}

    return hook
