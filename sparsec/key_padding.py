"""Attention patterns on layers whose mask only pads keys at the end.

Many models pass an explicit mask that drops trailing keys and nothing else: the padded text
tokens of a video DiT that attends over [video, text] tokens (HunyuanVideo: a (B, 1, 1, S) bool
mask), the padding of a caption in cross-attention. Such a mask keeps keys j < L_b of batch row b
for every head and query, so the masked attention with per-head patterns is the patterned
attention over the first L_b keys: K and V are sliced (views), block layouts are cut to the key
blocks that remain, and the batch rows with the same L_b run as one call.

`key_prefix_runs` says whether a call can run so. It cannot (None; the op then runs the dense
path with the mask, exactly, and logs once per layer) when the mask varies with the query or the
head, keeps keys that are not a prefix, drops every key of a row, or is a float bias with values
other than 0 and -inf (or the dtype's lowest value, which transformers uses); when the layer is
causal (slicing the keys would move the causal rule's diagonal); or when a block layout has fewer
key blocks than a row's kept keys need (it was tuned on shorter text: it cannot say which of the
extra keys to keep).

The mask is read at run time (a traced graph cannot tell a key mask from an expanded one): a
mask of shape (B or 1, 1, 1, Sk), one expanded from it (stride 0 along heads and queries), or a
full one whose rows are all the same (transformers' (B, 1, Sq, Sk) padding masks; comparing them
reads B x Sq x Sk bytes, little beside the attention).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparsec import patterns as P

__all__ = ["KeyRun", "key_prefix_lengths", "key_prefix_runs", "patterns_for_keys",
           "run_key_prefix"]


@dataclass(frozen=True)
class KeyRun:
    """Batch rows whose kept keys are the first `length`, and the head patterns cut to them."""

    rows: tuple[int, ...]
    length: int
    patterns: tuple[P.Pattern, ...]


def _key_rows(attn_mask: torch.Tensor, batch: int, Sk: int) -> torch.Tensor | None:
    """(1 or B, Sk): the mask's one row per batch row, or None when it may vary with head or query."""
    if attn_mask.dim() > 4 or attn_mask.shape[-1] != Sk:
        return None
    m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if m.shape[0] not in (1, batch):
        return None
    for dim in (1, 2):  # the same along heads and queries (expanded: stride 0; else compared)
        if m.shape[dim] != 1 and m.stride(dim) != 0 and not bool((m == m.narrow(dim, 0, 1)).all()):
            return None
    return m[:, 0, 0]


def key_prefix_lengths(attn_mask: torch.Tensor, batch: int, Sk: int) -> list[int] | None:
    """Per batch row, L such that the mask keeps exactly keys j < L (1 <= L <= Sk) for every head
    and query; None when it is not such a mask (see the module docstring)."""
    rows = _key_rows(attn_mask, batch, Sk)
    if rows is None:
        return None
    if rows.dtype == torch.bool:
        keep = rows
    elif rows.is_floating_point():
        dropped = rows <= torch.finfo(rows.dtype).min  # -inf too
        keep = rows == 0
        if not bool((keep | dropped).all()):
            return None  # a bias that weighs keys, not only drops them
    else:
        return None
    lengths = keep.sum(-1)
    prefix = torch.arange(Sk, device=keep.device) < lengths[:, None]
    if not bool((keep == prefix).all()) or bool((lengths == 0).any()):
        return None
    found = [int(n) for n in lengths.tolist()]
    return found * batch if len(found) == 1 else found


def patterns_for_keys(head_patterns: tuple[P.Pattern, ...], Sq: int, length: int) -> tuple[P.Pattern, ...] | None:
    """The head patterns over the first `length` keys: block layouts keep the key blocks those
    cover; None when a layout has fewer (or its query blocks do not fit Sq). Other patterns name
    key positions, which the first `length` keys keep."""
    cut = {}
    for pattern in dict.fromkeys(head_patterns):
        parts = pattern.parts if isinstance(pattern, P.Union) else (pattern,)
        new_parts = []
        for part in parts:
            if isinstance(part, P.BlockSparse):
                (bq, bk), (rows, cols) = part.block, part.layout_shape
                need = math.ceil(length / bk)
                if rows != math.ceil(Sq / bq) or cols < need:
                    return None
                part = part if cols == need else P.BlockSparse.from_trusted_layout(part.layout[:, :need], (bq, bk))
            new_parts.append(part)
        cut[pattern] = new_parts[0] if len(new_parts) == 1 else P.Union(new_parts)
    return tuple(cut[p] for p in head_patterns)


def key_prefix_runs(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor, is_causal: bool,
                    head_patterns: tuple[P.Pattern, ...]) -> list[KeyRun] | None:
    """How a call with `attn_mask` runs its patterns on key prefixes, or None (dense with the mask)."""
    if is_causal:
        return None
    B, Sq, Sk = q.shape[0], q.shape[2], k.shape[2]
    lengths = key_prefix_lengths(attn_mask, B, Sk)
    if lengths is None:
        return None
    runs = []
    for length in sorted(set(lengths)):
        patterns = patterns_for_keys(head_patterns, Sq, length)
        if patterns is None:
            return None
        runs.append(KeyRun(tuple(b for b, n in enumerate(lengths) if n == length), length, patterns))
    return runs


def run_key_prefix(q, k, v, runs: list[KeyRun], attend) -> torch.Tensor:
    """The output of every run: attend(q, k, v, patterns) on its rows and first `length` keys."""
    if len(runs) == 1 and len(runs[0].rows) == q.shape[0]:
        run = runs[0]
        return attend(q, k[:, :, :run.length], v[:, :, :run.length], run.patterns)
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    for run in runs:
        rows, keys = torch.tensor(run.rows, device=q.device), slice(0, run.length)
        out[rows] = attend(q.index_select(0, rows), k[:, :, keys].index_select(0, rows),
                           v[:, :, keys].index_select(0, rows), run.patterns)
    return out
