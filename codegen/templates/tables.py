"""Block tables of the table-driven families (block_sparse, union), built on the host.

Per distinct pattern and query block: the partially covered key blocks (the kernel masks them) and
the whole ones (no mask), each in ascending order, from block_coverage.block_coverage. A block the
coverage calls full but that runs past Sk goes to the partial list: the kernel loads whole blocks
without bounds checks.
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
    partial, full = [], []
    for p in patterns:
        coverage = block_coverage(p, Sq, Sk, block_m, block_n, causal)
        past_end = (torch.arange(coverage.shape[1]) + 1) * block_n > Sk
        whole = (coverage == FULL) & ~past_end
        partial.append((coverage != EMPTY) & ~whole)
        full.append(whole)
    num_partial, partial_table = _compact(torch.stack(partial))
    num_full, full_table = _compact(torch.stack(full))
    return BlockTables(num_partial, partial_table, num_full, full_table)


def _compact(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, nqb, nkb) bool -> counts (T, nqb) and the selected key block indices, ascending, padded
    with 0 to the largest count (at least 1 column, so the kernel never gets an empty tensor)."""
    counts = selected.sum(dim=-1)
    width = max(1, int(counts.max()))
    # A stable sort on "not selected" moves the selected blocks to the front in ascending order.
    order = torch.sort((~selected).to(torch.uint8), dim=-1, stable=True).indices[..., :width]
    in_list = torch.arange(width) < counts[..., None]
    return counts.to(torch.int32), torch.where(in_list, order, 0).to(torch.int32)
