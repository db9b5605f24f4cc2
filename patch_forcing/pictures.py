"""Pictures: uint8 conversion, image grids, PNG files, and per-patch difficulty maps (numpy + PIL).

`difficulty_picture` shows, for a few samples, the final image beside its per-patch difficulty
log d = s (pooled) at several sampler steps, coloured with a viridis-like map (dark = easy, yellow
= hard, normalised per sample over the steps shown), and for the adaptive samplers a second row
with the certain (light) / uncertain (red) patches of those steps. Everything is upscaled with
nearest neighbour so an 8 x 8 digit is visible.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

__all__ = ["to_uint8", "image_grid", "save_png", "load_png", "colormap", "difficulty_picture",
           "trajectory_picture", "prompt_grid"]

# Viridis sampled at 0, 1/8, ..., 1 (RGB 0..255); linear interpolation in between.
_VIRIDIS = np.array(
    [
        [68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
        [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37],
    ],
    np.float64,
)
CERTAIN_RGB = (235, 235, 235)
UNCERTAIN_RGB = (200, 40, 40)


def to_uint8(x):
    """Images in [-1, 1] -> uint8 [0, 255] as ADM's sample files: clip(127.5 x + 128). numpy in,
    numpy out; a jax.Array (or a tracer inside jit) in, a jax.Array out."""
    xp = jnp if isinstance(x, jax.Array) else np
    x = xp.asarray(x, xp.float32)
    return xp.clip(127.5 * x + 128.0, 0, 255).astype(xp.uint8)


def _rgb(images: np.ndarray) -> np.ndarray:
    """(..., C) uint8 -> (..., 3): grey repeated, 2 channels padded with 0, > 3 channels cut to 3."""
    c = images.shape[-1]
    if c == 1:
        return np.repeat(images, 3, axis=-1)
    if c == 2:
        return np.concatenate([images, np.zeros_like(images[..., :1])], axis=-1)
    return images[..., :3]


def image_grid(images, ncols: int | None = None, pad: int = 2, pad_value: int = 255,
               min_size: int = 0) -> np.ndarray:
    """(B, H, W, C) -> one (rows*H + (rows+1)*pad, cols*W + (cols+1)*pad, C) image, row-major;
    ncols defaults to ceil(sqrt(B)); missing cells of the last row are pad_value. Images smaller
    than `min_size` pixels are first enlarged by an integer factor (nearest neighbour), so 8x8
    digits stay visible."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, H, W, C), got {images.shape}")
    factor = max(1, -(-min_size // max(images.shape[1:3])))
    if factor > 1:
        images = images.repeat(factor, axis=1).repeat(factor, axis=2)
    b, h, w, c = images.shape
    ncols = int(ncols or math.ceil(math.sqrt(b)))
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    nrows = max(1, math.ceil(b / ncols))
    out = np.full((nrows * h + (nrows + 1) * pad, ncols * w + (ncols + 1) * pad, c), pad_value, images.dtype)
    for i in range(b):
        r, col = divmod(i, ncols)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        out[y0:y0 + h, x0:x0 + w] = images[i]
    return out


def save_png(path, array) -> None:
    """Write a uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array as PNG; local or epath paths."""
    a = np.asarray(array)
    if a.dtype != np.uint8:
        raise ValueError(f"save_png needs a uint8 array, got {a.dtype}")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[-1] == 2:
        a = _rgb(a)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    data = buf.getvalue()
    if hasattr(path, "write_bytes"):  # pathlib.Path / etils.epath.Path
        path.write_bytes(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def load_png(path) -> np.ndarray:
    """Read a PNG back as a uint8 array."""
    data = path.read_bytes() if hasattr(path, "read_bytes") else open(path, "rb").read()
    return np.asarray(Image.open(io.BytesIO(data)))


def colormap(values) -> np.ndarray:
    """Values in [0, 1] (clipped; NaN -> 0) -> uint8 RGB (..., 3), viridis-like."""
    v = np.nan_to_num(np.clip(np.asarray(values, np.float64), 0.0, 1.0))
    pos = v * (len(_VIRIDIS) - 1)
    lo = np.minimum(np.floor(pos).astype(int), len(_VIRIDIS) - 2)
    frac = (pos - lo)[..., None]
    rgb = _VIRIDIS[lo] * (1.0 - frac) + _VIRIDIS[lo + 1] * frac
    return np.round(rgb).astype(np.uint8)


def _grid_shape(n: int, h: int, w: int, patch_size: int | None) -> tuple[int, int]:
    """The (rows, cols) patch grid of N tokens for an (h, w) image (decoded images: by aspect)."""
    if patch_size and h % patch_size == 0 and w % patch_size == 0 and (h // patch_size) * (w // patch_size) == n:
        return h // patch_size, w // patch_size
    gh = max(1, round(math.sqrt(n * h / w)))
    if n % gh:
        raise ValueError(f"difficulty has N={n} patches, which is no grid for a {h}x{w} image")
    return gh, n // gh


def _upscale(a: np.ndarray, th: int, tw: int) -> np.ndarray:
    """Nearest-neighbour resize of (h, w, 3) to (th, tw, 3)."""
    ys = np.arange(th) * a.shape[0] // th
    xs = np.arange(tw) * a.shape[1] // tw
    return a[ys][:, xs]


def _caption(canvas: np.ndarray, xy: tuple[int, int], text: str, box: bool = False) -> np.ndarray:
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    if box:
        draw.rectangle(draw.textbbox(xy, text), fill=(255, 255, 255))
    draw.text(xy, text, fill=(0, 0, 0))
    return np.array(img)


def difficulty_picture(
    images,
    difficulty,
    steps: Sequence[int] | None = None,
    masks=None,
    patch_size: int | None = None,
    times=None,
    labels: Sequence[str] | None = None,
    max_columns: int = 6,
    tile: int = 96,
    pad: int = 4,
) -> np.ndarray:
    """Images beside their per-patch difficulty heatmaps over the trajectory -> uint8 (H', W', 3).

    images (R, H, W, C) uint8; difficulty (R, S, N) per-patch d = exp(s) (shown as log d); steps:
    which of the S steps to show (default: up to `max_columns` evenly spaced, first and last
    included); masks (R, S, N) bool certain masks (adaptive samplers) add a row per sample; times
    (R, S+1, N) or (S+1,) captions the columns with the mean time; labels caption the rows.
    """
    images = _rgb(np.asarray(images))
    d = np.asarray(difficulty, np.float64)
    if images.ndim != 4 or d.ndim != 3 or d.shape[0] != images.shape[0]:
        raise ValueError(
            f"images (R, H, W, C) and difficulty (R, S, N) must agree, got {images.shape} and {d.shape}"
        )
    r, s_count, n = d.shape
    _, h, w, _ = images.shape
    gh, gw = _grid_shape(n, h, w, patch_size)
    if steps is None:
        steps = np.unique(np.round(np.linspace(0, s_count - 1, min(max_columns, s_count))).astype(int))
    steps = [int(k) for k in steps]
    if any(not 0 <= k < s_count for k in steps):
        raise ValueError(f"steps must be in [0, {s_count}), got {steps}")
    m = None if masks is None else np.asarray(masks, bool)
    if m is not None and m.shape != d.shape:
        raise ValueError(f"masks must have the difficulty's shape {d.shape}, got {m.shape}")

    th = max(tile, h)
    tw = max(1, round(th * w / h))
    caption_h = 12 if times is not None else 0
    ncols = 1 + len(steps)
    rows_per_sample = 2 if m is not None else 1
    height = caption_h + r * rows_per_sample * (th + pad) + pad
    width = ncols * (tw + pad) + pad
    canvas = np.full((height, width, 3), 255, np.uint8)

    def put(row: int, col: int, a: np.ndarray):
        y0, x0 = caption_h + pad + row * (th + pad), pad + col * (tw + pad)
        canvas[y0:y0 + th, x0:x0 + tw] = _upscale(a, th, tw)

    logd = np.log(np.maximum(d, np.finfo(np.float64).tiny))
    for i in range(r):
        row = i * rows_per_sample
        put(row, 0, images[i])
        shown = logd[i, steps]  # (K, N)
        lo, hi = shown.min(), shown.max()
        norm = (shown - lo) / (hi - lo) if hi > lo else np.full_like(shown, 0.5)
        for j, k in enumerate(steps):
            put(row, j + 1, colormap(norm[j].reshape(gh, gw)))
            if m is not None:
                mk = m[i, k].reshape(gh, gw)[..., None]
                put(row + 1, j + 1, np.where(mk, np.uint8(CERTAIN_RGB), np.uint8(UNCERTAIN_RGB)).astype(np.uint8))
    if times is not None:
        t = np.asarray(times, np.float64)
        t_steps = t.reshape(-1) if t.ndim == 1 else t.mean(axis=(0, 2))
        for j, k in enumerate(steps):
            canvas = _caption(canvas, (pad + (j + 1) * (tw + pad), 0), f"t={t_steps[k]:.2f}")
    if labels is not None:
        for i, text in enumerate(list(labels)[:r]):
            canvas = _caption(canvas, (pad + 1, caption_h + pad + i * rows_per_sample * (th + pad) + 1), str(text), box=True)
    return canvas


def trajectory_picture(images, info: dict, patch_size: int, model_height: int, rows: int):
    """The first `rows` samples beside their per-patch difficulty over the sampler's trajectory
    (and certain masks), from a sampler's `info`; None for global-time models (no difficulty).
    `model_height` is the model's input height: decoded latents have more pixels per patch."""
    if rows <= 0 or "difficulty" not in info:
        return None
    images = np.asarray(images[:rows])
    uint8 = images if images.dtype == np.uint8 else to_uint8(images)
    masks = info["certain"][:rows] if "certain" in info else None
    scale = uint8.shape[1] // model_height
    return difficulty_picture(uint8, info["difficulty"][:rows], masks=masks, patch_size=patch_size * scale,
                              times=info["times"][:rows])


def prompt_grid(images, prompts: Sequence[str], min_size: int = 64, pad: int = 4) -> np.ndarray:
    """A text-to-image grid: row p is prompts[p] (rendered on the left) then its K images.

    images (P, K, H, W, C) uint8, enlarged by an integer factor to at least `min_size` pixels
    (nearest neighbour) -> uint8 (H', W', 3) on white."""
    images = np.asarray(images)
    if images.ndim != 5 or len(prompts) != images.shape[0]:
        raise ValueError(f"images must be (P, K, H, W, C) with P = len(prompts) = {len(prompts)}, got {images.shape}")
    factor = max(1, -(-min_size // max(images.shape[2:4])))
    images = _rgb(images.repeat(factor, axis=2).repeat(factor, axis=3))
    p, k, h, w, _ = images.shape
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(draw.textbbox((0, 0), str(t))[2] for t in prompts) + 2 * pad
    canvas = np.full((p * (h + pad) + pad, text_w + k * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(p):
        y0 = pad + i * (h + pad)
        for j in range(k):
            x0 = text_w + pad + j * (w + pad)
            canvas[y0:y0 + h, x0:x0 + w] = images[i, j]
        canvas = _caption(canvas, (pad, y0 + h // 2 - 6), str(prompts[i]))
    return canvas
