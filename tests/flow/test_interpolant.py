"""Per-patch flow: round trips, the interpolation formula patch by patch, global special case."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patch_forcing.flow import interpolant


@pytest.mark.parametrize("h,w,c,p", [(8, 8, 1, 2), (32, 32, 4, 2), (12, 20, 3, 4), (16, 16, 2, 8), (6, 9, 1, 3)])
def test_patchify_round_trip_and_layout(h, w, c, p):
    x = jax.random.normal(jax.random.key(0), (2, h, w, c))
    tok = interpolant.patchify(x, p)
    assert tok.shape == (2, (h // p) * (w // p), p * p * c)
    np.testing.assert_array_equal(interpolant.unpatchify(tok, p, h, w), x)
    # token k is the patch at grid (k // (w/p), k % (w/p)), laid out (p, p, C) row-major.
    gw = w // p
    for k in [0, 1, tok.shape[1] - 1]:
        r, col = divmod(k, gw)
        patch = x[:, r * p:(r + 1) * p, col * p:(col + 1) * p, :]
        np.testing.assert_array_equal(tok[:, k], patch.reshape(2, -1))


def test_patch_to_pixels_and_pool_are_inverse():
    b, h, w, p = 3, 12, 8, 4
    n = interpolant.num_patches(h, w, p)
    v = jax.random.uniform(jax.random.key(1), (b, n))
    pix = interpolant.patch_to_pixels(v, p, h, w)
    assert pix.shape == (b, h, w, 1)
    for mode in interpolant.POOL_MODES:
        np.testing.assert_allclose(interpolant.pool_patches(pix, p, mode), v, rtol=1e-6)
    # pooling of a varying map: mean/max/min per patch
    m = jax.random.normal(jax.random.key(2), (b, h, w, 1))
    tok = interpolant.patchify(m, p)[..., 0::1]
    np.testing.assert_allclose(interpolant.pool_patches(m, p, "max"), tok.max(-1))
    np.testing.assert_allclose(interpolant.pool_patches(m, p, "min"), tok.min(-1))
    np.testing.assert_allclose(interpolant.pool_patches(m, p, "mean"), tok.mean(-1), rtol=1e-6)


def test_interpolate_per_patch_matches_formula_patch_by_patch():
    b, h, w, c, p = 2, 8, 12, 3, 4
    k0, k1, k2 = jax.random.split(jax.random.key(3), 3)
    x0 = jax.random.normal(k0, (b, h, w, c))
    x1 = jax.random.normal(k1, (b, h, w, c))
    t = jax.random.uniform(k2, (b, interpolant.num_patches(h, w, p)))
    xt = np.asarray(interpolant.interpolate(x0, x1, t, p))
    gw = w // p
    for bi in range(b):
        for k in range(t.shape[1]):
            r, col = divmod(k, gw)
            sl = (bi, slice(r * p, (r + 1) * p), slice(col * p, (col + 1) * p))
            want = t[bi, k] * x1[sl] + (1 - t[bi, k]) * x0[sl]
            np.testing.assert_allclose(xt[sl], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(interpolant.target(x0, x1), x1 - x0)


def test_equal_patch_times_reproduce_global_flow_matching():
    b, h, w, c, p = 4, 16, 16, 4, 2
    k0, k1, k2 = jax.random.split(jax.random.key(4), 3)
    x0 = jax.random.normal(k0, (b, h, w, c))
    x1 = jax.random.normal(k1, (b, h, w, c))
    tg = jax.random.uniform(k2, (b,))
    per_patch = jnp.broadcast_to(tg[:, None], (b, interpolant.num_patches(h, w, p)))
    global_xt = tg[:, None, None, None] * x1 + (1 - tg[:, None, None, None]) * x0
    np.testing.assert_array_equal(interpolant.interpolate(x0, x1, per_patch, p), global_xt)
    np.testing.assert_array_equal(interpolant.interpolate(x0, x1, tg, p), global_xt)
    # t = 0 is noise, t = 1 is data.
    zeros = jnp.zeros_like(per_patch)
    np.testing.assert_array_equal(interpolant.interpolate(x0, x1, zeros, p), x0)
    np.testing.assert_array_equal(interpolant.interpolate(x0, x1, zeros + 1, p), x1)


def test_jit_compatible():
    x0 = jnp.zeros((2, 8, 8, 1))
    x1 = jnp.ones((2, 8, 8, 1))
    t = jnp.full((2, 16), 0.25)
    out = jax.jit(interpolant.interpolate, static_argnums=3)(x0, x1, t, 2)
    np.testing.assert_allclose(out, 0.25)


def test_bad_input_one_line_errors():
    x = jnp.zeros((2, 8, 8, 1))
    with pytest.raises(ValueError, match=r"patch_size=3 must divide"):
        interpolant.patchify(x, 3)
    with pytest.raises(ValueError, match=r"t must have shape \(B, N\)=\(2, 16\)"):
        interpolant.interpolate(x, x, jnp.zeros((2, 15)), 2)
    with pytest.raises(ValueError, match=r"same shape"):
        interpolant.interpolate(x, jnp.zeros((2, 8, 8, 2)), jnp.zeros((2, 16)), 2)
    with pytest.raises(ValueError, match=r"pool mode='median' is not one of"):
        interpolant.pool_patches(x, 2, "median")
    with pytest.raises(ValueError, match=r"tokens must have shape"):
        interpolant.unpatchify(jnp.zeros((2, 15, 4)), 2, 8, 8)
    for err in [lambda: interpolant.patchify(x, 3)]:
        with pytest.raises(ValueError) as e:
            err()
        assert "\n" not in str(e.value)
