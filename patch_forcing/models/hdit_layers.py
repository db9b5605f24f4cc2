"""HDiT-style transformer layers of the text-to-image model (SPEC §10), in Flax NNX.

Cosine-similarity attention: q and k are L2-normalised per head, both multiplied by sqrt(scale_h)
(a learnable per-head scale, initialised to 10, used as is) and attended with softmax scale 1, so
the logits are scale_h * cos(q, k). Axial RoPE rotates only the first half of every head: channel
i of that half pairs with channel i + head_dim/4 (the two halves of the rotated part), after the
normalisation. Image RoPE is 2-D (one angle set per axis, positions in a [-1, 1] canvas);
text RoPE is 1-D (integer token positions). In cross-attention only the image queries are rotated.
RoPE angles are computed in float32 whatever the compute dtype (the reference, under bf16
autocast, rounds them to bf16). RMSNorms use eps 1e-6; AdaRMSNorm scales by 1 + Linear(cond)
(zero-initialised, no bias).
All linears are bias-free except where a caller asks; kernels are stored (in, out).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from patch_forcing.models import layers
from patch_forcing.models.layers import FixedEmbedding
from patch_forcing.sharding import reshape_batch

EPS = 1e-6  # RMSNorm and cosine-similarity eps
SCALE_INIT = 10.0  # initial per-head attention scale
FF_EXPAND = 3  # SwiGLU hidden width = 3 * model width (also in the mapping network)
FOURIER_SEED = 0  # the fixed Fourier features are drawn from this key, independent of rngs
LOGICAL_AXES = ("embed", "mlp")
IMAGE_ROPE_RANGE = (math.pi, 10.0 * math.pi)  # per-axis frequency range of the 2-D image RoPE
TEXT_ROPE_RANGE = (1e-4, 1.0)  # frequency range of the 1-D text RoPE


# ----------------------------------------------------------------------------- RoPE (pure)


def _log_spaced(lo: float, hi: float, n: int) -> np.ndarray:
    """n frequencies, log-spaced from lo (inclusive) to hi (exclusive), in float64."""
    return np.exp(np.linspace(math.log(lo), math.log(hi), n + 1)[:-1])


def rope_freqs_2d(head_dim: int, num_heads: int) -> np.ndarray:
    """(2, H, head_dim // 8) float32: the same table for the row (0) and column (1) axis.
    One log-spaced ladder of H * head_dim/8 values is dealt to the heads round-robin: head h
    gets values h, h + H, h + 2H, ... (so every head sees low and high frequencies)."""
    n = head_dim // 8
    per_head = _log_spaced(*IMAGE_ROPE_RANGE, num_heads * n).reshape(n, num_heads).T  # (H, n)
    return np.stack([per_head, per_head]).astype(np.float32)


def rope_freqs_1d(head_dim: int, num_heads: int) -> np.ndarray:
    """(H, head_dim // 4) float32, dealt to heads round-robin like `rope_freqs_2d`."""
    n = head_dim // 4
    return _log_spaced(*TEXT_ROPE_RANGE, num_heads * n).reshape(n, num_heads).T.astype(np.float32)


def rope_angles(pos: jnp.ndarray, freqs: jnp.ndarray) -> jnp.ndarray:
    """Rotation angles (..., L, H, d) float32.
    2-D: pos (..., L, 2) as (row, col), freqs (2, H, n) -> d = 2n, [row angles, col angles].
    1-D: pos (..., L), freqs (H, n) -> d = n."""
    pos = pos.astype(jnp.float32)
    if freqs.ndim == 2:
        return pos[..., None, None] * freqs
    rows = pos[..., 0, None, None] * freqs[0]
    cols = pos[..., 1, None, None] * freqs[1]
    return jnp.concatenate([rows, cols], axis=-1)


def apply_rope(x: jnp.ndarray, theta: jnp.ndarray) -> jnp.ndarray:
    """x (B, L, H, E), theta (B or 1, L, H, d) with 2d <= E: rotates each pair (x_i, x_{i+d}),
    i < d, by theta_i; channels from 2d on pass unchanged. Computed in float32."""
    d = theta.shape[-1]
    x = x.astype(jnp.float32)
    x1, x2, rest = x[..., :d], x[..., d : 2 * d], x[..., 2 * d :]
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


# ----------------------------------------------------------------------------- factory, basics


def torch_linear_init(fan_in: int):
    """PyTorch's nn.Linear default for weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Factory(layers.Factory):
    """layers.Factory plus the attention implementation and fixed (non-trainable) variables."""

    def __init__(self, dtype: str, rngs: nnx.Rngs, attention_impl: str | None = None):
        super().__init__(dtype, rngs, "the T2I model", LOGICAL_AXES)
        self.attention_impl = attention_impl

    def fixed(self, value, names):
        return FixedEmbedding(jnp.asarray(value, jnp.float32), out_sharding=names, eager_sharding=self.eager)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel (d_in, d_out) float32, computed in the compute dtype.
    Initialised like PyTorch's nn.Linear, or zeros (`zero=True`)."""

    def __init__(self, f: Factory, d_in, d_out, names, *, zero=False, bias=False):
        self.dtype = f.dtype
        kernel_init = nnx.initializers.zeros_init() if zero else torch_linear_init(d_in)
        self.kernel = f.param(kernel_init, (d_in, d_out), names)
        self.bias = f.param(torch_linear_init(d_in), (d_out,), names[1:]) if bias else None

    def __call__(self, x):
        y = jnp.dot(x.astype(self.dtype), layers.use(self.kernel[...], self.dtype))
        return y if self.bias is None else y + layers.use(self.bias[...], self.dtype)


def rms_norm(x: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
    """x / rms(x) * scale in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + EPS) * scale


class RMSNorm(nnx.Module):
    def __init__(self, f: Factory, d: int, axis: str | None = "embed"):
        self.scale = f.param(nnx.initializers.ones_init(), (d,), (axis,))

    def __call__(self, x, cond=None):  # cond is ignored: the unconditional twin of AdaRMSNorm
        return rms_norm(x, layers.use(self.scale[...], jnp.float32))


class AdaRMSNorm(nnx.Module):
    """RMSNorm whose scale is 1 + Linear(cond), cond (B, N or 1, d_cond) per token."""

    def __init__(self, f: Factory, d: int, d_cond: int):
        self.linear = Linear(f, d_cond, d, (None, "embed"), zero=True)

    def __call__(self, x, cond):
        return rms_norm(x, 1.0 + self.linear(cond).astype(jnp.float32))


def _norm(f: Factory, d: int, d_cond: int | None):
    return AdaRMSNorm(f, d, d_cond) if d_cond is not None else RMSNorm(f, d)


class FeedForward(nnx.Module):
    """Pre-norm SwiGLU residual block: x + down(a * silu(g)), [a, g] = up(norm(x)).
    `axis=None` replicates it (the small mapping network)."""

    def __init__(self, f: Factory, d: int, d_cond: int | None = None, axis: str | None = "embed"):
        d_ff, mlp = FF_EXPAND * d, ("mlp" if axis else None)
        self.norm = AdaRMSNorm(f, d, d_cond) if d_cond is not None else RMSNorm(f, d, axis)
        self.up_proj = Linear(f, d, 2 * d_ff, (axis, mlp))
        self.down_proj = Linear(f, d_ff, d, (mlp, axis), zero=True)

    def __call__(self, x, cond=None):
        a, g = jnp.split(self.up_proj(self.norm(x, cond)), 2, axis=-1)
        return x + self.down_proj(a * jax.nn.silu(g)).astype(jnp.float32)


# ----------------------------------------------------------------------------- attention


class RoPE(nnx.Module):
    """Fixed axial RoPE frequencies: kind 'image' (2-D) or 'text' (1-D)."""

    def __init__(self, f: Factory, head_dim: int, num_heads: int, kind: str):
        if kind == "image":
            self.freqs = f.fixed(rope_freqs_2d(head_dim, num_heads), (None, None, None))
        else:
            self.freqs = f.fixed(rope_freqs_1d(head_dim, num_heads), (None, None))

    def __call__(self, pos):  # (B, L, 2) or (B, L) -> (B, L, H, d)
        return rope_angles(pos, self.freqs[...])


def cosine_qk(q, k, scale):
    """q (B, Lq, H, E), k (B, Lk, H, E), scale (H,) -> both unit-normalised times sqrt(scale), f32."""
    def unit(x):
        x = x.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + EPS)

    root = jnp.sqrt(scale.astype(jnp.float32))[:, None]  # (H, 1)
    return unit(q) * root, unit(k) * root


def attend(q, k, v, key_mask, dtype, impl):
    """Softmax(q k^T) v with scale 1; key_mask (B, Lk) bool (True = attend) or None.
    A row whose keys are all masked attends uniformly (no NaN)."""
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, Lk)
    return jax.nn.dot_product_attention(
        q.astype(dtype), k.astype(dtype), v.astype(dtype), mask=mask, scale=1.0, implementation=impl
    )


class SelfAttention(nnx.Module):
    def __init__(self, f: Factory, d: int, head_dim: int, d_cond: int | None, rope: str):
        self.heads, self.head_dim, self.dtype, self.impl = d // head_dim, head_dim, f.dtype, f.attention_impl
        self.norm = _norm(f, d, d_cond)
        self.qkv_proj = Linear(f, d, 3 * d, ("embed", "mlp"))
        self.scale = f.param(nnx.initializers.constant(SCALE_INIT), (self.heads,), (None,))
        self.out_proj = Linear(f, d, d, ("mlp", "embed"), zero=True)
        self.pos_emb = RoPE(f, head_dim, self.heads, rope)

    def __call__(self, x, pos, cond=None, key_mask=None):  # x (B, L, D) float32
        b, n, d = x.shape
        qkv = reshape_batch(self.qkv_proj(self.norm(x, cond)), (b, n, 3, self.heads, self.head_dim))
        q, k = cosine_qk(qkv[:, :, 0], qkv[:, :, 1], self.scale[...])
        theta = self.pos_emb(pos)
        out = attend(apply_rope(q, theta), apply_rope(k, theta), qkv[:, :, 2], key_mask, self.dtype, self.impl)
        return x + self.out_proj(reshape_batch(out, (b, n, d))).astype(jnp.float32)


class CrossAttention(nnx.Module):
    """Image queries (RoPE-rotated) attend to RMS-normalised context tokens (no RoPE)."""

    def __init__(self, f: Factory, d: int, d_ctx: int, head_dim: int, d_cond: int | None):
        self.heads, self.head_dim, self.dtype, self.impl = d // head_dim, head_dim, f.dtype, f.attention_impl
        self.norm = _norm(f, d, d_cond)
        self.norm_cross = RMSNorm(f, d_ctx)
        self.q_proj = Linear(f, d, d, ("embed", "mlp"))
        self.kv_proj = Linear(f, d_ctx, 2 * d, ("embed", "mlp"))
        self.scale = f.param(nnx.initializers.constant(SCALE_INIT), (self.heads,), (None,))
        self.out_proj = Linear(f, d, d, ("mlp", "embed"), zero=True)
        self.pos_emb = RoPE(f, head_dim, self.heads, "image")

    def __call__(self, x, pos, ctx, cond=None, ctx_mask=None):  # x (B, N, D), ctx (B, L, D_ctx)
        b, n, d = x.shape
        q = reshape_batch(self.q_proj(self.norm(x, cond)), (b, n, self.heads, self.head_dim))
        kv = reshape_batch(self.kv_proj(self.norm_cross(ctx)), (b, ctx.shape[1], 2, self.heads, self.head_dim))
        q, k = cosine_qk(q, kv[:, :, 0], self.scale[...])
        out = attend(apply_rope(q, self.pos_emb(pos)), k, kv[:, :, 1], ctx_mask, self.dtype, self.impl)
        return x + self.out_proj(reshape_batch(out, (b, n, d))).astype(jnp.float32)


class TransformerLayer(nnx.Module):
    """self-attention, optional cross-attention (d_ctx), SwiGLU; AdaRMSNorms when d_cond is set."""

    def __init__(self, f: Factory, d: int, head_dim: int, *, rope: str, d_cond: int | None = None,
                 d_ctx: int | None = None):
        self.self_attn = SelfAttention(f, d, head_dim, d_cond, rope)
        self.cross_attn = CrossAttention(f, d, d_ctx, head_dim, d_cond) if d_ctx is not None else None
        self.ff = FeedForward(f, d, d_cond)

    def __call__(self, x, pos, cond=None, ctx=None, ctx_mask=None, self_mask=None):
        x = self.self_attn(x, pos, cond, self_mask)
        if self.cross_attn is not None:
            x = self.cross_attn(x, pos, ctx, cond, ctx_mask)
        return self.ff(x, cond)


# ----------------------------------------------------------------------------- time embedding


class FourierFeatures(nnx.Module):
    """[cos, sin](2 pi t w), w ~ N(0, 1) fixed (a FixedEmbedding drawn from FOURIER_SEED)."""

    def __init__(self, f: Factory, dim: int):
        w = jax.random.normal(jax.random.key(FOURIER_SEED), (1, dim // 2), jnp.float32)
        self.kernel = f.fixed(w, (None, None))

    def __call__(self, t):  # (...,) -> (..., dim)
        ang = 2.0 * math.pi * t.astype(jnp.float32)[..., None] * self.kernel[...][0]
        return jnp.concatenate([jnp.cos(ang), jnp.sin(ang)], axis=-1)


class MappingNetwork(nnx.Module):
    def __init__(self, f: Factory, dim: int, depth: int):
        self.in_norm = RMSNorm(f, dim, None)
        self.blocks = nnx.List([FeedForward(f, dim, axis=None) for _ in range(depth)])
        self.out_norm = RMSNorm(f, dim, None)

    def __call__(self, x):
        x = self.in_norm(x)
        for block in self.blocks:
            x = block(x)
        return self.out_norm(x)


class TimestepEmbedder(nnx.Module):
    """t (...,) -> Fourier features -> Linear -> mapping network -> (..., dim) float32."""

    def __init__(self, f: Factory, dim: int, depth: int):
        self.time_emb = FourierFeatures(f, dim)
        self.time_in_proj = Linear(f, dim, dim, (None, None))
        self.mapping = MappingNetwork(f, dim, depth)

    def __call__(self, t):
        return self.mapping(self.time_in_proj(self.time_emb(t)).astype(jnp.float32))
