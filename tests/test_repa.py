"""REPA in training: coeff 0 is the plain model bit for bit, the alignment term's gradient stops
at the encoder, target encoders on the DiT's token grid, configs (ImageNet REPA lowers at batch 1),
and a digits REPA run from `python -m patch_forcing.main` that resumes from its checkpoint."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import digits, imagenet, mnist
from patch_forcing import config_lib, repa, sharding, train
from patch_forcing.evaluation import features
from patch_forcing.flow import loss as loss_lib
from patch_forcing.models import classifier, dinov2, dit
from tests import REPO

pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def digits_encoder(tmp_path_factory):
    """A (briefly trained) digit classifier as the target encoder's directory."""
    path = tmp_path_factory.mktemp("enc") / "repa_encoder"
    features.train_classifier(digits.get_config().data, str(path), steps=10, seed=1, verbose=False)
    return path


def _repa_smoke(encoder_dir, coeff=0.5):
    c = digits.get_config("smoke,repa")
    c.repa.coeff, c.repa.encoder_path = coeff, str(encoder_dir)
    return c


def _one_step(c, workdir, batch):
    """(new state, metrics, old state) of one jitted step from the seed's initial state (no
    warm-up: the first step's learning rate is the full one)."""
    c.optim.warmup_steps = 0
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    state, graphdef, rest, shardings = train.init_state(c, mesh)
    old = jax.tree.map(np.asarray, state)
    step = train.jit_train_step(c, graphdef, rest, shardings, mesh, repa.target_encoder(c, workdir))
    new, metrics = step(state, batch)
    return jax.tree.map(np.asarray, new), jax.device_get(metrics), old


def _batch(n=16):
    rng = np.random.default_rng(0)
    return {"image": rng.uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32),
            "label": rng.integers(0, 10, n).astype(np.int32)}


def test_coeff_zero_is_the_plain_model_exactly(digits_encoder, tmp_path):
    batch = _batch()
    plain_new, plain_m, plain_old = _one_step(digits.get_config("smoke"), tmp_path, batch)
    zero_new, zero_m, zero_old = _one_step(_repa_smoke(digits_encoder, coeff=0.0), tmp_path, batch)
    proj_old = zero_old["params"].pop("projector")
    proj_new = zero_new["params"].pop("projector")
    assert set(zero_m) == set(plain_m) and "repa_loss" not in zero_m
    for k in plain_m:  # loss, its terms and the gradient norm: bit for bit
        assert zero_m[k] == plain_m[k], k
    jax.tree.map(np.testing.assert_array_equal, zero_old["params"], plain_old["params"])  # same init
    jax.tree.map(np.testing.assert_array_equal, zero_new["params"], plain_new["params"])  # same update
    assert np.abs(plain_new["params"]["final_layer"]["linear"]["kernel"]).max() > 0  # a real one (zero init)
    jax.tree.map(np.testing.assert_array_equal, proj_new, proj_old)  # zero gradient, no weight decay


def test_alignment_gradient_never_reaches_the_encoder(digits_encoder, tmp_path):
    enc = repa.target_encoder(_repa_smoke(digits_encoder), tmp_path)
    images = jnp.asarray(_batch(4)["image"])
    z = jax.random.normal(jax.random.key(0), (4, 16, 128))

    def total(z, enc_params):
        return loss_lib.alignment_loss(z, enc.features(enc_params, images))

    params = jax.tree.map(jnp.asarray, enc.params)
    gz, genc = jax.grad(total, argnums=(0, 1))(z, params)
    assert np.abs(np.asarray(gz)).max() > 0
    assert not any(np.asarray(g).any() for g in jax.tree.leaves(genc))
    # without the stop-gradient the same composition would reach the encoder
    raw = jax.grad(lambda p: jnp.mean(jnp.sum(z * enc.features(p, images), -1)))(params)
    assert any(np.asarray(g).any() for g in jax.tree.leaves(raw))


def test_target_encoders_land_on_the_dit_token_grid(digits_encoder, tmp_path, monkeypatch):
    c = _repa_smoke(digits_encoder)
    enc = repa.target_encoder(c, tmp_path)
    images = jnp.asarray(_batch(3)["image"])
    meta, params = classifier.load(str(digits_encoder))
    fmap = classifier.features_apply(classifier.ClassifierConfig.from_dict(meta["config"]), "feature_map")
    want = np.asarray(fmap(params, images)).reshape(3, 16, 128)  # 4x4 map = the 4x4 DiT grid
    np.testing.assert_array_equal(np.asarray(enc.features(enc.params, images)), want)
    assert enc.name.startswith("classifier-digits-")
    # DINOv2 (tiny, random weights from a local file) on grey pixels: 16 px -> 4x4 -> 2x2 DiT grid
    tiny = dinov2.preset("dinov2_tiny")
    model = dinov2.DinoV2(tiny, rngs=nnx.Rngs(0))
    c.model.patch_size = 4
    c.repa.update(encoder="dinov2_tiny", encoder_path="unused", z_dim=32, resolution=16)
    loaded = (tiny, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    monkeypatch.setattr(dinov2, "load_dinov2", lambda *a, **k: loaded)
    enc = repa.target_encoder(c, tmp_path)
    f = np.asarray(enc.features(enc.params, images))
    full = dinov2.make_encoder(tiny, loaded[1], 16)(loaded[1], jnp.repeat(images, 3, -1))  # (3, 16, 32)
    assert f.shape == (3, 4, 32)
    np.testing.assert_allclose(f, dinov2.match_tokens(full, (2, 2)), atol=1e-6)
    uint8 = ((images + 1) * 127.5).round().astype(jnp.uint8)  # stored pixels read the same way
    np.testing.assert_allclose(enc.features(enc.params, uint8), f, atol=0.05)
    c.repa.z_dim = 31
    with pytest.raises(ValueError, match="config.repa.z_dim=31 must equal the feature size 32"):
        repa.target_encoder(c, tmp_path)


# ----------------------------------------------------------------------------- configs
def test_repa_configs_build_and_validate():
    for arg in ("B", "XL", "B,sit"):  # the presets before REPA parse as before, REPA off
        c = imagenet.get_config(arg)
        assert not config_lib.repa_enabled(c) and config_lib.model_config(c).repa_depth == 0
    for arg, size in (("b_repa", 768), ("xl_repa", 1152), ("xl_repa,sit", 1152)):
        c = imagenet.get_config(arg)
        c.repa.encoder_path = "/ckpt/dinov2_vitb14_reg4_pretrain.pth"  # validation reads no file
        config_lib.validate(c, "train")
        m = config_lib.model_config(c)
        assert (m.hidden_size, m.repa_depth, m.repa_z_dim, m.repa_projector_dim) == (size, 8, 768, 2048)
        assert m.per_patch == ("sit" not in arg) and c.data.with_pixels
        assert (c.repa.coeff, c.repa.encoder, c.repa.resolution) == (0.5, "dinov2_vitb14_reg", 224)
    for c in (digits.get_config("repa"), digits.get_config("smoke,repa"), mnist.get_config("repa"),
              mnist.get_config("smoke,repa")):
        config_lib.validate(c, "train")
    xl = imagenet.get_config("xl_repa")
    config_lib.validate(xl, "sample")  # sampling needs no encoder weights
    bad = [("repa.encoder_path", "", "dinov2_vitb14_reg4_pretrain.pth"),
           ("data.with_pixels", False, "config.data.with_pixels=False"),
           ("repa.encoder_depth", 29, "config.repa.encoder_depth=29 must be an int in [0, config.model.depth=28]"),
           ("repa.z_dim", 1024, "config.repa.z_dim=1024 must equal dinov2_vitb14_reg's feature size 768"),
           ("repa.encoder", "dino", "config.repa.encoder='dino' is not one of"),
           ("repa.coeff", -1.0, "config.repa.coeff=-1.0 must be >= 0"),
           ("repa.resolution", 230, "config.repa.resolution=230 must be a positive multiple")]
    for key, value, needle in bad:
        c = imagenet.get_config("xl_repa")
        c.repa.encoder_path = "/ckpt/x.pth"
        section, field = key.split(".")
        c[section][field] = value
        with pytest.raises(ValueError) as err:
            config_lib.validate(c, "train")
        assert needle in str(err.value) and "\n" not in str(err.value), (key, str(err.value))
    with pytest.raises(ValueError, match="size must be one of"):
        imagenet.get_config("xxl_repa")
    with pytest.raises(ValueError, match="one of \\['smoke', 'repa'\\]"):
        digits.get_config("smoke,rep")


@pytest.mark.parametrize("arg", ["b_repa", "xl_repa,sit"])
def test_imagenet_repa_step_lowers_at_batch_one(arg, monkeypatch):
    """The whole train step (DINOv2-B/14-reg on 256 px pixels, projector, loss, AdamW, EMA) at
    the config's width and a 2-block depth, lowered on abstract shapes (nothing materialised)."""
    c = imagenet.get_config(arg)
    c.model.depth, c.repa.encoder_depth, c.repa.encoder_path = 2, 1, "/ckpt/x.pth"
    c.data.batch_size = 1
    config_lib.validate(c, "train")
    mcfg = config_lib.model_config(c)
    enc_cfg = dinov2.preset("dinov2_vitb14_reg", dtype=mcfg.dtype)
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: dinov2.DinoV2(enc_cfg, rngs=nnx.Rngs(0)))))
    monkeypatch.setattr(dinov2, "load_dinov2", lambda *a, **k: (enc_cfg, abstract))
    enc = repa.target_encoder(c, "/nonexistent")
    key = jax.random.key(0)
    graphdef, params, _ = nnx.eval_shape(lambda: dit.init(mcfg, key))
    rest = jax.jit(lambda k: dit.init(mcfg, k)[2])(key)  # the fixed position embedding only
    tx, _ = train.make_optimizer(c.optim)
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
             "opt_state": jax.eval_shape(tx.init, params), "ema": params, "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    batch = {"image": jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32),
             "label": jax.ShapeDtypeStruct((1,), jnp.int32),
             "pixels": jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.uint8)}
    lowered = jax.jit(train.make_train_step(c, graphdef, rest, enc)).lower(state, batch, enc.params)
    out_state, metrics = lowered.out_info
    assert set(metrics) >= {"loss", "flow_loss", "repa_loss", "grad_norm"}
    assert out_state["params"]["projector"]["fc3"]["kernel"].shape == (2048, 768)
    assert ("nll" in metrics) == mcfg.per_patch
    assert "tensor<1x256x256x3xui8>" in lowered.as_text()  # DINOv2 reads the stored pixels


# ----------------------------------------------------------------------------- end to end
def _main(workdir, *flags):
    cmd = [sys.executable, "-m", "patch_forcing.main", "--config=configs/digits.py:smoke,repa", f"--workdir={workdir}",
           "--config.log.sample_every_steps=100", "--config.log.eval_every_steps=100", *flags]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout + res.stderr


@pytest.mark.slow
def test_digits_repa_run_from_main_resumes(digits_encoder, tmp_path):
    import json
    import shutil

    from patch_forcing import checkpoint as ckpt_lib

    shutil.copytree(digits_encoder, tmp_path / repa.ENCODER_DIR)  # where repa.encoder_path='' looks
    _main(tmp_path, "--config.train.num_steps=4")
    log = _main(tmp_path, "--config.train.num_steps=8")
    assert "resumed from step 4" in log and "training the target encoder" not in log
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in metrics if "repa_loss" in m]
    assert [m["step"] for m in logged] == [4, 8]
    for m in logged:  # the term joins the loss with coeff 0.5
        assert 0 < m["repa_loss"] <= 2
        np.testing.assert_allclose(m["loss"], m["flow_loss"] + 0.01 * m["nll"] + 0.5 * m["repa_loss"], rtol=1e-5)
    model_cfg, params, _ = ckpt_lib.load_inference(tmp_path / "inference")
    assert model_cfg["repa_depth"] == 1 and params["projector"]["fc3"]["kernel"].shape == (256, 128)
    assert dit.DiTConfig.from_dict(model_cfg) == config_lib.model_config(digits.get_config("smoke,repa"))
