"""apply_patterns: put the user's per-head attention patterns on Attention.scores.

The option `attention_patterns` maps a module path or glob ("blocks.*.attn") to one Pattern for
every head or a list of one Pattern per query head (SparsecConfig.patterns_for decides which
entry applies). The pattern lands in the type of the score matrix, AttentionPatterns(...), which
the rewrite turns into the custom op's `patterns` argument.

An attention layer with a mask or bias keeps its dense scores (log line): sparsec.attention has no
mask argument, and folding an arbitrary runtime mask into a pattern is not exact. A pattern list
of the wrong length or a block layout that does not fit the sequence lengths is the user's error
and raises SparsecUserError.
"""
from __future__ import annotations

import dataclasses
import logging

from sparsec import patterns as P
from sparsec.config import SparsecConfig, SparsecUserError
from sparsec.ir.graph import Graph
from sparsec.ir.ops import Attention, Op
from sparsec.ir.types import AttentionPatterns, is_static

__all__ = ["apply_patterns"]

log = logging.getLogger(__name__)


def _check_block_layouts(op: Attention, head_patterns: tuple[P.Pattern, ...]) -> None:
    Sq, Sk = op.scores.shape[2], op.scores.shape[3]
    if not (is_static(Sq) and is_static(Sk)):
        return  # sparsec.attention checks the lengths at run time
    for h, pattern in enumerate(head_patterns):
        for part in pattern.parts if isinstance(pattern, P.Union) else (pattern,):
            if isinstance(part, P.BlockSparse):
                try:
                    part.check_lengths(Sq, Sk)
                except ValueError as e:
                    raise SparsecUserError(f"attention_patterns for {op.module_path!r}, head {h}: {e}") from None


def _with_patterns(op: Attention, config: SparsecConfig) -> Op:
    given = config.patterns_for(op.module_path)
    if given is None:
        return op
    if op.mask is not None:
        log.info("attention %s has a mask or bias; its patterns are not applied (dense kept)", op.module_path)
        return op
    try:
        head_patterns = P.normalize_head_patterns(given, op.num_heads)
    except (TypeError, ValueError) as e:
        raise SparsecUserError(f"attention_patterns for {op.module_path!r}: {e}") from None
    _check_block_layouts(op, head_patterns)
    scores = op.scores.with_sparsity(AttentionPatterns(patterns=head_patterns))
    log.debug("attention %s gets patterns %s", op.module_path, head_patterns)
    return dataclasses.replace(op, scores=scores)


def apply_patterns(graph: Graph, config: SparsecConfig) -> Graph:
    """`graph` with the configured patterns on the score types of its Attention ops."""
    ops = [_with_patterns(op, config) if isinstance(op, Attention) else op for op in graph.ops]
    return graph.replace_ops(ops, provenance="apply_patterns")
