"""Block tables of the table-driven families (block_sparse, union, frames_transposed), and the
backward kernels' block lists (every family; BlockLists: packed, by query or by key block), built
on the host.

Per distinct pattern and query block: the partially covered key blocks (the kernel masks them) and
the whole ones (no mask), each in ascending order, from block_coverage.block_coverage. A block the
coverage calls full but that runs past Sk goes to the partial list: the kernel loads whole blocks
without bounds checks.

Built when a table-driven kernel launches (attention_triton caches them per launch group); in tuning
that is every measurement round with BlockSparse candidates, each candidate once. The work per
pattern is its block_coverage (memoized there); what follows is done for all patterns at once.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsec.codegen.block_coverage import EMPTY, FULL, block_coverage, row_intervals
from sparsec.codegen.frame_order import FramesTransposed
from sparsec.codegen.templates.common import signed_words
from sparsec.patterns import Pattern

# (query block, slot, row, word, run) elements computed at once when building block masks.
_MASK_CHUNK = 1 << 23


@dataclass(frozen=True, slots=True)
class BlockTables:
    """int32 tables, T = number of patterns, nqb = query blocks; lists padded after their count."""

    num_partial: torch.Tensor  # (T, nqb)
    partial: torch.Tensor  # (T, nqb, width)
    num_full: torch.Tensor  # (T, nqb)
    full: torch.Tensor  # (T, nqb, width)
    # The element masks of the partial blocks, for patterns whose kernel reads them (frames_transposed):
    # (T, nqb, partial width, block_m, words a row) int32 flattened, bit c of a row's word c // 32
    # keeping key c of the block (causal rule included); one 0 when no pattern needs them.
    masks: torch.Tensor


def block_tables(patterns: Sequence[Pattern], Sq: int, Sk: int, block_m: int, block_n: int, causal: bool) -> BlockTables:
    """The tables of `patterns` (table t for patterns[t]) for BLOCK_M x BLOCK_N tiles."""
    coverage = torch.stack([block_coverage(p, Sq, Sk, block_m, block_n, causal) for p in patterns])
    past_end = (torch.arange(coverage.shape[-1]) + 1) * block_n > Sk
    whole = (coverage == FULL) & ~past_end
    num_partial, partial = _compact((coverage != EMPTY) & ~whole)
    num_full, full = _compact(whole)
    masks = torch.zeros(1, dtype=torch.int32)
    if any(isinstance(p, FramesTransposed) for p in patterns):
        masks = torch.stack([_partial_masks(p, partial[t], num_partial[t], Sq, Sk, block_m, block_n, causal)
                             for t, p in enumerate(patterns)]).flatten()
    return BlockTables(num_partial, partial, num_full, full, masks)


@dataclass(frozen=True, slots=True)
class BlockLists:
    """The backward kernels' lists (templates/backward.py): table row t x rows + r (pattern t, block
    r) lists its blocks, ascending, at blocks[start : start + count]. Packed end to end, not padded
    to the longest row: a column pattern's key blocks are each visited by every query block, and
    padding every row to that would hold a layer's heads in tens of megabytes at S 32K."""

    count: torch.Tensor  # (T x rows,) int32
    start: torch.Tensor  # (T x rows,) int32
    blocks: torch.Tensor  # (total,) int32; one 0 when there are none


def backward_block_lists(patterns: Sequence[Pattern], Sq: int, Sk: int, block_m: int, block_n: int, causal: bool,
                         *, by_key: bool) -> tuple[BlockLists, BlockLists]:
    """(partial, whole) blocks of `patterns` at BLOCK_M x BLOCK_N tiles: per query block the key
    blocks (the dQ kernel's), or per key block the query blocks (`by_key`: the dK / dV kernel's). A
    block that runs past Sq or Sk is partial (whole blocks are loaded without bounds checks)."""
    coverage = torch.stack([block_coverage(p, Sq, Sk, block_m, block_n, causal) for p in patterns])
    past_end = (((torch.arange(coverage.shape[1]) + 1) * block_m > Sq)[:, None]
                | ((torch.arange(coverage.shape[2]) + 1) * block_n > Sk)[None, :])
    whole = (coverage == FULL) & ~past_end
    partial = (coverage != EMPTY) & ~whole
    if by_key:
        partial, whole = partial.transpose(1, 2), whole.transpose(1, 2)
    return _lists(partial), _lists(whole)


def _lists(selected: torch.Tensor) -> BlockLists:
    rows = selected.reshape(-1, selected.shape[-1])
    count = rows.sum(dim=-1)
    if int(count.sum()) >= 2**31:
        raise ValueError("block lists past 2**31 entries: lengths too long for the backward kernels' int32 offsets")
    blocks = rows.nonzero()[:, 1]  # row by row, ascending in each
    if not blocks.numel():
        blocks = torch.zeros(1, dtype=torch.int64)
    return BlockLists(count.to(torch.int32), (count.cumsum(0) - count).to(torch.int32), blocks.to(torch.int32))


def _partial_masks(pattern: Pattern, partial: torch.Tensor, count: torch.Tensor, Sq: int, Sk: int, block_m: int,
                   block_n: int, causal: bool) -> torch.Tensor:
    """(nqb, width, block_m, words) int32: each listed partial block's element mask as bits, from the
    pattern's exact row intervals (disjoint runs: a run's bits in a word are one range, and the
    ranges of a row add up without overlapping). Rows past Sq and unlisted slots keep nothing."""
    nqb, width = partial.shape
    words = (block_n + 31) // 32
    lo, hi = (t.to(torch.int64) for t in row_intervals(pattern, Sq, Sk, causal))
    pad = nqb * block_m - Sq
    lo = F.pad(lo, (0, 0, 0, pad), value=1).view(nqb, 1, block_m, 1, -1)  # padding rows: empty
    hi = F.pad(hi, (0, 0, 0, pad), value=0).view(nqb, 1, block_m, 1, -1)
    listed = torch.arange(width)[None, :] < count[:, None]
    first = (partial.to(torch.int64) * block_n)[:, :, None, None, None] + 32 * torch.arange(words)[:, None]
    step = max(1, _MASK_CHUNK // (width * block_m * words * lo.shape[-1]))  # query blocks at once
    chunks = []
    for b in range(0, nqb, step):
        start = (lo[b:b + step] - first[b:b + step]).clamp(0, 32)  # a run's keys in the word: bits [start, end)
        end = (hi[b:b + step] + 1 - first[b:b + step]).clamp(0, 32)
        one = torch.ones_like(end)
        chunks.append(torch.where(end > start, (one << end) - (one << start), 0).sum(dim=-1))
    bits = torch.where(listed[:, :, None, None], torch.cat(chunks), 0)  # (nqb, width, block_m, words)
    return signed_words(bits)


def _compact(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, nqb, nkb) bool -> counts (T, nqb) and the selected key block indices, ascending, padded
    with 0 to the largest count (at least 1 column, so the kernel never gets an empty tensor)."""
    counts = selected.sum(dim=-1)
    table = torch.zeros(*selected.shape[:-1], max(1, int(counts.max())), dtype=torch.int32)
    # nonzero lists the selected blocks row by row, ascending; a block's slot is its rank in its row.
    t, q, k = selected.nonzero(as_tuple=True)
    slot = selected.cumsum(dim=-1, dtype=torch.int32)[t, q, k] - 1
    table[t, q, slot] = k.to(torch.int32)
    return counts.to(torch.int32), table
