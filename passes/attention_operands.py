"""Trace attention operands back through the reshapes that matmul and GQA leave in ATen graphs.

A (B, H, S, D) tensor reaches a bmm as view(clone(expand(x)), [B*H, S, D]) (torch.matmul's
decomposition) or as reshape(permute(...)) (diffusers' head_to_batch_dim); keys arrive
transposed; q or k may be pre-scaled by a constant; and GQA repeats kv heads by
view(clone(expand(unsqueeze(kv, 2)))). `trace_operand` undoes all of these, remembering the
constant factor, whether the last two dims were swapped, and the nodes it passed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .fx_utils import constant_scalar, is_op, same_size, shape_of

__all__ = ["Operand", "trace_operand", "relayout_step", "strip_gqa", "is_last_two_transpose"]

aten = torch.ops.aten
prims = torch.ops.prims

RESHAPES = (aten.view, aten._unsafe_view, aten.reshape)
COPIES = (aten.clone, aten.contiguous, aten.alias, aten.lift_fresh_copy)
CASTS = (aten._to_copy, prims.convert_element_type)


@dataclass(frozen=True, slots=True)
class Operand:
    """`source` is the furthest-up rank-4 tensor the operand is a relayout of, times `factor`,
    with the last two dims swapped when `transposed`. `passed` are the nodes from the operand up
    to (not including) source."""

    source: fx.Node
    factor: float
    transposed: bool
    passed: tuple[fx.Node, ...]


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    sa, sb = shape_of(a), shape_of(b)
    return sa is not None and sb is not None and len(sa) == len(sb) and all(map(same_size, sa, sb))


def _keeps_last_two(node: fx.Node, parent: fx.Node) -> bool:
    """A reshape that only splits or merges leading dims: the last two dims are unchanged."""
    s, p = shape_of(node), shape_of(parent)
    return s is not None and p is not None and len(s) >= 2 and len(p) >= 2 and \
        same_size(s[-1], p[-1]) and same_size(s[-2], p[-2])


def is_last_two_transpose(node: fx.Node) -> bool:
    if is_op(node, aten.transpose):
        rank = len(shape_of(node) or ())
        return rank >= 2 and sorted(d % rank for d in node.args[1:3]) == [rank - 2, rank - 1]
    if is_op(node, aten.permute):
        dims = list(node.args[1])
        rank = len(dims)
        return rank >= 2 and [d % rank for d in dims] == [*range(rank - 2), rank - 1, rank - 2]
    return False


def _scale_step(node: fx.Node, gm: fx.GraphModule | None) -> tuple[fx.Node, float] | None:
    """(tensor input, factor) for x * c, c * x or x / c with a readable constant c."""
    if not is_op(node, aten.mul, aten.div) or len(node.args) != 2:
        return None
    a, b = node.args
    if is_op(node, aten.mul) and constant_scalar(a, gm) is not None and isinstance(b, fx.Node):
        a, b = b, a
    c = constant_scalar(b, gm)
    if c is None or not isinstance(a, fx.Node) or not _same_shape(node, a):
        return None
    if is_op(node, aten.div):
        return (a, 1.0 / c) if c != 0 else None
    return a, c


def _identity_view(node: fx.Node) -> bool:
    """An expand or slice that keeps its input's shape: the same tensor (x[:, :, None, :, :] leaves
    a slice over a whole dim where the dim is symbolic)."""
    return is_op(node, aten.expand, aten.slice) and isinstance(node.args[0], fx.Node) and _same_shape(node,
                                                                                                   node.args[0])


def relayout_step(node: fx.Node, gm: fx.GraphModule | None) -> tuple[fx.Node, float, bool] | None:
    """One step up: (parent, factor, swaps last two) if node is a relayout or scaling of parent."""
    if is_op(node, *RESHAPES) and isinstance(node.args[0], fx.Node) and _keeps_last_two(node, node.args[0]):
        return node.args[0], 1.0, False
    if is_op(node, *COPIES) or _identity_view(node):
        return node.args[0], 1.0, False
    if is_last_two_transpose(node):
        return node.args[0], 1.0, True
    scaled = _scale_step(node, gm)
    return (scaled[0], scaled[1], False) if scaled else None


def trace_operand(node: fx.Node, gm: fx.GraphModule | None = None) -> Operand | None:
    """Climb from a bmm operand to the furthest rank-4 tensor it is a relayout of; None if the
    climb never meets a rank-4 tensor."""
    best: Operand | None = None
    factor, transposed, passed = 1.0, False, []
    current = node
    while True:
        if len(shape_of(current) or ()) == 4:
            best = Operand(current, factor, transposed, tuple(passed))
        step = relayout_step(current, gm)
        if step is None:
            return best
        passed.append(current)
        current, step_factor, swaps = step
        factor *= step_factor
        transposed ^= swaps


def strip_gqa(node: fx.Node) -> tuple[fx.Node, int, tuple[fx.Node, ...]]:
    """(kv, repeats, nodes) for node = view(clone?(expand(unsqueeze(kv, 2)))) repeating each of
    kv's heads `repeats` times in place (repeat_kv, repeat_interleave); (node, 1, ()) otherwise."""
    chain = [node]
    if not is_op(node, *RESHAPES):
        return node, 1, ()
    current = node.args[0]
    while is_op(current, *COPIES):
        chain.append(current)
        current = current.args[0]
    if not is_op(current, aten.expand):
        return node, 1, ()
    chain.append(current)
    unsqueezed = current.args[0]
    while _identity_view(unsqueezed):
        chain.append(unsqueezed)
        unsqueezed = unsqueezed.args[0]
    if not is_op(unsqueezed, aten.unsqueeze) or unsqueezed.args[1] not in (2, -3):
        return node, 1, ()
    chain.append(unsqueezed)
    kv = unsqueezed.args[0]
    expanded, kv_shape, out_shape = shape_of(current), shape_of(kv), shape_of(node)
    if expanded is None or kv_shape is None or out_shape is None or len(kv_shape) != 4 or len(out_shape) != 4:
        return node, 1, ()
    repeats = expanded[2]
    if not isinstance(repeats, int) or not same_size(out_shape[1], kv_shape[1] * repeats):
        return node, 1, ()
    return kv, repeats, tuple(chain)
