"""Training timestep samplers (SPEC §2): shapes, jit, exact invariants and distributions.

Distribution checks use fixed seeds and >= 10^4 draws; the analytic CDFs are derived here
from the SPEC formulas, and numpy re-implementations of the SPEC give two-sample KS tests.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from patch_forcing.flow import timesteps as ts

NAMES = ["uniform", "logit_normal", "independent", "srm", "gaussian", "truncated_gaussian", "ltg"]
KEY = jax.random.key(0)


def _np(x):
    return np.asarray(x, np.float64)


@functools.lru_cache(maxsize=None)
def _jitted(name, params):
    return jax.jit(ts.make_timestep_sampler(name, **dict(params)), static_argnums=(1, 2))


def _sample(name, key, batch, n, **params):
    """A jitted sampler (one compile per name, params and shape) as a float64 array."""
    return _np(_jitted(name, tuple(sorted(params.items())))(key, batch, n))


# ----------------------------------------------------------------------------- all samplers


def test_registry_names_and_defaults():
    assert sorted(ts.SAMPLERS) == sorted(NAMES)
    assert ts.default_params("ltg") == {"std": 0.6, "loc": 0.7, "scale": 1.0}
    assert ts.default_params("truncated_gaussian") == {"std": 0.2}
    assert ts.default_params("gaussian") == {"std": 0.2}
    assert ts.default_params("srm") == {"sharpness": 1.0}
    assert ts.default_params("logit_normal") == {"loc": 0.0, "scale": 1.0}
    assert ts.default_params("uniform") == {} == ts.default_params("independent")
    d = ts.default_params("ltg")
    d["std"] = 5.0  # a fresh dict: mutating it changes nothing
    assert ts.default_params("ltg")["std"] == 0.6


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_range_jit_determinism(name):
    f = ts.make_timestep_sampler(name)
    batch, n = 10000, 7  # odd N: SRM's split tree has unequal halves
    t = f(KEY, batch, n)
    assert t.shape == (batch, n) and t.dtype == jnp.float32
    t_np = np.asarray(t)
    assert np.all(np.isfinite(t_np)) and t_np.min() >= 0.0 and t_np.max() <= 1.0
    fj = jax.jit(f, static_argnums=(1, 2))
    np.testing.assert_allclose(np.asarray(fj(KEY, batch, n)), t_np, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(f(KEY, batch, n)), t_np)  # same key, same draw
    other = np.asarray(f(jax.random.key(1), batch, n))
    assert np.mean(np.abs(other - t_np) > 1e-6) > 0.9  # a different key gives different times


def test_srm_single_patch_is_its_mean():
    mean = np.array([0.0, 0.3, 1.0], np.float32)
    t = ts.srm_with_mean(KEY, mean, 1, 1.0)
    assert t.shape == (3, 1)
    np.testing.assert_array_equal(np.asarray(t)[:, 0], mean)


# ----------------------------------------------------------------------------- global samplers


def test_uniform_is_global_and_uniform():
    t = _sample("uniform", KEY, 20000, 4)
    np.testing.assert_array_equal(t, np.repeat(t[:, :1], 4, axis=1))
    assert stats.kstest(t[:, 0], "uniform").pvalue > 0.01


def test_logit_normal_is_global_with_exact_marginal():
    loc, scale = 0.3, 0.8
    t = _sample("logit_normal", KEY, 20000, 4, loc=loc, scale=scale)
    np.testing.assert_array_equal(t, np.repeat(t[:, :1], 4, axis=1))
    cdf = lambda x: stats.norm.cdf((special.logit(x) - loc) / scale)  # noqa: E731
    assert stats.kstest(t[:, 0], cdf).pvalue > 0.01
    # wrong parameters are rejected (the test has power)
    assert stats.kstest(t[:, 0], lambda x: stats.norm.cdf(special.logit(x))).pvalue < 1e-6


# ----------------------------------------------------------------------------- independent


def test_independent_iid_uniform():
    n = 8
    t = _sample("independent", KEY, 10000, n)
    assert stats.kstest(t.ravel(), "uniform").pvalue > 0.01
    corr = np.corrcoef(t.T)[~np.eye(n, dtype=bool)]
    assert np.max(np.abs(corr)) < 0.05  # se = 0.01


# ----------------------------------------------------------------------------- SRM

# Compiling the Beta sampler dominates this file's runtime (once per (B, N), eager or jit):
# the SRM tests use B = 10000 with N in {7, 16} only, eagerly, so they share the compiles.


def _np_srm_with_mean(rng, mean, n, sharpness):
    """SPEC §2 SRM in numpy: recursive Beta(a, a) halving of mean * n, then a row shuffle."""

    def split(total, dim):
        if dim == 1:
            return [total]
        h = dim // 2
        a = (dim - 1 - dim % 2) ** 1.05 * sharpness
        hi1 = np.minimum(total, h)
        lo1 = np.maximum(total - np.minimum(total, dim - h), 0.0)
        first = lo1 + (hi1 - lo1) * rng.beta(a, a, size=total.shape)
        return split(first, h) + split(total - first, dim - h)

    t = np.stack(split(mean * n, n), axis=1)
    return rng.permuted(t, axis=1)


def test_srm_beta_param():
    assert ts.srm_beta_param(2, 1.0) == 1.0
    assert ts.srm_beta_param(3, 1.0) == 1.0
    assert ts.srm_beta_param(4, 1.0) == pytest.approx(3**1.05)
    assert ts.srm_beta_param(5, 2.0) == pytest.approx(2 * 3**1.05)
    assert ts.srm_beta_param(256, 4.0) == pytest.approx(4 * 255**1.05)


@pytest.mark.parametrize("n", [7, 16])
def test_srm_with_mean_exact_mean_and_range(n):
    mean = jnp.array([0.0, 1.0, 1e-3, 0.999, 0.2, 0.5, 0.77, 0.93] * 1250, jnp.float32)
    t = _np(ts.srm_with_mean(KEY, mean, n, 1.0))
    assert t.shape == (mean.shape[0], n) and t.min() >= 0.0 and t.max() <= 1.0
    np.testing.assert_allclose(t.mean(axis=1), _np(mean), atol=1e-5)
    np.testing.assert_array_equal(t[0], 0.0)
    np.testing.assert_allclose(t[1], 1.0, atol=1e-6)


def test_srm_sampler_means_are_uniform_and_exact():
    t = _np(ts.make_timestep_sampler("srm")(KEY, 10000, 7))
    assert t.min() >= 0.0 and t.max() <= 1.0
    assert stats.kstest(t.mean(axis=1), "uniform").pvalue > 0.01
    assert t.std(axis=1).mean() > 0.05  # genuinely per-patch, not a global time


def test_srm_patches_are_shuffled():
    # Odd N: without the shuffle, position 0 (the small first half of every split) has a
    # biased mean (about 0.65 at m = 0.8) and siblings correlate more than non-siblings.
    n, m = 7, 0.8
    t = _np(ts.srm_with_mean(KEY, jnp.full((10000,), m), n, 1.0))
    np.testing.assert_allclose(t.mean(axis=0), m, atol=0.01)  # flat position-wise mean
    # Exchangeable with a fixed row sum: every pairwise correlation is -1 / (n - 1).
    corr = np.corrcoef(t.T)[~np.eye(n, dtype=bool)]
    np.testing.assert_allclose(corr, -1.0 / (n - 1), atol=0.04)


@pytest.mark.parametrize("n,m,sharpness", [(7, 0.8, 1.0), (16, 0.3, 4.0)])
def test_srm_matches_numpy_spec(n, m, sharpness):
    b = 10000
    t = _np(ts.srm_with_mean(jax.random.key(3), jnp.full((b,), m), n, sharpness))
    r = _np_srm_with_mean(np.random.default_rng(3), np.full(b, m), n, sharpness)
    for stat in (lambda x: x[:, 0], lambda x: x.max(1), lambda x: x.min(1), lambda x: x.std(1)):
        assert stats.ks_2samp(stat(t), stat(r)).pvalue > 1e-3


def test_srm_sharpness_concentrates():
    mean = jnp.full((10000,), 0.5)
    spread = [_np(ts.srm_with_mean(KEY, mean, 16, s)).std(axis=1).mean() for s in (1.0, 10.0)]
    assert spread[1] < 0.6 * spread[0]


# ----------------------------------------------------------------------------- gaussian


def test_gaussian_spread_rule_and_clipping():
    std = 0.2
    ms = np.array([0.5, 0.1, 0.3, 0.8, 0.95])
    reps = 100
    t = _np(ts.gaussian_with_mean(KEY, jnp.asarray(np.repeat(ms, reps), jnp.float32), 256, std))
    t = t.reshape(len(ms), -1)
    for m, row in zip(ms, t):
        s = min(min(m, 1 - m) / 2, std)
        # the interquartile range (1.349 s) is unaffected by clipping beyond 2 s
        q25, q50, q75 = np.quantile(row, [0.25, 0.5, 0.75])
        assert (q75 - q25) / 1.349 == pytest.approx(s, rel=0.03), m
        assert q50 == pytest.approx(m, abs=0.02 * s)


def test_gaussian_clips_into_unit_interval():
    # s = m / 2 at m = 0.02: P(t = 0) = P(eps < -2); symmetric at m = 0.98 for t = 1.
    n = 20000
    t = _np(ts.gaussian_with_mean(KEY, jnp.array([0.02, 0.98]), n, std=0.2))
    p = stats.norm.cdf(-2.0)
    se = np.sqrt(p * (1 - p) / n)
    assert abs(np.mean(t[0] == 0.0) - p) < 4 * se
    assert abs(np.mean(t[1] == 1.0) - p) < 4 * se
    assert t.min() >= 0.0 and t.max() <= 1.0


def test_gaussian_sampler_matches_numpy_spec():
    b, n, std = 10000, 16, 0.2
    t = _sample("gaussian", KEY, b, n, std=std)
    rng = np.random.default_rng(0)
    m = rng.uniform(size=(b, 1))
    s = np.minimum(np.minimum(m, 1 - m) / 2, std)
    r = np.clip(m + s * rng.standard_normal((b, n)), 0, 1)
    for stat in (lambda x: x[:, 0], lambda x: x.std(1), lambda x: x.mean(1)):
        assert stats.ks_2samp(stat(t), stat(r)).pvalue > 1e-3


# ----------------------------------------------------------------------------- truncated Gaussian / LTG


def _tg_cdf(x, t_max, std):
    """Exact CDF of one truncated_gaussian time given t_max: mixture of t_max - |eps| s on
    |eps| <= T = t_max / s and, with probability P(|eps| > T), a U(0, t_max) redraw."""
    s = min(t_max / 2, std)
    big_t = t_max / s
    c = (t_max - np.clip(x, 0, t_max)) / s
    gauss = 2 * (stats.norm.cdf(big_t) - stats.norm.cdf(np.minimum(c, big_t)))
    p_redraw = 2 * stats.norm.sf(big_t)
    return gauss + p_redraw * np.clip(x, 0, t_max) / t_max


@pytest.mark.parametrize("t_max,std", [(0.05, 0.2), (0.3, 0.6), (0.9, 0.2), (0.25, 0.1)])
def test_truncated_gaussian_redraws_below_t_max(t_max, std):
    n = 20000
    t = _np(ts.truncated_gaussian_with_max(KEY, jnp.array([t_max]), n, std))[0]
    t_max32 = float(np.float32(t_max))
    assert t.min() >= 0.0 and t.max() <= t_max32
    assert stats.kstest(t, lambda x: _tg_cdf(x, t_max32, std)).pvalue > 0.01
    # no atom at 0 (clipping would put P(|eps| > T) of the mass there, 4.6% when s = t_max / 2)
    assert np.mean(t == 0.0) < 1e-3
    # mass near 0 is what the uniform redraw predicts
    delta = 0.05 * t_max32
    p = _tg_cdf(delta, t_max32, std)
    assert abs(np.mean(t <= delta) - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-4


def test_truncated_gaussian_test_has_power_against_clipping():
    t_max, std, n = 0.3, 0.6, 20000
    s = min(t_max / 2, std)
    clipped = np.clip(t_max - np.abs(np.random.default_rng(0).standard_normal(n)) * s, 0, None)
    assert np.mean(clipped == 0.0) > 0.03
    assert stats.kstest(clipped, lambda x: _tg_cdf(x, t_max, std)).pvalue < 1e-6


def test_every_patch_below_its_row_max():
    t_max = jnp.linspace(0.0, 1.0, 101)
    for std in (0.0, 0.05, 0.2, 0.6, 3.0):
        t = _np(ts.ltg_with_max(KEY, t_max, 64, std))
        assert t.min() >= 0.0
        assert np.all(t <= _np(t_max)[:, None])


@pytest.mark.parametrize("loc,scale", [(0.7, 1.0), (-0.4, 0.5)])
def test_ltg_t_max_is_logit_normal(loc, scale):
    cdf = lambda x: stats.norm.cdf((special.logit(x) - loc) / scale)  # noqa: E731
    # std tiny: every patch sits within ~1e-5 below t_max, so the row max recovers it
    t = _sample("ltg", KEY, 20000, 4, std=1e-6, loc=loc, scale=scale)
    assert stats.kstest(t.max(axis=1), cdf).pvalue > 0.01


def test_ltg_std_zero_is_global_logit_normal():
    loc, scale = 0.7, 1.0
    t = _sample("ltg", KEY, 20000, 8, std=0.0, loc=loc, scale=scale)
    np.testing.assert_array_equal(t, np.repeat(t[:, :1], 8, axis=1))
    ln = _sample("logit_normal", KEY, 20000, 8, loc=loc, scale=scale)
    np.testing.assert_array_equal(t, ln)  # the same key gives the same global time
    eps = (special.logit(t[:, 0]) - loc) / scale  # t = sigmoid(loc + scale * eps), eps ~ N(0, 1)
    assert stats.kstest(eps, "norm").pvalue > 0.01


@pytest.mark.parametrize("name", ["ltg", "truncated_gaussian"])
def test_tg_samplers_match_numpy_spec(name):
    b, n = 10000, 16
    params = ts.default_params(name)
    t = _sample(name, KEY, b, n)
    rng = np.random.default_rng(1)
    if name == "ltg":
        t_max = special.expit(params["loc"] + params["scale"] * rng.standard_normal((b, 1)))
    else:
        t_max = rng.uniform(size=(b, 1))
    s = np.minimum(t_max / 2, params["std"])
    r = t_max - np.abs(rng.standard_normal((b, n))) * s
    r = np.where(r < 0, rng.uniform(size=(b, n)) * t_max, r)
    for stat in (lambda x: x[:, 0], lambda x: x.max(1), lambda x: x.min(1), lambda x: x.std(1)):
        assert stats.ks_2samp(stat(t), stat(r)).pvalue > 1e-3


# ----------------------------------------------------------------------------- bad input


def _one_line_error(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_unknown_name():
    msg = _one_line_error("flow.timesteps", ts.make_timestep_sampler, "lgt")
    assert "'lgt'" in msg and "'ltg'" in msg and "'srm'" in msg
    _one_line_error("flow.timesteps", ts.default_params, "lgt")


def test_bad_parameter_name():
    msg = _one_line_error("sdt", ts.make_timestep_sampler, "ltg", sdt=0.3)
    assert "'std'" in msg and "'loc'" in msg and "'scale'" in msg
    msg = _one_line_error("std", ts.make_timestep_sampler, "uniform", std=0.3)
    assert "[]" in msg


@pytest.mark.parametrize(
    "name,field,value",
    [
        ("ltg", "std", -1.0),
        ("gaussian", "std", -0.1),
        ("truncated_gaussian", "std", -0.1),
        ("ltg", "scale", 0.0),
        ("logit_normal", "scale", -1.0),
        ("srm", "sharpness", 0.0),
        ("srm", "sharpness", -2.0),
        ("ltg", "loc", float("nan")),
        ("ltg", "std", "wide"),
        ("ltg", "std", True),
    ],
)
def test_bad_parameter_value(name, field, value):
    msg = _one_line_error(rf"config\.flow\.{name}\.{field}\b", ts.make_timestep_sampler, name, **{field: value})
    assert repr(value) in msg


def test_bad_shape_arguments():
    f = ts.make_timestep_sampler("ltg")
    _one_line_error("num_patches", f, KEY, 4, 0)
    _one_line_error("batch", f, KEY, 0, 4)


def test_valid_overrides_are_used():
    a = _np(ts.make_timestep_sampler("ltg", std=0.6, loc=0.7, scale=1.0)(KEY, 10000, 7))
    b = _np(ts.make_timestep_sampler("ltg")(KEY, 10000, 7))
    c = _np(ts.make_timestep_sampler("ltg", loc=0.5)(KEY, 10000, 7))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    ts.make_timestep_sampler("ltg", std=0)  # std = 0 and int values are allowed
