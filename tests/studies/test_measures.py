"""The studies' measurements on synthetic inputs: difficulty correlations (R = 1 for a head that
predicts the squared error exactly, n/a for a constant one), equal-NFE bookkeeping (every sampler
spends exactly the budget it is given, or the budget is refused in one line), the comparison rule,
context times, and the PIL fallback of the plots."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import digits
from patch_forcing import config_lib
from patch_forcing.flow import interpolant
from patch_forcing.flow import samplers as samplers_lib
from patch_forcing.studies import context, difficulty, plots, report, runner, samplers

pytestmark = pytest.mark.usefixtures("fast_compiles")
P = 2


def _data(b=6, h=8):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x1 = jax.random.uniform(k1, (b, h, h, 2), minval=-1, maxval=1)
    x0 = jax.random.normal(k2, (b, h, h, 2))
    delta = jax.random.normal(k3, (b, h, h, 2)) * jnp.linspace(0.1, 2.0, h)[None, :, None, None]
    return x1, x0, delta


def test_head_that_predicts_the_squared_error_has_r_one():
    x1, x0, delta = _data()

    def apply_fn(params, x, t, y):  # v is off by delta; s is the log of its mean square over channels
        return interpolant.target(x0, x1) + delta, jnp.log(jnp.mean(jnp.square(delta), -1, keepdims=True))

    pred, err = difficulty.make_patch_errors(apply_fn, P)(None, x1, x0, jnp.zeros(6, jnp.int32), jnp.float32(0.6))
    np.testing.assert_allclose(pred, err, rtol=1e-5)
    r = difficulty.correlations(pred, err)
    for k in ("pearson", "spearman", "pearson_within", "spearman_within"):
        assert r[k] == pytest.approx(1.0, abs=1e-6), k
    r_anti = difficulty.correlations(-np.asarray(pred), err)
    assert r_anti["pearson"] == pytest.approx(-1.0, abs=1e-6)


def test_constant_head_has_no_correlation_and_is_reported_so():
    x1, x0, delta = _data()

    def apply_fn(params, x, t, y):
        return interpolant.target(x0, x1) + delta, jnp.zeros(x.shape[:-1] + (1,))

    pred, err = difficulty.make_patch_errors(apply_fn, P)(None, x1, x0, jnp.zeros(6, jnp.int32), jnp.float32(0.2))
    r = difficulty.correlations(pred, err)
    assert all(np.isnan(v) for v in r.values())
    summary = runner.summarize([r["pearson"], r["pearson"]])
    assert summary["mean"] is None and report.fmt(summary) == "n/a"


def test_spearman_is_rank_based():
    x = np.arange(10.0)
    assert difficulty.spearman(x, x**3) == pytest.approx(1.0)
    assert difficulty.pearson(x, x**3) < 0.95


@pytest.mark.parametrize("budget", [9, 21])
@pytest.mark.parametrize("name", samplers.NAMES)
def test_each_sampler_spends_exactly_the_budget(name, budget):
    base = samplers_lib.as_sampler_config(name=name, n_inner=3, patch_size=P)
    steps = samplers.steps_for_budget(base, budget)
    cfg = samplers_lib.as_sampler_config(base, steps=steps)
    n = interpolant.num_patches(4, 4, P)

    def model_fn(x, t, y):
        return -x, (None if name == "euler" else jnp.linspace(-1.0, 1.0, n).reshape(1, 2, 2).repeat(2, 1)
                    .repeat(2, 2)[..., None].repeat(x.shape[0], 0))

    _, info = samplers_lib.sample(model_fn, jnp.ones((2, 4, 4, 1)), jnp.zeros(2, jnp.int32), jax.random.key(0), cfg)
    assert int(info["nfe"]) == budget == samplers_lib.expected_nfe(cfg)


def test_default_budgets_are_met_by_every_sampler_and_others_refused():
    for name in samplers.NAMES:
        base = samplers_lib.as_sampler_config(name=name, n_inner=3)
        for budget in (9, 21, 42, 81):
            steps = samplers.steps_for_budget(base, budget)
            assert samplers_lib.expected_nfe(samplers_lib.as_sampler_config(base, steps=steps)) == budget
    with pytest.raises(ValueError, match=r"NFE 10 cannot be met exactly by look_ahead .*nearest budgets are 9 and 11$"):
        samplers.steps_for_budget(samplers_lib.as_sampler_config(name="look_ahead"), 10)
    with pytest.raises(ValueError, match=r"NFE 10 cannot be met exactly by dual_loop \(n_inner=4\)"):
        samplers.steps_for_budget(samplers_lib.as_sampler_config(name="dual_loop", n_inner=4), 10)


def test_compare_calls_overlapping_spreads_not_distinguishable():
    a, b = runner.summarize([1.0, 2.0, 3.0]), runner.summarize([2.5, 3.5, 4.5])
    assert runner.compare(a, b) == "not distinguishable"
    c = runner.summarize([10.0, 11.0, 12.0])
    assert runner.compare(a, c) == "lower" and runner.compare(c, a) == "higher"
    assert runner.compare(runner.summarize([1.0]), runner.summarize([9.0])) == "not distinguishable"  # no spread
    assert report.verdict("lower", "lower") == "reproduced" and report.verdict("higher", "lower") == "reversed"
    assert runner.summarize([1.0, float("nan"), 3.0])["n"] == 2


def test_context_times_start_with_no_context_and_end_at_one():
    assert context.context_times(0.1, (2.0, 2.5, 12.0)) == [0.1, 0.2, 0.25, 1.0]
    assert context.context_times(0.3, (1.5, 4.0)) == [0.3, 0.45, 1.0]


def test_context_without_a_jump_equals_the_plain_loss():
    x1, x0, _ = _data(b=4)
    w = jnp.linspace(0.5, 1.5, 2)

    def apply_fn(params, x, t, y):  # every patch sees the image mean: context changes the answer
        tp = interpolant.patch_to_pixels(t, P, 8, 8)
        return x * w * tp + jnp.mean(x, (1, 2, 3), keepdims=True), jnp.log(1.0 + jnp.abs(x[..., :1]))

    fn = context.make_context_loss(apply_fn, P, 0.4)
    y = jnp.zeros(4, jnp.int32)
    total, count = fn(None, x1, x0, y, jnp.float32(0.2), jnp.float32(0.2))
    tt = jnp.full((4, 16), 0.2)
    v, s = apply_fn(None, interpolant.interpolate(x0, x1, tt, P), tt, y)
    certain = samplers_lib.certain_mask(interpolant.pool_patches(jnp.exp(s), P), 0.4, P)
    err = interpolant.pool_patches(jnp.square(v - (x1 - x0)), P)
    assert int(count) == int((~certain).sum()) == 4 * (16 - samplers_lib.num_certain(0.4, 16, P))
    np.testing.assert_allclose(float(total), float(jnp.sum(jnp.where(certain, 0.0, err))), rtol=1e-5)
    moved, _ = fn(None, x1, x0, y, jnp.float32(0.2), jnp.float32(0.5))
    assert abs(float(moved) - float(total)) > 1e-3


def test_plots_fall_back_to_pil(tmp_path):
    plots.bars(tmp_path / "b.png", ["a", "b"], [3.0, None], [0.5, None], title="t", ylabel="FID", floor=(1.0, 0.2),
               backend="pil")
    plots.lines(tmp_path / "l.png", {"x": ([9, 21], [5.0, 4.0], [0.1, None])}, title="t", xlabel="NFE", ylabel="FID",
                backend="pil")
    plots.scatter(tmp_path / "s.png", [1e-3, 1.0, 0.0], [2e-3, 0.5, 1.0], title="t", xlabel="e", ylabel="v",
                  backend="pil")
    for name in ("b", "l", "s"):
        with Image.open(tmp_path / f"{name}.png") as im:
            assert im.size == (plots.W, plots.H) and len(set(im.convert("L").getdata())) > 2


@pytest.mark.parametrize("name,arg", [("digits", ""), ("mnist", "study"), ("mnist", "study_cpu")])
def test_study_presets_validate_and_their_budgets_are_met(name, arg):
    c = importlib.import_module(f"configs.{name}").get_config(arg)
    config_lib.validate(c)
    runner.check_study(c.study)
    for sampler in samplers.NAMES:
        base = samplers_lib.as_sampler_config(c.sampler, name=sampler, n_inner=c.study.n_inner)
        for budget in c.study.budgets:
            samplers.steps_for_budget(base, budget)


def test_bad_study_fields_fail_in_one_line():
    c = digits.get_config()
    c.study.budgets = ()
    with pytest.raises(ValueError, match=r"^config.study.budgets=\(\) must be a non-empty tuple of ints >= 1$"):
        runner.check_study(c.study)
    c = digits.get_config()
    c.study.context_ratios = (0.5,)
    with pytest.raises(ValueError, match=r"^config.study.context_ratios=\(0.5,\) must be"):
        runner.check_study(c.study)
