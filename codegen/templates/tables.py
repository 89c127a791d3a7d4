"""Block tables of the table-driven families (block_sparse, union), built on the host.

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

from sparsec.codegen.block_coverage import EMPTY, FULL, block_coverage
from sparsec.patterns import Pattern


@dataclass(frozen=True, slots=True)
class BlockTables:
    """int32 tables, T = number of patterns, nqb = query blocks; lists padded after their count."""

    num_partial: torch.Tensor  # (T, nqb)
    partial: torch.Tensor  # (T, nqb, width)
    num_full: torch.Tensor  # (T, nqb)
    full: torch.Tensor  # (T, nqb, width)


def block_tables(patterns: Sequence[Pattern], Sq: int, Sk: int, block_m: int, block_n: int, causal: bool) -> BlockTables:
    """The tables of `patterns` (table t for patterns[t]) for BLOCK_M x BLOCK_N tiles."""
    coverage = torch.stack([block_coverage(p, Sq, Sk, block_m, block_n, causal) for p in patterns])
    past_end = (torch.arange(coverage.shape[-1]) + 1) * block_n > Sk
    whole = (coverage == FULL) & ~past_end
    num_partial, partial = _compact((coverage != EMPTY) & ~whole)
    num_full, full = _compact(whole)
    return BlockTables(num_partial, partial, num_full, full)


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
