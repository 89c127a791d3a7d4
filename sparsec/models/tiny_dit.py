"""A tiny DiT-like video diffusion transformer: the model the demo compiles.

    latents (B, C, F, H, W) -> patch embed -> tokens (B, F * H/p * W/p, dim), frame-major
    per block: adaLN modulation from the timestep and pooled text (6 * dim: shift, scale, gate
               for attention and MLP), self-attention over all video tokens, cross-attention to
               the text tokens, MLP (joint_text: one self-attention over [video, text] tokens
               instead, the text projected to dim and its padding masked out by a (B, 1, 1, S)
               bool mask, HunyuanVideo's layout; the model then takes each row's text length)
    -> final adaLN + linear -> unpatchify -> (B, C, F, H, W)

Video tokens are ordered frame by frame, so the same spatial position in neighbouring frames is
`tokens_per_frame` apart: the stride at which MultiDiagonal patterns find temporal neighbours.

`TinyDiTConfig.head_roles` gives self-attention heads positional roles (local, temporal, sink:
sparsec/models/positional_heads.py), the structure trained video DiTs have and sparsec.tune finds;
block b uses the roles rotated by b, so layers differ. Without roles (the default) attention is by
content only, as in any random model.

`Attention.head_patterns` (default None) makes the eager self-attention use explicit per-head
pattern masks (sparsec.patterns .mask(), dense SDPA with a bool mask): the demo's eager reference
for the sparse compiled model. Shapes are small enough to run in well under a second on CPU.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsec.models.positional_heads import HEAD_ROLES, check_head_roles, positional_terms
from sparsec.patterns import Pattern

__all__ = ["TinyDiTConfig", "TinyDiT", "tiny_dit", "positional_dit", "with_roles", "example_inputs", "pattern_mask",
           "POSITIONAL_ROLES"]

POSITIONAL_ROLES = HEAD_ROLES[1:] + HEAD_ROLES[:1]  # local, temporal, sink, content


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
    head_roles: tuple[str, ...] = ()  # per self-attention head: content / local / temporal / sink
    joint_text: bool = False  # self-attention over [video, text] with the text padding masked (see module doc)

    def __post_init__(self):
        object.__setattr__(self, "head_roles", tuple(self.head_roles))
        check_head_roles(self.head_roles, self.heads, self.dim // self.heads)

    @property
    def grid(self) -> tuple[int, int, int]:
        """(frames, rows, columns) of the patch grid."""
        return self.frames, self.height // self.patch, self.width // self.patch

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

    def __init__(self, dim: int, heads: int, roles: tuple[str, ...] = (), grid: tuple[int, int, int] = (1, 1, 1),
                 text_tokens: int = 0):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head_patterns: tuple[Pattern, ...] | None = None
        self.roles = tuple(roles)
        if self.roles:  # not in the state dict: a function of the config
            terms = positional_terms(self.roles, *grid, dim // heads)  # text tokens (joint_text) have none
            self.register_buffer("q_term", F.pad(terms.q_term, (0, 0, 0, text_tokens)), persistent=False)
            self.register_buffer("k_term", F.pad(terms.k_term, (0, 0, 0, text_tokens)), persistent=False)
            self.register_buffer("keep", terms.keep, persistent=False)

    def forward(self, x: torch.Tensor, keep_keys: torch.Tensor | None = None) -> torch.Tensor:
        """keep_keys (B, S) bool: the keys every query may attend to (joint_text: all but the text padding)."""
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if self.roles:
            q, k = q * self.keep + self.q_term, k * self.keep + self.k_term
        mask = None if keep_keys is None else keep_keys[:, None, None, :]
        if self.head_patterns is not None:
            patterns = pattern_mask(self.head_patterns, S, S).to(x.device)
            mask = patterns if mask is None else patterns & mask
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
    def __init__(self, config: TinyDiTConfig, index: int = 0):
        super().__init__()
        dim = config.dim
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        roles = config.head_roles
        shift = index % len(roles) if roles else 0
        text_tokens = config.text_len if config.joint_text else 0
        self.attn = Attention(dim, config.heads, roles[shift:] + roles[:shift], config.grid, text_tokens)
        if config.joint_text:
            self.text_proj = nn.Linear(config.text_dim, dim)
        else:
            self.norm2 = nn.LayerNorm(dim)
            self.cross = CrossAttention(dim, config.text_dim, config.heads)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, config.mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(config.mlp_ratio * dim, dim))
        self.ada_ln = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, text: torch.Tensor,
                keep_keys: torch.Tensor | None = None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada_ln(F.silu(cond)).chunk(6, dim=-1)
        h = _modulate(self.norm1(x), shift1, scale1)
        if keep_keys is None:
            x = x + gate1[:, None] * self.attn(h)
            x = x + self.cross(self.norm2(x), text)
        else:  # joint_text: video and text tokens attend together; the video tokens go on
            joint = self.attn(torch.cat([h, self.text_proj(text)], dim=1), keep_keys)
            x = x + gate1[:, None] * joint[:, :x.shape[1]]
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
        self.blocks = nn.ModuleList([Block(config, b) for b in range(config.depth)])
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

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                text_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """text_lengths (B,) (joint_text): each row's real text tokens, the rest padding (default: all)."""
        x = self.patch_embed(self.patchify(latents)) + self.pos
        features = timestep_features(timestep, self.config.dim).to(x.dtype)  # float32: cast to the model's dtype
        cond = self.t_embed(features) + self.text_pool(text.mean(dim=1))
        keep_keys = None
        if self.config.joint_text:
            lengths = text_lengths
            if lengths is None:
                lengths = torch.full((x.shape[0],), text.shape[1], device=x.device)
            keep_keys = torch.arange(x.shape[1] + text.shape[1], device=x.device)[None] < x.shape[1] + lengths[:, None]
        for block in self.blocks:
            x = block(x, cond, text, keep_keys)
        shift, scale = self.final_ada(F.silu(cond)).chunk(2, dim=-1)
        x = self.final(_modulate(self.final_norm(x), shift, scale))
        return self.unpatchify(x, latents.shape)

    def set_head_patterns(self, head_patterns: tuple[Pattern, ...] | None) -> None:
        """Eager self-attention with these explicit per-head masks (None: dense again)."""
        for block in self.blocks:
            block.attn.head_patterns = head_patterns


def example_inputs(config: TinyDiTConfig, batch: int = 1, seed: int = 1, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """(latents, timestep, text) drawn from `seed`: other seeds give fresh inputs of the same kind.
    joint_text: also text_lengths, each row's real text tokens (a quarter to all of text_len)."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, config.in_channels, config.frames, config.height, config.width, generator=generator)
    timestep = torch.randint(0, 1000, (batch,), generator=generator)
    text = torch.randn(batch, config.text_len, config.text_dim, generator=generator)
    inputs = (latents.to(device, dtype), timestep.to(device), text.to(device, dtype))
    if config.joint_text:
        lengths = torch.randint(max(1, config.text_len // 4), config.text_len + 1, (batch,), generator=generator)
        inputs += (lengths.to(device),)
    return inputs


def tiny_dit(config: TinyDiTConfig | None = None, batch: int = 1, seed: int = 0) -> tuple[TinyDiT, tuple]:
    """(model in eval mode, (latents, timestep, text)): fixed weights for a seed, fresh inputs."""
    config = config or TinyDiTConfig()
    torch.manual_seed(seed)
    model = TinyDiT(config).eval()
    return model, example_inputs(config, batch, seed + 1)


def with_roles(config: TinyDiTConfig, roles: tuple[str, ...] = POSITIONAL_ROLES) -> TinyDiTConfig:
    """`config` whose self-attention heads take `roles` in turn (repeated to the number of heads)."""
    return dataclasses.replace(config, head_roles=tuple(roles[h % len(roles)] for h in range(config.heads)))


def positional_dit(config: TinyDiTConfig | None = None, batch: int = 1, seed: int = 0) -> tuple[TinyDiT, tuple]:
    """tiny_dit with positional heads (local, temporal, sink, content in turn; default: 8 frames
    of 16 x 16 patches, 2048 tokens): a model with the structure sparsec.tune looks for, e.g.
    `sparsec tune sparsec.models.tiny_dit:positional_dit --target cpu`."""
    return tiny_dit(with_roles(config or TinyDiTConfig(height=32, width=32)), batch, seed)
