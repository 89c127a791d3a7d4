"""CPU executor for per-head sparse attention that reads only the keys each query block needs.

Planning (cached per pattern, lengths, causal rule and query block size) starts from the exact
per-row key intervals (codegen.block_coverage.row_intervals). For each block of block_m query
rows it takes the union of its rows' intervals as maximal key runs, at key granularity: a band
of width w costs block_m + w keys per row, not a whole number of key tiles. Blocks reading the
same number of keys under the same element mask form a class (masks are compared in a canonical
interval form, and built once a class, never as an Sq x Sk mask): a window's interior blocks all
share one mask, block-sparse tiles need none. Classes of fewer than _MIN_SHARED blocks (band
edges, irregular patterns) join buckets of similar key counts: each block's keys are extended to
the bucket's count (masked) and the bucket runs as one call with a mask per block.

Each class or bucket is one call of torch's fused CPU attention kernel (SDPA) over
(blocks x heads):

  - each block's keys one run, sliding evenly with the block (bands): K/V are a strided view;
  - the same keys for every block (columns, sinks, band edges): one view or copy broadcast over the
    blocks, which fold into one long query sequence (the kernel's most efficient shape) unless
    they share one mask;
  - otherwise the block's keys are gathered (index_select), a copy about 1/block_m of the work.

A call whose mask keeps every pair runs unmasked. Query blocks and outputs are strided views when
a call's blocks are evenly spaced. block_m (choose_blocks) is the candidate with the least
estimated work: pairs read over the kernel's measured speed at that many query rows, plus gathers.
Heads are batched: every (batch, kv head) with the same pattern is one batch row of each call,
and the query heads of a kv head (GQA) are the call's heads dimension with K/V shared (SDPA's
enable_gqa), so K and V are never copied per query head. Dense heads without a causal offset call
SDPA directly; Skip heads are filled without reading K. Copies run on one thread and only the
attention kernels on all (see _threads). Fixed costs per call dominate at short lengths, so a
call on views only is prepared once at planning (_Strided: a few views and the output copy per
run), a pattern's consecutive heads are slices of the inputs (views for B = 1), and its output
rows are written straight into the result when they are contiguous there. Everything is
computed in float32 (bf16 / fp16 inputs are upcast; fp32 inputs are not copied) and returned in
q's dtype.
"""
from __future__ import annotations

import functools
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from sparsec.attention_dispatch import skip_fill
from sparsec.codegen.block_coverage import row_intervals
from sparsec.patterns import Dense, Pattern, Skip

log = logging.getLogger(__name__)

__all__ = ["cpu_attention", "choose_blocks", "query_rows_speed"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Gathered K and V of one call stay under this many bytes: bounds memory at long lengths.
_GATHER_BYTES = 64 << 20
# Cached masks of one plan stay under this; past it masks are rebuilt on every call instead.
_PLAN_MASK_BYTES = 256 << 20
# Mask elements built and hashed at once while planning.
_PLAN_CHUNK_PAIRS = 1 << 22
# A mask shared by fewer query blocks than this is not worth its own SDPA call (each call is a
# parallel region, costly on a busy 2-core machine): those blocks join buckets with per-block masks.
_MIN_SHARED = 4
# A bucket takes blocks reading at least this fraction of its largest key count; their keys are
# extended to that count (the extension is masked), bounding the work spent on it.
_BUCKET_RATIO = 0.75
# A bucket that reads at least this fraction of all keys reads all of them: no gather, and its
# blocks fold into one long query sequence.
_ALL_KEYS_RATIO = 0.8
# Per-pair speed of torch's fused CPU attention kernel by query rows per call (relative to 128),
# measured at S = 4096, D = 64 with 2 threads: under 192 rows it splits queries by 32, and every
# split reloads the K/V tiles; from 192 rows it splits by 64.
_QUERY_BLOCK_SPEED = {32: 0.88, 64: 0.95, 128: 1.0, 256: 1.1}
# Gathering one key (its K and V rows, fp32, D = 64) costs about as much as this many pairs
# (measured: the copy itself is ~20, the smaller calls of shorter query blocks the rest).
_GATHER_PAIRS_PER_KEY = 40


@dataclass(frozen=True, slots=True)
class _Runs:
    """Key runs of some query blocks, padded to the most runs of one block: block b reads keys
    starts[b, r] + [0, lengths[b, r]) for r < count[b], in that order."""

    starts: torch.Tensor  # (g, R) int64 ascending; padding past count: a key past every run
    lengths: torch.Tensor  # (g, R) int64; padding: 0
    count: torch.Tensor  # (g,) int64

    def offsets(self) -> torch.Tensor:
        """(g, R) position of each run's first key in the block's key list."""
        return torch.cumsum(self.lengths, dim=1) - self.lengths

    def keys(self) -> torch.Tensor:
        """(g, L) the keys each block reads (every block must read the same number L)."""
        g = self.starts.shape[0]
        position = torch.arange(int(self.lengths[0].sum())).expand(g, -1).contiguous()
        offsets = self.offsets()
        run = torch.searchsorted(offsets, position, right=True) - 1
        return self.starts.gather(1, run) + position - offsets.gather(1, run)

    def select(self, index) -> _Runs:
        return _Runs(self.starts[index], self.lengths[index], self.count[index])

    def as_lists(self) -> list[list[tuple[int, int]]]:
        """Per block, its runs as inclusive (first, last) key pairs."""
        starts, lengths, count = self.starts.tolist(), self.lengths.tolist(), self.count.tolist()
        return [[(s, s + n - 1) for s, n in zip(row_s[:c], row_n[:c])]
                for row_s, row_n, c in zip(starts, lengths, count)]

    @staticmethod
    def from_lists(blocks: list[list[tuple[int, int]]], Sk: int) -> _Runs:
        width = max(1, max(len(runs) for runs in blocks))
        starts = torch.full((len(blocks), width), Sk, dtype=torch.int64)
        lengths = torch.zeros(len(blocks), width, dtype=torch.int64)
        for b, runs in enumerate(blocks):
            if runs:
                starts[b, :len(runs)] = torch.tensor([first for first, _ in runs])
                lengths[b, :len(runs)] = torch.tensor([last - first + 1 for first, last in runs])
        return _Runs(starts, lengths, torch.tensor([len(runs) for runs in blocks]))


@dataclass(frozen=True, slots=True)
class _Strided:
    """A call whose query blocks, keys and outputs are all strided views (module docstring), in
    the form that runs it with the fewest ops: `count` batches of `rows` query rows, batch t at
    query row q_first + q_step * t, reading keys kv_first + kv_step * t + [0, length). A folded
    call (consecutive blocks reading the same keys under no mask or a mask each) is one batch of
    all its blocks' rows; its mask and empty rows are reshaped to match (views where they can be)."""

    count: int
    rows: int
    q_first: int
    q_step: int
    kv_first: int
    kv_step: int
    mask: torch.Tensor | None  # (1 or count, 1, rows, length)
    empty_rows: torch.Tensor | None  # (1 or count, 1, rows, 1)


@dataclass(frozen=True, slots=True)
class _Call:
    """Query blocks that run in one SDPA call, each reading `length` keys."""

    q_blocks: torch.Tensor  # (g,) int64 ascending
    q_affine: tuple[int, int] | None  # (first, step): q_blocks == first + step * arange(g); None: gathered
    length: int
    # (first key, step): block t of the call reads keys first + step * t + [0, length) (step 0:
    # the same keys for every block). None: the keys of kv_index are gathered.
    kv_affine: tuple[int, int] | None
    kv_index: torch.Tensor | None  # (g, length) int64, or (1, length) when every block reads the same keys
    # float 0 / -inf (1, 1, bm, length) shared by the blocks, or (g, 1, bm, length) one a block;
    # None: every pair kept (or rebuilt, see below)
    mask: torch.Tensor | None
    empty_rows: torch.Tensor | None  # bool (1 or g, 1, bm, 1): rows that keep no key (output 0); None: none
    # Masks past the plan's budget are rebuilt on every call from the blocks' intervals and runs
    # (lo, hi (1 or g, bm, n), runs): one block's for a shared mask.
    rebuild: tuple[torch.Tensor, torch.Tensor, _Runs] | None = None
    strided: _Strided | None = None  # set when the call runs on strided views only (_strided)

    @property
    def shared_keys(self) -> bool:
        return (self.kv_affine is not None and self.kv_affine[1] == 0) or (
            self.kv_index is not None and self.kv_index.shape[0] == 1)


@dataclass(frozen=True, slots=True)
class _Plan:
    block_m: int
    calls: tuple[_Call, ...]
    has_empty_blocks: bool  # some query block reads no key (its output is 0)


# -- planning ------------------------------------------------------------------------------------


def choose_blocks(pattern: Pattern, Sq: int, Sk: int, causal: bool = False) -> tuple[int, int]:
    """(block_m, block_n) for `pattern`. Keys are read as exact runs, so only block_m matters
    (block_n, for callers that share tiles with the Triton kernels, is min(128, Sk)): the query
    block size with the least estimated work, see _block_m_cost."""
    return _choose_block_m(pattern, Sq, Sk, bool(causal)), min(128, Sk)


@functools.lru_cache(maxsize=256)
def _choose_block_m(pattern: Pattern, Sq: int, Sk: int, causal: bool) -> int:
    if isinstance(pattern, (Dense, Skip)):
        return min(128, Sq)
    candidates = sorted({min(bm, Sq) for bm in _QUERY_BLOCK_SPEED})
    with _threads(1):
        lo, hi = row_intervals(pattern, Sq, Sk, causal)
        return min(candidates, key=lambda bm: _block_m_cost(lo, hi, Sq, Sk, bm))


def query_rows_speed(rows):
    """Relative per-pair speed of torch's fused CPU attention kernel on calls of `rows` query rows
    (_QUERY_BLOCK_SPEED; 1.0 at 128): a float for an int, a float64 array for an array."""
    sizes = np.array(sorted(_QUERY_BLOCK_SPEED))
    speeds = np.array([_QUERY_BLOCK_SPEED[s] for s in sizes])
    found = speeds[np.clip(np.searchsorted(sizes, rows, side="right") - 1, 0, None)]
    return float(found) if np.ndim(rows) == 0 else found


def _block_m_cost(lo: torch.Tensor, hi: torch.Tensor, Sq: int, Sk: int, bm: int) -> float:
    """Estimated time of a plan with query blocks of bm rows, in units of one (query, key) pair at
    block_m = 128: pairs read (bm x each block's key runs) over the kernel's speed at bm, plus
    the copy of the keys of blocks whose keys are not one run (gathered)."""
    pad = -Sq % bm
    runs = _block_runs(F.pad(lo, (0, 0, 0, pad), value=1).view(-1, bm, lo.shape[1]),
                       F.pad(hi, (0, 0, 0, pad), value=0).view(-1, bm, hi.shape[1]), Sk)
    lengths = runs.lengths.sum(dim=1)
    gathered = int(lengths[runs.count > 1].sum())
    return bm * int(lengths.sum()) / query_rows_speed(bm) + _GATHER_PAIRS_PER_KEY * gathered


def _block_intervals(pattern: Pattern, Sq: int, Sk: int, causal: bool, block_m: int):
    """(lo, hi) int32 (nqb, block_m, n): each block's rows' clipped key intervals; rows past Sq
    and empty intervals have lo > hi."""
    lo, hi = row_intervals(pattern, Sq, Sk, causal)
    nqb = math.ceil(Sq / block_m)
    pad = nqb * block_m - Sq
    lo = F.pad(lo, (0, 0, 0, pad), value=1)
    hi = F.pad(hi, (0, 0, 0, pad), value=0)
    return lo.view(nqb, block_m, -1), hi.view(nqb, block_m, -1)


def _union(first: torch.Tensor, past: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The union of the half-open ranges [first, past) along the last dim (first >= past: empty,
    values in [0, limit]) as sorted, disjoint, non-touching ranges, packed to the front and padded
    with (limit, limit): a canonical form (two sets of ranges cover the same positions iff their
    unions are equal)."""
    empty = first >= past
    first, past = first.masked_fill(empty, limit), past.masked_fill(empty, limit)  # empties sort last
    first, order = first.sort(dim=-1)
    reach = past.gather(-1, order).cummax(dim=-1).values  # furthest position covered so far
    before = F.pad(reach[..., :-1], (1, 0), value=-1)
    real = first < limit
    starts = real & (first > before)
    # A range ends where the next one starts a new range, or at the last real one.
    ends = real & F.pad(starts[..., 1:] | ~real[..., 1:], (0, 1), value=True)
    n = first.shape[-1]
    rank = starts.cumsum(dim=-1) - 1
    packed_first = torch.full(first.shape[:-1] + (n + 1,), limit, dtype=first.dtype)
    packed_past = packed_first.clone()
    packed_first.scatter_(-1, torch.where(starts, rank, n), first)  # slot n collects the rest
    packed_past.scatter_(-1, torch.where(ends, rank, n), reach)
    return packed_first[..., :n], packed_past[..., :n]


def _block_runs(lo: torch.Tensor, hi: torch.Tensor, Sk: int) -> _Runs:
    """The maximal key runs of the union of each block's intervals (touching intervals joined),
    from a difference array over the keys: O(intervals + Sk) a block, no sort."""
    g = lo.shape[0]
    lo, hi = lo.reshape(g, -1).to(torch.int64), hi.reshape(g, -1).to(torch.int64)
    real = lo <= hi
    ones = real.to(torch.int32)
    diff = torch.zeros(g, Sk + 1, dtype=torch.int32)
    diff.scatter_add_(1, torch.where(real, lo, Sk), ones)
    diff.scatter_add_(1, torch.where(real, hi + 1, Sk), -ones)
    covered = F.pad(diff[:, :Sk].cumsum(dim=1) > 0, (1, 1)).to(torch.int8)
    edges = covered[:, 1:] - covered[:, :-1]  # +1 where a run starts, -1 one past its end
    count = (edges == 1).sum(dim=1)
    used = torch.arange(max(1, int(count.max()))) < count[:, None]
    starts = torch.full(used.shape, Sk, dtype=torch.int64)
    lengths = torch.zeros(used.shape, dtype=torch.int64)
    first = torch.nonzero(edges == 1)[:, 1]
    starts[used] = first
    lengths[used] = torch.nonzero(edges == -1)[:, 1] - first
    return _Runs(starts, lengths, count)


def _positions(lo: torch.Tensor, hi: torch.Tensor, runs: _Runs, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, past) int64 (g, bm, n): each row interval as a half-open range of positions in its
    block's key list (the block's runs, in order); empty intervals give (length, length). Every
    interval lies inside one run, so it maps to one contiguous range."""
    g, bm, n = lo.shape
    lo, hi = lo.reshape(g, -1).to(torch.int64), hi.reshape(g, -1).to(torch.int64)
    empty = lo > hi
    run = (torch.searchsorted(runs.starts, lo, right=True) - 1).clamp(min=0)
    first = runs.offsets().gather(1, run) + lo - runs.starts.gather(1, run)
    past = (first + hi - lo + 1).masked_fill(empty, length)
    return first.masked_fill(empty, length).view(g, bm, n), past.view(g, bm, n)


def _block_masks(lo: torch.Tensor, hi: torch.Tensor, runs: _Runs, length: int, real_rows: torch.Tensor) -> torch.Tensor:
    """(g, block_m, length) bool: which of each block's keys (its runs, in order) its rows keep,
    from a difference array over the rows' position ranges (never an Sq x Sk mask). Rows past Sq
    (real_rows False) are marked as keeping everything: their output is discarded, and they must
    not force a mask."""
    first, past = _positions(lo, hi, runs, length)
    g, bm, n = first.shape
    ones = (first < past).to(torch.int32)
    diff = torch.zeros(g, bm, length + 1, dtype=torch.int32)
    diff.scatter_add_(2, first, ones)
    diff.scatter_add_(2, past, -ones)
    kept = diff[:, :, :length].cumsum(dim=2) > 0
    kept |= ~real_rows[:, :, None]
    return kept


def _chunked_masks(lo, hi, runs: _Runs, length: int, real_rows: torch.Tensor) -> torch.Tensor:
    """_block_masks in chunks of blocks that bound its difference arrays."""
    step = max(1, _PLAN_CHUNK_PAIRS // (lo.shape[1] * length))
    return torch.cat([_block_masks(lo[c:c + step], hi[c:c + step], runs.select(slice(c, c + step)), length,
                                   real_rows[c:c + step]) for c in range(0, lo.shape[0], step)])


def _mask_forms(lo, hi, runs: _Runs, length: int, real_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical form of each block's mask without building it: (g, bm, 2 * n) per row the kept
    positions as packed disjoint ranges (rows past Sq: all), and (g,) whether every pair is kept.
    Two blocks of the same key count have the same mask iff their forms are equal."""
    first, past = _positions(lo, hi, runs, length)
    first = torch.where(real_rows[:, :, None], first, length)
    past = torch.where(real_rows[:, :, None], past, length)
    first[:, :, 0] = torch.where(real_rows, first[:, :, 0], 0)  # rows past Sq: [0, length)
    first, past = _union(first, past, length)
    full = ((past - first).sum(dim=2) == length).all(dim=1)
    return torch.cat([first, past], dim=2), full


def _bias(kept: torch.Tensor) -> torch.Tensor:
    """Additive float mask for SDPA: 0 where kept, -inf elsewhere (SDPA converts bool masks to this
    on every call; caching the float form saves that pass)."""
    return torch.zeros(kept.shape).masked_fill_(~kept, float("-inf"))


def _affine(values: torch.Tensor) -> tuple[int, int] | None:
    """(first, step) when values (g,) == first + step * arange(g), step >= 0; else None."""
    first = int(values[0])
    step = int(values[1]) - first if values.shape[0] > 1 else 0
    return (first, step) if step >= 0 and torch.equal(values, first + step * torch.arange(values.shape[0])) else None


def _key_layout(runs: _Runs) -> dict:
    """How a call's blocks read their keys: one run each at evenly spaced starts (a strided view),
    the same keys for every block (one copy), or gathered per block."""
    if bool((runs.count == 1).all()):
        affine = _affine(runs.starts[:, 0])
        if affine is not None:
            return {"kv_affine": affine, "kv_index": None}
    keys = runs.keys()
    return {"kv_affine": None, "kv_index": keys[:1] if bool((keys == keys[:1]).all()) else keys}


def _empty_rows(kept: torch.Tensor, real_rows: torch.Tensor) -> torch.Tensor | None:
    """(g, 1, bm, 1) rows of kept (g, bm, L) that keep no key, or None when there are none."""
    rows = ~kept.any(dim=2) & real_rows
    return rows[:, None, :, None] if bool(rows.any()) else None


def _classes(lo, hi, runs: _Runs, real_rows, blocks: torch.Tensor, length: int):
    """Split blocks reading `length` keys by mask: yields (blocks, kept (bm, length), or None when
    every pair is kept). Blocks are compared by their masks' canonical forms (hashed, then
    checked for equality), in chunks; only one mask per class is built."""
    step = max(1, _PLAN_CHUNK_PAIRS // (lo.shape[1] * lo.shape[2]))
    weights = torch.randint(-(1 << 62), 1 << 62, (lo.shape[1], 2 * lo.shape[2]), dtype=torch.int64,
                            generator=torch.Generator().manual_seed(0))
    found: dict[int | None, list[tuple[torch.Tensor, list[int]]]] = defaultdict(list)  # hash: [(form, blocks)]
    for start in range(0, blocks.shape[0], step):
        chunk = blocks[start:start + step]
        forms, full = _mask_forms(lo[chunk], hi[chunk], runs.select(chunk), length, real_rows[chunk])
        keys = (forms * weights).sum(dim=(1, 2)).tolist()  # wraps: a hash, verified below
        for index, (key, whole) in enumerate(zip(keys, full.tolist())):
            key = None if whole else key
            group = next((g for g in found[key] if key is None or torch.equal(g[0], forms[index])), None)
            if group is None:
                found[key].append((forms[index].clone(), [int(chunk[index])]))
            else:
                group[1].append(int(chunk[index]))
    for key, groups in found.items():
        for _, members in groups:
            first = members[0]
            kept = None if key is None else _block_masks(lo[first:first + 1], hi[first:first + 1],
                                                          runs.select(slice(first, first + 1)), length,
                                                          real_rows[first:first + 1])[0]
            yield torch.tensor(members), kept


def _extended(runs: list[tuple[int, int]], length: int, Sk: int) -> list[tuple[int, int]]:
    """Runs (first, last) grown to `length` keys in all, staying within [0, Sk): the last run
    grows right, then the first grows left, then gaps fill from the left. Keeps one run one run
    when it can, so that bands stay strided views."""
    runs = [list(r) for r in runs]
    need = length - sum(last - first + 1 for first, last in runs)
    grow = min(need, Sk - 1 - runs[-1][1])
    runs[-1][1] += grow
    need -= grow
    grow = min(need, runs[0][0])
    runs[0][0] -= grow
    need -= grow
    for r in range(len(runs) - 1):
        grow = min(need, runs[r + 1][0] - runs[r][1] - 1)
        runs[r][1] += grow
        need -= grow
    merged: list[list[int]] = []
    for first, last in runs:
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = last
        else:
            merged.append([first, last])
    return [(first, last) for first, last in merged]


def _buckets(blocks: list[int], lengths: list[int], Sk: int) -> list[tuple[list[int], int]]:
    """Blocks (with their key counts) grouped into (members, bucket key count): each bucket's
    blocks read at least _BUCKET_RATIO of its largest count; past _ALL_KEYS_RATIO of Sk a bucket
    reads every key."""
    order = sorted(range(len(blocks)), key=lambda b: -lengths[b])
    buckets = []
    while order:
        top = lengths[order[0]]
        size = next((n for n, b in enumerate(order) if lengths[b] < _BUCKET_RATIO * top), len(order))
        members, order = sorted(blocks[b] for b in order[:size]), order[size:]
        buckets.append((members, Sk if top >= _ALL_KEYS_RATIO * Sk else top))
    return buckets


def _same_keys(blocks: list[int], runs: list[list[tuple[int, int]]]) -> list[list[int]]:
    """Blocks split into groups reading the same keys (one copy of K/V, or a view, for each group
    of two or more) and one group of the rest (gathered)."""
    by_keys: dict[tuple, list[int]] = defaultdict(list)
    for block, block_runs in zip(blocks, runs):
        by_keys[tuple(block_runs)].append(block)
    shared = [members for members in by_keys.values() if len(members) > 1]
    rest = sorted(block for members in by_keys.values() if len(members) == 1 for block in members)
    return shared + ([rest] if rest else [])


def _folds(call: _Call, mask: torch.Tensor | None, g: int) -> bool:
    """Whether a chunk of g of the call's blocks under `mask` folds into one query sequence
    (_run_call): every block reads the same keys, under no mask or a mask each (not one shared)."""
    return call.shared_keys and call.q_blocks.shape[0] > 1 and (mask is None or mask.shape[0] == g)


def _strided(call: _Call, block_m: int) -> _Strided | None:
    """The call as strided views (_Strided), or None when it gathers query blocks or keys,
    rebuilds its masks, or folds blocks that are not consecutive."""
    if call.q_affine is None or call.kv_affine is None or call.rebuild is not None:
        return None
    g = call.q_blocks.shape[0]
    (q_first, q_step), (kv_first, kv_step) = call.q_affine, call.kv_affine
    mask, empty = call.mask, call.empty_rows
    if not _folds(call, mask, g):
        return _Strided(g, block_m, q_first * block_m, q_step * block_m, kv_first, kv_step, mask, empty)
    if q_step != 1:
        return None
    if mask is not None:
        mask = mask.reshape(1, 1, g * block_m, call.length)
    if empty is not None:
        empty = empty.expand(g, -1, -1, -1).reshape(1, 1, g * block_m, 1)
    return _Strided(1, g * block_m, q_first * block_m, 0, kv_first, 0, mask, empty)


@functools.lru_cache(maxsize=64)
def _plan(pattern: Pattern, Sq: int, Sk: int, causal: bool, block_m: int) -> _Plan:
    """The calls that compute `pattern` for query blocks of block_m rows (module docstring)."""
    lo, hi = _block_intervals(pattern, Sq, Sk, causal, block_m)
    runs = _block_runs(lo, hi, Sk)
    real_rows = (torch.arange(lo.shape[0] * block_m) < Sq).view(-1, block_m)
    lengths = runs.lengths.sum(dim=1)
    budget = [_PLAN_MASK_BYTES]

    def masked_call(blocks: torch.Tensor, block_runs: _Runs, kept: torch.Tensor | None, per_block: bool) -> _Call:
        """kept: (1 or g, bm, L), or None: every pair kept."""
        length = int(block_runs.lengths[0].sum())
        mask = empty = rebuild = None
        if kept is not None:
            empty = _empty_rows(kept, real_rows[blocks] if per_block else real_rows[blocks[:1]])
            budget[0] -= kept.numel() * 4
            if budget[0] >= 0:
                mask = _bias(kept[:, None])
            else:
                index = blocks if per_block else blocks[:1]
                rebuild = (lo[index], hi[index], block_runs if per_block else block_runs.select(slice(0, 1)))
        call = _Call(q_blocks=blocks, q_affine=_affine(blocks), length=length, mask=mask, empty_rows=empty,
                     rebuild=rebuild, **_key_layout(block_runs))
        return replace(call, strided=_strided(call, block_m))

    calls, leftovers = [], []
    for length in sorted(set(lengths.tolist()) - {0}):
        for members, kept in _classes(lo, hi, runs, real_rows, torch.nonzero(lengths == length).flatten(), length):
            if members.shape[0] >= _MIN_SHARED or (kept is None and members.shape[0] > 1):
                calls.append(masked_call(members, runs.select(members), None if kept is None else kept[None], False))
            else:
                leftovers += members.tolist()
    for members, length in _buckets(leftovers, lengths[leftovers].tolist(), Sk):
        grown = [_extended(r, length, Sk) for r in runs.select(torch.tensor(members)).as_lists()]
        for part in _same_keys(members, grown):
            index = torch.tensor(part)
            part_runs = _Runs.from_lists([grown[members.index(b)] for b in part], Sk)
            kept = _chunked_masks(lo[index], hi[index], part_runs, length, real_rows[index])
            calls.append(masked_call(index, part_runs, None if bool(kept.all()) else kept, True))
    pairs = sum(c.q_blocks.shape[0] * c.length for c in calls) * block_m
    log.debug("cpu attention plan for %r (Sq=%d, Sk=%d, causal=%s, block_m=%d): %d calls, %d computed pairs "
              "(%.1f%% of Sq x Sk)", pattern, Sq, Sk, causal, block_m, len(calls), pairs, 100 * pairs / (Sq * Sk))
    return _Plan(block_m, tuple(calls), has_empty_blocks=bool((lengths == 0).any()))


# -- execution -----------------------------------------------------------------------------------


class _threads:
    """Run torch ops inside with `count` intra-op threads. The executor copies (gathers, stores,
    dtype casts) run on one thread and only the attention kernels on all of them: on a busy
    2-core machine every OpenMP region waits for the scheduler to wake its second thread (measured
    7-8 ms for a 1 MB copy with 2 threads against 0.06 ms on one), which on a plan of a dozen calls
    cost more than the copies themselves. A class rather than a contextlib generator: it is
    entered around every SDPA call, and costs a third as much."""

    __slots__ = ("count", "previous")

    def __init__(self, count: int):
        self.count = count

    def __enter__(self) -> None:
        self.previous = torch.get_num_threads()
        if self.count != self.previous:
            torch.set_num_threads(self.count)

    def __exit__(self, *exc) -> None:
        if self.count != self.previous:
            torch.set_num_threads(self.previous)


@dataclass(frozen=True, slots=True)
class _Operands:
    """One pattern's inputs. Batch row r of K/V is (batch b, kv head u); its c query heads are
    rows r * c .. r * c + c - 1 of q_rows and out_rows."""

    q_rows: torch.Tensor  # (R * c, nqb * bm, D) contiguous, zero-padded past Sq
    k_rows: torch.Tensor  # (R, Sk, D) contiguous
    v_rows: torch.Tensor  # (R, Sk, Dv) contiguous
    out_rows: torch.Tensor  # (R * c, nqb * bm, Dv)
    threads: int  # intra-op threads for the attention kernels


def _rows_view(rows: torch.Tensor, count: int, length: int, first: int, step: int) -> torch.Tensor:
    """(count, R, length, D) view of rows (R, S, D) contiguous: batch t is rows[:, first + step * t + [0, length)]."""
    R, S, D = rows.shape
    return rows.as_strided((count, R, length, D), (step * D, S * D, D, 1), rows.storage_offset() + first * D)


def _kv_operand(rows: torch.Tensor, call: _Call, chunk: slice, g: int) -> torch.Tensor:
    """(g, R, length, D) keys or values the chunk's blocks read: a view when the keys of each
    block are one run at evenly spaced starts, otherwise gathered."""
    if call.kv_affine is not None:
        first, step = call.kv_affine
        return _rows_view(rows, g, call.length, first + step * chunk.start, step)
    if call.kv_index.shape[0] == 1:  # the same keys for every block: one copy, broadcast
        return rows.index_select(1, call.kv_index[0])[None].expand(g, -1, -1, -1)
    index = call.kv_index[chunk]
    return rows.index_select(1, index.flatten()).view(rows.shape[0], g, call.length, -1).transpose(0, 1)


def _q_operand(rows: torch.Tensor, call: _Call, chunk: slice, g: int, bm: int) -> torch.Tensor:
    """(g, R * c, bm, D) query blocks of the chunk: a view when the blocks are evenly spaced."""
    if call.q_affine is not None:
        first, step = call.q_affine
        return _rows_view(rows, g, bm, (first + step * chunk.start) * bm, step * bm)
    RC, S, D = rows.shape
    return rows.view(RC, S // bm, bm, D).index_select(1, call.q_blocks[chunk]).transpose(0, 1)


def _store(out_rows: torch.Tensor, o: torch.Tensor, call: _Call, chunk: slice, bm: int) -> None:
    """Write o (g, R * c, bm, Dv) to the chunk's query blocks of out_rows."""
    g = o.shape[0]
    if call.q_affine is not None:
        _q_operand(out_rows, call, chunk, g, bm).copy_(o)
    else:
        RC, S, Dv = out_rows.shape
        out_rows.view(RC, S // bm, bm, Dv).index_copy_(1, call.q_blocks[chunk], o.transpose(0, 1))


def _chunk_masks(call: _Call, chunk: slice, bm: int):
    """(float mask (1 or g, 1, bm, L) or None, empty rows (1 or g, 1, bm, 1) or None) of a chunk."""
    mask, empty = call.mask, call.empty_rows
    if call.rebuild is not None:
        lo, hi, runs = call.rebuild
        per_block = lo.shape[0] > 1
        if per_block:
            lo, hi, runs = lo[chunk], hi[chunk], runs.select(chunk)
        mask = _bias(_block_masks(lo, hi, runs, call.length, torch.ones(lo.shape[:2], dtype=torch.bool))[:, None])
    elif mask is not None and mask.shape[0] > 1:
        mask = mask[chunk]
    if empty is not None and empty.shape[0] > 1:
        empty = empty[chunk]
    return mask, empty


def _attend(q, k, v, mask, scale: float, threads: int) -> torch.Tensor:
    """SDPA of q (g, R * c, M, D) on k, v (g or 1, R, L, D) -> (g, R * c, M, Dv), on `threads`
    threads; the query heads of a kv head share its K/V (enable_gqa)."""
    gqa = q.shape[1] != k.shape[1]
    with _threads(threads):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _run_strided(s: _Strided, length: int, ops: _Operands, scale: float) -> None:
    """One call on strided views (_Strided): no copies but the output's."""
    q = _rows_view(ops.q_rows, s.count, s.rows, s.q_first, s.q_step)
    k = _rows_view(ops.k_rows, s.count, length, s.kv_first, s.kv_step)
    v = _rows_view(ops.v_rows, s.count, length, s.kv_first, s.kv_step)
    o = _attend(q, k, v, s.mask, scale, ops.threads)
    if s.empty_rows is not None:  # rows with no kept key give 0 (SDPA's math path gives NaN)
        o = o.masked_fill(s.empty_rows, 0.0)
    _rows_view(ops.out_rows, s.count, s.rows, s.q_first, s.q_step).copy_(o)


def _run_call(call: _Call, bm: int, ops: _Operands, scale: float) -> None:
    """One call's query blocks for every batch row, written into ops.out_rows; gathered calls run
    in chunks whose K/V copies stay under _GATHER_BYTES. With `fold` (every block reads the same
    keys, broadcast over the blocks, under one mask a block or none) the blocks are folded into one
    long query sequence: torch's fused kernel splits queries in chunks of 256 from 768 query rows
    on (32 below 192), and reuses each K/V tile over a whole chunk."""
    if call.strided is not None:
        _run_strided(call.strided, call.length, ops, scale)
        return
    g_total = call.q_blocks.shape[0]
    step = g_total
    if call.kv_index is not None and call.kv_index.shape[0] > 1:
        per_block = ops.k_rows.shape[0] * call.length * (ops.k_rows.shape[-1] + ops.v_rows.shape[-1]) * 4
        step = max(1, _GATHER_BYTES // per_block)
    if call.rebuild is not None and call.rebuild[0].shape[0] > 1:
        step = min(step, max(1, _PLAN_CHUNK_PAIRS // (bm * call.length)))
    if call.shared_keys:  # read (or gathered) once for every chunk
        shared = _kv_operand(ops.k_rows, call, slice(0, 1), 1), _kv_operand(ops.v_rows, call, slice(0, 1), 1)
    for start in range(0, g_total, step):
        chunk = slice(start, min(g_total, start + step))
        g = chunk.stop - chunk.start
        q = _q_operand(ops.q_rows, call, chunk, g, bm)
        mask, empty = _chunk_masks(call, chunk, bm)
        fold = _folds(call, mask, g)
        if fold:
            heads, D = q.shape[1], q.shape[-1]
            q = q.transpose(0, 1).reshape(1, heads, g * bm, D)
            k, v = shared
            if mask is not None:
                mask = mask.reshape(1, 1, g * bm, -1)
        elif call.shared_keys:
            k, v = (t.expand(g, -1, -1, -1) for t in shared)
        else:
            k, v = _kv_operand(ops.k_rows, call, chunk, g), _kv_operand(ops.v_rows, call, chunk, g)
        o = _attend(q, k, v, mask, scale, ops.threads)
        if fold:
            o = o.view(heads, g, bm, -1).transpose(0, 1)
        if empty is not None:  # rows with no kept key give 0 (SDPA's math path gives NaN)
            o = o.masked_fill(empty, 0.0)
        _store(ops.out_rows, o, call, chunk, bm)


def _padded_rows(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, S, D) -> (B * H, ceil(S / block) * block, D) contiguous, zero-padded past S."""
    B, H, S, D = x.shape
    pad = -S % block
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.contiguous().view(B * H, S + pad, D)


@dataclass(frozen=True, slots=True)
class _HeadTable:
    """Query heads of one pattern that run together: the i-th kv head of kv_heads serves the
    i-th c query heads of q_heads (c each). Slices when the heads are consecutive (inputs and
    output are then sliced: views for B = 1, no copies), else index tensors."""

    q_heads: slice | torch.Tensor
    kv_heads: slice | torch.Tensor


@functools.lru_cache(maxsize=256)
def _head_index(heads: tuple[int, ...]) -> slice | torch.Tensor:
    """heads as a slice when they are consecutive and ascending, else as an index tensor."""
    first = heads[0]
    return slice(first, first + len(heads)) if heads == tuple(range(first, first + len(heads))) else torch.tensor(heads)


def _select_heads(x: torch.Tensor, heads: slice | torch.Tensor) -> torch.Tensor:
    """x[:, heads]: a view for a slice, a copy for an index tensor."""
    return x[:, heads] if isinstance(heads, slice) else x.index_select(1, heads)


def _store_heads(out: torch.Tensor, heads: slice | torch.Tensor, rows: torch.Tensor) -> None:
    """out[:, heads] = rows."""
    if isinstance(heads, slice):
        out[:, heads] = rows
    else:
        out.index_copy_(1, heads, rows)


def _sparse_heads(q, k, v, pattern: Pattern, table: _HeadTable, causal: bool, scale: float,
                  block_m: int | None, threads: int, out: torch.Tensor) -> None:
    """Writes the output of the query heads of `table` to out (B, Hq, Sq, Dv): straight into it
    when its rows of those heads are one contiguous block and Sq needs no padding, else through
    a padded buffer."""
    B, Hq, Sq, _ = q.shape
    Sk, Dv = k.shape[2], v.shape[-1]
    bm = block_m or choose_blocks(pattern, Sq, Sk, causal)[0]
    plan = _plan(pattern, Sq, Sk, causal, bm)
    q_rows = _padded_rows(_select_heads(q, table.q_heads), bm)
    k_rows = _select_heads(k, table.kv_heads).contiguous().view(-1, Sk, k.shape[-1])
    v_rows = _select_heads(v, table.kv_heads).contiguous().view(-1, Sk, Dv)
    target = out[:, table.q_heads] if isinstance(table.q_heads, slice) else None
    direct = target is not None and target.is_contiguous() and q_rows.shape[1] == Sq
    if direct:
        out_rows = target.view(q_rows.shape[0], Sq, Dv)
        if plan.has_empty_blocks:  # blocks that read no key: 0
            out_rows.zero_()
    else:
        make = torch.zeros if plan.has_empty_blocks else torch.empty
        out_rows = make(q_rows.shape[0], q_rows.shape[1], Dv, dtype=out.dtype)
    ops = _Operands(q_rows, k_rows, v_rows, out_rows, threads)
    for call in plan.calls:
        _run_call(call, plan.block_m, ops, scale)
    if not direct:
        _store_heads(out, table.q_heads, out_rows.view(B, q_rows.shape[0] // B, -1, Dv)[:, :, :Sq])


def _dense_heads(q, k, v, heads: tuple[int, ...], causal: bool, scale: float, threads: int) -> torch.Tensor:
    """(B, len(heads), Sq, Dv): plain SDPA per kv head, K/V expanded over its query heads (no copy).
    Only for non-causal, or causal with Sq == Sk (SDPA's causal mask is aligned to the first query)."""
    B, Hq, Sq, _ = q.shape
    group = Hq // k.shape[1]
    if len(heads) == Hq:  # every head: one call; SDPA reads each kv head for its query heads
        gqa = {"enable_gqa": True} if group > 1 else {}
        with _threads(threads):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **gqa)
    if group == 1:  # some heads, no GQA: one call on those heads
        index = _head_index(heads)
        q, k, v = _select_heads(q, index), _select_heads(k, index), _select_heads(v, index)
        with _threads(threads):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    outs = []
    for kv, members in _by_kv_head(heads, group).items():
        kv_k = k[:, kv:kv + 1].expand(-1, len(members), -1, -1)
        kv_v = v[:, kv:kv + 1].expand(-1, len(members), -1, -1)
        with _threads(threads):
            outs.append(F.scaled_dot_product_attention(q[:, members], kv_k, kv_v, is_causal=causal, scale=scale))
    order = [h for members in _by_kv_head(heads, group).values() for h in members]
    out = torch.cat(outs, dim=1)
    return out[:, [order.index(h) for h in heads]]


def _by_kv_head(heads: tuple[int, ...], group: int) -> dict[int, list[int]]:
    by_kv: dict[int, list[int]] = defaultdict(list)
    for h in heads:
        by_kv[h // group].append(h)
    return dict(by_kv)


@functools.lru_cache(maxsize=256)
def _head_tables(heads: tuple[int, ...], group: int) -> tuple[_HeadTable, ...]:
    """Split heads (ascending) into tables where each of their kv heads has exactly c of the heads."""
    by_count: dict[int, list[list[int]]] = defaultdict(list)
    for members in _by_kv_head(heads, group).values():
        by_count[len(members)].append(members)
    return tuple(_HeadTable(_head_index(tuple(h for members in tables for h in members)),
                            _head_index(tuple(members[0] // group for members in tables)))
                 for tables in by_count.values())


@functools.lru_cache(maxsize=256)
def _heads_by_pattern(head_patterns: tuple[Pattern, ...]) -> tuple[tuple[Pattern, tuple[int, ...]], ...]:
    """(pattern, its heads ascending) for each distinct pattern, in order of first use."""
    by_pattern: dict[Pattern, list[int]] = defaultdict(list)
    for h, p in enumerate(head_patterns):
        by_pattern[p].append(h)
    return tuple((p, tuple(heads)) for p, heads in by_pattern.items())


def _check_inputs(q, k, v, head_patterns, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"cpu_attention: {name} must be a 4-D tensor (B, H, S, D)")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"cpu_attention: {name} has dtype {t.dtype}; supported: {SUPPORTED_DTYPES}")
        if t.device.type != "cpu":
            raise ValueError(f"cpu_attention: {name} is on {t.device}; this executor runs CPU tensors")
    B, Hq, Sq, D = q.shape
    if k.shape[:2] != v.shape[:2] or k.shape[2] != v.shape[2] or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"cpu_attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree")
    if k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"cpu_attention: query heads {Hq} must be a multiple of kv heads {k.shape[1]}")
    if Sq == 0 or k.shape[2] == 0:
        raise ValueError("cpu_attention: empty sequence")
    if len(head_patterns) != Hq or not all(isinstance(p, Pattern) for p in head_patterns):
        raise ValueError(f"cpu_attention: need one Pattern per query head ({Hq}), got {len(head_patterns)}")
    if not isinstance(scale, (int, float)):
        raise TypeError(f"cpu_attention: scale must be a float, got {type(scale).__name__}")


def cpu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_patterns: tuple[Pattern, ...],
    *,
    causal: bool,
    scale: float,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Exact sparse attention on CPU (semantics of sparsec.attention, DESIGN.md): head h keeps the
    pairs of head_patterns[h] (and j <= i + Sk - Sq when causal); rows with no kept key are 0.
    block_m overrides the query block size chosen per pattern (choose_blocks); block_n is
    accepted for the tiles API and unused (keys are read as exact runs, not tiles)."""
    _check_inputs(q, k, v, head_patterns, scale)
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"cpu_attention: {name} must be a positive int, got {value!r}")
    threads = torch.get_num_threads()
    with _threads(1):  # copies on one thread, attention kernels on all (see _threads)
        return _attention(q, k, v, head_patterns, causal, float(scale), block_m, threads)


def _attention(q, k, v, head_patterns, causal: bool, scale: float, block_m: int | None, threads: int) -> torch.Tensor:
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    qf, kf, vf = q.float(), k.float(), v.float()  # fp32 accumulation for bf16 / fp16 too (no-ops for fp32)
    by_pattern = _heads_by_pattern(tuple(head_patterns))
    if len(by_pattern) == 1 and isinstance(by_pattern[0][0], Dense) and (not causal or Sq == Sk):
        return _dense_heads(qf, kf, vf, by_pattern[0][1], causal, scale, threads).to(q.dtype)
    out = torch.empty(B, Hq, Sq, v.shape[-1], dtype=torch.float32)
    for pattern, heads in by_pattern:
        if isinstance(pattern, Skip):
            for h in heads:
                out[:, h] = skip_fill(vf[:, h // group : h // group + 1], Sq, pattern.fill, causal)[:, 0]
        elif isinstance(pattern, Dense) and (not causal or Sq == Sk):
            _store_heads(out, _head_index(heads), _dense_heads(qf, kf, vf, heads, causal, scale, threads))
        else:
            for table in _head_tables(heads, group):
                _sparse_heads(qf, kf, vf, pattern, table, causal, scale, block_m, threads, out)
    return out.to(q.dtype)
