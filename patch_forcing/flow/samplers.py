"""Samplers: integrate dx/dt = v(x, t) from noise (t = 0) to data (t = 1), each patch at its own
pace (the paper's adaptive inference: easy patches first, so they become context for hard ones).

Every sampler is a pure function `(model_fn, noise, labels, key, cfg) -> (samples, info)` with
model_fn(x (B,H,W,C), t, y) -> (v, s log-variance or None); t is (B,) for `euler` and (B, N)
for the per-patch samplers. `y` is the conditioning: class labels (B,) int, or a dict of arrays
that lead with the batch (text: {'text': (B, L, D), 'text_mask': (B, L)}); CFG's unconditional
half is `cfg.null` (that pytree without the batch axis, e.g. the empty prompt's embedding), else
the label `cfg.null_class`. What a reader must know: the outer grid is uniform (t_k = k / S), steps
run in `lax.scan`, so the compiled program does not grow with S, and NFE counts a doubled CFG
batch once (`info['nfe']`, `info['nfe_doubled']`). Where the reference (`integrators.py`) fixes a
detail, it is followed literally; the function docstrings say which.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from patch_forcing import presets
from patch_forcing.flow import interpolant

__all__ = [
    "SAMPLERS", "SamplerConfig", "as_sampler_config", "validate_sampler_config", "sampler_name",
    "expected_nfe", "uniform_grid", "num_early_steps", "quantile_rank", "num_certain", "certain_mask",
    "euler", "euler_pf", "dual_loop", "look_ahead", "random_order", "schedule", "sample", "make_sample_fn",
]

SAMPLERS = ("euler", "euler_pf", "dual_loop", "look_ahead", "random_order", "schedule")
ADAPTIVE = ("dual_loop", "look_ahead", "random_order")
LOOK_AHEAD_EARLY_T = 0.05  # reference: plain Euler steps while the mean time is <= 0.05

ModelFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array | None]]


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Everything a sampler needs besides the model; `sampler_name` names outputs after it."""

    name: str = presets.SAMPLER["name"]
    steps: int = presets.SAMPLER["steps"]
    cfg_scale: float = presets.SAMPLER["cfg_scale"]
    q: float = presets.SAMPLER["q"]  # fraction of certain patches (the reference's `p`)
    n_inner: int = presets.SAMPLER["n_inner"]  # dual_loop / random_order sub-steps for uncertain patches
    ratio: float = presets.SAMPLER["ratio"]  # look_ahead context time t_ctx = min(ratio * t, 1)
    pool: str = presets.SAMPLER["pool"]  # difficulty pooling over a patch's pixels
    guidance_interval: tuple[float, float] | None = None
    null_class: int | None = None  # = num_classes; needed when cfg_scale != 1 (unless `null`)
    null: Any = dataclasses.field(default=None, compare=False)  # CFG's null conditioning (pytree, no batch axis)
    patch_size: int = 2
    schedule: Any = dataclasses.field(default=None, compare=False)  # (steps+1, N), name='schedule'
    allow_negative_dt: bool = False  # schedule: keep negative increments (else clamp to 0)
    num_intermediates: int = 0  # with return_trajectory: this many x snapshots (noise .. final)


_FIELDS = tuple(f.name for f in dataclasses.fields(SamplerConfig))


def as_sampler_config(cfg: Any = None, **overrides) -> SamplerConfig:
    """A SamplerConfig from a SamplerConfig, a mapping or an ml_collections.ConfigDict."""
    if cfg is None:
        d = {}
    elif isinstance(cfg, SamplerConfig):
        d = {k: getattr(cfg, k) for k in _FIELDS}
    elif hasattr(cfg, "to_dict"):
        d = dict(cfg.to_dict())
    else:
        d = dict(cfg)
    d.update(overrides)
    unknown = sorted(set(d) - set(_FIELDS))
    if unknown:
        raise ValueError(f"sampler.{unknown[0]} is not a sampler field; allowed: {list(_FIELDS)}")
    gi = d.get("guidance_interval")
    if gi is not None:  # () and the whole [0, 1] mean "always guide": no interval test at all
        try:
            gi = tuple(float(v) for v in gi)
        except (TypeError, ValueError):
            raise ValueError(f"sampler.guidance_interval={gi!r} must be () or (lo, hi) with 0 <= lo < hi <= 1") from None
        d["guidance_interval"] = None if gi in ((), (0.0, 1.0)) else gi
    return SamplerConfig(**d)


def validate_sampler_config(cfg: Any, num_patches: int | None = None, null_later: bool = False) -> SamplerConfig:
    """Check every field; one-line ValueError naming `sampler.<field>` and the allowed values.
    `null_later`: the caller sets `null` before sampling (text models), so no null_class is needed."""
    cfg = as_sampler_config(cfg)

    def is_int(v, lo):
        return isinstance(v, (int, np.integer)) and v >= lo

    gi = cfg.guidance_interval
    checks = [
        ("name", cfg.name in SAMPLERS, f"is not one of {list(SAMPLERS)}"),
        ("steps", is_int(cfg.steps, 1), "must be an integer >= 1"),
        ("q", 0.0 < cfg.q < 1.0, "must be in the open interval (0, 1)"),
        ("n_inner", is_int(cfg.n_inner, 1), "must be an integer >= 1"),
        ("ratio", cfg.ratio >= 1.0, "must be >= 1"),
        ("pool", cfg.pool in interpolant.POOL_MODES, f"is not one of {list(interpolant.POOL_MODES)}"),
        ("patch_size", is_int(cfg.patch_size, 1), "must be an integer >= 1"),
        ("num_intermediates", is_int(cfg.num_intermediates, 0), "must be an integer >= 0"),
        ("cfg_scale", math.isfinite(cfg.cfg_scale), "must be a finite number"),
        ("null_class", cfg.cfg_scale == 1.0 or cfg.null_class is not None or cfg.null is not None or null_later,
         f"must be the null class index (num_classes), or sampler.null set, when cfg_scale={cfg.cfg_scale} != 1"),
        ("guidance_interval", gi is None or (len(gi) == 2 and 0.0 <= gi[0] < gi[1] <= 1.0),
         "must be (t_lo, t_hi) with 0 <= t_lo < t_hi <= 1, or None"),
    ]
    for field, ok, msg in checks:
        if not ok:
            raise ValueError(f"sampler.{field}={getattr(cfg, field)!r} {msg}")
    if cfg.name == "schedule" and cfg.schedule is not None:
        shape = tuple(np.shape(cfg.schedule))
        n = num_patches if num_patches is not None else (shape[1] if len(shape) == 2 else -1)
        if shape != (cfg.steps + 1, n):
            raise ValueError(f"sampler.schedule has shape {shape}; expected (steps + 1, N) = ({cfg.steps + 1}, {n})")
    return cfg


def _q_tag(q: float) -> str:
    return f"q{q * 100:.0f}"


def sampler_name(cfg: Any) -> str:
    """Output-file name from the sampler and its parameters, e.g. 'dual_loop-q40-n4-s50-cfg4.0'."""
    cfg = as_sampler_config(cfg)
    parts = [cfg.name]
    if cfg.name in ("dual_loop", "random_order"):
        parts += [_q_tag(cfg.q), f"n{cfg.n_inner}"]
    elif cfg.name == "look_ahead":
        parts += [_q_tag(cfg.q), f"r{cfg.ratio:.2f}"]
    if cfg.name in ("dual_loop", "look_ahead") and cfg.pool != "mean":
        parts.append(cfg.pool)
    parts += [f"s{cfg.steps}", f"cfg{float(cfg.cfg_scale)}"]
    if cfg.guidance_interval is not None and cfg.cfg_scale != 1.0:
        parts.append("gi{:g}-{:g}".format(*cfg.guidance_interval))
    return "-".join(parts)


def uniform_grid(steps: int) -> np.ndarray:
    """The outer grid t_k = float32(k) / float32(steps), k = 0..steps (as the samplers compute it)."""
    return np.arange(steps + 1, dtype=np.float32) / np.float32(steps)


def num_early_steps(steps: int) -> int:
    """look_ahead: how many leading steps have t_k <= 0.05 (float32 compare, as the reference)."""
    return int(np.sum(uniform_grid(steps)[:-1] <= np.float32(LOOK_AHEAD_EARLY_T)))


def expected_nfe(cfg: Any) -> int:
    """Model calls a sampler spends (a doubled CFG batch counts one)."""
    cfg = as_sampler_config(cfg)
    if cfg.name in ("dual_loop", "random_order"):
        return cfg.steps * cfg.n_inner
    if cfg.name == "look_ahead":
        return 2 * cfg.steps - num_early_steps(cfg.steps)
    return cfg.steps


# ----------------------------------------------------------------------------- certain mask


def quantile_rank(q: float, num_patches: int, patch_size: int) -> tuple[int, int, float]:
    """torch.quantile's linear-interpolation rank on the per-pixel map of N patches of p*p pixels.

    Returns (lo, hi, w): the threshold is lerp(sorted[lo], sorted[hi], w) over the sorted
    *per-patch* values (pixel rank r is patch rank r // p^2), all static Python numbers.
    """
    m = num_patches * patch_size * patch_size
    pos = float(q) * (m - 1)  # float64, as torch: q (double tensor) * (n - 1)
    lo_pix, hi_pix = int(pos), int(math.ceil(pos))
    pp = patch_size * patch_size
    return lo_pix // pp, hi_pix // pp, pos - lo_pix


def num_certain(q: float, num_patches: int, patch_size: int) -> int:
    """How many patches the difficulty mask marks certain when all difficulties differ."""
    lo, hi, w = quantile_rank(q, num_patches, patch_size)
    return lo + (1 if (w > 0 and hi > lo) else 0)


def certain_mask(d: jax.Array, q: float, patch_size: int) -> jax.Array:
    """(B, N) per-patch difficulty -> (B, N) bool, True where d < the reference's quantile.

    As the reference: exp(s) pooled per patch and broadcast back to pixels; the per-sample
    q-quantile of that *pixel* map (linear interpolation, float64) is the threshold of a strict
    `d < threshold`, computed here from the per-patch values.

    threshold = lerp(a, b, w) in float64 with a <= b two adjacent order statistics and torch's
    lerp (a + w (b - a) for w < 0.5, else b - (b - a)(1 - w)). No value lies strictly between a
    and b, so `d < threshold` <=> d < a, or d == a and threshold > a. In float64 threshold > a
    holds iff b > a and w > 0, except for a w that is only rounding noise of q * (M - 1)
    (w < 2^-28): then the float64 sum a + w (b - a) may round back to a, which is checked by
    comparing w (b - a) with half an ulp of a in float64 (exact up to ties).
    """
    lo, hi, w = quantile_rank(q, d.shape[1], patch_size)
    if jax.config.jax_enable_x64:
        srt = jnp.sort(d.astype(jnp.float64), axis=-1)
        a, b = srt[:, lo], srt[:, hi]
        thr = jnp.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))
        return d.astype(jnp.float64) < thr[:, None]
    srt = jnp.sort(d, axis=-1)
    a, b = srt[:, lo:lo + 1], srt[:, hi:hi + 1]  # (B, 1)
    if w == 0.0:
        above = jnp.zeros_like(a, bool)
    elif w >= 2.0**-28:
        above = b > a
    else:  # ulp64(a) = 2^(e - 53) with a = m 2^e, m in [0.5, 1)
        _, e = jnp.frexp(a)
        half_ulp = jnp.ldexp(jnp.ones_like(a), e - 54)
        above = (b > a) & (jnp.float32(w) * (b - a) > half_ulp)
    return (d < a) | ((d == a) & above)


# ----------------------------------------------------------------------------- model calls


def _model_call(model_fn: ModelFn, x, t, y, cfg: SamplerConfig):
    """One NFE -> (v guided, v conditional, s guided or None, doubled 0/1 int32).

    Classifier-free guidance: one call on the batch doubled as [uncond; cond] (`_null_like`),
    v = v_u + w (v_c - v_u), and the same for s (the guided s picks the certain patches). cfg_scale
    1 calls the model once, undoubled. With guidance_interval (lo, hi) the model is guided only
    when the mean current time is in [lo, hi] (compared in float64 like the reference's
    `t.item()`, inside a `lax.cond`); outside it the conditional output is used.
    """

    def plain():
        v, s = model_fn(x, t, y)
        s = None if s is None else s.astype(x.dtype)
        return v.astype(x.dtype), v.astype(x.dtype), s

    if cfg.cfg_scale == 1.0:  # the reference's fast path: no doubling at all
        return (*plain(), jnp.int32(0))

    def guided():
        w = cfg.cfg_scale
        y2 = jax.tree.map(lambda n, c: jnp.concatenate([n, c]), _null_like(y, cfg), y)
        v2, s2 = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), y2)
        v_u, v_c = jnp.split(v2.astype(x.dtype), 2)
        v = v_u + w * (v_c - v_u)
        s = None
        if s2 is not None:
            s_u, s_c = jnp.split(s2.astype(x.dtype), 2)
            s = s_u + w * (s_c - s_u)
        return v, v_c, s

    if cfg.guidance_interval is None:
        return (*guided(), jnp.int32(1))
    lo, hi = _f32_interval(*cfg.guidance_interval)
    t_mean = jnp.mean(t)
    inside = (t_mean >= lo) & (t_mean <= hi)
    v, v_c, s = jax.lax.cond(inside, guided, plain)
    return v, v_c, s, inside.astype(jnp.int32)


def _null_like(y, cfg: SamplerConfig):
    """The unconditional batch for conditioning `y`: `cfg.null` broadcast over y's batch, or
    labels `null_class`."""
    if cfg.null is None:
        return jnp.full_like(y, cfg.null_class)
    return jax.tree.map(lambda n, c: jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape), cfg.null, y)


def _f32_interval(lo: float, hi: float) -> tuple[np.float32, np.float32]:
    """float32 bounds with t >= lo32 <=> t >= lo and t <= hi32 <=> t <= hi for float32 t, as the
    reference compares the float32 time with Python (float64) bounds."""
    lo32, hi32 = np.float32(lo), np.float32(hi)
    if float(lo32) < lo:
        lo32 = np.nextafter(lo32, np.float32(np.inf))
    if float(hi32) > hi:
        hi32 = np.nextafter(hi32, np.float32(-np.inf))
    return lo32, hi32


def _difficulty(s, cfg):
    """Guided log-variance (B,H,W,1) -> per-patch difficulty exp(s) pooled (B, N)."""
    return None if s is None else interpolant.pool_patches(jnp.exp(s), cfg.patch_size, cfg.pool)


def _uniform_step(k, steps):
    """Step k of the uniform grid -> (t_k, t_{k+1} - t_k) as float32 scalars."""
    kf, sf = k.astype(jnp.float32), jnp.float32(steps)
    t, t_next = kf / sf, (kf + 1.0) / sf
    return t, jnp.maximum(t_next - t, 0.0)


def _snap_steps(steps: int, k: int) -> np.ndarray:
    return np.unique(np.round(np.linspace(0, steps, k)).astype(np.int32)) if k else np.zeros(0, np.int32)


def _run(step_fn, noise, cfg, steps, return_trajectory, final_times, xs=None):
    """Scan `step_fn(x, k, xs_k) -> (x, nfe, nfe_doubled, ys)` over the steps; assemble info."""
    snaps = _snap_steps(steps, cfg.num_intermediates) if return_trajectory else np.zeros(0, np.int32)
    carry0 = {"x": noise, "nfe": jnp.int32(0), "nfe_doubled": jnp.int32(0)}
    if len(snaps):
        carry0["snaps"] = jnp.where((snaps == 0)[:, None, None, None, None], noise[None], 0.0)

    def body(carry, inp):
        k, xs_k = inp
        x, nfe, dbl, ys = step_fn(carry["x"], k, xs_k)
        new = {"x": x, "nfe": carry["nfe"] + nfe, "nfe_doubled": carry["nfe_doubled"] + dbl}
        if "snaps" in carry:
            hit = (jnp.asarray(snaps) == k + 1)[:, None, None, None, None]
            new["snaps"] = jnp.where(hit, x[None], carry["snaps"])
        return new, (ys if return_trajectory else None)

    ks = jnp.arange(steps, dtype=jnp.int32)
    carry, ys = jax.lax.scan(body, carry0, (ks, xs))
    info = {"nfe": carry["nfe"], "nfe_doubled": carry["nfe_doubled"]}
    if return_trajectory:
        times = jnp.concatenate([ys.pop("times"), final_times[None]], axis=0)  # (S+1, B, N)
        info["times"] = jnp.swapaxes(times, 0, 1)
        for name, arr in ys.items():
            info[name] = jnp.swapaxes(arr, 0, 1)  # (B, S, N)
        if len(snaps):
            info["x"] = jnp.swapaxes(carry["snaps"], 0, 1)  # (B, K, H, W, C)
            info["x_steps"] = snaps
    return carry["x"], info


def _shapes(noise, cfg):
    b, h, w, _ = noise.shape
    return b, h, w, interpolant.num_patches(h, w, cfg.patch_size)


def _ys(times, d, mask=None):
    ys = {"times": times, "difficulty": d, "certain": mask}
    return {k: v for k, v in ys.items() if v is not None}


# ----------------------------------------------------------------------------- samplers


def _euler(model_fn, noise, labels, cfg, return_trajectory, global_t):
    b, _, _, n = _shapes(noise, cfg)

    def step(x, k, _):
        t, dt = _uniform_step(k, cfg.steps)
        tb = jnp.full((b, n), t)
        v, _, s, dbl = _model_call(model_fn, x, jnp.full((b,), t) if global_t else tb, labels, cfg)
        return x + dt * v, 1, dbl, _ys(tb, _difficulty(s, cfg))

    return _run(step, noise, cfg, cfg.steps, return_trajectory, jnp.ones((b, n), jnp.float32))


def euler(model_fn, noise, labels, key, cfg, return_trajectory=False):
    """Global-time Euler (model_fn gets t of shape (B,)); x += dt v. NFE = steps."""
    return _euler(model_fn, noise, labels, validate_sampler_config(cfg), return_trajectory, True)


def euler_pf(model_fn, noise, labels, key, cfg, return_trajectory=False):
    """Per-patch Euler at a shared time t broadcast to (B, N); difficulty ignored. NFE = steps."""
    return _euler(model_fn, noise, labels, validate_sampler_config(cfg), return_trajectory, False)


def _need_s(s, cfg):
    if s is None:
        raise ValueError(f"sampler.name={cfg.name!r} needs a model that returns the log-variance s, got None")


def _two_speed(model_fn, noise, labels, key, cfg, return_trajectory, mask_fn):
    """dual_loop's schedule: certain patches take the step at once, uncertain ones n_inner sub-steps."""
    b, h, w, n = _shapes(noise, cfg)
    p = cfg.patch_size

    def step(x, k, _):
        t, dt = _uniform_step(k, cfg.steps)
        dti = dt / cfg.n_inner
        tb = jnp.full((b, n), t)
        v, _, s, dbl = _model_call(model_fn, x, tb, labels, cfg)
        d = _difficulty(s, cfg)
        m = mask_fn(d, k)  # (B, N) certain
        mp = interpolant.patch_to_pixels(m, p, h, w)  # (B, H, W, 1)
        x = x + jnp.where(mp, dt * v, dti * v)
        tp = tb + jnp.where(m, dt, dti)  # each patch's current time (pooled time grid)

        def inner(_, c):
            x, tp, dbl = c
            v, _, _, dbl_i = _model_call(model_fn, x, tp, labels, cfg)
            return jnp.where(mp, x, x + dti * v), jnp.where(m, tp, tp + dti), dbl + dbl_i

        x, tp, dbl = jax.lax.fori_loop(0, cfg.n_inner - 1, inner, (x, tp, dbl))
        return x, cfg.n_inner, dbl, _ys(tb, d, m)

    return _run(step, noise, cfg, cfg.steps, return_trajectory, jnp.ones((b, n), jnp.float32))


def dual_loop(model_fn, noise, labels, key, cfg, return_trajectory=False):
    """Difficulty-aware dual loop (ref: DualLoopSampler). NFE = steps * n_inner.

    Per outer step dt: one call at the shared time gives v and the difficulty; certain patches
    (difficulty below the q-quantile) take the whole step with it, uncertain ones dt / n_inner;
    n_inner - 1 more calls see each patch's current time and move only the uncertain patches.
    Each patch's time is kept as (B, N) (the reference pools a per-pixel time grid: the same
    values up to float32 rounding of that mean).
    """
    del key
    cfg = validate_sampler_config(cfg)

    def mask_fn(d, k):
        _need_s(d, cfg)
        return certain_mask(d, cfg.q, cfg.patch_size)

    return _two_speed(model_fn, noise, labels, None, cfg, return_trajectory, mask_fn)


def random_order(model_fn, noise, labels, key, cfg, return_trajectory=False):
    """dual_loop with a random certain set of num_certain(q, N, p) patches per sample and step."""
    cfg = validate_sampler_config(cfg)
    b, _, _, n = _shapes(noise, cfg)
    count = num_certain(cfg.q, n, cfg.patch_size)

    def mask_fn(d, k):
        u = jax.random.uniform(jax.random.fold_in(key, k), (b, n))
        return jnp.argsort(jnp.argsort(u, axis=-1), axis=-1) < count

    return _two_speed(model_fn, noise, labels, key, cfg, return_trajectory, mask_fn)


def look_ahead(model_fn, noise, labels, key, cfg, return_trajectory=False):
    """Context look-ahead (ref: LookAheadSampler). NFE = 2 per step, 1 while t <= 0.05.

    One call at t gives the guided v, the conditional v_c and the difficulty; certain patches jump
    ahead to t_ctx = min(ratio t, 1) along v_c on a copy; a second call on that context gives the
    uncertain patches' velocity; x += dt (v on certain, v_ctx on uncertain patches). Steps with
    mean t <= 0.05 (float32 compare, as the reference) are plain Euler steps with v_c.
    """
    del key
    cfg = validate_sampler_config(cfg)
    b, h, w, n = _shapes(noise, cfg)
    p = cfg.patch_size
    n_early = num_early_steps(cfg.steps)

    def step(x, k, _):
        t, dt = _uniform_step(k, cfg.steps)
        tb = jnp.full((b, n), t)
        v, v_c, s, dbl = _model_call(model_fn, x, tb, labels, cfg)
        d = _difficulty(s, cfg)
        _need_s(d, cfg)

        def early(x):  # plain Euler step with the conditional velocity
            return x + dt * v_c, jnp.zeros((b, n), bool), jnp.int32(0), jnp.int32(0)

        def context(x):
            m = certain_mask(d, cfg.q, p)
            mp = interpolant.patch_to_pixels(m, p, h, w)
            dt_ctx = jnp.minimum(t * cfg.ratio, 1.0) - t
            x_ctx = x + dt_ctx * jnp.where(mp, v_c, 0.0)  # certain patches jump ahead
            t_ctx = tb + jnp.where(m, dt_ctx, 0.0)
            v_ctx, _, _, dbl_c = _model_call(model_fn, x_ctx, t_ctx, labels, cfg)
            return x + jnp.where(mp, dt * v, dt * v_ctx), m, jnp.int32(1), dbl_c

        x, m, nfe_c, dbl_c = jax.lax.cond(k < n_early, early, context, x)
        return x, 1 + nfe_c, dbl + dbl_c, _ys(tb, d, m)

    return _run(step, noise, cfg, cfg.steps, return_trajectory, jnp.ones((b, n), jnp.float32))


def schedule(model_fn, noise, labels, key, cfg, return_trajectory=False, *, schedule=None, x_cond=None):
    """Euler along a denoise schedule (S+1, N) of per-patch times (ref: PatchFlowForcing.generate).

    `schedule` (argument, may be traced) overrides cfg.schedule. A first row that is not all zero
    starts from x = row0 * x_cond + (1 - row0) * noise per patch. Negative increments are clamped
    to 0 unless cfg.allow_negative_dt.
    """
    del key
    cfg = validate_sampler_config(cfg)
    b, h, w, n = _shapes(noise, cfg)
    sched = cfg.schedule if schedule is None else schedule
    if sched is None:
        raise ValueError("sampler.schedule=None: the 'schedule' sampler needs a (steps + 1, N) array")
    if tuple(np.shape(sched)) != (cfg.steps + 1, n):
        raise ValueError(f"sampler.schedule has shape {tuple(np.shape(sched))}; expected (steps + 1, N) = ({cfg.steps + 1}, {n})")
    if x_cond is None and _concrete_nonzero(sched[0]):
        raise ValueError("x_cond=None: sampler.schedule's first row is not all zero, so a clean x_cond is needed")
    sched = jnp.asarray(sched, jnp.float32)
    x0 = noise
    if x_cond is not None:
        row0 = jnp.broadcast_to(sched[0], (b, n))
        x0 = jnp.where(jnp.all(sched[0] == 0.0), noise, interpolant.interpolate(noise, x_cond, row0, cfg.patch_size))

    def step(x, k, rows):
        t_row, t_next = rows
        tb = jnp.broadcast_to(t_row, (b, n))
        v, _, s, dbl = _model_call(model_fn, x, tb, labels, cfg)
        dt = t_next - t_row
        if not cfg.allow_negative_dt:
            dt = jnp.maximum(dt, 0.0)
        dtp = interpolant.patch_to_pixels(jnp.broadcast_to(dt, (b, n)), cfg.patch_size, h, w)
        return x + dtp * v, 1, dbl, _ys(tb, _difficulty(s, cfg))

    final = jnp.broadcast_to(sched[-1], (b, n))
    return _run(step, x0, cfg, cfg.steps, return_trajectory, final, xs=(sched[:-1], sched[1:]))


def _concrete_nonzero(row) -> bool:
    """True if `row` is a concrete array with a nonzero entry (False when traced)."""
    try:
        return bool(np.any(np.asarray(row) != 0))
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return False


_schedule = schedule
_BY_NAME = {"euler": euler, "euler_pf": euler_pf, "dual_loop": dual_loop, "look_ahead": look_ahead,
            "random_order": random_order}


def sample(model_fn, noise, labels, key, cfg, return_trajectory=False, *, schedule=None, x_cond=None):
    """Dispatch by cfg.name. noise (B,H,W,C), labels (B,) int32 or a conditioning pytree ->
    (samples (B,H,W,C), info).

    info: 'nfe', 'nfe_doubled'; with return_trajectory also 'times' (B, S+1, N) at step starts,
    'difficulty' (B, S, N) pooled exp(s) of each step's first call, 'certain' (B, S, N) for the
    adaptive samplers, and with cfg.num_intermediates = K > 0 'x' (B, K, H, W, C) after steps
    'x_steps' (0 = noise).
    """
    cfg = as_sampler_config(cfg)
    _, h, w, _ = noise.shape
    cfg = validate_sampler_config(cfg, interpolant.num_patches(h, w, cfg.patch_size))
    labels = jax.tree.map(jnp.asarray, labels) if isinstance(labels, dict) else jnp.asarray(labels, jnp.int32)
    if cfg.name == "schedule":
        return _schedule(model_fn, noise, labels, key, cfg, return_trajectory, schedule=schedule, x_cond=x_cond)
    return _BY_NAME[cfg.name](model_fn, noise, labels, key, cfg, return_trajectory)


def make_sample_fn(apply_fn, cfg, return_trajectory=False):
    """jit(fn(params, noise, labels, key, schedule=None, x_cond=None)) for apply_fn(params, x, t, y);
    `labels` is whatever conditioning apply_fn takes (class labels, a text dict)."""
    cfg = validate_sampler_config(cfg)

    def fn(params, noise, labels, key, schedule=None, x_cond=None):
        model_fn = lambda x, t, y: apply_fn(params, x, t, y)  # noqa: E731
        return sample(model_fn, noise, labels, key, cfg, return_trajectory, schedule=schedule, x_cond=x_cond)

    return jax.jit(fn)
