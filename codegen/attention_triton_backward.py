"""The attention backward in Triton: dQ, dK, dV (and the sinks' gradient) of triton_attention.

`triton_attention_backward` groups the query heads by pattern family as the forward does and runs
each group's two kernels (codegen/templates/backward.py) in one launch each, whatever the heads'
own parameters: the dQ kernel first (it also stores each row's log-sum-exp and D = rowsum(dO * O)),
then the dK / dV kernel. Both walk block lists of the pattern's block coverage
(templates/tables.py: backward_block_lists), built on the host once per (patterns, lengths, tiles,
causal) and cached on the device; the element mask runs on partially covered blocks only. Skip
heads are not a kernel: their scores move nothing (dQ = 0, dK = 0), and a "mean" head's uniform
weights give dV in closed form (torch ops). With GQA, a dK / dV program sums the group's query
heads that share its kv head; where a kv head's query heads run in more than one launch (several
families, or a "mean" Skip head beside them), the launches add into float32 dK / dV in turn.

Needs the forward's output (D comes from it), so callers save it; frame-transposed heads (an order
the forward chooses for itself) are not taken: their callers pass the heads' own patterns.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsec.codegen import kernel_cache
from sparsec.codegen.attention_triton import (
    LOG2E, HeadGroup, _device_tensor, _dot_precision, _group_params, _interpreting, group_heads, pattern_family,
    supports,
)
from sparsec.codegen.bounded_cache import bytes_bounded_cache
from sparsec.codegen.frame_order import FramesTransposed
from sparsec.codegen.kernel_call import KernelCall
from sparsec.codegen.templates import FAMILY_TEMPLATES
from sparsec.codegen.templates.backward import dkdv_kernel_name, dq_kernel_name, render_backward
from sparsec.codegen.templates.common import table_ids
from sparsec.codegen.templates.tables import backward_block_lists
from sparsec.codegen.tiles import AttentionTiles, BackwardTiles, default_backward_tiles, padded_head_dim
from sparsec.patterns import Pattern, Skip

__all__ = ["backward_kernel_calls", "backward_kernel_source", "backward_supports", "triton_attention_backward"]

log = logging.getLogger(__name__)


def backward_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      head_patterns: Sequence[Pattern]) -> str | None:
    """None when `triton_attention_backward` can run this call, else the reason it cannot."""
    reason = supports(q, k, v, head_patterns)
    if reason is None and any(isinstance(p, FramesTransposed) for p in head_patterns):
        return "frame-transposed patterns are the forward's own order; the backward takes the heads' patterns"
    return reason


@functools.lru_cache(maxsize=None)
def backward_kernel_source(family: str) -> str:
    """The generated Triton source of `family`'s two backward kernels."""
    if family not in FAMILY_TEMPLATES or family == "frames_transposed":
        raise ValueError(f"no attention backward kernels for family {family!r}")
    return render_backward(FAMILY_TEMPLATES[family])


@functools.lru_cache(maxsize=None)
def _kernel_module(family: str):
    return kernel_cache.load_source(backward_kernel_source(family), f"attention_backward_{family}")


def triton_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, head_patterns: Sequence[Pattern], *, causal: bool, scale: float,
                              softcap: float = 0.0, sinks: torch.Tensor | None = None,
                              tiles: BackwardTiles | None = None):
    """(dq, dk, dv, dsinks) of triton_attention(q, k, v, head_patterns, causal=, scale=, softcap=,
    sinks=) = out for the output gradient grad_out: dq, dk, dv in their inputs' dtypes, dsinks
    float32 (Hq,) or None without sinks (Skip heads do not use theirs: 0)."""
    head_patterns = tuple(head_patterns)
    reason = backward_supports(q, k, v, head_patterns)
    if reason is not None:
        raise ValueError(f"triton_attention_backward: {reason}")
    B, Hq, Sq, D = q.shape
    Sk, Dv = k.shape[2], v.shape[3]
    for name, t, shape in (("grad_out", grad_out, (B, Hq, Sq, Dv)), ("out", out, (B, Hq, Sq, Dv))):
        if tuple(t.shape) != shape or t.device != q.device:
            raise ValueError(f"triton_attention_backward: {name} has shape {tuple(t.shape)} on {t.device}, "
                             f"need {shape} on {q.device}")
    tiles = tiles or default_backward_tiles(max(D, Dv), q.dtype, Sq, Sk)
    if sinks is not None:  # the kernel reads one logit a head at SINK_LOGITS + head
        sinks = sinks.detach().reshape(-1).float().contiguous()
    buffers = _allocate(grad_out, q, k, v, out, sinks, head_patterns)
    for group in group_heads(head_patterns):
        if group.family == "skip":
            _skip_heads(buffers, group, causal)
            continue
        for call in _group_calls(group, buffers, bool(causal), float(scale), float(softcap), tiles):
            with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
                call.launch(getattr(_kernel_module(group.family), call.kernel))
    return buffers.dq, buffers.dk.to(k.dtype), buffers.dv.to(v.dtype), _sink_grads(buffers, head_patterns)


@dataclass(frozen=True)
class _Buffers:
    """The tensors one backward call reads (grad_out .. out, sinks) and writes (dq .. delta), and
    whether its dK / dV launches add to what earlier ones stored (`accumulate`)."""

    grad_out: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    lse: torch.Tensor
    delta: torch.Tensor
    sinks: torch.Tensor | None
    accumulate: bool


def _allocate(grad_out, q, k, v, out, sinks, head_patterns: tuple[Pattern, ...]) -> _Buffers:
    """The call's buffers: dQ in q's dtype; each row's log-sum-exp and D in float32; dK / dV a kv
    head, in k's and v's dtypes where one launch writes each kv head's (kv heads no launch writes,
    all Skip, are filled here), else zeros in float32 that each launch adds to."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    accumulate = _shared_kv_heads(head_patterns, Hq // Hkv)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    dk = torch.zeros(B, Hkv, Sk, D, dtype=torch.float32, device=q.device) if accumulate else torch.empty_like(
        k, memory_format=torch.contiguous_format)
    dv = torch.zeros(B, Hkv, Sk, Dv, dtype=torch.float32, device=q.device) if accumulate else torch.empty_like(
        v, memory_format=torch.contiguous_format)
    if not accumulate:
        untouched = sorted(set(range(Hkv)) - {h // (Hq // Hkv) for h, p in enumerate(head_patterns)
                                              if not isinstance(p, Skip)})
        if untouched:
            index = _device_tensor(tuple(untouched), q.device)
            dk.index_fill_(1, index, 0)
            dv.index_fill_(1, index, 0)
    return _Buffers(grad_out, q, k, v, out, torch.empty(B, Hq, Sq, D, dtype=q.dtype, device=q.device), dk, dv,
                    lse, torch.empty_like(lse), sinks, accumulate)


@functools.lru_cache(maxsize=4096)
def _shared_kv_heads(head_patterns: tuple[Pattern, ...], group_size: int) -> bool:
    """Whether some kv head's gradient comes from more than one launch: its query heads in two
    families, or a "mean" Skip head (dV in torch) beside a kernel's."""
    writers: dict[int, set[str]] = {}
    for h, p in enumerate(head_patterns):
        if not (isinstance(p, Skip) and p.fill == "zero"):  # a "zero" head adds nothing
            writers.setdefault(h // group_size, set()).add(pattern_family(p))
    return any(len(families) > 1 for families in writers.values())


def _sink_grads(buffers: _Buffers, head_patterns: tuple[Pattern, ...]) -> torch.Tensor | None:
    """A sink's score takes weight exp(sink - lse) and has no value: its gradient is -weight x D,
    summed over batch and rows. Rows that kept nothing and have no sink (lse -inf) give 0; Skip heads 0."""
    if buffers.sinks is None:
        return None
    weights = torch.exp2(buffers.sinks.float()[None, :, None] * LOG2E - buffers.lse)
    grads = -(weights * buffers.delta).nan_to_num(0.0, posinf=0.0, neginf=0.0).sum(dim=(0, 2))
    skip = tuple(h for h, p in enumerate(head_patterns) if isinstance(p, Skip))
    return grads.index_fill(0, _device_tensor(skip, grads.device), 0.0) if skip else grads


def _skip_heads(buffers: _Buffers, group: HeadGroup, causal: bool) -> None:
    """Skip heads: no score moves their output, so dQ = 0 and dK = 0; a "mean" head's output is the
    mean of V over the keys the causal rule allows (row i: its first count_i keys), so key j gets
    the sum of dO_i / count_i over the rows that allow it, added to its kv head's (dK, dV are zero
    where no launch writes them: _allocate)."""
    heads = _device_tensor(group.heads, buffers.q.device)
    buffers.dq.index_fill_(1, heads, 0)
    buffers.lse.index_fill_(1, heads, float("inf"))  # no weights: a sink there gets no gradient
    buffers.delta.index_fill_(1, heads, 0)
    mean_heads = [h for h, p in zip(group.heads, group.patterns) if p.fill == "mean"]
    if not mean_heads:
        return
    index = _device_tensor(tuple(mean_heads), buffers.q.device)
    grad = buffers.grad_out.index_select(1, index).float()  # (B, n, Sq, Dv)
    Sq, Sk = grad.shape[2], buffers.k.shape[2]
    if not causal:
        dv = (grad.sum(dim=2, keepdim=True) / Sk).expand(-1, -1, Sk, -1)
    else:  # row i allows keys j <= i + Sk - Sq: key j gets rows i >= j - (Sk - Sq)
        counts = (torch.arange(Sq, device=grad.device) + (Sk - Sq) + 1).clamp(0, Sk)
        per_row = grad / counts.clamp(min=1)[:, None].to(grad.dtype)
        suffix = per_row.flip(2).cumsum(2).flip(2)  # suffix[i] = sum of rows i..Sq-1
        suffix = torch.cat([suffix, suffix.new_zeros(*suffix.shape[:2], 1, suffix.shape[3])], dim=2)
        first_row = (torch.arange(Sk, device=grad.device) - (Sk - Sq)).clamp(0, Sq)
        dv = suffix.index_select(2, first_row)
    group_size = buffers.q.shape[1] // buffers.k.shape[1]
    kv_heads = sorted({h // group_size for h in mean_heads})  # summed in float32, then added once
    per_kv = dv.new_zeros(dv.shape[0], len(kv_heads), *dv.shape[2:])
    per_kv.index_add_(1, _device_tensor(tuple(kv_heads.index(h // group_size) for h in mean_heads), dv.device), dv)
    buffers.dv.index_add_(1, _device_tensor(tuple(kv_heads), dv.device), per_kv.to(buffers.dv.dtype))


def _group_calls(group: HeadGroup, buffers: _Buffers, causal: bool, scale: float, softcap: float,
                 tiles: BackwardTiles, interpreted: bool | None = None) -> tuple[KernelCall, KernelCall]:
    """The group's dQ launch and its dK / dV launch. `interpreted` (default: TRITON_INTERPRET) picks
    the dot precision, as attention_triton.kernel_call's."""
    b = buffers
    B, Hq, Sq, D = b.q.shape
    Hkv, Sk, Dv = b.k.shape[1], b.k.shape[2], b.v.shape[3]
    head_ids, params, layouts, counts = _group_params(group.family, group.heads, group.patterns, Sq, Sk, b.q.device)
    distinct, ids = table_ids(group.patterns)
    table_ids_tensor = _int32_tensor(tuple(ids), b.q.device)
    query_lists = _device_lists(distinct, Sq, Sk, tiles.dq.block_m, tiles.dq.block_n, causal, False, b.q.device)
    key_lists = _device_lists(distinct, Sq, Sk, tiles.dkdv.block_m, tiles.dkdv.block_n, causal, True, b.q.device)
    sinks = b.sinks if b.sinks is not None else head_ids  # unread without sinks
    kv_slots = _kv_slots(group.heads, Hq // Hkv)
    scales = (scale * LOG2E, (softcap or 1.0) * LOG2E, scale)
    precision = _dot_precision(b.q.dtype, _interpreting() if interpreted is None else interpreted)

    def constexprs(t: AttentionTiles) -> dict:
        return dict(HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=padded_head_dim(D), BLOCK_DV=padded_head_dim(Dv),
                    BLOCK_M=t.block_m, BLOCK_N=t.block_n, CAUSAL=causal, DOT_PRECISION=precision,
                    SOFTCAP=softcap > 0, NUM_PARAMS=params.shape[1], **counts, num_warps=t.num_warps,
                    num_stages=t.num_stages)
    path = Path(_kernel_module(group.family).__file__)
    dq_call = KernelCall(
        path, dq_kernel_name(group.family), (-(-Sq // tiles.dq.block_m), B * len(group.heads)),
        (b.q, b.k, b.v, b.out, b.grad_out, b.dq, b.lse, b.delta, head_ids, table_ids_tensor, params, layouts, sinks,
         *query_lists, *b.q.stride(), *b.k.stride(), *b.v.stride(), *b.out.stride(), *b.grad_out.stride(),
         *b.dq.stride(), Sq, Sk, len(group.heads), Hq // Hkv, Hq, *scales),
        dict(constexprs(tiles.dq), SINKS=b.sinks is not None))
    dkdv_call = KernelCall(
        path, dkdv_kernel_name(group.family), (-(-Sk // tiles.dkdv.block_n), B * len(kv_slots) // 3),
        (b.q, b.k, b.v, b.grad_out, b.dk, b.dv, b.lse, b.delta, head_ids, table_ids_tensor, params, layouts,
         _int32_tensor(kv_slots, b.q.device), *key_lists, *b.q.stride(), *b.k.stride(), *b.v.stride(),
         *b.grad_out.stride(), *b.dk.stride(), *b.dv.stride(), Sq, Sk, len(kv_slots) // 3, Hq, *scales),
        dict(constexprs(tiles.dkdv), ACCUMULATE=b.accumulate))
    return dq_call, dkdv_call


def _kv_slots(heads: tuple[int, ...], group_size: int) -> tuple[int, ...]:
    """(kv head, first slot, stop slot) for each kv head of a group's query heads (ascending, so a kv
    head's are consecutive slots), flattened: the dK / dV kernel's table of its programs' heads."""
    rows: list[int] = []
    for slot, head in enumerate(heads):
        if rows and rows[-3] == head // group_size:
            rows[-1] = slot + 1
        else:
            assert not rows or rows[-3] < head // group_size, "a group's heads are ascending"
            rows += [head // group_size, slot, slot + 1]
    return tuple(rows)


@functools.lru_cache(maxsize=4096)
def _int32_tensor(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


@bytes_bounded_cache(max_bytes=512 << 20)
def _device_lists(patterns: tuple[Pattern, ...], Sq: int, Sk: int, block_m: int, block_n: int, causal: bool,
                   by_key: bool, device: torch.device):
    """A kernel's block lists on `device` (templates/tables.backward_block_lists): (count, start,
    blocks) of the partial blocks, then of the whole ones; by query block (the dQ kernel's) or by
    key block (`by_key`: the dK / dV kernel's)."""
    lists = backward_block_lists(patterns, Sq, Sk, block_m, block_n, causal, by_key=by_key)
    return tuple(t.to(device) for part in lists for t in (part.count, part.start, part.blocks))


def backward_kernel_calls(grad_out, q, k, v, out, head_patterns: Sequence[Pattern], *, causal: bool, scale: float,
                          softcap: float = 0.0, sinks: torch.Tensor | None = None,
                          tiles: BackwardTiles | None = None, interpreted: bool | None = None) -> list[KernelCall]:
    """The launches `triton_attention_backward` makes (two a non-Skip family), on any device:
    codegen/triton_aot compiles them for a GPU from CPU tensors (interpreted=False)."""
    head_patterns = tuple(head_patterns)
    tiles = tiles or default_backward_tiles(max(q.shape[3], v.shape[3]), q.dtype, q.shape[2], k.shape[2])
    buffers = _allocate(grad_out, q, k, v, out, sinks, head_patterns)
    return [call for group in group_heads(head_patterns) if group.family != "skip"
            for call in _group_calls(group, buffers, bool(causal), float(scale), float(softcap), tiles, interpreted)]
