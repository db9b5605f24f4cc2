"""Training system: config validation, sharded steps, end-to-end run, exact resume, NaN stop."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import digits, imagenet, mnist
from patch_forcing import config_lib, sharding, train
from patch_forcing.data import pipeline as data_lib
from tests import REPO



def _smoke(**overrides):
    c = digits.get_config("smoke")
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c


# ----------------------------------------------------------------------------- config validation
@pytest.mark.parametrize("key,value,needle", [
    ("flow.timesteps", "ltgg", "config.flow.timesteps='ltgg' is not one of"),
    ("flow.ltg.std", -1.0, "config.flow.ltg.std must be >= 0"),
    ("model.patch_size", 3, "patch_size=3"),
    ("model.hidden_size", 30, "hidden_size"),
    ("data.image_size", (16, 16), "config.data.image_size=(16, 16) must equal"),
    ("data.name", "cifar", "data.name"),
    ("optim.lr", 0.0, "config.optim.lr must be > 0"),
    ("ema.decay", 1.0, "config.ema.decay must be in [0, 1)"),
    ("sampler.name", "heun", "sampler.name='heun' is not one of"),
    ("sampler.q", 1.5, "sampler.q=1.5 must be in the open interval (0, 1)"),
    ("sampler.n_inner", 0, "sampler.n_inner=0"),
    ("sampler.name", "euler", "does not fit a per-patch model"),
    ("mesh.fsdp", 3, "does not divide the 8 devices"),
    ("model.per_patch", False, "needs a per-patch model"),
])
def test_bad_config_names_the_field(key, value, needle):
    c = _smoke(**{key: value})
    with pytest.raises(ValueError) as err:
        config_lib.validate(c, "train")
        sharding.make_mesh(c.mesh)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_shipped_configs_validate():
    for c in (digits.get_config(), digits.get_config("smoke"), mnist.get_config(), imagenet.get_config(),
              imagenet.get_config("XL"), imagenet.get_config("B,sit")):
        config_lib.validate(c, "train")
    assert config_lib.model_config(imagenet.get_config()).hidden_size == 768
    assert config_lib.model_config(imagenet.get_config("XL")).depth == 28
    sit = imagenet.get_config("B,sit")
    assert not config_lib.model_config(sit).per_patch and sit.flow.timesteps == "uniform"
    with pytest.raises(ValueError, match="size must be one of"):
        imagenet.get_config("XXL")


# ----------------------------------------------------------------------------- sharded steps
def _trajectory(c, devices, steps=4):
    mesh = sharding.make_mesh(c.mesh, devices)
    state, graphdef, rest, shardings = train.init_state(c, mesh)
    step = train.jit_train_step(c, graphdef, rest, shardings, mesh)
    it = data_lib.make_train_iterator(c.data, c.seed)
    losses = []
    for _ in range(steps):
        state, m = step(state, sharding.to_global_batch(next(it), mesh))
        losses.append(float(m["loss"]))
    return np.array(losses), state


def test_data_parallel_and_fsdp_match_one_device():
    assert len(jax.devices()) == 8
    c = _smoke()
    c.model.hidden_size = 64  # divisible by 8 for FSDP
    one, s1 = _trajectory(c, jax.devices()[:1])
    dp, _ = _trajectory(c, jax.devices())
    c.mesh.data, c.mesh.fsdp = 1, -1
    fsdp, s8 = _trajectory(c, jax.devices())
    np.testing.assert_allclose(dp, one, rtol=1e-5)
    np.testing.assert_allclose(fsdp, one, rtol=1e-5)
    kernel = s8["params"]["blocks"][0]["mlp"]["fc1"]["kernel"]
    kernel = getattr(kernel, "value", kernel)
    assert kernel.sharding.spec[0] == "fsdp"  # FSDP really shards the model width
    assert one[-1] < one[0]


# ----------------------------------------------------------------------------- end to end
def _run_main(workdir, *flags, steps=None):
    cmd = [sys.executable, "-m", "patch_forcing.main", "--config=configs/digits.py:smoke", f"--workdir={workdir}"]
    if steps is not None:
        cmd.append(f"--config.train.num_steps={steps}")
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    res = subprocess.run(cmd + list(flags), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_digits_run_loss_goes_down_and_leaves_artifacts(tmp_path):
    _run_main(tmp_path, "--config.log.every_steps=1", "--config.optim.lr=3e-3", steps=40)
    losses = [m["loss"] for m in _metrics(tmp_path) if "loss" in m]
    assert len(losses) == 40
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8])
    assert (tmp_path / "checkpoints" / "40").is_dir()
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert list((tmp_path / "samples").glob("*.png"))
    assert (tmp_path / "inference" / "config.json").exists()
    assert any("val_loss" in m for m in _metrics(tmp_path))
    # --mode=sample reads the inference checkpoint and writes grid, npz, difficulty picture.
    _run_main(tmp_path, "--mode=sample", "--config.sampler.name=dual_loop", "--config.sample.num_images=12",
              "--config.sample.batch_size=8")
    out = tmp_path / "samples" / "dual_loop-q40-n4-s4-cfg1.0"
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.shape == (12, 8, 8, 1) and arr.dtype == np.uint8
    assert (out / "grid.png").exists() and (out / "difficulty.png").exists()


@pytest.mark.slow
def test_resume_is_bitwise_exact(tmp_path):
    from patch_forcing import checkpoint as ckpt_lib

    full, half = tmp_path / "full", tmp_path / "half"
    _run_main(full, steps=8)
    _run_main(half, steps=4)  # stops at 4 (a checkpoint), a new process continues to 8
    _run_main(half, steps=8)
    for name in ("params", "ema", "opt_state"):
        a = _load_state(full)[name]
        b = _load_state(half)[name]
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)
    la = [m["loss"] for m in _metrics(full) if m["step"] > 4 and "loss" in m]
    lb = [m["loss"] for m in _metrics(half) if m["step"] > 4 and "loss" in m]
    assert la == lb
    cfg_a, params_a, _ = ckpt_lib.load_inference(full / "inference")
    _, params_b, _ = ckpt_lib.load_inference(half / "inference")
    for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_array_equal(x, y)


def _load_state(workdir):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(workdir / "checkpoints" / "8" / "state")


@pytest.mark.slow
def test_nan_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real = train.make_train_step

    def poisoned(config, graphdef, rest, encoder=None):
        step = real(config, graphdef, rest, encoder)

        def wrapped(state, batch, *encoder_params):
            new, m = step(state, batch, *encoder_params)
            bad = state["step"] + 1 >= 6
            m = {**m, "loss": jax.numpy.where(bad, jax.numpy.nan, m["loss"])}
            return new, m

        return wrapped

    monkeypatch.setattr(train, "make_train_step", poisoned)
    c = _smoke()
    c.train.num_steps = 8
    with pytest.raises(FloatingPointError, match=r"at step 6.*last good checkpoint is step 4"):
        train.train_and_evaluate(c, str(tmp_path))
    assert (tmp_path / "checkpoints" / "4").is_dir() and not (tmp_path / "checkpoints" / "8").exists()


@pytest.mark.slow
def test_in_training_fid_is_logged_next_to_val_loss(tmp_path, monkeypatch):
    from patch_forcing.evaluation import fid

    calls = []

    def fake_hook(config, workdir, apply_fn, mesh=None):
        def hook(step, ema):
            calls.append(step)
            v, s = apply_fn(ema, jax.numpy.zeros((2, 8, 8, 1)), jax.numpy.zeros((2, 16)), jax.numpy.zeros((2,), int))
            assert v.shape == (2, 8, 8, 1)  # the hook gets a working apply_fn and the EMA params
            return {"fid_1k": 1.5}
        return hook

    monkeypatch.setattr(fid, "make_fid_hook", fake_hook)
    c = _smoke()
    c.eval.fid_every_steps = 4
    train.train_and_evaluate(c, str(tmp_path))
    assert calls == [4, 8]
    fids = [m for m in _metrics(tmp_path) if "fid_1k" in m]
    assert [m["step"] for m in fids] == [4, 8]
    assert any("val_loss" in m and m["step"] == 8 for m in _metrics(tmp_path))
