"""DiT: shapes for every preset, exact zero output at init, conditioning sensitivity, DiT's
initialisers, the reference's parameter counts, sharding annotations, and input validation."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from patch_forcing import sharding
from patch_forcing.flow import interpolant
from patch_forcing.models import dit, layers


pytestmark = pytest.mark.usefixtures("fast_compiles")


def tiny(per_patch=True, **kw):
    fields = dict(image_size=(8, 12), in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                  num_classes=5, per_patch=per_patch)
    fields.update(kw)
    return dit.DiTConfig(**fields)


@functools.lru_cache(maxsize=None)
def _builder(cfg):
    return nnx.jit(lambda key: dit.DiT(cfg, rngs=nnx.Rngs(key)))


def build(cfg, seed=0):
    """DiT(cfg) initialised under one jit (eager init compiles every initializer separately)."""
    return _builder(cfg)(jax.random.key(seed))


fwd = nnx.jit(lambda model, x, t, y: model(x, t, y))


def perturbed(cfg, seed=1, scale=0.1):
    """A model whose every parameter (the zero-initialised ones too) is random and non-zero."""
    model = build(cfg)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda w: np.asarray(w) + scale * rng.standard_normal(w.shape, np.float32),
        nnx.to_pure_dict(nnx.state(model, nnx.Param)),
    )
    return dit.load_params(model, params)


def inputs(cfg, b=2, seed=0):
    rng = np.random.default_rng(seed)
    h, w = cfg.image_size
    x = rng.standard_normal((b, h, w, cfg.in_channels), np.float32)
    t = rng.uniform(size=(b, cfg.num_patches) if cfg.per_patch else (b,)).astype(np.float32)
    y = rng.integers(0, cfg.num_classes + 1, (b,), dtype=np.int32)  # the null class included
    return jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)


def abstract_forward(cfg, b=2):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: dit.DiT(cfg, rngs=nnx.Rngs(0))))
    h, w = cfg.image_size
    x = jax.ShapeDtypeStruct((b, h, w, cfg.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((b, cfg.num_patches) if cfg.per_patch else (b,), jnp.float32)
    y = jax.ShapeDtypeStruct((b,), jnp.int32)
    return jax.eval_shape(lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y), state, x, t, y)


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", dit.PRESETS)
def test_preset_output_shapes_abstract(name):
    cfg = dit.preset(name, depth=1)  # shapes do not depend on depth; full depth is counted below
    v, s = abstract_forward(cfg)
    assert v.shape == (2, 32, 32, 4) and v.dtype == jnp.float32
    if name.startswith("PF"):
        assert cfg.per_patch and s.shape == (2, 32, 32, 1)
    else:
        assert not cfg.per_patch and s is None


def test_preset_table():
    assert len(dit.PRESETS) == 2 * (4 * 3 + 3)
    for name in dit.PRESETS:
        cfg = dit.preset(name)
        size, p = name.split("-", 1)[1].split("/")
        assert cfg.patch_size == int(p) and cfg.per_patch == name.startswith("PF-")
        assert (cfg.image_size, cfg.in_channels, cfg.num_classes) == ((32, 32), 4, 1000)
        expected = {"Tiny": (4, 128, 4), "S": (12, 384, 6), "B": (12, 768, 12),
                    "L": (24, 1024, 16), "XL": (28, 1152, 16)}[size]
        assert (cfg.depth, cfg.hidden_size, cfg.num_heads) == expected
    mnist = dit.preset("PF-Tiny/4", image_size=28, in_channels=1, num_classes=10)
    assert (mnist.image_size, mnist.num_patches, mnist.out_channels) == ((28, 28), 49, 2)


@pytest.mark.parametrize("per_patch", [True, False])
def test_tiny_concrete_shapes_nonsquare(per_patch):
    cfg = tiny(per_patch)
    v, s = fwd(perturbed(cfg), *inputs(cfg, b=3))
    assert v.shape == (3, 8, 12, 3)
    assert (s.shape == (3, 8, 12, 1)) if per_patch else (s is None)
    assert np.all(np.isfinite(v))


@pytest.mark.parametrize("per_patch", [True, False])
def test_fresh_model_outputs_exact_zeros(per_patch):
    cfg = tiny(per_patch)
    v, s = fwd(build(cfg, seed=3), *inputs(cfg))
    assert np.all(np.asarray(v) == 0.0)
    if per_patch:
        assert np.all(np.asarray(s) == 0.0)


# ----------------------------------------------------------------------------- conditioning


def test_per_patch_time_is_per_token():
    cfg = tiny(True)
    model = perturbed(cfg)
    x, t, y = inputs(cfg, b=1)
    v0, s0 = fwd(model, x, t, y)
    k = 5  # change ONE patch's time
    v1, s1 = fwd(model, x, t.at[0, k].set(1.0 - t[0, k]), y)
    dv = interpolant.pool_patches(jnp.abs(v1 - v0), cfg.patch_size, "max")[0]  # (N,)
    ds = interpolant.pool_patches(jnp.abs(s1 - s0), cfg.patch_size, "max")[0]
    assert dv[k] > 1e-3 and ds[k] > 1e-3  # its own token's velocity and log-variance move
    others = np.delete(np.asarray(dv), k)
    assert np.all(others > 0)  # and, through attention, every other token
    assert dv[k] > np.median(others)  # the direct (adaLN) effect dominates
    # tokens are not exchangeable (position embedding): swapping two patches' times matters
    t_sw = t.at[0, 0].set(t[0, 1]).at[0, 1].set(t[0, 0])
    assert not np.allclose(fwd(model, x, t_sw, y)[0], v0)


def test_global_model_uses_t_y_and_x():
    cfg = tiny(False)
    model = perturbed(cfg)
    x, t, y = inputs(cfg, b=2)
    v0, _ = fwd(model, x, t, y)
    for name, args in {
        "t": (x, t.at[1].set(1.0 - t[1]), y),
        "y": (x, t, y.at[1].set((y[1] + 1) % (cfg.num_classes + 1))),
        "x": (x.at[1, 0, 0, 0].add(1.0), t, y),
    }.items():
        v1, _ = fwd(model, *args)
        assert np.abs(np.asarray(v1[1] - v0[1])).max() > 1e-4, name  # sample 1 changed
        np.testing.assert_array_equal(np.asarray(v1[0]), np.asarray(v0[0]), err_msg=name)  # 0 not


def test_per_patch_equal_times_match_global_model():
    """With equal patch times the per-patch model's velocity equals a global model sharing its
    weights (all but the head's extra log-variance outputs)."""
    pcfg, gcfg = tiny(True), tiny(False)
    pm = perturbed(pcfg)
    pp = nnx.to_pure_dict(nnx.state(pm, nnx.Param))
    gp = jax.tree.map(lambda a: a, pp)
    p, c = pcfg.patch_size, pcfg.in_channels
    keep = np.arange(p * p * (c + 1)).reshape(p, p, c + 1)[..., :c].reshape(-1)  # drop channel C
    gp["final_layer"]["linear"]["kernel"] = pp["final_layer"]["linear"]["kernel"][:, keep]
    gp["final_layer"]["linear"]["bias"] = pp["final_layer"]["linear"]["bias"][keep]
    gm = dit.load_params(build(gcfg), gp)
    x, t, y = inputs(gcfg, b=2)
    vg, _ = fwd(gm, x, t, y)
    vp, _ = fwd(pm, x, jnp.repeat(t[:, None], pcfg.num_patches, axis=1), y)
    np.testing.assert_allclose(vp, vg, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_tracks_float32():
    cfg = tiny(True)
    m32 = perturbed(cfg)
    params = nnx.to_pure_dict(nnx.state(m32, nnx.Param))
    m16 = dit.load_params(build(tiny(True, dtype="bfloat16")), params)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(nnx.state(m16, nnx.Param)))
    args = inputs(cfg)
    (v32, s32), (v16, s16) = fwd(m32, *args), fwd(m16, *args)
    assert v16.dtype == jnp.float32 and s16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(v16 - v32) / jnp.linalg.norm(v32))
    assert 0 < rel < 0.05


# ----------------------------------------------------------------------------- pieces


def test_patchify_matches_flow_conventions():
    x = jax.random.normal(jax.random.key(0), (2, 8, 12, 3))
    tok = interpolant.patchify(x, 2)  # the DiT's tokenizer
    want = np.asarray(x).reshape(2, 4, 2, 6, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 24, 12)
    np.testing.assert_array_equal(tok, want)  # raster token order, each token laid out (p, p, C)
    np.testing.assert_array_equal(interpolant.unpatchify(tok, 2, 8, 12), x)


def test_timestep_embedding_values():
    e = dit.timestep_embedding(jnp.array([0.0, 0.5]))
    assert e.shape == (2, 256)
    np.testing.assert_allclose(e[0], np.r_[np.ones(128), np.zeros(128)])
    freqs = np.exp(-np.log(10000.0) * np.arange(128) / 128)  # t in [0, 1] used as is
    np.testing.assert_allclose(e[1], np.r_[np.cos(0.5 * freqs), np.sin(0.5 * freqs)], atol=1e-6)


def test_pos_embed_layout():
    d, gh, gw = 16, 3, 5
    pe = dit.sincos_pos_embed(d, gh, gw)
    omega = 1.0 / 10000 ** (np.arange(4) / 4)
    i, j = 2, 3  # token index i * gw + j: first half encodes the column j, second the row i
    np.testing.assert_allclose(
        pe[i * gw + j], np.r_[np.sin(j * omega), np.cos(j * omega), np.sin(i * omega), np.cos(i * omega)]
    )


def test_initialisers_follow_dit():
    cfg = tiny(True, hidden_size=64, num_heads=4, num_classes=999)
    m = build(cfg)
    d, p, c = 64, 2, 3
    qkv = np.asarray(m.blocks[0].attn.qkv.kernel[...])
    bound = math.sqrt(6 / (d + 3 * d))  # xavier-uniform
    assert np.abs(qkv).max() <= bound and np.std(qkv) == pytest.approx(bound / math.sqrt(3), rel=0.05)
    pk = np.asarray(m.x_embedder.kernel[...])
    assert pk.shape == (p, p, c, d)
    bound = math.sqrt(6 / (p * p * c + d))  # like a linear on the flattened kernel
    assert np.abs(pk).max() <= bound and np.std(pk) == pytest.approx(bound / math.sqrt(3), rel=0.1)
    for w in (m.t_embedder.fc1.kernel, m.t_embedder.fc2.kernel, m.y_embedder.embedding):
        assert np.std(np.asarray(w[...])) == pytest.approx(0.02, rel=0.05)
    zero = [m.final_layer.linear.kernel, m.final_layer.adaLN_modulation.kernel]
    zero += [b.adaLN_modulation.kernel for b in m.blocks]
    assert all(np.all(np.asarray(w[...]) == 0) for w in zero)
    biases = [v for path, v in nnx.to_flat_state(nnx.state(m, nnx.Param)) if path[-1] == "bias"]
    assert biases and all(np.all(np.asarray(b[...]) == 0) for b in biases)
    assert m.y_embedder.embedding.shape == (cfg.num_classes + 1, d)  # + the null class


# ----------------------------------------------------------------------------- counts, sharding


def test_param_counts_match_reference():
    pf, g = dit.param_count(dit.preset("PF-B/2")), dit.param_count(dit.preset("DiT-B/2"))
    assert pf == 130_306_580
    assert pf - g == (768 + 1) * 2 * 2  # the difficulty head: (D + 1) * p * p
    assert dit.param_count(dit.preset("PF-L/2")) == 457_828_372
    assert dit.param_count(dit.preset("PF-XL/2")) == 674_820_884
    abstract = nnx.eval_shape(lambda: dit.DiT(dit.preset("PF-B/2"), rngs=nnx.Rngs(0)))
    fixed = jax.tree.leaves(nnx.state(abstract, dit.FixedEmbedding))
    assert [f.shape for f in fixed] == [(1, 256, 768)]  # the position embedding is not trainable
    assert "pos_embed" not in nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


def test_every_variable_has_logical_sharding():
    cfg = tiny(True)
    abstract = nnx.eval_shape(lambda: dit.DiT(cfg, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(abstract))
    assert len(flat) == 2 + 4 + 1 + 1 + cfg.depth * 10 + 4
    for path, var in flat:
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.shape), path
        assert set(names) <= set(layers.LOGICAL_AXES) | {None}, path
        assert "embed" in names or path[-1] == "bias" or path[0] == "final_layer", path
    specs = nnx.get_partition_spec(nnx.state(abstract))
    assert specs["blocks"][0]["mlp"]["fc2"]["kernel"].get_value() == jax.P("mlp", "embed")
    assert specs["y_embedder"]["embedding"].get_value() == jax.P("vocab", "embed")
    assert dict(sharding.logical_axis_rules(True)) == {"embed": "fsdp", "mlp": None, "vocab": None}


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_built_under_fsdp_mesh_is_sharded_and_equal(axis_type):
    cfg = tiny(True, hidden_size=32)
    ref = perturbed(cfg)
    args = inputs(cfg, b=8)
    v_ref, s_ref = fwd(ref, *args)
    kind = getattr(jax.sharding.AxisType, axis_type)
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(kind, kind), devices=jax.devices()[:8])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.logical_axis_rules(True)):
        model = build(cfg)
        dit.load_params(model, nnx.to_pure_dict(nnx.state(ref, nnx.Param)))
    want = jax.sharding.NamedSharding(mesh, jax.P("fsdp", None))
    assert model.blocks[0].mlp.fc1.kernel[...].sharding.is_equivalent_to(want, 2)
    batch = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp")))
    with jax.set_mesh(mesh):
        v, s = nnx.jit(lambda m, x, t, y: m(x, t, y))(model, *jax.device_put(args, batch))
    np.testing.assert_allclose(v, v_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s, s_ref, rtol=1e-5, atol=1e-5)


def test_mesh_without_rules_is_a_clear_error():
    mesh = jax.make_mesh((8,), ("fsdp",), devices=jax.devices()[:8])
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="logical_axis_rules"):
        dit.DiT(tiny(True), rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- config, errors


def test_config_json_round_trip():
    cfg = dit.preset("PF-Tiny/2", image_size=(8, 12), dtype="bfloat16", attention_impl="xla")
    again = dit.DiTConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.image_size == (8, 12)


def test_bad_inputs():
    cfg = tiny(True)
    model = build(cfg)
    x, t, y = inputs(cfg, b=4)
    with pytest.raises(ValueError, match=r"t must have shape \(B, N\)=\(4, 24\) for a per-patch model, got \(4,\)"):
        model(x, t[:, 0], y)
    gmodel = build(tiny(False))
    with pytest.raises(ValueError, match=r"t must have shape \(B,\)=\(4,\) for a global model"):
        gmodel(x, t, y)
    with pytest.raises(ValueError, match=r"x must have shape .*\(B, 8, 12, 3\)"):
        model(x[:, :6, :8], t, y)
    with pytest.raises(ValueError, match=r"x must have shape"):
        model(x[..., :2], t, y)
    with pytest.raises(ValueError, match=r"y must have shape \(B,\)"):
        model(x, t, y[:2])


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", 32, "hidden_size=32 must be divisible by num_heads=3"),
    ("hidden_size", 6, "hidden_size must be a positive multiple of 4"),
    ("patch_size", 3, r"patch_size=3 must divide image_size=\(8, 8\)"),
    ("depth", 0, "depth must be >= 1"),
    ("dtype", "fp8", r"dtype='fp8' is not one of \['float32', 'bfloat16', 'float16'\]"),
    ("attention_impl", "flash", "attention_impl='flash' is not one of"),
    ("attention_impl", "cudnn", "attention_impl='cudnn' needs dtype 'bfloat16' or 'float16'"),
    ("image_size", (8, 8, 8), "image_size must be an int or"),
    ("num_heads", 0, "num_heads must be >= 1"),
])
def test_bad_config_fields(field, value, message):
    fields = dict(image_size=8, in_channels=3, patch_size=2, hidden_size=48, depth=2, num_heads=3)
    dit.DiTConfig(**fields)  # valid as is
    fields[field] = value
    with pytest.raises(ValueError, match=message):
        dit.DiTConfig(**fields)


def test_bad_preset_and_fields():
    with pytest.raises(ValueError, match=r"model preset='PF-H/2' is not one of \['PF-Tiny/1'"):
        dit.preset("PF-H/2")
    with pytest.raises(ValueError, match="preset override 'width' is not a DiTConfig field"):
        dit.preset("PF-B/2", width=3)
    with pytest.raises(ValueError, match=r"unknown DiTConfig fields \['foo'\]"):
        dit.DiTConfig.from_dict({**tiny().to_dict(), "foo": 1})
    model = build(tiny(True))
    bad = nnx.to_pure_dict(nnx.state(build(tiny(True, hidden_size=16)), nnx.Param))
    with pytest.raises(ValueError, match="params do not fit the model"):
        dit.load_params(model, bad)
