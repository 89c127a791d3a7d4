"""CPU executor for per-head sparse attention that reads only the keys each query block needs.

A pattern that keeps a few key intervals a row (windows, bands, A-shapes, column runs), or a
BlockSparse layout, runs on a native kernel (codegen/attention_cpu_native.py) where it is built
and the cost model prices it below torch's kernel (codegen.attention_cpu_choice): one call for all its heads, GQA
mapped inside, no copies. Otherwise:

The plan of a pattern (codegen/attention_cpu_plan.py) lists the SDPA calls that compute it for
query blocks of block_m rows. Each call runs torch's fused CPU attention kernel (SDPA) over
(blocks x heads):

  - each block's keys one run, sliding evenly with the block (bands): K/V are a strided view;
  - the same keys for every block (columns, sinks, band edges): one view or copy broadcast over the
    blocks, which fold into one long query sequence (the kernel's most efficient shape) unless
    they share one mask;
  - otherwise the block's keys are gathered (index_select), a copy about 1/block_m of the work.

A call whose mask keeps every pair runs unmasked. Query blocks and outputs are strided views when a
call's blocks are evenly spaced. A pattern of bands far apart may run as disjoint parts instead
(codegen.attention_cpu_choice decides): each part's plan runs as above, its calls also returning
each row's log-sum-exp, and the parts' outputs are merged by it (_run_parts). A pattern with a
frame stride (a video model's temporal heads) may run in frame-transposed token order instead
(codegen.frame_order; the same choice): q, k and v are gathered into that order, the renumbered
pattern's plan runs as above, and the output is gathered back. Heads are batched:
every (batch, kv head) with the same pattern is one batch row of each call, and the query heads of
a kv head (GQA) are the call's heads dimension with K/V shared (SDPA's enable_gqa), so K and V are
never copied per query head. Dense heads without a causal offset call SDPA directly; Skip heads are
filled without reading K. Copies run on one thread and only the attention kernels on all
(codegen.cpu_threads). Fixed costs per call dominate at short lengths, so a call on views only is
prepared once at planning, a pattern's consecutive heads are slices of the inputs (views for B =
1), and its output rows are written straight into the result when they are contiguous there.
Everything is computed in float32 (bf16 / fp16 inputs are upcast; fp32 inputs are not copied) and
returned in q's dtype.

Soft-capped scores (softcap > 0, Gemma 2: s -> softcap * tanh(s / softcap) before the mask) and
attention sinks (GPT-OSS: a logit a head that each row's softmax also weighs) have no step in
torch's fused kernel: such heads run on the native kernels, which cap each score they compute and
start each row's softmax at its sink (every pattern made of key intervals, a block layout or
columns and slashes; capping is ~11% slower than not for a 256-key window at S = 4096), and
patterns without a native form (a union with a block layout), or where the kernels are not built,
on explicit scores under the pattern's mask (sparsec.attention_dispatch.explicit_attention: dense
work, in chunks of rows).
"""
from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from sparsec.attention_dispatch import causal_allowed, check_softcap, explicit_attention, head_mask, skip_fill
from sparsec.codegen import attention_cpu_plan
from sparsec.codegen.attention_cpu_choice import choose_blocks, choose_split
from sparsec.codegen.attention_cpu_native import Native, native_form, native_kernel, run_native
from sparsec.codegen.attention_cpu_plan import _bias, _block_masks, _Call, _folds, _plan, _Strided
from sparsec.codegen.cpu_threads import intra_op_threads
from sparsec.codegen.frame_order import FramesTransposed, natural_rows, transposed_rows
from sparsec.patterns import Dense, Pattern, Skip

__all__ = ["cpu_attention", "choose_blocks"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# native_form -> the native kernel's entry point.
_NATIVE_ENTRIES = {"intervals": "sparsec_interval_attention", "blocks": "sparsec_block_runs_attention",
                   "slashes": "sparsec_column_slash_attention"}
# Gathered K and V of one call stay under this many bytes: bounds memory at long lengths.
_GATHER_BYTES = 64 << 20



@dataclass(frozen=True, slots=True)
class _Operands:
    """One pattern's inputs. Batch row r of K/V is (batch b, kv head u); its c query heads are
    rows r * c .. r * c + c - 1 of q_rows and out_rows."""

    q_rows: torch.Tensor  # (R * c, nqb * bm, D) contiguous, zero-padded past Sq
    k_rows: torch.Tensor  # (R, Sk, D) contiguous
    v_rows: torch.Tensor  # (R, Sk, Dv) contiguous
    out_rows: torch.Tensor  # (R * c, nqb * bm, Dv)
    threads: int  # intra-op threads for the attention kernels
    # (R * c, nqb * bm, 1): each row's log-sum-exp of its scores (-inf: no kept key), for a
    # pattern run as parts (_merge); None: not needed
    lse_rows: torch.Tensor | None = None


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


def _attend(q, k, v, mask, scale: float, ops: _Operands) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDPA of q (g, R * c, M, D) on k, v (g or 1, R, L, D) -> (g, R * c, M, Dv), on ops.threads
    threads; the query heads of a kv head share its K/V (enable_gqa). With ops.lse_rows, also
    each row's log-sum-exp (g, R * c, M, 1) from the same fused kernel (its aten op returns it)."""
    gqa = q.shape[1] != k.shape[1]
    if ops.lse_rows is None:
        with intra_op_threads(ops.threads):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa), None
    if gqa and not _kernel_broadcasts_kv_heads():
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    if k.shape[0] != q.shape[0]:
        k, v = k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)
    D, Dv = q.shape[-1], v.shape[-1]
    if D < Dv:  # the op wants one head size: zero columns change no score (the scale is explicit)
        q, k = F.pad(q, (0, Dv - D)), F.pad(k, (0, Dv - D))
    elif Dv < D:
        v = F.pad(v, (0, D - Dv))
    with intra_op_threads(ops.threads):
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                           scale=scale)
    return o[..., :Dv], lse.unsqueeze(-1)


@functools.lru_cache(maxsize=1)
def _kernel_broadcasts_kv_heads() -> bool:
    """Whether torch's fused CPU attention op takes fewer K/V heads than query heads (GQA) itself:
    checked once on a tiny case against expanded K/V."""
    q, kv = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    try:
        found = op(q, kv, kv, 0.0, False)[0]
    except RuntimeError:
        return False
    return torch.allclose(found, op(q, kv.expand(1, 2, 4, 8), kv.expand(1, 2, 4, 8), 0.0, False)[0])


def _finish(o: torch.Tensor, lse: torch.Tensor | None, empty: torch.Tensor | None):
    """Rows with no kept key give 0 and a log-sum-exp of -inf (the kernels give NaN or 0)."""
    if empty is not None:
        o = o.masked_fill(empty, 0.0)
        if lse is not None:
            lse = lse.masked_fill(empty, float("-inf"))
    return o, lse


def _run_strided(s: _Strided, length: int, ops: _Operands, scale: float) -> None:
    """One call on strided views (_Strided): no copies but the output's."""
    q = _rows_view(ops.q_rows, s.count, s.rows, s.q_first, s.q_step)
    k = _rows_view(ops.k_rows, s.count, length, s.kv_first, s.kv_step)
    v = _rows_view(ops.v_rows, s.count, length, s.kv_first, s.kv_step)
    o, lse = _finish(*_attend(q, k, v, s.mask, scale, ops), s.empty_rows)
    _rows_view(ops.out_rows, s.count, s.rows, s.q_first, s.q_step).copy_(o)
    if lse is not None:
        _rows_view(ops.lse_rows, s.count, s.rows, s.q_first, s.q_step).copy_(lse)


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
        step = min(step, max(1, attention_cpu_plan._PLAN_CHUNK_PAIRS // (bm * call.length)))
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
        o, lse = _attend(q, k, v, mask, scale, ops)
        if fold:
            o = o.view(heads, g, bm, -1).transpose(0, 1)
            lse = None if lse is None else lse.view(heads, g, bm, 1).transpose(0, 1)
        o, lse = _finish(o, lse, empty)
        _store(ops.out_rows, o, call, chunk, bm)
        if lse is not None:
            _store(ops.lse_rows, lse, call, chunk, bm)


def _run_parts(plans, ops: _Operands, scale: float) -> None:
    """A pattern run as disjoint parts (codegen.attention_cpu_choice): each part's plan writes its
    output and log-sum-exp, merged into ops.out_rows as they come (rows' softmax over the union of
    the parts' keys). ops.out_rows holds the first part's output; later parts use one buffer."""
    first, *rest = plans
    total = torch.full(ops.out_rows.shape[:2] + (1,), float("-inf"))
    first_ops = replace(ops, lse_rows=total)
    for call in first.calls:
        _run_call(call, first.block_m, first_ops, scale)
    part_ops = replace(ops, out_rows=torch.empty_like(ops.out_rows), lse_rows=torch.empty_like(total))
    for plan in rest:
        part_ops.lse_rows.fill_(float("-inf"))  # rows of blocks the part does not read
        if plan.has_empty_blocks:
            part_ops.out_rows.zero_()
        for call in plan.calls:
            _run_call(call, plan.block_m, part_ops, scale)
        _merge(ops.out_rows, total, part_ops.out_rows, part_ops.lse_rows)


def _merge(out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor) -> None:
    """out, lse (attention over some keys, rows' log-sum-exp) become attention over those keys and
    the part's (disjoint from them), in place; rows with no key in either stay 0 with -inf."""
    merged = torch.logaddexp(lse, part_lse)
    shift = torch.where(torch.isfinite(merged), merged, 0.0)
    out.mul_(torch.exp(lse - shift)).addcmul_(part, torch.exp(part_lse - shift))
    lse.copy_(merged)


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


@functools.lru_cache(maxsize=4096)
def _head_index(heads: tuple[int, ...]) -> slice | torch.Tensor:
    """heads as a slice when they are consecutive and ascending, else as an index tensor."""
    first = heads[0]
    return slice(first, first + len(heads)) if heads == tuple(range(first, first + len(heads))) else torch.tensor(heads)


def _count(heads: slice | torch.Tensor) -> int:
    return heads.stop - heads.start if isinstance(heads, slice) else heads.shape[0]


def _select_heads(x: torch.Tensor, heads: slice | torch.Tensor) -> torch.Tensor:
    """x[:, heads]: a view for a slice, a copy for an index tensor."""
    return x[:, heads] if isinstance(heads, slice) else x.index_select(1, heads)


def _store_heads(out: torch.Tensor, heads: slice | torch.Tensor, rows: torch.Tensor) -> None:
    """out[:, heads] = rows."""
    if isinstance(heads, slice):
        out[:, heads] = rows
    else:
        out.index_copy_(1, heads, rows)


def _table_operands(q, k, v, table: _HeadTable, frame: int | None) -> tuple[torch.Tensor, ...]:
    """q of the table's query heads, k and v of its kv heads (each kv head serves the next c query
    heads); in frame-transposed order when frame is given (one strided copy each)."""
    picked = tuple(_select_heads(x, heads) for x, heads in ((q, table.q_heads), (k, table.kv_heads),
                                                             (v, table.kv_heads)))
    return picked if frame is None else tuple(transposed_rows(x, frame) for x in picked)


def _store_natural(out: torch.Tensor, heads: slice | torch.Tensor, rows: torch.Tensor, frame: int) -> None:
    """out[:, heads] = rows (B, n, S, Dv) in frame-transposed order, put back in natural order:
    one copy for consecutive heads."""
    natural = natural_rows(rows, frame)  # (B, n, frames, frame, Dv)
    if isinstance(heads, slice):
        target = out[:, heads]
        target.view(natural.shape).copy_(natural)
    else:
        out.index_copy_(1, heads, natural.reshape(rows.shape))


def _sparse_heads(q, k, v, pattern: Pattern, table: _HeadTable, causal: bool, scale: float,
                  block_m: int | None, split: bool | None, frames: bool | None, native: bool | None, threads: int,
                  out: torch.Tensor) -> None:
    """Writes the output of the query heads of `table` to out (B, Hq, Sq, Dv): straight into it
    when its rows of those heads are one contiguous block in token order and Sq needs no padding,
    else through a buffer (a padded one, or one in frame-transposed order: codegen.frame_order)."""
    B, Hq, Sq, _ = q.shape
    Sk, Dv = k.shape[2], v.shape[-1]
    bm, parts = choose_split(pattern, Sq, Sk, causal, block_m, rows=q.shape[0] * _count(table.q_heads),
                             width=q.shape[-1] + Dv, threads=threads, split=split, frames=frames, native=native)
    if isinstance(parts[0], Native) and isinstance(parts[0].pattern, FramesTransposed):
        _native_transposed_heads(q, k, v, parts[0].pattern, table, causal, scale, threads, out)
        return
    if isinstance(parts[0], Native):
        heads = table.q_heads
        heads = list(range(Hq)[heads]) if isinstance(heads, slice) else heads.tolist()
        run_native(q.contiguous(), k.contiguous(), v.contiguous(), out, heads, parts[0].pattern, causal, scale,
                   threads)  # the pattern, or the VerticalSlash with its keys (narrow bands run faster as slashes)
        return
    plans = [_plan(part, Sq, Sk, causal, bm) for part in parts]
    frame = parts[0].frame if isinstance(parts[0], FramesTransposed) else None
    q_heads, k_heads, v_heads = _table_operands(q, k, v, table, frame)
    q_rows = _padded_rows(q_heads, bm)
    k_rows = k_heads.contiguous().view(-1, Sk, k.shape[-1])
    v_rows = v_heads.contiguous().view(-1, Sk, Dv)
    target = out[:, table.q_heads] if isinstance(table.q_heads, slice) and frame is None else None
    direct = target is not None and target.is_contiguous() and q_rows.shape[1] == Sq
    zeroed = plans[0].has_empty_blocks  # its blocks that read no key: 0 (later parts have their own buffer)
    if direct:
        out_rows = target.view(q_rows.shape[0], Sq, Dv)
        if zeroed:
            out_rows.zero_()
    else:
        out_rows = (torch.zeros if zeroed else torch.empty)(q_rows.shape[0], q_rows.shape[1], Dv, dtype=out.dtype)
    if len(plans) == 1:
        ops = _Operands(q_rows, k_rows, v_rows, out_rows, threads)
        for call in plans[0].calls:
            _run_call(call, bm, ops, scale)
    else:
        _run_parts(plans, _Operands(q_rows, k_rows, v_rows, out_rows, threads), scale)
    if not direct:
        rows = out_rows.view(B, q_rows.shape[0] // B, -1, Dv)[:, :, :Sq]
        if frame is not None:
            _store_natural(out, table.q_heads, rows, frame)
        else:
            _store_heads(out, table.q_heads, rows)


def _native_transposed_heads(q, k, v, pattern: FramesTransposed, table: _HeadTable, causal: bool, scale: float,
                             threads: int, out: torch.Tensor) -> None:
    """The heads of `table` on the native interval kernel in frame-transposed order: their q and
    their kv heads' k and v gathered into that order (each kv head serves the next c query heads,
    as the kernel's GQA map reads them), the output gathered back into out."""
    q_t, k_t, v_t = _table_operands(q, k, v, table, pattern.frame)
    out_t = torch.empty(*q_t.shape[:3], v.shape[-1], dtype=out.dtype)
    run_native(q_t, k_t, v_t, out_t, list(range(q_t.shape[1])), pattern, causal, scale, threads)
    _store_natural(out, table.q_heads, out_t, pattern.frame)


def _dense_heads(q, k, v, heads: tuple[int, ...], causal: bool, scale: float, threads: int) -> torch.Tensor:
    """(B, len(heads), Sq, Dv): plain SDPA per kv head, K/V expanded over its query heads (no copy).
    Only for non-causal, or causal with Sq == Sk (SDPA's causal mask is aligned to the first query)."""
    B, Hq, Sq, _ = q.shape
    group = Hq // k.shape[1]
    if len(heads) == Hq:  # every head: one call; SDPA reads each kv head for its query heads
        gqa = {"enable_gqa": True} if group > 1 else {}
        with intra_op_threads(threads):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **gqa)
    if group == 1:  # some heads, no GQA: one call on those heads
        index = _head_index(heads)
        q, k, v = _select_heads(q, index), _select_heads(k, index), _select_heads(v, index)
        with intra_op_threads(threads):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    outs = []
    for kv, members in _by_kv_head(heads, group).items():
        kv_k = k[:, kv:kv + 1].expand(-1, len(members), -1, -1)
        kv_v = v[:, kv:kv + 1].expand(-1, len(members), -1, -1)
        with intra_op_threads(threads):
            outs.append(F.scaled_dot_product_attention(q[:, members], kv_k, kv_v, is_causal=causal, scale=scale))
    order = [h for members in _by_kv_head(heads, group).values() for h in members]
    out = torch.cat(outs, dim=1)
    return out[:, [order.index(h) for h in heads]]


def _by_kv_head(heads: tuple[int, ...], group: int) -> dict[int, list[int]]:
    by_kv: dict[int, list[int]] = defaultdict(list)
    for h in heads:
        by_kv[h // group].append(h)
    return dict(by_kv)


@functools.lru_cache(maxsize=4096)
def _head_tables(heads: tuple[int, ...], group: int) -> tuple[_HeadTable, ...]:
    """Split heads (ascending) into tables where each of their kv heads has exactly c of the heads."""
    by_count: dict[int, list[list[int]]] = defaultdict(list)
    for members in _by_kv_head(heads, group).values():
        by_count[len(members)].append(members)
    return tuple(_HeadTable(_head_index(tuple(h for members in tables for h in members)),
                            _head_index(tuple(members[0] // group for members in tables)))
                 for tables in by_count.values())


@functools.lru_cache(maxsize=4096)
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
    split: bool | None = None,
    frames: bool | None = None,
    native: bool | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact sparse attention on CPU (semantics of sparsec.attention, DESIGN.md): head h keeps the
    pairs of head_patterns[h] (and j <= i + Sk - Sq when causal); rows with no kept key are 0.
    block_m overrides the query block size chosen per pattern (choose_blocks); block_n is
    accepted for the tiles API and unused (keys are read as exact runs, not tiles). split
    True / False runs patterns of bands far apart as parts / whole instead of as the estimate
    decides, and frames True / False runs patterns with a frame stride in frame-transposed /
    natural token order, and native True / False runs patterns of a few key intervals a row and
    block-sparse layouts on the native kernels (where they are built) / torch's kernel (codegen.attention_cpu_choice;
    for benchmarks and tests: the result is the same). softcap > 0 caps every score s (scale * q.k)
    to softcap * tanh(s / softcap) before the pattern and the softmax: torch's kernel has no such
    step, so those heads run on the native kernels (where they are built and `native` is not False)
    or on explicit scores (masked, dense work: _modified_heads). sinks: (Hq,) float32 logits that
    join each row's softmax of their head (sparsec.attention), run the same way."""
    _check_inputs(q, k, v, head_patterns, scale)
    softcap = check_softcap(softcap, "cpu_attention")
    for name, value in (("split", split), ("frames", frames), ("native", native)):
        if value not in (None, True, False):
            raise ValueError(f"cpu_attention: {name} must be None, True or False, got {value!r}")
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"cpu_attention: {name} must be a positive int, got {value!r}")
    threads = torch.get_num_threads()
    with intra_op_threads(1):  # copies on one thread, attention kernels on all (see codegen.cpu_threads)
        return _attention(q, k, v, head_patterns, causal, float(scale), block_m, split, frames, native, threads,
                          float(softcap), sinks)


def _attention(q, k, v, head_patterns, causal: bool, scale: float, block_m: int | None, split: bool | None,
               frames: bool | None, native: bool | None, threads: int, softcap: float,
               sinks: torch.Tensor | None) -> torch.Tensor:
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    qf, kf, vf = q.float(), k.float(), v.float()  # fp32 accumulation for bf16 / fp16 too (no-ops for fp32)
    by_pattern = _heads_by_pattern(tuple(head_patterns))
    modified = bool(softcap) or sinks is not None  # scores torch's kernel cannot compute
    if len(by_pattern) == 1 and isinstance(by_pattern[0][0], Dense) and (not causal or Sq == Sk) and not modified:
        return _dense_heads(qf, kf, vf, by_pattern[0][1], causal, scale, threads).to(q.dtype)
    out = torch.empty(B, Hq, Sq, v.shape[-1], dtype=torch.float32)
    for pattern, heads in by_pattern:
        if isinstance(pattern, Skip):
            for h in heads:
                out[:, h] = skip_fill(vf[:, h // group : h // group + 1], Sq, pattern.fill, causal)[:, 0]
        elif modified:
            _modified_heads(qf, kf, vf, pattern, heads, causal, scale, softcap, sinks, native, threads, out)
        elif isinstance(pattern, Dense) and (not causal or Sq == Sk):
            _store_heads(out, _head_index(heads), _dense_heads(qf, kf, vf, heads, causal, scale, threads))
        else:
            for table in _head_tables(heads, group):
                _sparse_heads(qf, kf, vf, pattern, table, causal, scale, block_m, split, frames, native, threads, out)
    return out.to(q.dtype)


def _modified_heads(q, k, v, pattern: Pattern, heads: tuple[int, ...], causal: bool, scale: float, softcap: float,
                    sinks: torch.Tensor | None, native: bool | None, threads: int, out: torch.Tensor) -> None:
    """Writes heads `heads` of out with `pattern`, soft-capped scores and / or sinks: on the native
    kernel that runs the pattern (it caps each score it computes and starts each row at its head's
    sink), or, where none is built or can run it (or native is False), on explicit scores under the
    pattern's mask (dense work and memory in chunks)."""
    Sq, Sk = q.shape[2], k.shape[2]
    form = None if native is False else native_form(pattern, Sq, Sk, causal)
    if form is not None and native_kernel(_NATIVE_ENTRIES[form]) is not None:
        run_native(q.contiguous(), k.contiguous(), v.contiguous(), out, list(heads), pattern, causal, scale, threads,
                   softcap=softcap, sinks=sinks)
        return
    group = q.shape[1] // k.shape[1]
    index = torch.tensor(heads)
    keep = head_mask(pattern, Sq, Sk, causal_allowed(Sq, Sk) if causal else None, q.device)
    with intra_op_threads(threads):
        out[:, index] = explicit_attention(q.index_select(1, index), k.index_select(1, index // group),
                                           v.index_select(1, index // group), scale, softcap, keep=keep,
                                           sinks=None if sinks is None else sinks.index_select(0, index))
