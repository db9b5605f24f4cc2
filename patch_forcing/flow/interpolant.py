"""Per-patch flow matching: patchify, per-patch interpolation, and per-patch <-> pixel maps.

Time convention (one place, here): t = 0 is Gaussian noise x0 ~ N(0, I), t = 1 is data x1.
  x_t = t * x1 + (1 - t) * x0,     target velocity u = x1 - x0.
Patch Forcing gives every non-overlapping p x p patch its own time t_i; all pixels of patch i are
interpolated with t_i. Tokens are the DiT's: N = (H/p) * (W/p) patches in raster order (token
index = row * (W/p) + col); a token's values are laid out (p, p, C), row-major. Global flow
matching is the special case of equal patch times, and a (B,) time is accepted as such.

Arrays are NHWC. Everything is a pure jnp function; shapes are static under jit. (patchify and
unpatchify keep the batch sharding under an Explicit-axes mesh, so the DiT uses them too.)
"""

from __future__ import annotations

import jax.numpy as jnp

from patch_forcing.sharding import reshape_batch

POOL_MODES = ("mean", "max", "min")


def num_patches(h: int, w: int, p: int) -> int:
    """N = (h/p)(w/p); a one-line ValueError when p does not divide the image."""
    if p < 1:
        raise ValueError(f"patch_size must be >= 1, got {p}")
    if h % p or w % p:
        raise ValueError(f"patch_size={p} must divide the image size (H, W)=({h}, {w})")
    return (h // p) * (w // p)


def patchify(x: jnp.ndarray, p: int) -> jnp.ndarray:
    """(B, H, W, C) -> (B, N, p*p*C) with each token laid out (p, p, C); the DiT's tokenizer."""
    b, h, w, c = x.shape
    n = num_patches(h, w, p)
    x = reshape_batch(x, (b, h // p, p, w // p, p, c)).transpose(0, 1, 3, 2, 4, 5)
    return reshape_batch(x, (b, n, p * p * c))


def unpatchify(tokens: jnp.ndarray, p: int, h: int, w: int) -> jnp.ndarray:
    """(B, N, p*p*C) -> (B, H, W, C); the inverse of `patchify`."""
    n = num_patches(h, w, p)
    if tokens.ndim != 3 or tokens.shape[1] != n or tokens.shape[2] % (p * p):
        raise ValueError(
            f"tokens must have shape (B, {n}, p*p*C) for a {h}x{w} image and patch_size={p}, "
            f"got {tuple(tokens.shape)}"
        )
    b, _, k = tokens.shape
    x = reshape_batch(tokens, (b, h // p, w // p, p, p, k // (p * p))).transpose(0, 1, 3, 2, 4, 5)
    return reshape_batch(x, (b, h, w, k // (p * p)))


def _check_patch_values(v: jnp.ndarray, b: int, n: int, name: str) -> None:
    if v.shape != (b, n):
        raise ValueError(f"{name} must have shape (B, N)=({b}, {n}), got {tuple(v.shape)}")


def patch_to_pixels(v: jnp.ndarray, p: int, h: int, w: int) -> jnp.ndarray:
    """Broadcast a per-patch value (B, N) onto pixels: (B, H, W, 1)."""
    n = num_patches(h, w, p)
    _check_patch_values(v, v.shape[0], n, "per-patch values")
    grid = v.reshape(v.shape[0], h // p, w // p)
    return jnp.repeat(jnp.repeat(grid, p, axis=1), p, axis=2)[..., None]


def pool_patches(x: jnp.ndarray, p: int, mode: str = "mean") -> jnp.ndarray:
    """Reduce a (B, H, W, C) map over each patch's p x p pixels (and channels): (B, N)."""
    if mode not in POOL_MODES:
        raise ValueError(f"pool mode={mode!r} is not one of {list(POOL_MODES)}")
    tokens = patchify(x, p)  # (B, N, p*p*C)
    return {"mean": jnp.mean, "max": jnp.max, "min": jnp.min}[mode](tokens, axis=-1)


def _per_pixel_time(t: jnp.ndarray, x: jnp.ndarray, p: int) -> jnp.ndarray:
    """(B,) or (B, N) times -> (B, H, W, 1) per-pixel times."""
    b, h, w, _ = x.shape
    n = num_patches(h, w, p)
    if t.ndim == 1 and t.shape[0] == b:
        return t[:, None, None, None]
    _check_patch_values(t, b, n, "t")
    return patch_to_pixels(t, p, h, w)


def interpolate(x0: jnp.ndarray, x1: jnp.ndarray, t: jnp.ndarray, p: int) -> jnp.ndarray:
    """x_t = t * x1 + (1 - t) * x0 with t per patch (B, N) or global (B,). Shapes (B, H, W, C)."""
    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have the same shape, got {x0.shape} and {x1.shape}")
    tp = _per_pixel_time(t, x1, p).astype(x1.dtype)
    return tp * x1 + (1.0 - tp) * x0


def target(x0: jnp.ndarray, x1: jnp.ndarray) -> jnp.ndarray:
    """The flow-matching velocity u = x1 - x0 (the same for every patch time)."""
    return x1 - x0
