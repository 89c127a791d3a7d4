"""Attention patterns on layers whose mask only cuts the keys to a prefix.

Two kinds of explicit masks drop nothing but keys past a point, and the masked attention with
per-head patterns is then the patterned attention over the first L_b keys of batch row b: K and V
are sliced (views), block layouts are cut to the key blocks that remain, and the rows with the
same L_b run as one call.

  padded keys      the same keys j < L_b for every query: the padded text tokens of a video DiT
                   that attends over [video, text] tokens (HunyuanVideo: a (B, 1, 1, S) bool mask),
                   a caption's padding in cross-attention, transformers' padding masks. The
                   patterns run without the causal rule.
  causal prefix    query i keeps keys j <= i + d_b of the first L_b: the causal rule over them, as a
                   static KV cache's prefill (queries at positions 0..Sq-1 of a longer cache, d_b =
                   0), its chunks and decoding steps (d_b = L_b - Sq) mask it. The patterns run
                   with the causal rule on the L_b keys. A right-padded batch (transformers'
                   causal mask and padding in one) has rows whose last queries, the padding,
                   reach all L_b keys before the end: the L_b - d_b queries under the causal rule
                   run so, and the padding rows against all L_b keys under the patterns' explicit
                   masks (exact, dense; few rows).

Which masks a layer's patterns run under is its mask rule (Attention.mask_rule, an argument of
the op): "" either kind (the option attention_patterns: patterns as given); "keys" padded keys
only (a plan tuned without the causal rule: positions count from 0 for queries and keys alike);
"causal:D" a causal prefix whose d_b is D (a plan tuned with the causal rule at kv_len - q_len =
D: its query i is position i + D, which only such calls keep; a decoding step of a plan tuned on
prefill has d_b > 0 and runs dense, as MInference decodes).

`key_prefix_runs` says whether a call runs so. It does not (None; the op then runs the dense path
with the mask, exactly, and logs once per layer) when the mask varies with the head, keeps keys
that are not such a prefix, drops every key of a row, is a float bias with values other than 0 and
-inf (or the dtype's lowest value, which transformers uses), or breaks the layer's rule; when the
op is causal itself; or when a layout of the option attention_patterns has fewer key blocks than a
row's kept keys need. A plan's layout that has fewer (tuned on shorter text: no calibration call
had the keys past it) keeps the key blocks past it, as dense does.

The mask is read at run time (a traced graph cannot tell one mask from another): any shape that
broadcasts to (B, H, Sq, Sk), expanded (stride 0) or materialized. A materialized (B, 1, Sq, Sk)
mask is read twice (B x Sq x Sk bytes each): ~12 ms at Sq = Sk = 4352 on the 2-core CPU, where the
patterns' attention takes 40-160 ms; an expanded or (B, 1, 1, Sk) one costs microseconds.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from sparsec import patterns as P

__all__ = ["KeyRun", "MaskPrefix", "check_mask_rule", "key_prefix_runs", "mask_keep", "mask_prefixes",
           "patterns_for_keys", "run_key_prefix"]

_RULE = re.compile(r"(|keys|causal:-?\d+)")


def check_mask_rule(rule: str) -> None:
    """Raise TypeError / ValueError unless `rule` is "", "keys" or "causal:<int>"."""
    if not isinstance(rule, str):
        raise TypeError(f"mask rule must be a str, got {rule!r}")
    if not _RULE.fullmatch(rule):
        raise ValueError(f"mask rule must be '', 'keys' or 'causal:<int>', got {rule!r}")


@dataclass(frozen=True)
class MaskPrefix:
    """What a mask keeps of one batch row: the first `length` keys, for every query (offset None),
    or for query i those with j <= i + offset (the causal rule over them)."""

    length: int
    offset: int | None = None

    @property
    def causal(self) -> bool:
        return self.offset is not None

    def causal_queries(self, Sq: int) -> int:
        """How many leading queries the causal rule cuts (the rest, a right-padded batch's padding,
        keep all `length` keys)."""
        return Sq if self.offset is None else min(Sq, self.length - self.offset)


@dataclass(frozen=True)
class KeyRun:
    """Batch rows whose mask keeps the same prefix, and the head patterns cut to its keys."""

    rows: tuple[int, ...]
    prefix: MaskPrefix
    patterns: tuple[P.Pattern, ...]


def mask_keep(attn_mask: torch.Tensor, batch: int, Sq: int, Sk: int) -> torch.Tensor:
    """(B, Sq, Sk) bool view: what a mask key_prefix_runs accepted keeps (the pairs its runs keep)."""
    return _keep(attn_mask, batch, Sq, Sk).expand(batch, Sq, Sk)


def _keep(attn_mask: torch.Tensor, batch: int, Sq: int, Sk: int) -> torch.Tensor | None:
    """(1 or B, 1 or Sq, Sk) bool: what the mask keeps, or None when it may vary with the head or
    is a bias that weighs keys (not a bool mask, nor a float one of 0 and dropped values)."""
    if attn_mask.dim() > 4 or attn_mask.shape[-1] != Sk:
        return None
    m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if m.shape[0] not in (1, batch) or m.shape[2] not in (1, Sq):
        return None
    if m.shape[1] != 1 and m.stride(1) != 0 and not bool((m == m[:, :1]).all()):
        return None  # varies with the head
    m = m[:, 0]
    if m.shape[1] != 1 and m.stride(1) == 0:  # expanded along the queries: one row
        m = m[:, :1]
    if m.dtype == torch.bool:
        return m
    if not m.is_floating_point():
        return None
    keep = m == 0
    if not bool((keep | (m <= torch.finfo(m.dtype).min)).all()):  # -inf is below the lowest value too
        return None
    return keep


def mask_prefixes(attn_mask: torch.Tensor, batch: int, Sq: int, Sk: int) -> list[MaskPrefix] | None:
    """Per batch row, the prefix of keys the mask keeps (see MaskPrefix); None when the mask is
    not of the two kinds, or a row keeps no key."""
    keep = _keep(attn_mask, batch, Sq, Sk)
    if keep is None:
        return None
    kept = keep.view(torch.uint8)  # two passes over the mask, no copy of it (bool sums are 8x slower)
    rising = (kept[..., 1:] > kept[..., :-1]).any(-1)  # a kept key after a dropped one: not a prefix
    lowest, first_dropped = kept.min(-1)
    lengths = torch.where(lowest == 1, Sk, first_dropped)
    # one copy to the host (one synchronisation on a GPU): each query's kept keys, -1 where not a prefix
    lengths = torch.where(rising, -1, lengths).cpu()  # (B', Sq')
    if bool((lengths <= 0).any()):
        return None
    first, last = lengths[:, 0], lengths[:, -1]
    if keep.shape[1] == 1 or bool((lengths == first[:, None]).all()):  # one query: both kinds alike
        found = [MaskPrefix(int(n), int(n) - 1 if Sq == 1 else None) for n in first.tolist()]
    elif bool((lengths == torch.minimum(first[:, None] + torch.arange(Sq), last[:, None])).all()):
        found = [MaskPrefix(int(n), int(f) - 1) for n, f in zip(last.tolist(), first.tolist())]
    else:
        return None
    return found * batch if len(found) == 1 else found


def _follows(prefix: MaskPrefix, rule: str, Sq: int) -> bool:
    if rule == "":
        return True
    if rule == "keys":
        return not prefix.causal or Sq == 1
    return prefix.causal and prefix.offset == int(rule.split(":")[1])


def patterns_for_keys(head_patterns: tuple[P.Pattern, ...], Sq: int, length: int,
                      widen: bool = False) -> tuple[P.Pattern, ...] | None:
    """The head patterns over the first `length` keys: block layouts keep the key blocks those
    cover; one with fewer gets the missing blocks kept (`widen`) or gives None, as one whose query
    blocks do not fit Sq does. Other patterns name key positions, which the first `length` keys keep."""
    cut = {}
    for pattern in dict.fromkeys(head_patterns):
        parts = pattern.parts if isinstance(pattern, P.Union) else (pattern,)
        new_parts = []
        for part in parts:
            if isinstance(part, P.BlockSparse):
                (bq, bk), (rows, cols) = part.block, part.layout_shape
                need = math.ceil(length / bk)
                if rows != math.ceil(Sq / bq) or (cols < need and not widen):
                    return None
                if cols != need:
                    layout = part.layout[:, :need] if cols > need else torch.cat(
                        [part.layout, torch.ones(rows, need - cols, dtype=torch.bool)], dim=1)
                    part = P.BlockSparse.from_trusted_layout(layout, (bq, bk))
            new_parts.append(part)
        cut[pattern] = new_parts[0] if len(new_parts) == 1 else P.Union(new_parts)
    return tuple(cut[p] for p in head_patterns)


def key_prefix_runs(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor, is_causal: bool,
                    head_patterns: tuple[P.Pattern, ...], rule: str = "") -> list[KeyRun] | None:
    """How a call with `attn_mask` runs its patterns on key prefixes, or None (dense with the mask)."""
    if is_causal:
        return None
    B, Sq, Sk = q.shape[0], q.shape[2], k.shape[2]
    prefixes = mask_prefixes(attn_mask, B, Sq, Sk)
    if prefixes is None or not all(_follows(p, rule, Sq) for p in prefixes):
        return None
    runs = []
    for prefix in sorted(set(prefixes), key=lambda p: (p.length, -1 if p.offset is None else p.offset)):
        patterns = patterns_for_keys(head_patterns, Sq, prefix.length, widen=rule != "")
        if patterns is None:
            return None
        runs.append(KeyRun(tuple(b for b, p in enumerate(prefixes) if p == prefix), prefix, patterns))
    return runs


def run_key_prefix(q, k, v, runs: list[KeyRun], attend, scale: float) -> torch.Tensor:
    """The output of every run: attend(q, k, v, patterns, causal) on its rows and first keys (and
    the padding rows of a right-padded batch against them, _padding_rows)."""
    if len(runs) == 1 and len(runs[0].rows) == q.shape[0]:
        return _run(q, k, v, runs[0], attend, scale)
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    for run in runs:  # each run's rows, and only the keys they keep, copied
        rows, keys = torch.tensor(run.rows, device=q.device), slice(0, run.prefix.length)
        out[rows] = _run(q.index_select(0, rows), k[:, :, keys].index_select(0, rows),
                         v[:, :, keys].index_select(0, rows), run, attend, scale)
    return out


def _run(q, k, v, run: KeyRun, attend, scale: float) -> torch.Tensor:
    prefix, Sq = run.prefix, q.shape[2]
    k, v = k[:, :, :prefix.length], v[:, :, :prefix.length]
    causal_rows = prefix.causal_queries(Sq)
    if causal_rows == Sq:
        return attend(q, k, v, run.patterns, prefix.causal)
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    out[:, :, :causal_rows] = attend(q[:, :, :causal_rows], k, v, run.patterns, True)
    out[:, :, causal_rows:] = _padding_rows(q, k, v, run.patterns, causal_rows, scale)
    return out


def _padding_rows(q, k, v, head_patterns, first: int, scale: float) -> torch.Tensor:
    """Queries first.. of q (B, Hq, Sq, D) against every key of k, v (B, Hkv, L, D), each head
    under its pattern's explicit mask at (Sq, L), in float32 (a right-padded batch's padding rows:
    few, and their results unused, but exact). A row with no key gives 0; Skip heads: the mean of V
    or 0."""
    Sq, L, group = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape[0], q.shape[1], Sq - first, v.shape[-1], dtype=torch.float32, device=q.device)
    keeps = {}
    for h, pattern in enumerate(head_patterns):
        kh, vh = k[:, h // group].float(), v[:, h // group].float()
        if isinstance(pattern, P.Skip):
            if pattern.fill == "mean":
                out[:, h] = vh.mean(1, keepdim=True)
            continue
        if pattern not in keeps:
            keeps[pattern] = pattern.mask(Sq, L)[first:].to(q.device)
        scores = (q[:, h, first:].float() @ kh.transpose(-1, -2)) * scale
        probs = scores.masked_fill(~keeps[pattern], float("-inf")).softmax(-1).nan_to_num(0.0)
        out[:, h] = probs @ vh
    return out.to(q.dtype)
