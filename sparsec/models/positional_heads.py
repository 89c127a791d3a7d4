"""Positional self-attention heads for the tiny DiT: the structure trained video DiTs learn, planted.

A random model attends by content only: its attention is unstructured, and an honest tuner keeps
it dense (no pattern holds the output within budget). Trained video DiTs have heads that attend by
position instead: to nearby patches of the same frame, to the same place in other frames, to a few
global tokens (Sparse-vDiT, MInference). `TinyDiTConfig.head_roles` gives each self-attention head
such a role, so the bundled model has the structure sparsec.tune looks for:

    local     patches within ~2 rows / columns of the query, same frame     -> Window / MultiDiagonal
    temporal  the same patch (+-1) in every frame, nearer frames weighted   -> MultiDiagonal at the
                                                                               frame stride
    sink      the first `grid_width` tokens (the first frame's first row)   -> Columns | Window,
              take most of the mass, nearby patches the rest                   VerticalSlash
    content   no positional term: attention by content, as in a random model

A role's logit term is a sum of cosines of the coordinate differences (frame t, row y, column x of
each token, frame-major): amplitude * cos(pi * (c_i - c_j) / range) is largest when c_j = c_i and
falls monotonically with |c_i - c_j| (the period is twice the range, so nothing wraps). Each cosine
is the dot product of two (cos, sin) features, so the term is q_pos . k_pos: the first
POSITION_DIMS dims of a positional head's q and k are replaced by these features (scaled so the
softmax scale 1 / sqrt(head_dim) gives the amplitudes), the other dims keep their content. The
features are bounded (|feature| <= sqrt(amplitude)), so bf16 stores them to ~0.4%.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["HEAD_ROLES", "POSITION_DIMS", "PositionalTerms", "positional_terms", "check_head_roles"]

HEAD_ROLES = ("content", "local", "temporal", "sink")

# What each role's (frame, row, column) terms cost a key: (distance, nats) = the key that many
# frames / rows / columns from the query is that many nats (logits) below the query's own position.
# The cosine amplitude follows from the grid (nats / (1 - cos(pi * distance / extent))), so the
# shape is the same on any grid. local: the next frame 24 nats down, a patch 2 rows or columns away
# 3 nats; temporal: 4 frames away 1.4 nats, a neighbouring patch 1.1 nats; sink: a wider local
# term under the sink keys, whose logit is the local peak + _SINK_MARGIN (sink keys carry no local
# term).
_FALLS = {
    "local": ((1, 24.0), (2, 3.0), (2, 3.0)),
    "temporal": ((4, 1.4), (1, 1.1), (1, 1.1)),
    "sink": ((1, 6.0), (2, 0.9), (2, 0.9)),
}
_SINK_MARGIN = 1.0  # ~80% of the mass on the sink keys at 16 x 16 patches
POSITION_DIMS = 7  # cos / sin of frame, row and column, and the sink indicator


@dataclass(frozen=True)
class PositionalTerms:
    """What a self-attention layer adds: q' = q * keep + q_term, k' = k * keep + k_term."""

    q_term: torch.Tensor  # (heads, tokens, head_dim), zero outside the first POSITION_DIMS dims
    k_term: torch.Tensor  # (heads, tokens, head_dim)
    keep: torch.Tensor    # (heads, 1, head_dim): 0 where features replace content, else 1


def check_head_roles(roles: tuple[str, ...], heads: int, head_dim: int) -> None:
    if not roles:
        return
    unknown = sorted(set(roles) - set(HEAD_ROLES))
    if unknown:
        raise ValueError(f"unknown head role(s) {unknown}; known: {HEAD_ROLES}")
    if len(roles) != heads:
        raise ValueError(f"head_roles gives {len(roles)} role(s) for {heads} heads")
    if head_dim < 2 * POSITION_DIMS:
        raise ValueError(f"positional heads need head_dim >= {2 * POSITION_DIMS} (features + content), got {head_dim}")


def _coordinates(frames: int, rows: int, columns: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frame, row and column of every token, frame-major then row-major (float64)."""
    token = torch.arange(frames * rows * columns, dtype=torch.float64)
    return token // (rows * columns), (token // columns) % rows, token % columns


def _amplitude(extent: int, distance: int, nats: float) -> float:
    """The amplitude a of a * cos(pi d / extent) that is `nats` lower at d = distance than at 0."""
    distance = min(distance, extent)  # a grid shorter than the distance: its farthest point
    return nats / (1.0 - math.cos(math.pi * distance / extent))


def _cosine_features(coordinate: torch.Tensor, extent: int, amplitude: float) -> torch.Tensor:
    """(tokens, 2) features f with f_i . f_j = amplitude * cos(pi (c_i - c_j) / extent)."""
    angle = math.pi * coordinate / extent
    return math.sqrt(amplitude) * torch.stack([angle.cos(), angle.sin()], dim=1)


def _role_features(role: str, coords, extents, sink_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, POSITION_DIMS) query and key features of one head (their dot product is its logit term)."""
    tokens = coords[0].shape[0]
    q = torch.zeros(tokens, POSITION_DIMS, dtype=torch.float64)
    k = torch.zeros_like(q)
    if role in _FALLS:
        amplitudes = [_amplitude(n, d, nats) for n, (d, nats) in zip(extents, _FALLS[role])]
        features = torch.cat([_cosine_features(c, n, a) for c, n, a in zip(coords, extents, amplitudes)], dim=1)
        q[:, :6] = features
        k[:, :6] = features
    if role == "sink":
        sink_logit = sum(amplitudes) + _SINK_MARGIN
        k[:sink_tokens] = 0.0
        q[:, 6] = math.sqrt(sink_logit)
        k[:sink_tokens, 6] = math.sqrt(sink_logit)
    return q, k


def positional_terms(roles: tuple[str, ...], frames: int, rows: int, columns: int, head_dim: int) -> PositionalTerms:
    """The q / k terms of a layer whose heads have these roles, for a frames x rows x columns video."""
    check_head_roles(roles, len(roles), head_dim)
    coords = _coordinates(frames, rows, columns)
    tokens = frames * rows * columns
    q_term = torch.zeros(len(roles), tokens, head_dim, dtype=torch.float64)
    k_term = torch.zeros_like(q_term)
    keep = torch.ones(len(roles), 1, head_dim)
    for h, role in enumerate(roles):
        if role == "content":
            continue
        q, k = _role_features(role, coords, (frames, rows, columns), sink_tokens=columns)
        q_term[h, :, :POSITION_DIMS] = q * math.sqrt(head_dim)  # SDPA scales logits by 1 / sqrt(head_dim)
        k_term[h, :, :POSITION_DIMS] = k
        keep[h, :, :POSITION_DIMS] = 0.0
    return PositionalTerms(q_term.float(), k_term.float(), keep)
