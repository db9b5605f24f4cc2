"""FID Inception port vs an independent torch implementation (random weights, random BN stats)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from patch_forcing.models import inception as inc
from tests import REPO
from tests.models import torch_inception as ti

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def torch_model():
    return ti.randomize_(ti.FIDInceptionV3(), seed=0)


@pytest.fixture(scope="module")
def params(torch_model):
    return inc.convert_pytorch_fid_weights(torch_model.state_dict())


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


# ----------------------------------------------------------------------------- resize

@pytest.mark.parametrize("h,w", [(64, 64), (256, 256), (512, 384), (299, 299), (37, 300), (1024, 1024)])
def test_resize_pytorch_fid_equals_torch_interpolate(h, w):
    x = np.random.default_rng(h * w).uniform(0, 1, (2, h, w, 3)).astype(np.float32)
    ours = np.asarray(inc.resize_bilinear(jnp.asarray(x), 299, "pytorch_fid"))
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299),
                        mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, ref, atol=5e-7)  # 1 ulp
    # jax.image.resize without antialiasing has the same semantics.
    jref = jax.image.resize(jnp.asarray(x), (2, 299, 299, 3), "bilinear", antialias=False)
    np.testing.assert_allclose(ours, np.asarray(jref), atol=5e-7)


@pytest.mark.parametrize("h,w", [(64, 64), (256, 256), (512, 384), (37, 300)])
def test_resize_adm_equals_tf1_formula(h, w):
    x = np.random.default_rng(h + w).uniform(0, 255, (2, h, w, 3)).astype(np.float32)
    ours = np.asarray(inc.resize_bilinear(jnp.asarray(x), 299, "adm"))
    ref = ti.resize_tf1(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, ref, atol=3e-5)  # 1 ulp at 255
    # TF1 legacy resize samples at dst * in / out (no half-pixel shift): not pytorch's resize.
    other = np.asarray(inc.resize_bilinear(jnp.asarray(x), 299, "pytorch_fid"))
    assert np.abs(other - ours).max() > 1.0


def test_resize_identity_at_299_and_preprocess_range():
    x = np.random.default_rng(0).integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
    for mode in inc.PREPROCESS_MODES:
        y = np.asarray(inc.preprocess_images(x, mode))
        lo, hi = (-1.0, 127 / 128) if mode == "adm" else (-1.0, 1.0)
        expect = (x - 128.0) / 128 if mode == "adm" else x / 127.5 - 1
        np.testing.assert_allclose(y, expect, atol=1e-6)
        assert y.min() >= lo and y.max() <= hi


def test_bad_preprocess_mode_is_one_line_error():
    with pytest.raises(ValueError, match=r"preprocess='tf2' is not one of \['adm', 'pytorch_fid'\]"):
        inc.network_name("tf2")


# ----------------------------------------------------------------------------- network

@pytest.mark.parametrize("mode", ["adm", "pytorch_fid"])
def test_features_equal_torch(torch_model, params, mode):
    images = np.random.default_rng(1).integers(0, 256, (2, 64, 80, 3), dtype=np.uint8)
    out = inc.features_fn(params, images, preprocess=mode)
    with torch.no_grad():
        pool, mixed_6_conv, logits = torch_model(ti.preprocess(images, mode))
    # ADM: spatial[..., :7] of the NHWC map, flattened in (h, w, c) order.
    spatial = mixed_6_conv[:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    assert out["pool"].shape == (2, 2048)
    assert out["spatial"].shape == (2, 7 * 17 * 17)
    assert out["logits"].shape == (2, 1008)
    assert _rel_err(out["pool"], pool) < 1e-5
    assert _rel_err(out["spatial"], spatial) < 1e-5
    assert _rel_err(out["logits"], logits) < 1e-5
    # The features are not degenerate (random BN stats keep activations O(1)).
    assert float(pool.std()) > 0.1 and float(spatial.std()) > 0.1
    # The two images give different features.
    assert np.abs(np.asarray(out["pool"][0] - out["pool"][1])).max() > 1e-2


# ----------------------------------------------------------------------------- weights

def test_converter_maps_every_key(torch_model, params):
    sd = torch_model.state_dict()
    flat = jax.tree_util.tree_leaves_with_path(params)
    n_tensors = sum(1 for k in sd if not k.endswith("num_batches_tracked"))
    assert len(flat) == n_tensors == 94 * 5 + 2  # 94 BasicConv2d (conv + 4 BN tensors) + fc
    # conv OIHW -> HWIO and fc transposed.
    w = sd["Mixed_6d.branch7x7_2.conv.weight"].numpy()  # (160, 160, 1, 7)
    np.testing.assert_array_equal(params["Mixed_6d"]["branch7x7_2"]["conv"]["kernel"],
                                  w.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["fc"]["kernel"], sd["fc.weight"].numpy().T)
    np.testing.assert_array_equal(params["Mixed_5b"]["branch_pool"]["bn"]["var"],
                                  sd["Mixed_5b.branch_pool.bn.running_var"].numpy())


def test_converter_reports_missing_and_unexpected(torch_model):
    sd = dict(torch_model.state_dict())
    del sd["Mixed_7c.branch3x3dbl_3b.bn.running_mean"]
    sd["AuxLogits.fc.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as e:
        inc.convert_pytorch_fid_weights(sd)
    assert "Mixed_7c.branch3x3dbl_3b.bn.running_mean" in str(e.value)
    assert "AuxLogits.fc.weight" in str(e.value)
    sd = dict(torch_model.state_dict())
    sd["fc.bias"] = torch.zeros(1000)
    with pytest.raises(ValueError, match="fc.bias"):
        inc.convert_pytorch_fid_weights(sd)


def test_load_inception_from_pth_and_missing_file(torch_model, params, tmp_path, monkeypatch):
    path = tmp_path / "weights.pth"
    torch.save(torch_model.state_dict(), path)
    loaded = inc.load_inception(str(path))
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    monkeypatch.setenv(inc.WEIGHTS_ENV, str(path))
    assert inc.default_weights_path() == str(path)
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError) as e:
        inc.load_inception(missing)
    assert inc.FID_WEIGHTS_URL in str(e.value) and missing in str(e.value)


def test_import_does_not_import_torch_or_download():
    code = ("import sys, patch_forcing.models.inception as m; assert 'torch' not in sys.modules; "
            "assert 'FID_WEIGHTS_URL' in dir(m)")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env)
