"""What the CPU attention executor reads per query block, for the cost model, without planning.

The executor (codegen/attention_cpu.py) runs each query block of block_m rows on the union of its
rows' key intervals, at key granularity, and groups blocks into SDPA calls. Its plan is exact but
costs tens of milliseconds a pattern (it compares every block's mask); the search prices hundreds
of candidates a layer. `cpu_block_reads` gives the same quantities from the per-row intervals
alone, by one sort per block:

  keys      keys the block's call reads: the union of its rows' intervals, grown to its bucket's
            key count when the block joins a bucket (see below);
  masked    1 where the call applies an element mask to the block (some real row keeps fewer
            keys than the block reads);
  gathered  keys copied for the block: its union when it is not one run and not the same keys as
            the block before (blocks reading the same keys share one copy; one-run blocks are
            strided views);
  calls     SDPA calls of the plan, as the executor groups blocks: unmasked blocks of one key
            count share a call, masked ones when at least _MIN_SHARED of them have that count
            (bands: their masks are the same shifted); the rest form the executor's buckets.

Dense heads without a causal offset are one direct SDPA call (`direct`): the executor does not
plan them. Counts are per query block of one head; the cost model multiplies by heads and batch.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sparsec.codegen.attention_cpu_plan import _MIN_SHARED, _buckets
from sparsec.codegen.block_coverage import (_block_runs, _ends, _interval_form, _maximal_runs, layout_tensor,
                                            row_intervals)
from sparsec.codegen.frame_coverage import transposed_block_intervals, transposed_row_keys
from sparsec.codegen.frame_order import FramesTransposed
from sparsec.patterns import BlockSparse, Dense, Pattern, Skip

__all__ = ["BlockReads", "BlockUnions", "block_reads", "cpu_block_reads", "query_block_unions"]

# Rows sorted at once: bounds the (rows, intervals) work arrays at long sequences.
_ROW_CHUNK = 1 << 14
# Odd multipliers of the block signature (a sum over the block's runs of a hash of each run's
# ends, splitmix64's constants as int64): blocks with equal signatures read the same keys.
_HASH_A, _HASH_B = 0x9E3779B97F4A7C15 - (1 << 64), 0x632BE59BD9B4E019
_HASH_C, _HASH_D = 0xBF58476D1CE4E5B9 - (1 << 64), 0x94D049BB133111EB - (1 << 64)


@dataclass(frozen=True, slots=True)
class BlockReads:
    """Per query block of one head (float64 numpy arrays, (nqb,)), and per head the plan's calls."""

    keys: np.ndarray
    masked: np.ndarray
    gathered: np.ndarray
    calls: int
    # Query rows of the call that runs the block: blocks reading the same keys fold into one long
    # query sequence (the kernel's speed depends on it); a direct call runs every row.
    call_rows: np.ndarray
    direct: bool = False  # one direct SDPA call over the whole sequence (dense heads)


def cpu_block_reads(pattern: Pattern, Sq: int, Sk: int, block_m: int, causal: bool) -> BlockReads:
    """What the executor reads for `pattern` with query blocks of block_m rows (module docstring)."""
    nqb = math.ceil(Sq / block_m)
    if isinstance(pattern, Skip):
        zeros = np.zeros(nqb)
        return BlockReads(zeros, zeros, zeros, 0, zeros)
    if isinstance(pattern, Dense) and (not causal or Sq == Sk):
        return _direct(Sq, Sk, block_m, causal)
    return block_reads(query_block_unions(pattern, Sq, Sk, block_m, causal), Sk, block_m)


def block_reads(unions: BlockUnions, Sk: int, block_m: int) -> BlockReads:
    """cpu_block_reads of a pattern (neither Skip nor a direct Dense) from its query_block_unions
    at block_m."""
    keys, signature = unions.keys, unions.signature
    same_as_before = np.concatenate([[False], signature[1:] == signature[:-1]])
    gathered = np.where((unions.runs > 1) & ~same_as_before, keys, 0).astype(np.float64)
    keys, masked, gathered, calls, folded = _grouped(keys, unions.masked, gathered, signature, Sk, unions.masks_shift)
    return BlockReads(keys, masked, gathered, calls, (folded * block_m).astype(np.float64))


@dataclass(frozen=True, slots=True)
class BlockUnions:
    """Per query block (numpy (nqb,)): the union of its rows' kept keys (causal rule applied) as
    a key count, its maximal runs (touching keys join), whether some real row keeps fewer keys
    than the union (the executor masks the block), and a signature (blocks with equal unions have
    equal signatures; different unions collide with probability ~2^-64)."""

    keys: np.ndarray       # int64
    runs: np.ndarray       # int64
    masked: np.ndarray     # bool
    signature: np.ndarray  # int64
    # Bands and columns (no BlockSparse part): masks move with the block, so blocks reading as
    # many keys mostly share one mask; a block layout's masks differ from block to block.
    masks_shift: bool


@functools.lru_cache(maxsize=4096)
def query_block_unions(pattern: Pattern, Sq: int, Sk: int, block_m: int, causal: bool) -> BlockUnions:
    """BlockUnions of `pattern` for query blocks of block_m rows: in closed form from the
    pattern's bands and columns (block_coverage's interval form), O(blocks x parts), for a lone
    BlockSparse from its layout rows, or for bands in frame-transposed order
    (codegen.frame_coverage); from every row's intervals for unions with a BlockSparse part and
    other renumbered patterns. Cached (read-only arrays): the block size choice, the split choice
    (at every thread count and head count) and the cost model ask for the same unions; tuning a
    2048-token layer asked ~2x over."""
    form = _interval_form(pattern, Sq, Sk)
    if form is not None:
        unions = BlockUnions(*_block_unions(*form, Sq, Sk, block_m, causal), masks_shift=True)
    elif isinstance(pattern, BlockSparse):
        unions = BlockUnions(*_layout_block_unions(pattern, Sq, Sk, block_m, causal), masks_shift=False)
    elif isinstance(pattern, FramesTransposed) and (
            found := _transposed_block_unions(pattern, Sq, block_m, causal)) is not None:
        unions = BlockUnions(*found, masks_shift=False)
    else:
        unions = BlockUnions(*_block_unions_by_rows(pattern, Sq, Sk, block_m, causal), masks_shift=False)
    for array in (unions.keys, unions.runs, unions.masked, unions.signature):
        array.setflags(write=False)
    return unions


def _direct(Sq: int, Sk: int, block_m: int, causal: bool) -> BlockReads:
    """SDPA on the whole sequence: every key, or (causal, Sq == Sk) the keys up to each block's last row."""
    last_row = np.minimum(np.arange(1, math.ceil(Sq / block_m) + 1) * block_m, Sq)
    keys = (np.minimum(last_row, Sk) if causal else np.full(last_row.shape, Sk)).astype(np.float64)
    zeros = np.zeros_like(keys)
    return BlockReads(keys, zeros, zeros, 1, np.full(keys.shape, float(Sq)), direct=True)


def _block_unions(columns, bands, Sq: int, Sk: int, block_m: int, causal: bool):
    """Per query block of a pattern with merged `columns` and `bands` (block_coverage's interval
    form): keys in its rows' union, the union's runs, whether some real row keeps fewer keys than
    that (masked), and a signature of the union (equal unions, equal signatures). The per-part
    test of "every row keeps it" is exact for one part and conservative for several."""
    r0 = torch.arange(0, Sq, block_m, dtype=torch.int64)[:, None]
    r1 = (r0 + block_m).clamp(max=Sq) - 1
    shift = Sk - Sq if causal else Sk  # row r keeps no key past r + shift
    c_lo, c_hi = (t[None] for t in _ends(columns)) if columns else (torch.zeros(1, 0, dtype=torch.int64),) * 2
    b_lo, b_hi = (t[None] for t in _ends(bands)) if bands else (torch.zeros(1, 0, dtype=torch.int64),) * 2
    b_hi = b_hi.clamp(max=shift)
    live = b_lo <= b_hi  # the causal limit can empty a band in every row
    b_lo, b_hi = b_lo[live][None], b_hi[live][None]
    # Union over the block's rows: a column up to the last row's causal limit; a band's shifts
    # from the first row to the last (contiguous). Kept by every row: a column up to the first
    # row's limit; a band's keys common to its first and last row.
    union_lo = torch.cat([c_lo.expand(r0.shape[0], -1), r0 + b_lo], dim=1)
    union_hi = torch.cat([torch.minimum(c_hi, r1 + shift), r1 + b_hi], dim=1)
    common_lo = torch.cat([c_lo.expand(r0.shape[0], -1), r1 + b_lo], dim=1)
    common_hi = torch.cat([torch.minimum(c_hi, r0 + shift), r0 + b_hi], dim=1)
    keys, runs, signature = _runs(union_lo.clamp(min=0), union_hi.clamp(max=Sk - 1), Sk)
    common, _, _ = _runs(common_lo.clamp(min=0), common_hi.clamp(max=Sk - 1), Sk)
    return keys.numpy(), runs.numpy(), (common < keys).numpy(), signature.numpy()


def _block_unions_by_rows(pattern: Pattern, Sq: int, Sk: int, block_m: int, causal: bool):
    """_block_unions from every row's intervals (a sort of each block's rows' intervals)."""
    lo, hi = (t.to(torch.int64) for t in row_intervals(pattern, Sq, Sk, causal))
    row_keys = torch.cat([_runs(lo[c:c + _ROW_CHUNK], hi[c:c + _ROW_CHUNK], Sk)[0] for c in range(0, Sq, _ROW_CHUNK)])
    nqb, n = math.ceil(Sq / block_m), lo.shape[1]
    pad = nqb * block_m - Sq
    lo = F.pad(lo, (0, 0, 0, pad), value=1).view(nqb, block_m * n)  # padding rows: empty intervals
    hi = F.pad(hi, (0, 0, 0, pad), value=0).view(nqb, block_m * n)
    step = max(1, _ROW_CHUNK // block_m)
    return _chunked_unions(((lo[b:b + step], hi[b:b + step]) for b in range(0, nqb, step)), row_keys, block_m, Sk)


def _layout_block_unions(pattern: BlockSparse, Sq: int, Sk: int, block_m: int, causal: bool):
    """_block_unions of a lone BlockSparse without its rows' intervals: a block's union is that of
    the few layout rows it spans (_layout_block_intervals), and each row's key count a prefix sum
    over its layout row (_layout_row_keys). Work O(blocks x layout rows spanned x runs a layout
    row) where the row path's is O(Sq x runs), sorted."""
    pattern.check_lengths(Sq, Sk)
    bq = pattern.block[0]
    x0 = torch.arange(0, Sq, block_m, dtype=torch.int64)
    x1 = (x0 + block_m).clamp(max=Sq) - 1
    step = max(1, _ROW_CHUNK // (int((x1 // bq - x0 // bq).max()) + 1))
    chunks = (_layout_block_intervals(pattern, x0[b:b + step], x1[b:b + step], Sq, Sk, causal)
              for b in range(0, x0.shape[0], step))
    return _chunked_unions(chunks, _layout_row_keys(pattern, Sq, Sk, causal), block_m, Sk)


def _layout_block_intervals(pattern: BlockSparse, x0: torch.Tensor, x1: torch.Tensor, Sq: int, Sk: int,
                            causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 (lo, hi) (blocks, layout rows spanned x runs): intervals whose union is what rows
    x0..x1 of each block keep together. Every row of a layout row keeps its runs of kept key
    blocks, cut at the row's causal limit, so the layout row's last row in the block keeps what
    all of them do: its runs cut at that row's limit. Blocks spanning fewer layout rows than the
    most repeat their last one (the union is unchanged)."""
    bq, bk = pattern.block
    starts, ends = (t.to(torch.int64) for t in _block_runs(pattern))  # padding runs: start 1, end 0
    spans = int((x1 // bq - x0 // bq).max()) + 1
    row = torch.minimum(x0[:, None] // bq + torch.arange(spans), (x1 // bq)[:, None])  # (blocks, spans)
    lo = starts[row] * bk  # (blocks, spans, runs); the layout's width keeps every start below Sk
    hi = ((ends[row] + 1) * bk - 1).clamp(max=Sk - 1)
    if causal:
        last = torch.minimum(x1[:, None], row * bq + bq - 1)
        hi = torch.minimum(hi, (last + (Sk - Sq))[..., None])
    return lo.flatten(1), hi.flatten(1)


@functools.lru_cache(maxsize=64)
def _layout_row_keys(pattern: BlockSparse, Sq: int, Sk: int, causal: bool) -> torch.Tensor:
    """int64 (Sq,): how many keys each row of a lone BlockSparse keeps: its layout row's kept keys
    up to its limit (Sk - 1, or i + Sk - Sq under the causal rule), a prefix sum over the key
    blocks before the limit's block plus the part of that block up to the limit. Cached (not to
    be written): the search asks for every candidate at several block sizes in a row."""
    bq, bk = pattern.block
    layout = layout_tensor(pattern).to(torch.int64)
    first_key = torch.arange(layout.shape[1], dtype=torch.int64) * bk
    widths = (first_key + bk).clamp(max=Sk) - first_key  # the last key block may be cut by Sk
    before = F.pad((layout * widths).cumsum(dim=1), (1, 0))  # kept keys in key blocks < c
    rows = torch.arange(Sq, dtype=torch.int64)
    limit = (rows + (Sk - Sq)).clamp(max=Sk - 1) if causal else torch.full((Sq,), Sk - 1, dtype=torch.int64)
    cut, layout_row = limit.clamp(min=0) // bk, rows // bq
    keys = before[layout_row, cut] + layout[layout_row, cut] * (limit - first_key[cut] + 1)
    return torch.where(limit >= 0, keys, 0)


def _transposed_block_unions(pattern: FramesTransposed, S: int, block_m: int, causal: bool):
    """_block_unions of a FramesTransposed pattern of bands (None for other bases) without its
    rows' intervals: codegen.frame_coverage gives each block's union as a few intervals a (d, k
    range), and each row's key count, in closed form."""
    row_keys = transposed_row_keys(pattern, S, causal)
    if row_keys is None:
        return None
    x0 = torch.arange(0, S, block_m)
    x1 = (x0 + block_m).clamp(max=S) - 1
    step = max(1, _ROW_CHUNK // block_m)
    chunks = (transposed_block_intervals(pattern, x0[b:b + step], x1[b:b + step], S, causal)
              for b in range(0, x0.shape[0], step))
    return _chunked_unions(chunks, row_keys, block_m, S)


def _chunked_unions(chunks, row_keys: torch.Tensor, block_m: int, Sk: int):
    """(keys, runs, masked, signature) numpy (blocks,), as _block_unions has them, from int64
    (lo, hi) (blocks, n) intervals whose union is each block's, chunk by chunk of blocks, and
    every row's key count (a block is masked when one of its rows keeps fewer keys than the
    union; padding rows past the last never force a mask)."""
    parts = [_runs(lo, hi, Sk) for lo, hi in chunks]
    keys, runs, signature = (torch.cat([part[i] for part in parts]) for i in range(3))
    row_keys = F.pad(row_keys, (0, keys.shape[0] * block_m - row_keys.shape[0]), value=-1).view(-1, block_m)
    masked = ((row_keys >= 0) & (row_keys < keys[:, None])).any(dim=1)
    return keys.numpy(), runs.numpy(), masked.numpy(), signature.numpy()


def _runs(lo: torch.Tensor, hi: torch.Tensor, Sk: int):
    """(keys covered, maximal runs, signature) of each row's union of intervals (rows, n), from
    block_coverage's maximal runs."""
    run_first, run_last, is_run = _maximal_runs(lo, hi, Sk)
    keys = torch.where(is_run, run_last - run_first + 1, 0).sum(dim=1)
    signature = torch.where(is_run, _mix((run_first + 1) * _HASH_A + (run_last + 1) * _HASH_B), 0).sum(dim=1)
    return keys, is_run.sum(dim=1), signature


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A run's hash: splitmix64's finalizer on int64 (wrapping), so that sums over runs do not
    collide the way sums of linear terms do."""
    x = (x ^ (x >> 30)) * _HASH_C
    x = (x ^ (x >> 27)) * _HASH_D
    return x ^ (x >> 31)


def _grouped(keys: np.ndarray, masked: np.ndarray, gathered: np.ndarray, signature: np.ndarray, Sk: int,
             masks_shift: bool):
    """The executor's grouping of blocks into calls: (keys read after bucket growth, masked,
    gathered, calls, folded). Buckets follow attention_cpu_plan._buckets; a bucket past
    _ALL_KEYS_RATIO of the keys reads all of them as a view. With masks_shift (bands and columns:
    masks move with the block, so blocks reading as many keys share a mask and a call) grown blocks
    mostly end up reading the same keys (growth fills their gaps from the left) and share one copy;
    grown block-layout rows stay apart. folded: how many blocks run as one query sequence with
    each block, which the executor does when every block of the call reads the same keys (a
    call of blocks with different keys runs each block on its own rows)."""
    keys, masked, gathered = keys.astype(np.float64), masked.astype(np.float64), gathered.copy()
    folded = np.ones(keys.shape[0])
    reading = np.flatnonzero(keys > 0)
    if not reading.size:
        return keys, masked, gathered, 0, folded
    calls, leftovers = 0, []
    for flag, least in ((0.0, 2), (1.0, _MIN_SHARED if masks_shift else math.inf)):
        members = reading[masked[reading] == flag]
        _, inverse, sizes = np.unique(keys[members], return_inverse=True, return_counts=True)
        calls += int((sizes >= least).sum())
        leftovers += members[sizes[inverse] < least].tolist()
        # a call folds when its blocks all read the same keys: one distinct signature
        distinct = np.bincount(np.unique(np.stack([inverse, signature[members]]), axis=1)[0], minlength=sizes.size)
        folds = (sizes >= least) & (distinct == 1)
        folded[members] = np.where(folds[inverse], sizes[inverse], 1)
    for bucket, length in _buckets(leftovers, keys[leftovers].astype(int).tolist(), Sk):
        bucket = np.asarray(bucket)
        grown = bucket[keys[bucket] < length]
        keys[grown] = length
        masked[grown] = 1.0  # the grown keys are masked out
        if length == Sk:
            gathered[bucket] = 0.0
            folded[bucket] = bucket.size
            calls += 1
        elif grown.size and masks_shift:
            gathered[grown] = 0.0
            gathered[grown[0]] = length
            folded[grown] = grown.size
            calls += 2 if grown.size < bucket.size else 1
        elif grown.size:  # grown layout rows stay apart: each gathered
            gathered[grown] = length
            calls += 1
        else:
            calls += 1
    return keys, masked, gathered, calls, folded
