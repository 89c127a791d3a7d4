"""Rewrite: IR -> FX. Each Attention / Linear op of the final IR that sparsec accelerates becomes
a call of the sparsec custom op (sparsec/ops.py) in a copy of the ATen graph it was lowered from;
its matched nodes become dead and are removed (all dead side-effect-free nodes are); Opaque
regions are the original nodes, untouched.

    rewrite_fx(gm, graph, rewrite_dense=False) -> GraphModule

An op sparsec does not accelerate keeps its original nodes, so the inner compiler (Inductor) sees
exactly the model's own graph there: an Attention op without patterns (or with Dense for every
head, unless under the mask rule "band", which runs a sliding window's band) matched from an SDPA
call, and a Linear op on the dense kernel. Hand-written attention
(matmul-softmax-matmul) is replaced even when dense: the fused op is the acceleration.
`rewrite_dense=True` replaces every op (sparsec.tune's recorder reads every layer's operands
through sparsec::attention).

IR values carry their FX node's name, so operands are found by name. The custom ops return
contiguous tensors; where the replaced node had another layout (SDPA on CPU returns its output
in (B, S, H, D) memory order and the graph then views it as such), a permute -> clone -> permute
restores the original strides so the nodes after it stay valid. New nodes get meta["val"] from
the ops' fake implementations, as Inductor expects. A Linear op with a sparse kernel passes its
choice (kernel, min_tokens, max_tokens) and a fresh site name (what sparsec::linear's log lines
call the layer; its packed weight is kept by the weight tensor itself) to the op.

Attention calls that read the same mask (those with patterns, which read their mask at run time:
sparsec/key_padding.py) take one sparsec::mask_layout node of it, inserted before the first of
them: a model's layers share the mask a forward builds, and it is read once, not once a layer. The
same mask is one node, or one bool node that each layer turns into a bias of 0 and -inf
(where(m, 0, -inf): how SDPA's decomposition hands a bool mask to each call).
"""
from __future__ import annotations

import logging
import operator
from collections import defaultdict

import torch
from torch import fx
from torch._guards import detect_fake_mode

from sparsec import linear_dispatch
from sparsec import ops as sparsec_ops  # registers torch.ops.sparsec.*
from sparsec.ir.graph import Graph
from sparsec.ir.ops import Attention, Linear, Op
from sparsec.ir.types import AttentionPatterns
from sparsec.patterns import Dense

from .fx_utils import constant_scalar, is_op

__all__ = ["accelerated", "rewrite_fx", "RewriteError"]

log = logging.getLogger(__name__)
aten = torch.ops.aten


class RewriteError(RuntimeError):
    """The IR does not fit the FX graph it claims to come from."""


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__)


def _patterns_argument(op: Attention) -> str:
    sparsity = op.scores.sparsity
    if isinstance(sparsity, AttentionPatterns):
        return sparsec_ops.patterns_to_json(sparsity.patterns)
    return ""


def _call_for(op: Op, node: dict[str, fx.Node]) -> tuple[object, tuple]:
    """The custom op and its arguments for an IR op."""
    def ref(value):
        return None if value is None else node[value.name]

    if isinstance(op, Attention):
        block_m, block_n = op.tiles if op.tiles is not None else (0, 0)
        args = (ref(op.q), ref(op.k), ref(op.v), ref(op.mask), op.scale, op.causal, _patterns_argument(op),
                block_m, block_n, op.module_path)
        if op.mask_rule or op.softcap or op.sinks is not None:
            args += (op.mask_rule, op.softcap)
        if op.sinks is not None:  # after mask_layout, which the rewrite adds later where layers share a mask
            args += (None, ref(op.sinks))
        return torch.ops.sparsec.attention.default, args
    if isinstance(op, Linear):
        args = (ref(op.x), ref(op.weight), ref(op.bias))
        if op.kernel != "dense":  # the choice, and a site naming the layer in logs
            site = linear_dispatch.new_site(op.module_path or op.result.name)
            args += (op.kernel, op.min_tokens, op.max_tokens, site)
        return torch.ops.sparsec.linear.default, args
    raise RewriteError(f"no custom op for {type(op).__name__}")


def _fake_value(target, args: tuple, kwargs: dict | None = None):
    """The op's output on the fake values of its arguments (None outside a fake-tensor trace)."""
    values = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in args]
    fake_mode = detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)])
    if fake_mode is None:
        return None
    with fake_mode:
        return target(*values, **(kwargs or {}))


def _memory_order(value: torch.Tensor) -> list[int]:
    """Dims from outermost to innermost in memory; symbolic strides compare through the shape
    environment (sorting is stable, so equal strides keep their logical order)."""
    return sorted(range(value.dim()), key=lambda d: -value.stride(d))


def _call(graph: fx.Graph, target, args: tuple, kwargs: dict | None = None) -> fx.Node:
    node = graph.call_function(target, args, kwargs or {})
    node.meta["val"] = _fake_value(target, args, kwargs)
    return node


def _restore_layout(graph: fx.Graph, new: fx.Node, original: torch.Tensor | None) -> fx.Node:
    """`new` (contiguous) with the strides `original` had, if they differ."""
    if not isinstance(original, torch.Tensor) or original.is_contiguous():
        return new
    order = _memory_order(original)
    inverse = [order.index(d) for d in range(len(order))]
    to_memory = _call(graph, aten.permute.default, (new, order))
    packed = _call(graph, aten.clone.default, (to_memory,), {"memory_format": torch.contiguous_format})
    return _call(graph, aten.permute.default, (packed, inverse))


def _replace(graph: fx.Graph, op: Op, node: dict[str, fx.Node]) -> None:
    old = node.get(op.result.name)  # type: ignore[attr-defined]
    if old is None:
        raise RewriteError(f"IR value %{op.result.name} has no FX node")  # type: ignore[attr-defined]
    target, args = _call_for(op, node)
    with graph.inserting_before(old):
        new = _call(graph, target, args)
        new.meta.update({k: v for k, v in old.meta.items() if k in ("nn_module_stack", "stack_trace")})
        replacement = _restore_layout(graph, new, old.meta.get("val"))
    old.replace_all_uses_with(replacement)
    node[op.result.name] = replacement  # type: ignore[attr-defined]  # ops built later read the new value


def _share_mask_reads(graph: fx.Graph) -> int:
    """Give the attention calls with patterns that take the same mask node one mask_layout of it
    (see the module doc); returns how many calls share one."""
    readers: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.sparsec.attention.default \
                and isinstance(node.args[3], fx.Node) and node.args[6]:
            readers[_kept_by(node.args[3])].append(node)
    shared = 0
    for mask, calls in readers.items():
        if len(calls) < 2:
            continue
        with graph.inserting_before(calls[0]):  # its q and k are defined by then, and the mask
            layout = _call(graph, torch.ops.sparsec.mask_layout.default, (mask, calls[0].args[0], calls[0].args[1]))
        for call in calls:
            if len(call.args) > 12:  # given positionally (sinks follow it)
                call.update_arg(12, layout)
            else:
                call.update_kwarg("mask_layout", layout)
        shared += len(calls)
    return shared


def _kept_by(mask: fx.Node) -> fx.Node:
    """The node that says which pairs `mask` keeps: m for where(m, 0, -inf) of a bool m (it keeps
    exactly m's pairs), else the mask itself."""
    if is_op(mask, aten.where) and len(mask.args) == 3 and isinstance(mask.args[0], fx.Node):
        cond, kept, dropped = mask.args
        value = cond.meta.get("val")
        if isinstance(value, torch.Tensor) and value.dtype == torch.bool and constant_scalar(kept) == 0.0 \
                and constant_scalar(dropped) == float("-inf"):
            return cond
    return mask


def _removable(node: fx.Node) -> bool:
    """Unused and without side effects. FX's own DCE keeps ops flagged nondeterministic (the
    SDPA overloads, for their dropout), which would leave the replaced attention running."""
    if node.users or node.op != "call_function":
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return not schema.is_mutable
    return not node.is_impure()


def remove_dead_nodes(graph: fx.Graph) -> int:
    """Erase nodes nothing reads (repeatedly, last first); return how many."""
    removed = 0
    for node in reversed(list(graph.nodes)):
        if _removable(node):
            graph.erase_node(node)
            removed += 1
    return removed


def _is_sdpa(node: fx.Node) -> bool:
    """An SDPA call's output: the op itself or item 0 of one of its overloads."""
    if node.op == "call_function" and node.target is operator.getitem:
        node = node.args[0]
    return node.op == "call_function" and "scaled_dot_product" in str(node.target)


def accelerated(op: Op, original: fx.Node) -> bool:
    """Whether sparsec's op does something the model's own nodes (under Inductor) would not."""
    if isinstance(op, Linear):
        return op.kernel != "dense"
    sparsity = op.scores.sparsity
    dense = not isinstance(sparsity, AttentionPatterns) or all(isinstance(p, Dense) for p in sparsity.patterns)
    if op.mask_rule == "band":  # a sliding window's band, a causal mask's upper triangle: skipped work
        return True
    # Dense: SDPA's fused kernel in place of a matmul-softmax-matmul, but capped scores and sinks have
    # no such kernel (the op would compute them as the model's own nodes do, without Inductor's fusion).
    return not dense or not (_is_sdpa(original) or op.softcap or op.sinks is not None)


def rewrite_fx(gm: fx.GraphModule, graph: Graph, rewrite_dense: bool = False) -> fx.GraphModule:
    """A copy of `gm` in which the IR's accelerated Attention and Linear ops (every one with
    `rewrite_dense`) are sparsec custom-op calls."""
    rewritten = _copy(gm)
    node = {n.name: n for n in rewritten.graph.nodes}
    replaced = kept = 0
    for op in graph.ops_of((Attention, Linear)):
        original = node.get(op.result.name)  # type: ignore[attr-defined]
        if not rewrite_dense and original is not None and not accelerated(op, original):
            kept += 1
            continue
        _replace(rewritten.graph, op, node)
        replaced += 1
    _share_mask_reads(rewritten.graph)
    remove_dead_nodes(rewritten.graph)
    rewritten.graph.lint()
    rewritten.recompile()
    log.debug("graph %s: %d ops rewritten to sparsec custom ops, %d dense ones kept as they were",
              graph.name, replaced, kept)
    return rewritten
