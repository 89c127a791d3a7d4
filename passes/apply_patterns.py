"""apply_patterns: put per-head attention patterns (and a Plan's tiles) on Attention ops.

Where the patterns come from, per attention layer (by module path):
  1. the option `attention_patterns` (module path or glob -> one Pattern for every head, or one
     per query head; SparsecConfig.patterns_for decides which entry applies);
  2. else the option `plan`: the layer's LayerPlan gives one pattern per query head and the tiles
     (block_m, block_n) the kernels run with. A plan for the "cpu" target leaves them to the CPU
     executor, which picks its query block per pattern (the search priced it so; there the
     tiles are only its block layouts' granularity).
The patterns land in the type of the score matrix, AttentionPatterns(...), and the tiles in
Attention.tiles; the rewrite turns both into arguments of the custom op.

A plan's patterns are positioned for the lengths its layer was tuned at: query i against key j of
a (q_len, kv_len) call. They apply to a call whose queries and keys line up the same way, Sk - Sq
= kv_len - q_len (provably, for symbolic lengths): a self-attention layer tuned at Sq = Sk gets
them at every length it is called with Sq = Sk, but not in a decoding step with a KV cache (Sq = 1
query against Sk keys), where the pattern's query 0 would be the first position, not the last;
such calls keep their dense scores (log line), as MInference runs decoding dense. The option
`attention_patterns` is applied as given, at every call (DESIGN.md's index semantics); where it
puts a pattern tied to query positions (windows, diagonals, slashes, block rows) on a call with
Sq != Sk, a warning says that query i is read as position i, which a decoding step's last
position is not.

An attention layer with a mask gets its patterns too: at run time, a call whose mask cuts the keys
to a prefix (the padded text of a video DiT, a caption's padding, a static KV cache's causal
mask) runs them on each batch row's kept keys, and any other call runs dense with its mask
(sparsec/key_padding.py). There the mask, not the static lengths, says how queries and keys line
up: a plan's layer tuned without the causal rule applies to padded keys (mask rule "keys"), one
tuned with it to causal prefixes aligned as at tuning (rule "causal:<kv_len - q_len>": a static
cache's prefill from position 0, not its decoding steps). A causal op with a mask keeps its
dense scores (log line). A layer left dense with a mask, not causal itself (option mask_bands: on,
or auto where the target is the CPU) gets Dense heads under the rule "band": a call whose mask is
a sliding window (Mistral's, Gemma's: each query keeps the last W keys up to its position, padding
cut too) runs the band as a pattern, which skips the keys outside it, a left-padded batch each row
on its own tokens, padded keys each row on its kept keys (when padded enough); any other mask keeps
its dense path. Block layouts with more blocks than a layer's lengths need are cut to their
top-left corner (at symbolic lengths, per call). The user's
errors raise SparsecUserError: a pattern list of the wrong length, a block layout of
attention_patterns with fewer blocks than the lengths need (a plan's leaves its layer dense), a
plan whose layer has other heads or head size than the model's, or a
plan none of whose layers is in a graph that has attention layers (a plan for another model).
"""
from __future__ import annotations

import dataclasses
import logging

import sympy

from sparsec import key_padding
from sparsec import patterns as P
from sparsec.config import SparsecConfig, SparsecUserError
from sparsec.ir.graph import Graph
from sparsec.ir.ops import Attention, Op
from sparsec.ir.types import AttentionPatterns, Dim, is_static
from sparsec.ops import BAND_MIN_DECODE_KEYS

__all__ = ["apply_patterns"]

log = logging.getLogger(__name__)


def _fit_block_layouts(op: Attention, head_patterns: tuple[P.Pattern, ...], source: str) -> tuple[P.Pattern, ...]:
    """The head patterns with their block layouts fitted to the layer's static lengths: a layout
    with more blocks is cut to its top-left corner (the call's queries and keys are its first rows
    and columns, as at a shorter length). A plan's layout with fewer gets the blocks past it kept
    (its calls are longer than it was tuned at: dense there; key_padding.patterns_at); one of the
    option attention_patterns raises SparsecUserError, except for fewer key blocks under a mask
    (each call's mask says whether its rows' kept keys fit). Symbolic lengths: fitted per call
    (sparsec.ops)."""
    Sq, Sk = op.scores.shape[2], op.scores.shape[3]
    if not (is_static(Sq) and is_static(Sk)):
        return head_patterns
    plan, fitted = source != "attention_patterns", {}
    for h, pattern in enumerate(head_patterns):
        parts = []
        for part in pattern.parts if isinstance(pattern, P.Union) else (pattern,):
            if isinstance(part, P.BlockSparse):
                (bq, bk), (rows, cols) = part.block, part.layout_shape
                need = (-(-Sq // bq), -(-Sk // bk))
                if plan:  # cut, or the blocks past it kept (as dense: no calibration call had them)
                    parts.append(key_padding.patterns_at((part,), Sq, Sk, widen=True)[0])
                    continue
                if rows < need[0] or cols < need[1] and op.mask is None:
                    raise SparsecUserError(
                        f"{source} for {op.module_path!r}, head {h}: BlockSparse layout has shape {(rows, cols)}, "
                        f"but Sq={Sq}, Sk={Sk} with block={part.block} need {need}"
                        + (" rows (columns may be fewer: padded keys)" if op.mask is not None else ""))
                if rows > need[0] or cols > need[1]:
                    part = P.BlockSparse.from_trusted_layout(part.layout[:need[0], :need[1]], part.block)
            parts.append(part)
        fitted[h] = P.union_of(parts)  # parts cut to one corner may be equal
    if any(fitted[h] != p for h, p in enumerate(head_patterns)):
        log.info("attention %s: block layouts of %s cut to Sq=%d, Sk=%d (their top-left corner)", op.module_path,
                 source, Sq, Sk)
    return tuple(fitted[h] for h in range(len(head_patterns)))


def _check_plan_layer(op: Attention, layer) -> None:
    head_dim = op.q.type.shape[-1]
    model = (op.num_heads, op.num_kv_heads, head_dim)
    planned = (layer.num_heads, layer.num_kv_heads, layer.head_dim)
    if model == (layer.num_heads, layer.num_heads, layer.head_dim) and model != planned:
        log.info("attention %s: its k and v reach it with every query head's copy (a GQA expansion sparsec does not "
                 "see through in this graph); the plan's patterns apply to the copies", op.module_path)
        return
    if model != planned:
        raise SparsecUserError(
            f"the plan's layer {op.module_path!r} has (heads, kv_heads, head_dim) = {planned}, the model's "
            f"has {model}: the plan was made for another model; tune this model again")


def _given(op: Attention, config: SparsecConfig) -> tuple[object, tuple[int, int] | None, str, str] | None:
    """(patterns, tiles, where they come from, mask rule) for `op`, or None to leave it dense."""
    given = config.patterns_for(op.module_path)
    if given is not None:
        return given, None, "attention_patterns", ""
    if config.plan is not None and op.module_path in config.plan.layers:
        layer = config.plan.layers[op.module_path]
        _check_plan_layer(op, layer)
        if op.mask is not None:  # the mask says at run time how queries and keys line up (key_padding)
            Sq = op.scores.shape[2]
            if layer.causal and layer.q_len > 1 and is_static(Sq) and Sq == 1:
                log.info("attention %s: a decoding step (one query) of a plan tuned on %d queries: dense kept, as "
                         "MInference decodes", op.module_path, layer.q_len)
                return None
            return layer.patterns, _plan_tiles(config.plan.target, layer.tiles), "the plan", _plan_rule(layer)
        Sq, Sk = op.scores.shape[2], op.scores.shape[3]
        if not _provably_equal(_difference(Sk, Sq), layer.kv_len - layer.q_len):
            log.info("attention %s is called with (Sq, Sk) = (%s, %s); the plan's patterns are for queries and keys "
                     "aligned as at (%d, %d) (Sk - Sq = %d); dense kept for this call", op.module_path, Sq, Sk,
                     layer.q_len, layer.kv_len, layer.kv_len - layer.q_len)
            return None
        return layer.patterns, _plan_tiles(config.plan.target, layer.tiles), "the plan", _plan_rule(layer)
    return None


def _plan_rule(layer) -> str:
    """A plan layer's rule (Attention.mask_rule): the masks its patterns run under (tuned with the
    causal rule at kv_len - q_len = D: "causal:D", else "keys"); without a mask too, where it says
    that its block layouts keep the blocks past them in longer calls (sparsec.ops)."""
    return f"causal:{layer.kv_len - layer.q_len}" if layer.causal else "keys"


def _difference(a: Dim, b: Dim) -> int | sympy.Expr:
    if is_static(a) and is_static(b):
        return a - b
    return sympy.sympify(str(a)) - sympy.sympify(str(b))


def _provably_equal(a: int | sympy.Expr, b: int) -> bool:
    """Whether a (possibly symbolic) length difference is b for every value of its symbols."""
    return a == b if isinstance(a, int) else sympy.simplify(a - b) == 0


def _plan_tiles(target: str, tiles) -> tuple[int, int] | None:
    """A plan's tiles for the kernels: None (the executor's own choice) when the plan's target
    prices the CPU executor (CostTable._block_m)."""
    from sparsec.cost_models.hardware import get_profile

    try:
        executor = get_profile(target, calibrated=False).executor
    except ValueError:  # a custom profile's name: its tiles are the kernels'
        executor = "triton"
    return None if executor == "cpu" else tuple(tiles)


def _bands_enabled(graph: Graph, config: SparsecConfig) -> bool:
    """Option mask_bands for this graph ("auto": where the target runs the CPU executor), decided
    once a graph, and only for one that has a masked attention layer (reading the target's
    profile touches the disk)."""
    if config.mask_bands == "off" or not any(op.mask is not None for op in graph.ops_of(Attention)):
        return False
    return config.mask_bands == "on" or config.hardware().executor == "cpu"


def _bands_apply(op: Attention, bands: bool) -> bool:
    """Whether a layer left dense runs its calls' masks by what they keep (`bands`: the option allows
    it): a sliding window's band, left padding, a causal prefix, or padded keys (a (B, 1, 1, S) mask
    too: rows padded enough run on their kept keys, sparsec.ops.PADDING_MIN_SHARE), on a layer not
    causal itself. Not in a decoding step (one query) unless its keys are known to be at least
    sparsec.ops.BAND_MIN_DECODE_KEYS (a static cache's): below, the op would take the dense path
    anyway, after reading the mask and paying its own call (a dynamic cache's length is a symbol)."""
    if not (bands and op.mask is not None and not op.causal):
        return False
    Sq, Sk = op.scores.shape[2], op.scores.shape[3]
    return not (is_static(Sq) and Sq == 1) or (is_static(Sk) and Sk >= BAND_MIN_DECODE_KEYS)


def _with_patterns(op: Attention, config: SparsecConfig, bands: bool) -> Op:
    given = _given(op, config)
    if given is None and _bands_apply(op, bands):
        log.debug("attention %s: calls run by what their mask keeps (a sliding window's band, a causal prefix, left "
                  "padding, padded keys); other masks run dense (rule 'band', sparsec/key_padding.py)", op.module_path)
        scores = op.scores.with_sparsity(AttentionPatterns(patterns=(P.Dense(),) * op.num_heads))
        return dataclasses.replace(op, scores=scores, mask_rule="band")
    if given is None:
        return op
    patterns, tiles, source, mask_rule = given
    if source == "attention_patterns":
        _warn_if_positional_across_lengths(op, patterns)
    if op.mask is not None and op.causal:
        log.info("attention %s is causal and has a mask; the patterns of %s are not applied (dense kept)",
                 op.module_path, source)
        return op
    if op.mask is not None:
        log.info("attention %s has a mask: the patterns of %s apply to calls whose mask cuts the keys to a prefix "
                 "(rule %r, sparsec/key_padding.py), others run dense with the mask", op.module_path, source,
                 mask_rule or "any prefix")
    try:
        head_patterns = P.normalize_head_patterns(patterns, op.num_heads)
    except (TypeError, ValueError) as e:
        raise SparsecUserError(f"{source} for {op.module_path!r}: {e}") from None
    head_patterns = _fit_block_layouts(op, head_patterns, source)
    scores = op.scores.with_sparsity(AttentionPatterns(patterns=head_patterns))
    log.debug("attention %s gets patterns %s (from %s)", op.module_path, head_patterns, source)
    return dataclasses.replace(op, scores=scores, tiles=tiles, mask_rule=mask_rule)


def _tied_to_query_positions(pattern: P.Pattern) -> bool:
    parts = pattern.parts if isinstance(pattern, P.Union) else (pattern,)
    return any(isinstance(part, (P.Window, P.MultiDiagonal, P.AShape, P.BlockSparse))
               or (isinstance(part, P.VerticalSlash) and part.offsets) for part in parts)


def _warn_if_positional_across_lengths(op: Attention, patterns) -> None:
    Sq, Sk = op.scores.shape[2], op.scores.shape[3]
    if Sq == Sk:  # the same int, or the same symbol
        return
    if isinstance(patterns, P.Pattern):
        patterns = (patterns,)
    if any(isinstance(p, P.Pattern) and _tied_to_query_positions(p) for p in patterns):
        log.warning("attention_patterns for %r: this call has (Sq, Sk) = (%s, %s) and its patterns place query i at "
                    "position i (key row i); in a decoding step with a KV cache the queries are the last Sq "
                    "positions, so windows and diagonals miss the recent keys. Tune a plan (its patterns keep "
                    "decoding dense) or give patterns that do not depend on query positions (Columns, Skip)",
                    op.module_path, Sq, Sk)


def _check_plan_fits(paths: list[str], config: SparsecConfig) -> None:
    """Refuse a plan that names none of this graph's attention layers (a plan for another model), and
    warn of the layers it does not name where it names others. (The plan's fingerprint covers the
    whole model, which no one graph shows when Dynamo splits it: each graph is checked on its own,
    its planned layers' heads and head size in _check_plan_layer.)"""
    if config.plan is None or not config.plan.layers:
        return
    if paths and not any(path in config.plan.layers for path in paths):
        raise SparsecUserError(
            f"the plan names none of this model's attention layers (model: {paths[:4]}..., plan: "
            f"{list(config.plan.layers)[:4]}...): it was made for another model; tune this model again")
    unplanned = sorted({path for path in paths if path not in config.plan.layers
                        and config.patterns_for(path) is None})
    if unplanned:
        log.warning("the plan has no entry for attention layer(s) %s of this model: they stay dense (a plan made for "
                    "another model, or layers its tuning could not record)", ", ".join(map(repr, unplanned)))


def _check_keys_match(paths: list[str], config: SparsecConfig) -> None:
    """Say which `attention_patterns` keys match none of this graph's attention layers: a warning when
    none matches any (the option changes nothing here: a typo, or layers in another graph), else a
    log line a key (they may match a graph Dynamo split off)."""
    if not config.attention_patterns:
        return
    if not paths:
        log.info("attention_patterns are given, but this graph has no attention layer sparsec recognises (forms its "
                 "matchers do not know, e.g. einsum scores, run as written)")
        return
    unmatched = config.unmatched_pattern_keys(paths)
    layers = ", ".join(map(repr, paths[:8])) + (", ..." if len(paths) > 8 else "")
    if len(unmatched) == len(config.attention_patterns):
        log.warning("no attention_patterns key (%s) matches an attention layer of this graph (%s): they stay dense",
                    ", ".join(map(repr, unmatched)), layers)
    elif unmatched:
        log.info("attention_patterns key(s) %s match no attention layer of this graph (%s)",
                 ", ".join(map(repr, unmatched)), layers)


def apply_patterns(graph: Graph, config: SparsecConfig) -> Graph:
    """`graph` with the configured patterns on the score types of its Attention ops."""
    paths = [op.module_path for op in graph.ops_of(Attention)]  # this graph's attention layers
    _check_plan_fits(paths, config)
    _check_keys_match(paths, config)
    bands = _bands_enabled(graph, config)
    ops = [_with_patterns(op, config, bands) if isinstance(op, Attention) else op for op in graph.ops]
    return graph.replace_ops(ops, provenance="apply_patterns")
