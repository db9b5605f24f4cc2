"""Samplers: exactness on an analytic flow, reductions, a literal re-implementation of the reference
loops (per-pixel masks, float64 quantile), NFE accounting, program size, schedules, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patch_forcing.flow import interpolant
from patch_forcing.flow import samplers as S

B, H, W, C, P = 2, 8, 8, 2, 2
N = interpolant.num_patches(H, W, P)
NUM_CLASSES = 5
NULL = NUM_CLASSES
LABELS = jnp.array([1, 3], jnp.int32)
KEY = jax.random.key(0)
NOISE = jax.random.normal(jax.random.key(1), (B, H, W, C))
TARGET = jax.random.normal(jax.random.key(2), (B, H, W, C))


def pixel_time(t, h=H, w=W):
    return interpolant.patch_to_pixels(t, P, h, w) if t.ndim == 2 else t[:, None, None, None]


def analytic_model(target, eps=0.0):
    """The exact velocity towards `target` on straight paths: v = (x1* - x) / (1 - t) per patch.

    If x = t x1* + (1 - t) x0 then x1* - x = (1 - t)(x1* - x0), so v = x1* - x0 is constant along
    the path and an Euler step of any size, on any subset of patches, stays on it.
    s is a fixed nonlinear function of the state, so the adaptive samplers make non-trivial masks.
    """

    def model(x, t, y):
        tgt = jnp.tile(target, (x.shape[0] // target.shape[0], 1, 1, 1))
        v = (tgt - x) / jnp.maximum(1.0 - pixel_time(t), eps)
        s = jnp.sin(4.0 * x[..., :1] + 2.0 * x[..., 1:]) * 2.0
        return v, s

    return model


def toy_params(key=jax.random.key(7)):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        "w": jax.random.normal(k1, (C, C)),
        "emb": jax.random.normal(k2, (NUM_CLASSES + 1, C)),
        "a": jax.random.normal(k3, (C,)),
        "ws": jax.random.normal(k4, (C,)),
    }


def toy_apply(params, x, t, y):
    """A random nonlinear, spatially mixing, label-dependent model with a non-trivial s."""
    tp = pixel_time(t, x.shape[1], x.shape[2])
    h = jnp.tanh(x @ params["w"] + params["emb"][y][:, None, None, :] + tp * params["a"])
    v = 2.0 * h - 0.5 * x + 0.3 * jnp.mean(x, axis=(1, 2), keepdims=True) + jnp.mean(tp * x, axis=(1, 2), keepdims=True)
    s = 2.0 * jnp.sin(3.0 * (x @ params["ws"])[..., None] + 2.0 * tp) + params["emb"][y][:, None, None, :1]
    return v, s


pytestmark = pytest.mark.usefixtures("fast_compiles")


PARAMS = toy_params()
TOY = jax.jit(lambda x, t, y: toy_apply(PARAMS, x, t, y))


def run(cfg, model=TOY, noise=NOISE, labels=LABELS, traj=False, **kw):
    f = jax.jit(lambda n: S.sample(model, n, labels, KEY, cfg, traj, **kw))
    return f(noise)


def cfg_of(name, **kw):
    kw.setdefault("patch_size", P)
    kw.setdefault("null_class", NULL)
    return S.SamplerConfig(name=name, **kw)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", ["euler", "euler_pf", "dual_loop", "look_ahead", "random_order"])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_analytic_flow_lands_on_target(name, cfg_scale):
    out, info = run(cfg_of(name, steps=7, cfg_scale=cfg_scale), model=analytic_model(TARGET))
    np.testing.assert_allclose(out, TARGET, atol=2e-5)
    assert int(info["nfe"]) == S.expected_nfe(cfg_of(name, steps=7))


# ----------------------------------------------------------------------------- literal reference


def np_model(x, t, y):
    v, s = TOY(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y))
    return np.asarray(v), np.asarray(s)


def ref_forward(x, t, y, w):
    """forward_with_cfg_and_uncertainty: doubled batch unless w == 1."""
    if w == 1.0:
        v, s = np_model(x, t, y)
        return v, s, v
    v2, s2 = np_model(np.concatenate([x, x]), np.concatenate([t, t]), np.concatenate([np.full_like(y, NULL), y]))
    vu, vc = np.split(v2, 2)
    su, sc = np.split(s2, 2)
    return vu + np.float32(w) * (vc - vu), su + np.float32(w) * (sc - su), vc


def ref_pad(v):  # (B, N) -> (B, H, W, 1), pad_v_like_x_patches
    return np.repeat(np.repeat(v.reshape(B, H // P, W // P), P, 1), P, 2)[..., None]


def ref_pool(m):  # (B, H, W, 1) -> (B, H/P, W/P), avg_pool2d
    return m.reshape(B, H // P, P, W // P, P).mean(axis=(2, 4), dtype=np.float32)


def ref_mask(uq_pix, q):  # compute_mask: float64 quantile over the pixel map, strict <
    thr = np.quantile(uq_pix.reshape(B, -1).astype(np.float64), q, axis=-1)
    return uq_pix < thr[:, None, None, None]


def ref_dual_loop(x, y, steps, q, n_inner, w):
    grid = S.uniform_grid(steps)
    for k in range(steps):
        t = np.full((B, N), grid[k], np.float32)
        v, s, _ = ref_forward(x, t, y, w)
        dt = np.float32(max(grid[k + 1] - grid[k], 0.0))
        dt_grid = np.full((B, H, W, 1), dt, np.float32)
        uq = np.repeat(np.repeat(ref_pool(np.exp(s)), P, 1), P, 2)[..., None]
        m = ref_mask(uq, q)
        dti = dt_grid / np.float32(n_inner)
        x = x + dt_grid * v * m + dti * v * (~m)
        t_grid = ref_pad(t) + dt_grid * m + dti * (~m)
        for _ in range(n_inner - 1):
            t_inp = ref_pool(t_grid).reshape(B, N)
            v, _, _ = ref_forward(x, t_inp, y, w)
            x = x + dti * v * (~m)
            t_grid = t_grid + dti * (~m)
    return x


def ref_look_ahead(x, y, steps, q, ratio, w):
    grid = S.uniform_grid(steps)
    calls = 0
    for k in range(steps):
        t_row = np.full((N,), grid[k], np.float32)
        t = np.broadcast_to(t_row, (B, N))
        v, s, vc = ref_forward(x, t, y, w)
        calls += 1
        dt_grid = np.full((B, H, W, 1), max(grid[k + 1] - grid[k], 0.0), np.float32)
        if t_row.mean() <= 0.05:
            x = x + dt_grid * vc
            continue
        uq = np.repeat(np.repeat(ref_pool(np.exp(s)), P, 1), P, 2)[..., None]
        low = ref_mask(uq, q)
        low_pool = ref_pool(low.astype(np.float32)).astype(bool).reshape(B, N)
        t_ctx = np.minimum(t_row * np.float32(ratio), np.float32(1.0))
        dt_ctx = np.broadcast_to(t_ctx - t_row, (B, N))
        x_ctx = x + ref_pad(dt_ctx) * (vc * low)
        v_ctx, _, _ = ref_forward(x_ctx, t + dt_ctx * low_pool, y, w)
        calls += 1
        x = x + dt_grid * v * low + dt_grid * v_ctx * (~low)
    return x, calls


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_dual_loop_equals_literal_reference(cfg_scale):
    cfg = cfg_of("dual_loop", steps=6, q=0.4, n_inner=3, cfg_scale=cfg_scale)
    out, info = run(cfg, traj=True)
    ref = ref_dual_loop(np.asarray(NOISE), np.asarray(LABELS), 6, 0.4, 3, cfg_scale)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert int(info["nfe"]) == 18 and int(info["nfe_doubled"]) == (18 if cfg_scale != 1 else 0)
    frac = np.asarray(info["certain"]).mean(-1)
    assert np.all(frac == S.num_certain(0.4, N, P) / N)  # 6 of 16: the pixel-map quantile


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_look_ahead_equals_literal_reference(cfg_scale):
    steps = 20  # t_1 = 0.05 exactly: the reference's float32 test `<= 0.05` makes it early
    cfg = cfg_of("look_ahead", steps=steps, q=0.4, ratio=1.4, cfg_scale=cfg_scale)
    out, info = run(cfg)
    ref, calls = ref_look_ahead(np.asarray(NOISE), np.asarray(LABELS), steps, 0.4, 1.4, cfg_scale)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert S.num_early_steps(steps) == 2
    assert int(info["nfe"]) == calls == S.expected_nfe(cfg) == 2 * steps - 2


def test_certain_mask_matches_float64_pixel_quantile():
    rng = np.random.default_rng(0)
    for n, p, q in [(4, 2, 0.4), (64, 2, 0.7), (12, 3, 0.25), (256, 2, 0.4)]:
        d = np.exp(rng.normal(size=(5, n)) * 3).astype(np.float32)
        d[:, : n // 3] = d[:, :1]  # ties
        pix = np.repeat(d, p * p, axis=1)  # the pixel map, in any order
        thr = np.quantile(pix.astype(np.float64), q, axis=-1)
        want = d < thr[:, None]
        mask = jax.jit(S.certain_mask, static_argnums=(1, 2))
        np.testing.assert_array_equal(mask(jnp.asarray(d), q, p), want)
        with jax.enable_x64(True):  # the float64 path
            np.testing.assert_array_equal(mask(jnp.asarray(d), q, p), want)


def test_certain_mask_rounding_noise_weight():
    # q * (M - 1) = 0.07 * 100 is 7 + 8.9e-16 in float64: the interpolation weight is rounding noise,
    # and whether the float64 threshold rises above a = sorted[7] depends on b - a.
    lo, hi, w = S.quantile_rank(0.07, 101, 1)
    assert (lo, hi) == (7, 8) and 0 < w < 1e-15
    base = np.arange(101, dtype=np.float32)
    counts = []
    for gap in [np.float32(1.0), np.spacing(np.float32(7.0)), np.float32(1e-3), np.float32(1e-6)]:
        d = base.copy()
        d[8:] = d[8:] - 1 + gap  # sorted[8] = 7 + gap
        want = d < np.quantile(d.astype(np.float64), 0.07)
        got = np.asarray(S.certain_mask(jnp.asarray(d[None]), 0.07, 1))[0]
        np.testing.assert_array_equal(got, want)
        counts.append(int(got.sum()))
    assert counts[:2] == [8, 7]  # a gap of 1 lifts the threshold above 7, one float32 ulp does not
    # weight 1 - 3.6e-15 (0.29 * 100 just below 29): the threshold is just below sorted[29]
    d = np.arange(101, dtype=np.float32)[::-1].copy()
    want = d < np.quantile(d.astype(np.float64), 0.29)
    np.testing.assert_array_equal(np.asarray(S.certain_mask(jnp.asarray(d[None]), 0.29, 1))[0], want)
    assert want.sum() == S.num_certain(0.29, 101, 1) == 29


def test_certain_mask_matches_torch_quantile():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    d = np.exp(np.random.default_rng(1).normal(size=(3, 16)) * 2).astype(np.float32)
    pix = torch.from_numpy(np.repeat(d, 4, axis=1))
    thr = torch.quantile(pix.double(), 0.4, dim=-1)
    want = (pix < thr[:, None]).numpy()[:, ::4]
    np.testing.assert_array_equal(S.certain_mask(jnp.asarray(d), 0.4, 2), want)


# ----------------------------------------------------------------------------- reductions


def test_dual_loop_one_inner_step_is_euler_pf():
    for w in [1.0, 3.0]:
        a, _ = run(cfg_of("dual_loop", steps=5, n_inner=1, cfg_scale=w))
        b, _ = run(cfg_of("euler_pf", steps=5, cfg_scale=w))
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        assert not np.allclose(a, run(cfg_of("dual_loop", steps=5, n_inner=2, cfg_scale=w))[0], atol=1e-3)


def euler_pf_conditional_early(steps, w):
    """euler_pf that uses the conditional velocity while t <= 0.05 (look_ahead with ratio 1)."""
    x, grid = np.asarray(NOISE), S.uniform_grid(steps)
    for k in range(steps):
        v, _, vc = ref_forward(x, np.full((B, N), grid[k], np.float32), np.asarray(LABELS), w)
        x = x + (grid[k + 1] - grid[k]) * (vc if grid[k] <= np.float32(0.05) else v)
    return x


def test_look_ahead_ratio_one_is_euler_pf():
    a, _ = run(cfg_of("look_ahead", steps=20, ratio=1.0))
    b, _ = run(cfg_of("euler_pf", steps=20))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    a, _ = run(cfg_of("look_ahead", steps=20, ratio=1.0, cfg_scale=3.0))
    np.testing.assert_allclose(a, euler_pf_conditional_early(20, 3.0), rtol=1e-5, atol=1e-5)
    b, _ = run(cfg_of("euler_pf", steps=20, cfg_scale=3.0))
    assert not np.allclose(a, b, atol=1e-4)  # the early conditional steps matter


def test_guidance_formula_and_scale_one_is_conditional():
    for w in [1.0, 0.0, 2.0]:
        out, info = run(cfg_of("euler_pf", steps=4, cfg_scale=w))
        x, grid = np.asarray(NOISE), S.uniform_grid(4)
        for k in range(4):
            t = np.full((B, N), grid[k], np.float32)
            vc, _ = np_model(x, t, np.asarray(LABELS))
            vu, _ = np_model(x, t, np.full((B,), NULL, np.int32))
            x = x + (grid[k + 1] - grid[k]) * (vu + np.float32(w) * (vc - vu))
        np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-5)
        assert int(info["nfe_doubled"]) == (0 if w == 1.0 else 4)


def test_guidance_interval_guides_only_inside():
    steps, lo, hi = 10, 0.3, 0.6
    out, info = run(cfg_of("euler_pf", steps=steps, cfg_scale=3.0, guidance_interval=(lo, hi)))
    x, grid = np.asarray(NOISE), S.uniform_grid(steps)
    for k in range(steps):
        inside = lo <= float(grid[k]) <= hi  # float64 compare: float32(0.6) > 0.6 is outside
        v, _, _ = ref_forward(x, np.full((B, N), grid[k], np.float32), np.asarray(LABELS), 3.0 if inside else 1.0)
        x = x + (grid[k + 1] - grid[k]) * v
    np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-5)
    assert int(info["nfe"]) == steps and int(info["nfe_doubled"]) == 3  # t = 0.3, 0.4, 0.5 (float32(0.6) > 0.6)


def test_random_order_mask_fraction_and_key():
    cfg = cfg_of("random_order", steps=5, q=0.4)
    out, info = run(cfg, model=analytic_model(TARGET), traj=True)
    m = np.asarray(info["certain"])  # (B, S, N)
    assert np.all(m.sum(-1) == S.num_certain(0.4, N, P))
    assert len({m[b, s].tobytes() for b in range(B) for s in range(5)}) > 5  # varies
    np.testing.assert_allclose(out, TARGET, atol=2e-5)


def test_difficulty_mask_fraction():
    _, info = run(cfg_of("dual_loop", steps=3, q=0.5), traj=True)
    assert np.all(np.asarray(info["certain"]).sum(-1) == N // 2)
    _, info = run(cfg_of("look_ahead", steps=10, q=0.4), traj=True)
    m = np.asarray(info["certain"])
    assert not m[:, 0].any() and np.all(m[:, 1:].sum(-1) == S.num_certain(0.4, N, P))


# ----------------------------------------------------------------------------- NFE and program size


@pytest.mark.parametrize(
    "name,kw",
    [
        ("dual_loop", dict(n_inner=3, cfg_scale=2.0)),
        ("look_ahead", dict(cfg_scale=2.0, guidance_interval=(0.2, 0.7))),
        ("look_ahead", dict(cfg_scale=1.0)),
        ("random_order", dict(n_inner=2)),
    ],
)
def test_reported_nfe_equals_counted_calls(name, kw):
    calls = []

    def counted(x, t, y):
        jax.debug.callback(lambda _: calls.append(x.shape[0]), x[0, 0, 0, 0])
        return toy_apply(PARAMS, x, t, y)

    cfg = cfg_of(name, steps=12, **kw)
    _, info = run(cfg, model=counted)
    jax.effects_barrier()
    assert int(info["nfe"]) == len(calls) == S.expected_nfe(cfg)
    assert int(info["nfe_doubled"]) == sum(b == 2 * B for b in calls)
    if name == "look_ahead":
        assert len(calls) == 2 * 12 - S.num_early_steps(12)


def test_program_size_does_not_grow_with_steps():
    for name in ["dual_loop", "look_ahead"]:
        sizes = []
        for steps in [10, 100]:
            f = S.make_sample_fn(toy_apply, cfg_of(name, steps=steps, cfg_scale=2.0))
            sizes.append(len(f.lower(PARAMS, NOISE, LABELS, KEY).as_text()))
        assert abs(sizes[1] - sizes[0]) <= 0.02 * sizes[0], (name, sizes)


def test_trajectory_times_and_snapshots():
    cfg = cfg_of("dual_loop", steps=8, num_intermediates=3)
    out, info = run(cfg, traj=True)
    assert info["times"].shape == (B, 9, N) and info["difficulty"].shape == (B, 8, N)
    np.testing.assert_array_equal(info["times"][0, :, 0], S.uniform_grid(8))
    np.testing.assert_array_equal(info["x_steps"], [0, 4, 8])
    np.testing.assert_array_equal(info["x"][:, 0], NOISE)
    np.testing.assert_array_equal(info["x"][:, -1], out)
    assert np.all(np.asarray(info["difficulty"]) > 0)


# ----------------------------------------------------------------------------- schedule


def test_schedule_conditioning_keeps_clean_patches():
    steps = 5
    clean = np.zeros(N, bool)
    clean[::3] = True
    half = np.zeros(N, bool)
    half[1::5] = True
    half &= ~clean
    row0 = np.where(clean, 1.0, np.where(half, 0.5, 0.0)).astype(np.float32)
    rows = np.stack([row0 + (1 - row0) * k / steps for k in range(steps + 1)]).astype(np.float32)
    x_cond = jax.random.normal(jax.random.key(5), (B, H, W, C))
    cfg = cfg_of("schedule", steps=steps, schedule=rows)
    out, info = run(cfg, model=analytic_model(TARGET, eps=1e-6), traj=True, x_cond=x_cond)
    cpix = np.asarray(interpolant.patch_to_pixels(jnp.broadcast_to(jnp.asarray(clean), (B, N)), P, H, W))[..., 0]
    np.testing.assert_array_equal(np.asarray(out)[cpix], np.asarray(x_cond)[cpix])  # dt = 0 there
    np.testing.assert_allclose(np.asarray(out)[~cpix], np.asarray(TARGET)[~cpix], atol=2e-5)
    np.testing.assert_array_equal(info["times"][0], rows)
    # the partly clean start: x = row0 * x_cond + (1 - row0) * noise
    one, _ = run(cfg_of("schedule", steps=1, schedule=rows[[0, 0]]), model=analytic_model(TARGET, 1e-6), x_cond=x_cond)
    np.testing.assert_allclose(one, interpolant.interpolate(NOISE, x_cond, jnp.broadcast_to(row0, (B, N)), P), atol=1e-6)
    with pytest.raises(ValueError, match="x_cond"):
        run(cfg)


def test_schedule_negative_increments_clamped_unless_allowed():
    rows = np.array([[0.0] * N, [0.5] * N, [0.3] * N, [1.0] * N], np.float32)

    def manual(allow):
        x = np.asarray(NOISE)
        for k in range(3):
            v, _ = np_model(x, np.full((B, N), rows[k, 0]), np.asarray(LABELS))
            dt = rows[k + 1, 0] - rows[k, 0]
            x = x + (dt if allow else max(dt, 0.0)) * v
        return x

    for allow in [False, True]:
        out, _ = run(cfg_of("schedule", steps=3, schedule=rows, allow_negative_dt=allow))
        np.testing.assert_allclose(out, manual(allow), rtol=1e-5, atol=1e-5)
    # the schedule may be traced
    f = jax.jit(lambda r: S.sample(TOY, NOISE, LABELS, KEY, cfg_of("schedule", steps=3), schedule=r)[0])
    np.testing.assert_allclose(f(rows), manual(False), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(name="heun"), "name"),
        (dict(q=1.0), "q"),
        (dict(q=0.0), "q"),
        (dict(n_inner=0), "n_inner"),
        (dict(ratio=0.9), "ratio"),
        (dict(steps=0), "steps"),
        (dict(pool="avg"), "pool"),
        (dict(cfg_scale=4.0, null_class=None), "null_class"),
        (dict(name="schedule", steps=3, schedule=np.zeros((3, N))), "schedule"),
        (dict(guidance_interval=(0.8, 0.2)), "guidance_interval"),
        (dict(foo=1), "foo"),
    ],
)
def test_bad_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError) as e:
        S.validate_sampler_config(S.as_sampler_config(dict(patch_size=P), **kw), num_patches=N)
    msg = str(e.value)
    assert f"sampler.{field}" in msg and "\n" not in msg


def test_unknown_name_lists_samplers_and_missing_s():
    with pytest.raises(ValueError, match="look_ahead"):
        S.validate_sampler_config({"name": "heun"})
    no_s = lambda x, t, y: (TOY(x, t, y)[0], None)  # noqa: E731
    with pytest.raises(ValueError, match="sampler.name='dual_loop'"):
        run(cfg_of("dual_loop", steps=2), model=no_s)


def test_names_and_expected_nfe():
    assert S.sampler_name(dict(name="dual_loop", q=0.4, n_inner=4, steps=50, cfg_scale=4.0)) == "dual_loop-q40-n4-s50-cfg4.0"
    assert S.sampler_name(dict(name="look_ahead", q=0.4, ratio=1.4, steps=50)) == "look_ahead-q40-r1.40-s50-cfg1.0"
    assert S.sampler_name(dict(name="euler_pf", steps=50)) == "euler_pf-s50-cfg1.0"
    assert S.expected_nfe(dict(name="look_ahead", steps=50)) == 2 * 50 - 3  # t = 0, 0.02, 0.04
    assert S.expected_nfe(dict(name="dual_loop", steps=50, n_inner=4)) == 200
    assert S.as_sampler_config(guidance_interval=(0.0, 1.0)).guidance_interval is None  # always guide
    assert S.as_sampler_config(guidance_interval=()).guidance_interval is None
    assert S.sampler_name(dict(name="euler_pf", cfg_scale=2.0, null_class=5, guidance_interval=(0.1, 0.9))).endswith("-gi0.1-0.9")
    ml_collections = pytest.importorskip("ml_collections")
    cd = ml_collections.ConfigDict(dict(name="random_order", steps=10, n_inner=2))
    assert S.sampler_name(cd) == "random_order-q40-n2-s10-cfg1.0" and S.expected_nfe(cd) == 20
