"""The Patch Forcing objective (the paper's flow loss plus the difficulty NLL) and the 8-segment
validation loss of the authors' code.

  flow = mean((v - u)^2)
  nll  = mean(0.5 * (log(2 pi) + s + (u - stop_gradient(v))^2 * exp(-s)))   # s broadcast over C
  loss = flow + nll_weight * nll                                           # nll_weight = 0.01

With REPA (`alignment_loss`), the train step adds `repa.coeff * mean_tokens(1 - cos(z, sg(f)))`.

`s` is the model's per-pixel log-variance, clamped to [-30, 20] as the reference does (its
DiagonalGaussian clamps the std to [exp(-15), exp(10)]; the clamp passes no gradient outside).
The NLL trains only the variance channel: the velocity is detached inside it. exp(s) pooled per
patch is the patch's predicted difficulty. Global-time models (s is None) train on `flow` alone.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from patch_forcing.flow import interpolant

LOGVAR_RANGE = (-30.0, 20.0)


def gaussian_nll(u: jnp.ndarray, mean: jnp.ndarray, logvar: jnp.ndarray) -> jnp.ndarray:
    """Elementwise NLL of u under N(mean, exp(logvar)); logvar broadcasts over channels."""
    logvar = jnp.clip(logvar, *LOGVAR_RANGE)
    return 0.5 * (math.log(2 * math.pi) + logvar + jnp.square(u - mean) * jnp.exp(-logvar))


def patch_forcing_loss(
    v: jnp.ndarray,  # (B, H, W, C) predicted velocity
    s: jnp.ndarray | None,  # (B, H, W, 1) predicted log-variance, or None for global models
    u: jnp.ndarray,  # (B, H, W, C) target velocity x1 - x0
    nll_weight: float = 0.01,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Scalar loss and its terms, computed in float32 whatever the compute dtype."""
    if v.shape != u.shape:
        raise ValueError(f"velocity shape {v.shape} must equal the target's {u.shape}")
    v, u = v.astype(jnp.float32), u.astype(jnp.float32)
    flow = jnp.mean(jnp.square(v - u))
    if s is None:
        return flow, {"flow_loss": flow, "loss": flow}
    if s.shape != v.shape[:-1] + (1,):
        raise ValueError(f"log-variance shape {s.shape} must be {v.shape[:-1] + (1,)}")
    nll = jnp.mean(gaussian_nll(u, jax.lax.stop_gradient(v), s.astype(jnp.float32)))
    loss = flow + nll_weight * nll
    return loss, {"flow_loss": flow, "nll": nll, "loss": loss}


def alignment_loss(z: jnp.ndarray, f: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
    """REPA's term: mean over batch and tokens of 1 - cos(z, stop_gradient(f)), in [0, 2].

    z (B, N, D): the DiT's projected hidden tokens; f (B, N, D): the frozen encoder's features
    of the clean images on the same token grid. Each token counts equally whatever its time: the
    per-patch times of Patch Forcing change nothing here (as REPA's global time does not).
    Norms are floored at eps, so a zero vector has cosine 0 and a finite gradient.
    """
    if z.shape != f.shape or z.ndim != 3:
        raise ValueError(f"z {z.shape} and encoder features {f.shape} must both be (B, N, D), equal")
    z, f = z.astype(jnp.float32), jax.lax.stop_gradient(f).astype(jnp.float32)

    def unit(a):  # a / max(|a|, eps) with a finite gradient at 0
        return a * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(a), -1, keepdims=True), eps * eps))

    return jnp.mean(1.0 - jnp.sum(unit(z) * unit(f), axis=-1))


def segment_times(num_segments: int = 8) -> jnp.ndarray:
    """The validation times (k + 1/2) / num_segments, k = 0..num_segments-1: 1/16, 3/16, ... for 8."""
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    return (jnp.arange(num_segments, dtype=jnp.float32) + 0.5) / num_segments


def validation_loss(
    apply_fn: Callable,  # (x_t (B,H,W,C), t (B,N), y (B,)) -> (v, s)
    x1: jnp.ndarray,  # (B, H, W, C) data
    x0: jnp.ndarray,  # (B, H, W, C) noise, the same for every segment
    y: jnp.ndarray,  # (B,) labels
    p: int,
    num_segments: int = 8,
    per_patch: bool = True,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Flow loss at equal global times t = (k + 1/2)/num_segments: (mean, per-segment (S,)).

    `per_patch=False` passes t as (B,) for global-time models. Loops with lax.map so the
    compiled program does not grow with the number of segments.
    """
    b, h, w, _ = x1.shape
    n = interpolant.num_patches(h, w, p)
    u = interpolant.target(x0, x1)

    def one(t_scalar):
        t = jnp.full((b, n) if per_patch else (b,), t_scalar, jnp.float32)
        v, _ = apply_fn(interpolant.interpolate(x0, x1, t, p), t, y)
        return jnp.mean(jnp.square(v.astype(jnp.float32) - u))

    per_segment = jax.lax.map(one, segment_times(num_segments))
    return per_segment.mean(), per_segment
