"""The CPU executor's native kernels: patterns that keep a few key intervals per row,
block-sparse layouts and vertical-slash.

Windows, bands, diagonals, sinks and column runs (and unions and causal cuts of them) keep, in
every row, a few intervals of keys whose ends never move left from one row to the next. For
those, codegen/native/interval_attention.cpp (built by codegen.native_build) runs flash attention
over exactly each query tile's keys: a tile of NATIVE_BLOCK_M rows computes the keys all its
rows keep unmasked (BLAS GEMMs of the tile's full height, the shape torch's fused kernel only
reaches on calls of 768+ rows), and the band edges per sub-tile of NATIVE_SUB_M rows under the
element mask. torch's kernel, called per query block, pays both ways: a short block runs at a
fraction of its speed, a tall one reads block_m - 1 keys a row beyond the band. At S = 4096, 8
heads, a 25% window runs ~3x faster than dense SDPA here against ~2.2x through SDPA calls.

A BlockSparse layout runs on the same file's block-runs kernel: a query tile per layout row (its
block height), its kept key blocks joined into runs, all computed unmasked but where the causal
limit cuts them. A VerticalSlash runs on its column-slash kernel: its columns gathered once and
computed as one interval piece over them, its slashes SLASH_LANES rows at a time (those rows'
keys on a slash are consecutive rows of K and V: one vector of scores, the softmax on all rows at
once).

Patterns of columns and bands in more pieces than the interval kernel takes (a video model's
temporal head: diagonals at every frame stride; columns in many runs) run on the column-slash
kernel as the VerticalSlash that keeps the same keys (slash_form). In frame-transposed order
(FramesTransposed, codegen.frame_order) a temporal head's bands are a few wide pieces, plus one
piece for each offset that wraps into the neighbouring frame, empty but in the first and last
positions' rows (codegen.frame_coverage.transposed_pieces): the interval kernel runs those too.

Native(pattern) is choose_split's option for any of them (native_form says which, or None).
interval_pieces(), block_runs() and column_slashes() build the kernels' operands; native_counts() is the work a
kernel does, in the cost model's terms (codegen.attention_cpu_choice prices it against the SDPA
plans with the same model and runs the cheaper); run_native() calls the kernel.
"""
from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from sparsec.codegen.block_coverage import _interval_form
from sparsec.codegen.frame_coverage import transposed_pieces
from sparsec.codegen.frame_order import FramesTransposed
from sparsec.codegen.native_build import native_entry
from sparsec.patterns import BlockSparse, Pattern, Skip, VerticalSlash

__all__ = ["NATIVE_BLOCK_M", "NATIVE_BLOCK_N", "NATIVE_SUB_M", "Native", "NativeCounts", "Pieces", "SLASH_LANES",
           "block_runs", "interval_pieces", "native_block_m", "native_counts", "native_form", "native_kernel",
           "run_native", "slash_form"]

NATIVE_BLOCK_M = 256  # query rows a tile computes its common keys for
NATIVE_SUB_M = 32     # query rows a tile's band edges are computed for at a time
NATIVE_BLOCK_N = 512  # keys a GEMM reads at a time
SLASH_LANES = 16      # rows the column-slash kernel computes a slash for at a time (its vector width)
# More pieces than this and the tiles' per-piece edges cost more than gathering: not offered (a
# pattern of columns and bands runs on the column-slash kernel instead, up to _MAX_SLASHES offsets).
_MAX_PIECES = 8
_MAX_SLASHES = 2048
# A temporal head in frame-transposed order: its pieces but a few are the offsets that wrap into the
# next frame, grouped (interval_pieces); measured at S = 16K and 32K, 10%: 135 and 193 pieces, 1.35x
# faster than torch's kernel in that order. The arrays are S wide: 512 pieces at S = 32K hold 128 MB.
_MAX_TRANSPOSED_PIECES = 512
_LIBRARY = "interval_attention"


@dataclass(frozen=True, slots=True)
class Native:
    """choose_split's option "run `pattern` on a native kernel" (one part)."""

    pattern: Pattern

    def __repr__(self) -> str:
        return f"Native({self.pattern!r})"


_POINTER, _I64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {  # the entry points of interval_attention.cpp: (q, k, v, out, B, Hq, Hkv, Sq, Sk, D, Dv, heads, ...)
    "sparsec_interval_attention": [_POINTER] * 4 + [_I64] * 7 + [_POINTER, _I64, _POINTER, _POINTER, _I64, _POINTER,
                                                                 _I64, ctypes.c_float, ctypes.c_float, _POINTER]
                                  + [_I64] * 4,
    "sparsec_block_runs_attention": [_POINTER] * 4 + [_I64] * 7 + [_POINTER, _I64] + [_POINTER] * 4
                                    + [ctypes.c_float, ctypes.c_float, _POINTER] + [_I64] * 3,  # scale, softcap, sinks
    "sparsec_column_slash_attention": [_POINTER] * 4 + [_I64] * 7 + [_POINTER, _I64, _POINTER, _POINTER, _I64]
                                      + [_POINTER] * 3 + [_I64, _POINTER, ctypes.c_float, ctypes.c_float, _POINTER]
                                      + [_I64] * 4,
}


def native_kernel(name: str = "sparsec_interval_attention"):
    """The kernel entry point `name` (ctypes), or None where the library cannot be built
    (codegen.native_build)."""
    return native_entry(_LIBRARY, name, _SIGNATURES[name])


def native_form(pattern: Pattern, Sq: int, Sk: int, causal: bool) -> str | None:
    """"intervals", "blocks" (a BlockSparse), "slashes" (a VerticalSlash, or columns and bands in
    more pieces than the interval kernel takes: slash_form) or None: which native kernel can run
    `pattern`."""
    if isinstance(pattern, BlockSparse):
        return "blocks"
    if isinstance(pattern, Skip):
        return None
    if isinstance(pattern, VerticalSlash):
        return "slashes"
    if interval_pieces(pattern, Sq, Sk, causal) is not None:
        return "intervals"
    return "slashes" if slash_form(pattern, Sq, Sk) is not None else None


@functools.lru_cache(maxsize=1024)
def slash_form(pattern: Pattern, Sq: int, Sk: int) -> VerticalSlash | None:
    """`pattern` as a VerticalSlash that keeps the same keys at Sq x Sk: its columns, and each of
    its bands offset by offset (a temporal head's many frame diagonals, columns in many runs).
    None for a pattern that is not made of columns and bands, or whose bands hold more than
    _MAX_SLASHES offsets."""
    if isinstance(pattern, VerticalSlash):
        return pattern
    form = _interval_form(pattern, Sq, Sk)
    if form is None:
        return None
    columns, bands = form
    if sum(b + 1 - a for a, b in bands) > _MAX_SLASHES or not (columns or bands):
        return None
    return VerticalSlash([(lo, hi + 1) for lo, hi in columns], [o for a, b in bands for o in range(a, b + 1)])


def native_block_m(pattern: Pattern, Sq: int) -> int:
    """The kernel's query tile height: a BlockSparse's block height, else NATIVE_BLOCK_M (or Sq
    rounded up to sub-tiles)."""
    if isinstance(pattern, BlockSparse):
        return pattern.block[0]
    return min(NATIVE_BLOCK_M, math.ceil(Sq / NATIVE_SUB_M) * NATIVE_SUB_M)


def _row_limits(Sq: int, Sk: int, causal: bool) -> np.ndarray:
    """Each row's last key allowed by the causal rule (Sk - 1 without it), int64 (may be < 0)."""
    rows = np.arange(Sq, dtype=np.int64)
    return np.minimum(rows + (Sk - Sq), Sk - 1) if causal else np.full(Sq, Sk - 1, dtype=np.int64)


@functools.lru_cache(maxsize=1024)
def block_runs(pattern: BlockSparse, Sq: int, Sk: int, causal: bool):
    """(run_ptr int64 (tiles + 1), run_lo, run_hi int32 (runs)): the runs of consecutive kept key
    blocks of each layout row (query tile), in keys (inclusive, clipped to Sk and to the tile's
    last row's causal limit; runs past it dropped). Read-only (cached)."""
    bq, bk = pattern.block
    layout = pattern.layout.numpy()
    if layout.shape != (math.ceil(Sq / bq), math.ceil(Sk / bk)):
        raise ValueError(f"BlockSparse layout {tuple(layout.shape)} does not fit Sq={Sq}, Sk={Sk} at blocks {bq}x{bk}")
    edges = np.diff(np.pad(layout.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    tile, first = np.nonzero(edges == 1)   # runs start where a kept block follows a dropped one
    _, past = np.nonzero(edges == -1)      # and end before a dropped block (row-major: same order)
    lo, hi = first * bk, np.minimum(past * bk, Sk) - 1
    last_row = np.minimum((tile + 1) * bq, Sq) - 1
    hi = np.minimum(hi, _row_limits(Sq, Sk, causal)[last_row])
    live = hi >= lo
    tile, lo, hi = tile[live], lo[live], hi[live]
    run_ptr = np.zeros(layout.shape[0] + 1, dtype=np.int64)
    np.add.at(run_ptr, tile + 1, 1)
    arrays = (np.cumsum(run_ptr), lo.astype(np.int32), hi.astype(np.int32))
    for array in arrays:
        array.setflags(write=False)
    return arrays


class Pieces(NamedTuple):
    """The interval kernel's operands: row i keeps keys lo[p, i] .. hi[p, i] (int32 (pieces, Sq))
    of each piece p; the pieces run in groups (int64 (groups + 1,): group g is pieces groups[g] ..
    groups[g + 1] - 1; a group of one piece runs as its tiles, a larger one in one pass over the
    keys its pieces keep in each sub-tile)."""

    lo: np.ndarray
    hi: np.ndarray
    groups: np.ndarray


def interval_pieces(pattern: Pattern, Sq: int, Sk: int, causal: bool) -> Pieces | None:
    """The pattern's Pieces: disjoint in every row, together exactly what `pattern` (and the causal
    rule) keeps; each piece's lo and hi never decrease from row to row, lo in [0, Sk], hi in
    [-1, Sk - 1], an empty piece's row has lo == hi + 1. None when the pattern is not made of
    columns and bands (BlockSparse) or needs more than _MAX_PIECES pieces. A FramesTransposed of
    bands has its pieces in transposed order (codegen.frame_coverage.transposed_pieces, up to
    _MAX_TRANSPOSED_PIECES: most of them are empty but near the first and last positions, where
    a tile's loop passes them at no cost; those run in groups). Read-only arrays (cached)."""
    if isinstance(pattern, FramesTransposed):
        if Sq != Sk or Sq % pattern.frame:
            return None
        found = transposed_pieces(pattern, Sq, causal, _MAX_TRANSPOSED_PIECES)
        return None if found is None else Pieces(*found)
    return _natural_pieces(pattern, Sq, Sk, causal)


@functools.lru_cache(maxsize=1024)
def _natural_pieces(pattern: Pattern, Sq: int, Sk: int, causal: bool) -> Pieces | None:
    form = _interval_form(pattern, Sq, Sk)
    if form is None:
        return None
    columns, bands = form
    rows = np.arange(Sq, dtype=np.int64)
    limit = _row_limits(Sq, Sk, causal)
    raw = ([(np.full(Sq, c0, dtype=np.int64), np.full(Sq, c1, dtype=np.int64)) for c0, c1 in columns]
           + [(rows + a, rows + b) for a, b in bands])
    pieces: list[tuple[np.ndarray, np.ndarray]] = []
    for lo, hi in raw:
        lo = np.clip(lo, 0, Sk)
        hi = np.maximum(np.clip(np.minimum(hi, limit), -1, Sk - 1), lo - 1)
        parts = [(lo, hi)]
        for q_lo, q_hi in pieces:  # less every earlier piece: what is left and right of it
            parts = [cut for x_lo, x_hi in parts for cut in
                     ((x_lo, np.maximum(np.minimum(x_hi, q_lo - 1), x_lo - 1)),
                      (np.minimum(np.maximum(x_lo, q_hi + 1), x_hi + 1), x_hi))]
            parts = [(a, b) for a, b in parts if (a <= b).any()]
        pieces += parts
        if len(pieces) > _MAX_PIECES:
            return None
    if not pieces:
        pieces = [(np.zeros(Sq, dtype=np.int64), np.full(Sq, -1, dtype=np.int64))]
    lo, hi = (np.ascontiguousarray(np.stack(ends).astype(np.int32)) for ends in zip(*pieces))
    groups = np.arange(lo.shape[0] + 1, dtype=np.int64)  # a group a piece
    for array in (lo, hi, groups):
        array.setflags(write=False)
    return Pieces(lo, hi, groups)


class NativeCounts(NamedTuple):
    """The work of a native kernel on one head, float64 per query tile of native_block_m rows,
    following the kernel's loops (interval_attention.cpp)."""

    pairs: np.ndarray             # (query, key) pairs computed
    masked: np.ndarray            # of which under the element mask
    rows: np.ndarray              # the tile's query rows
    fetched: np.ndarray | None    # the lanes of a vertical-slash's slashes (not in pairs); None: no slashes
    distinct: np.ndarray | None = None  # the K / V rows those lanes read, each once a group of rows


def native_counts(pattern: Pattern, Sq: int, Sk: int, causal: bool) -> NativeCounts:
    """The native kernel's work for one head of `pattern` (NativeCounts). Needs native_form."""
    if isinstance(pattern, BlockSparse):
        return _block_counts(pattern, Sq, Sk, causal)
    if native_form(pattern, Sq, Sk, causal) == "slashes":
        return _slash_counts(slash_form(pattern, Sq, Sk), Sq, Sk, causal)
    return _pieces_counts(interval_pieces(pattern, Sq, Sk, causal), Sq, native_block_m(pattern, Sq))


@functools.lru_cache(maxsize=256)
def column_slashes(pattern: VerticalSlash, Sq: int, Sk: int, causal: bool):
    """(columns int64, count int32 (Sq), offsets int32, row_hi int32 (Sq), skip uint8 (Sk + 2 *
    SLASH_LANES)): the column keys (sorted), how many of them each row's causal limit allows, the
    slash offsets that reach some key (sorted), each row's limit, and the keys the slashes pass
    over: key j at j + SLASH_LANES, 1 for a column (read with the columns) and for the padding.
    Read-only (cached)."""
    columns = np.unique(np.concatenate([np.arange(a, min(b, Sk)) for a, b in pattern.columns] + [np.zeros(0, int)]))
    limit = _row_limits(Sq, Sk, causal)
    count = np.searchsorted(columns, limit, side="right").astype(np.int32)
    offsets = np.array([o for o in pattern.offsets if -Sq < o < Sk], dtype=np.int32)
    skip = np.ones(Sk + 2 * SLASH_LANES, dtype=np.uint8)
    skip[SLASH_LANES:SLASH_LANES + Sk] = 0
    skip[columns + SLASH_LANES] = 1
    arrays = (columns.astype(np.int64), count, offsets, limit.clip(min=-1).astype(np.int32), skip)
    for array in arrays:
        array.setflags(write=False)
    return arrays


def _slash_counts(pattern: VerticalSlash, Sq: int, Sk: int, causal: bool):
    """The column-slash kernel's counts: its columns as one interval piece over them (pairs,
    masked, rows); `fetched`: SLASH_LANES lanes for every group of SLASH_LANES rows and slash it
    computes (those where some row of the group keeps the slash's key and it is no column); and
    `distinct`: the K / V rows those lanes read, each once a group (slashes closer than
    SLASH_LANES apart read some of the same rows: a temporal head's neighbouring diagonals)."""
    columns, count, offsets, row_hi, skip = column_slashes(pattern, Sq, Sk, causal)
    T = native_block_m(pattern, Sq)
    count = count.astype(np.int64)
    pairs, masked, rows = _interval_counts(np.zeros((1, Sq), dtype=np.int64), count[None] - 1, Sq, T)[:3]
    L = SLASH_LANES
    groups = math.ceil(Sq / L)
    rows_index = np.arange(groups * L, dtype=np.int64)
    limit = np.pad(row_hi.astype(np.int64), (0, groups * L - Sq), constant_values=-1)
    flags = []  # (groups, offsets): the group computes the slash
    for chunk in range(0, offsets.size, 256):  # (rows, offsets) flags a chunk at a time
        j = rows_index[:, None] + offsets[None, chunk:chunk + 256]
        keep = (j <= limit[:, None]) & (skip[np.clip(j + L, 0, Sk + 2 * L - 1)] == 0)
        flags.append(keep.reshape(groups, L, -1).any(1))
    visited = np.concatenate(flags, axis=1) if flags else np.zeros((groups, 0), dtype=bool)
    # a computed slash's rows not read again by the next computed slash of the group (sorted offsets)
    far = int(offsets.max(initial=0)) + L  # past every slash's rows
    starts = np.where(visited, offsets[None].astype(np.int64), far)
    after = np.minimum.accumulate(starts[:, ::-1], axis=1)[:, ::-1]
    after = np.concatenate([after[:, 1:], np.full((groups, 1), far)], axis=1)
    new_rows = np.where(visited, np.minimum(L, after - offsets[None]), 0)
    group_tile = (np.arange(groups) * L) // T
    fetched = np.bincount(group_tile, weights=visited.sum(1) * float(L), minlength=pairs.shape[0])
    distinct = np.bincount(group_tile, weights=new_rows.sum(1).astype(np.float64), minlength=pairs.shape[0])
    return NativeCounts(pairs, masked, rows, fetched, distinct)


def _block_counts(pattern: BlockSparse, Sq: int, Sk: int, causal: bool):
    run_ptr, lo, hi = (a.astype(np.int64) for a in block_runs(pattern, Sq, Sk, causal))
    T, n = pattern.block[0], NATIVE_BLOCK_N
    tiles = run_ptr.shape[0] - 1
    tile = np.repeat(np.arange(tiles), np.diff(run_ptr))
    rows = np.minimum(T, Sq - np.arange(tiles) * T)
    first_limit = _row_limits(Sq, Sk, causal)[tile * T]
    keys = hi + 1 - lo
    before = first_limit + 1 - lo  # keys of the run up to the tile's first row's limit
    masked_from = np.where(before > 0, lo + n * (np.maximum(before, 0) // n), lo)  # first masked chunk
    masked = np.where(hi > first_limit, hi + 1 - np.minimum(masked_from, hi + 1), 0)
    per_tile = lambda x: np.bincount(tile, weights=x, minlength=tiles)  # noqa: E731
    computed = rows * (np.diff(run_ptr) > 0)  # a tile without runs only writes its zero rows
    return NativeCounts(per_tile(keys * rows[tile]), per_tile(masked * rows[tile]), computed.astype(np.float64), None)


def _pieces_counts(pieces: Pieces, Sq: int, T: int) -> NativeCounts:
    """native_counts of Pieces at tiles of T rows: its groups of one piece by their tiles
    (_interval_counts), the others by _group_counts."""
    sizes = np.diff(pieces.groups)
    alone = pieces.groups[:-1][sizes == 1]
    if alone.size:
        counts = _interval_counts(pieces.lo[alone], pieces.hi[alone], Sq, T)
    else:  # the rows' counts of one empty piece
        counts = _interval_counts(np.zeros((1, Sq), dtype=np.int64), np.full((1, Sq), -1, dtype=np.int64), Sq, T)
    pairs, masked = counts.pairs.copy(), counts.masked.copy()
    for g in np.flatnonzero(sizes > 1):
        group = slice(pieces.groups[g], pieces.groups[g + 1])
        group_pairs = _group_counts(pieces.lo[group], pieces.hi[group], Sq, T)
        pairs += group_pairs
        masked += group_pairs
    return counts._replace(pairs=pairs, masked=masked)


def _group_counts(lo: np.ndarray, hi: np.ndarray, Sq: int, T: int) -> np.ndarray:
    """Pairs (all masked) per tile of T rows of a group of pieces (m, Sq): each sub-tile computes
    its real rows against every key from the first any of them keeps in any piece to the last."""
    t = NATIVE_SUB_M
    tiles = math.ceil(Sq / T)
    subs = math.ceil(T / t)
    pad = tiles * subs * t - Sq
    real = np.arange(tiles * subs * t).reshape(tiles, subs, t) < Sq
    lo = np.pad(lo.astype(np.int64), ((0, 0), (0, pad))).reshape(-1, tiles, subs, t)
    hi = np.pad(hi.astype(np.int64), ((0, 0), (0, pad)), constant_values=-1).reshape(-1, tiles, subs, t)
    kept = (hi >= lo) & real
    first = np.where(kept, lo, np.iinfo(np.int64).max).min(axis=(0, 3))
    last = np.where(kept, hi, -1).max(axis=(0, 3))
    width = np.where(last >= 0, last + 1 - first, 0)
    return (width * real.sum(-1)).sum(-1).astype(np.float64)


def _interval_counts(lo: np.ndarray, hi: np.ndarray, Sq: int, T: int) -> NativeCounts:
    """native_counts of pieces (lo, hi) (interval_pieces' form) at tiles of T rows."""
    t = NATIVE_SUB_M
    tiles = math.ceil(Sq / T)
    pad = tiles * T - Sq
    lo = np.pad(lo.astype(np.int64), ((0, 0), (0, pad)), mode="edge").reshape(lo.shape[0], tiles, T)
    hi = np.pad(hi.astype(np.int64), ((0, 0), (0, pad)), mode="edge").reshape(hi.shape[0], tiles, T)
    real = np.minimum(T, Sq - np.arange(tiles) * T)  # rows of each tile
    last = real - 1
    mid0 = np.take_along_axis(lo, np.broadcast_to(last[None, :, None], (lo.shape[0], tiles, 1)), 2)[..., 0]
    mid1 = hi[..., 0] + 1
    middle = mid1 - mid0 >= t
    sub = np.arange(0, T, t)
    n = np.clip(real[:, None] - sub[None, :], 0, t)  # real rows of each sub-tile
    s_lo, s_hi = lo[..., sub], np.take_along_axis(hi, np.minimum(sub + n - 1, T - 1)[None].clip(min=0), 2)
    # Sub-tiles outside a middle run from their first to their last kept key (ends are monotone).
    kept = hi >= lo
    first = _first_true(kept.reshape(*kept.shape[:2], -1, t), n)
    last_kept = _last_true(kept.reshape(*kept.shape[:2], -1, t), n)
    e_lo = np.take_along_axis(lo.reshape(*lo.shape[:2], -1, t), first[..., None], 3)[..., 0]
    e_hi = np.take_along_axis(hi.reshape(*hi.shape[:2], -1, t), last_kept[..., None], 3)[..., 0]
    any_kept = (kept.reshape(*kept.shape[:2], -1, t) & (np.arange(t) < n[..., None])).any(-1)
    whole = np.where(any_kept, np.maximum(e_hi + 1 - e_lo, 0), 0)
    left, right = np.maximum(mid0[..., None] - s_lo, 0), np.maximum(s_hi + 1 - mid1[..., None], 0)
    masked = (n * np.where(middle[..., None], left + right, whole)).sum(-1)
    unmasked = np.where(middle, real * (mid1 - mid0), 0)
    return NativeCounts((masked + unmasked).sum(0).astype(np.float64), masked.sum(0).astype(np.float64),
                        real.astype(np.float64), None)


def _first_true(flags: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Index of the first true among the first n of the last axis (0 when none)."""
    live = flags & (np.arange(flags.shape[-1]) < n[..., None])
    return np.argmax(live, axis=-1)


def _last_true(flags: np.ndarray, n: np.ndarray) -> np.ndarray:
    live = flags & (np.arange(flags.shape[-1]) < n[..., None])
    return flags.shape[-1] - 1 - np.argmax(live[..., ::-1], axis=-1)


def run_native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, q_heads: list[int],
               pattern: Pattern, causal: bool, scale: float, threads: int, softcap: float = 0.0,
               sinks: torch.Tensor | None = None) -> None:
    """Writes heads q_heads of out (B, Hq, Sq, Dv) with `pattern` (native_form not None): q, k, v
    and out contiguous float32 (B, H, S, D); K/V head of query head h: h // (Hq // Hkv). For a
    FramesTransposed pattern, rows in its order (q, k, v, out: codegen.frame_order). softcap > 0
    caps every score s (scale q.k) to softcap * tanh(s / softcap) before the mask and softmax
    (Gemma 2's logit soft-capping); 0: no capping. sinks (Hq,) (GPT-OSS's attention sinks; None:
    none): query head h's rows take one more softmax logit sinks[h] that has no value, out_i =
    sum_j exp(s_ij) v_j / (sum_j exp(s_ij) + exp(sinks[h])) over the keys row i keeps (capping
    never applies to it); -inf is no sink for that head, +inf or NaN is refused."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    heads = torch.tensor(q_heads, dtype=torch.int32)
    if sinks is not None:
        if tuple(sinks.shape) != (Hq,):
            raise ValueError(f"attention sinks of shape {tuple(sinks.shape)}: expected one per query head ({Hq},)")
        sinks = sinks.detach().to(device="cpu", dtype=torch.float32).contiguous()  # alive until the call returns
    sinks_ptr = None if sinks is None else sinks.data_ptr()  # None: a null pointer (no sinks)
    shapes = (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), B, Hq, Hkv, Sq, Sk, D, Dv,
              heads.data_ptr(), len(q_heads))
    if isinstance(pattern, BlockSparse):
        run_ptr, lo, hi = block_runs(pattern, Sq, Sk, causal)
        row_hi = _row_limits(Sq, Sk, causal).clip(min=-1).astype(np.int32)
        status = native_kernel("sparsec_block_runs_attention")(
            *shapes, run_ptr.ctypes.data, lo.ctypes.data, hi.ctypes.data, row_hi.ctypes.data, scale, softcap,
            sinks_ptr, pattern.block[0], NATIVE_BLOCK_N, threads)
        detail = f"{lo.shape[0]} runs"
    elif native_form(pattern, Sq, Sk, causal) == "slashes":
        columns, count, offsets, row_hi, skip = column_slashes(slash_form(pattern, Sq, Sk), Sq, Sk, causal)
        index = torch.tensor(columns)
        kc, vc = (x.index_select(2, index).contiguous() if columns.size else x for x in (k, v))
        status = native_kernel("sparsec_column_slash_attention")(
            *shapes, kc.data_ptr(), vc.data_ptr(), columns.size, count.ctypes.data, skip.ctypes.data,
            offsets.ctypes.data, offsets.size, row_hi.ctypes.data, scale, softcap, sinks_ptr,
            native_block_m(pattern, Sq), NATIVE_SUB_M, NATIVE_BLOCK_N, threads)
        detail = f"{columns.size} columns, {offsets.size} slashes"
    else:
        lo, hi, groups = interval_pieces(pattern, Sq, Sk, causal)
        status = native_kernel()(*shapes, lo.ctypes.data, hi.ctypes.data, lo.shape[0], groups.ctypes.data,
                                 groups.shape[0] - 1, scale, softcap, sinks_ptr, native_block_m(pattern, Sq),
                                 NATIVE_SUB_M, NATIVE_BLOCK_N, threads)
        detail = f"{lo.shape[0]} pieces in {groups.shape[0] - 1} groups"
    if status != 0:
        raise RuntimeError(f"sparsec's native attention kernel refused its arguments (q {tuple(q.shape)}, "
                           f"k {tuple(k.shape)}, {detail}, softcap {softcap}"
                           + ("" if sinks is None else f", sinks {sinks.tolist()}") + ")")
