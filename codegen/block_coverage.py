"""Which BLOCK_M x BLOCK_N tiles of the (Sq, Sk) score matrix a pattern touches, without the mask.

Every pattern keeps, in query row i, a union of key intervals [lo, hi] (inclusive). For Window,
MultiDiagonal, Columns, AShape, VerticalSlash and Dense the ends are affine in i with slope 0 or 1;
BlockSparse keeps, per layout row, the runs of kept blocks; a union concatenates its parts'
intervals. Clipping them to [0, Sk) and to the causal limit i + Sk - Sq gives the exact kept set of
each row, so tile coverage follows from per-row interval arithmetic: Sq x (key blocks + intervals)
work, never an Sq x Sk mask, which keeps it fast at S = 32K.

    block_coverage(pattern, Sq, Sk, block_m, block_n, causal) -> uint8 (nqb, nkb):
        EMPTY (0) no kept pair, PARTIAL (1) some kept, FULL (2) every pair of the tile inside
        Sq x Sk is kept (causal rule included), so no element mask is needed.
    kv_block_table(coverage) -> per query block the visited key blocks, ascending.
    row_intervals(pattern, Sq, Sk, causal) -> the clipped (lo, hi) intervals of every row.
    kept_pairs(pattern, Sq, Sk, causal) -> the exact number of kept pairs (same interval form).

Coverage is exact here; consumers may rely on EMPTY never hiding a kept pair.
"""
from __future__ import annotations

import functools
import math

import torch

from sparsec.patterns import (
    AShape, BlockSparse, Columns, Dense, MultiDiagonal, Pattern, Skip, Union, VerticalSlash, Window,
)

__all__ = ["EMPTY", "PARTIAL", "FULL", "block_coverage", "kept_pairs", "kv_block_table", "row_intervals"]

EMPTY, PARTIAL, FULL = 0, 1, 2

# Query rows and (query block, key block) cells processed at once: bound the work arrays.
_ROW_CHUNK = 8192
_CELL_CHUNK = 1 << 22
# Key positions in int32 halve the memory traffic; pattern constants are clamped to +-2^30 first
# (far past any sequence length) so that row + constant cannot overflow.
_INDEX = torch.int32
_FAR = 1 << 30


# -- per-row intervals ---------------------------------------------------------------------------


def _constant(i: torch.Tensor, spans: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Intervals that are the same in every row (slope 0): spans of inclusive (lo, hi)."""
    ends = torch.tensor(spans, dtype=torch.int64).clamp(-_FAR, _FAR).to(_INDEX).reshape(-1, 2)
    rows = i.shape[0]
    return ends[:, 0].expand(rows, -1), ends[:, 1].expand(rows, -1)


def _diagonal(i: torch.Tensor, offsets: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Intervals that move with the row (slope 1): [i + a, i + b] for each (a, b)."""
    ab = torch.tensor(offsets, dtype=torch.int64).clamp(-_FAR, _FAR).to(_INDEX).reshape(-1, 2)
    return i[:, None] + ab[:, 0], i[:, None] + ab[:, 1]


@functools.lru_cache(maxsize=64)
def _block_runs(pattern: BlockSparse) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layout row, the runs of kept blocks as inclusive key-block ranges, padded with empty
    runs (start 1, end 0): two (layout rows, max runs) index tensors."""
    layout = pattern.layout
    padded = torch.nn.functional.pad(layout.to(torch.int8), (1, 1))
    steps = padded[:, 1:] - padded[:, :-1]
    starts = [torch.nonzero(row == 1).flatten() for row in steps]
    ends = [torch.nonzero(row == -1).flatten() - 1 for row in steps]
    width = max(1, max(len(s) for s in starts))
    start_table = torch.ones(layout.shape[0], width, dtype=_INDEX)
    end_table = torch.zeros(layout.shape[0], width, dtype=_INDEX)
    for r, (s, e) in enumerate(zip(starts, ends)):
        start_table[r, : len(s)] = s
        end_table[r, : len(e)] = e
    return start_table, end_table


def _block_sparse(p: BlockSparse, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bq, bk = p.block
    starts, ends = _block_runs(p)
    layout_row = i // bq
    return starts[layout_row] * bk, (ends[layout_row] + 1) * bk - 1  # padding runs come out empty


def _raw_intervals(p: Pattern, i: torch.Tensor, Sq: int, Sk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unclipped inclusive intervals (rows, n) of the keys that rows `i` keep."""
    if isinstance(p, Dense):
        return _constant(i, [(0, Sk - 1)])
    if isinstance(p, Skip):
        return _constant(i, [])
    if isinstance(p, Window):
        return _diagonal(i, [(-p.left, p.right)])
    if isinstance(p, MultiDiagonal):
        return _diagonal(i, [(o - p.width, o + p.width) for o in p.offsets])
    if isinstance(p, Columns):
        return _constant(i, [(s, e - 1) for s, e in p.ranges])
    if isinstance(p, AShape):
        parts = [_constant(i, [(0, p.sink - 1)] if p.sink else []), _diagonal(i, [(-p.window, 0)])]
        return _cat(parts)
    if isinstance(p, VerticalSlash):
        return _cat([_constant(i, [(s, e - 1) for s, e in p.columns]), _diagonal(i, [(o, o) for o in p.offsets])])
    if isinstance(p, BlockSparse):
        p.check_lengths(Sq, Sk)
        return _block_sparse(p, i)
    if isinstance(p, Union):
        return _cat([_raw_intervals(part, i, Sq, Sk) for part in p.parts])
    raise TypeError(f"block_coverage: no interval form for pattern type {type(p).__name__}")


def _cat(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([lo for lo, _ in parts], dim=1), torch.cat([hi for _, hi in parts], dim=1)


def _clipped_intervals(p: Pattern, i: torch.Tensor, Sq: int, Sk: int, causal: bool):
    """Intervals of rows `i` clipped to [0, Sk) and the causal limit; empty ones have lo > hi."""
    lo, hi = _raw_intervals(p, i, Sq, Sk)
    lo = lo.clamp(min=0)
    hi = hi.clamp(max=Sk - 1)
    if causal:
        hi = torch.minimum(hi, (i + (Sk - Sq))[:, None])
    return lo, hi


def row_intervals(pattern: Pattern, Sq: int, Sk: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi): int32 (Sq, n) inclusive key intervals whose union is exactly what row i keeps
    (pattern, [0, Sk) and causal rule applied). Empty intervals have lo > hi."""
    _check_args(pattern, Sq, Sk, 1, 1)
    return _clipped_intervals(pattern, torch.arange(Sq, dtype=_INDEX), Sq, Sk, causal)


# -- coverage ------------------------------------------------------------------------------------


def _maximal_runs(lo: torch.Tensor, hi: torch.Tensor, Sk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The maximal runs of each row's union of intervals (touching intervals joined), as
    (run_lo, run_hi, is_run) (rows, n): where is_run, [run_lo, run_hi] is one run, and the runs of
    a row are disjoint, so a key block lies inside the union iff it lies inside one run."""
    empty = lo > hi
    lo, hi = lo.masked_fill(empty, Sk), hi.masked_fill(empty, -1)  # empties sort last, reach nothing
    lo, order = lo.sort(dim=1)
    reach = hi.gather(1, order).cummax(dim=1).values  # furthest key covered so far
    before = torch.nn.functional.pad(reach[:, :-1], (1, 0), value=-2)
    starts_run = lo > before + 1
    run_lo = torch.where(starts_run, lo, -1).cummax(dim=1).values
    ends_run = torch.nn.functional.pad(starts_run[:, 1:], (0, 1), value=True)
    return run_lo, reach, ends_run & (run_lo <= reach)


def kept_pairs(pattern: Pattern, Sq: int, Sk: int, causal: bool) -> int:
    """Exact number of kept (i, j) pairs, causal rule included, from the interval form: fast at
    S = 32K where pattern.density() builds the mask row chunk by row chunk."""
    _check_args(pattern, Sq, Sk, 1, 1)
    if isinstance(pattern, Skip):
        return 0
    total = 0
    for first in range(0, Sq, _ROW_CHUNK):
        rows = torch.arange(first, min(Sq, first + _ROW_CHUNK), dtype=_INDEX)
        lo, hi = _clipped_intervals(pattern, rows, Sq, Sk, causal)
        run_lo, run_hi, is_run = _maximal_runs(lo, hi, Sk)
        total += int(torch.where(is_run, run_hi - run_lo + 1, 0).sum(dtype=torch.int64))
    return total


def _tile_counts(first, last, valid, tile_of_row, num_tiles: int, num_blocks: int) -> torch.Tensor:
    """(num_tiles, num_blocks): over the rows of each query block, how many of the key-block
    ranges [first, last] ((rows, n), only `valid` ones with first <= last) cover each key block.
    A difference array summed per query block before the prefix sum: rows x n work."""
    valid = valid & (first <= last)
    width = num_blocks + 1
    base = (tile_of_row.to(torch.int64) * width)[:, None]
    ones = valid.to(torch.int32).flatten()
    diff = torch.zeros(num_tiles * width, dtype=torch.int32)
    diff.scatter_add_(0, torch.where(valid, base + first, 0).flatten(), ones)
    diff.scatter_add_(0, torch.where(valid, base + last + 1, 0).flatten(), -ones)
    return diff.view(num_tiles, width)[:, :num_blocks].cumsum(dim=1)


def _chunk_coverage(p, rows, Sq, Sk, block_m, block_n, causal) -> torch.Tensor:
    """Coverage of the query blocks made of `rows` (a multiple of block_m, may run past Sq)."""
    nkb = math.ceil(Sk / block_n)
    num_tiles = rows.shape[0] // block_m
    tile_of_row = torch.arange(num_tiles).repeat_interleave(block_m)
    real = rows < Sq
    lo, hi = _clipped_intervals(p, rows.clamp(max=Sq - 1), Sq, Sk, causal)
    hi = torch.where(real[:, None], hi, lo - 1)  # rows past Sq keep nothing
    touched = _tile_counts(lo // block_n, hi // block_n, lo <= hi, tile_of_row, num_tiles, nkb) > 0
    run_lo, run_hi, is_run = _maximal_runs(lo, hi, Sk)
    first_whole = (run_lo + block_n - 1) // block_n
    last_whole = torch.where(run_hi == Sk - 1, nkb - 1, (run_hi + 1) // block_n - 1)
    rows_holding = _tile_counts(first_whole, last_whole, is_run, tile_of_row, num_tiles, nkb)
    # Full: every real row of the tile holds the whole block (rows past Sq hold no pair of it).
    real_rows = real.view(num_tiles, block_m).sum(dim=1, dtype=torch.int32)
    whole = rows_holding == real_rows[:, None]
    return touched.to(torch.uint8) + (touched & whole).to(torch.uint8)


def _check_args(pattern: Pattern, Sq: int, Sk: int, block_m: int, block_n: int) -> None:
    if not isinstance(pattern, Pattern):
        raise TypeError(f"block_coverage: expected a Pattern, got {type(pattern).__name__}")
    for name, value in (("Sq", Sq), ("Sk", Sk), ("block_m", block_m), ("block_n", block_n)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"block_coverage: {name} must be a positive int, got {value!r}")


@functools.lru_cache(maxsize=256)
def _coverage(pattern: Pattern, Sq: int, Sk: int, block_m: int, block_n: int, causal: bool) -> torch.Tensor:
    nqb, nkb = math.ceil(Sq / block_m), math.ceil(Sk / block_n)
    if isinstance(pattern, Skip):
        return torch.zeros(nqb, nkb, dtype=torch.uint8)
    blocks_per_chunk = max(1, min(_ROW_CHUNK // block_m, _CELL_CHUNK // (nkb + 1)))
    chunks = []
    for first in range(0, nqb, blocks_per_chunk):
        rows = torch.arange(first * block_m, min(nqb, first + blocks_per_chunk) * block_m, dtype=_INDEX)
        chunks.append(_chunk_coverage(pattern, rows, Sq, Sk, block_m, block_n, causal))
    return torch.cat(chunks)


def block_coverage(pattern: Pattern, Sq: int, Sk: int, block_m: int, block_n: int, causal: bool) -> torch.Tensor:
    """uint8 (ceil(Sq / block_m), ceil(Sk / block_n)): EMPTY, PARTIAL or FULL per tile (see the
    module docstring). Skip heads read no keys, so all their tiles are EMPTY. Cached by value."""
    _check_args(pattern, Sq, Sk, block_m, block_n)
    return _coverage(pattern, Sq, Sk, block_m, block_n, bool(causal)).clone()


def kv_block_table(coverage: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From a coverage tensor: kv_num_blocks int32 (nqb,), the visited (non-EMPTY) key blocks
    kv_indices int32 (nqb, max_blocks) in ascending order, and kv_full bool (nqb, max_blocks),
    True where that block is FULL. Rows are padded after kv_num_blocks with index 0 and
    kv_full False; max_blocks is at least 1 so no table is empty."""
    if not isinstance(coverage, torch.Tensor) or coverage.dim() != 2:
        raise ValueError("kv_block_table: coverage must be a 2-D tensor from block_coverage")
    visited = coverage != EMPTY
    counts = visited.sum(dim=1)
    width = max(1, int(counts.max())) if counts.numel() else 1
    # A stable sort on "not visited" moves the visited blocks to the front, keeping their order.
    order = torch.sort((~visited).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    listed = torch.arange(width) < counts[:, None]
    indices = torch.where(listed, order, 0)
    full = listed & (coverage.gather(1, order) == FULL)
    return counts.to(torch.int32), indices.to(torch.int32), full
