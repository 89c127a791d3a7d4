"""Calibration statistics of attention heads, without materializing S x S attention maps.

Queries are processed in chunks of rows; each chunk's scores cover every key, so the softmax of
a chunk is exact and only a (B, H, chunk, Sk) slab lives at once. From each slab we pool:

    block_mass     (H, nqb, nkb)   mass per (query block, key block) at `block`
    column_mass    (H, Sk)         mass per key column
    diagonal_mass  (H, Sq + Sk - 1) mass per offset o = j - i, at index o + Sq - 1

"Mass" is attention probability averaged over the batch and the query rows, so each head's
masses sum to 1 (less the rows the causal rule leaves without keys). A pattern that keeps a set
of pairs therefore keeps about that fraction of the head's attention: what the fitting needs.
GQA: k has Hkv heads and query head h reads kv head h // (Hq // Hkv).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsec.attention_dispatch import softmax_with_sinks

__all__ = ["AttentionStats", "LayerSample", "attention_stats", "combine_stats", "pool_block_mass", "sample_stats"]

# Score elements per chunk (B * H * rows * Sk): bounds the slab to ~256 MiB in float32.
_CHUNK_ELEMENTS = 1 << 26


@dataclass(frozen=True, slots=True)
class LayerSample:
    """One recorded call of an attention layer: q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D); its
    scores capped by softcap (Gemma 2; 0: not capped) as the layer caps them."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool = False
    scale: float | None = None
    softcap: float = 0.0
    sinks: torch.Tensor | None = None  # (Hq,) float32: GPT-OSS's sink logits, as the layer weighs them


@dataclass(frozen=True, slots=True, kw_only=True)
class AttentionStats:
    """Per-head pooled attention mass of one attention layer (float64, on the device q was on:
    the fitting that reads it runs there too, batched over heads)."""

    q_len: int
    kv_len: int
    causal: bool
    block: tuple[int, int]          # (query rows, key columns) of a block_mass cell
    block_mass: torch.Tensor        # (H, ceil(Sq / bq), ceil(Sk / bk))
    column_mass: torch.Tensor       # (H, Sk)
    diagonal_mass: torch.Tensor     # (H, Sq + Sk - 1); index o + Sq - 1 for offset o = j - i
    rows: int                       # query rows averaged (batch x Sq, summed over samples)

    @property
    def num_heads(self) -> int:
        return self.column_mass.shape[0]

    def offset_index(self, offset: int) -> int:
        """Index of diagonal offset o = j - i in diagonal_mass."""
        return offset + self.q_len - 1


def attention_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    block: tuple[int, int] = (64, 32),
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> AttentionStats:
    """Pooled attention mass of every query head of softmax(q k^T * scale) (see module doc).

    q: (B, Hq, Sq, D); k: (B, Hkv, Sk, D) with Hq % Hkv == 0. `causal` removes j > i + Sk - Sq.
    softcap > 0: the scores s are capped to softcap * tanh(s / softcap) first, as the layer does;
    sinks (Hq,): each row's softmax weighs its head's sink too (the keys' mass is what it leaves).
    """
    _check_inputs(q, k, block)
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    bq, bk = block
    nqb, nkb = math.ceil(Sq / bq), math.ceil(Sk / bk)
    work = torch.promote_types(q.dtype, torch.float32)
    blocks = torch.zeros(Hq, nqb, nkb, dtype=torch.float64, device=q.device)
    columns = torch.zeros(Hq, Sk, dtype=torch.float64, device=q.device)
    diagonals = torch.zeros(Hq, Sq + Sk - 1, dtype=torch.float64, device=q.device)
    rows_per_chunk = _rows_per_chunk(B * Hq * Sk, bq, Sq)
    keys = k.to(work).transpose(-1, -2)  # converted once, not per chunk
    for start in range(0, Sq, rows_per_chunk):
        stop = min(Sq, start + rows_per_chunk)
        probs = _chunk_probs(q, keys, start, stop, causal, scale, work, softcap, sinks).sum(dim=0)  # (Hq, c, Sk)
        columns += probs.sum(dim=1).double()
        # chunk-local diagonal index (j - r) + c - 1 is global index (j - i) + Sq - 1 shifted by Sq - stop
        diagonals[:, Sq - stop : Sq - stop + Sk + stop - start - 1] += _diagonal_sums(probs).double()
        blocks[:, start // bq : math.ceil(stop / bq)] += _pool(probs, bq, bk, nkb).double()
    norm = float(B * Sq)
    return AttentionStats(q_len=Sq, kv_len=Sk, causal=bool(causal), block=(bq, bk),
                          block_mass=blocks / norm, column_mass=columns / norm,
                          diagonal_mass=diagonals / norm, rows=B * Sq)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, block: tuple[int, int]) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"attention_stats: q and k must be 4-D (B, H, S, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention_stats: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"attention_stats: query heads {q.shape[1]} must be a multiple of kv heads {k.shape[1]}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError("attention_stats: empty sequence")
    if len(block) != 2 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in block):
        raise ValueError(f"attention_stats: block must be two positive ints, got {block!r}")


def _rows_per_chunk(elements_per_row: int, bq: int, Sq: int) -> int:
    """Query rows per chunk: a multiple of bq (chunks then hold whole blocks), at least bq."""
    rows = max(bq, (_CHUNK_ELEMENTS // max(1, elements_per_row)) // bq * bq)
    return min(rows, math.ceil(Sq / bq) * bq)


def _chunk_probs(q, keys, start: int, stop: int, causal: bool, scale: float, work: torch.dtype,
                 softcap: float = 0.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax rows start..stop-1 of every head: (B, Hq, c, Sk), GQA heads sharing their kv head.
    keys: k transposed, (B, Hkv, D, Sk), in the working dtype."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = keys.shape[1], keys.shape[3]
    group = Hq // Hkv
    qc = q[:, :, start:stop].to(work).reshape(B, Hkv, group * (stop - start), D)
    scores = torch.matmul(qc, keys).view(B, Hq, stop - start, Sk) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if causal:
        i = torch.arange(start, stop, device=q.device)[:, None]
        j = torch.arange(Sk, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + (Sk - Sq), float("-inf"))
    probs = softmax_with_sinks(scores, sinks)[0]
    if causal and start < Sq - Sk:  # rows i < Sq - Sk have no allowed key: they hold no mass
        probs = probs.nan_to_num(0.0)
    return probs


def _diagonal_sums(probs: torch.Tensor) -> torch.Tensor:
    """Sums along diagonals of (H, c, Sk) slabs: (H, c + Sk - 1), index (j - r) + c - 1 for row r.

    The shear trick: left-pad each row by c, flatten, pad c more, and re-view with one extra
    column; row r then lands shifted left by r, so diagonals become columns. No scatter (atomics)."""
    H, c, Sk = probs.shape
    width = Sk + c
    sheared = F.pad(F.pad(probs, (c, 0)).reshape(H, c * width), (0, c)).view(H, c, width + 1)
    return sheared.sum(dim=1)[:, 1:width]


def _pool(probs: torch.Tensor, bq: int, bk: int, nkb: int) -> torch.Tensor:
    """Sum (H, c, Sk) into (H, ceil(c / bq), nkb) blocks (zero padding past the ends; no copy
    when the slab divides into whole blocks)."""
    H, c, Sk = probs.shape
    pad_k, pad_q = nkb * bk - Sk, math.ceil(c / bq) * bq - c
    padded = F.pad(probs, (0, pad_k, 0, pad_q)) if pad_k or pad_q else probs
    return padded.view(H, -1, bq, nkb, bk).sum(dim=(2, 4))


def pool_block_mass(block_mass: torch.Tensor, factor: tuple[int, int]) -> torch.Tensor:
    """Coarser blocks: sum (H, nqb, nkb) over factor = (fq, fk) cells, zero-padding the ends."""
    fq, fk = factor
    H, nqb, nkb = block_mass.shape
    rows, cols = math.ceil(nqb / fq), math.ceil(nkb / fk)
    padded = F.pad(block_mass, (0, cols * fk - nkb, 0, rows * fq - nqb))
    return padded.view(H, rows, fq, cols, fk).sum(dim=(2, 4))


def combine_stats(stats: Sequence[AttentionStats]) -> AttentionStats:
    """The statistics of several calibration samples of one layer, weighted by their rows."""
    if not stats:
        raise ValueError("combine_stats: no statistics given")
    first = stats[0]
    for s in stats[1:]:
        if (s.q_len, s.kv_len, s.causal, s.block, s.num_heads) != (first.q_len, first.kv_len, first.causal, first.block, first.num_heads):
            raise ValueError("combine_stats: samples differ in lengths, causal, block or heads; "
                             "one layer's calibration samples must share their shape")
    total = sum(s.rows for s in stats)

    def mean(field: str) -> torch.Tensor:
        return sum(getattr(s, field) * (s.rows / total) for s in stats)

    return AttentionStats(q_len=first.q_len, kv_len=first.kv_len, causal=first.causal, block=first.block,
                          block_mass=mean("block_mass"), column_mass=mean("column_mass"),
                          diagonal_mass=mean("diagonal_mass"), rows=total)


def sample_stats(samples: Sequence[LayerSample], *, block: tuple[int, int] = (64, 32)) -> AttentionStats:
    """The statistics of a layer over all its recorded calls."""
    return combine_stats([attention_stats(s.q, s.k, causal=s.causal, scale=s.scale, block=block, softcap=s.softcap,
                                          sinks=s.sinks) for s in samples])
