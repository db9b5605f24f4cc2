"""The loss: hand computation, stop-gradient of the velocity in the NLL, clamp, validation loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patch_forcing.flow import interpolant
from patch_forcing.flow import loss


def _hand_loss(v, s, u, w=0.01):
    v, s, u = (np.asarray(a, np.float64) for a in (v, s, u))
    fl = np.mean((v - u) ** 2)
    sc = np.clip(s, -30, 20)
    nll = np.mean(0.5 * (math.log(2 * math.pi) + sc + (u - v) ** 2 / np.exp(sc)))
    return fl + w * nll, fl, nll


def test_total_matches_hand_computation():
    k = jax.random.split(jax.random.key(0), 3)
    v = jax.random.normal(k[0], (2, 4, 4, 3))
    u = jax.random.normal(k[1], (2, 4, 4, 3))
    s = jax.random.normal(k[2], (2, 4, 4, 1))
    total, m = loss.patch_forcing_loss(v, s, u)
    want, fl, nll = _hand_loss(v, s, u)
    np.testing.assert_allclose(total, want, rtol=1e-5)
    np.testing.assert_allclose(m["flow_loss"], fl, rtol=1e-5)
    np.testing.assert_allclose(m["nll"], nll, rtol=1e-5)
    # A concrete 1-pixel example: v=1, u=3, s=log 4: flow 4, nll 0.5(log 2pi + log 4 + 1).
    one = jnp.ones((1, 1, 1, 1))
    total, m = loss.patch_forcing_loss(one, one * math.log(4.0), 3 * one)
    np.testing.assert_allclose(m["nll"], 0.5 * (math.log(2 * math.pi) + math.log(4.0) + 1.0), rtol=1e-6)
    np.testing.assert_allclose(total, 4.0 + 0.01 * m["nll"], rtol=1e-6)


def test_global_model_has_flow_loss_only():
    v = jnp.ones((1, 2, 2, 1))
    total, m = loss.patch_forcing_loss(v, None, jnp.zeros_like(v))
    assert set(m) == {"flow_loss", "loss"} and float(total) == 1.0


def test_nll_sends_no_gradient_to_the_velocity_path():
    """A toy model whose parameter `wv` feeds only the velocity, `ws` only the log-variance."""
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 2))
    u = jax.random.normal(jax.random.key(2), (2, 4, 4, 2))

    def terms(params):
        v = params["wv"] * x
        s = params["ws"] * x[..., :1]
        return loss.patch_forcing_loss(v, s, u)[1]

    params = {"wv": jnp.float32(0.7), "ws": jnp.float32(-0.3)}
    g_nll = jax.grad(lambda p: terms(p)["nll"])(params)
    g_flow = jax.grad(lambda p: terms(p)["flow_loss"])(params)
    assert float(g_nll["wv"]) == 0.0  # the velocity is detached inside the NLL
    assert float(g_nll["ws"]) != 0.0
    assert float(g_flow["wv"]) != 0.0 and float(g_flow["ws"]) == 0.0


def test_logvar_clamp_and_its_gradient():
    u = jnp.zeros((1, 1, 1, 1))
    v = jnp.ones_like(u)
    lo = loss.gaussian_nll(u, v, jnp.full((1, 1, 1, 1), -100.0))
    np.testing.assert_allclose(lo, 0.5 * (math.log(2 * math.pi) - 30 + math.exp(30)), rtol=1e-5)
    g = jax.grad(lambda s: loss.gaussian_nll(u, v, s).sum())(jnp.full((1, 1, 1, 1), 50.0))
    assert float(g.sum()) == 0.0


def test_validation_loss_segments_and_noise():
    b, h, w, c, p = 3, 8, 8, 1, 2
    x1 = jax.random.normal(jax.random.key(3), (b, h, w, c))
    x0 = jax.random.normal(jax.random.key(4), (b, h, w, c))
    y = jnp.zeros((b,), jnp.int32)
    np.testing.assert_allclose(loss.segment_times(8), (np.arange(8) + 0.5) / 8)
    seen = []

    # The exact velocity makes every segment zero; a zero model gives mean(u^2) at every t.
    exact = lambda xt, t, y_: (x1 - x0, None)
    zero = lambda xt, t, y_: (jnp.zeros_like(xt), None)
    mean, seg = loss.validation_loss(exact, x1, x0, y, p)
    assert seg.shape == (8,) and float(jnp.abs(seg).max()) == 0.0
    mean, seg = loss.validation_loss(zero, x1, x0, y, p)
    np.testing.assert_allclose(seg, np.full(8, np.mean((x1 - x0) ** 2)), rtol=1e-5)

    # A model that predicts x1-x0 scaled by t sees the segment times, per patch and globally.
    def scaled(xt, t, y_):
        seen.append(t.shape)
        tt = t[:, :1, None, None] if t.ndim == 2 else t[:, None, None, None]
        return (x1 - x0) * tt, None

    _, seg = loss.validation_loss(scaled, x1, x0, y, p)
    want = [np.mean(((1 - tk) * (x1 - x0)) ** 2) for tk in (np.arange(8) + 0.5) / 8]
    np.testing.assert_allclose(seg, want, rtol=1e-5)
    _, seg_g = loss.validation_loss(scaled, x1, x0, y, p, per_patch=False)
    np.testing.assert_allclose(seg_g, want, rtol=1e-5)
    assert seen == [(b, interpolant.num_patches(h, w, p)), (b,)]


def test_bad_shapes():
    with pytest.raises(ValueError, match="log-variance shape"):
        loss.patch_forcing_loss(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 3)))
    with pytest.raises(ValueError, match="num_segments"):
        loss.segment_times(0)


def test_nll_gradient_is_zero_on_the_dit_velocity_columns():
    """With the real DiT: the NLL's gradient w.r.t. the final linear's velocity columns is zero."""
    from flax import nnx

    from patch_forcing.models import dit

    cfg = dit.preset("PF-Tiny/2", image_size=8, in_channels=3, num_classes=4, hidden_size=32, depth=1,
                     num_heads=2)
    model = dit.DiT(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # Perturb every parameter so no gradient vanishes by the zero initialisation.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    params = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    k = jax.random.split(jax.random.key(6), 3)
    x = jax.random.normal(k[0], (2, 8, 8, 3))
    t = jax.random.uniform(k[1], (2, 16))
    u = jax.random.normal(k[2], (2, 8, 8, 3))
    y = jnp.array([0, 3])

    def term(p, name):
        v, s = nnx.merge(graphdef, p, rest)(x, t, y)
        return loss.patch_forcing_loss(v, s, u)[1][name]

    kernel = lambda g: np.asarray(g["final_layer"]["linear"]["kernel"])  # noqa: E731
    g_nll, g_flow = (kernel(jax.grad(term)(params, n)) for n in ("nll", "flow_loss"))
    cols = np.arange(g_nll.shape[1]) % (cfg.in_channels + 1)  # token layout (p, p, C+1)
    assert np.all(g_nll[:, cols < 3] == 0.0) and np.abs(g_nll[:, cols == 3]).max() > 0
    assert np.abs(g_flow[:, cols < 3]).max() > 0 and np.all(g_flow[:, cols == 3] == 0.0)


def test_alignment_loss_is_one_minus_cosine_per_token():
    f = jax.random.normal(jax.random.key(0), (3, 5, 8))
    np.testing.assert_allclose(loss.alignment_loss(f, f), 0.0, atol=1e-6)
    np.testing.assert_allclose(loss.alignment_loss(-f, f), 2.0, atol=1e-6)
    np.testing.assert_allclose(loss.alignment_loss(4.0 * f, f), 0.0, atol=1e-6)  # scale-free
    # per token: half the tokens aligned (0), half opposite (2), one orthogonal pair (1) -> mean
    z = f.at[:, :2].multiply(-1.0)
    np.testing.assert_allclose(loss.alignment_loss(z, f), 2.0 * 2 / 5, atol=1e-6)
    e1, e2 = jnp.eye(2)[0][None, None], jnp.eye(2)[1][None, None]
    np.testing.assert_allclose(loss.alignment_loss(e1, e2), 1.0, atol=1e-7)
    # a zero vector: cosine 0, a finite gradient
    g = jax.grad(lambda z: loss.alignment_loss(z, e1))(jnp.zeros((1, 1, 2)))
    assert np.isfinite(np.asarray(g)).all()
    # no gradient to the target, a nonzero one to z
    gz, gf = jax.grad(loss.alignment_loss, argnums=(0, 1))(jax.random.normal(jax.random.key(1), f.shape), f)
    assert np.abs(np.asarray(gz)).max() > 0 and not np.asarray(gf).any()
    with pytest.raises(ValueError, match=r"must both be \(B, N, D\)"):
        loss.alignment_loss(f, f[:, :4])
