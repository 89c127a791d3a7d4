"""Planning for the CPU attention executor (codegen/attention_cpu.py): which SDPA calls compute a
pattern, for query blocks of block_m rows.

Planning (cached per pattern, lengths, causal rule and query block size) starts from the exact
per-row key intervals (codegen.block_coverage.row_intervals). For each block of block_m query
rows it takes the union of its rows' intervals as maximal key runs, at key granularity: a band
of width w costs block_m + w keys per row, not a whole number of key tiles. Blocks reading the
same number of keys under the same element mask form a class (masks are compared in a canonical
interval form, and built once a class, never as an Sq x Sk mask): a window's interior blocks all
share one mask, block-sparse tiles need none. Classes of fewer than _MIN_SHARED blocks (band
edges, irregular patterns) join buckets of similar key counts: each block's keys are extended to
the bucket's count (masked) and the bucket runs as one call with a mask per block.

Each class or bucket is one call (_Call) reading each block's keys as one run sliding evenly
with the block (a strided view), the same keys for every block (one view or copy, broadcast), or
gathered keys; a call on views only is prepared once here (_Strided). The query block size is
chosen by codegen/attention_cpu_choice.py.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from sparsec.codegen.block_coverage import row_intervals
from sparsec.codegen.bounded_cache import bytes_bounded_cache
from sparsec.patterns import Pattern

log = logging.getLogger(__name__)

__all__: list[str] = []  # the executor's internals: codegen/attention_cpu.py is the entry point

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


# Every plan of a model stays cached (a forward cycles through its layers; see bounded_cache)
@bytes_bounded_cache(max_bytes=1 << 30)
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
