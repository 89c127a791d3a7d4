"""CPU executor for per-head sparse attention that skips the key blocks a pattern does not touch.

For a pattern and shapes, a cached plan (codegen.block_coverage) lists per query block the key
blocks it visits. Query blocks that visit the same number of key blocks and need the same element
mask form a group; a group runs as one call of torch's fused CPU attention kernel (SDPA) over
(query blocks x heads) with the visited K/V blocks gathered by index_select. Structured patterns
(windows, diagonals) give almost every interior query block the same mask relative to its visited
blocks, so one (block_m, keys) mask is shared by the whole group and stays in cache; query blocks
whose visited tiles are all fully kept run unmasked.

Heads are batched: every (batch, kv head) with the same pattern is one batch row of the group's
call, and the query heads of a kv head (GQA) are the call's heads dimension with K/V expanded
(stride 0), so K and V are never copied per query head. Dense heads without a causal offset call
SDPA directly; Skip heads are filled without reading K. Everything is computed in float32 (bf16 /
fp16 inputs are upcast) and returned in q's dtype.
"""
from __future__ import annotations

import functools
import logging
import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsec.codegen.block_coverage import FULL, block_coverage, kv_block_table
from sparsec.patterns import Dense, Pattern, Skip

log = logging.getLogger(__name__)

__all__ = ["cpu_attention", "choose_blocks"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Gathered K and V of one call stay under this many bytes: bounds memory at long lengths.
_GATHER_BYTES = 64 << 20
# Cached masks of one plan stay under this; past it masks are rebuilt on every call instead.
_PLAN_MASK_BYTES = 256 << 20
# Mask elements built and hashed at once while planning.
_PLAN_CHUNK_PAIRS = 1 << 22
# A mask shared by fewer query blocks than this is not worth its own SDPA call (each call is a
# parallel region, costly on a busy 2-core machine): those blocks join padded groups instead.
_MIN_SHARED = 4
# Padded groups span kv counts from their largest down to this fraction of it, bounding the work
# spent on padding slots.
_BUCKET_RATIO = 0.6


@dataclass(frozen=True, slots=True)
class _BlockGroup:
    """Query blocks that run in one SDPA call, each visiting n key blocks."""

    q_blocks: torch.Tensor  # (g,) int64
    kv_blocks: torch.Tensor  # (g, n) int64 ascending; -1 marks padding slots (masked)
    mask: torch.Tensor | None  # float 0 / -inf (1, 1, bm, n * bn) shared, or (g, 1, bm, n * bn); None: keep all
    empty_rows: torch.Tensor | None  # bool (1 or g, bm): rows with no kept key (output 0); None: none
    rebuild_masks: bool = False  # masks too large to cache: built again on every call
    # (first, step): query block t of the group visits key blocks first + step * t + [0, n), so
    # its K/V are a strided view (no gather). None: gathered.
    kv_affine: tuple[int, int] | None = None
    kv_shared: bool = False  # every query block visits the same key blocks: gather them once


@dataclass(frozen=True, slots=True)
class _MaskClass:
    """Planning step: query blocks with the same kv count and the same mask (None: keep all)."""

    q_blocks: torch.Tensor
    kv_blocks: torch.Tensor
    mask: torch.Tensor | None  # (bm, n * bn) bool


@dataclass(frozen=True, slots=True)
class _Plan:
    block_m: int
    block_n: int
    groups: tuple[_BlockGroup, ...]


# -- planning ------------------------------------------------------------------------------------


def choose_blocks(pattern: Pattern, Sq: int, Sk: int) -> tuple[int, int]:
    """(block_m, block_n) for `pattern`: 128 x 128 tiles keep torch's fused CPU attention kernel
    efficient (measured on the 2-core CPU at S = 4096: 64-wide tiles lose more to per-call
    overhead than they save on the ragged edges of bands and stripes)."""
    return min(128, Sq), min(128, Sk)


def _tile_masks(pattern: Pattern, q_blocks, kv_blocks, Sq, Sk, causal, block_m, block_n) -> torch.Tensor:
    """(g, block_m, n * block_n) bool: which pairs of each query block's visited keys are kept
    (pattern and causal rule; keys past Sk, padding slots (-1) and rows past Sq keep nothing)."""
    i = q_blocks[:, None, None] * block_m + torch.arange(block_m)[None, :, None]
    j = (kv_blocks.clamp(min=0)[:, :, None] * block_n + torch.arange(block_n)).flatten(1)[:, None, :]
    real_slot = (kv_blocks >= 0).repeat_interleave(block_n, dim=1)[:, None, :]
    kept = pattern.keep(i.clamp(max=Sq - 1), j.clamp(max=Sk - 1), Sq, Sk) & (i < Sq) & (j < Sk) & real_slot
    if causal:
        kept &= j <= i + (Sk - Sq)
    return kept


def _needs_mask(coverage_full: torch.Tensor, kv_blocks: torch.Tensor, Sk: int, block_n: int) -> torch.Tensor:
    """(g,) bool: some visited tile is partial, or runs past Sk (padded keys must be masked)."""
    past_end = (kv_blocks + 1) * block_n > Sk
    return ~(coverage_full & ~past_end).all(dim=1)


def _dedupe(masks: torch.Tensor) -> list[list[int]]:
    """Indices of `masks` (g, ...) grouped by identical content (hashed, then verified)."""
    # Exact integer hash: sums of random 20-bit weights over kept positions cannot overflow.
    weights = torch.randint(0, 1 << 20, (masks[0].numel(),), generator=torch.Generator().manual_seed(0),
                            dtype=torch.int32)
    keys = (masks.flatten(1) * weights).sum(dim=1, dtype=torch.int64)
    buckets: dict[int, list[list[int]]] = defaultdict(list)
    for index, key in enumerate(keys.tolist()):
        for members in buckets[key]:
            if torch.equal(masks[members[0]], masks[index]):
                members.append(index)
                break
        else:
            buckets[key].append([index])
    return [members for group in buckets.values() for members in group]


def _mask_classes(pattern, q_blocks, kv_blocks, shape, block_m, block_n, budget: int) -> list[_MaskClass] | None:
    """The masked query blocks of one kv count split by distinct mask, or None when the distinct
    masks take more than `budget` bytes."""
    Sq, Sk, causal = shape
    step = max(1, _PLAN_CHUNK_PAIRS // (block_m * kv_blocks.shape[1] * block_n))
    classes: list[_MaskClass] = []
    for start in range(0, q_blocks.shape[0], step):
        qb, kvb = q_blocks[start:start + step], kv_blocks[start:start + step]
        masks = _tile_masks(pattern, qb, kvb, Sq, Sk, causal, block_m, block_n)
        for members in _dedupe(masks):
            index = torch.tensor(members)
            same = next((c for c in classes if torch.equal(c.mask, masks[members[0]])), None) if len(classes) < 16 else None
            if same is None:
                classes.append(_MaskClass(qb[index], kvb[index], masks[members[0]].clone()))
            else:
                classes[classes.index(same)] = _MaskClass(torch.cat([same.q_blocks, qb[index]]),
                                                          torch.cat([same.kv_blocks, kvb[index]]), same.mask)
        if sum(c.mask.numel() * 4 for c in classes) > budget:
            return None
    return classes


def _bias(kept: torch.Tensor) -> torch.Tensor:
    """Additive float mask for SDPA: 0 where kept, -inf elsewhere (SDPA converts bool masks to this
    on every call; caching the float form saves that pass)."""
    return torch.zeros(kept.shape).masked_fill_(~kept, float("-inf"))


def _affine(kv_blocks: torch.Tensor) -> tuple[int, int] | None:
    """(first, step) when row t of kv_blocks (g, n) is first + step * t + [0, n), else None."""
    g, n = kv_blocks.shape
    first = int(kv_blocks[0, 0])
    step = int(kv_blocks[1, 0]) - first if g > 1 else 0
    expected = first + step * torch.arange(g)[:, None] + torch.arange(n)
    return (first, step) if step >= 0 and torch.equal(kv_blocks, expected) else None


def _shared_group(c: _MaskClass) -> _BlockGroup:
    kv_layout = {"kv_affine": _affine(c.kv_blocks), "kv_shared": bool((c.kv_blocks == c.kv_blocks[:1]).all())}
    if c.mask is None:
        return _BlockGroup(c.q_blocks, c.kv_blocks, None, None, **kv_layout)
    empty = ~c.mask.any(dim=1)
    return _BlockGroup(c.q_blocks, c.kv_blocks, _bias(c.mask[None, None]),
                       empty[None] if bool(empty.any()) else None, **kv_layout)


def _padded_groups(pattern, leftovers: list[_MaskClass], shape, block_m, block_n, budget: int) -> list[_BlockGroup]:
    """Query blocks of small mask classes, bucketed by kv count and padded to the bucket's largest
    count (padding slots -1), each block with its own mask."""
    Sq, Sk, causal = shape
    rows = sorted(((int(qb), kv) for c in leftovers for qb, kv in zip(c.q_blocks, c.kv_blocks)),
                  key=lambda row: -row[1].shape[0])
    groups: list[_BlockGroup] = []
    while rows:
        n = rows[0][1].shape[0]
        size = next((r for r, (_, kv) in enumerate(rows) if kv.shape[0] < _BUCKET_RATIO * n), len(rows))
        bucket, rows = rows[:size], rows[size:]
        q_blocks = torch.tensor([qb for qb, _ in bucket])
        kv_blocks = torch.stack([F.pad(kv, (0, n - kv.shape[0]), value=-1) for _, kv in bucket])
        if len(bucket) * block_m * n * block_n * 4 > budget:
            groups.append(_BlockGroup(q_blocks, kv_blocks, None, None, rebuild_masks=True))
            continue
        masks = _tile_masks(pattern, q_blocks, kv_blocks, Sq, Sk, causal, block_m, block_n)
        budget -= masks.numel() * 4
        empty = ~masks.any(dim=2)
        groups.append(_BlockGroup(q_blocks, kv_blocks, _bias(masks[:, None]), empty if bool(empty.any()) else None))
    return groups


@functools.lru_cache(maxsize=64)
def _plan(pattern: Pattern, Sq: int, Sk: int, causal: bool, block_m: int, block_n: int) -> _Plan:
    coverage = block_coverage(pattern, Sq, Sk, block_m, block_n, causal)
    kv_num, kv_indices, kv_full = kv_block_table(coverage)
    shape = (Sq, Sk, causal)
    budget = _PLAN_MASK_BYTES
    classes: list[_MaskClass] = []
    groups: list[_BlockGroup] = []
    for n in sorted(set(kv_num.tolist()) - {0}):
        q_blocks = torch.nonzero(kv_num == n).flatten()
        kv_blocks = kv_indices[q_blocks, :n].to(torch.int64)
        masked = _needs_mask(kv_full[q_blocks, :n], kv_blocks, Sk, block_n)
        if not bool(masked.all()):
            classes.append(_MaskClass(q_blocks[~masked], kv_blocks[~masked], None))
        if bool(masked.any()):
            found = _mask_classes(pattern, q_blocks[masked], kv_blocks[masked], shape, block_m, block_n, budget)
            if found is None:
                groups.append(_BlockGroup(q_blocks[masked], kv_blocks[masked], None, None, rebuild_masks=True))
            else:
                classes += found
                budget -= sum(c.mask.numel() * 4 for c in found)
    groups += [_shared_group(c) for c in classes if c.q_blocks.shape[0] >= _MIN_SHARED]
    leftovers = [c for c in classes if c.q_blocks.shape[0] < _MIN_SHARED]
    groups += _padded_groups(pattern, leftovers, shape, block_m, block_n, budget)
    log.debug("cpu attention plan for %r (Sq=%d, Sk=%d, causal=%s, tiles %dx%d): %d groups, %d of %d tiles",
              pattern, Sq, Sk, causal, block_m, block_n, len(groups), int(kv_num.sum()), coverage.numel())
    return _Plan(block_m, block_n, tuple(groups))


# -- execution -----------------------------------------------------------------------------------


def _padded(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, S, D) -> (B * H, ceil(S / block) * block, D) contiguous, zero-padded past S."""
    B, H, S, D = x.shape
    pad = -S % block
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.contiguous().view(B * H, S + pad, D)


@dataclass(frozen=True, slots=True)
class _Operands:
    """One pattern's inputs. Batch row r is (batch b, kv head u): query heads q_rows[r] (c of them,
    rows of the flattened B * Hq) read K/V row r and write output rows out_rows[r] (local)."""

    q_blocks: torch.Tensor  # (B * Hq * nqb, bm, D)
    k_rows: torch.Tensor  # (R, nkb * bn, D) contiguous
    v_rows: torch.Tensor  # (R, nkb * bn, Dv) contiguous
    q_rows: torch.Tensor  # (R, c) int64
    out_rows: torch.Tensor  # (R, c) int64
    num_q: int
    num_kv: int


def _kv_operand(rows: torch.Tensor, group: _BlockGroup, chunk: slice, block_n: int) -> torch.Tensor:
    """(g, R, n * block_n, D): the visited key blocks of the chunk's query blocks for every row.
    An affine group is a strided view of `rows` (no copy); others are gathered."""
    R, length, D = rows.shape
    kv_blocks = group.kv_blocks[chunk]
    g, n = kv_blocks.shape
    if group.kv_affine is not None:
        first, step = group.kv_affine
        first += step * (chunk.start or 0)
        return rows.as_strided((g, R, n * block_n, D), (step * block_n * D, rows.stride(0), D, 1),
                               rows.storage_offset() + first * block_n * D)
    if group.kv_shared:  # the same key blocks for every query block: one copy, broadcast over g
        return _gather(rows, kv_blocks[:1], block_n).expand(g, -1, -1, -1)
    return _gather(rows, kv_blocks, block_n)


def _gather(rows: torch.Tensor, kv_blocks: torch.Tensor, block_n: int) -> torch.Tensor:
    """(g, R, n * block_n, D) copy of key blocks kv_blocks (g, n) (-1: padding) of every row."""
    R, length, D = rows.shape
    g, n = kv_blocks.shape
    index = (torch.arange(R)[None, :, None] * (length // block_n) + kv_blocks.clamp(min=0)[:, None, :]).flatten()
    return rows.view(-1, block_n, D).index_select(0, index).view(g, R, n * block_n, D)


def _chunk_masks(group: _BlockGroup, chunk: slice, pattern, shape, plan: _Plan):
    """(float attn_mask (1 or g, 1, bm, L), empty rows (1 or g, 1, bm, 1) or None) of a chunk."""
    if group.rebuild_masks:
        Sq, Sk, causal = shape
        kept = _tile_masks(pattern, group.q_blocks[chunk], group.kv_blocks[chunk], Sq, Sk, causal,
                           plan.block_m, plan.block_n)
        return _bias(kept[:, None]), ~kept.any(dim=2)[:, None, :, None]
    mask, empty = group.mask, group.empty_rows
    if mask is not None and mask.shape[0] > 1:
        mask, empty = mask[chunk], None if empty is None else empty[chunk]
    return mask, None if empty is None else empty[:, None, :, None]


def _attend(q, k, v, mask, scale: float) -> torch.Tensor:
    """SDPA of q (g, R * c, bm, D) on k, v (g, R, L, D). When every query block reads the same
    keys unmasked (k broadcast over g), the blocks are folded into one long query sequence: the
    fused kernel is more efficient on long sequences than on many short ones."""
    g, heads, bm, D = q.shape
    gqa = {"enable_gqa": True} if heads != k.shape[1] else {}  # query heads of a kv head share its K/V
    if mask is None and g > 1 and k.stride(0) == 0:
        folded = q.transpose(0, 1).reshape(1, heads, g * bm, D)
        o = F.scaled_dot_product_attention(folded, k[:1], v[:1], scale=scale, **gqa)
        return o.view(heads, g, bm, -1).transpose(0, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa)


def _run_group(group: _BlockGroup, plan: _Plan, pattern, ops: _Operands, out_flat: torch.Tensor,
               shape, scale: float) -> None:
    """One group's query blocks for every batch row, written into out_flat; gathered groups run
    in chunks whose K/V copies stay under _GATHER_BYTES."""
    bm, bn = plan.block_m, plan.block_n
    R, c = ops.q_rows.shape
    n = group.kv_blocks.shape[1]
    per_block = R * n * bn * (ops.k_rows.shape[-1] + ops.v_rows.shape[-1]) * 4
    step = group.q_blocks.shape[0] if group.kv_affine else max(1, _GATHER_BYTES // per_block)
    for start in range(0, group.q_blocks.shape[0], step):
        chunk = slice(start, start + step)
        qb = group.q_blocks[chunk]
        g = qb.shape[0]
        qg = ops.q_blocks.index_select(0, (ops.q_rows[None] * ops.num_q + qb[:, None, None]).flatten())
        kg, vg = _kv_operand(ops.k_rows, group, chunk, bn), _kv_operand(ops.v_rows, group, chunk, bn)
        mask, empty = _chunk_masks(group, chunk, pattern, shape, plan)
        o = _attend(qg.view(g, R * c, bm, -1), kg, vg, mask, scale)
        if empty is not None:  # rows with no kept key give 0 (SDPA may give NaN there)
            o = o.masked_fill(empty, 0.0)
        out_index = (ops.out_rows[None] * ops.num_q + qb[:, None, None]).flatten()
        out_flat.index_copy_(0, out_index, o.reshape(-1, bm, o.shape[-1]))


def _operands(q, k, v, q_heads: torch.Tensor, plan: _Plan) -> _Operands:
    B, Hq, Sq, _ = q.shape
    Hkv = k.shape[1]
    U, c = q_heads.shape
    batch = torch.arange(B)[:, None]
    kv_rows = (batch * Hkv + q_heads[:, 0][None] // (Hq // Hkv)).flatten()
    k_rows, v_rows = _padded(k, plan.block_n), _padded(v, plan.block_n)
    if kv_rows.shape[0] != k_rows.shape[0]:  # only some kv heads use this pattern: copy those once
        k_rows, v_rows = k_rows.index_select(0, kv_rows), v_rows.index_select(0, kv_rows)
    q_blocks = _padded(q, plan.block_m)
    return _Operands(q_blocks=q_blocks.view(-1, plan.block_m, q.shape[-1]), k_rows=k_rows, v_rows=v_rows,
                     q_rows=(batch[:, :, None] * Hq + q_heads[None]).view(B * U, c),
                     out_rows=torch.arange(B * U * c).view(B * U, c),
                     num_q=q_blocks.shape[1] // plan.block_m, num_kv=k_rows.shape[1] // plan.block_n)


def _block_sparse_heads(q, k, v, pattern: Pattern, q_heads: torch.Tensor, causal: bool, scale: float,
                        block_m: int | None, block_n: int | None) -> torch.Tensor:
    """(B, U * c, Sq, Dv) output of the query heads q_heads (U, c) (row u: heads of one kv head),
    in the order of q_heads.flatten()."""
    B, _, Sq, _ = q.shape
    Sk, Dv = k.shape[2], v.shape[-1]
    default_m, default_n = choose_blocks(pattern, Sq, Sk)
    plan = _plan(pattern, Sq, Sk, causal, block_m or default_m, block_n or default_n)
    ops = _operands(q, k, v, q_heads, plan)
    out_flat = q.new_zeros(ops.out_rows.numel() * ops.num_q, plan.block_m, Dv)  # blocks visiting nothing: 0
    for group in plan.groups:
        _run_group(group, plan, pattern, ops, out_flat, (Sq, Sk, causal), scale)
    return out_flat.view(B, q_heads.numel(), ops.num_q * plan.block_m, Dv)[:, :, :Sq]


def _dense_heads(q, k, v, heads: list[int], causal: bool, scale: float) -> torch.Tensor:
    """(B, len(heads), Sq, Dv): plain SDPA per kv head, K/V expanded over its query heads (no copy).
    Only for non-causal, or causal with Sq == Sk (SDPA's causal mask is aligned to the first query)."""
    B, Hq, Sq, _ = q.shape
    group = Hq // k.shape[1]
    if len(heads) == Hq:  # every head: one call; SDPA reads each kv head for its query heads
        gqa = {"enable_gqa": True} if group > 1 else {}
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **gqa)
    if group == 1:  # some heads, no GQA: one call on those heads
        index = torch.tensor(heads)
        return F.scaled_dot_product_attention(q.index_select(1, index), k.index_select(1, index),
                                              v.index_select(1, index), is_causal=causal, scale=scale)
    outs = []
    for kv, members in _by_kv_head(heads, group).items():
        kv_k = k[:, kv:kv + 1].expand(-1, len(members), -1, -1)
        kv_v = v[:, kv:kv + 1].expand(-1, len(members), -1, -1)
        outs.append(F.scaled_dot_product_attention(q[:, members], kv_k, kv_v, is_causal=causal, scale=scale))
    order = [h for members in _by_kv_head(heads, group).values() for h in members]
    out = torch.cat(outs, dim=1)
    return out[:, [order.index(h) for h in heads]]


def _by_kv_head(heads: list[int], group: int) -> dict[int, list[int]]:
    by_kv: dict[int, list[int]] = defaultdict(list)
    for h in heads:
        by_kv[h // group].append(h)
    return dict(by_kv)


def _skip_fill(v: torch.Tensor, Sq: int, fill: str, causal: bool) -> torch.Tensor:
    """Output of a Skip head from its kv head's values v (B, Sk, Dv): zeros, or the mean of V over
    the keys the causal rule allows (all keys when not causal; 0 when none). Never reads K."""
    B, Sk, Dv = v.shape
    if fill == "zero":
        return v.new_zeros(B, Sq, Dv)
    if not causal:
        return v.mean(dim=1, keepdim=True).expand(B, Sq, Dv)
    allowed = (torch.arange(Sq) + (Sk - Sq) + 1).clamp(0, Sk)  # keys 0 .. allowed-1 per row
    prefix = torch.cat([v.new_zeros(B, 1, Dv), v.cumsum(dim=1)], dim=1)
    return prefix[:, allowed] / allowed.clamp(min=1)[:, None].to(v.dtype)


def _block_head_sets(heads: list[int], group: int) -> list[torch.Tensor]:
    """Split heads into (U, c) tables where each of U kv heads has exactly c of the heads."""
    by_count: dict[int, list[list[int]]] = defaultdict(list)
    for members in _by_kv_head(heads, group).values():
        by_count[len(members)].append(members)
    return [torch.tensor(tables) for tables in by_count.values()]


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
    block_m / block_n override the tile sizes chosen per pattern (choose_blocks)."""
    _check_inputs(q, k, v, head_patterns, scale)
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"cpu_attention: {name} must be a positive int, got {value!r}")
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    qf, kf, vf = q.float(), k.float(), v.float()  # fp32 accumulation for bf16 / fp16 too
    out = torch.empty(B, Hq, Sq, v.shape[-1], dtype=torch.float32)
    by_pattern: dict[Pattern, list[int]] = defaultdict(list)
    for h, p in enumerate(head_patterns):
        by_pattern[p].append(h)
    for pattern, heads in by_pattern.items():
        if isinstance(pattern, Skip):
            for h in heads:
                out[:, h] = _skip_fill(vf[:, h // group], Sq, pattern.fill, causal)
        elif isinstance(pattern, Dense) and (not causal or Sq == Sk):
            out[:, heads] = _dense_heads(qf, kf, vf, heads, causal, float(scale))
        else:
            for table in _block_head_sets(heads, group):
                out[:, table.flatten()] = _block_sparse_heads(qf, kf, vf, pattern, table, causal, float(scale),
                                                              block_m, block_n)
    return out.to(q.dtype)
