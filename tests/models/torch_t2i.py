"""An independent PyTorch PFT T2I transformer, written from SPEC §10 for the parity tests.

Its state_dict() keys and shapes are the authors' (PatchForcingTransformerT2I): t_embedder.
{time_emb.weight, time_in_proj, mapping.*}, merge.proj, blocks.{i}.{self_attn, cross_attn, ff}.*,
split.{norm, proj}, txt_proj, txt_refiner.{i}.*. Linear weights are (out, in), no biases except
txt_proj. RoPE is done with complex multiplication here (ours uses cos/sin pairs). No text mask:
the reference has none. Images are NCHW, positions (B, H, W, 2) per latent pixel.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

EPS = 1e-6


def rms(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * scale


class Norm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x, cond=None):
        return rms(x, self.scale)


class AdaNorm(nn.Module):
    def __init__(self, d, d_cond):
        super().__init__()
        self.linear = nn.Linear(d_cond, d, bias=False)

    def forward(self, x, cond):
        return rms(x, 1 + self.linear(cond))


def lin(d_in, d_out):
    return nn.Linear(d_in, d_out, bias=False)


def ladder(lo, hi, n):
    """n log-spaced values in [lo, hi), float32 like torch.linspace."""
    return torch.linspace(math.log(lo), math.log(hi), n + 1)[:-1].exp()


class ImageRoPE(nn.Module):
    """freqs (2, H, hd/8); angles (B, L, H, hd/4) = [row * f, col * f]."""

    def __init__(self, head_dim, heads):
        super().__init__()
        n = head_dim // 8
        per_head = ladder(math.pi, 10 * math.pi, heads * n).view(n, heads).T
        self.freqs = nn.Parameter(torch.stack([per_head, per_head]).contiguous(), requires_grad=False)

    def forward(self, pos):  # (B, L, 2)
        return torch.cat([pos[..., :1, None] * self.freqs[0], pos[..., 1:, None] * self.freqs[1]], dim=-1)


class TextRoPE(nn.Module):
    """freqs (H, hd/4); angles (B, L, H, hd/4) = pos * f."""

    def __init__(self, head_dim, heads):
        super().__init__()
        n = head_dim // 4
        self.freqs = nn.Parameter(ladder(1e-4, 1.0, heads * n).view(n, heads).T.contiguous(), requires_grad=False)

    def forward(self, pos):  # (B, L)
        return pos[..., None, None] * self.freqs


def rotate(x, theta):
    """x (B, H, L, E), theta (B, L, H, d): complex rotation of (x_i, x_{i+d}) for i < d."""
    d = theta.shape[-1]
    z = torch.complex(x[..., :d], x[..., d : 2 * d]) * torch.polar(torch.ones_like(theta), theta).transpose(1, 2)
    return torch.cat([z.real, z.imag, x[..., 2 * d :]], dim=-1)


def unit(x):
    return x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + EPS)


def heads(x, e):  # (B, L, H*e) -> (B, H, L, e)
    return x.unflatten(-1, (-1, e)).transpose(1, 2)


def cos_attention(q, k, v, scale):
    """(B, H, L, E) each; logits scale_h * cos(q, k)."""
    logits = torch.einsum("bhqe,bhke->bhqk", unit(q), unit(k)) * scale[:, None, None]
    out = torch.einsum("bhqk,bhke->bhqe", logits.softmax(-1), v)
    return out.transpose(1, 2).flatten(2)


class SelfAttn(nn.Module):
    def __init__(self, d, hd, d_cond, rope):
        super().__init__()
        self.hd = hd
        self.norm = AdaNorm(d, d_cond) if d_cond else Norm(d)
        self.qkv_proj = lin(d, 3 * d)
        self.scale = nn.Parameter(torch.full((d // hd,), 10.0))
        self.out_proj = lin(d, d)
        self.pos_emb = rope(hd, d // hd)

    def forward(self, x, pos, cond=None):
        q, k, v = (heads(a, self.hd) for a in self.qkv_proj(self.norm(x, cond)).chunk(3, dim=-1))
        theta = self.pos_emb(pos)
        return x + self.out_proj(cos_attention(rotate(q, theta), rotate(k, theta), v, self.scale))


class CrossAttn(nn.Module):
    def __init__(self, d, d_ctx, hd, d_cond):
        super().__init__()
        self.hd = hd
        self.norm = AdaNorm(d, d_cond)
        self.norm_cross = Norm(d_ctx)
        self.q_proj = lin(d, d)
        self.kv_proj = lin(d_ctx, 2 * d)
        self.scale = nn.Parameter(torch.full((d // hd,), 10.0))
        self.out_proj = lin(d, d)
        self.pos_emb = ImageRoPE(hd, d // hd)

    def forward(self, x, pos, ctx, cond):
        q = heads(self.q_proj(self.norm(x, cond)), self.hd)
        k, v = (heads(a, self.hd) for a in self.kv_proj(self.norm_cross(ctx)).chunk(2, dim=-1))
        return x + self.out_proj(cos_attention(rotate(q, self.pos_emb(pos)), k, v, self.scale))


class SwiGLU(nn.Module):
    def __init__(self, d, d_cond=None):
        super().__init__()
        self.norm = AdaNorm(d, d_cond) if d_cond else Norm(d)
        self.up_proj = lin(d, 6 * d)
        self.down_proj = lin(3 * d, d)

    def forward(self, x, cond=None):
        a, g = self.up_proj(self.norm(x, cond)).chunk(2, dim=-1)
        return x + self.down_proj(a * F.silu(g))


class Layer(nn.Module):
    def __init__(self, d, hd, rope, d_cond=None, d_ctx=None):
        super().__init__()
        self.self_attn = SelfAttn(d, hd, d_cond, rope)
        if d_ctx:
            self.cross_attn = CrossAttn(d, d_ctx, hd, d_cond)
        self.ff = SwiGLU(d, d_cond)

    def forward(self, x, pos, cond=None, ctx=None):
        x = self.self_attn(x, pos, cond)
        if ctx is not None:
            x = self.cross_attn(x, pos, ctx, cond)
        return self.ff(x, cond)


class Fourier(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.register_buffer("weight", torch.randn(dim // 2, 1))

    def forward(self, t):  # (B, N) -> (B, N, dim)
        ang = 2 * math.pi * t[..., None] * self.weight[:, 0]
        return torch.cat([ang.cos(), ang.sin()], dim=-1)


class Mapping(nn.Module):
    def __init__(self, dim, depth):
        super().__init__()
        self.in_norm = Norm(dim)
        self.blocks = nn.ModuleList([SwiGLU(dim) for _ in range(depth)])
        self.out_norm = Norm(dim)

    def forward(self, x):
        x = self.in_norm(x)
        for block in self.blocks:
            x = block(x)
        return self.out_norm(x)


class TimeEmbed(nn.Module):
    def __init__(self, dim, depth):
        super().__init__()
        self.time_emb = Fourier(dim)
        self.time_in_proj = lin(dim, dim)
        self.mapping = Mapping(dim, depth)

    def forward(self, t):
        return self.mapping(self.time_in_proj(self.time_emb(t)))


class Merge(nn.Module):
    def __init__(self, c, d, p):
        super().__init__()
        self.p = p
        self.proj = lin(p * p * c, d)

    def forward(self, x, pos):  # x (B, C, H, W), pos (B, H, W, 2) -> (B, N, D), (B, N, 2)
        p = self.p
        tok = F.unfold(x, p, stride=p)  # (B, C*p*p, N), features ordered (C, p, p)
        b, _, n = tok.shape
        tok = tok.view(b, -1, p * p, n).permute(0, 3, 2, 1).reshape(b, n, -1)  # -> (p, p, C)
        pos = F.avg_pool2d(pos.permute(0, 3, 1, 2), p).flatten(2).transpose(1, 2)
        return self.proj(tok), pos


class Split(nn.Module):
    def __init__(self, d, c_out, p):
        super().__init__()
        self.p = p
        self.norm = Norm(d)
        self.proj = lin(d, p * p * c_out)

    def forward(self, tok, h, w):  # (B, N, D) -> (B, C_out, H, W)
        p, b = self.p, tok.shape[0]
        out = self.proj(self.norm(tok)).view(b, h // p, w // p, p, p, -1)  # per token (p, p, C_out)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(b, -1, h, w)


def axial_pos(h, w):
    """(h, w, 2) (row, col) cell centres; the longer side spans [-1, 1]."""
    ar = w / h
    ys, xs = (1 / ar, 1.0) if ar > 1 else (1.0, ar)

    def centres(lim, n):
        e = torch.linspace(-lim, lim, n + 1)
        return (e[1:] + e[:-1]) / 2

    return torch.stack(torch.meshgrid(centres(ys, h), centres(xs, w), indexing="ij"), dim=-1)


def crop_pos(meta: dict, size: int, ds: int = 8):
    """Positions of a square latent crop given the pixel meta {top, left, orig_h, orig_w}."""
    top, left, oh, ow = (math.floor(meta[k] / ds) for k in ("top", "left", "orig_h", "orig_w"))
    return axial_pos(oh, ow)[top : top + size, left : left + size]


class TorchT2I(nn.Module):
    """forward(x (B,C,H,W), t (B,N), txt (B,L,txt_in_dim), pos (B,H,W,2) or None) -> v, s (NCHW)."""

    def __init__(self, in_dim, depth, hidden_dim, head_dim, mapping_dim, mapping_depth, patch_size,
                 txt_in_dim, txt_refiner_dim, txt_refiner_head_dim, txt_refiner_depth):
        super().__init__()
        self.t_embedder = TimeEmbed(mapping_dim, mapping_depth)
        self.merge = Merge(in_dim, hidden_dim, patch_size)
        self.blocks = nn.ModuleList([
            Layer(hidden_dim, head_dim, ImageRoPE, mapping_dim, txt_refiner_dim) for _ in range(depth)
        ])
        self.split = Split(hidden_dim, in_dim + 1, patch_size)
        self.txt_proj = nn.Linear(txt_in_dim, txt_refiner_dim)
        self.txt_refiner = nn.ModuleList([
            Layer(txt_refiner_dim, txt_refiner_head_dim, TextRoPE) for _ in range(txt_refiner_depth)
        ])

    def forward(self, x, t, txt, pos=None):
        b, c, h, w = x.shape
        ctx = self.txt_proj(txt)
        txt_pos = torch.arange(txt.shape[1], dtype=ctx.dtype).expand(b, -1)
        for layer in self.txt_refiner:
            ctx = layer(ctx, txt_pos)
        cond = self.t_embedder(t)
        if pos is None:
            pos = axial_pos(h, w).expand(b, h, w, 2)
        tok, pos = self.merge(x, pos)
        for block in self.blocks:
            tok = block(tok, pos, cond, ctx)
        out = self.split(tok, h, w)
        return out[:, :-1], out[:, -1:]
