"""Which BLOCK_M x BLOCK_N tiles of the (Sq, Sk) score matrix a pattern touches, without the mask.

    block_coverage(pattern, Sq, Sk, block_m, block_n, causal) -> uint8 (nqb, nkb):
        EMPTY (0) no kept pair, PARTIAL (1) some kept, FULL (2) every pair of the tile inside
        Sq x Sk is kept (causal rule included), so no element mask is needed.
    coverage_counts(...) -> (full, partial) key blocks per query block (what cost models need).
    kv_block_table(coverage) -> per query block the visited key blocks, ascending.
    row_intervals(pattern, Sq, Sk, causal) -> the clipped (lo, hi) intervals of every row.
    kept_pairs(pattern, Sq, Sk, causal) -> the exact number of kept pairs (same interval form).
    coverage_by_rows(...) -> block_coverage computed row by row (the reference; see below).

Coverage is computed per query block in closed form, never per row:

  - Window, MultiDiagonal, Columns, AShape, VerticalSlash, Dense and unions of them keep, in row
    i, a union of key ranges [A, B] that are the same in every row ("columns") and of ranges
    [i + a, i + b] that move with the row ("bands", offsets j - i in [a, b]). Merged (touching
    ranges joined), a column range touches the key blocks [A // bn, min(B, r1 + Sk - Sq) // bn]
    of a query block with rows r0..r1, and a band the blocks holding keys [r0 + a, r1 + b]: a
    key-block range per (query block, range), summed with a difference array. A tile is FULL when
    the causal rule keeps all of it and every gap the columns leave in its keys [g0, g1] lies in
    one merged band for every row, i.e. offsets [g0 - r1, g1 - r0] fit inside one band (merged
    bands neither overlap nor touch, so a gap cannot straddle two).
  - BlockSparse: tile (query block, key block) covers a rectangle of layout cells; counts from an
    integral image of the layout say EMPTY / FULL, and tiles the causal diagonal crosses check
    each layout row's first kept key against that row's last allowed key.
  - A union holding a BlockSparse part is computed row by row (coverage_by_rows), as before:
    tiles covered jointly by a layout and a band have no block-range form worth its complexity.

Work is O(query blocks x (key blocks + ranges)) per pattern (about 1 ms at S = 16K), and results
are memoized per (pattern, lengths, tiles, causal). coverage_by_rows, the former per-row
computation (O(Sq x (key blocks + intervals))), stays as the fallback and as a second reference
in tests. Coverage is exact here; consumers may rely on EMPTY never hiding a kept pair.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from sparsec.codegen.bounded_cache import bytes_bounded_cache
from sparsec.codegen.frame_coverage import transposed_band_intervals, transposed_touched_tiles
from sparsec.codegen.frame_order import FramesTransposed
from sparsec.patterns import (
    AShape, BlockSparse, Columns, Dense, MultiDiagonal, Pattern, Skip, Union, VerticalSlash, Window,
)

__all__ = [
    "EMPTY", "PARTIAL", "FULL", "block_coverage", "coverage_by_rows", "coverage_counts", "coverage_counts_many", "kept_pairs",
    "kv_block_table", "layout_tensor", "row_intervals",
]

EMPTY, PARTIAL, FULL = 0, 1, 2

# Query rows and (query block, key block) cells processed at once: bound the work arrays.
_ROW_CHUNK = 8192
_CELL_CHUNK = 1 << 22
# Key positions in int32 halve the memory traffic; pattern constants are clamped to +-2^30 first
# (far past any sequence length) so that row + constant cannot overflow.
_INDEX = torch.int32
# Kept keys renumbered at once for a FramesTransposed pattern (rows x Sk at most).
_TRANSPOSED_KEYS = 1 << 22
_FAR = 1 << 30
_ONE = ord("1")


def layout_tensor(pattern: BlockSparse) -> torch.Tensor:
    """pattern.layout as a bool tensor, read from its row strings in one pass (the property
    builds it element by element, which takes ~10 ms for a 256 x 512 layout)."""
    rows, cols = pattern.layout_shape
    return torch.frombuffer(bytearray("".join(pattern.rows), "ascii"), dtype=torch.uint8).view(rows, cols) == _ONE


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


@bytes_bounded_cache(max_bytes=128 << 20)
def _block_runs(pattern: BlockSparse) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layout row, the runs of kept blocks as inclusive key-block ranges, padded with empty
    runs (start 1, end 0): two (layout rows, max runs) index tensors."""
    layout = layout_tensor(pattern)
    padded = torch.nn.functional.pad(layout.to(torch.int8), (1, 1))
    steps = padded[:, 1:] - padded[:, :-1]
    row, start = torch.nonzero(steps == 1, as_tuple=True)  # row by row, runs in order
    end = torch.nonzero(steps == -1, as_tuple=True)[1] - 1  # a row ends as many runs as it starts
    return _packed_runs(row, start, end, layout.shape[0])


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
    if isinstance(p, FramesTransposed):
        return _transposed_intervals(p, i, Sq, causal)
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
    if isinstance(pattern, FramesTransposed):  # built key by key: cached (block sizes, plan, cost model)
        return _transposed_row_intervals(pattern, Sq, Sk, bool(causal))
    return _clipped_intervals(pattern, torch.arange(Sq, dtype=_INDEX), Sq, Sk, causal)


@bytes_bounded_cache(max_bytes=256 << 20)
def _transposed_row_intervals(pattern: FramesTransposed, Sq: int, Sk: int, causal: bool):
    """Each row's maximal runs: in closed form for a base of bands (frame_coverage), else key by key."""
    pattern.check_lengths(Sq, Sk)
    probe = transposed_band_intervals(pattern, torch.arange(1), Sq, causal)
    if probe is None:
        rows = max(1, _TRANSPOSED_KEYS // Sq)
        parts = [_transposed_intervals(pattern, torch.arange(first, min(Sq, first + rows), dtype=_INDEX), Sq, causal)
                 for first in range(0, Sq, rows)]
    else:
        rows = max(1, _TRANSPOSED_KEYS // max(1, probe[0].shape[1]))
        parts = [_compact_runs(*transposed_band_intervals(pattern, torch.arange(first, min(Sq, first + rows)), Sq, causal), Sq)
                 for first in range(0, Sq, rows)]
    width = max(lo.shape[1] for lo, _ in parts)
    pad = torch.nn.functional.pad
    return (torch.cat([pad(lo, (0, width - lo.shape[1]), value=1) for lo, _ in parts]),  # empty: lo > hi
            torch.cat([pad(hi, (0, width - hi.shape[1]), value=0) for _, hi in parts]))


def _transposed_intervals(p: FramesTransposed, x: torch.Tensor, S: int, causal: bool):
    """Clipped intervals of transposed rows x of p (codegen.frame_order): the base pattern's kept
    keys of each row's natural row, renumbered, sorted and joined into maximal runs (rows, most
    runs of a row); O(kept keys of the rows). For bases that are not bands only (bands have
    frame_coverage's closed form)."""
    frames = p.check_lengths(S, S)
    natural = (x.to(torch.int64) % frames) * p.frame + x.to(torch.int64) // frames
    lo, hi = _clipped_intervals(p.base, natural.to(_INDEX), S, S, causal)
    run_lo, run_hi, is_run = _maximal_runs(lo, hi, S)  # disjoint: every kept key once
    lengths = torch.where(is_run, run_hi - run_lo + 1, 0).flatten()
    index = torch.int32 if x.shape[0] * S < _FAR else torch.int64  # int32 sorts faster
    run = torch.repeat_interleave(torch.arange(lengths.shape[0], dtype=index), lengths.to(torch.int64))
    before = (torch.cumsum(lengths, 0, dtype=index) - lengths)[run]
    key = run_lo.flatten().to(index)[run] + torch.arange(run.shape[0], dtype=index) - before
    moved = torch.sort((run // lo.shape[1]) * S + (key % p.frame) * frames + key // p.frame).values
    row, key = (moved // S).to(torch.int64), moved % S
    starts = torch.ones_like(moved, dtype=torch.bool)
    starts[1:] = (row[1:] != row[:-1]) | (key[1:] != key[:-1] + 1)
    ends = torch.ones_like(starts)
    ends[:-1] = starts[1:]
    return _packed_runs(row[starts], key[starts], key[ends], x.shape[0])


def _compact_runs(lo: torch.Tensor, hi: torch.Tensor, Sk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's maximal runs of intervals (lo, hi), first to last (_packed_runs)."""
    run_lo, run_hi, is_run = _maximal_runs(lo, hi, Sk)
    row, column = torch.nonzero(is_run, as_tuple=True)  # row by row, runs in order
    return _packed_runs(row, run_lo[row, column], run_hi[row, column], lo.shape[0])


def _packed_runs(row: torch.Tensor, first: torch.Tensor, last: torch.Tensor,
                 rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs [first, last] listed row by row (`row` ascending, a row's runs in order) as _INDEX
    (rows, most runs of a row) tables; empty slots lo > hi."""
    counts = torch.bincount(row, minlength=rows)
    width = max(1, int(counts.max())) if counts.numel() else 1
    slot = torch.arange(row.shape[0]) - (torch.cumsum(counts, 0) - counts)[row]
    out_lo = torch.ones(rows, width, dtype=_INDEX)
    out_hi = torch.zeros(rows, width, dtype=_INDEX)
    out_lo[row, slot] = first.to(_INDEX)
    out_hi[row, slot] = last.to(_INDEX)
    return out_lo, out_hi


# -- coverage row by row ------------------------------------------------------------------------------------


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


def coverage_by_rows(pattern: Pattern, Sq: int, Sk: int, block_m: int, block_n: int, causal: bool) -> torch.Tensor:
    """block_coverage computed from every row's key intervals (O(Sq x (key blocks + intervals))):
    the fallback for unions holding a BlockSparse part, and a reference for tests. Not cached."""
    _check_args(pattern, Sq, Sk, block_m, block_n)
    nqb, nkb = math.ceil(Sq / block_m), math.ceil(Sk / block_n)
    if isinstance(pattern, Skip):
        return torch.zeros(nqb, nkb, dtype=torch.uint8)
    blocks_per_chunk = max(1, min(_ROW_CHUNK // block_m, _CELL_CHUNK // (nkb + 1)))
    chunks = []
    for first in range(0, nqb, blocks_per_chunk):
        rows = torch.arange(first * block_m, min(nqb, first + blocks_per_chunk) * block_m, dtype=_INDEX)
        chunks.append(_chunk_coverage(pattern, rows, Sq, Sk, block_m, block_n, bool(causal)))
    return torch.cat(chunks)



# -- closed-form coverage per query block --------------------------------------------------------


def _merged(spans) -> tuple[tuple[int, int], ...]:
    """Sorted inclusive ranges with overlapping and touching ones joined; empty ones dropped."""
    merged: list[list[int]] = []
    for lo, hi in sorted(spans):
        if lo > hi:
            continue
        if merged and lo <= merged[-1][1] + 1:
            if hi > merged[-1][1]:
                merged[-1][1] = hi
        else:
            merged.append([lo, hi])
    return tuple((lo, hi) for lo, hi in merged)


def _parts(p: Pattern):
    """(column ranges, bands) of an interval-family pattern, unmerged; None for BlockSparse."""
    if isinstance(p, Dense):
        return [(0, _FAR)], []
    if isinstance(p, Window):
        return [], [(-p.left, p.right)]
    if isinstance(p, MultiDiagonal):
        return [], [(o - p.width, o + p.width) for o in p.offsets]
    if isinstance(p, Columns):
        return [(s, e - 1) for s, e in p.ranges], []
    if isinstance(p, AShape):
        return [(0, p.sink - 1)], [(-p.window, 0)]
    if isinstance(p, VerticalSlash):
        return [(s, e - 1) for s, e in p.columns], [(o, o) for o in p.offsets]
    if isinstance(p, Union):
        found = [_parts(part) for part in p.parts]
        if any(f is None for f in found):
            return None
        return [c for cols, _ in found for c in cols], [b for _, bands in found for b in bands]
    if isinstance(p, (BlockSparse, FramesTransposed)):
        return None
    raise TypeError(f"block_coverage: no interval form for pattern type {type(p).__name__}")


@functools.lru_cache(maxsize=1 << 14)
def _interval_form(p: Pattern, Sq: int, Sk: int):
    """(columns, bands) merged, columns clipped to [0, Sk), band offsets clamped to [-Sq, Sk]
    (offsets outside (-Sq, Sk) reach no key, so clamping keeps the kept set); None if the
    pattern holds a BlockSparse part."""
    parts = _parts(p)
    if parts is None:
        return None
    columns, bands = parts
    columns = _merged([(lo if lo > 0 else 0, hi if hi < Sk else Sk - 1) for lo, hi in columns])
    bands = _merged([(_clamp(a, -Sq, Sk), _clamp(b, -Sq, Sk)) for a, b in bands])
    return columns, bands


def _clamp(value: int, lo: int, hi: int) -> int:
    return lo if value < lo else hi if value > hi else value


def _ends(spans) -> tuple[torch.Tensor, torch.Tensor]:
    """Starts and ends of inclusive ranges as two contiguous int64 tensors."""
    return (torch.tensor([lo for lo, _ in spans], dtype=torch.int64),
            torch.tensor([hi for _, hi in spans], dtype=torch.int64))


def _floor_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a, b, rounding_mode="floor")


def _range_mask(lo: torch.Tensor, hi: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """(rows, num_blocks) bool: block b of row r lies in some range [lo[r, n], hi[r, n]]
    (ranges with lo > hi are empty; ends are clamped to [0, num_blocks - 1]). A difference array:
    rows x (ranges + blocks) work."""
    valid = (lo <= hi) & (hi >= 0) & (lo < num_blocks)
    lo, hi = lo.clamp(0, num_blocks - 1), hi.clamp(0, num_blocks - 1)
    diff = torch.zeros(lo.shape[0], num_blocks + 1, dtype=torch.int32)
    ones = valid.to(torch.int32)
    diff.scatter_add_(1, torch.where(valid, lo, num_blocks), ones)
    diff.scatter_add_(1, torch.where(valid, hi + 1, num_blocks), -ones)
    return diff[:, :num_blocks].cumsum(dim=1) > 0


def _tiles(Sq: int, Sk: int, block_m: int, block_n: int):
    """Rows r0..r1 of each query block and keys c0..c1 of each key block (int64, inclusive)."""
    r0 = torch.arange(math.ceil(Sq / block_m), dtype=torch.int64) * block_m
    c0 = torch.arange(math.ceil(Sk / block_n), dtype=torch.int64) * block_n
    return r0, (r0 + block_m).clamp(max=Sq) - 1, c0, (c0 + block_n).clamp(max=Sk) - 1


def _interval_coverage(columns, bands, Sq: int, Sk: int, block_m: int, block_n: int, causal: bool) -> torch.Tensor:
    r0, r1, c0, c1 = _tiles(Sq, Sk, block_m, block_n)
    nkb, shift = c0.shape[0], Sk - Sq
    if not columns and not bands:  # e.g. columns all past Sk
        return torch.zeros(r0.shape[0], nkb, dtype=torch.uint8)
    los, his = [], []
    if columns:
        A, B = _ends(columns)
        last = torch.minimum(B[None, :], (r1 + shift)[:, None]) if causal else B[None, :].expand(r0.shape[0], -1)
        los.append(torch.where(last >= A, A // block_n, 1).expand_as(last))
        his.append(torch.where(last >= A, _floor_div(last, block_n), 0))
    if bands:
        a, b = _ends(bands)
        b_kept = b.clamp(max=shift) if causal else b  # the causal rule caps every band at offset Sk - Sq
        first = (r0[:, None] + a).clamp(min=0)
        last = (r1[:, None] + b_kept).clamp(max=Sk - 1)
        nonempty = (a <= b_kept) & (first <= last)
        los.append(torch.where(nonempty, first // block_n, 1))
        his.append(torch.where(nonempty, last // block_n, 0))
    touched = _range_mask(torch.cat(los, dim=1), torch.cat(his, dim=1), nkb)
    full = _full_tiles(columns, bands, r0, r1, c0, c1, block_n, Sk) & touched
    if causal:
        full &= (c1[None, :] <= (r0 + shift)[:, None])  # every row of the tile allows every key of it
    return touched.to(torch.uint8) + full.to(torch.uint8)


def _full_tiles(columns, bands, r0, r1, c0, c1, block_n: int, Sk: int) -> torch.Tensor:
    """(nqb, nkb) bool, causal rule aside: every row of the tile keeps every key of it. Key blocks
    wholly inside the columns are full; otherwise each gap the columns leave must fit in a band."""
    nqb, nkb = r0.shape[0], c0.shape[0]
    if columns:
        A, B = _ends(columns)
        covered = (torch.minimum(B[None, :], c1[:, None]) - torch.maximum(A[None, :], c0[:, None]) + 1).clamp(min=0).sum(dim=1)
    else:
        covered = torch.zeros(nkb, dtype=torch.int64)
    whole = covered == c1 - c0 + 1
    if not bands:
        return whole[None, :].expand(nqb, nkb).clone()
    a, b = _ends(bands)
    # Key blocks the columns miss entirely: offsets [c0 - r1, c1 - r0] inside a band, i.e. for
    # band (a, b) the key blocks with c0 >= r1 + a and c1 <= r0 + b: one range per query block.
    first = -_floor_div(-(r1[:, None] + a), block_n)
    last = torch.where(Sk - 1 <= r0[:, None] + b, nkb - 1, _floor_div(r0[:, None] + b + 1, block_n) - 1)
    in_band = _range_mask(first, last, nkb)
    full = whole[None, :] | ((covered == 0)[None, :] & in_band)
    mixed = ((covered > 0) & ~whole).nonzero().flatten()
    if mixed.numel():
        full[:, mixed] = _gaps_in_bands(columns, a, b, r0, r1, c0[mixed], c1[mixed])
    return full


def _gaps_in_bands(columns, a, b, r0, r1, c0, c1) -> torch.Tensor:
    """(nqb, len(c0)) bool for key blocks the columns cover in part: every gap [g0, g1] the
    columns leave in the block lies in one band for every row, i.e. offsets [g0 - r1, g1 - r0]
    inside some merged band (found by searchsorted on the band starts)."""
    holes, end = [], 0
    for lo, hi in columns:
        if lo > end:
            holes.append((end, lo - 1))
        end = hi + 1
    holes.append((end, _FAR))
    h0, h1 = _ends(holes)  # ascending and disjoint
    # Only the holes that meet each block (a few; all of them would make (nqb, blocks, holes)
    # tensors of tens of millions of elements for a vertical-slash head with hundreds of columns).
    first = torch.searchsorted(h1, c0)                     # the first hole ending at or after c0
    count = torch.searchsorted(h0, c1, right=True) - first  # holes starting at or before c1, from it on
    width = torch.arange(max(1, int(count.max())))
    index = (first[:, None] + width).clamp(max=h0.numel() - 1)
    g0 = torch.maximum(h0[index], c0[:, None])            # (blocks, holes of a block)
    g1 = torch.minimum(h1[index], c1[:, None])
    is_gap = g0 <= g1  # the padding slots name holes past the block: empty there
    x0 = g0[None] - r1[:, None, None]                      # (nqb, blocks, holes of a block)
    x1 = g1[None] - r0[:, None, None]
    band = torch.searchsorted(a, x0.contiguous(), right=True) - 1
    fits = (band >= 0) & (x1 <= b[band.clamp(min=0)])
    return (fits | ~is_gap[None]).all(dim=2)


def _block_sparse_coverage(p: BlockSparse, Sq: int, Sk: int, block_m: int, block_n: int, causal: bool) -> torch.Tensor:
    """A lone BlockSparse: tile (qb, kb) spans layout rows [r0 // bq, r1 // bq] and columns
    [c0 // bk, c1 // bk]; the kept cells of that rectangle (a pooling of the layout when the
    tile is whole cells, else an integral image) say EMPTY / FULL. numpy throughout: a tuning
    run's measurements ask this for every BlockSparse candidate at the kernel's tiles."""
    p.check_lengths(Sq, Sk)
    bq, bk = p.block
    layout = np.frombuffer("".join(p.rows).encode("ascii"), dtype=np.uint8).reshape(p.layout_shape) == _ONE
    r0, r1, nkb = _block_rows(Sq, Sk, block_m, block_n)
    c0 = np.arange(nkb, dtype=np.int64) * block_n
    c1 = np.minimum(c0 + block_n, Sk) - 1
    if block_m % bq == 0 and block_n % bk == 0:
        touched, full = _pooled_layout(layout, r0.shape[0], nkb, block_m // bq, block_n // bk)
    else:
        integral = np.pad(layout.astype(np.int32).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        lr0, lr1, lc0, lc1 = (r0 // bq)[:, None], (r1 // bq + 1)[:, None], (c0 // bk)[None, :], (c1 // bk + 1)[None, :]
        kept = integral[lr1, lc1] - integral[lr0, lc1] - integral[lr1, lc0] + integral[lr0, lc0]
        touched, full = kept > 0, kept == (lr1 - lr0) * (lc1 - lc0)
    if causal:
        shift = Sk - Sq
        allowed = c1[None, :] <= (r0 + shift)[:, None]
        crossing = touched & ~allowed & (c0[None, :] <= (r1 + shift)[:, None])
        touched = touched & allowed
        qb, kb = np.nonzero(crossing)
        touched[qb, kb] = _crossing_touched(layout, r0[qb], r1[qb], c0[kb], c1[kb], bq, bk, shift)
        full &= allowed
    return torch.from_numpy(touched.astype(np.uint8) + full.astype(np.uint8))


def _pooled_layout(kept: np.ndarray, nqb: int, nkb: int, fq: int, fk: int) -> tuple[np.ndarray, np.ndarray]:
    """(touched, full) (nqb, nkb) of a layout whose tiles are fq x fk whole cells: one count of
    kept cells per tile (cells past the layout, i.e. past Sq or Sk, hold no pair: they count as
    neither kept nor needed)."""
    if fq == fk == 1:
        return kept.copy(), kept.copy()
    rows, cols = kept.shape
    padded = np.zeros((nqb * fq, nkb * fk), dtype=np.int16)
    padded[:rows, :cols] = kept
    by_columns = sum(padded[:, u::fk] for u in range(fk))       # strided adds: no reduction over a
    count = sum(by_columns[v::fq] for v in range(fq))           # non-contiguous axis
    real_rows = np.minimum(fq, rows - np.arange(nqb) * fq)
    real_cols = np.minimum(fk, cols - np.arange(nkb) * fk)
    return count > 0, count == real_rows[:, None] * real_cols[None, :]


def _crossing_touched(layout: np.ndarray, r0, r1, c0, c1, bq: int, bk: int, shift: int) -> np.ndarray:
    """For tiles the causal diagonal crosses (rows r0..r1, keys c0..c1, one entry a tile):
    touched iff some layout row of the tile keeps a key in [c0, min(c1, its last row in the tile
    + Sk - Sq)]; a few layout cells per (tile, layout row), read directly."""
    hit = np.zeros(r0.shape[0], dtype=bool)
    if not r0.size:
        return hit
    first_row, last_row, first_col = r0 // bq, r1 // bq, c0 // bk
    cols = first_col[:, None] + np.arange(int((c1 // bk - first_col).max()) + 1)   # (tiles, width)
    for step in range(int((last_row - first_row).max()) + 1):
        lr = first_row + step
        last_key = np.minimum(np.minimum(r1, lr * bq + bq - 1) + shift, c1)
        reach = (lr <= last_row) & (last_key >= c0)
        inside = (cols <= (last_key // bk)[:, None]) & (cols < layout.shape[1])
        cells = layout[np.minimum(lr, layout.shape[0] - 1)[:, None], np.minimum(cols, layout.shape[1] - 1)]
        hit |= reach & (cells & inside).any(axis=1)
    return hit


@bytes_bounded_cache(max_bytes=256 << 20)
def _coverage(pattern: Pattern, Sq: int, Sk: int, block_m: int, block_n: int, causal: bool) -> torch.Tensor:
    if isinstance(pattern, Skip):
        return torch.zeros(math.ceil(Sq / block_m), math.ceil(Sk / block_n), dtype=torch.uint8)
    if isinstance(pattern, BlockSparse):
        return _block_sparse_coverage(pattern, Sq, Sk, block_m, block_n, causal)
    form = _interval_form(pattern, Sq, Sk)
    if form is None:
        return coverage_by_rows(pattern, Sq, Sk, block_m, block_n, causal)
    return _interval_coverage(*form, Sq, Sk, block_m, block_n, causal)


def block_coverage(pattern: Pattern, Sq: int, Sk: int, block_m: int, block_n: int, causal: bool) -> torch.Tensor:
    """uint8 (ceil(Sq / block_m), ceil(Sk / block_n)): EMPTY, PARTIAL or FULL per tile (see the
    module docstring). Skip heads read no keys, so all their tiles are EMPTY. Cached by value."""
    _check_args(pattern, Sq, Sk, block_m, block_n)
    return _coverage(pattern, Sq, Sk, block_m, block_n, bool(causal)).clone()


def coverage_counts(pattern: Pattern, Sq: int, Sk: int, block_m: int, block_n: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(full, partial): int64 (ceil(Sq / block_m),) FULL and PARTIAL key blocks per query block,
    what cost models need (see coverage_counts_many)."""
    full, partial = coverage_counts_many([pattern], Sq, Sk, block_m, block_n, causal)
    return torch.from_numpy(full[0]), torch.from_numpy(partial[0])


def coverage_counts_many(patterns, Sq: int, Sk: int, block_m: int, block_n: int, causal: bool) -> tuple[np.ndarray, np.ndarray]:
    """(full, partial): int64 numpy (len(patterns), ceil(Sq / block_m)) FULL and PARTIAL key
    blocks per query block of each pattern, all counted at once. Interval families and
    BlockSparse at its own block size are counted per query block without building coverage
    (O(query blocks x ranges) each, batched over the patterns; interval forms are cached);
    frame-transposed bands in closed form too, all touched tiles partial (codegen.frame_coverage);
    other patterns count their coverage."""
    patterns = list(patterns)
    for p in patterns:
        _check_args(p, Sq, Sk, block_m, block_n)
    causal = bool(causal)
    nqb = math.ceil(Sq / block_m)
    full = np.zeros((len(patterns), nqb), dtype=np.int64)
    touched = np.zeros((len(patterns), nqb), dtype=np.int64)
    forms, aligned = {}, []
    for n, p in enumerate(patterns):
        if isinstance(p, Skip):
            continue
        if isinstance(p, BlockSparse) and p.block == (block_m, block_n):
            p.check_lengths(Sq, Sk)
            aligned.append(n)
        elif not isinstance(p, BlockSparse) and (form := _interval_form(p, Sq, Sk)) is not None:
            forms.setdefault(form, []).append(n)
        elif isinstance(p, FramesTransposed) and (
                tiles := transposed_touched_tiles(p, Sq, Sk, block_m, block_n, causal)) is not None:
            touched[n] = tiles  # every touched tile counted partial (codegen.frame_coverage)
        else:
            cov = _coverage(p, Sq, Sk, block_m, block_n, causal)
            full[n], touched[n] = (cov == FULL).sum(dim=1).numpy(), (cov != EMPTY).sum(dim=1).numpy()
    if aligned:
        full[aligned], touched[aligned] = _aligned_layout_counts([patterns[n].rows for n in aligned], Sq, Sk, block_m, block_n, causal)
    if forms:
        counted = _cached_interval_counts(list(forms), Sq, Sk, block_m, block_n, causal)
        for (form_full, form_touched), rows in zip(counted, forms.values()):
            full[rows], touched[rows] = form_full, form_touched
    return full, touched - full


# Interval forms counted before, by (form, lengths, tiles, causal): (full, touched) per query block.
_COUNTS_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
_COUNTS_CACHE_SIZE = 1 << 14


def _cached_interval_counts(forms, Sq: int, Sk: int, block_m: int, block_n: int, causal: bool):
    shape = (Sq, Sk, block_m, block_n, causal)
    missing = [f for f in dict.fromkeys(forms) if (f, shape) not in _COUNTS_CACHE]
    if missing:
        if len(_COUNTS_CACHE) + len(missing) > _COUNTS_CACHE_SIZE:
            _COUNTS_CACHE.clear()
        full, touched = _interval_counts(missing, Sq, Sk, block_m, block_n, causal)
        for n, f in enumerate(missing):
            _COUNTS_CACHE[f, shape] = (full[n], touched[n])
    return [_COUNTS_CACHE[f, shape] for f in forms]


def _block_rows(Sq: int, Sk: int, block_m: int, block_n: int):
    """numpy twin of _tiles: r0, r1 per query block and the key-block count."""
    r0 = np.arange(math.ceil(Sq / block_m), dtype=np.int64) * block_m
    return r0, np.minimum(r0 + block_m, Sq) - 1, math.ceil(Sk / block_n)


def _allowed_last(r0, Sq: int, Sk: int, block_n: int, nkb: int, causal: bool):
    """Per query block, the last key block whose every key the causal rule allows in every row
    of it (c1 <= r0 + Sk - Sq); -1 if none. Without causal, the last key block."""
    if not causal:
        return np.full(r0.shape, nkb - 1, dtype=np.int64)
    shift = Sk - Sq
    return np.where(Sk - 1 <= r0 + shift, nkb - 1, (r0 + shift + 1) // block_n - 1)


def _aligned_layout_counts(layouts: list[tuple[str, ...]], Sq: int, Sk: int, block_m: int, block_n: int, causal: bool):
    """(full, touched) (len(layouts), nqb) of BlockSparse patterns whose block is the tile: a
    kept cell is FULL where the causal rule allows all of it and touched where it allows any."""
    r0, r1, nkb = _block_rows(Sq, Sk, block_m, block_n)
    kept = np.frombuffer("".join(r for rows in layouts for r in rows).encode("ascii"), dtype=np.uint8)
    kept = kept.reshape(len(layouts), r0.shape[0], nkb) == _ONE
    if not causal:
        count = kept.sum(axis=2)
        return count, count
    key_block = np.arange(nkb)
    whole_last = _allowed_last(r0, Sq, Sk, block_n, nkb, causal)
    reach_last = (r1 + Sk - Sq) // block_n  # the last key block holding an allowed key
    return ((kept & (key_block <= whole_last[:, None])).sum(axis=2),
            (kept & (key_block <= reach_last[:, None])).sum(axis=2))


def _padded_ends(spans_per_form, pad: int):
    """(starts, ends) int64 (forms, longest) of each form's ranges, padded with (pad, pad - 1)."""
    width = max(1, max(len(spans) for spans in spans_per_form))
    starts = np.full((len(spans_per_form), width), pad, dtype=np.int64)
    ends = np.full((len(spans_per_form), width), pad - 1, dtype=np.int64)
    for n, spans in enumerate(spans_per_form):
        if spans:
            starts[n, : len(spans)], ends[n, : len(spans)] = zip(*spans)
    return starts, ends


def _interval_counts(forms, Sq: int, Sk: int, block_m: int, block_n: int, causal: bool):
    """(full, touched) int64 (len(forms), nqb) of interval forms (merged columns, merged bands),
    batched over forms with the same parts (so no form pays for another's padding)."""
    nqb = math.ceil(Sq / block_m)
    full = np.zeros((len(forms), nqb), dtype=np.int64)
    touched = np.zeros((len(forms), nqb), dtype=np.int64)
    groups: dict[tuple[int, int], list[int]] = {}
    for n, (columns, bands) in enumerate(forms):  # by which parts they have, few or many ranges
        groups.setdefault((min(len(columns), 2), min(len(bands), 2)), []).append(n)
    for rows in groups.values():
        full[rows], touched[rows] = _interval_counts_group([forms[n] for n in rows], Sq, Sk, block_m, block_n, causal)
    return full, touched


def _interval_counts_group(forms, Sq: int, Sk: int, block_m: int, block_n: int, causal: bool):
    """The range arithmetic of _interval_coverage counted per query block: touched = |column
    blocks| + |band blocks| - |both|, full = whole column blocks + blocks in a band that no
    column touches + blocks the columns cover in part whose gaps fit in bands. Columns enter
    through prefix counts over key blocks; bands through relative prefix counts on full-height
    query blocks (_band_counts_shifted) and per (query block, band) on a partial last one."""
    r0, r1, nkb = _block_rows(Sq, Sk, block_m, block_n)
    N, shift = len(forms), Sk - Sq
    g = _Grid(Sq=Sq, Sk=Sk, block_m=block_m, block_n=block_n, nkb=nkb, causal=causal, shift=shift,
              last_whole=_allowed_last(r0, Sq, Sk, block_n, nkb, causal),
              # Key blocks before `cut` are reached by every column range that meets them; block
              # `cut` (the one holding the last allowed key r1 + Sk - Sq, causal only) only by
              # ranges starting at or before that key: `edge`.
              cut=np.clip((r1 + shift) // block_n, -1, nkb) if causal else np.full_like(r0, nkb))
    rows = np.arange(N)[:, None]
    full = np.zeros((N, r0.shape[0]), dtype=np.int64)
    touched = np.zeros((N, r0.shape[0]), dtype=np.int64)
    cols = None
    if forms[0][0]:
        A, B = _padded_ends([f[0] for f in forms], _FAR)   # (N, p), padding (FAR, FAR - 1)
        real = A < _FAR
        first, last = -(-A // block_n), np.where(B == Sk - 1, nkb - 1, (B + 1) // block_n - 1)
        by_columns = _blocks_in_ranges(A // block_n, B // block_n, real, nkb)
        whole = _blocks_in_ranges(first, last, real & (first <= last), nkb)
        edge = np.zeros((N, r0.shape[0]), dtype=bool)
        if causal:
            edge = ((A[:, None, :] <= (r1 + shift)[None, :, None]) & (B[:, None, :] >= (g.cut * block_n)[None, :, None])).any(axis=2)
            edge &= (g.cut >= 0) & (g.cut < nkb)
        cols = _Columns(blocks=by_columns, prefix=np.pad(by_columns.cumsum(axis=1), ((0, 0), (1, 0))), edge=edge)
        touched += cols.prefix[rows, np.maximum(g.cut, 0)] + edge
        full += np.pad(whole.cumsum(axis=1), ((0, 0), (1, 0)))[rows, np.maximum(g.last_whole, -1) + 1]
    if forms[0][1]:
        a, b = _padded_ends([f[1] for f in forms], 2 * _FAR)  # (N, q) sorted by start
        regular = np.flatnonzero(r1 - r0 + 1 == block_m)
        partial = np.flatnonzero(r1 - r0 + 1 != block_m)
        for part, count in ((regular, _band_counts_shifted), (partial, _band_counts_by_rows)):
            if part.size:
                part_touched, part_full = count(a, b, r0[part], r1[part], g.rows(part), cols and cols.rows(part))
                touched[:, part] += part_touched
                full[:, part] += part_full
        if cols is not None:
            mixed = cols.blocks & ~whole
            if mixed.any():
                full += _mixed_full(A, B, a, b, mixed, r0, r1, Sk, block_n, g.last_whole)
    return full, touched


@dataclass(frozen=True, slots=True, kw_only=True)
class _Grid:
    """What the band counts need about the lengths, tiles and causal rule; last_whole and cut
    per query block."""

    Sq: int
    Sk: int
    block_m: int
    block_n: int
    nkb: int
    causal: bool
    shift: int
    last_whole: np.ndarray
    cut: np.ndarray

    def rows(self, part: np.ndarray) -> _Grid:
        return dataclasses.replace(self, last_whole=self.last_whole[part], cut=self.cut[part])


@dataclass(frozen=True, slots=True, kw_only=True)
class _Columns:
    """Key blocks the column ranges touch (N, nkb), their prefix counts (N, nkb + 1), and per
    query block whether the columns reach block `cut` (N, nqb)."""

    blocks: np.ndarray
    prefix: np.ndarray
    edge: np.ndarray

    def rows(self, part: np.ndarray) -> _Columns:
        return dataclasses.replace(self, edge=self.edge[:, part])


def _band_counts_by_rows(a, b, r0, r1, g: _Grid, cols: _Columns | None):
    """(touched, full) (N, rows) contributions of the bands, per (query block, band): the key
    blocks the bands touch less those the columns touch too, and the key blocks inside a band
    (for the causal rule's allowed ones) that no column touches."""
    N, Sk, bn, nkb = a.shape[0], g.Sk, g.block_n, g.nkb
    b_kept = np.minimum(b, g.shift) if g.causal else b  # the causal rule caps every band at offset Sk - Sq
    lo = np.maximum(r0[None, :, None] + a[:, None, :], 0)
    hi = np.minimum(r1[None, :, None] + b_kept[:, None, :], Sk - 1)
    empty = (a > b_kept)[:, None, :] | (lo > hi)
    lo, hi = np.where(empty, _FAR, lo // bn), np.where(empty, -1, hi // bn)
    # Bands sorted by start give ranges sorted by lo: each adds its part past the reach so far.
    before = np.maximum.accumulate(hi, axis=2)
    piece_lo = np.maximum(lo, np.concatenate([np.full((N, r0.shape[0], 1), -1), before[:, :, :-1]], axis=2) + 1)
    piece = np.clip(hi - piece_lo + 1, 0, None)
    touched = piece.sum(axis=2)
    # Whole key blocks inside a band: c0 >= r1 + a and c1 <= r0 + b.
    first = np.maximum(-(-(r1[None, :, None] + a[:, None, :]) // bn), 0)
    last = np.minimum(np.where(Sk - 1 <= r0[None, :, None] + b[:, None, :], nkb - 1,
                               (r0[None, :, None] + b[:, None, :] + 1) // bn - 1), g.last_whole[None, :, None])
    span = np.clip(last - first + 1, 0, None)
    if cols is not None:
        prefix = cols.prefix[:, None, :]
        piece_lo = np.minimum(piece_lo, nkb)
        piece_hi = np.clip(np.minimum(hi, g.cut[None, :, None] - 1) + 1, 0, nkb)
        both = np.where(piece > 0, np.clip(_take(prefix, piece_hi) - _take(prefix, piece_lo), 0, None), 0).sum(axis=2)
        touched -= both + (cols.edge & (hi == g.cut[None, :, None]).any(axis=2))
        lo, hi = np.minimum(first, nkb), np.clip(last + 1, 0, nkb)
        span -= np.where(span > 0, _take(prefix, np.maximum(hi, lo)) - _take(prefix, lo), 0)
    return touched, span.sum(axis=2)


def _band_counts_shifted(a, b, r0, r1, g: _Grid, cols: _Columns | None):
    """_band_counts_by_rows for full-height query blocks, without a (query block, band) pass.

    Query blocks qb = rho + P t (P = block_n / gcd(block_m, block_n)) start at r0 = rho block_m +
    t lcm(block_m, block_n), a whole number of key blocks apart: the key blocks a band touches
    (or holds whole) are one relative set per residue rho, shifted by t lcm / block_n. Counts
    over key-block ranges are then differences of that set's prefix counts. The last key block
    (partial when block_n does not divide Sk) is checked directly."""
    N, Sq, Sk, bm, bn, nkb = a.shape[0], g.Sq, g.Sk, g.block_m, g.block_n, g.nkb
    period = bn // math.gcd(bm, bn)
    step = period * bm // bn                        # key blocks between query blocks t and t + 1
    b_kept = np.minimum(b, g.shift) if g.causal else b
    real = a < _FAR
    qb = r0 // bm
    touched = np.zeros((N, r0.shape[0]), dtype=np.int64)
    full = np.zeros((N, r0.shape[0]), dtype=np.int64)
    # The last key block, directly: a band touches it / holds it whole in this query block.
    last_c0 = (nkb - 1) * bn
    last_touched = (real & (a <= b_kept))[:, None, :] & (r0[None, :, None] + a[:, None, :] <= Sk - 1) \
        & (r1[None, :, None] + b_kept[:, None, :] >= last_c0)
    last_touched = last_touched.any(axis=2)
    last_full = (real[:, None, :] & (last_c0 >= r1[None, :, None] + a[:, None, :])
                 & (Sk - 1 <= r0[None, :, None] + b[:, None, :])).any(axis=2) & (g.last_whole >= nkb - 1)
    for rho in range(period):
        at = np.flatnonzero(qb % period == rho)
        if not at.size:
            continue
        base, shift_t = rho * bm, (qb[at] // period) * step
        origin = (base - Sq) // bn - 1                # below every relative key block a band reaches
        width = (base + bm - 1 + Sk) // bn + 2 - origin
        touched_sets = _relative_prefix(np.floor_divide(base + a, bn), np.floor_divide(base + bm - 1 + b_kept, bn),
                                        real & (a <= b_kept), origin, width)
        inside_sets = _relative_prefix(-((-(base + bm - 1 + a)) // bn), (base + b + 1) // bn - 1, real, origin, width)

        def count(prefix, lo, hi):  # relative set members in absolute key blocks [lo, hi] (N, rows, ...)
            hi_i = np.clip(hi - shift_t.reshape((1, -1) + (1,) * (hi.ndim - 2)) - origin + 1, 0, width)
            lo_i = np.clip(lo - shift_t.reshape((1, -1) + (1,) * (lo.ndim - 2)) - origin, 0, width)
            lo_i = np.minimum(lo_i, hi_i)
            rows = np.arange(N).reshape((-1,) + (1,) * (hi.ndim - 1))
            return prefix[rows, hi_i] - prefix[rows, lo_i]

        zeros, top = np.zeros((1, at.size), dtype=np.int64), np.full((1, at.size), nkb - 2)
        part_touched = count(touched_sets, zeros, top) + last_touched[:, at]
        allowed_top = np.minimum(g.last_whole[at], nkb - 2)[None, :]
        part_full = count(inside_sets, zeros, allowed_top) + last_full[:, at]
        if cols is not None:
            # Blocks both touch / inside a band that a column touches, below the last key block:
            # the causal cuts (kb < cut, kb <= last_whole) are fixed in relative terms on full-height
            # query blocks, so each count is a correlation of a relative set with the column blocks.
            below_cut = (base + bm - 1 + g.shift) // bn - origin if g.causal else width   # relative kb < cut
            allowed = (base + g.shift + 1) // bn - origin if g.causal else width          # relative kb <= last_whole
            column_blocks = cols.blocks.copy()
            column_blocks[:, nkb - 1] = False
            both, inside = _correlate([np.diff(touched_sets, axis=1)[:, :max(0, below_cut)],
                                       np.diff(inside_sets, axis=1)[:, :max(0, allowed)]],
                                      column_blocks, origin + shift_t)
            last_col = cols.blocks[:, nkb - 1][:, None]
            both += (nkb - 1 < g.cut[at])[None, :] & last_col & last_touched[:, at]
            edge = cols.edge[:, at]
            cut_row = np.broadcast_to(g.cut[at][None, :], edge.shape)
            in_sets = count(touched_sets, cut_row, np.minimum(cut_row, nkb - 2)) > 0
            both += edge & np.where(cut_row == nkb - 1, last_touched[:, at], in_sets)
            part_touched -= both
            part_full -= inside + (last_full[:, at] & last_col)
        touched[:, at] = part_touched
        full[:, at] = part_full
    return touched, full


def _correlate(relative_sets: list[np.ndarray], blocks: np.ndarray, lags: np.ndarray) -> list[np.ndarray]:
    """For each relative set R (N, w) (0/1, index j = relative key block origin + j): per lag x
    in `lags`, sum_j R[n, j] * blocks[n, j + x] (key blocks outside [0, nkb) count 0), as
    (N, len(lags)) ints. One FFT of `blocks`, one of each set (the values are small integers,
    exact after rounding)."""
    N, nkb = blocks.shape
    # no wrap-around: j + lag stays within (nkb - size, size) for every j < width
    size = 1 << max(1, (max(r.shape[1] for r in relative_sets) + nkb + int(np.abs(lags).max())).bit_length())
    spectrum = np.fft.rfft(blocks.astype(np.float64), size, axis=1)
    found = []
    for relative in relative_sets:
        if relative.shape[1] == 0:
            found.append(np.zeros((N, lags.shape[0]), dtype=np.int64))
            continue
        correlation = np.fft.irfft(np.conj(np.fft.rfft(relative.astype(np.float64), size, axis=1)) * spectrum, size, axis=1)
        found.append(np.rint(correlation[:, lags % size]).astype(np.int64))
    return found


def _relative_prefix(lo, hi, valid, origin: int, width: int) -> np.ndarray:
    """(N, width + 1) prefix counts of the relative key blocks in some valid range [lo, hi] of
    each row (ranges may overlap), indexed from `origin`."""
    N = lo.shape[0]
    diff = np.zeros((N, width + 1), dtype=np.int64)
    rows = np.broadcast_to(np.arange(N)[:, None], lo.shape)
    valid = valid & (lo <= hi)
    np.add.at(diff, (rows[valid], np.clip(lo[valid] - origin, 0, width)), 1)
    np.add.at(diff, (rows[valid], np.clip(hi[valid] + 1 - origin, 0, width)), -1)
    inside = diff[:, :width].cumsum(axis=1) > 0
    return np.pad(inside.cumsum(axis=1), ((0, 0), (1, 0)))


def _take(prefix: np.ndarray, index: np.ndarray) -> np.ndarray:
    """prefix (N, 1, K) gathered at index (N, nqb, q) along the last axis."""
    return np.take_along_axis(np.broadcast_to(prefix, index.shape[:2] + prefix.shape[2:]), index, axis=2)


def _blocks_in_ranges(lo, hi, valid, nkb: int) -> np.ndarray:
    """(N, nkb) bool: key block k lies in some valid range [lo[n, i], hi[n, i]] of row n."""
    diff = np.zeros((lo.shape[0], nkb + 1), dtype=np.int64)
    rows = np.broadcast_to(np.arange(lo.shape[0])[:, None], lo.shape)
    np.add.at(diff, (rows[valid], np.clip(lo[valid], 0, nkb)), 1)
    np.add.at(diff, (rows[valid], np.clip(hi[valid] + 1, 0, nkb)), -1)
    return diff[:, :nkb].cumsum(axis=1) > 0


def _mixed_full(A, B, a, b, mixed, r0, r1, Sk: int, block_n: int, last_whole):
    """(N, nqb): the allowed key blocks that the columns cover in part (`mixed`, (N, nkb)) and
    whose every gap fits in one band for every row (see _gaps_in_bands). A hole that meets such
    a block starts or ends in it, so the (hole, block) pairs at hole ends are all there is."""
    N, nkb = mixed.shape
    out = np.zeros((N, r0.shape[0]), dtype=np.int64)
    # A gap needs a band at least as long as the rows of the block (offsets [g0 - r1, g1 - r0]).
    longest = np.where(a <= b, b - a + 1, 0).max(axis=1)
    mixed = mixed & (longest >= (r1 - r0 + 1).min())[:, None]
    tall_enough = np.flatnonzero(r1 - r0 + 1 <= longest.max())
    if not tall_enough.size or not mixed.any():
        return out
    r0, r1, last_whole = r0[tall_enough], r1[tall_enough], last_whole[tall_enough]
    h0 = np.concatenate([np.zeros((N, 1), dtype=np.int64), B + 1], axis=1)  # holes between column ranges
    h1 = np.concatenate([A - 1, np.full((N, 1), _FAR, dtype=np.int64)], axis=1)
    holes = np.arange(h0.shape[1])
    form = np.repeat(np.arange(N), 2 * holes.shape[0])
    hole = np.tile(np.concatenate([holes, holes]), N)
    kb = np.concatenate([h0 // block_n, h1 // block_n], axis=1).ravel()
    keep = (kb >= 0) & (kb < nkb)
    keep[keep] = mixed[form[keep], kb[keep]]
    if not keep.any():
        return out
    holes_count = h0.shape[1]
    pairs = np.unique((form[keep] * (nkb + 1) + kb[keep]) * holes_count + hole[keep])  # sorted by (form, kb)
    form, rest = np.divmod(pairs, (nkb + 1) * holes_count)
    kb, hole = np.divmod(rest, holes_count)
    g0 = np.maximum(h0[form, hole], kb * block_n)
    g1 = np.minimum(h1[form, hole], np.minimum(kb * block_n + block_n, Sk) - 1)
    x0, x1 = g0[None, :] - r1[:, None], g1[None, :] - r0[:, None]   # (nqb, pairs)
    # One searchsorted over every form's band starts, each form's shifted into its own span.
    span = 8 * _FAR
    starts = (a + np.arange(N)[:, None] * span).ravel()
    band = np.searchsorted(starts, x0 + form * span, side="right") - 1
    band_form, band_index = np.divmod(np.maximum(band, 0), a.shape[1])
    fits = (band >= 0) & (band_form == form) & (x1 <= b[band_form, band_index])
    fits |= g0 > g1  # an empty hole (e.g. the last one starting past Sk) leaves no gap
    run = np.flatnonzero(np.diff(form * (nkb + 1) + kb, prepend=-1))
    counted = np.logical_and.reduceat(fits, run, axis=1) & (kb[run][None, :] <= last_whole[:, None])
    run_form = form[run]
    first_run = np.flatnonzero(np.diff(run_form, prepend=-1))
    out[np.ix_(run_form[first_run], tall_enough)] = np.add.reduceat(counted.astype(np.int64), first_run, axis=1).T
    return out


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
