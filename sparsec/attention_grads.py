"""The gradients of sparsec::attention: its weights recomputed a block of query rows at a time,
over the keys that block keeps.

The weights are the forward's, in float32 or wider: each head's pattern (on each row's kept keys
where a mask runs the patterns on key prefixes or left-padded rows, sparsec/key_padding.py; the
dense rule with the mask where it does not), the causal rule, a bool mask or float bias,
soft-capping, sinks, and Skip heads' uniform ("mean") or zero weights. For a block of query rows:

    P  = the block's weights, over the key columns some pair of the block keeps
    dP = dO V^T,   dS = P * (dP - rowsum(dP * P))     (0 for Skip heads: no score moves them)
    dQ = dS' K * scale,   dK += dS'^T Q * scale,   dV += P^T dO     (dS': dS through the soft cap)

A block is at most MAX_ROWS rows and ROWS_ELEMENTS of B x Hq x rows x Sk, so memory stays a few
blocks' worth, not Sq x Sk a head, and where the block keeps at most GATHER_SHARE of the keys (a
window's block: its width and its rows) only those are gathered and computed. Query heads
multiply against their kv head's K and V as (B, Hkv, group x rows, D) products, which also sum dK
and dV over each kv head's query heads (GQA) with no copies of K and V. A float mask's gradient
is dS summed to the mask's shape; a sink's is -(its weight) x rowsum(dP * P), summed over batch
and rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsec.attention_dispatch import softmax_with_sinks
from sparsec.key_padding import KeyRun, is_plan_rule, key_prefix_runs, mask_keep, patterns_at
from sparsec.patterns import Pattern, Skip

__all__ = ["attention_grads", "ROWS_ELEMENTS", "MAX_ROWS", "GATHER_SHARE"]

ROWS_ELEMENTS = 1 << 23  # B x Hq x rows x Sk of a block: 32 MB a float32 temporary
MAX_ROWS = 128           # and at most this many rows: a band's block then reads little more than its keys
GATHER_SHARE = 0.75      # a block computes only its kept keys where they are at most this share of Sk


@dataclass(frozen=True)
class _Rule:
    """What decides a call's weights, resolved once (as the forward resolves it): the head
    patterns at the call's lengths (None: the dense rule), the key runs a mask gives them (None:
    none, or no mask), the mask as 4 dims, and with runs the (B, Sq, Sk) pairs it keeps (a view)."""

    Sq: int
    Sk: int
    batch: int
    is_causal: bool
    head_patterns: tuple[Pattern, ...] | None
    runs: list[KeyRun] | None
    mask: torch.Tensor | None
    kept_by_mask: torch.Tensor | None

    @property
    def skip_heads(self) -> list[int]:
        return [h for h, p in enumerate(self.head_patterns or ()) if isinstance(p, Skip)]


def attention_grads(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    attn_mask: torch.Tensor | None, scale: float, is_causal: bool,
                    head_patterns: tuple[Pattern, ...] | None, mask_rule: str = "", softcap: float = 0.0,
                    sinks: torch.Tensor | None = None, mask_grad: bool = True,
                    mask_layout: torch.Tensor | None = None,
                    rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv, dmask, dsinks) of sparsec::attention(q, k, v, attn_mask, scale, is_causal,
    head_patterns, mask_rule=, softcap=, sinks=) for the output gradient grad_out; dmask is None
    unless the mask is a float bias and `mask_grad`, dsinks None without sinks. Each in float32 or
    wider. `mask_layout`: the forward's reading of the mask (sparsec::mask_layout), not read again.
    `rows` (first, stop): only those query rows' part (the others' dq 0, and nothing of theirs in
    dk, dv, dsinks): a right-padded run's padding queries, the rest of whose rows run elsewhere."""
    rule = _resolve(q, k, attn_mask, is_causal, head_patterns, mask_rule, mask_layout)
    dtype = torch.promote_types(q.dtype, torch.float32)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    kf, vf = k.to(dtype), v.to(dtype)
    first, stop = rows or (0, Sq)
    dq = (q.new_empty if (first, stop) == (0, Sq) else q.new_zeros)(B, Hq, Sq, D, dtype=dtype)
    dk = k.new_zeros(B, Hkv, Sk, D, dtype=dtype)
    dv = v.new_zeros(B, Hkv, Sk, v.shape[3], dtype=dtype)
    float_mask = rule.mask is not None and rule.mask.is_floating_point()
    dmask = rule.mask.new_zeros(rule.mask.shape, dtype=dtype) if float_mask and mask_grad else None
    dsinks = q.new_zeros(Hq, dtype=dtype) if sinks is not None else None
    skip = torch.zeros(Hq, dtype=torch.bool, device=q.device)
    skip[rule.skip_heads] = True
    step = max(1, min(Sq, MAX_ROWS, ROWS_ELEMENTS // max(1, B * Hq * Sk)))
    for r0 in range(first, stop, step):
        r1 = min(stop, r0 + step)
        keep, skip_weights = _block_pairs(rule, r0, r1, q.device, dtype)
        cols = _kept_columns(keep, skip_weights, Sk)
        if cols is not None and _count(cols) == 0:  # no key kept: every weight and gradient is 0
            dq[:, :, r0:r1] = 0
            continue
        if cols is not None:
            keep = _take(keep, -1, cols)
            skip_weights = None if skip_weights is None else _take(skip_weights, -1, cols)
        kc, vc = (t if cols is None else _take(t, 2, cols) for t in (kf, vf))
        q_rows, go_rows = (_grouped(t[:, :, r0:r1].to(dtype), Hkv) for t in (q, grad_out))
        scores = _ungrouped(q_rows @ kc.transpose(-1, -2), Hq) * scale
        slope = None
        if softcap:
            capped = torch.tanh(scores / softcap)
            slope, scores = 1.0 - capped * capped, capped * softcap
        if float_mask:
            scores = scores + _mask_block(rule.mask, r0, r1, cols).to(dtype)
        probs, sink = softmax_with_sinks(scores.masked_fill(~keep, float("-inf")), sinks)
        probs = probs.nan_to_num(0.0)  # a row with no key left gives 0
        if skip_weights is not None:
            probs = torch.where(skip[:, None, None], skip_weights, probs)
        grad_probs = _ungrouped(go_rows @ vc.transpose(-1, -2), Hq)
        through = (grad_probs * probs).sum(-1, keepdim=True)
        grad_scores = (probs * (grad_probs - through)).masked_fill(skip[:, None, None], 0.0)
        grad_raw = _grouped(grad_scores if slope is None else grad_scores * slope, Hkv)  # to q.k, past the cap
        dq[:, :, r0:r1] = _ungrouped(grad_raw @ kc, Hq) * scale
        _add_columns(dk, 2, cols, (grad_raw.transpose(-1, -2) @ q_rows) * scale)
        _add_columns(dv, 2, cols, _grouped(probs, Hkv).transpose(-1, -2) @ go_rows)
        if dmask is not None:
            _add_mask_grad(dmask, grad_scores, r0, r1, cols, Sq, Sk)
        if dsinks is not None:  # a sink's score has no value: its gradient is -(its weight) * through
            grad_sink = -(sink.nan_to_num(0.0) * through[..., 0]).masked_fill(skip[:, None], 0.0)
            dsinks += grad_sink.sum(dim=(0, 2))
    return dq, dk, dv, dmask, dsinks


def _resolve(q, k, attn_mask, is_causal: bool, head_patterns, mask_rule: str, mask_layout=None) -> _Rule:
    """The forward's decision (sparsec.ops._sparse_attention): with a mask, the patterns on the key
    runs it gives, or the dense rule; without, the patterns at the call's lengths (None: dense)."""
    B, Sq, Sk = q.shape[0], q.shape[2], k.shape[2]
    runs = None
    if head_patterns and attn_mask is not None:
        runs = key_prefix_runs(q, k, attn_mask, is_causal, head_patterns, mask_rule, mask_layout)
        head_patterns = None if runs is None else runs[0].patterns
    elif head_patterns:
        head_patterns = patterns_at(head_patterns, Sq, Sk, widen=is_plan_rule(mask_rule))
    mask = None
    if attn_mask is not None:
        mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    kept_by_mask = None if runs is None else mask_keep(attn_mask, B, Sq, Sk)
    return _Rule(Sq, Sk, B, bool(is_causal), head_patterns or None, runs, mask, kept_by_mask)


def _block_pairs(rule: _Rule, r0: int, r1: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Query rows r0..r1's kept pairs, (1 or B, 1 or Hq, rows, Sk) bool, and the Skip heads'
    weights there ((1 or B, Hq, rows, Sk), None without Skip heads)."""
    i = torch.arange(r0, r1)[:, None]
    j = torch.arange(rule.Sk)[None, :]
    allowed = (j <= i + (rule.Sk - rule.Sq)) if rule.is_causal else torch.ones(r1 - r0, rule.Sk, dtype=torch.bool)
    allowed = allowed.to(device)
    if rule.head_patterns is None:
        keep = allowed[None, None]
    elif rule.runs is None:
        keep = (allowed & _heads_keep(rule.head_patterns, i, j, rule.Sq, rule.Sk).to(device))[None]
    else:  # the mask as the forward read it: it drops pairs, a float one's lowest values as -inf
        allowed = allowed & rule.kept_by_mask[:, r0:r1]
        keep = allowed[:, None] & _runs_keep(rule.runs, rule.batch, len(rule.head_patterns), r0, r1, rule.Sq,
                                             rule.Sk).to(device)
    skip_weights = None
    if rule.skip_heads:  # uniform over the keys each row may attend (a run's row: its kept keys)
        uniform = allowed.to(dtype) / allowed.sum(-1, keepdim=True).clamp(min=1)
        skip_weights = torch.stack([uniform if isinstance(p, Skip) and p.fill == "mean" else torch.zeros_like(uniform)
                                    for p in rule.head_patterns], dim=-3)
    if rule.mask is not None and rule.mask.dtype == torch.bool:
        keep = keep & _mask_block(rule.mask, r0, r1, None)
    return keep, skip_weights


def _heads_keep(head_patterns: tuple[Pattern, ...], i: torch.Tensor, j: torch.Tensor, Sq: int,
                Sk: int) -> torch.Tensor:
    """(Hq or 1, rows, keys) bool: the pairs (i, j) each head's pattern keeps at Sq x Sk (Skip:
    none); one for all heads where they share their pattern."""
    shape = torch.broadcast_shapes(i.shape, j.shape)
    kept = {p: p.keep(i, j, Sq, Sk).expand(shape) for p in set(head_patterns)}
    if len(kept) == 1:
        return next(iter(kept.values()))[None]
    return torch.stack([kept[p] for p in head_patterns])


def _runs_keep(runs: list[KeyRun], batch: int, heads: int, r0: int, r1: int, Sq: int, Sk: int) -> torch.Tensor:
    """(B, Hq, rows, Sk) bool: the pairs of query rows r0..r1 each run's patterns keep, on its rows'
    own tokens (a left-padded row's from its first token, at position 0); the mask cuts the rest."""
    keep = torch.zeros(batch, heads, r1 - r0, Sk, dtype=torch.bool)
    for run in runs:
        first, length = run.prefix.first, run.prefix.length
        lo = max(r0, first)
        if lo >= r1:
            continue
        i = torch.arange(lo - first, r1 - first)[:, None]
        j = torch.arange(length - first)[None, :]
        keep[:, :, lo - r0:, first:length][list(run.rows)] = _heads_keep(run.patterns, i, j, Sq - first,
                                                                           length - first)
    return keep


Columns = slice | torch.Tensor  # a block's kept key columns: a run of them, or their indices (int64)


def _kept_columns(keep: torch.Tensor, skip_weights: torch.Tensor | None, Sk: int) -> Columns | None:
    """The key columns some pair of the block keeps, or None when they are more than GATHER_SHARE
    of the keys (the block then computes all of them)."""
    needed = keep.flatten(0, -2).any(0)
    if skip_weights is not None:
        needed = needed | (skip_weights.flatten(0, -2) > 0).any(0)
    if int(needed.sum()) > GATHER_SHARE * Sk:
        return None
    cols = needed.nonzero()[:, 0]
    if cols.numel() and int(cols[-1] - cols[0]) + 1 == cols.numel():  # one run (a window's block): views
        return slice(int(cols[0]), int(cols[-1]) + 1)
    return cols


def _count(cols: Columns) -> int:
    return cols.stop - cols.start if isinstance(cols, slice) else cols.numel()


def _take(t: torch.Tensor, dim: int, cols: Columns) -> torch.Tensor:
    """t's entries at cols along dim (a view for a run)."""
    if isinstance(cols, slice):
        return t.narrow(dim, cols.start, cols.stop - cols.start)
    return t.index_select(dim, cols)


def _add_columns(total: torch.Tensor, dim: int, cols: Columns | None, part: torch.Tensor) -> None:
    """total's entries at cols along dim += part (all of total where cols is None)."""
    if cols is None:
        total += part
    elif isinstance(cols, slice):
        _take(total, dim, cols).add_(part)
    else:
        total.index_add_(dim, cols, part)


def _mask_block(mask: torch.Tensor, r0: int, r1: int, cols: Columns | None) -> torch.Tensor:
    """The 4-dim mask at query rows r0..r1 (all of it where it has one row) and key columns cols."""
    rows = mask if mask.shape[2] == 1 else mask[:, :, r0:r1]
    return rows if cols is None or rows.shape[3] == 1 else _take(rows, 3, cols)


def _add_mask_grad(dmask: torch.Tensor, grad_scores: torch.Tensor, r0: int, r1: int, cols: Columns | None,
                   Sq: int, Sk: int) -> None:
    """Adds the block's score gradients (B, Hq, rows, kept keys) into the float mask's gradient,
    summed over what the mask broadcasts."""
    if cols is not None:  # back to every key, 0 at those the block did not compute
        full = grad_scores.new_zeros(*grad_scores.shape[:3], Sk)
        _add_columns(full, 3, cols, grad_scores)
        grad_scores = full
    per_row = dmask.shape[2] == Sq and Sq > 1
    target = dmask[:, :, r0:r1] if per_row else dmask
    target += grad_scores.sum_to_size(target.shape)


def _grouped(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, Hq, rows, X) -> (B, Hkv, group x rows, X): each kv head's query heads as one matrix."""
    B, Hq, rows, X = t.shape
    return t.reshape(B, kv_heads, (Hq // kv_heads) * rows, X)


def _ungrouped(t: torch.Tensor, heads: int) -> torch.Tensor:
    """_grouped's inverse: (B, Hkv, group x rows, X) -> (B, Hq, rows, X)."""
    B, kv_heads, grouped_rows, X = t.shape
    return t.reshape(B, heads, grouped_rows // (heads // kv_heads), X)
