"""Find linear layers (y = x @ W.T + b, W a parameter) in an inference ATen graph.

aten.linear decomposes, depending on the input's rank and layout, into
    addmm(b, x2d, t(W))                                  x of rank 2
    view(addmm(b, view(x, [N, K]), t(W)), [..., N])     contiguous rank 3 with bias
    _unsafe_view(mm(view(x, [N, K]), t(W)), [..., N])   no bias (then maybe add(., b))
and is sometimes kept whole as aten.linear. t(W) may also be permute(W, [1, 0]) or transpose.
"""
from __future__ import annotations

import logging

import torch
from torch import fx

from .fx_utils import dead_region, is_op, module_path, same_size, shape_of
from .matches import LinearMatch

__all__ = ["match_linear"]

log = logging.getLogger(__name__)
aten = torch.ops.aten

_RESHAPES = (aten.view, aten._unsafe_view, aten.reshape)


def match_linear(gm: fx.GraphModule, params: dict[str, str]) -> list[LinearMatch]:
    """Every linear layer of `gm` whose weight is a parameter placeholder named in `params`
    (placeholder name -> parameter path), in graph order."""
    matches = []
    for node in gm.graph.nodes:
        match = _match_at(node, params)
        if match is not None:
            matches.append(match)
    return matches


def _match_at(node: fx.Node, params: dict[str, str]) -> LinearMatch | None:
    if is_op(node, aten.linear):
        weight, bias = node.args[1], node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return _build(node, node, node.args[0], weight, bias, [], params)
    if is_op(node, aten.addmm):
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        return _from_mm(node, node.args[1], node.args[2], node.args[0], params)
    if is_op(node, aten.mm):
        return _from_mm(node, node.args[0], node.args[1], None, params)
    return None


def _from_mm(mm: fx.Node, x2d: fx.Node, weight_t: fx.Node, bias: fx.Node | None,
             params: dict[str, str]) -> LinearMatch | None:
    weight = _transposed_source(weight_t)
    if weight is None:
        return None
    x, output = x2d, mm
    lifted = _vector_input(x2d, mm) or _flat_input(x2d, mm)
    if lifted is not None:
        x, output = lifted
    if bias is None:
        bias_add = _bias_add(output, mm)
        if bias_add is not None:
            output, bias = bias_add
    region = [weight_t, x2d, mm, *output.all_input_nodes, output]
    return _build(output, mm, x, weight, bias, region, params)


def _build(output, anchor, x, weight, bias, region, params) -> LinearMatch | None:
    if not _is_param(weight, params) or not _bias_fits(bias, weight):
        return None
    nodes = dead_region(output, [n for n in region if n is not x and n is not weight and n is not bias])
    return LinearMatch(output=output, x=x, weight=weight, bias=bias, nodes=nodes,
                       module_path=module_path(anchor), weight_target=params[weight.name])


def _is_param(weight: object, params: dict[str, str]) -> bool:
    if not (isinstance(weight, fx.Node) and weight.op == "placeholder" and weight.name in params):
        return False
    shape = shape_of(weight)
    return shape is None or len(shape) == 2


def _bias_fits(bias: object, weight: fx.Node) -> bool:
    """No bias, or a 1-D bias of the weight's output size (addmm would broadcast others too)."""
    if bias is None:
        return True
    bias_shape, weight_shape = shape_of(bias), shape_of(weight)
    if bias_shape is None or weight_shape is None:
        return False
    return len(bias_shape) == 1 and same_size(bias_shape[0], weight_shape[0])


def _transposed_source(node: object) -> fx.Node | None:
    """W for t(W), permute(W, [1, 0]) or transpose(W, 0, 1); None for anything else."""
    if is_op(node, aten.t):
        return node.args[0]
    if is_op(node, aten.permute) and list(node.args[1]) == [1, 0]:
        return node.args[0]
    if is_op(node, aten.transpose) and sorted(d % 2 for d in node.args[1:3]) == [0, 1]:
        return node.args[0]
    return None


def _vector_input(x2d: fx.Node, mm: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(x, squeeze) for a rank-1 x: squeeze(mm(unsqueeze(x, 0), W^T), 0)."""
    if not is_op(x2d, aten.unsqueeze) or x2d.args[1] != 0 or len(shape_of(x2d.args[0]) or ()) != 1:
        return None
    if len(mm.users) != 1:
        return None
    (user,) = mm.users
    if is_op(user, aten.squeeze) and list(user.args[1:2]) in ([0], [[0]]) and len(shape_of(user) or ()) == 1:
        return x2d.args[0], user
    return None


def _flat_input(x2d: fx.Node, mm: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(x, view back) when x2d = view(x, [-1, K]) flattens the leading dims of a rank >= 3 x."""
    if not is_op(x2d, *_RESHAPES):
        return None
    x = x2d.args[0]
    x_shape, flat_shape = shape_of(x), shape_of(x2d)
    if x_shape is None or flat_shape is None or len(x_shape) < 3 or not same_size(x_shape[-1], flat_shape[-1]):
        return None
    restored = _restored_output(mm, x)
    return (x, restored) if restored is not None else None


def _restored_output(mm: fx.Node, x: fx.Node) -> fx.Node | None:
    """The single user of mm that views it back to x's leading dims: (..., N)."""
    if len(mm.users) != 1:
        return None
    (user,) = mm.users
    out_shape, x_shape, mm_shape = shape_of(user), shape_of(x), shape_of(mm)
    if not is_op(user, *_RESHAPES) or out_shape is None or len(out_shape) != len(x_shape):
        return None
    lead_ok = all(same_size(a, b) for a, b in zip(out_shape[:-1], x_shape[:-1]))
    return user if lead_ok and same_size(out_shape[-1], mm_shape[-1]) else None


def _bias_add(output: fx.Node, mm: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(add, b) when output's single user adds a 1-D b inside the same module (matmul + bias)."""
    if len(output.users) != 1:
        return None
    (add,) = output.users
    if not is_op(add, aten.add) or len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return None
    other = add.args[1] if add.args[0] is output else add.args[0]
    other_shape = shape_of(other)
    if other_shape is None or len(other_shape) != 1 or module_path(add) != module_path(mm):
        return None
    if not same_size(other_shape[0], shape_of(mm)[-1]):
        return None
    return add, other
