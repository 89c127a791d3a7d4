"""Attention patterns on layers whose mask only cuts the keys to a prefix, left padding, and
sliding windows.

Three kinds of explicit masks drop nothing but keys past a point, or a row's leading padding, and
the masked attention with per-head patterns is then the patterned attention over the kept keys of
batch row b: K and V are sliced (views), block layouts are cut to the blocks that remain
(patterns_at), and the rows that keep the same keys run as one call.

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
  left padding     a causal call from position 0 whose row b starts with p_b padding tokens
                   (transformers' batched generation): its first p_b queries keep no key (their
                   output is 0, as SDPA gives such rows of a bool or -inf mask; with the dtype's
                   lowest value, transformers' float form, SDPA gives them the mean of V over all
                   keys: rows nothing reads, since every real query drops their keys) and query
                   i >= p_b keeps keys p_b..i. The patterns run with the causal rule on the
                   row's own tokens, shifted to position 0 (the row's first token is position 0
                   for its patterns, as its position ids say, so a row runs as it would unpadded).

One more kind runs for layers left dense (mask rule "band", option mask_bands):

  sliding window   query i keeps keys i + d_b - W .. i + d_b of the first L_b (Mistral's, Gemma's
                   local layers: the last W + 1 keys up to its position, right padding cut too;
                   padding longer than the window leaves its last queries no key: they give 0;
                   left padding, keys p_b.. only). Dense heads then run the band's pattern
                   (band_pattern: a Window) on the kept keys, which skips every key outside it;
                   heads with other patterns cannot be cut to a band (no intersection of
                   patterns), so such a call runs dense.

Which masks a layer's patterns run under is its mask rule (Attention.mask_rule, an argument of
the op): "band" all of them (Dense heads); "" any of the first three (the option
attention_patterns: patterns as given); "keys" padded keys only (a plan tuned without the causal
rule: positions count from 0 for queries and keys alike);
"causal:D" a causal prefix whose d_b is D, or left padding when D = 0 (a plan tuned with the
causal rule at kv_len - q_len = D: its query i is position i + D, which only such calls keep; a
decoding step of a plan tuned on prefill has d_b > 0 and runs dense, as MInference decodes).

`key_prefix_runs` says whether a call runs so. It does not (None; the op then runs the dense path
with the mask, exactly, and logs once per layer) when the mask varies with the head, keeps keys
that are not such a prefix, drops every key of a row, is a float bias with values other than 0 and
-inf (or the dtype's lowest value, which transformers uses), or breaks the layer's rule; when the
op is causal itself; or when a layout of the option attention_patterns has fewer blocks than a
row's kept queries and keys need. A plan's layout that has fewer (tuned on shorter rows: no
calibration call had the keys past it) keeps the blocks past it, as dense does.

The mask is read at run time (a traced graph cannot tell one mask from another): any shape that
broadcasts to (B, H, Sq, Sk), expanded (stride 0) or materialized. A materialized (B, 1, Sq, Sk)
mask costs two passes over B x Sq x Sk bytes and a few over an eighth of that (~6 ms at 4096^2
on the 2-core CPU, prefix or band, where the attention takes 40-300 ms); an expanded or
(B, 1, 1, Sk) one is read on the host in 0.06-0.2 ms (_row_runs; B 2-8, Sk 512-4096). Layers
of one compiled graph that read the same mask node share one reading: the rewrite inserts a
sparsec::mask_layout node (encode_prefixes) that they all take (decode_prefixes). A reading is
never cached on the tensor object: Inductor writes a later mask into the buffer of an earlier one
without bumping its version counter.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from sparsec import patterns as P
from sparsec.attention_dispatch import explicit_attention

__all__ = ["KeyRun", "MaskPrefix", "check_mask_rule", "decode_prefixes", "encode_prefixes", "is_plan_rule",
           "key_prefix_runs", "mask_keep", "mask_prefixes", "patterns_at", "run_key_prefix"]

_RULE = re.compile(r"(|keys|band|causal:-?\d+)")


def is_plan_rule(rule: str) -> bool:
    """Whether `rule` is a plan's ("keys", "causal:D"): its block layouts keep the blocks past them
    in longer calls and rows (no calibration call had them), where the option attention_patterns'
    ("") and a dense layer's ("band") do not."""
    return rule not in ("", "band")


def check_mask_rule(rule: str) -> None:
    """Raise TypeError / ValueError unless `rule` is "", "keys", "band" or "causal:<int>"."""
    if not isinstance(rule, str):
        raise TypeError(f"mask rule must be a str, got {rule!r}")
    if not _RULE.fullmatch(rule):
        raise ValueError(f"mask rule must be '', 'keys', 'band' or 'causal:<int>', got {rule!r}")


@dataclass(frozen=True)
class MaskPrefix:
    """What a mask keeps of one batch row: the first `length` keys, for every query (offset None),
    or for query i those with j <= i + offset (the causal rule over them), and with a `window`
    only those with j >= i + offset - window too (a sliding window: a band). With `first` > 0 (a
    left-padded row of a causal call from position 0), keys before `first` are dropped too and
    queries before it keep none."""

    length: int
    offset: int | None = None
    window: int | None = None
    first: int = 0  # left padding: keys and queries before it are padding (those queries keep no key)

    @property
    def causal(self) -> bool:
        return self.offset is not None

    @property
    def dense_heads_only(self) -> bool:
        """Whether only Dense heads can run under this mask: a band cuts patterns to a shape no
        pattern has (a left-padded row's patterns run on its own tokens, from position 0)."""
        return self.window is not None

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
    """Per batch row, the prefix of keys the mask keeps (see MaskPrefix), or the causal band of a
    sliding window; None when the mask is none of these kinds, or a row keeps no key."""
    return _read_prefixes(attn_mask, batch, Sq, Sk)


# encode_prefixes' stand-in for None (offset and window); offsets may be negative.
_NONE = -(1 << 62)


def encode_prefixes(prefixes: list[MaskPrefix] | None, batch: int, Sq: int, Sk: int) -> torch.Tensor:
    """(batch + 1, 4) int64: row 0 [read, batch, Sq, Sk] (read 0: the mask is no such kind), then
    each row's (length, offset, window, first). The output of sparsec::mask_layout."""
    layout = torch.zeros(batch + 1, 4, dtype=torch.int64)
    layout[0] = torch.tensor([prefixes is not None, batch, Sq, Sk])
    for b, p in enumerate(prefixes or ()):
        layout[b + 1] = torch.tensor([p.length, _NONE if p.offset is None else p.offset,
                                      _NONE if p.window is None else p.window, p.first])
    return layout


def decode_prefixes(layout: torch.Tensor, batch: int, Sq: int, Sk: int) -> list[MaskPrefix] | None | bool:
    """encode_prefixes' input from its output, or False when it was read for another shape."""
    rows = layout.tolist()
    read, *shape = rows[0]
    if shape != [batch, Sq, Sk]:
        return False
    if not read:
        return None
    return [MaskPrefix(length, None if offset == _NONE else offset, None if window == _NONE else window, first)
            for length, offset, window, first in rows[1:]]


def _read_prefixes(attn_mask: torch.Tensor, batch: int, Sq: int, Sk: int) -> list[MaskPrefix] | None:
    keep = _keep(attn_mask, batch, Sq, Sk)
    if keep is None:
        return None
    starts, ends = (_row_runs if keep.shape[1] == 1 else _runs)(keep.view(torch.int8))
    found = torch.stack([ends, starts]).cpu()  # one copy to the host (one synchronisation on a GPU)
    return _prefixes(found[0], found[1], batch, Sq)


def _runs(kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's kept keys as one run [start, end) (end -1 where they are not one run, 0 = start
    where there are none), from the steps between neighbouring keys (+1: a kept key after a
    dropped one, -1: the reverse): a run has at most one of each. The steps go into 8-byte words;
    the first and last word holding a step are found on the words (an eighth of the mask's
    elements) and decoded, and a word between them with a step means more than one run. About
    5 ms over a 4096^2 mask on the 2-core CPU (arg-reductions over the bytes took ~25)."""
    first_kept = kept[..., 0] == 1
    Sk = kept.shape[-1]
    if Sk == 1:
        return torch.zeros_like(first_kept, dtype=torch.int64), first_kept.to(torch.int64)
    width = -(-(Sk - 1) // 8) * 8
    steps = kept.new_zeros(*kept.shape[:-1], width)
    torch.sub(kept[..., 1:], kept[..., :-1], out=steps[..., :Sk - 1])
    words64 = steps.view(torch.int64)
    holding = words64 != 0                                      # (..., words): a word holds a step
    words = holding.shape[-1]
    first = holding.view(torch.uint8).argmax(-1)
    last = words - 1 - holding.flip(-1).view(torch.uint8).argmax(-1)
    between = holding.clone()
    between.scatter_(-1, first[..., None], False)
    between.scatter_(-1, last[..., None], False)
    # the bytes of the first and last word (the last counted once when it is the first), positioned
    found = torch.cat([words64.gather(-1, w[..., None]).view(torch.int8) for w in (first, last)], -1)
    found[..., 8:] *= (last != first)[..., None].to(torch.int8)
    position = torch.cat([first[..., None] * 8, last[..., None] * 8], -1).repeat_interleave(8, -1) + torch.arange(
        8, device=kept.device).repeat(2)
    far = torch.iinfo(torch.int64).max
    rises, falls = (found == 1).sum(-1), (found == -1).sum(-1)
    rise = torch.where(found == 1, position, far).min(-1).values
    fall = torch.where(found == -1, position, far).min(-1).values
    ordered = (rises == 1) & ((falls == 0) | (fall > rise))
    alone = ~between.any(-1)  # no step outside the two words
    one_run = alone & (falls <= 1) & torch.where(first_kept, rises == 0, ordered)
    starts = torch.where(first_kept, 0, rise + 1)
    ends = torch.where(falls > 0, fall + 1, Sk)
    empty = ~first_kept & (rises == 0) & (falls == 0) & alone
    return torch.where(empty, 0, starts), torch.where(empty, 0, torch.where(one_run, ends, -1))


def _row_runs(kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """_runs for one row a batch entry ((B', 1, Sk): a padding mask, a decoding step's), on the
    host: a few hundred bytes to a few KB, where _runs' thirty-odd small ops cost ~300 us."""
    starts, ends = [], []
    for row in kept[:, 0].cpu().numpy():  # one copy to the host
        kept_keys = np.flatnonzero(row)
        if kept_keys.size == 0:
            start = end = 0
        else:
            start, end = int(kept_keys[0]), int(kept_keys[-1]) + 1
            end = end if end - start == kept_keys.size else -1
        starts.append(start)
        ends.append(end)
    return torch.tensor(starts)[:, None], torch.tensor(ends)[:, None]


def _prefixes(ends: torch.Tensor, starts: torch.Tensor, batch: int, Sq: int) -> list[MaskPrefix] | None:
    """MaskPrefix per batch row from each query's kept keys [start, end) ((B', Sq') or (B', 1);
    end -1 where they are not one run, start = end = 0 where a query keeps none)."""
    empty = (ends == 0) & (starts == 0)
    if bool(empty.any()):
        if bool(empty[:, -1].any()) and not bool(empty[:, 0].any()):
            return _past_the_window(ends, starts, empty, batch)
        return _left_padded(ends, starts, empty, batch)
    if bool((ends <= starts).any()):
        return None
    first, last = ends[:, 0], ends[:, -1]
    if ends.shape[1] == 1 or bool((ends == first[:, None]).all()):  # the same keys for every query
        if not bool((starts == starts[:, :1]).all()):
            return None
        if Sq == 1:  # one query: a band's keys, the last of them at the query's position
            found = [MaskPrefix(n, n - 1, n - 1 - a if a else None)
                     for n, a in zip(first.tolist(), starts[:, 0].tolist())]
        elif bool((starts == 0).all()):
            found = [MaskPrefix(int(n), None) for n in first.tolist()]
        else:
            return None
    elif bool((ends == torch.minimum(first[:, None] + torch.arange(ends.shape[1]), last[:, None])).all()):
        offsets = first - 1
        reach = offsets[:, None] + torch.arange(ends.shape[1])  # i + offset: query i's last allowed key
        windows = torch.where(starts > 0, reach - starts, -1).max(dim=1).values
        band = windows[:, None] >= 0
        if not bool(torch.where(band, starts == (reach - windows[:, None]).clamp(min=0), starts == 0).all()):
            return None
        found = [MaskPrefix(int(n), int(d), int(w) if w >= 0 else None)
                 for n, d, w in zip(last.tolist(), offsets.tolist(), windows.tolist())]
    else:
        return None
    return found * batch if len(found) == 1 else found


def _past_the_window(ends: torch.Tensor, starts: torch.Tensor, empty: torch.Tensor,
                     batch: int) -> list[MaskPrefix] | None:
    """Rows of a sliding window's band whose last queries keep no key: right padding longer than the
    window (query i keeps [i + d - W, min(i + d, L - 1)], empty from i = L - d + W on). Each row's
    band is read from its queries before the empty ones, which must be exactly those the band leaves
    empty; None for anything else."""
    rows, Sq = ends.shape
    i = torch.arange(Sq)
    first_empty = torch.where(empty, i, Sq).min(dim=1).values
    if not bool((empty == (i[None, :] >= first_empty[:, None])).all()):
        return None  # empty queries between live ones
    found = []
    for row, e in enumerate(first_empty.tolist()):
        if e == Sq:
            prefix = _prefixes(ends[row:row + 1], starts[row:row + 1], 1, Sq)
        else:
            prefix = _prefixes(ends[row:row + 1, :e], starts[row:row + 1, :e], 1, e)
            if prefix is not None and (prefix[0].window is None or prefix[0].offset is None
                                       or e != prefix[0].length - prefix[0].offset + prefix[0].window):
                return None
        if prefix is None:
            return None
        found += prefix
    return found * batch if rows == 1 else found


def _left_padded(ends: torch.Tensor, starts: torch.Tensor, empty: torch.Tensor, batch: int) -> list[MaskPrefix] | None:
    """Rows whose first p_b queries keep no key and query i >= p_b keeps [max(p_b, i - W), i]: the
    causal mask of a left-padded batch (transformers' batched generation) from position 0, with
    or without a sliding window; None for anything else."""
    rows, Sq = ends.shape
    if Sq == 1 or bool((ends < 0).any()):
        return None
    i = torch.arange(Sq)
    pads = empty.sum(dim=1)  # the empty queries must be the leading ones
    if not bool((empty == (i[None, :] < pads[:, None])).all()) or bool((pads >= Sq).any()):
        return None
    live = ~empty
    if not bool(torch.where(live, ends == i + 1, True).all()):
        return None
    windows = torch.where(live & (starts > pads[:, None]), i - starts, -1).max(dim=1).values
    floor = torch.where(windows[:, None] >= 0, torch.maximum(pads[:, None], i - windows[:, None]), pads[:, None])
    if not bool(torch.where(live, starts == floor, True).all()):
        return None
    found = [MaskPrefix(Sq, 0, int(w) if w >= 0 else None, int(p)) for p, w in zip(pads.tolist(), windows.tolist())]
    return found * batch if rows == 1 else found


def _follows(prefix: MaskPrefix, rule: str, Sq: int) -> bool:
    if rule == "band":
        return True
    if prefix.dense_heads_only:
        return False
    if rule == "":
        return True
    if rule == "keys":
        return not prefix.causal or Sq == 1
    return prefix.causal and prefix.offset == int(rule.split(":")[1])


@functools.lru_cache(maxsize=256)  # once a layer and length: a layout is cut row by row
def patterns_at(head_patterns: tuple[P.Pattern, ...], Sq: int, Sk: int,
                widen: bool = False) -> tuple[P.Pattern, ...] | None:
    """The head patterns for Sq queries against Sk keys lying at rows and columns 0.. of their
    block layouts (a shorter call, a row's kept keys, or a left-padded row's own tokens): a layout
    with more blocks is cut to its top-left corner; one with fewer gets the missing blocks kept
    (`widen`: a plan's, tuned on shorter calls, keeps them as dense does) or gives None. Other
    patterns name positions, which hold at any length."""
    cut = {}
    for pattern in dict.fromkeys(head_patterns):
        parts = pattern.parts if isinstance(pattern, P.Union) else (pattern,)
        new_parts = []
        for part in parts:
            if isinstance(part, P.BlockSparse):
                part = _layout_at(part, Sq, Sk, widen)
                if part is None:
                    return None
            new_parts.append(part)
        cut[pattern] = P.union_of(new_parts)  # parts cut to one corner may be equal
    return tuple(cut[p] for p in head_patterns)


def _layout_at(part: P.BlockSparse, Sq: int, Sk: int, widen: bool) -> P.BlockSparse | None:
    (bq, bk), (rows, cols) = part.block, part.layout_shape
    need = (math.ceil(Sq / bq), math.ceil(Sk / bk))
    if (rows, cols) == need:
        return part
    if (rows < need[0] or cols < need[1]) and not widen:
        return None
    layout = torch.ones(need, dtype=torch.bool)
    layout[:min(rows, need[0]), :min(cols, need[1])] = part.layout[:need[0], :need[1]]
    return P.BlockSparse.from_trusted_layout(layout, (bq, bk))


def key_prefix_runs(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor, is_causal: bool,
                    head_patterns: tuple[P.Pattern, ...], rule: str = "",
                    layout: torch.Tensor | None = None) -> list[KeyRun] | None:
    """How a call with `attn_mask` runs its patterns on key prefixes, or None (dense with the mask).
    `layout`: the mask already read (sparsec::mask_layout), used when read for this call's shape."""
    if is_causal:
        return None
    B, Sq, Sk = q.shape[0], q.shape[2], k.shape[2]
    prefixes = False if layout is None else decode_prefixes(layout, B, Sq, Sk)
    if prefixes is False:
        prefixes = mask_prefixes(attn_mask, B, Sq, Sk)
    if prefixes is None or not all(_follows(p, rule, Sq) for p in prefixes):
        return None
    runs = []
    for prefix in sorted(set(prefixes), key=lambda p: (p.length, -1 if p.offset is None else p.offset, p.window or 0,
                                                       p.first)):
        if prefix.dense_heads_only:
            patterns = _in_band(head_patterns, prefix, Sq)
        else:  # a left-padded row's patterns lie on its own tokens, from position 0
            patterns = patterns_at(head_patterns, Sq - prefix.first, prefix.length - prefix.first,
                                   widen=is_plan_rule(rule))
        if patterns is None:
            return None
        runs.append(KeyRun(tuple(b for b, p in enumerate(prefixes) if p == prefix), prefix, patterns))
    return runs


def band_pattern(window: int, offset: int, Sq: int) -> P.Pattern:
    """The pattern keeping j - i in [offset - window, offset] for queries 0..Sq-1 (the causal rule
    then cuts j > i + offset): Window when the band holds the diagonal, else Columns for one query
    or MultiDiagonal bands covering it."""
    if offset <= window:
        return P.Window(window - offset, offset)
    if Sq == 1:
        return P.Columns([(offset - window, offset + 1)])
    half = window // 2
    return P.MultiDiagonal(sorted({offset - window + half, offset - half}), half)


def _in_band(head_patterns: tuple[P.Pattern, ...], prefix: MaskPrefix, Sq: int) -> tuple[P.Pattern, ...] | None:
    """Dense heads as the band's pattern; None when a head has another pattern (a band cut of it is
    not a pattern sparsec has)."""
    if not all(isinstance(p, P.Dense) for p in head_patterns):
        return None
    # The call's queries, not only those the causal rule cuts: a right-padded row's padding queries run
    # the same pattern (_padding_rows), so one query's Columns shortcut holds only for a single query.
    band = band_pattern(prefix.window, prefix.offset, Sq - prefix.first)
    return (band,) * len(head_patterns)


def run_key_prefix(q, k, v, runs: list[KeyRun], attend, scale: float, softcap: float = 0.0,
                   sinks: torch.Tensor | None = None) -> torch.Tensor:
    """The output of every run: attend(q, k, v, patterns, causal) on its rows and first keys (and
    the padding rows of a right-padded batch against them, _padding_rows, with the scores capped
    by softcap and the (Hq,) sinks weighed, as attend does)."""
    if len(runs) == 1 and len(runs[0].rows) == q.shape[0]:
        return _run(q, k, v, runs[0], attend, scale, softcap, sinks)
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    for run in runs:
        rows = run_rows(run, q.device)
        if isinstance(rows, slice):  # consecutive rows (one, in a left-padded batch): views
            _run(q[rows], k[rows], v[rows], run, attend, scale, softcap, sinks, out=out[rows])
            continue
        keys = slice(0, run.prefix.length)  # only the kept keys copied
        out[rows] = _run(q.index_select(0, rows), k[:, :, keys].index_select(0, rows),
                         v[:, :, keys].index_select(0, rows), run, attend, scale, softcap, sinks)
    return out


def run_rows(run: KeyRun, device: torch.device) -> slice | torch.Tensor:
    """The run's batch rows: a slice where they are consecutive (views), else their indices on `device`."""
    b = run.rows[0]
    if run.rows == tuple(range(b, b + len(run.rows))):
        return slice(b, b + len(run.rows))
    return torch.tensor(run.rows, device=device)


def _run(q, k, v, run: KeyRun, attend, scale: float, softcap: float, sinks: torch.Tensor | None,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """One run's output, written into `out` when given."""
    prefix, Sq = run.prefix, q.shape[2]
    causal_rows = prefix.causal_queries(Sq)
    if not prefix.first and causal_rows == Sq:
        whole = attend(q, k[:, :, :prefix.length], v[:, :, :prefix.length], run.patterns, prefix.causal)
        return whole if out is None else out.copy_(whole)
    if out is None:
        out = q.new_empty(*q.shape[:3], v.shape[-1])
    if prefix.first:  # left padding: the queries and keys after it, shifted to position 0
        out[:, :, :prefix.first] = 0
        out[:, :, prefix.first:] = attend(q[:, :, prefix.first:], k[:, :, prefix.first:prefix.length],
                                          v[:, :, prefix.first:prefix.length], run.patterns, True)
        return out
    k, v = k[:, :, :prefix.length], v[:, :, :prefix.length]
    out[:, :, :causal_rows] = attend(q[:, :, :causal_rows], k, v, patterns_at(run.patterns, causal_rows, prefix.length),
                                     True)
    out[:, :, causal_rows:] = _padding_rows(q, k, v, run.patterns, causal_rows, scale, softcap, sinks)
    return out


def _padding_rows(q, k, v, head_patterns, first: int, scale: float, softcap: float,
                  sinks: torch.Tensor | None) -> torch.Tensor:
    """Queries first.. of q (B, Hq, Sq, D) against every key of k, v (B, Hkv, L, D), each head
    under its pattern's explicit mask at (Sq, L), on explicit scores (explicit_attention: capped by
    softcap, weighing the (Hq,) sinks, as the kernels do; a right-padded batch's padding rows: few,
    and their results unused, but exact). A row with no key gives 0; Skip heads: the mean of V or 0."""
    Sq, L, group = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]
    out = q.new_zeros(q.shape[0], q.shape[1], Sq - first, v.shape[-1])
    keeps = {}
    for h, pattern in enumerate(head_patterns):
        kv = slice(h // group, h // group + 1)
        if isinstance(pattern, P.Skip):
            if pattern.fill == "mean":
                out[:, h] = v[:, h // group].float().mean(1, keepdim=True).to(out.dtype)
            continue
        if pattern not in keeps:  # the mask of rows first.. only: keep() on those rows
            rows, keys = torch.arange(first, Sq)[:, None], torch.arange(L)[None, :]
            keeps[pattern] = pattern.keep(rows, keys, Sq, L).expand(Sq - first, L).to(q.device)
        out[:, h:h + 1] = explicit_attention(q[:, h:h + 1, first:], k[:, kv], v[:, kv], scale, softcap,
                                             keep=keeps[pattern], sinks=None if sinks is None else sinks[h:h + 1])
    return out
