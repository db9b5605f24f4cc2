"""PFT T2I: forward parity with our independent torch implementation (default and crop positions,
text masks), RoPE angles computed by hand, the 1.2B model's exact parameter count, the
converter's errors, initial values, sharding annotations and input validation."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from patch_forcing import sharding
from patch_forcing.models import hdit_layers, layers, t2i
from tests.models import torch_t2i

pytestmark = pytest.mark.usefixtures("fast_compiles")

CFG = t2i.preset("tiny")
ARCH = {k: v for k, v in CFG.to_dict().items() if k not in ("latent_size", "dtype", "attention_impl")}

fwd = nnx.jit(lambda m, x, t, txt, mask, pos: m(x, t, txt, mask, pos))
build = nnx.jit(lambda key: t2i.T2ITransformer(CFG, rngs=nnx.Rngs(key)))
abstract_model = lambda cfg=CFG: nnx.eval_shape(lambda: t2i.T2ITransformer(cfg, rngs=nnx.Rngs(0)))  # noqa: E731


def torch_model(seed=0):
    """The torch twin with every trainable weight random and non-zero (zero-inits included)."""
    torch.manual_seed(seed)
    model = torch_t2i.TorchT2I(**ARCH)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return model


def ours_from(model):
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    return t2i.load_state(abstract_model(), t2i.convert_torch_state_dict(sd, CFG))


def inputs(b=2, h=8, w=12, n_txt=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, h, w, CFG.in_dim), np.float32)
    t = rng.uniform(size=(b, (h // 2) * (w // 2))).astype(np.float32)
    txt = rng.standard_normal((b, n_txt, CFG.txt_in_dim), np.float32)
    return x, t, txt


def run_torch(model, x, t, txt, pos=None):
    with torch.no_grad():
        v, s = model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(txt),
                     None if pos is None else torch.from_numpy(np.asarray(pos)))
    return v.permute(0, 2, 3, 1).numpy(), s.permute(0, 2, 3, 1).numpy()


def assert_close(ours, ref, tol=1e-5):
    ours = np.asarray(ours)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert rel <= tol and np.abs(ours - ref).max() <= tol * np.abs(ref).max(), rel


@pytest.fixture(scope="module")
def pair():
    model = torch_model()
    return model, ours_from(model)


# ----------------------------------------------------------------------------- torch parity


def test_forward_matches_torch_nonsquare(pair):
    tm, ours = pair
    x, t, txt = inputs()
    v, s = fwd(ours, x, t, txt, None, None)
    v_ref, s_ref = run_torch(tm, x, t, txt)
    assert v.shape == (2, 8, 12, 3) and s.shape == (2, 8, 12, 1)
    assert np.abs(s_ref).max() > 0.1 and np.abs(v_ref).max() > 0.1  # weights are far from init
    assert_close(v, v_ref)
    assert_close(s, s_ref)


def test_crop_positions_match_torch(pair):
    tm, ours = pair
    metas = [dict(top=40, left=8, orig_h=256, orig_w=128), dict(top=0, left=100, orig_h=64, orig_w=200)]
    pos = np.stack([t2i.crop_positions(m["top"], m["left"], m["orig_h"], m["orig_w"], 8) for m in metas])
    pos_ref = np.stack([torch_t2i.crop_pos(m, 8).numpy() for m in metas])
    np.testing.assert_allclose(pos, pos_ref, rtol=0, atol=1e-6)
    x, t, txt = inputs(h=8, w=8)
    v, s = fwd(ours, x, t, txt, None, pos)
    v_ref, s_ref = run_torch(tm, x, t, txt, pos_ref)
    assert_close(v, v_ref)
    assert_close(s, s_ref)
    v_full, _ = run_torch(tm, x, t, txt)  # full-canvas positions
    assert np.abs(np.asarray(v) - v_full).max() > 1e-3  # the crop offsets do reach RoPE


def test_text_mask_ignores_padding(pair):
    tm, ours = pair
    x, t, txt = inputs(n_txt=6)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1] * 6], bool)
    v, s = fwd(ours, x, t, txt, mask, None)
    garbage = txt.copy()
    garbage[0, 4:] = 100.0 * np.random.default_rng(1).standard_normal((2, CFG.txt_in_dim))
    v2, s2 = fwd(ours, x, t, garbage, mask, None)
    np.testing.assert_allclose(v2, v, rtol=0, atol=1e-6)
    np.testing.assert_allclose(s2, s, rtol=0, atol=1e-6)
    # = the reference on the unpadded text (text RoPE positions 0..3 are the same)
    v_ref0, s_ref0 = run_torch(tm, x[:1], t[:1], txt[:1, :4])
    v_ref1, s_ref1 = run_torch(tm, x[1:], t[1:], txt[1:])
    assert_close(np.asarray(v)[:1], v_ref0)
    assert_close(np.asarray(s)[:1], s_ref0)
    assert_close(np.asarray(v)[1:], v_ref1)
    # with nothing masked (= txt_mask None) the padding is attended to, as in the reference
    v3, _ = fwd(ours, x, t, txt, np.ones_like(mask), None)
    assert np.abs(np.asarray(v3)[0] - v_ref0[0]).max() > 1e-3
    assert_close(np.asarray(v3)[1:], v_ref1)


# ----------------------------------------------------------------------------- RoPE, positions


def test_rope_angles_by_hand():
    """2x2 grid, head_dim 16, 2 heads: per axis 2 frequencies per head from the ladder
    pi * 10^(k/4), k = 0..3, dealt round-robin: head 0 gets k = 0, 2; head 1 gets k = 1, 3."""
    pos = t2i.canvas_positions(2, 2)  # (row, col) in {-0.5, 0.5}
    np.testing.assert_allclose(pos, [[[-0.5, -0.5], [-0.5, 0.5]], [[0.5, -0.5], [0.5, 0.5]]])
    freqs = hdit_layers.rope_freqs_2d(16, 2)
    theta = np.asarray(hdit_layers.rope_angles(jnp.asarray(pos.reshape(1, 4, 2)), jnp.asarray(freqs)))[0]
    assert theta.shape == (4, 2, 4)  # (tokens, heads, 2 axes x 2 freqs)
    f = [math.pi * 10 ** (k / 4) for k in range(4)]
    for i in range(2):
        for j in range(2):
            r, c = i - 0.5, j - 0.5
            want = [[r * f[0], r * f[2], c * f[0], c * f[2]], [r * f[1], r * f[3], c * f[1], c * f[3]]]
            np.testing.assert_allclose(theta[2 * i + j], want, rtol=1e-6)
    # channel m < 4 pairs with m + 4; channels 8..15 are not rotated
    x = jnp.eye(16)[None, :, None, :]  # (1, 16 vectors, 1 head, 16)
    th = jnp.broadcast_to(jnp.asarray(theta[3, 1]), (1, 16, 1, 4))
    y = np.asarray(hdit_layers.apply_rope(x, th))[0, :, 0]
    for m in range(4):
        a = theta[3, 1, m]
        np.testing.assert_allclose(y[m, [m, m + 4]], [math.cos(a), math.sin(a)], atol=1e-6)
        np.testing.assert_allclose(y[m + 4, [m, m + 4]], [-math.sin(a), math.cos(a)], atol=1e-6)
    np.testing.assert_array_equal(y[8:], np.eye(16)[8:])


def test_positions():
    np.testing.assert_allclose(t2i.canvas_positions(2, 4)[..., 0], [[-0.25] * 4, [0.25] * 4])  # wide
    np.testing.assert_allclose(t2i.canvas_positions(2, 4)[1, :, 1], [-0.75, -0.25, 0.25, 0.75])
    merged = t2i.patch_positions(jnp.asarray(t2i.canvas_positions(4, 6))[None], 2)  # patch centres
    np.testing.assert_allclose(merged[0], t2i.canvas_positions(2, 3).reshape(6, 2), atol=1e-7)
    crop = t2i.crop_positions(top=17, left=9, orig_h=64, orig_w=48, size=(4, 3))  # latent 8x6, at (2, 1)
    np.testing.assert_array_equal(crop, t2i.canvas_positions(8, 6)[2:6, 1:4])
    with pytest.raises(ValueError, match="does not fit the 8x6 latent grid"):
        t2i.crop_positions(top=40, left=0, orig_h=64, orig_w=48, size=4)


# ----------------------------------------------------------------------------- counts, init, sharding


def test_param_count_pft_1p2b():
    abstract = abstract_model(t2i.preset("pft_1p2b"))
    count = lambda leaves: sum(math.prod(a.shape) for a in leaves)  # noqa: E731
    assert count(jax.tree.leaves(nnx.state(abstract, nnx.Param))) == 1_239_969_176
    fixed = dict(nnx.to_flat_state(nnx.state(abstract, layers.FixedEmbedding)))
    rope = [v.shape for k, v in fixed.items() if k[-1] == "freqs"]
    assert len(rope) == 58 and all(math.prod(s) == 384 for s in rope)  # 22,272 frozen frequencies
    assert fixed[("t_embedder", "time_emb", "kernel")].shape == (1, 192)  # the Fourier features
    assert len(fixed) == 59
    assert t2i.param_count(CFG) == sum(p.numel() for p in torch_model().parameters() if p.requires_grad)


def test_fresh_model_outputs_zeros_and_init_values():
    model = build(jax.random.key(3))
    v, s = fwd(model, *inputs(), None, None)
    assert np.all(np.asarray(v) == 0) and np.all(np.asarray(s) == 0)  # zero-initialised head
    blk = model.blocks[0]
    assert np.all(np.asarray(blk.self_attn.scale[...]) == 10.0)
    for zero in (blk.self_attn.out_proj, blk.cross_attn.out_proj, blk.ff.down_proj, blk.ff.norm.linear):
        assert np.all(np.asarray(zero.kernel[...]) == 0)
    qkv = np.asarray(blk.self_attn.qkv_proj.kernel[...])  # torch's default: U(+-1/sqrt(fan_in))
    assert 0.9 / math.sqrt(CFG.hidden_dim) < np.abs(qkv).max() <= 1 / math.sqrt(CFG.hidden_dim)
    np.testing.assert_array_equal(blk.self_attn.pos_emb.freqs[...], hdit_layers.rope_freqs_2d(16, 2))


def test_every_variable_has_logical_sharding_and_fsdp_build_matches(pair):
    tm, ours = pair  # built under an Explicit-axes FSDP mesh, the model still matches torch
    abstract = abstract_model()
    for path, var in nnx.to_flat_state(nnx.state(abstract)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.shape), path
        assert set(names) <= {"embed", "mlp", None}, path
    specs = nnx.get_partition_spec(nnx.state(abstract))
    assert specs["blocks"][0]["ff"]["down_proj"]["kernel"].get_value() == jax.P("mlp", "embed")
    x, t, txt = inputs(b=8, h=8, w=8)
    v_ref, _ = run_torch(tm, x, t, txt)
    kind = jax.sharding.AxisType.Explicit
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(kind, kind), devices=jax.devices()[:8])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.logical_axis_rules(True)):
        model = t2i.load_state(abstract_model(), nnx.to_pure_dict(nnx.state(ours)))  # annotated shardings
    kernel = model.blocks[0].self_attn.qkv_proj.kernel[...]
    assert kernel.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, jax.P("fsdp", None)), 2)
    batch = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp")))
    with jax.set_mesh(mesh):
        v, _ = fwd(model, *jax.device_put((x, t, txt), batch), None, None)
    assert_close(v, v_ref)


# ----------------------------------------------------------------------------- errors, config


def test_converter_errors():
    sd = {k: v.numpy() for k, v in torch_model().state_dict().items()}
    bad = dict(sd)
    del bad["blocks.1.cross_attn.kv_proj.weight"]
    with pytest.raises(ValueError, match=r"missing key 'blocks.1.cross_attn.kv_proj.weight' \(1 missing"):
        t2i.convert_torch_state_dict(bad, CFG)
    with pytest.raises(ValueError, match=r"unexpected key 'blocks.2.ff.up_proj.weight'"):
        t2i.convert_torch_state_dict({**sd, "blocks.2.ff.up_proj.weight": sd["blocks.1.ff.up_proj.weight"]}, CFG)
    bad = {**sd, "merge.proj.weight": np.zeros((32, 13), np.float32)}
    with pytest.raises(ValueError, match=r"state_dict\['merge.proj.weight'\] has shape \(32, 13\), expected \(32, 12\)"):
        t2i.convert_torch_state_dict(bad, CFG)
    bad = {**sd, "blocks.0.self_attn.pos_emb.freqs": 2 * sd["blocks.0.self_attn.pos_emb.freqs"]}
    with pytest.raises(ValueError, match="differs from the fixed RoPE frequencies"):
        t2i.convert_torch_state_dict(bad, CFG)


def test_config_round_trip_and_errors():
    cfg = t2i.preset("pft_1p2b", in_dim=32, dtype="bfloat16", latent_size=(32, 48))
    assert t2i.T2IConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for field, value, msg in [
        ("head_dim", 12, "hidden_dim=32 must be divisible by head_dim=12"),
        ("head_dim", 4, "head_dim must be a multiple of 8"),
        ("txt_refiner_head_dim", 6, "txt_refiner_head_dim must be a multiple of 4"),
        ("latent_size", 9, r"patch_size=2 must divide latent_size=\(9, 9\)"),
        ("dtype", "fp8", r"dtype='fp8' is not one of \['float32', 'bfloat16'\]"),
    ]:
        with pytest.raises(ValueError, match=msg):
            t2i.preset("tiny", **{field: value})
    with pytest.raises(ValueError, match="T2I preset='huge' is not one of"):
        t2i.preset("huge")
    with pytest.raises(ValueError, match=r"unknown T2IConfig fields \['foo'\]"):
        t2i.T2IConfig.from_dict({**CFG.to_dict(), "foo": 1})


def test_bad_inputs(pair):
    _, model = pair
    x, t, txt = inputs()
    with pytest.raises(ValueError, match=r"t must have shape \(B, N\)=\(2, 24\)"):
        model(x, t[:, :5], txt)
    with pytest.raises(ValueError, match=r"x must have shape \(B, H, W, 3\) with H, W divisible"):
        model(x[:, :7], t, txt)
    with pytest.raises(ValueError, match=r"txt must have shape \(B, L, txt_in_dim\)=\(2, L, 12\)"):
        model(x, t, txt[..., :5])
    with pytest.raises(ValueError, match=r"txt_mask must have shape \(B, L\)=\(2, 5\)"):
        model(x, t, txt, np.ones((2, 4), bool))
    with pytest.raises(ValueError, match=r"pos must have shape \(B, H, W, 2\)=\(2, 8, 12, 2\)"):
        model(x, t, txt, None, np.zeros((2, 8, 8, 2), np.float32))
