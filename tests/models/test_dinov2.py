"""DINOv2 port vs transformers' Dinov2Model / Dinov2WithRegistersModel on tiny random weights,
torch's bicubic, both checkpoint layouts, and the loader's errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from patch_forcing import sharding
from patch_forcing.models import dinov2 as dv
from patch_forcing.models import layers

pytestmark = pytest.mark.usefixtures("fast_compiles")
torch.set_num_threads(1)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=4, image_size=16)


def hf_model(registers: bool, swiglu: bool = False, seed: int = 0):
    """A tiny random transformers DINOv2 (4x4 position grid) with O(1) weights throughout (its own
    init, std 0.02, would hide mistakes in the blocks, norms and position resampling)."""
    torch.manual_seed(seed)
    kw = dict(TINY, use_swiglu_ffn=swiglu)
    model = (Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=2, **kw)) if registers
             else Dinov2Model(Dinov2Config(**kw))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.ndim >= 2:  # linear, conv: unit-variance outputs
                p.normal_(0, p[0].numel() ** -0.5)
            elif "norm" in name and name.endswith("weight") or "lambda1" in name:
                p.uniform_(0.5, 1.5)
            else:  # biases, cls / register / position / mask tokens
                p.normal_(0, 0.5 if name.endswith("bias") else 1.0)
    return model


def numpy_sd(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def ours(model):
    """(config, jitted forward) of our port with the transformers model's converted weights."""
    sd = numpy_sd(model)
    cfg = dv._infer_config(sd, "hf", model.config.to_dict())
    graphdef, state = nnx.split(layers.load_params(dv.DinoV2(cfg), dv.convert(sd, cfg, "hf")))
    forward = jax.jit(lambda x: nnx.merge(graphdef, state)(x))
    return cfg, lambda x: forward(jnp.asarray(x))


def torch_out(model, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.array(x_nhwc)).permute(0, 3, 1, 2)).last_hidden_state.numpy()


def to_hub(sd: dict) -> dict:
    """Our own inverse of the facebookresearch -> transformers key map (no conversion script ships
    with the installed transformers): fused qkv / w12, hub names."""
    top = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
           "embeddings.register_tokens": "register_tokens", "embeddings.position_embeddings": "pos_embed",
           "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
           "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    out = {top[k]: v for k, v in sd.items() if k in top}
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer.")}
    for i in layers:
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for t in ("weight", "bias"):
            for a, b in (("norm1", "norm1"), ("norm2", "norm2"), ("attention.o_proj", "attn.proj"),
                         ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"), ("mlp.down_proj", "mlp.w3")):
                if src + f"{a}.{t}" in sd:
                    out[dst + f"{b}.{t}"] = sd[src + f"{a}.{t}"]
            out[dst + f"attn.qkv.{t}"] = np.concatenate([sd[src + f"attention.{q}_proj.{t}"] for q in "qkv"])
            if src + f"mlp.gate_proj.{t}" in sd:
                out[dst + f"mlp.w12.{t}"] = np.concatenate([sd[src + f"mlp.{g}_proj.{t}"] for g in ("gate", "up")])
        out[dst + "ls1.gamma"] = sd[src + "layer_scale1.lambda1"]
        out[dst + "ls2.gamma"] = sd[src + "layer_scale2.lambda1"]
    return out


def to_legacy_hf(sd: dict) -> dict:
    """The names of the model.safetensors files on the Hugging Face hub (before transformers 5)."""
    ren = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
           "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense",
           "mlp.down_proj": "mlp.weights_out"}
    out = {}
    for k, v in sd.items():
        if ".mlp.gate_proj." in k:
            out[k.replace("gate_proj", "weights_in")] = np.concatenate([v, sd[k.replace("gate", "up")]])
        elif ".mlp.up_proj." not in k:
            out[next((k.replace(a, b) for a, b in ren.items() if a in k), k)] = v
    return out


def smooth_field(rng, b=2, n=256) -> np.ndarray:
    """(B, 3, n, n) in [-1, 1]: bicubically upsampled coarse noise plus 5% pixel noise."""
    coarse = torch.from_numpy(rng.standard_normal((b, 3, 9, 9)))
    img = F.interpolate(coarse, size=(n, n), mode="bicubic", align_corners=True).numpy()
    img = img + 0.05 * rng.standard_normal(img.shape)
    return (img / np.abs(img).max()).astype(np.float32)


# ----------------------------------------------------------------------------- bicubic


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("offset", [None, 0.1])
def test_resize_matrix_is_torch_bicubic(antialias, offset):
    rng = np.random.default_rng(0)
    for n_in, n_out in [(37, 16), (37, 32), (4, 6), (4, 3), (16, 23), (256, 224), (7, 7)]:
        x = torch.from_numpy(rng.standard_normal((1, 1, n_in, 3)))  # W=3: torch's AA path misbehaves at W=1
        if offset:
            s = (n_out + offset) / n_in
            ref = F.interpolate(x, scale_factor=(s, 1.0), mode="bicubic", antialias=antialias)
        else:
            s = None
            ref = F.interpolate(x, size=(n_out, 3), mode="bicubic", align_corners=False, antialias=antialias)
        got = dv.resize_matrix(n_in, n_out, antialias, s) @ x[0, 0].numpy()
        np.testing.assert_allclose(got, ref[0, 0].numpy(), atol=1e-12, err_msg=f"{n_in}->{n_out}")


def test_preprocess_matches_torch_bicubic_and_jax_image_resize_does_not():
    """REPA's preprocessing (F.interpolate(x, 224, mode='bicubic'), then ImageNet mean/std) on a
    smooth field: ours within 2e-5 (float32 rounding); jax.image.resize('bicubic') differs by
    ~5e-3 (no antialias; Keys a=-0.5 and renormalised borders) to ~1.4e-2 (its default antialias)
    on the [-1, 1] scale, so it is not used."""
    x = smooth_field(np.random.default_rng(0))
    mean = torch.tensor(dv.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(dv.IMAGENET_STD)[:, None, None]
    resized = F.interpolate(torch.from_numpy(x), 224, mode="bicubic")
    ref = (((resized + 1) / 2 - mean) / std).numpy().transpose(0, 2, 3, 1)
    nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
    got = np.asarray(dv.preprocess(nhwc))
    assert got.shape == (2, 224, 224, 3)
    np.testing.assert_allclose(got, ref, atol=2e-5)
    for aa in (False, True):
        jax_err = np.abs(np.asarray(jax.image.resize(nhwc, (2, 224, 224, 3), "bicubic", antialias=aa))
                         - resized.numpy().transpose(0, 2, 3, 1)).max()
        assert jax_err > 2e-3, jax_err


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("registers", [False, True])
def test_forward_matches_transformers(registers):
    """Native 16x16 (no resampling), 24x20 (grid up, non-square) and 8x12 (grid down: antialias
    matters for registers); patch tokens, cls and registers within 1e-4."""
    model = hf_model(registers)
    cfg, net = ours(model)
    assert (cfg.num_register_tokens, cfg.interpolate_antialias, cfg.interpolate_offset) == (
        2 * registers, registers, 0.0)
    r = cfg.num_register_tokens
    for hw in [(16, 16), (24, 20), (8, 12)]:
        x = np.random.default_rng(1).standard_normal((2, *hw, 3)).astype(np.float32)
        out, ref = net(x), torch_out(model, x)
        assert out["patch_tokens"].shape == (2, hw[0] * hw[1] // 16, 32)
        np.testing.assert_allclose(out["patch_tokens"], ref[:, 1 + r:], atol=1e-4, err_msg=str(hw))
        np.testing.assert_allclose(out["cls"], ref[:, 0], atol=1e-4)
        np.testing.assert_allclose(out["registers"], ref[:, 1:1 + r], atol=1e-4)


def test_swiglu_matches_transformers_and_legacy_names():
    model = hf_model(registers=False, swiglu=True)
    cfg, net = ours(model)
    assert cfg.swiglu and cfg.mlp_hidden == 88  # round8(2/3 * 128)
    x = np.random.default_rng(2).standard_normal((1, 20, 20, 3)).astype(np.float32)
    np.testing.assert_allclose(net(x)["patch_tokens"], torch_out(model, x)[:, 1:], atol=1e-4)
    sd = numpy_sd(model)
    legacy = dv.convert(to_legacy_hf(sd), cfg, "hf")
    jax.tree.map(np.testing.assert_array_equal, legacy, dv.convert(sd, cfg, "hf"))


def test_hub_position_resampling_uses_the_offset_scale_factor():
    """torch.hub models without registers resample with scale_factor (g + 0.1) / 37, not size=g."""
    cfg = dv.preset("dinov2_vitb14")
    assert (cfg.pos_grid, cfg.interpolate_offset, cfg.interpolate_antialias) == (37, 0.1, False)
    cfg = dataclasses.replace(cfg, hidden_size=8, num_heads=2, depth=1)
    net = nnx.eval_shape(lambda: dv.DinoV2(cfg))  # only the position table is made concrete
    pos = np.random.default_rng(8).standard_normal((1, 1 + 37 * 37, 8)).astype(np.float32)
    net.pos_embed.value = jnp.asarray(pos)
    grid = torch.from_numpy(pos[:, 1:].reshape(1, 37, 37, 8)).permute(0, 3, 1, 2).double()  # exact
    ref = F.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic")
    ref = ref.permute(0, 2, 3, 1).reshape(1, 256, 8).numpy()
    got = np.asarray(net.position_embedding(16, 16))
    np.testing.assert_allclose(got[:, 1:], ref, atol=1e-5)
    np.testing.assert_array_equal(got[:, 0], pos[:, 0])
    by_size = F.interpolate(grid, size=(16, 16), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 256, 8)
    assert np.abs(got[:, 1:] - by_size.numpy()).max() > 1e-3  # transformers' form differs


def test_preset_sizes_match_transformers():
    """Every torch.hub preset has transformers' parameter count (without the mask token); ours is
    counted on one block (fast) and scaled to the preset's depth."""
    for name in dv.PRESETS[:-1]:
        cfg = dv.preset(name)
        kw = dict(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                  patch_size=14, image_size=518, use_swiglu_ffn=cfg.swiglu)
        with torch.device("meta"):
            model = (Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**kw)) if cfg.num_register_tokens
                     else Dinov2Model(Dinov2Config(**kw)))
        want = sum(p.numel() for k, p in model.state_dict().items() if "mask_token" not in k)
        shapes = dv.param_shapes(dataclasses.replace(cfg, depth=1))
        per_block = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith("blocks/"))
        assert sum(int(np.prod(s)) for s in shapes.values()) + (cfg.depth - 1) * per_block == want, name
    assert dv.preset("dinov2_vitb14").depth == 12 and dv.preset("dinov2_vitg14").mlp_hidden == 4096
    assert dv.DinoV2Config.from_dict(dv.preset("dinov2_vitg14_reg").to_dict()) == dv.preset("dinov2_vitg14_reg")


# ----------------------------------------------------------------------------- layouts and files


@pytest.mark.parametrize("registers,swiglu", [(False, False), (True, True)])
def test_hub_layout_maps_every_tensor(registers, swiglu, tmp_path):
    """hf -> (our inverse map) -> hub .pth -> load_dinov2 gives exactly the params of the hf path;
    an extra tensor is refused."""
    model = hf_model(registers, swiglu, seed=3)
    sd = numpy_sd(model)
    cfg = dv._infer_config(sd, "hf", model.config.to_dict())
    hub = to_hub(sd)
    fused = (2 + swiglu) * 2 * cfg.depth  # q, k, v -> qkv and gate, up -> w12 (weight, bias)
    assert len(hub) == len(sd) - fused
    path = tmp_path / "dinov2_tiny.pth"
    torch.save({k: torch.from_numpy(v) for k, v in hub.items()}, path)
    loaded_cfg, params = dv.load_dinov2(str(path), variant=cfg)
    assert loaded_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, params, dv.convert(sd, cfg, "hf"))
    with pytest.raises(ValueError, match="unused.*head.weight"):
        dv.convert({**hub, "head.weight": np.zeros(3)}, cfg, "hub")


def test_load_hf_folder_and_jitted_encoder_match_transformers(tmp_path):
    model = hf_model(registers=True, seed=4)
    model.save_pretrained(tmp_path)  # config.json + model.safetensors
    cfg, params = dv.load_dinov2(str(tmp_path))
    assert cfg.num_register_tokens == 2 and cfg.interpolate_antialias
    features = jax.jit(dv.make_encoder(cfg, params, resolution=24))
    images = np.random.default_rng(5).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    got = features(params, jnp.asarray(images))  # (2, 36, 32)
    ref = torch_out(model, np.asarray(dv.preprocess(jnp.asarray(images), 24)))[:, 3:]
    np.testing.assert_allclose(got, ref, atol=1e-4)
    bf16 = jax.jit(dv.make_encoder(dataclasses.replace(cfg, dtype="bfloat16"), params, resolution=24))
    low = np.asarray(bf16(params, jnp.asarray(images)))
    assert low.dtype == np.float32
    assert np.linalg.norm(low - got) / np.linalg.norm(got) < 2e-2  # bf16 matmuls, f32 residual stream


def test_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        dv.load_dinov2(str(tmp_path / "missing.pth"), variant="dinov2_vitl14")
    msg = str(e.value)
    assert "\n" not in msg and "missing.pth" in msg
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth" in msg
    assert "facebook/dinov2-large" in msg
    model = hf_model(registers=False)
    sd = numpy_sd(model)
    cfg = dv._infer_config(sd, "hf", model.config.to_dict())
    hub = to_hub(sd)
    hub["blocks.1.attn.qkv.weight"] = np.zeros((96, 16), np.float32)
    with pytest.raises(ValueError) as e:
        dv.convert(hub, cfg, "hub")
    msg = str(e.value)
    assert "\n" not in msg and "blocks.1.attn.qkv.weight" in msg and "(96, 16)" in msg and "(96, 32)" in msg
    params = dv.convert(sd, cfg, "hf")
    params["norm"]["scale"] = np.ones(8)
    with pytest.raises(ValueError, match="norm/scale is \\(8,\\), expected \\(32,\\)"):
        dv.make_encoder(cfg, params)


def test_match_tokens():
    feats = jnp.asarray(np.random.default_rng(6).standard_normal((2, 256, 8)), jnp.float32)
    assert dv.match_tokens(feats, (16, 16)) is feats  # ImageNet-256 at patch 2: no resize
    const = jnp.ones((2, 256, 8)) * jnp.arange(8.0)
    for hw in [(8, 8), (32, 32), (16, 8)]:
        out = dv.match_tokens(const, hw)
        assert out.shape == (2, hw[0] * hw[1], 8)
        np.testing.assert_allclose(out, jnp.ones((2, hw[0] * hw[1], 8)) * jnp.arange(8.0), atol=1e-5)
    ramp = jnp.broadcast_to(jnp.arange(16.0)[None, :, None, None], (1, 16, 16, 1)).reshape(1, 256, 1)
    up = np.asarray(dv.match_tokens(ramp, (32, 32))).reshape(32, 32)
    np.testing.assert_allclose(up[1:-1, 0], np.arange(30) / 2 + 0.25, atol=1e-5)  # bilinear, half-pixel
    with pytest.raises(ValueError, match="square grid"):
        dv.match_tokens(feats[:, :255], (16, 16))


def test_config_inferred_from_real_sized_state_dicts():
    """ViT-S/14 with registers: the .pth (hub) gets torch.hub's resampling, the bare safetensors
    (hf) transformers'; a width that is not a multiple of 64 asks for variant=."""
    torch.manual_seed(0)
    with torch.no_grad():
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
            hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=518))
    sd = numpy_sd(model)
    assert dv._infer_config(to_hub(sd), "hub", None) == dv.preset("dinov2_vits14_reg")
    assert dv._infer_config(sd, "hf", None) == dv.preset("dinov2_vits14_reg")  # same for registers
    small = numpy_sd(hf_model(registers=False))
    with pytest.raises(ValueError, match="width-32.*variant="):
        dv._infer_config(to_hub(small), "hub", None)


def test_batch_sharded_under_a_mesh():
    """Built under dit's replicated rules on an 8-device mesh with Auto axes (as train.py's), a
    batch-sharded call keeps its sharding and equals the single-device result."""
    cfg = dv.preset("dinov2_tiny", num_register_tokens=2)
    images = jnp.asarray(np.random.default_rng(7).uniform(-1, 1, (8, 20, 20, 3)), jnp.float32)
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.logical_axis_rules(fsdp=False)):
        params = nnx.to_pure_dict(nnx.state(dv.DinoV2(cfg, rngs=nnx.Rngs(0)), nnx.Param))
        assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(params))
        batch = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp")))
        out = jax.jit(dv.make_encoder(cfg, params, 16))(params, jax.device_put(images, batch))
    assert out.sharding.spec[0] == ("data", "fsdp")
    host = jax.tree.map(np.asarray, params)
    np.testing.assert_allclose(out, jax.jit(dv.make_encoder(cfg, host, 16))(host, images), atol=1e-5)
