"""Recognise a hand-written keep mask that is exactly the causal rule, built in the graph.

tril(ones(N, M), d)[a:, b:] keeps (i, j) iff j <= i + d + a - b, which is sparsec's causal rule
j <= i + (Sk - Sq) when d + a - b == Sk - Sq. Leading unsqueezes, expands, views and dtype casts
do not change it. Buffers (placeholders) hold values the graph does not show, so a tril
registered as a buffer is not recognised; only one computed in the graph is.
"""
from __future__ import annotations

import torch
from torch import fx

from .fx_utils import constant_scalar, is_op, shape_of, static_int

__all__ = ["causal_mask_nodes"]

aten = torch.ops.aten
prims = torch.ops.prims

_PASS_THROUGH = (aten.unsqueeze, aten.expand, aten.view, aten._unsafe_view, aten.reshape, aten.clone,
                 aten._to_copy, prims.convert_element_type, aten.alias)


def causal_mask_nodes(keep: fx.Node, Sq, Sk) -> tuple[fx.Node, ...] | None:
    """The nodes computing `keep` when it is the causal rule for (Sq, Sk) scores, else None."""
    sq, sk = static_int(Sq), static_int(Sk)
    if sq is None or sk is None:
        return None
    diagonal_shift, chain, node = 0, [], keep
    while isinstance(node, fx.Node) and not is_op(node, aten.tril):
        shift = _slice_shift(node) if is_op(node, aten.slice) else 0 if _passes(node) else None
        if shift is None:
            return None
        diagonal_shift += shift
        chain.append(node)
        node = node.args[0]
    if not isinstance(node, fx.Node) or not _all_true(node.args[0]):
        return None
    diagonal = node.args[1] if len(node.args) > 1 else node.kwargs.get("diagonal", 0)
    if diagonal + diagonal_shift != sk - sq:
        return None
    return (*chain, node, node.args[0])


def _passes(node: fx.Node) -> bool:
    """A step that keeps the last two dims' values: leading-dim reshapes, broadcasts and casts."""
    if not is_op(node, *_PASS_THROUGH) or not isinstance(node.args[0], fx.Node):
        return False
    before, after = shape_of(node.args[0]), shape_of(node)
    return before is not None and after is not None and len(before) >= 2 and len(after) >= 2 \
        and tuple(before[-2:]) == tuple(after[-2:])


def _slice_shift(node: fx.Node) -> int | None:
    """How a slice [start:] of the row (+start) or column (-start) dim moves the diagonal."""
    rank = len(shape_of(node.args[0]) or ())
    dim, start = node.args[1] if len(node.args) > 1 else 0, node.args[2] if len(node.args) > 2 else 0
    step = node.args[4] if len(node.args) > 4 else 1
    start = 0 if start is None else static_int(start)
    if rank < 2 or step != 1 or start is None or start < 0:
        return None
    dim %= rank
    if dim < rank - 2:
        return 0 if start == 0 else None
    return start if dim == rank - 2 else -start


def _all_true(node: object) -> bool:
    """ones(...) or full(..., c != 0), in any dtype."""
    if is_op(node, aten.ones):
        return True
    if is_op(node, aten.full):
        value = constant_scalar(node.args[1])
        return value is not None and value != 0
    return False
