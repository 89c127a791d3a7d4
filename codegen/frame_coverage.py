"""What a FramesTransposed pattern of bands keeps, in closed form: the key tiles each query block
touches, each row's key intervals and key count, and each query block's union of keys.

block_coverage computes a renumbered pattern's tiles from every row's intervals (below): right
for the block tables of a launch, too slow for the cost model, which prices every head of a layer
in both orders. transposed_touched_tiles counts the touched tiles from the bands alone. In
transposed order a query block's rows of frame f are the natural rows f * frame + [pa, pb],
consecutive; a band (offsets j - i in [a, b]) keeps for them the natural keys
[f * frame + pa + a, f * frame + pb + b] (the causal rule ends it at the last row), one run. Cut at
natural frame boundaries, each piece is positions q in [q0, q1] of one frame f', which sit at
q * T + f' in transposed order: every key tile between the first and the last is touched, since
they lie T <= BLOCK_N apart. The union over frames and bands of those tile ranges is exact.

A tile is counted partial, never full (whole tiles are rare in this order: a row's keys stop at
frame edges); the launch's block tables still come from the exact coverage. For T > BLOCK_N the
pieces skip tiles and this returns None.

transposed_band_intervals gives the rows' intervals themselves in closed form, for the block
tables, the CPU executor's plans and its choices. Row x is natural row i = f * frame + p (x = p * T
+ f); a key at natural offset j - i = k * frame + d (|d| < frame) is position q = p + d of frame
f + k, at q * T + f + k in transposed order. For each d the frames a band [a, b] keeps are one
range of k, [ceil((a - d) / frame), floor((b - d) / frame)], the same in every row; merged over the
bands it is a few ranges of k. So row x keeps, for each (d, k range), the interval [q * T + f +
k0, q * T + f + k1] clipped to the T frames (nothing when q leaves [0, frame)): O(rows x (d, k
range) pairs) with no sort, where renumbering key by key costs O(kept pairs) and a sort (a temporal
head at S = 16K in frames of 1024: 0.35-0.7 s, against 20-100 ms here).

The CPU executor's cost model needs each query block's union, not its rows'
(transposed_block_intervals). For one (d, k range), the rows of one position in frames f0..f1
keep intervals that move one key a frame: together [q * T + f0 + k0, q * T + f1 + k1], clipped.
When the range holds frame step 0 (k0 <= 0 <= k1), a position's last row keeps up to key q * T +
T - 1 and the next position's first row from (q + 1) * T, so all the block's rows keep one
interval. A block's union is then O(ranges x (1 + the positions it holds, for ranges without step
0)) intervals, where its rows' are O(block_m x ranges). transposed_row_keys counts each row's keys
(whether a block is masked) from prefix sums over the (d, k ranges) ordered by d: O(T x ranges +
S), where the rows' intervals cost O(S x ranges).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from sparsec.codegen.frame_order import FramesTransposed

__all__ = [
    "base_bands", "transposed_band_intervals", "transposed_block_intervals", "transposed_pieces", "transposed_row_keys",
    "transposed_touched_tiles",
]


def base_bands(pattern: FramesTransposed, Sq: int, Sk: int) -> tuple[tuple[int, int], ...] | None:
    """The base pattern's bands (merged inclusive offsets j - i, clamped as block_coverage's
    interval form has them), or None when it keeps anything else (columns, a block layout)."""
    from sparsec.codegen.block_coverage import _interval_form

    form = _interval_form(pattern.base, Sq, Sk)
    return None if form is None or form[0] else form[1]


@functools.lru_cache(maxsize=1 << 12)
def transposed_touched_tiles(pattern: FramesTransposed, Sq: int, Sk: int, block_m: int, block_n: int,
                             causal: bool) -> np.ndarray | None:
    """int64 (ceil(Sq / block_m),): key tiles each query block touches; None when the base is not
    bands only or T > block_n (read-only array: cached)."""
    frames = pattern.check_lengths(Sq, Sk)
    bands = base_bands(pattern, Sq, Sk)
    if bands is None or frames > block_n:
        return None
    S, F = Sq, pattern.frame
    nqb, nkb = math.ceil(S / block_m), math.ceil(S / block_n)
    x0 = np.arange(nqb)[:, None] * block_m
    x1 = np.minimum(x0 + block_m, S) - 1
    f = np.arange(frames)[None, :]
    pa = np.maximum(-((f - x0) // frames), 0)  # ceil((x0 - f) / T)
    pb = np.minimum((x1 - f) // frames, F - 1)
    rows = pa <= pb  # (nqb, T): the block has rows of frame f
    bands = np.array(bands, dtype=np.int64).reshape(-1, 2)  # (n, 2) inclusive offsets j - i
    if causal:  # row i keeps [i + a, min(i + b, i)]: nothing when a > 0
        bands = bands[bands[:, 0] <= 0]
        bands[:, 1] = np.minimum(bands[:, 1], 0)
    if not bands.size:
        return np.zeros(nqb, dtype=np.int64)
    lo = (f * F + pa)[..., None] + bands[:, 0]  # (nqb, T, n) natural keys of the block's frame-f rows
    hi = (f * F + pb)[..., None] + bands[:, 1]
    lo, hi = np.maximum(lo, 0), np.minimum(hi, S - 1)
    live = rows[..., None] & (lo <= hi)
    block, first, last = [], [], []
    for step in range(int(((hi - lo) // F).max(initial=0)) + 2):  # natural frames a run crosses
        piece = lo // F + step
        q0 = np.maximum(lo, piece * F) - piece * F
        q1 = np.minimum(hi, piece * F + F - 1) - piece * F
        ok = live & (q0 <= q1)
        block.append(np.broadcast_to(np.arange(nqb)[:, None, None], ok.shape)[ok])
        first.append((q0 * frames + piece)[ok] // block_n)
        last.append((q1 * frames + piece)[ok] // block_n)
    block, first, last = (np.concatenate(x) for x in (block, first, last))
    marks = np.bincount(block * (nkb + 1) + first, minlength=nqb * (nkb + 1))
    marks -= np.bincount(block * (nkb + 1) + last + 1, minlength=nqb * (nkb + 1))
    touched = (np.cumsum(marks.reshape(nqb, nkb + 1), axis=1)[:, :nkb] > 0).sum(axis=1).astype(np.int64)
    touched.setflags(write=False)
    return touched


def transposed_band_intervals(pattern: FramesTransposed, x: torch.Tensor, S: int,
                              causal: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """int64 (lo, hi) (rows, n): inclusive intervals of transposed keys whose union is what rows
    `x` of `pattern` keep (the causal rule in natural order, as FramesTransposed has it), sorted
    and disjoint (touching ones not joined; empty ones lo > hi); None when the base is not bands
    only (module docstring)."""
    ranges = _pattern_ranges(pattern, S, causal)
    if ranges is None:
        return None
    x = x.to(torch.int64)
    return _rows_intervals(x, x, *ranges, S // pattern.frame, S)


def transposed_block_intervals(pattern: FramesTransposed, x0: torch.Tensor, x1: torch.Tensor, S: int,
                               causal: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """int64 (lo, hi) (blocks, m): inclusive intervals of transposed keys whose union is what rows
    x0..x1 of each block keep together (they may overlap; empty ones lo > hi); None when the base
    is not bands only. A (d, k range) holding frame step 0 gives one interval a block, any other
    one a position of the block (module docstring)."""
    ranges = _pattern_ranges(pattern, S, causal)
    if ranges is None:
        return None
    d, k0, k1 = ranges
    frames = S // pattern.frame
    x0, x1 = x0.to(torch.int64)[:, None], x1.to(torch.int64)[:, None]
    spread = x1 // frames - x0 // frames
    p = x0 // frames + torch.arange(int(spread.max()) + 1 if spread.numel() else 1)  # (blocks, positions)
    first, last = torch.maximum(x0, p * frames), torch.minimum(x1, p * frames + frames - 1)  # past x1: first > last
    joined = (k0 <= 0) & (k1 >= 0)
    apart = _rows_intervals(first, last, d[~joined], k0[~joined], k1[~joined], frames, S)
    whole = _rows_intervals(x0, x1, d[joined], k0[joined], k1[joined], frames, S)
    return tuple(torch.cat([a.flatten(1), w.flatten(1)], dim=1) for a, w in zip(apart, whole))


def _rows_intervals(first: torch.Tensor, last: torch.Tensor, d: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor,
                    frames: int, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) (*first.shape, ranges): per (d, k range), one interval holding what rows
    first..last keep there, exact for the rows of one position or a range holding frame step 0
    (module docstring); lo > hi when they keep nothing (so when first > last). Row p * T + f keeps
    [q * T + f + k0, q * T + f + k1] clipped to the T frames, q = p + d, and nothing when q leaves
    [0, frame): a row with q < 0 ends below key 0 and one with q >= frame starts at S or later, so
    clipping the first row's start and the last row's end to [0, S) is exact (with step 0, the
    first row with q = 0 keeps key 0 and the last with q = frame - 1 keeps key S - 1)."""
    first_frame, last_frame = (first % frames)[..., None], (last % frames)[..., None]
    lo = first[..., None] - first_frame + d * frames + (first_frame + k0).clamp(min=0)
    hi = last[..., None] - last_frame + d * frames + (last_frame + k1).clamp(max=frames - 1)
    return lo.clamp(min=0), hi.clamp(max=S - 1)


def transposed_row_keys(pattern: FramesTransposed, S: int, causal: bool) -> torch.Tensor | None:
    """int64 (S,): how many keys each row of `pattern` keeps (causal rule included); None when the
    base is not bands only. Row p * T + f keeps min(f + k1, T - 1) - max(f + k0, 0) + 1 keys (when
    positive) of each (d, k range) with 0 <= p + d < frame, and the ranges are disjoint: per
    frame f, prefix sums over the ranges (ordered by d) give a row's total as one difference."""
    ranges = _pattern_ranges(pattern, S, causal)
    if ranges is None:
        return None
    d, k0, k1 = (r.numpy() for r in ranges)
    frames = S // pattern.frame
    f = np.arange(frames)[:, None]
    kept = np.clip(np.minimum(f + k1, frames - 1) - np.maximum(f + k0, 0) + 1, 0, None)  # (T, ranges)
    prefix = np.pad(kept.cumsum(axis=1), ((0, 0), (1, 0)))
    p, f = np.divmod(np.arange(S), frames)
    first, last = np.searchsorted(d, -p, side="left"), np.searchsorted(d, pattern.frame - 1 - p, side="right")
    return torch.from_numpy(prefix[f, last] - prefix[f, first])


@functools.lru_cache(maxsize=4)
def transposed_pieces(pattern: FramesTransposed, S: int, causal: bool,
                      max_pieces: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(lo, hi, groups): the native interval kernel's pieces of `pattern`, int32 (pieces, S), in
    the form of codegen.attention_cpu_native.interval_pieces (disjoint in every row, together what
    the row keeps, the causal rule in natural order included; each piece's ends never decrease from
    row to row; an empty piece's row has lo == hi + 1), and the groups the kernel runs them in
    (int64 (groups + 1,): group g is pieces groups[g] .. groups[g + 1] - 1); None when the base is
    not bands only or needs more than max_pieces pieces. Read-only arrays (cached: the last few,
    they are S wide).

    Each (d, k range) of the bands is one such piece in closed form: row x = p * T + f keeps
    [q * T + max(f + k0, 0), q * T + min(f + k1, T - 1)], q = p + d, which moves right with x (to
    the next position's block at p + 1), and nothing while q is outside [0, frame): the row's
    bounds then sit at 0 / -1 (q < 0) or S / S - 1 (q >= frame), in order with the rest. Ranges
    of consecutive d join into one piece where each reaches the end of its position's block
    (k1 >= T - 1) and the next starts at the beginning of its own (k0 <= 1 - T): together one
    interval a row. A temporal head's wide bands become a few pieces; the offsets that wrap into
    the neighbouring frame give one piece each, empty but in the rows of the first and last
    positions. Those single ranges at neighbouring d keep short runs a block apart: they make one
    group (the kernel computes a sub-tile's keys for all of them in one pass, under their mask,
    instead of a pass each over mostly the same keys); a joined piece is a group of its own."""
    ranges = _pattern_ranges(pattern, S, causal)
    if ranges is None:
        return None
    d, k0, k1 = (r.numpy() for r in ranges)
    frames = S // pattern.frame
    if not d.size:  # nothing kept: one empty piece
        lo, hi, groups = np.zeros((1, S), dtype=np.int64), np.full((1, S), -1, dtype=np.int64), np.array([0, 1])
    else:
        joins = (d[1:] == d[:-1] + 1) & (k1[:-1] >= frames - 1) & (k0[1:] <= 1 - frames)
        first = np.flatnonzero(np.concatenate([[True], ~joins]))
        if first.size > max_pieces:
            return None
        last = np.append(first[1:] - 1, d.size - 1)
        single = first == last
        together = single[1:] & single[:-1] & (d[first[1:]] - d[first[:-1]] <= 1)
        groups = np.append(np.flatnonzero(np.concatenate([[True], ~together])), first.size)
        p, f = np.divmod(np.arange(S, dtype=np.int64), frames)
        lo = (p + d[first, None]) * frames + np.clip(f + k0[first, None], 0, frames)
        hi = (p + d[last, None]) * frames + np.clip(f + k1[last, None], -1, frames - 1)
    arrays = tuple(np.ascontiguousarray(np.clip(x, low, S + low).astype(np.int32)) for x, low in ((lo, 0), (hi, -1)))
    arrays += (np.ascontiguousarray(groups, dtype=np.int64),)
    for array in arrays:
        array.setflags(write=False)
    return arrays


def _pattern_ranges(pattern: FramesTransposed, S: int, causal: bool) -> tuple[torch.Tensor, ...] | None:
    """_frame_ranges of the pattern's bands as int64 tensors (d, k0, k1); None when the base is not
    bands only."""
    frames = pattern.check_lengths(S, S)
    bands = base_bands(pattern, S, S)
    if bands is None:
        return None
    return tuple(torch.from_numpy(column) for column in _frame_ranges(bands, pattern.frame, frames, causal))


@functools.lru_cache(maxsize=1 << 10)
def _frame_ranges(bands: tuple[tuple[int, int], ...], frame: int, frames: int,
                  causal: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d, k0, k1): int64 arrays, one entry per natural offset d in (-frame, frame) and range of
    frame steps [k0, k1] the bands keep there (offsets k * frame + d), ranges merged over the bands
    (disjoint, apart), ordered by d then k. Frame steps are clamped to [-frames, frames]: no row
    reaches further."""
    bands = np.array(bands, dtype=np.int64).reshape(-1, 2)
    if causal:  # natural row i keeps no key past i: offsets <= 0
        bands = bands[bands[:, 0] <= 0]
        bands[:, 1] = np.minimum(bands[:, 1], 0)
    d = np.arange(-frame + 1, frame, dtype=np.int64)[:, None]
    k0 = -((d - bands[:, 0]) // frame)  # ceil((a - d) / frame)
    k1 = (bands[:, 1] - d) // frame
    live = k0 <= k1
    k0, k1 = np.clip(k0, -frames, frames), np.clip(k1, -frames, frames)
    # Merge each d's ranges over the bands (few bands: sort them by k0 along the row).
    order = np.argsort(np.where(live, k0, frames + 1), axis=1, kind="stable")
    k0, k1, live = (np.take_along_axis(a, order, axis=1) for a in (k0, k1, live))
    reach = np.maximum.accumulate(np.where(live, k1, -frames - 2), axis=1)
    before = np.pad(reach[:, :-1], ((0, 0), (1, 0)), constant_values=-frames - 3)
    starts = live & (k0 > before + 1)
    ends = np.pad(starts[:, 1:] | ~live[:, 1:], ((0, 0), (0, 1)), constant_values=True) & live
    start_k = np.maximum.accumulate(np.where(starts, k0, -frames - 2), axis=1)
    rows, cols = np.nonzero(ends)
    return (np.ascontiguousarray(np.broadcast_to(d, ends.shape)[rows, cols]), start_k[rows, cols].copy(),
            reach[rows, cols].copy())
