"""--mode=evaluate: JSON and protocol, device-count independence, pipeline sanity, FID hook, errors."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from configs import common, digits
from patch_forcing import checkpoint as ckpt_lib
from patch_forcing import config_lib, sharding
from patch_forcing.evaluation import features, fid, metrics, reference
from patch_forcing.flow import samplers
from patch_forcing.models import classifier, dit


def _config(**eval_overrides):
    c = digits.get_config("smoke")
    if "eval" not in c:
        c.eval = common.eval_block()
    c.eval.num_samples, c.eval.batch_size = 48, 16
    for k, v in eval_overrides.items():
        c.eval[k] = v
    return c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A random tiny DiT as inference checkpoint and a quickly trained classifier, where 'auto'
    looks for it (<workdir>/classifier)."""
    wd = tmp_path_factory.mktemp("eval")
    c = _config()
    mcfg = config_lib.model_config(c)
    params = nnx.to_pure_dict(nnx.state(dit.DiT(mcfg, rngs=nnx.Rngs(0)), nnx.Param))
    ckpt_lib.save_inference(wd / "inference", mcfg.to_dict(), params, extra={"step": 7})
    features.train_classifier(c.data, str(wd / "classifier"), steps=40, seed=0, verbose=False)
    return wd


def test_evaluate_writes_json_with_metrics_and_protocol(workdir, capsys):
    c = _config()
    record = fid.evaluate(c, str(workdir))
    name = samplers.sampler_name(config_lib.sampler_config(c))
    saved = json.loads((workdir / "eval" / f"{name}-48.json").read_text())
    for k in ("fid", "sfid", "is", "precision", "recall"):
        assert np.isfinite(saved[k]) and saved[k] == pytest.approx(record[k])
    assert saved["fid"] > 0 and 1.0 <= saved["is"] <= 10.0 and 0 <= saved["precision"] <= 1
    p = saved["protocol"]
    assert p["sampler"] == name and p["steps"] == 4 and p["nfe"] == p["expected_nfe"] == 4
    assert p["cfg_scale"] == 1.0 and p["num_samples"] == 48 and p["classes"] == "uniform"
    meta, _ = classifier.load(str(workdir / "classifier"))
    assert p["feature_network"] == f"classifier-digits-{meta['digest']}"  # 'auto' found it
    assert p["reference"] == "data:digits:test" and p["reference_count"] == 297
    assert p["checkpoint_step"] == 7 and p["devices"] == 8
    line = capsys.readouterr().out.strip().splitlines()[-1]
    for needle in (f"sampler {name}", "4 steps", "NFE 4", "CFG 1.0", "N=48", p["feature_network"],
                   "reference data:digits:test (297 images)", f"FID {saved['fid']:.3f}"):
        assert needle in line


def test_sharded_over_8_devices_equals_one_device(workdir):
    c = _config(save_samples=True)
    c.sampler.name, c.sampler.steps, c.sampler.n_inner = "random_order", 2, 2  # uses the sampler key
    r8 = fid.evaluate(c, str(workdir))
    name = samplers.sampler_name(config_lib.sampler_config(c))
    s8 = metrics.load_samples_npz(workdir / "eval" / f"{name}-48.npz")
    r1 = fid.evaluate(c, str(workdir), devices=jax.devices()[:1])
    s1 = metrics.load_samples_npz(workdir / "eval" / f"{name}-48.npz")
    assert r8["protocol"]["devices"] == 8 and r1["protocol"]["devices"] == 1
    assert r1["protocol"]["nfe"] == 4
    assert np.abs(s8.astype(int) - s1.astype(int)).max() <= 1 and np.mean(s8 != s1) < 1e-3
    for k in ("fid", "sfid", "is", "precision", "recall"):
        assert r8[k] == pytest.approx(r1[k], rel=1e-4, abs=1e-6), k
    with np.load(workdir / "eval" / f"{name}-48.npz") as f:
        labels = f["arr_1"]
    assert labels.shape == (48,) and labels.min() >= 0 and labels.max() < 10 and len(set(labels)) >= 6


def test_real_data_against_itself_is_zero_and_noise_is_far(workdir):
    c = _config()
    fnet = features.feature_network(c, str(workdir))
    ref, _ = reference.reference_stats(c, str(workdir), fnet)
    real = fid.score(fid.image_features(fnet, reference._data_batches(c, "test", 64)), ref, fnet.name)
    assert abs(real["fid"]) < 1e-6 and abs(real["sfid"]) < 1e-4  # rank-deficient 256-d sFID: eigh noise
    assert real["precision"] == 1.0 and real["recall"] == 1.0
    train = fid.score(fid.image_features(fnet, reference._data_batches(c, "train[:300]", 64)),
                           ref, fnet.name)
    noise_images = np.random.default_rng(0).integers(0, 256, (297, 8, 8, 1), dtype=np.uint8)
    noise = fid.score(fid.image_features(fnet, [noise_images]), ref, fnet.name)
    assert 1e-3 < train["fid"] < noise["fid"] / 10 and noise["precision"] < 0.1
    # The FID computed here equals an independent float64 numpy Frechet distance.
    feats = fid.image_features(fnet, [noise_images])["pool"].astype(np.float64)
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvals(sigma @ ref["sigma"]).real, 0, None)).sum()
    want = np.sum((mu - ref["mu"]) ** 2) + np.trace(sigma + ref["sigma"]) - 2 * tr_covmean
    assert noise["fid"] == pytest.approx(want, rel=1e-4)


def test_reference_npz_path_matches_data_and_checks_network(workdir, tmp_path):
    c = _config()
    fnet = features.feature_network(c, str(workdir))
    ref, _ = reference.reference_stats(c, str(workdir), fnet)
    path = tmp_path / "ref.npz"
    metrics.save_reference_stats(path, ref)
    got, desc = reference.reference_stats(_config(reference=str(path)), str(workdir), fnet)
    assert desc == f"npz:{path}"
    for k in ("mu", "sigma", "mu_s", "sigma_s", "pool"):
        np.testing.assert_array_equal(got[k], ref[k])
    metrics.save_reference_stats(path, {**ref, "network": "inception-2015-12-05/adm"})
    with pytest.raises(ValueError, match="holds statistics of 'inception-2015-12-05/adm'"):
        reference.reference_stats(_config(reference=str(path)), str(workdir), fnet)


def test_fid_hook_on_train_mesh_equals_evaluate(workdir):
    c = _config(fid_num_samples=32)
    mcfg, apply_fn, params, _ = ckpt_lib.load_model(workdir / "inference")
    mesh = sharding.make_mesh(c.mesh)  # the training mesh, ('data', 'fsdp')
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    hook = fid.make_fid_hook(c, str(workdir), apply_fn)
    with jax.set_mesh(mesh):
        out = hook(100, params)
    assert set(out) == {"fid_32", "sfid_32", "is_32", "precision_32", "recall_32"}
    ref = fid.evaluate(_config(num_samples=32), str(workdir))
    assert out["fid_32"] == pytest.approx(ref["fid"], rel=1e-4)
    assert out["recall_32"] == pytest.approx(ref["recall"], abs=1e-6)


def test_bad_config_names_the_field(workdir, monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"config.eval.feature_network='foo' is not one of"):
        features.feature_network(_config(feature_network="foo"), str(workdir))
    monkeypatch.setenv("PF_INCEPTION_WEIGHTS", str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="config.eval.feature_network='inception' needs the FID"):
        features.feature_network(_config(feature_network="inception"), str(workdir))
    rgb = _config()  # 'auto' for 3-channel data is Inception
    rgb.data.channels = 3
    with pytest.raises(FileNotFoundError, match="config.eval.feature_network='auto' needs the FID"):
        features.feature_network(rgb, str(workdir))
    with pytest.raises(ValueError, match="config.eval.num_samples=1 must be an int >= 2"):
        config_lib.check_eval(_config(num_samples=1).eval)
    with pytest.raises(ValueError, match="config.eval.batch_size=12 must be divisible by the 8 devices"):
        fid.global_batch_size(12, 100, 8)
    assert fid.global_batch_size(64, 20, 8) == 24
    with pytest.raises(FileNotFoundError, match="config.eval.reference="):
        fnet = features.feature_network(_config(), str(workdir))
        reference.reference_stats(_config(reference=str(tmp_path / "nope.npz")), str(workdir), fnet)


@pytest.mark.slow
def test_latent_model_decodes_with_the_vae_before_features(tmp_path):
    """A 4x4x4 latent DiT + tiny VAE (x2) -> 8x8x3 pixels -> a 3-channel classifier's features."""
    from patch_forcing.models import vae as vae_lib

    c = _config(num_samples=16, save_samples=True)
    c.model = common.model_block("PF-Tiny/2", image_size=4, in_channels=4, num_classes=10, hidden_size=32,
                                 depth=1, num_heads=2)
    vae_lib.save_vae(vae_lib.AutoencoderKL(vae_lib.tiny_config(), rngs=nnx.Rngs(0)), str(tmp_path / "vae"))
    c.sample.vae = str(tmp_path / "vae")
    mcfg = config_lib.model_config(c)
    params = nnx.to_pure_dict(nnx.state(dit.DiT(mcfg, rngs=nnx.Rngs(1)), nnx.Param))
    ckpt_lib.save_inference(tmp_path / "inference", mcfg.to_dict(), params)
    ccfg = classifier.ClassifierConfig(image_size=(8, 8), channels=3, widths=(8, 16), feature_dim=16)
    cparams = nnx.to_pure_dict(nnx.state(classifier.Classifier(ccfg, rngs=nnx.Rngs(0)), nnx.Param))
    classifier.save(str(tmp_path / "cls"), {"format": classifier.FORMAT, "config": ccfg.to_dict(), "data": "rgb"},
                    cparams)
    c.eval.feature_network = f"classifier:{tmp_path / 'cls'}"
    fnet = features.feature_network(c, str(tmp_path))
    rgb = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    metrics.save_reference_stats(tmp_path / "ref.npz", metrics.reference_stats_from_images(
        [rgb], fnet.host_fn(), keep_pool=64, network=fnet.name))
    c.eval.reference = str(tmp_path / "ref.npz")
    r = fid.evaluate(c, str(tmp_path))
    name = samplers.sampler_name(config_lib.sampler_config(c))
    images = metrics.load_samples_npz(tmp_path / "eval" / f"{name}-16.npz")
    assert images.shape == (16, 8, 8, 3) and images.std() > 0
    assert np.isfinite(r["fid"]) and r["protocol"]["decoder"] == str(tmp_path / "vae")
    c.eval.reference = "data"
    c.data.name = "latents"
    with pytest.raises(ValueError, match="config.eval.reference='data' needs pixel data"):
        reference.reference_stats(c, str(tmp_path), fnet)


@pytest.mark.slow
def test_main_evaluate_after_training_trains_the_auto_classifier(tmp_path):
    """train.train_and_evaluate (smoke) -> python -m patch_forcing.main --mode=evaluate, 'auto'."""
    import os
    import subprocess
    import sys

    from patch_forcing import train
    from tests import REPO

    train.train_and_evaluate(digits.get_config("smoke"), str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "patch_forcing.main", "--config=configs/digits.py:smoke", f"--workdir={tmp_path}",
         "--mode=evaluate", "--config.eval.num_samples=64", "--config.eval.batch_size=32"],
        cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta, _ = classifier.load(str(tmp_path / "classifier"))
    assert meta["test_accuracy"] > 0.9 and meta["steps"] == features.DEFAULT_STEPS
    record = json.loads((tmp_path / "eval" / "euler_pf-s4-cfg1.0-64.json").read_text())
    assert record["protocol"]["checkpoint_step"] == 8 and np.isfinite(record["fid"])
    assert f"FID {record['fid']:.3f}" in proc.stdout and "N=64" in proc.stdout


def test_stale_reference_cache_is_recomputed(workdir):
    c = _config()
    fnet = features.feature_network(c, str(workdir))
    ref, _ = reference.reference_stats(c, str(workdir), fnet)
    (cache,) = (workdir / "eval").glob("reference-digits-test-*.npz")
    metrics.save_reference_stats(cache, {"mu": np.zeros(3), "sigma": np.eye(3)})  # e.g. older feature code
    again, _ = reference.reference_stats(c, str(workdir), fnet)
    for k in ("mu", "sigma", "mu_s", "sigma_s", "pool"):
        np.testing.assert_allclose(again[k], ref[k], rtol=1e-6, atol=1e-9)
