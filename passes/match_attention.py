"""Find attention in an inference ATen graph: every SDPA overload, and hand-written
matmul -> scale -> mask -> softmax -> matmul as HF transformers, diffusers and timm write it.

Hand-written attention is found from its second matmul, bmm(probs, v), climbing up:
    probs   <- casts / clones / p=0 dropout <- softmax
    [probs <- slice dropping the last column: a sink's (GPT-OSS)]
    softmax [<- x - rowmax(x)] [<- cat([scores, sink logits of one a head, expanded], -1)]
    softmax <- casts <- [mask: masked_fill / where / add bias] <- casts, views, * or / by constants
            [<- tanh <- casts, views, * or / by constants: soft-capping, Gemma 2's c * tanh(s / c)]
            <- bmm(q, k^T) (or baddbmm with beta=0)
Several additive biases added one after the other (T5: scores + position_bias + attention_mask)
are one bias, their sum: an add node summing them is inserted once the match is certain.
and q, k, v are traced back through matmul's reshapes, GQA's repeat_kv and constant pre-scales
(attention_operands). A mask given as "positions to drop" (masked_fill(s, m, -inf)) needs its
negation as the keep mask: it is read from a bitwise_not when there is one, else a logical_not
node is added to the graph right after m (dead code when the match is not used).
"""
from __future__ import annotations

import logging
import math
import operator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import fx

from .attention_operands import CASTS, COPIES, RESHAPES, relayout_step, strip_gqa, trace_operand
from .causal_mask import causal_mask_nodes
from .fx_utils import (bound_args, constant_scalar, dead_region, is_op, is_very_negative, module_path,
                       same_size, shape_of, specialized_equal, specialized_int, tensor_meta)
from .matches import AttentionMatch

__all__ = ["Unmatched", "match_attention", "SDPA_OPS"]

log = logging.getLogger(__name__)
aten = torch.ops.aten

# SDPA and its backend overloads; all but the first return a tuple whose item 0 is the output.
SDPA_OPS = (
    aten.scaled_dot_product_attention,
    aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_flash_attention_for_cpu,
    aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_cudnn_attention,
    aten._scaled_dot_product_fused_attention_overrideable,
    aten._scaled_dot_product_attention_math,
)
SOFTMAX_OPS = (aten._softmax, aten.softmax, aten._safe_softmax)
# Internal mask kind: a bool mask of the positions to drop (masked_fill's), negated at the end.
_DROPPED = "dropped"


@dataclass(frozen=True, slots=True)
class Unmatched:
    """An attention the matcher found but cannot describe: an SDPA call, or a softmax over scores
    feeding a bmm with values. It runs as the model wrote it; no patterns reach it."""

    node: str
    module_path: str
    reason: str


_unmatched: ContextVar[list[Unmatched] | None] = ContextVar("sparsec_unmatched_attention", default=None)


def match_attention(gm: fx.GraphModule, unmatched: list[Unmatched] | None = None) -> list[AttentionMatch]:
    """Every attention of `gm` that can be described exactly by an AttentionMatch, in graph order.
    What cannot (dropout, unreadable scale, unsupported mask, another op between the scores and
    softmax) is logged at debug, left alone, and appended to `unmatched`."""
    matches = []
    token = _unmatched.set(unmatched)
    try:
        for node in list(gm.graph.nodes):
            if is_op(node, *SDPA_OPS):
                match = _match_sdpa(node)
            elif is_op(node, aten.bmm):
                match = _match_manual(gm, node)
            else:
                continue
            if match is not None:
                matches.append(match)
    finally:
        _unmatched.reset(token)
    return matches


# -- shared checks -----------------------------------------------------------------------------------

@dataclass
class _Found:
    """What a matcher read from the graph, before the shape checks."""

    output: fx.Node
    anchor: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float | None
    causal: bool = False
    mask: fx.Node | None = None
    mask_kind: str | None = None
    region: list[fx.Node] = field(default_factory=list)
    more_biases: tuple[fx.Node, ...] = ()  # additive biases added besides `mask` (summed by _finish)
    softcap: float = 0.0
    sinks: fx.Node | None = None  # a node of Hq sink logits


def _reject(node: fx.Node, why: str) -> None:
    log.debug("attention at %s (%s) not matched: %s", node.name, module_path(node) or "?", why)
    found = _unmatched.get()
    if found is not None:
        found.append(Unmatched(node.name, module_path(node), why))
    return None


def _contracted(a, b) -> bool:
    """Whether two sizes that the attention contracts (q's and k's head size, k's and v's length)
    fit: provably equal, or symbolic, since the matched computation itself (SDPA, or the score and
    output products) fails at run time unless they are equal (a KV cache's k and v are two graph
    inputs with lengths of their own symbols)."""
    return same_size(a, b) or not (isinstance(a, int) and isinstance(b, int))


def _finish(found: _Found) -> AttentionMatch | None:
    """Check shapes and build the match; None (logged) when something does not fit."""
    q, k, v, out = (shape_of(n) for n in (found.q, found.k, found.v, found.output))
    if any(s is None or len(s) != 4 for s in (q, k, v, out)):
        return _reject(found.anchor, "q, k, v and output must be rank-4 tensors with known shapes")
    (B, Hq, Sq, D), (Bk, Hkv, Sk, Dk), (Bv, Hv, Sv, Dv) = q, k, v
    heads, kv_heads = specialized_int(Hq), specialized_int(Hkv)
    if heads is None or kv_heads is None or not specialized_equal(Hkv, Hv) or heads % kv_heads:
        return _reject(found.anchor, f"head counts q {Hq}, k {Hkv}, v {Hv} are not static GQA counts")
    if not all(map(same_size, (B, B), (Bk, Bv))) or not all(map(_contracted, (Sk, D), (Sv, Dk))):
        return _reject(found.anchor, f"q {q}, k {k}, v {v} do not fit together")
    if not all(map(same_size, out, (B, Hq, Sq, Dv))):
        return _reject(found.anchor, f"output shape {out} is not (B, Hq, Sq, Dv)")
    if found.causal and not specialized_equal(Sq, Sk):
        return _reject(found.anchor, "is_causal with Sq != Sk (SDPA aligns top-left, sparsec bottom-right)")
    for mask in (found.mask, *found.more_biases) if found.mask is not None else ():
        if not _broadcasts(shape_of(mask), (B, Hq, Sq, Sk)):
            return _reject(found.anchor, f"mask shape {shape_of(mask)} does not broadcast to {(B, Hq, Sq, Sk)}")
    if found.sinks is not None and (shape_of(found.sinks) is None or math.prod(shape_of(found.sinks)) != heads):
        return _reject(found.anchor, f"sink logits of shape {shape_of(found.sinks)} are not one a query head ({Hq})")
    scale = found.scale if found.scale is not None else _default_scale(D)
    if scale is None:
        return _reject(found.anchor, f"default scale needs a static head dim, got {D}")
    _recognise_causal(found, Sq, Sk)
    if found.mask_kind == _DROPPED:  # only now that the match is certain: may add a node
        found.mask, negation = _negation(found.mask)
        found.mask_kind = "bool"
        found.region.extend(negation)
    if found.more_biases:  # likewise
        found.mask = _bias_sum((found.mask, *found.more_biases))
    keep = {found.q, found.k, found.v, found.mask}
    nodes = dead_region(found.output, [n for n in found.region if n not in keep])
    return AttentionMatch(
        output=found.output, q=found.q, k=found.k, v=found.v, mask=found.mask,
        mask_kind=found.mask_kind, scale=scale, causal=found.causal, num_heads=heads,
        num_kv_heads=kv_heads, nodes=nodes, module_path=module_path(found.anchor), softcap=found.softcap,
        sinks=found.sinks)


def _recognise_causal(found: _Found, Sq, Sk) -> None:
    """Turn a bool mask that is exactly the causal rule into causal=True (mask None)."""
    keep = found.mask if found.mask_kind == "bool" else None
    if found.mask_kind == _DROPPED and is_op(found.mask, aten.bitwise_not, aten.logical_not):
        keep = found.mask.args[0]
    chain = causal_mask_nodes(keep, Sq, Sk) if keep is not None else None
    if chain is not None:
        found.region.extend((found.mask, *chain))
        found.causal, found.mask, found.mask_kind = True, None, None


def _broadcasts(shape: tuple | None, target: tuple) -> bool:
    if shape is None or len(shape) > len(target):
        return False
    return all(s == 1 or same_size(s, t) for s, t in zip(reversed(shape), reversed(target)))


def _default_scale(head_dim) -> float | None:
    d = specialized_int(head_dim)
    return 1.0 / math.sqrt(d) if d else None


def _mask_kind(mask: fx.Node) -> str | None:
    value = tensor_meta(mask)
    if value is None:
        return None
    return "bool" if value.dtype == torch.bool else "additive" if value.dtype.is_floating_point else None


# -- SDPA --------------------------------------------------------------------------------------------

def _match_sdpa(node: fx.Node) -> AttentionMatch | None:
    args = bound_args(node)
    if constant_scalar(args["dropout_p"]) != 0.0 or args.get("dropout_mask") is not None:
        return _reject(node, f"dropout_p={args['dropout_p']} is not 0")
    output = node if is_op(node, aten.scaled_dot_product_attention) else _item0(node)
    if output is None:
        return _reject(node, "its output (item 0) is not read")
    if args["scale"] is not None and not isinstance(args["scale"], (int, float)):
        return _reject(node, f"scale {args['scale']} is not a constant")
    mask = args.get("attn_mask", args.get("attn_bias"))
    found = _Found(output=output, anchor=node, q=args["query"], k=args["key"], v=args["value"],
                   scale=args["scale"], causal=bool(args["is_causal"]), region=[node, output])
    if mask is not None:
        found.mask, found.mask_kind = mask, _mask_kind(mask)
        if found.mask_kind is None:
            return _reject(node, "attn_mask is neither bool nor floating point")
    for name in ("k", "v"):
        kv, _, chain = strip_gqa(getattr(found, name))
        setattr(found, name, kv)
        found.region.extend(chain)
    return _finish(found)


def _item0(node: fx.Node) -> fx.Node | None:
    return next((u for u in node.users if u.target is operator.getitem and u.args[1] == 0), None)


# -- hand-written attention ---------------------------------------------------------------------

def _match_manual(gm: fx.GraphModule, pv: fx.Node) -> AttentionMatch | None:
    softmax, probs_path = _softmax_above(gm, pv.args[0])
    if softmax is None:
        return None  # an ordinary bmm, not attention: nothing to log
    if not _softmax_over_last_dim(softmax):
        return _reject(pv, "softmax is not over the last dim")
    logits, sinks, sink_region = softmax.args[0], None, []
    if any(is_op(n, aten.slice) for n in probs_path):  # the last column dropped: a sink's
        found_sinks = _sink_logits(logits)
        if found_sinks is None:
            return _reject(pv, "the softmax's last column is dropped, but it is not a sink logit of each head")
        logits, sinks, sink_region = found_sinks
    scores = _read_scores(gm, logits, pv)
    if scores is None:
        return None
    output = _output_view(pv)
    if output is None:
        return _reject(pv, "the attention output is not viewed back to (B, H, Sq, Dv)")
    found = _operands(gm, pv, scores, output)
    if found is None:
        return None
    found.sinks = sinks
    found.region += [pv, softmax, *probs_path, *scores.region, *sink_region]
    return _finish(found)


def _sink_logits(logits: fx.Node) -> tuple[fx.Node, fx.Node, list[fx.Node]] | None:
    """GPT-OSS's softmax input: cat([scores, sinks expanded], -1), less its row maxima or not ->
    (scores, the sinks' node, the nodes between); None for anything else. The sinks' node holds one
    logit a head: the column is a (1 or B, H, 1, 1) tensor expanded over the queries."""
    region = []
    if is_op(logits, aten.sub) and len(logits.args) == 2 and _is_row_max(logits.args[1], logits.args[0]):
        region += [logits, logits.args[1], logits.args[1].args[0]]
        logits = logits.args[0]
    if not is_op(logits, aten.cat) or len(logits.args[0]) != 2:
        return None
    rank = len(shape_of(logits) or ())
    if rank != 4 or (logits.args[1] if len(logits.args) > 1 else 0) % rank != rank - 1:
        return None
    scores, column = logits.args[0]
    region.append(logits)
    per_head = False
    while is_op(column, aten.expand, *RESHAPES, aten.unsqueeze, *CASTS, *COPIES):
        shape = shape_of(column)
        per_head = per_head or (shape is not None and len(shape) == 4 and shape[2] == 1 and shape[3] == 1)
        region.append(column)
        column = column.args[0]
    shape = shape_of(column)
    per_head = per_head or (shape is not None and len(shape) == 4 and shape[2] == 1 and shape[3] == 1)
    return (scores, column, region) if per_head and isinstance(column, fx.Node) else None


def _is_row_max(node: fx.Node, of: fx.Node) -> bool:
    """getitem(max.dim(of, -1, True), 0) or amax(of, [-1], True)."""
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        top = node.args[0]
        return (is_op(top, aten.max) and top.args[0] is of and top.args[1] in (-1, 3)
                and bool(top.args[2:3] and top.args[2]))
    return (is_op(node, aten.amax) and node.args[0] is of and list(node.args[1]) in ([-1], [3])
            and bool(node.args[2:3] and node.args[2]))


def _softmax_above(gm: fx.GraphModule, probs: fx.Node) -> tuple[fx.Node | None, list[fx.Node]]:
    """The softmax that `probs` is, through leading-dim reshapes, casts, copies and p=0 dropout."""
    passed = []
    current = probs
    while True:
        if is_op(current, *SOFTMAX_OPS):
            return current, passed
        parent = _probs_parent(gm, current)
        if parent is None:
            return None, passed
        passed.append(current)
        current = parent


def _probs_parent(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    if is_op(node, *CASTS):
        return node.args[0] if isinstance(node.args[0], fx.Node) else None
    if is_op(node, *RESHAPES, *COPIES, aten.expand):
        step = relayout_step(node, gm)
        return step[0] if step is not None and step[1] == 1.0 and not step[2] else None
    if is_op(node, aten.dropout) and (node.args[1] == 0 or not node.args[2]):
        return node.args[0]
    if is_op(node, aten.slice) and node.args[1:4] in ((-1, 0, -1), (3, 0, -1)) and node.args[4:5] in ((), (1,)):
        return node.args[0]  # the last column dropped: a sink's (_match_manual checks it is one)
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0 and \
            is_op(node.args[0], aten.native_dropout) and \
            (node.args[0].args[1] == 0 or node.args[0].args[2] is False):
        return node.args[0].args[0]
    return None


def _softmax_over_last_dim(softmax: fx.Node) -> bool:
    rank = len(shape_of(softmax) or ())
    return rank > 0 and softmax.args[1] % rank == rank - 1


@dataclass
class _Scores:
    qk: fx.Node  # bmm(q, k^T) or baddbmm
    factor: float
    mask: fx.Node | None
    mask_kind: str | None
    region: list[fx.Node]
    more_biases: tuple[fx.Node, ...] = ()
    softcap: float = 0.0


def _read_scores(gm: fx.GraphModule, node: fx.Node, anchor: fx.Node) -> _Scores | None:
    """Climb from softmax's input: casts, at most one mask (or several additive biases), scales
    and reshapes, to bmm(q, k^T). A tanh on the way, under the masks, is soft-capping:
    out * tanh(in * qk) = c * tanh(s / c) with c = out (the factor above the tanh) and s = in * out * qk
    (the factor of the whole climb, the scale as without capping)."""
    region, factor, masks, mask_kind, softcap = [], 1.0, [], None, 0.0
    current = node
    while not is_op(current, aten.bmm, aten.baddbmm):
        if is_op(current, aten.tanh):
            if softcap or factor <= 0:
                return _reject(anchor, "more than one tanh" if softcap else f"tanh is scaled by {factor}")
            softcap = factor
            region.append(current)
            current = current.args[0]
            continue
        step = _scores_step(gm, current)
        if step is None:
            return _reject(anchor, _why_not_scores(current))
        region.append(current)
        region.extend(step.extra)
        if step.mask is not None:
            if softcap:  # capped with the scores: -inf would become -c, no key removed
                return _reject(anchor, "a mask or bias under the soft-capping's tanh")
            if masks and not (mask_kind == step.mask_kind == "additive"):
                return _reject(anchor, f"more than one mask or bias, not all additive ({mask_kind}, {step.mask_kind})")
            if factor <= 0 or (step.mask_kind == "additive" and factor != 1.0):
                return _reject(anchor, f"the mask is scaled by {factor} together with the scores")
            masks.append(step.mask)
            mask_kind = step.mask_kind
        factor *= step.factor
        current = step.parent
    if is_op(current, aten.baddbmm):
        if current.kwargs.get("beta", 1) != 0:
            return _reject(anchor, "baddbmm adds a (B*H, ...) bias; only beta=0 is supported")
        alpha = constant_scalar(current.kwargs.get("alpha", 1), gm)
        if alpha is None:
            return _reject(anchor, "baddbmm's alpha is not a constant")
        factor *= alpha
    return _Scores(current, factor, masks[0] if masks else None, mask_kind, region, tuple(masks[1:]), softcap)


def _why_not_scores(node: fx.Node) -> str:
    if is_op(node, aten.mul, aten.div):
        return f"the scale in {node.name}{tuple(a.name if isinstance(a, fx.Node) else a for a in node.args)} is not a constant"
    if is_op(node, aten.masked_fill, aten.where):
        return f"{node.name} fills with a value that does not remove keys (only -inf or <= -1e4 does)"
    if is_op(node, aten.add):
        return f"{node.name}: no operand is QK^T through casts, reshapes and constant scales"
    return f"unsupported op {node.target} between QK^T and softmax"


@dataclass
class _Step:
    parent: fx.Node
    factor: float = 1.0
    mask: fx.Node | None = None
    mask_kind: str | None = None
    extra: tuple[fx.Node, ...] = ()


def _scores_step(gm: fx.GraphModule, node: fx.Node) -> _Step | None:
    if is_op(node, *CASTS):
        return _Step(node.args[0])
    if is_op(node, aten.masked_fill, aten.where, aten.add):
        return _mask_step(gm, node)
    moved = relayout_step(node, gm)
    if moved is None or moved[2]:  # a transpose of the scores is not attention
        return None
    return _Step(moved[0], moved[1])


def _mask_step(gm: fx.GraphModule, node: fx.Node) -> _Step | None:
    if is_op(node, aten.masked_fill):
        scores, dropped, fill = node.args[:3]
        if not is_very_negative(constant_scalar(fill, gm)):
            return None
        return _Step(scores, mask=dropped, mask_kind=_DROPPED, extra=_nodes(fill))
    if is_op(node, aten.where):
        cond, a, b = node.args[:3]
        if is_very_negative(constant_scalar(b, gm)):
            return _Step(a, mask=cond, mask_kind="bool", extra=_nodes(b))
        if is_very_negative(constant_scalar(a, gm)):
            return _Step(b, mask=cond, mask_kind=_DROPPED, extra=_nodes(a))
        return None
    return _bias_step(gm, node)


def _bias_step(gm: fx.GraphModule, add: fx.Node, depth: int = 8) -> _Step | None:
    """scores + bias (either order): the bias is the operand not on the way to bmm(q, k^T)."""
    if len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return None
    for scores, bias in (add.args, reversed(add.args)):
        if isinstance(bias, fx.Node) and isinstance(scores, fx.Node) and _leads_to_qk(gm, scores, depth) \
                and shape_of(add) == shape_of(scores) and _mask_kind(bias) == "additive":
            return _Step(scores, mask=bias, mask_kind="additive")
    return None


def _leads_to_qk(gm: fx.GraphModule, node: fx.Node, depth: int = 8) -> bool:
    """Whether a bmm is reached through at most `depth` casts, relayouts, constant scales, tanh and
    additive biases."""
    for left in range(depth, 0, -1):
        if is_op(node, aten.bmm, aten.baddbmm):
            return True
        if is_op(node, *CASTS, aten.tanh):
            node = node.args[0]
            continue
        if is_op(node, aten.add):
            step = _bias_step(gm, node, left - 1)
            if step is None:
                return False
            node = step.parent
            continue
        step = relayout_step(node, gm)
        if step is None or step[2]:
            return False
        node = step[0]
    return False


def _nodes(value: object) -> tuple[fx.Node, ...]:
    return (value,) if isinstance(value, fx.Node) else ()


def _negation(dropped: fx.Node) -> tuple[fx.Node, tuple[fx.Node, ...]]:
    """The keep mask for a mask of dropped positions: x for bitwise_not(x) / logical_not(x),
    else a new logical_not node inserted after `dropped`."""
    if is_op(dropped, aten.bitwise_not, aten.logical_not) and _mask_kind(dropped.args[0]) == "bool":
        return dropped.args[0], (dropped,)
    graph = dropped.graph
    with graph.inserting_after(dropped):
        keep = graph.call_function(aten.logical_not.default, (dropped,))
    value = tensor_meta(dropped)
    if value is not None:
        keep.meta["val"] = torch.logical_not(value)
    keep.meta["nn_module_stack"] = dropped.meta.get("nn_module_stack", {})
    return keep, ()


def _bias_sum(biases: tuple[fx.Node, ...]) -> fx.Node:
    """A new node adding `biases`, placed after the last of them in the graph."""
    graph = biases[0].graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    total, place = biases[0], max(biases, key=order.__getitem__)
    for bias in biases[1:]:
        with graph.inserting_after(place):
            added = graph.call_function(aten.add.Tensor, (total, bias))
        values = tensor_meta(total), tensor_meta(bias)
        if None not in values:
            added.meta["val"] = torch.add(*values)
        added.meta["nn_module_stack"] = bias.meta.get("nn_module_stack", {})
        total = place = added
    return total


def _output_view(pv: fx.Node) -> fx.Node | None:
    """The single user viewing bmm's (B*H, Sq, Dv) output as (B, H, Sq, Dv)."""
    if len(pv.users) != 1:
        return None
    (user,) = pv.users
    shape = shape_of(user)
    return user if is_op(user, *RESHAPES) and shape is not None and len(shape) == 4 else None


def _operands(gm: fx.GraphModule, pv: fx.Node, scores: _Scores, output: fx.Node) -> _Found | None:
    q = trace_operand(scores.qk.args[-2], gm)
    k = trace_operand(scores.qk.args[-1], gm)
    v = trace_operand(pv.args[1], gm)
    if q is None or k is None or v is None:
        return _reject(pv, "q, k or v is not a relayout of a rank-4 tensor")
    if q.transposed or not k.transposed or v.transposed or v.factor != 1.0:
        return _reject(pv, "operands are not (q, k^T, v)")
    k_source, _, k_chain = strip_gqa(k.source)
    v_source, _, v_chain = strip_gqa(v.source)
    region = [scores.qk, output, *q.passed, *k.passed, *v.passed, *k_chain, *v_chain]
    return _Found(output=output, anchor=pv, q=q.source, k=k_source, v=v_source,
                  scale=scores.factor * q.factor * k.factor, mask=scores.mask,
                  mask_kind=scores.mask_kind, region=region, more_biases=scores.more_biases,
                  softcap=scores.softcap)
