"""Key blocks a FramesTransposed pattern of bands touches, per query block, in closed form.

block_coverage computes a renumbered pattern's tiles from every row's intervals, which are built
key by key (~0.2 s a pattern at S = 16K): right for the block tables of a launch, too slow for the
cost model, which prices every head of a layer in both orders. This counts the touched tiles from
the bands alone. In transposed order a query block's rows of frame f are the natural rows
f * frame + [pa, pb], consecutive; a band (offsets j - i in [a, b]) keeps for them the natural keys
[f * frame + pa + a, f * frame + pb + b] (the causal rule ends it at the last row), one run. Cut at
natural frame boundaries, each piece is positions q in [q0, q1] of one frame f', which sit at
q * T + f' in transposed order: every key tile between the first and the last is touched, since
they lie T <= BLOCK_N apart. The union over frames and bands of those tile ranges is exact.

A tile is counted partial, never full (whole tiles are rare in this order: a row's keys stop at
frame edges); the launch's block tables still come from the exact coverage. For T > BLOCK_N the
pieces skip tiles and this returns None.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from sparsec.codegen.frame_order import FramesTransposed

__all__ = ["base_bands", "transposed_touched_tiles"]


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
