"""Synthetic q, k, v whose attention has a planted pattern per head, for testing the search.

A PlantedLayer fixes the structure of each head (like a trained model's layer: stripe columns,
band width, frame size) from its seed; `sample()` draws fresh inputs (noise in q and k, all of v)
that keep that structure. Logits are built from exact quadratic position features, so
q_i . k_j * scale = -a (j - i)^2 + (a term constant in each row) for a band, and so on:

    band     Gaussian band around the diagonal (std `band_sigma` keys)         -> Window
    stripes  every query attends to a few key columns (column 0 and 3 others)  -> Columns
    frames   tokens in frames of `frame` positions; same position in nearby
             frames (offsets k * frame, decaying with |k|)                     -> MultiDiagonal
    uniform  near-zero logits: attention is almost uniform                     -> Skip("mean")
    random   unstructured: random q, k with large logits                       -> Dense
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KINDS = ("band", "stripes", "frames", "uniform", "random")

# The families a search may reasonably pick for each planted kind (a band is one diagonal band,
# which MultiDiagonal with one offset and AShape with no sink also express; bands and frames are
# diagonals, which VerticalSlash's slashes also express: the CPU executor runs slashes key by key,
# for width-0 diagonals 1.7-2.4x faster than as bands, for a 6-key band as fast).
EXPECTED_FAMILIES = {
    "band": {"window", "a_shape", "multi_diagonal", "vertical_slash"},
    "stripes": {"columns", "vertical_slash"},
    "frames": {"multi_diagonal", "vertical_slash"},
    "uniform": {"skip"},
    "random": {"dense"},
}

_NOISE = 0.3            # std of the content noise added to q and k of structured heads
_STRIPE_LOGIT = 12.0    # logit of a stripe column over the others
_RANDOM_LOGIT_STD = 3.0


@dataclass(frozen=True)
class PlantedLayer:
    kinds: tuple[str, ...]
    seq_len: int
    head_dim: int = 32
    causal: bool = False
    seed: int = 0
    band_sigma: float = 3.0
    frame: int | None = None         # frame size of "frames" heads; default seq_len // 8
    frame_decay: float = 0.5         # logit drop k^2 * frame_decay for the frame k away
    frame_sharpness: float = 8.0     # logit drop d^2 * sharpness for a position d away in the frame

    def __post_init__(self):
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown planted kinds {sorted(unknown)}; known: {KINDS}")
        if self.head_dim < 8:
            raise ValueError("head_dim must be >= 8 to hold the position features")

    @property
    def frame_size(self) -> int:
        return self.frame or max(4, self.seq_len // 8)

    def stripe_columns(self, head: int) -> list[int]:
        """The planted key columns of a "stripes" head: column 0 (a sink) and 3 others."""
        g = torch.Generator().manual_seed(self.seed * 1000 + head)
        others = torch.randperm(self.seq_len - 1, generator=g)[:3] + 1
        return [0] + sorted(others.tolist())

    def sample(self, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fresh float32 (q, k, v), each (batch, heads, seq_len, head_dim)."""
        g = torch.Generator().manual_seed(seed)
        heads = [self._head(h, kind, batch, g) for h, kind in enumerate(self.kinds)]
        q = torch.stack([qh for qh, _ in heads], dim=1)
        k = torch.stack([kh for _, kh in heads], dim=1)
        v = torch.randn(batch, len(self.kinds), self.seq_len, self.head_dim, generator=g)
        return q, k, v

    def _head(self, h: int, kind: str, batch: int, g: torch.Generator):
        S, D = self.seq_len, self.head_dim
        if kind == "uniform":
            return 0.02 * torch.randn(batch, S, D, generator=g), torch.randn(batch, S, D, generator=g)
        if kind == "random":
            return _RANDOM_LOGIT_STD * torch.randn(batch, S, D, generator=g), torch.randn(batch, S, D, generator=g)
        q = _NOISE * torch.randn(batch, S, D, generator=g)
        k = _NOISE * torch.randn(batch, S, D, generator=g)
        qf, kf = self._features(h, kind)
        n = qf.shape[1]
        q[..., :n] = qf * math.sqrt(D)  # undo the 1/sqrt(D) softmax scale on the planted logits
        k[..., :n] = kf
        return q, k

    def _features(self, h: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, n) query and key features whose dot products are the planted logits."""
        S = self.seq_len
        pos = torch.arange(S, dtype=torch.float64)
        if kind == "band":
            return _quadratic(pos - S / 2, pos - S / 2, 1.0 / (2 * self.band_sigma ** 2))
        if kind == "stripes":
            key = torch.zeros(S, dtype=torch.float64)
            key[self.stripe_columns(h)] = 1.0
            ones = torch.ones(S, dtype=torch.float64)
            return (math.sqrt(_STRIPE_LOGIT) * ones[:, None]).float(), (math.sqrt(_STRIPE_LOGIT) * key[:, None]).float()
        frame = self.frame_size
        within, index = pos % frame, torch.div(pos, frame, rounding_mode="floor")
        q1, k1 = _quadratic(within, within, self.frame_sharpness)  # same position in the frame
        q2, k2 = _quadratic(index, index, self.frame_decay)   # neighbouring frames: mass e^(-decay k^2)
        return torch.cat([q1, q2], dim=1), torch.cat([k1, k2], dim=1)


def _quadratic(x_query: torch.Tensor, x_key: torch.Tensor, a: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Features with q_i . k_j = -a (x_j - x_i)^2 + a x_i^2 (the last term is constant per row)."""
    q = torch.stack([2 * a * x_query, torch.ones_like(x_query)], dim=1)
    k = torch.stack([x_key, -a * x_key ** 2], dim=1)
    return q.float(), k.float()


def cheap_calls_cpu():
    """The "cpu" profile with the per-call costs of long sequences. Planted layers are short
    (S = 512) to keep tests fast; at that length the 2-core CPU's fixed cost per SDPA call makes
    most sparse heads not worth it, and the "cpu" profile rightly keeps them dense. Searches that
    must find the planted families run for this target instead. Built on the AVX2 machine's
    published profile whatever this machine is (an AVX-512 one's kernels are faster per pair, so
    fixed costs weigh more), so the searches see the same prices everywhere."""
    from sparsec.cost_models.hardware import PROFILES

    return PROFILES["cpu"].with_cores(torch.get_num_threads()).replace(launch_overhead_s=20e-6, call_overhead_s=5e-6,
                                                                       native_overhead_s=20e-6)
