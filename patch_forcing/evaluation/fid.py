"""--mode=evaluate and the in-training FID: sample from an inference checkpoint over all devices,
quantise like ADM's .npz files (uint8 clip(127.5 x + 128)), extract features, score.

  python -m patch_forcing.main --mode=evaluate --config=configs/mnist.py --workdir=/tmp/pf_mnist \
      --config.data.data_dir=/path/to/mnist --config.eval.num_samples=10000

What a reader must know: sample i takes its noise and label from fold_in(key(config.seed), i) and
each device computes only its slice of the global batch, so the sample set does not depend on the
number of devices or hosts. Writes <workdir>/eval/<sampler name>-<N>.json and prints one line
that names the protocol (sampler, NFE, N, feature network, reference).
"""

from __future__ import annotations

import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from patch_forcing import UserError, checkpoint, config_lib, pictures, sharding
from patch_forcing.evaluation import features, metrics, reference
from patch_forcing.evaluation.features import FeatureNetwork
from patch_forcing.flow import samplers
from patch_forcing.models import vae

IS_SPLIT = 5_000  # ADM: 50k samples -> 10 IS splits
METRICS = ("fid", "sfid", "is", "precision", "recall")


# ----------------------------------------------------------------------------- sampling
def _decoder(config):
    """(decode(vae_params, z), vae_params) for latent models (config.sample.vae), else (None, None)."""
    spec = str(config.sample.get("vae", "") or "")
    return vae.load_decoder(spec) if spec else (None, None)


def make_generator(apply_fn, scfg, fnet: FeatureNetwork, image_shape, num_classes: int, seed: int,
                   decode=None):
    """gen(params, aux, idx (B,) global sample indices, batch) -> (images uint8, labels, features
    dict, nfe), jitted; aux = {'features': feature params, 'vae': decoder params or None}.
    Noise and label of sample i come from fold_in(key(seed), i). The keys are arguments of the
    compiled program, not constants in it, so other seeds reuse it (persistent compile cache)."""
    base = jax.random.key(seed)
    keys = np.asarray(jax.random.key_data(jnp.stack([jax.random.fold_in(base, i) for i in (1, 2, 3)])))

    @jax.jit
    def gen_with_keys(params, aux, idx, batch, keys):
        k_noise, k_label, k_sampler = jax.random.wrap_key_data(keys)
        noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(k_noise, i), tuple(image_shape)))(idx)
        labels = jax.vmap(lambda i: jax.random.randint(jax.random.fold_in(k_label, i), (), 0, num_classes))(idx)
        model_fn = lambda x, t, y: apply_fn(params, x, t, y)  # noqa: E731
        x, info = samplers.sample(model_fn, noise, labels, jax.random.fold_in(k_sampler, batch), scfg)
        if decode is not None:
            x = decode(aux["vae"], x)
        images = pictures.to_uint8(x)
        return images, labels, fnet.apply(aux["features"], images), info["nfe"]

    return lambda params, aux, idx, batch: gen_with_keys(params, aux, idx, batch, keys)


def global_batch_size(requested: int, num: int, num_devices: int) -> int:
    if requested % num_devices:
        raise UserError(f"config.eval.batch_size={requested} must be divisible by the {num_devices} devices")
    return min(requested, math.ceil(num / num_devices) * num_devices)


def sample_features(gen, params, aux: dict, num: int, batch_size: int, mesh: Mesh, *,
                    keep_images: bool = False, desc: str | None = None) -> dict:
    """Draw samples 0..num-1 over `mesh` (batch over all its axes): dict(pool (N, D), logits
    (N, K), spatial (Moments), nfe, and images/labels with keep_images)."""
    bs = global_batch_size(batch_size, num, mesh.size)
    split = NamedSharding(mesh, P(tuple(mesh.axis_names)))  # the batch over every mesh axis
    aux = sharding.replicate(aux, mesh)
    out: dict = {"pool": [], "logits": [], "images": [], "labels": [], "spatial": metrics.moments_init()}

    def collect(res, keep):
        images, labels, feats, nfe = sharding.to_host(res)
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
    for b in tqdm(range(num_batches), desc=desc, unit="batch", disable=desc is None or not sharding.is_chief()):
        idx = jax.make_array_from_callback(
            (bs,), split, lambda s, b=b: np.arange(b * bs, (b + 1) * bs, dtype=np.int32)[s])
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
    t0 = time.time()
    config_lib.check_eval(config.eval)
    e, workdir = config.eval, epath.Path(workdir)
    ckpt = config_lib.inference_dir(config, workdir)
    mcfg, apply_fn, params, ckpt_meta = checkpoint.load_model(ckpt)
    scfg = config_lib.sampler_config(config, mcfg)
    fnet = features.feature_network(config, workdir)
    ref, ref_desc = reference.reference_stats(config, workdir, fnet)
    t_ref = time.time()

    mesh = sharding.flat_mesh(devices)
    params = sharding.replicate(params, mesh)
    decode, vparams = _decoder(config)
    gen = make_generator(apply_fn, scfg, fnet, (*mcfg.image_size, mcfg.in_channels), mcfg.num_classes,
                         int(config.seed), decode)
    feats = sample_features(gen, params, {"features": fnet.params, "vae": vparams}, int(e.num_samples),
                            int(e.batch_size), mesh, keep_images=bool(e.save_samples),
                            desc=f"evaluate {samplers.sampler_name(scfg)}")
    t_sample = time.time()
    record = {
        **{k: v for k, v in score(feats, ref, fnet.name).items() if k in METRICS},
        "protocol": dict(**_protocol(config, scfg, feats["nfe"], mesh), feature_network=fnet.name,
                         reference=ref_desc, reference_count=int(ref.get("count", -1)),
                         reference_pool=int(len(ref["pool"])) if "pool" in ref else 0,
                         checkpoint=str(ckpt), checkpoint_step=ckpt_meta.get("step"), model=ckpt_meta.get("model")),
        "seconds": dict(setup_and_reference=round(t_ref - t0, 2), sampling_and_features=round(t_sample - t_ref, 2),
                        metrics=round(time.time() - t_sample, 2)),
    }
    if sharding.is_chief():
        _write(record, workdir / "eval", feats if e.save_samples else None)
    return record


def _protocol(config, scfg, nfe: int, mesh: Mesh) -> dict:
    n = int(config.eval.num_samples)
    return dict(
        sampler=samplers.sampler_name(scfg), sampler_config=config.sampler.to_dict(), steps=int(scfg.steps),
        nfe=nfe, expected_nfe=samplers.expected_nfe(scfg), cfg_scale=float(scfg.cfg_scale), num_samples=n,
        classes="uniform", seed=int(config.seed), batch_size=global_batch_size(int(config.eval.batch_size), n,
                                                                              mesh.size),
        decoder=str(config.sample.get("vae", "") or "") or None, quantization="uint8 clip(127.5 x + 128)",
        is_split=IS_SPLIT, devices=mesh.size, processes=jax.process_count())


def _write(record: dict, out_dir, feats: dict | None) -> None:
    """<out_dir>/<sampler>-<N>.json (and .npz of the samples when kept), plus the summary line."""
    p = record["protocol"]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{p['sampler']}-{p['num_samples']}.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    if feats is not None:
        with (out_dir / f"{p['sampler']}-{p['num_samples']}.npz").open("wb") as f:
            metrics.save_samples_npz(f, feats["images"], feats["labels"])
    line = summary_line(record)
    logging.info("%s -> %s", line, path)
    print(f"{line} -> {path}", flush=True)


# ----------------------------------------------------------------------------- in-training FID
def _count_tag(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def make_fid_hook(config, workdir, apply_fn, mesh: Mesh | None = None):
    """fn(step, ema_params) -> {'fid_1k', 'sfid_1k', 'is_1k', 'precision_1k', 'recall_1k'} (for
    eval.fid_num_samples = 1000): the --mode=evaluate measurement on the training EMA params,
    with the same fixed noise and labels at every call. Call it on every process."""
    e = config.eval
    mcfg = config_lib.model_config(config)
    scfg = config_lib.sampler_config(config, mcfg)
    fnet = features.feature_network(config, workdir)
    ref, _ = reference.reference_stats(config, workdir, fnet)
    n, tag = int(e.fid_num_samples), _count_tag(int(e.fid_num_samples))
    decode, vparams = _decoder(config)
    gen = make_generator(apply_fn, scfg, fnet, (*mcfg.image_size, mcfg.in_channels), mcfg.num_classes,
                         int(config.seed), decode)
    aux = {"features": fnet.params, "vae": vparams}

    def hook(step, ema_params):
        nonlocal aux
        m = mesh
        if m is None:
            sh = jax.tree.leaves(ema_params)[0].sharding
            m = sh.mesh if isinstance(sh, NamedSharding) else sharding.flat_mesh()
        t = time.time()
        aux = sharding.replicate(aux, m)  # placed once, reused by later calls
        r = score(sample_features(gen, ema_params, aux, n, int(e.batch_size), m), ref, fnet.name)
        logging.info("step %d: FID-%s %.3f (%.1f s)", step, tag, r["fid"], time.time() - t)
        return {f"{k}_{tag}": float(r[k]) for k in METRICS if k in r}

    return hook
