"""Training timestep samplers: per-patch flow times t of shape (B, N) in [0, 1].

Time convention: t = 0 is noise, t = 1 is data (x_t = t * x1 + (1 - t) * x0), so a larger
t_i means a cleaner patch. Why LTG (logit-normal truncated Gaussian): sampling the patch
times independently almost always leaves some patch nearly clean, i.e. trains the model
with clean context that never exists at inference, which starts every patch from pure
noise (train-test gap). LTG draws a per-sample maximum time t_max from a logit-normal and
spreads the patches *below* it (t_i <= t_max), so training states resemble the states
the samplers visit; std = 0 reduces it to plain (global) logit-normal flow matching.

Every sampler is a pure function `sampler(key, batch, num_patches, **params) -> (B, N)`
float32, jit-able with `batch` and `num_patches` static. Select one by name with
`make_timestep_sampler(config.flow.timesteps, **config.flow[config.flow.timesteps])`.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from patch_forcing import presets

__all__ = [
    "uniform",
    "logit_normal",
    "independent",
    "srm",
    "srm_with_mean",
    "srm_beta_param",
    "gaussian",
    "gaussian_with_mean",
    "truncated_gaussian",
    "truncated_gaussian_with_max",
    "ltg",
    "ltg_with_max",
    "logit_normal_time",
    "SAMPLERS",
    "default_params",
    "make_timestep_sampler",
]

Sampler = Callable[[jax.Array, int, int], jax.Array]


# ----------------------------------------------------------------------------- global


def logit_normal_time(key: jax.Array, batch: int, loc: float = 0.0, scale: float = 1.0) -> jax.Array:
    """One logit-normal time per sample, sigmoid(loc + scale * eps).  # (B,)"""
    eps = jax.random.normal(key, (batch,), jnp.float32)
    return jax.nn.sigmoid(loc + scale * eps)


def uniform(key: jax.Array, batch: int, num_patches: int) -> jax.Array:
    """Global time t ~ U(0, 1) per sample, shared by all patches.  # (B, N)"""
    t = jax.random.uniform(key, (batch,), jnp.float32)
    return jnp.broadcast_to(t[:, None], (batch, num_patches))


def logit_normal(
    key: jax.Array, batch: int, num_patches: int, loc: float = 0.0, scale: float = 1.0
) -> jax.Array:
    """Global logit-normal time (SD3), shared by all patches.  # (B, N)

    Uses the same sub-key as `ltg` for its t_max, so `ltg(key, ..., std=0)` equals this.
    """
    k_time, _ = jax.random.split(key)
    t = logit_normal_time(k_time, batch, loc, scale)
    return jnp.broadcast_to(t[:, None], (batch, num_patches))


def independent(key: jax.Array, batch: int, num_patches: int) -> jax.Array:
    """Naive per-patch times t_i ~ U(0, 1) i.i.d. (diffusion forcing).  # (B, N)"""
    return jax.random.uniform(key, (batch, num_patches), jnp.float32)


# ----------------------------------------------------------------------------- SRM


def srm_beta_param(dim: int, sharpness: float) -> float:
    """Beta(a, a) parameter for splitting a node of `dim` patches: (dim-1-dim%2)**1.05 * sharpness."""
    return float((dim - 1 - dim % 2) ** 1.05 * sharpness)


def _shuffle_rows(key: jax.Array, t: jax.Array) -> jax.Array:
    """Independent random permutation of each row of t.  # (B, N)"""
    perm = jnp.argsort(jax.random.uniform(key, t.shape), axis=1)
    return jnp.take_along_axis(t, perm, axis=1)


def srm_with_mean(
    key: jax.Array, mean: jax.Array, num_patches: int, sharpness: float = 1.0
) -> jax.Array:
    """SRM times with given per-sample mean (B,), each t_i in [0, 1], shuffled.  # (B, N)

    The total mean * N is split recursively in halves (first half dim // 2 patches); the
    first half gets min1 + (max1 - min1) * Beta(a, a) with max1 = min(total, dim // 2),
    min1 = max(total - min(total, dim - dim // 2), 0), so no patch can exceed 1. The split
    tree is static (known from N), so it is unrolled level by level, with one vectorised
    Beta draw for all nodes; finished leaves (dim 1) pass through unchanged, keeping order.
    """
    mean = jnp.asarray(mean, jnp.float32)
    batch = mean.shape[0]
    # Static split tree: node sizes per level, until every node is a single patch.
    levels = [[num_patches]]
    while any(d > 1 for d in levels[-1]):
        levels.append([c for d in levels[-1] for c in ((d // 2, d - d // 2) if d > 1 else (1,))])
    levels.pop()  # the last level holds the leaves; nothing left to split
    # One vectorised Beta draw for all nodes of all levels (leaves draw a discarded Beta(1, 1)).
    # `sharpness` may be traced; only the tree (from num_patches) must be static.
    sizes = np.array([d for lv in levels for d in lv], np.int64)
    base = np.array([srm_beta_param(d, 1.0) if d > 1 else 1.0 for d in sizes], np.float32)
    a = jnp.where(sizes > 1, base * jnp.asarray(sharpness, jnp.float32), 1.0)
    k_split, k_perm = jax.random.split(key)
    fracs = jax.random.beta(k_split, a, a, (batch, sizes.size), jnp.float32)  # (B, nodes)

    totals = (mean * num_patches)[:, None]  # (B, K) node totals of the current level
    offset = 0
    for dims in levels:
        dims_np = np.asarray(dims)
        half = dims_np // 2
        frac = fracs[:, offset : offset + len(dims)]
        offset += len(dims)
        max_first = jnp.minimum(totals, half.astype(np.float32))
        max_second = jnp.minimum(totals, (dims_np - half).astype(np.float32))
        min_first = jnp.maximum(totals - max_second, 0.0)
        first = min_first + (max_first - min_first) * frac
        first = jnp.where(dims_np > 1, first, 0.0)  # leaves keep their total exactly
        second = totals - first
        # Children in order: [first, second] for split nodes, [second] for leaves.
        both = jnp.stack([first, second], axis=2).reshape(batch, 2 * len(dims))
        keep = [j for k, d in enumerate(dims) for j in ((2 * k, 2 * k + 1) if d > 1 else (2 * k + 1,))]
        totals = both[:, np.asarray(keep)]
    # Guard float rounding (|err| ~ 1 ulp); mathematically every leaf is already in [0, 1].
    t = jnp.clip(totals, 0.0, 1.0)
    return _shuffle_rows(k_perm, t)


def srm(key: jax.Array, batch: int, num_patches: int, sharpness: float = 1.0) -> jax.Array:
    """SRM: mean m ~ U(0, 1), recursive Beta splits of m * N, shuffled per sample.  # (B, N)"""
    k_mean, k_rest = jax.random.split(key)
    mean = jax.random.uniform(k_mean, (batch,), jnp.float32)
    return srm_with_mean(k_rest, mean, num_patches, sharpness)


# ----------------------------------------------------------------------------- Gaussians


def gaussian_with_mean(key: jax.Array, mean: jax.Array, num_patches: int, std: float = 0.2) -> jax.Array:
    """t_i = clip(m + s * eps_i, 0, 1) with s = min(min(m, 1 - m) / 2, std), m (B,).  # (B, N)"""
    mean = jnp.asarray(mean, jnp.float32)
    s = jnp.minimum(jnp.minimum(mean, 1.0 - mean) / 2.0, std)  # (B,)
    eps = jax.random.normal(key, (mean.shape[0], num_patches), jnp.float32)
    return jnp.clip(mean[:, None] + s[:, None] * eps, 0.0, 1.0)


def gaussian(key: jax.Array, batch: int, num_patches: int, std: float = 0.2) -> jax.Array:
    """Gaussian around a uniform per-sample mean m ~ U(0, 1), clipped to [0, 1].  # (B, N)"""
    k_mean, k_rest = jax.random.split(key)
    mean = jax.random.uniform(k_mean, (batch,), jnp.float32)
    return gaussian_with_mean(k_rest, mean, num_patches, std)


def truncated_gaussian_with_max(
    key: jax.Array, t_max: jax.Array, num_patches: int, std: float = 0.2
) -> jax.Array:
    """t_i = t_max - |eps_i| * s, s = min(t_max / 2, std); t_i < 0 redrawn as U(0, t_max).  # (B, N)

    Negatives are redrawn, not clipped, so there is no atom at t = 0.
    """
    t_max = jnp.asarray(t_max, jnp.float32)[:, None]  # (B, 1)
    k_eps, k_redraw = jax.random.split(key)
    s = jnp.minimum(t_max / 2.0, std)
    shape = (t_max.shape[0], num_patches)
    t = t_max - jnp.abs(jax.random.normal(k_eps, shape, jnp.float32)) * s
    redraw = jax.random.uniform(k_redraw, shape, jnp.float32) * t_max
    return jnp.where(t < 0.0, redraw, t)


ltg_with_max = truncated_gaussian_with_max


def truncated_gaussian(key: jax.Array, batch: int, num_patches: int, std: float = 0.2) -> jax.Array:
    """Truncated Gaussian below a uniform per-sample maximum t_max ~ U(0, 1).  # (B, N)"""
    k_time, k_rest = jax.random.split(key)
    t_max = jax.random.uniform(k_time, (batch,), jnp.float32)
    return truncated_gaussian_with_max(k_rest, t_max, num_patches, std)


def ltg(
    key: jax.Array,
    batch: int,
    num_patches: int,
    std: float = 0.6,
    loc: float = 0.7,
    scale: float = 1.0,
) -> jax.Array:
    """LTG: truncated Gaussian below a logit-normal t_max = sigmoid(loc + scale * eps).  # (B, N)"""
    k_time, k_rest = jax.random.split(key)
    t_max = logit_normal_time(k_time, batch, loc, scale)
    return truncated_gaussian_with_max(k_rest, t_max, num_patches, std)


# ----------------------------------------------------------------------------- registry

# name -> (function, default params)
_FUNCTIONS = (uniform, logit_normal, independent, srm, gaussian, truncated_gaussian, ltg)
SAMPLERS: dict[str, tuple[Callable[..., jax.Array], dict[str, float]]] = {
    fn.__name__: (fn, presets.TIMESTEP_PARAMS[fn.__name__]) for fn in _FUNCTIONS}

# field -> (predicate, requirement text) checked on every sampler that has the field
_CONSTRAINTS = {
    "std": (lambda v: v >= 0.0, ">= 0"),
    "scale": (lambda v: v > 0.0, "> 0"),
    "sharpness": (lambda v: v > 0.0, "> 0"),
    "loc": (lambda v: True, "finite"),
}


def _check_name(name: str) -> None:
    if name not in SAMPLERS:
        raise ValueError(f"config.flow.timesteps={name!r} is not one of {sorted(SAMPLERS)}")


def default_params(name: str) -> dict[str, float]:
    """Default parameters of the sampler `name` (a fresh dict)."""
    _check_name(name)
    return dict(SAMPLERS[name][1])


def make_timestep_sampler(name: str, **params) -> Sampler:
    """Validated sampler `fn(key, batch, num_patches) -> (B, N)` float32 for `name`.

    `params` override `default_params(name)`; unknown keys and out-of-range values raise a
    one-line ValueError naming the `config.flow.<name>.<param>` field.
    """
    _check_name(name)
    fn, defaults = SAMPLERS[name]
    for k in params:
        if k not in defaults:
            raise ValueError(
                f"config.flow.{name}.{k} is not a parameter of config.flow.timesteps={name!r}; "
                f"allowed: {sorted(defaults)}"
            )
    values = {**defaults, **params}
    for k, v in values.items():
        field = f"config.flow.{name}.{k}"
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ValueError(f"{field} must be a number, got {v!r}")
        v = float(v)
        ok, req = _CONSTRAINTS[k]
        if not math.isfinite(v) or not ok(v):
            raise ValueError(f"{field} must be {req}, got {v!r}")
        values[k] = v

    def sample(key: jax.Array, batch: int, num_patches: int) -> jax.Array:
        # (B, N) float32; batch and num_patches must be static under jit.
        for arg, val in (("batch", batch), ("num_patches", num_patches)):
            if not isinstance(val, (int, np.integer)) or val < 1:
                raise ValueError(f"{arg} must be a positive int, got {val!r}")
        return fn(key, int(batch), int(num_patches), **values)

    sample.__name__ = f"timesteps_{name}"
    return sample
