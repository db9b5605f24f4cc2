"""An independent PyTorch DiT (global and per-patch), written from SPEC §3 for the tests.

Its `state_dict()` keys and shapes are exactly the authors' (timm-based) ones, so it doubles as a
synthetic-checkpoint generator: x_embedder.proj.*, pos_embed, t_embedder.mlp.{0,2}.*,
y_embedder.embedding_table.weight, blocks.{i}.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2,
adaLN_modulation.1}.*, final_layer.{linear, adaLN_modulation.1}.*; with `encoder_depth` (REPA,
SPEC §10) also projector.{0, 2, 4}.* reading the tokens after that block. Layout is NCHW.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def sincos_2d(dim: int, gh: int, gw: int) -> torch.Tensor:
    """(gh*gw, dim): first half encodes the column, second half the row; [sin, cos] each."""
    quarter = dim // 4
    omega = torch.pow(10000.0, -torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = []
    for i in range(gh):
        for j in range(gw):
            a, b = j * omega, i * omega
            rows.append(torch.cat([a.sin(), a.cos(), b.sin(), b.cos()]))
    return torch.stack(rows).float()


def time_features(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32)
    freqs = torch.exp(-math.log(10000.0) * k / half)
    ang = t.float().unsqueeze(-1) * freqs
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)


class _PatchEmbed(nn.Module):
    def __init__(self, c, d, p):
        super().__init__()
        self.proj = nn.Conv2d(c, d, kernel_size=p, stride=p)

    def forward(self, x):  # (B, C, H, W) -> (B, N, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class _TimeEmbed(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, t):
        return self.mlp(time_features(t))


class _LabelEmbed(nn.Module):
    def __init__(self, num_classes, d):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, d)

    def forward(self, y):
        return self.embedding_table(y)


class _Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        return self.proj((w @ v).transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


class _Block(nn.Module):
    def __init__(self, d, heads, mlp_ratio):
        super().__init__()
        self.attn = _Attention(d, heads)
        self.mlp = _Mlp(d, int(d * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c):  # c: (B, N or 1, D)
        sa, ca, ga, sm, cm, gm = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + ga * self.attn(_norm(x) * (1 + ca) + sa)
        return x + gm * self.mlp(_norm(x) * (1 + cm) + sm)


class _Final(nn.Module):
    def __init__(self, d, p, c_out):
        super().__init__()
        self.linear = nn.Linear(d, p * p * c_out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(_norm(x) * (1 + scale) + shift)


class TorchDiT(nn.Module):
    """forward(x (B,C,H,W), t (B,N) or (B,), y (B,)) -> v (B,C,H,W), s (B,1,H,W) or None
    [, z (B, N, z_dim) with return_z]."""

    def __init__(self, image_size=32, in_channels=4, patch_size=2, hidden_size=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, num_classes=1000, per_patch=True, encoder_depth=0,
                 z_dim=768, projector_dim=2048):
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.gh, self.gw, self.p, self.c = h // patch_size, w // patch_size, patch_size, in_channels
        self.per_patch = per_patch
        c_out = in_channels + 1 if per_patch else in_channels
        self.x_embedder = _PatchEmbed(in_channels, hidden_size, patch_size)
        self.t_embedder = _TimeEmbed(hidden_size)
        self.y_embedder = _LabelEmbed(num_classes, hidden_size)
        self.pos_embed = nn.Parameter(
            sincos_2d(hidden_size, self.gh, self.gw)[None], requires_grad=False
        )
        self.blocks = nn.ModuleList([_Block(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = _Final(hidden_size, patch_size, c_out)
        self.encoder_depth = encoder_depth
        if encoder_depth:
            self.projector = nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(),
                                           nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                                           nn.Linear(projector_dim, z_dim))

    def randomize(self, seed: int = 0, std: float = 0.2) -> "TorchDiT":
        """Random non-zero values for every trainable weight (including DiT's zero-init ones)."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, prm in self.named_parameters():
                if name != "pos_embed":
                    fan_in = prm.shape[1] if prm.ndim == 2 and "embedding" not in name else 1
                    scale = std if fan_in == 1 else std * 4 / math.sqrt(fan_in)
                    prm.copy_(torch.randn(prm.shape, generator=g) * scale)
        return self

    def forward(self, x, t, y, return_z=False):
        b = x.shape[0]
        tok = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        temb = self.t_embedder(t) if self.per_patch else self.t_embedder(t)[:, None]
        cond = temb + self.y_embedder(y)[:, None]  # (B, N or 1, D)
        z = None
        for k, blk in enumerate(self.blocks, start=1):
            tok = blk(tok, cond)
            if k == self.encoder_depth:
                z = self.projector(tok)
        out = self.final_layer(tok, cond)  # (B, N, p*p*C_out), per token (p, q, c)
        c_out = out.shape[-1] // (self.p * self.p)
        img = out.view(b, self.gh, self.gw, self.p, self.p, c_out)
        img = img.permute(0, 5, 1, 3, 2, 4).reshape(b, c_out, self.gh * self.p, self.gw * self.p)
        v, s = (img[:, : self.c], img[:, self.c :]) if self.per_patch else (img, None)
        return (v, s, z) if return_z else (v, s)
