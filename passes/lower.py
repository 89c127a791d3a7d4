"""Lowering: an ATen FX graph plus the matchers' findings -> an IR Graph.

    lower(gm, attention_matches, linear_matches, params, name) -> Graph

- placeholders become Param (a parameter/buffer, named by its path in `params`) or Input (its
  position among the graph's placeholders), all first;
- each AttentionMatch / LinearMatch becomes one Attention / Linear op, placed where its output
  node is; its other nodes disappear from the IR (the rewrite removes them as dead code);
- every run of remaining nodes between two matched ops is one Opaque region. A region's inputs
  are the values it reads from outside; its results are the nodes read after it. Each IR value
  is named after its FX node, which is how the rewrite finds its way back.

Non-tensor values crossing regions (SymInt sizes) are typed as 0-d tensors of their scalar kind
("i64[]"). Tuple-valued nodes (SDPA's (out, lse, ...)) stay in the region of their producer:
their getitem users are pulled into it, so a region never exports a tuple.

A match that does not fit (a node claimed twice, an inner node read from outside, a weight that
is not a parameter placeholder) is dropped with a log line and its nodes stay opaque.
"""
from __future__ import annotations

import logging
import operator
from collections.abc import Sequence

import torch
from torch import fx

from sparsec.ir.graph import Graph
from sparsec.ir.ops import Attention, Input, Linear, Op, Opaque, Output, Param, Value
from sparsec.ir.types import TensorType, dtype_name

from .matches import AttentionMatch, LinearMatch

__all__ = ["lower", "LoweringError", "value_type"]

log = logging.getLogger(__name__)

Match = AttentionMatch | LinearMatch


class LoweringError(RuntimeError):
    """The FX graph has something the IR cannot express (the backend falls back)."""


# -- types -------------------------------------------------------------------------------------

def _dim(size: int | torch.SymInt) -> int | str:
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        return int(expr) if getattr(expr, "is_number", False) else str(expr)
    return int(size)


_SCALAR_DTYPES = {bool: "bool", int: "i64", float: "f64", torch.SymInt: "i64", torch.SymFloat: "f64",
                  torch.SymBool: "bool"}


def value_type(node: fx.Node, gm: fx.GraphModule) -> TensorType:
    """The IR type of an FX node's value: its fake tensor's shape and dtype, or a 0-d scalar."""
    value = node.meta.get("val")
    if value is None and node.op == "get_attr":
        value = getattr(gm, str(node.target), None)
    if isinstance(value, torch.Tensor):
        return TensorType(shape=tuple(_dim(s) for s in value.shape), dtype=dtype_name(value.dtype))
    scalar = _SCALAR_DTYPES.get(type(value))
    if scalar is not None:
        return TensorType(shape=(), dtype=scalar)
    raise LoweringError(f"node {node.name} ({node.format_node()}) has a value of type "
                        f"{type(value).__name__}, which the IR cannot type")


# -- choosing the matches ----------------------------------------------------------------------

def _match_problem(match: Match, claimed: set[fx.Node], params: dict[str, str]) -> str | None:
    inner = set(match.nodes)
    if match.output not in inner:
        return "its output is not among its nodes"
    if inner & claimed:
        return "it overlaps another match"
    leaks = [n.name for n in inner if n is not match.output and any(u not in inner for u in n.users)]
    if leaks:
        return f"inner nodes {leaks} are read outside the match"
    operands = _operand_nodes(match)
    if any(n in inner for n in operands):
        return "an operand is one of its own nodes"
    if isinstance(match, LinearMatch) and (match.weight.op != "placeholder" or match.weight.name not in params):
        return f"weight {match.weight.name} is not a parameter placeholder"
    return None


def _operand_nodes(match: Match) -> list[fx.Node]:
    if isinstance(match, AttentionMatch):
        candidates = [match.q, match.k, match.v, match.mask, match.sinks]
    else:
        candidates = [match.x, match.weight, match.bias]
    return [n for n in candidates if n is not None]


def select_matches(matches: Sequence[Match], params: dict[str, str]) -> dict[fx.Node, Match]:
    """Output node -> match, for the matches that can be lowered; the others are logged."""
    chosen: dict[fx.Node, Match] = {}
    claimed: set[fx.Node] = set()
    for match in matches:
        problem = _match_problem(match, claimed, params)
        if problem:
            log.info("%s at %s (%s) is kept opaque: %s", type(match).__name__, match.output.name,
                     match.module_path or "?", problem)
            continue
        chosen[match.output] = match
        claimed |= set(match.nodes)
    return chosen


# -- building the IR ---------------------------------------------------------------------------

class _Lowering:
    def __init__(self, gm: fx.GraphModule, matches: dict[fx.Node, Match], params: dict[str, str]):
        self.gm, self.matches, self.params = gm, matches, params
        self.inner = {n for m in matches.values() for n in m.nodes if n is not m.output}
        # A match's operands leave their region even without an FX user: a node the matcher
        # added (a mask's negation, a sum of biases) is read only by the op replacing the match.
        self.operands = {n for m in matches.values() for n in _operand_nodes(m)}
        self.values: dict[fx.Node, Value] = {}
        self.ops: list[Op] = []
        self.region: list[fx.Node] = []

    def value(self, node: fx.Node) -> Value:
        if node not in self.values:
            self.values[node] = Value(name=node.name, type=value_type(node, self.gm))
        return self.values[node]

    def run(self, name: str) -> Graph:
        placeholders = list(self.gm.graph.find_nodes(op="placeholder"))
        for index, node in enumerate(placeholders):
            self.ops.append(self._placeholder(node, index))
        emitted = set(placeholders)
        for node in self.gm.graph.nodes:
            if node in emitted or node in self.inner:
                continue
            if node.op == "output":
                self.close_region()
                self.ops.append(self._output(node))
            elif node in self.matches:
                self.close_region()
                self.ops.append(self._matched(self.matches[node]))
            else:
                self.region.append(node)
                emitted.add(node)
                self._pull_getitems(node, emitted)
        return Graph(name=name, ops=tuple(self.ops), provenance="lower")

    def _pull_getitems(self, node: fx.Node, emitted: set[fx.Node]) -> None:
        if isinstance(node.meta.get("val"), (tuple, list)):
            for user in node.users:
                if user.target is operator.getitem and user not in self.matches and user not in self.inner:
                    self.region.append(user)
                    emitted.add(user)

    def _placeholder(self, node: fx.Node, index: int) -> Op:
        if node.name in self.params:
            return Param(result=self.value(node), target=self.params[node.name])
        return Input(result=self.value(node), index=index)

    def _output(self, node: fx.Node) -> Output:
        values = []
        items = node.args[0] if isinstance(node.args[0], (tuple, list)) else [node.args[0]]
        for item in items:
            if not isinstance(item, fx.Node):
                raise LoweringError(f"graph output {item!r} is not a node")
            values.append(self.value(item))
        return Output(values=tuple(values))

    def _matched(self, match: Match) -> Op:
        if isinstance(match, AttentionMatch):
            return self._attention(match)
        return Linear(result=self.value(match.output), x=self.value(match.x), weight=self.value(match.weight),
                      bias=self.value(match.bias) if match.bias is not None else None,
                      module_path=match.module_path)

    def _attention(self, match: AttentionMatch) -> Attention:
        q, k = self.value(match.q), self.value(match.k)
        scores_shape = (*q.type.shape[:3], k.type.shape[2])
        return Attention(
            result=self.value(match.output), q=q, k=k, v=self.value(match.v),
            mask=self.value(match.mask) if match.mask is not None else None,
            scale=match.scale, causal=match.causal, num_heads=match.num_heads,
            num_kv_heads=match.num_kv_heads, scores=TensorType(shape=scores_shape, dtype=q.type.dtype),
            module_path=match.module_path, softcap=match.softcap,
            sinks=self.value(match.sinks) if match.sinks is not None else None)

    def close_region(self) -> None:
        if not self.region:
            return
        members = set(self.region)
        inputs: dict[fx.Node, None] = {}
        for node in self.region:
            for used in node.all_input_nodes:
                if used not in members:
                    inputs.setdefault(used, None)
        results = [n for n in self.region if n in self.operands or any(u not in members for u in n.users)]
        self.ops.append(Opaque(results=tuple(self.value(n) for n in results),
                               inputs=tuple(self.value(n) for n in inputs),
                               fx_nodes=tuple(n.name for n in self.region)))
        self.region = []


def lower(gm: fx.GraphModule, attention_matches: Sequence[AttentionMatch],
          linear_matches: Sequence[LinearMatch], params: dict[str, str], name: str = "forward") -> Graph:
    """The IR of `gm`: matched attention and linear layers as ops, the rest as opaque regions."""
    matches = select_matches([*attention_matches, *linear_matches], params)
    return _Lowering(gm, matches, params).run(name)
