"""Converter: the reference's key set for PF-B/2, forward parity with an independent PyTorch DiT
on random non-zero weights (both modes), clear errors, config parsing and torch file loading."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from patch_forcing.tools import convert
from patch_forcing.models import dit
from tests.models.torch_dit import TorchDiT

torch.set_num_threads(1)

TINY = dict(image_size=16, in_channels=4, patch_size=2, hidden_size=64, depth=2, num_heads=4,
            num_classes=10)
PFT_B = {  # configs/model/pft-b.yaml of the reference
    "target": "patch_flow.models.pf_transformer.PatchForcingDiT",
    "params": {"in_channels": 4, "input_size": 32, "depth": 12, "hidden_size": 768, "patch_size": 2,
               "num_heads": 12, "num_classes": 1000, "compile": True, "predict_uncertainty": True},
}
REPA_XL = {  # REPAPatchForcingDiT at XL/2 with its constructor defaults (z_dim 768, depth 8, 2048)
    "target": "patch_flow.models.pf_transformer_repa.REPAPatchForcingDiT",
    "params": {**PFT_B["params"], "depth": 28, "hidden_size": 1152, "num_heads": 16},
}

pytestmark = pytest.mark.usefixtures("fast_compiles")


def numpy_state(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def our_model(cfg, params):
    model = nnx.jit(lambda key: dit.DiT(cfg, rngs=nnx.Rngs(key)))(jax.random.key(0))
    return dit.load_params(model, params)


def flat(tree):
    """{'blocks/0/attn/qkv/kernel': array} (block indices int or str alike)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {"/".join(str(getattr(k, "key", k)) for k in path): v for path, v in leaves}


# ----------------------------------------------------------------------------- key set


def test_pf_b2_reference_keys_and_shapes_map_exactly():
    cfg = convert.cfg_from_torch_config(PFT_B)
    assert cfg == dit.preset("PF-B/2")
    with torch.device("meta"):  # shapes only, no memory, no forward
        ref = TorchDiT(image_size=32, in_channels=4, patch_size=2, hidden_size=768, depth=12,
                       num_heads=12, num_classes=1000, per_patch=True)
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    table = convert.rename_table(cfg)
    assert len(shapes) == 1 + 2 + 4 + 1 + 12 * 10 + 4  # pos_embed, x/t/y embedders, blocks, final
    assert {k for k, _, _ in table} | {"pos_embed"} == set(shapes)
    assert len({path for _, path, _ in table}) == len(table)  # one-to-one
    # zero-cost stand-ins (broadcast views) with exactly those shapes convert with nothing left over
    fake = {k: np.broadcast_to(np.float32(0.5), s) for k, s in shapes.items()}
    fake["pos_embed"] = dit.sincos_pos_embed(768, 16, 16)[None]
    params = convert.torch_to_params(fake, cfg)
    abstract = nnx.eval_shape(lambda: dit.DiT(cfg, rngs=nnx.Rngs(0)))
    want = jax.tree.map(lambda a: a.shape, nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    assert jax.tree.map(np.shape, params) == want
    n = sum(int(np.prod(s)) for k, s in shapes.items() if k != "pos_embed")
    assert n == dit.param_count(cfg) == 130_306_580


def test_repa_xl_projector_maps_every_tensor():
    """A reference-shaped REPAPatchForcingDiT-XL/2 state dict: the trunk as zero-cost stand-ins,
    the projector random; every projector tensor lands transposed in projector.fc1..fc3."""
    cfg = convert.cfg_from_torch_config(REPA_XL)
    assert cfg == dataclasses.replace(dit.preset("PF-XL/2"), repa_depth=8, repa_z_dim=768, repa_projector_dim=2048)
    with torch.device("meta"):
        ref = TorchDiT(image_size=32, in_channels=4, patch_size=2, hidden_size=1152, depth=28, num_heads=16,
                       num_classes=1000, encoder_depth=8, z_dim=768, projector_dim=2048)
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    rng = np.random.default_rng(0)
    sd = {k: (rng.standard_normal(s, np.float32) if k.startswith("projector.")
              else np.broadcast_to(np.float32(0.5), s)) for k, s in shapes.items()}
    sd["pos_embed"] = dit.sincos_pos_embed(1152, 16, 16)[None]
    proj = sorted(k for k in sd if k.startswith("projector."))
    assert proj == [f"projector.{i}.{w}" for i in (0, 2, 4) for w in ("bias", "weight")]
    assert sum(sd[k].size for k in proj) == 8_131_328  # SPEC §10
    params = convert.torch_to_params(sd, cfg)
    for i, ours in ((0, "fc1"), (2, "fc2"), (4, "fc3")):
        np.testing.assert_array_equal(params["projector"][ours]["kernel"], sd[f"projector.{i}.weight"].T)
        np.testing.assert_array_equal(params["projector"][ours]["bias"], sd[f"projector.{i}.bias"])
    abstract = nnx.eval_shape(lambda: dit.DiT(cfg, rngs=nnx.Rngs(0)))
    want = jax.tree.map(lambda a: a.shape, nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    assert jax.tree.map(np.shape, params) == want
    assert dit.param_count(cfg) - dit.param_count(dit.preset("PF-XL/2")) == 8_131_328
    plain = {k: v for k, v in sd.items() if not k.startswith("projector.")}
    with pytest.raises(ValueError, match=r"unexpected keys \['projector.0.bias'"):
        convert.torch_to_params(sd, dit.preset("PF-XL/2"))
    with pytest.raises(ValueError, match=r"missing keys \['projector.0.bias'"):
        convert.torch_to_params(plain, cfg)


# ----------------------------------------------------------------------------- parity


def test_repa_forward_matches_torch_including_z():
    kw = {**TINY, "depth": 3}
    ref = TorchDiT(**kw, encoder_depth=2, z_dim=24, projector_dim=40).randomize(seed=4)
    cfg = dit.DiTConfig(**kw, repa_depth=2, repa_z_dim=24, repa_projector_dim=40)
    model = our_model(cfg, convert.torch_to_params(numpy_state(ref), cfg))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 16, 16, 4), np.float32)
    t = rng.uniform(size=(2, cfg.num_patches)).astype(np.float32)
    y = np.array([3, 10])
    v, s, z = nnx.jit(lambda m, *a: m(*a, return_z=True))(model, x, t, y)
    v2, s2 = nnx.jit(lambda m, *a: m(*a))(model, x, t, y)  # the plain call is unchanged
    np.testing.assert_array_equal(v, v2)
    with torch.no_grad():
        tv, ts, tz = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(y),
                         return_z=True)
    tz = tz.numpy()
    assert z.shape == (2, 64, 24) and np.abs(tz).mean() > 0.1
    np.testing.assert_allclose(z, tz, rtol=1e-4, atol=1e-4 * np.abs(tz).max())
    np.testing.assert_allclose(v, tv.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-3)




@pytest.mark.parametrize("per_patch, image_size", [(True, 16), (False, 16), (True, (16, 8))])
def test_forward_matches_torch_on_random_weights(per_patch, image_size):
    kw = {**TINY, "image_size": image_size, "per_patch": per_patch}
    ref = TorchDiT(**kw).randomize(seed=1)
    cfg = dit.DiTConfig(**kw)
    model = our_model(cfg, convert.torch_to_params(numpy_state(ref), cfg))
    rng = np.random.default_rng(0)
    b, (h, w) = 3, cfg.image_size
    x = rng.standard_normal((b, h, w, 4), np.float32)
    # a different time for every patch, or one time per sample
    t = rng.uniform(size=(b, cfg.num_patches) if per_patch else (b,)).astype(np.float32)
    y = np.array([0, 7, cfg.num_classes])  # the null class included
    v, s = nnx.jit(lambda m, *a: m(*a))(model, x, t, y)
    with torch.no_grad():
        tv, ts = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(y))
    tv = tv.permute(0, 2, 3, 1).numpy()
    assert np.abs(tv).mean() > 0.1  # the comparison is not between zeros
    np.testing.assert_allclose(v, tv, rtol=1e-4, atol=1e-4 * np.abs(tv).max())
    if per_patch:
        ts = ts.permute(0, 2, 3, 1).numpy()
        assert np.abs(ts).mean() > 0.1
        np.testing.assert_allclose(s, ts, rtol=1e-4, atol=1e-4 * np.abs(ts).max())
    else:
        assert s is None and ts is None


def test_torch_reference_pos_embed_equals_ours():
    """Two independent derivations of MAE's layout (meshgrid with w first) agree, non-square."""
    from tests.models.torch_dit import sincos_2d

    np.testing.assert_allclose(dit.sincos_pos_embed(64, 3, 5), sincos_2d(64, 3, 5).numpy(), atol=1e-6)


# ----------------------------------------------------------------------------- errors


def test_other_shapes_name_the_first_mismatched_key():
    cfg = dit.DiTConfig(**TINY)
    state = numpy_state(TorchDiT(**{**TINY, "in_channels": 3}))
    with pytest.raises(ValueError, match=r"state_dict\['x_embedder.proj.weight'\] has shape "
                                         r"\(64, 3, 2, 2\), expected \(64, 4, 2, 2\)"):
        convert.torch_to_params(state, cfg)
    global_state = numpy_state(TorchDiT(**TINY, per_patch=False))  # no difficulty head
    with pytest.raises(ValueError, match=r"'final_layer.linear.weight'\] has shape \(16, 64\), "
                                         r"expected \(20, 64\)"):
        convert.torch_to_params(global_state, cfg)
    wide = numpy_state(TorchDiT(**{**TINY, "hidden_size": 96}))
    with pytest.raises(ValueError, match=r"'pos_embed'\] has shape \(1, 64, 96\), expected \(1, 64, 64\)"):
        convert.torch_to_params(wide, cfg)


def test_missing_and_unexpected_keys_are_listed():
    cfg = dit.DiTConfig(**TINY)
    deep = numpy_state(TorchDiT(**{**TINY, "depth": 3}))
    with pytest.raises(ValueError, match=r"missing keys \[\], unexpected keys \['blocks.2.adaLN_modulation.1.bias'"):
        convert.torch_to_params(deep, cfg)
    state = numpy_state(TorchDiT(**TINY))
    del state["blocks.1.mlp.fc2.bias"]
    state["ema_model.extra"] = np.zeros(1, np.float32)
    with pytest.raises(ValueError, match=r"missing keys \['blocks.1.mlp.fc2.bias'\], "
                                         r"unexpected keys \['ema_model.extra'\]"):
        convert.torch_to_params(state, cfg)
    state = numpy_state(TorchDiT(**TINY))
    state["pos_embed"] = state["pos_embed"][:, ::-1].copy()
    with pytest.raises(ValueError, match="pos_embed'\\] is not the fixed 2-D sin-cos embedding"):
        convert.torch_to_params(state, cfg)


# ----------------------------------------------------------------------------- configs


def test_torch_configs_parse_explicitly():
    dit_b = {"target": "patch_flow.models.dit.DiT", "params": {**PFT_B["params"]}}
    del dit_b["params"]["predict_uncertainty"]
    assert convert.cfg_from_torch_config(dit_b) == dit.preset("DiT-B/2")
    pf_xl = {**PFT_B, "params": {**PFT_B["params"], "depth": 28, "hidden_size": 1152, "num_heads": 16}}
    assert convert.cfg_from_torch_config(pf_xl) == dit.preset("PF-XL/2")
    no_head = {**PFT_B, "params": {**PFT_B["params"], "predict_uncertainty": False}}
    assert not convert.cfg_from_torch_config(no_head).per_patch
    # absent keys take the reference constructor's defaults (XL/2 on 32x32x4, 1000 classes)
    assert convert.cfg_from_torch_config({"target": PFT_B["target"]}) == dit.preset("PF-XL/2")
    bad = [
        ({**PFT_B, "target": "x.REPASiT"}, "config.target='x.REPASiT' is not supported"),
        ({**REPA_XL, "params": {**REPA_XL["params"], "predict_uncertainty": False}}, "requires True"),
        ({**REPA_XL, "params": {**REPA_XL["params"], "encoder_depth": 29}},
         r"encoder_depth=29 must be in \[1, depth=28\]"),
        ({**PFT_B, "params": {**PFT_B["params"], "z_dim": 768}}, r"unknown keys \['z_dim'\]"),
        ({**PFT_B, "params": {**PFT_B["params"], "learn_sigma": True}}, "learn_sigma=True"),
        ({**PFT_B, "params": {**PFT_B["params"], "class_dropout_prob": 0.0}}, "class_dropout_prob"),
    ]
    for cfg, message in bad:
        with pytest.raises(ValueError, match=message):
            convert.cfg_from_torch_config(cfg)


class NotATensor(dict):
    """Stands in for an OmegaConf DictConfig: a Mapping that weights_only loading refuses."""


def test_load_torch_checkpoint_round_trip(tmp_path):
    ref = TorchDiT(**TINY).randomize(seed=2)
    torch_cfg = {"target": PFT_B["target"],
                 "params": {"in_channels": 4, "input_size": 16, "depth": 2, "hidden_size": 64,
                            "patch_size": 2, "num_heads": 4, "num_classes": 10}}
    path = tmp_path / "plain.ckpt"
    torch.save({"config": torch_cfg, "state_dict": ref.state_dict()}, path)
    cfg, params = convert.convert_checkpoint(str(path))
    assert cfg == dit.DiTConfig(**TINY)
    np.testing.assert_array_equal(
        params["blocks"][1]["attn"]["qkv"]["kernel"], ref.blocks[1].attn.qkv.weight.detach().numpy().T
    )
    # a config held in a non-tensor Python object is refused without pickle, loads with it
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"config": NotATensor(torch_cfg), "state_dict": ref.state_dict()}, pickled)
    with pytest.raises(ValueError, match="--allow_pickle"):
        convert.load_torch_checkpoint(str(pickled))
    config, state = convert.load_torch_checkpoint(str(pickled), allow_pickle=True)
    assert type(config) is dict and config["params"]["hidden_size"] == 64
    assert set(state) == set(ref.state_dict())
    with pytest.raises(ValueError, match="expected a dict with 'config' and 'state_dict'"):
        torch.save({"state_dict": ref.state_dict()}, tmp_path / "bare.ckpt")
        convert.load_torch_checkpoint(str(tmp_path / "bare.ckpt"))


def test_cli_writes_an_inference_checkpoint(tmp_path):
    from patch_forcing import checkpoint

    ref = TorchDiT(**{**TINY, "per_patch": False}).randomize(seed=3)
    torch_cfg = {"target": "patch_flow.models.dit.DiT",
                 "params": {"in_channels": 4, "input_size": 16, "depth": 2, "hidden_size": 64,
                            "patch_size": 2, "num_heads": 4, "num_classes": 10}}
    torch.save({"config": torch_cfg, "state_dict": ref.state_dict()}, tmp_path / "dit.ckpt")
    convert.main(["convert", f"--ckpt={tmp_path / 'dit.ckpt'}", f"--out={tmp_path / 'out'}"])
    model_cfg, params, _ = checkpoint.load_inference(tmp_path / "out")
    cfg = dit.DiTConfig.from_dict(model_cfg)
    assert cfg == dit.DiTConfig(**TINY, per_patch=False)
    expected = convert.torch_to_params(numpy_state(ref), cfg)
    got, want = flat(params), flat(expected)
    assert got.keys() == want.keys() and len(got) == 4 + 1 + 2 + 2 * 10 + 4
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_readme_command_converts_a_release_file_with_its_omegaconf_config(tmp_path):
    """The README's conversion line, as written, on a file in the authors' real layout (the
    config a pickled OmegaConf DictConfig): no --allow_pickle, nothing pickled is executed."""
    import re
    import shlex

    from patch_forcing import checkpoint
    from tests import REPO, tiny_assets

    line = re.search(r"^python -m patch_forcing\.tools\.convert .*$", (REPO / "README.md").read_text(), re.M)
    argv = shlex.split(line.group(0))[2:]  # ['patch_forcing.tools.convert', '--ckpt=...', '--out=...']
    assert [a.split("=")[0] for a in argv[1:]] == ["--ckpt", "--out"], argv
    ckpt = tiny_assets.write_checkpoint(tmp_path / "pft-tiny_step400k_ema.ckpt")
    assert type(torch.load(ckpt, weights_only=False)["config"]).__name__ == "DictConfig"
    convert.main(["convert", f"--ckpt={ckpt}", f"--out={tmp_path / 'out'}"])
    mcfg, _, params, _ = checkpoint.load_model(tmp_path / "out")
    assert mcfg.depth == tiny_assets.TINY_PARAMS["depth"] and mcfg.per_patch
    readme = (REPO / "README.md").read_text()
    assert "requirements-convert.txt" in readme[max(0, line.start() - 400):line.end()]  # the install line by it
