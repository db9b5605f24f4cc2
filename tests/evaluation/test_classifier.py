"""Feature classifier: accuracy on digits, saved/loaded weights, feature shapes, determinism."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from configs import digits, mnist
from patch_forcing.evaluation import features as F
from patch_forcing.models import classifier as C
from tests import REPO


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cls"))
    data_cfg = digits.get_config().data
    meta = F.train_classifier(data_cfg, out, steps=250, seed=0, verbose=False)
    return out, meta, data_cfg


def test_digits_accuracy_and_saved_json(trained):
    out, meta, data_cfg = trained
    assert meta["test_accuracy"] > 0.90, meta["test_accuracy"]
    with open(os.path.join(out, C.META_FILE)) as f:
        saved = json.load(f)
    assert saved["test_accuracy"] == meta["test_accuracy"] and saved["steps"] == 250
    assert saved["split_eval"] == "test" and saved["num_test"] == 297 and len(saved["digest"]) == 8
    # Independent re-count of the accuracy through the loaded network's logits.
    fnet = F.load_classifier(out)
    name, fn = fnet.name, fnet.host_fn()
    x, y = F.split_arrays(data_cfg, "test")
    acc = np.mean(np.argmax(np.asarray(fn(x)["logits"]), -1) == y)
    assert acc == pytest.approx(meta["test_accuracy"]) and name == f"classifier-digits-{saved['digest']}"


def test_features_shapes_and_uint8_equals_float(trained):
    out, meta, _ = trained
    fn = F.load_classifier(out).host_fn()
    u8 = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    f_u8 = fn(u8)
    f_fl = fn(u8.astype(np.float32) / 127.5 - 1.0)
    assert f_u8["pool"].shape == (5, 128) and f_u8["logits"].shape == (5, 10)
    assert f_u8["spatial"].shape == (5, 4 * 4 * C.SPATIAL_CHANNELS)
    assert np.all(np.asarray(f_u8["pool"]) >= 0)  # post-ReLU penultimate layer
    for k in f_u8:
        np.testing.assert_allclose(f_u8[k], f_fl[k], rtol=1e-5, atol=1e-5)
    # The params round-trip exactly through the npz.
    for a, b in zip(jax.tree.leaves(C.load(out)[1]), jax.tree.leaves(meta["params"])):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"shape \(B, 8, 8, 1\)"):
        fn(np.zeros((2, 32, 32, 1), np.uint8))


def test_deterministic_for_a_seed():
    data_cfg = digits.get_config().data
    a, b, c = (F.train_classifier(data_cfg, None, steps=8, seed=s, verbose=False) for s in (3, 3, 4))
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(c["params"])))


def test_shift_augmentation_moves_content_and_fills_background():
    x = -np.ones((64, 8, 8, 1), np.float32)
    x[:, 3, 4] = 1.0
    y = np.asarray(F._shift(jax.random.key(0), x, 1))
    rows, cols = np.nonzero(y[..., 0] == 1.0)[1:]
    assert set(rows) == {2, 3, 4} and set(cols) == {3, 4, 5}  # every shift in [-1, 1]^2 seen
    assert np.all((y == 1.0).sum((1, 2, 3)) == 1) and set(np.unique(y)) == {-1.0, 1.0}


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        C.ClassifierConfig(image_size=(6, 6), widths=(8, 8, 8))
    with pytest.raises(FileNotFoundError, match="no classifier at"):
        C.load(str(tmp_path))
    cfg = C.ClassifierConfig(widths=(8, 16), feature_dim=16)
    params = nnx.to_pure_dict(nnx.state(C.Classifier(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    C.save(str(tmp_path), {"format": C.FORMAT, "config": {**cfg.to_dict(), "feature_dim": 32}, "data": "x"},
           params)
    with pytest.raises(ValueError, match="does not match the architecture"):
        C.load(str(tmp_path))


@pytest.mark.slow
def test_mnist_accuracy(mnist_dir, tmp_path):
    c = mnist.get_config()
    c.data.data_dir = str(mnist_dir)
    meta = F.train_classifier(c.data, str(tmp_path), seed=0, verbose=False)
    assert meta["test_accuracy"] > 0.97 and meta["num_train"] == 8000 and meta["num_test"] == 2000


@pytest.mark.slow
def test_command_line(tmp_path):
    subprocess.run([sys.executable, "-m", "patch_forcing.tools.train_classifier", "--config=configs/digits.py",
                    f"--workdir={tmp_path}", "--steps=20", "--seed=1"], cwd=REPO, check=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True)
    meta, _ = C.load(str(tmp_path / "classifier"))
    assert meta["steps"] == 20 and meta["seed"] == 1 and 0 <= meta["test_accuracy"] <= 1
