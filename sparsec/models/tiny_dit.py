"""A tiny DiT-like video diffusion transformer: the model the demo compiles.

    latents (B, C, F, H, W) -> patch embed -> tokens (B, F * H/p * W/p, dim), frame-major
    per block: adaLN modulation from the timestep and pooled text (6 * dim: shift, scale, gate
               for attention and MLP), self-attention over all video tokens, cross-attention to
               the text tokens, MLP
    -> final adaLN + linear -> unpatchify -> (B, C, F, H, W)

Video tokens are ordered frame by frame, so the same spatial position in neighbouring frames is
`tokens_per_frame` apart: the stride at which MultiDiagonal patterns find temporal neighbours.

`Attention.head_patterns` (default None) makes the eager self-attention use explicit per-head
pattern masks (sparsec.patterns .mask(), dense SDPA with a bool mask): the demo's eager reference
for the sparse compiled model. Shapes are small enough to run in well under a second on CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsec.patterns import Pattern

__all__ = ["TinyDiTConfig", "TinyDiT", "tiny_dit", "pattern_mask"]


@dataclass(frozen=True)
class TinyDiTConfig:
    in_channels: int = 4
    patch: int = 2
    frames: int = 8
    height: int = 16
    width: int = 16
    dim: int = 128
    heads: int = 4
    depth: int = 2
    text_len: int = 16
    text_dim: int = 64
    mlp_ratio: int = 4

    @property
    def tokens_per_frame(self) -> int:
        return (self.height // self.patch) * (self.width // self.patch)

    @property
    def tokens(self) -> int:
        return self.frames * self.tokens_per_frame


def pattern_mask(head_patterns: tuple[Pattern, ...], Sq: int, Sk: int) -> torch.Tensor:
    """(H, Sq, Sk) bool: the pairs each head keeps, from the reference semantics."""
    return torch.stack([p.mask(Sq, Sk) for p in head_patterns])


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head self-attention through SDPA (or explicit pattern masks, see module doc)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head_patterns: tuple[Pattern, ...] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if self.head_patterns is None else pattern_mask(self.head_patterns, S, S).to(x.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, S, D))


class CrossAttention(nn.Module):
    """Video tokens attend to text tokens (Sq != Sk)."""

    def __init__(self, dim: int, text_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(text_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q = self.q(x).view(B, S, self.heads, -1).transpose(1, 2)
        k, v = self.kv(text).view(B, text.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, config: TinyDiTConfig):
        super().__init__()
        dim = config.dim
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = Attention(dim, config.heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross = CrossAttention(dim, config.text_dim, config.heads)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, config.mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(config.mlp_ratio * dim, dim))
        self.ada_ln = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada_ln(F.silu(cond)).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(_modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross(self.norm2(x), text)
        return x + gate2[:, None] * self.mlp(_modulate(self.norm3(x), shift2, scale2))


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal timestep features (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class TinyDiT(nn.Module):
    def __init__(self, config: TinyDiTConfig | None = None):
        super().__init__()
        self.config = config = config or TinyDiTConfig()
        patch_dim = config.in_channels * config.patch ** 2
        self.patch_embed = nn.Linear(patch_dim, config.dim)
        self.pos = nn.Parameter(torch.randn(1, config.tokens, config.dim) * 0.02)
        self.t_embed = nn.Sequential(nn.Linear(config.dim, config.dim), nn.SiLU(), nn.Linear(config.dim, config.dim))
        self.text_pool = nn.Linear(config.text_dim, config.dim)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.depth)])
        self.final_norm = nn.LayerNorm(config.dim, elementwise_affine=False)
        self.final_ada = nn.Linear(config.dim, 2 * config.dim)
        self.final = nn.Linear(config.dim, patch_dim)

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        B, C, Fr, H, W = latents.shape
        p = self.config.patch
        x = latents.view(B, C, Fr, H // p, p, W // p, p).permute(0, 2, 3, 5, 1, 4, 6)
        return x.reshape(B, Fr * (H // p) * (W // p), C * p * p)

    def unpatchify(self, x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        B, C, Fr, H, W = shape
        p = self.config.patch
        x = x.view(B, Fr, H // p, W // p, C, p, p).permute(0, 4, 1, 2, 5, 3, 6)
        return x.reshape(B, C, Fr, H, W)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(self.patchify(latents)) + self.pos
        cond = self.t_embed(timestep_features(timestep, self.config.dim)) + self.text_pool(text.mean(dim=1))
        for block in self.blocks:
            x = block(x, cond, text)
        shift, scale = self.final_ada(F.silu(cond)).chunk(2, dim=-1)
        x = self.final(_modulate(self.final_norm(x), shift, scale))
        return self.unpatchify(x, latents.shape)

    def set_head_patterns(self, head_patterns: tuple[Pattern, ...] | None) -> None:
        """Eager self-attention with these explicit per-head masks (None: dense again)."""
        for block in self.blocks:
            block.attn.head_patterns = head_patterns


def tiny_dit(config: TinyDiTConfig | None = None, batch: int = 1, seed: int = 0) -> tuple[TinyDiT, tuple]:
    """(model in eval mode, (latents, timestep, text)): fixed weights for a seed, fresh inputs."""
    config = config or TinyDiTConfig()
    torch.manual_seed(seed)
    model = TinyDiT(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    latents = torch.randn(batch, config.in_channels, config.frames, config.height, config.width, generator=generator)
    timestep = torch.randint(0, 1000, (batch,), generator=generator)
    text = torch.randn(batch, config.text_len, config.text_dim, generator=generator)
    return model, (latents, timestep, text)
