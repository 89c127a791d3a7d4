"""Small helpers for reading ATen FX graphs: module paths, bound arguments, shapes, constants,
and the set of nodes a rewrite makes dead."""
from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx

__all__ = [
    "module_path", "normalize_module_path", "bound_args", "is_op", "tensor_meta", "shape_of",
    "static_int", "same_size", "constant_scalar", "is_very_negative", "dead_region",
]

aten = torch.ops.aten

# The root of a Dynamo source name: L['self'], G['model'], self, L__self__ (mangled).
# A module passed through a wrapper's *args / **kwargs (transformers' decorators do this) is rooted
# at L['args'][0] or L['kwargs']['self'].
_ROOT = re.compile(r"^(?:[LG]\[\s*['\"](?:args|kwargs)['\"]\s*\]\[\s*(?:\d+|'[^']*'|\"[^\"]*\")\s*\]"
                   r"|[LG]\[\s*['\"][^'\"]*['\"]\s*\]|self\b|L__self__)")
# getattr(X, 'name') -> X.name (Dynamo writes this for ModuleList items in some versions).
_GETATTR = re.compile(r"getattr\(\s*([^,()]*)\s*,\s*['\"]([^'\"]+)['\"]\s*\)")
# One path step: ['name'], ["name"], [3], .name, .3, or a leading bare name.
_STEP = re.compile(r"\[\s*'([^']*)'\s*\]|\[\s*\"([^\"]*)\"\s*\]|\[\s*(\d+)\s*\]|\.?(\w+)")
_CONTAINERS = {"__dict__", "_modules", "_parameters", "_buffers"}  # steps that name no module


def normalize_module_path(raw: str) -> str:
    """Dotted module path from any spelling Dynamo uses for it.

    "L['self'].blocks[0].attn", "L['self']._modules['blocks']._modules['0'].attn",
    "getattr(L['self'].blocks, '0').attn", "L['args'][0].blocks.0.attn", "self.blocks.0.attn" and
    "blocks.0.attn" all give
    "blocks.0.attn". The mangled form "L__self___blocks_0_attn" loses which underscores were dots;
    only the ones around integer indices are restored ("blocks.0.attn", but "q_proj" stays).
    """
    text = raw.strip()
    while _GETATTR.search(text):
        text = _GETATTR.sub(r"\1.\2", text)
    if text.startswith("L__self__"):
        return _unmangle(text[len("L__self__"):])
    root = _ROOT.match(text)
    rest = text[root.end():] if root else text
    parts: list[str] = []
    for match in _STEP.finditer(rest):
        part = next(g for g in match.groups() if g is not None)
        if part not in _CONTAINERS:
            parts.append(part)
    return ".".join(parts)


def _unmangle(mangled: str) -> str:
    name = mangled.lstrip("_")
    return re.sub(r"_(\d+)(?:_|$)", r".\1.", name).strip(".")


def module_path(node: fx.Node) -> str:
    """The innermost module that produced `node`, dotted ("blocks.0.attn"); "" when unknown."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    key, value = list(stack.items())[-1]
    raw = value[0] if isinstance(value, tuple) and value and isinstance(value[0], str) else key
    return normalize_module_path(str(raw))


def is_op(node: Any, *targets) -> bool:
    """Whether `node` is a call_function of one of `targets` (OpOverloadPackets or overloads)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    return any(target is t or packet is t for t in targets)


def bound_args(node: fx.Node) -> dict[str, Any]:
    """The arguments of an ATen call by schema name, defaults filled in."""
    schema = node.target._schema
    values: dict[str, Any] = {}
    for position, argument in enumerate(schema.arguments):
        if position < len(node.args) and not argument.kwarg_only:
            values[argument.name] = node.args[position]
        elif argument.name in node.kwargs:
            values[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            values[argument.name] = argument.default_value
        else:
            values[argument.name] = None
    return values


def tensor_meta(node: Any) -> torch.Tensor | None:
    """The fake tensor recorded for `node` (meta["val"]), or None."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("val")
    return value if isinstance(value, torch.Tensor) else None


def shape_of(node: Any) -> tuple | None:
    value = tensor_meta(node)
    return tuple(value.shape) if value is not None else None


def static_int(size: Any) -> int | None:
    """`size` as a Python int when it is one (or a SymInt with a constant value), else None."""
    if isinstance(size, int):
        return size
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        return int(expr) if getattr(expr, "is_number", False) else None
    return None


def specialized_int(size: Any) -> int | None:
    """static_int, or a symbolic size (torch.compile(dynamic=True) makes every size one) fixed to
    the value it has now, with a guard: the graph is compiled again if it ever changes."""
    value = static_int(size)
    if value is None and isinstance(size, torch.SymInt) and size.node.has_hint():
        from torch.fx.experimental.symbolic_shapes import guard_int
        value = guard_int(size)
    return value


def specialized_equal(a: Any, b: Any) -> bool:
    """same_size, or two symbolic sizes equal now, kept equal by a guard (the graph is compiled
    again when they differ)."""
    if same_size(a, b):
        return True
    symbolic = [x for x in (a, b) if isinstance(x, torch.SymInt)]
    if not symbolic or not all(x.node.has_hint() for x in symbolic):
        return False
    from torch.fx.experimental.symbolic_shapes import guard_bool
    return guard_bool(a == b)


def same_size(a: Any, b: Any) -> bool:
    """Whether two sizes (ints or SymInts) are provably equal, without adding guards."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return bool(statically_known_true(a == b))


def constant_scalar(value: Any, gm: fx.GraphModule | None = None) -> float | None:
    """A Python number readable from the graph: a literal, scalar_tensor(c), full([], c), a copy
    of one, or a one-element constant attribute of `gm`. None when not a constant."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, fx.Node):
        return None
    if value.op == "get_attr" and gm is not None:
        attr = getattr(gm, str(value.target), None)
        if isinstance(attr, torch.Tensor) and attr.numel() == 1:
            return float(attr.item())
        return None
    if is_op(value, aten.scalar_tensor):
        return constant_scalar(value.args[0], gm)
    if is_op(value, aten.full) and list(value.args[0]) in ([], [1]):
        return constant_scalar(value.args[1], gm)
    if is_op(value, aten.lift_fresh_copy, aten._to_copy, aten.clone, torch.ops.prims.convert_element_type):
        return constant_scalar(value.args[0], gm)
    return None


def is_very_negative(value: float | None) -> bool:
    """A fill that softmax turns into an exact 0 weight: -inf or a large negative number
    (exp(-1e4) underflows to 0 in every floating dtype)."""
    return value is not None and (value == -math.inf or value <= -1e4)


def dead_region(output: fx.Node, candidates: Iterable[fx.Node]) -> tuple[fx.Node, ...]:
    """The candidates that become dead once `output`'s uses are replaced: output itself, and every
    candidate all of whose users are dead. Returned in graph order."""
    region = set(candidates) | {output}
    order = {node: i for i, node in enumerate(output.graph.nodes)}
    dead = {output}
    for node in sorted(region, key=order.__getitem__, reverse=True):
        if node is not output and node.op == "call_function" and node.users and all(u in dead for u in node.users):
            dead.add(node)
    return tuple(sorted(dead, key=order.__getitem__))
