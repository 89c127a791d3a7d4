"""IR verifier: structural and shape checks run after every pass in tests and debug mode.

`verify(g)` collects every problem it finds and raises one IRVerificationError listing them, each
naming the op (by index, kind and result) and what is wrong. Shape checks compare dims only where
both are static ints: a symbolic dim ("s0") may equal anything. A Linear op's sparse kernel must
fit the encoding of its weight's type (bsrRxC: blocks RxC; nmN:M / semi2:4: N:M or sparser).
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable

from sparsec import patterns as P

from .graph import Graph
from .ops import (Attention, Input, Linear, Op, Opaque, Output, Param, Value, linear_kernel_format, operands_of,
                  results_of)
from .printer import format_type
from .types import AttentionPatterns, BlockSparse, Dim, NMSparse, TensorType, Unstructured, is_static

__all__ = ["IRVerificationError", "verify", "verification_enabled"]

logger = logging.getLogger(__name__)

_WEIGHT_ENCODINGS = (NMSparse, BlockSparse, Unstructured)


class IRVerificationError(ValueError):
    """The graph breaks an IR invariant; `.problems` lists every one found."""

    def __init__(self, graph_name: str, problems: list[str]):
        self.problems = problems
        listing = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"graph {graph_name} failed verification ({len(problems)} problem(s)):\n{listing}")


def verification_enabled() -> bool:
    """Whether pipelines should verify after every pass (SPARSEC_VERIFY=1, set in tests)."""
    return os.environ.get("SPARSEC_VERIFY", "") not in ("", "0")


def _describe(index: int, op: Op) -> str:
    results = results_of(op)
    defined = f" %{results[0].name}" if results else ""
    return f"op {index} ({type(op).__name__.lower()}{defined})"


def _same(a: Dim, b: Dim) -> bool:
    """Dims that may be equal: equal ints, or anything symbolic."""
    return not (is_static(a) and is_static(b)) or a == b


def _shape(dims: tuple[Dim, ...]) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


# -- graph-wide checks ---------------------------------------------------------------------


def _check_ssa(g: Graph) -> list[str]:
    """Each name defined once, before use, and every use carries the defining Value's type."""
    problems: list[str] = []
    defined: dict[str, Value] = {}
    for i, op in enumerate(g.ops):
        for v in operands_of(op):
            if v.name not in defined:
                problems.append(f"{_describe(i, op)}: operand %{v.name} is used before it is defined")
            elif defined[v.name] != v:
                problems.append(f"{_describe(i, op)}: operand %{v.name} has type {v.type} but was "
                                f"defined with type {defined[v.name].type}")
        for v in results_of(op):
            if v.name in defined:
                problems.append(f"{_describe(i, op)}: %{v.name} is defined twice (SSA)")
            defined[v.name] = v
    return problems


def _check_order(g: Graph) -> list[str]:
    """Param/Input ops first, exactly one Output, last."""
    problems: list[str] = []
    outputs = [i for i, op in enumerate(g.ops) if isinstance(op, Output)]
    if len(outputs) != 1:
        problems.append(f"graph has {len(outputs)} output ops; expected exactly one")
    elif outputs[0] != len(g.ops) - 1:
        problems.append(f"the output op is op {outputs[0]}, not the last op")
    seen_compute = False
    for i, op in enumerate(g.ops):
        if isinstance(op, (Param, Input)) and seen_compute:
            problems.append(f"{_describe(i, op)}: params and inputs must come before other ops")
        seen_compute = seen_compute or not isinstance(op, (Param, Input))
    return problems


def _check_unique(g: Graph) -> list[str]:
    """Input indices are distinct, and each FX node belongs to at most one opaque region."""
    problems: list[str] = []
    indices: dict[int, int] = {}
    fx_owner: dict[str, int] = {}
    for i, op in enumerate(g.ops):
        if isinstance(op, Input):
            if op.index in indices:
                problems.append(f"{_describe(i, op)}: input index {op.index} is also op {indices[op.index]}'s")
            indices.setdefault(op.index, i)
        for node in op.fx_nodes if isinstance(op, Opaque) else ():
            if node in fx_owner:
                problems.append(f"{_describe(i, op)}: fx node {node!r} is also in op {fx_owner[node]}")
            fx_owner.setdefault(node, i)
    return problems


def _check_encodings(g: Graph) -> list[str]:
    """Weight encodings only on Param values; AttentionPatterns only on Attention.scores."""
    problems: list[str] = []
    for i, op in enumerate(g.ops):
        for v in results_of(op):
            enc = v.type.sparsity
            if isinstance(enc, AttentionPatterns):
                problems.append(f"{_describe(i, op)}: %{v.name} has attention patterns; they belong "
                                "only on an attention op's scores type")
            elif isinstance(enc, _WEIGHT_ENCODINGS) and not isinstance(op, Param):
                problems.append(f"{_describe(i, op)}: %{v.name} has a {type(enc).__name__} encoding, "
                                "which only param values may carry")
            elif isinstance(op, Param):
                problems.extend(f"{_describe(i, op)}: {p}" for p in _weight_encoding_problems(v.type))
        if isinstance(op, Attention) and isinstance(op.scores.sparsity, _WEIGHT_ENCODINGS):
            problems.append(f"{_describe(i, op)}: scores has a {type(op.scores.sparsity).__name__} "
                            "encoding; scores take DENSE or AttentionPatterns")
    return problems


def _weight_encoding_problems(t: TensorType) -> list[str]:
    enc = t.sparsity
    if isinstance(enc, NMSparse):
        if not -t.rank <= enc.axis < t.rank:
            return [f"N:M axis {enc.axis} is out of range for rank {t.rank}"]
        size = t.shape[enc.axis]
        if is_static(size) and size % enc.m:
            return [f"N:M groups of {enc.m} do not tile dim {enc.axis} of size {size}"]
    if isinstance(enc, BlockSparse) and t.rank != 2:
        return [f"block sparsity needs a rank-2 tensor, got shape {_shape(t.shape)}"]
    return []


# -- per-op checks -------------------------------------------------------------------------


def _check_linear(op: Linear, producers: dict[str, Op]) -> list[str]:
    x, w, y = op.x.type, op.weight.type, op.result.type
    problems: list[str] = []
    if not isinstance(producers.get(op.weight.name), Param):
        problems.append(f"weight %{op.weight.name} is not a param's value")
    if x.rank < 1 or w.rank != 2 or y.rank != x.rank:
        return problems + [f"shapes x{_shape(x.shape)}, weight{_shape(w.shape)}, result{_shape(y.shape)} "
                           "do not fit x[..., in] @ weight[out, in].T -> [..., out]"]
    out_features, in_features = w.shape
    if not _same(x.shape[-1], in_features):
        problems.append(f"x has {x.shape[-1]} input features but weight{_shape(w.shape)} takes {in_features}")
    if not all(_same(a, b) for a, b in zip(x.shape[:-1], y.shape[:-1])) or not _same(y.shape[-1], out_features):
        problems.append(f"result{_shape(y.shape)} should be {_shape(x.shape[:-1] + (out_features,))}")
    if op.bias is not None and (op.bias.type.rank != 1 or not _same(op.bias.type.shape[0], out_features)):
        problems.append(f"bias{_shape(op.bias.type.shape)} should be [{out_features}]")
    dtypes = {x.dtype, w.dtype, y.dtype} | ({op.bias.type.dtype} if op.bias is not None else set())
    if len(dtypes) > 1:
        problems.append(f"mixed dtypes {sorted(dtypes)}; x, weight, bias and result must share one")
    return problems + _linear_kernel_problems(op)


def _linear_kernel_problems(op: Linear) -> list[str]:
    """A sparse kernel must fit the structure the weight's type records."""
    kind, params = linear_kernel_format(op.kernel)
    enc, w = op.weight.type.sparsity, op.weight.type
    if kind == "bsr" and not (isinstance(enc, BlockSparse) and enc.block == params):
        return [f"kernel {op.kernel} needs a weight of block {params[0]}x{params[1]} sparsity, "
                f"the weight is {format_type(w)}"]
    if kind in ("nm", "semi") and not (isinstance(enc, NMSparse) and enc.m == params[1] and enc.n <= params[0]
                                       and enc.axis in (-1, 1)):
        return [f"kernel {op.kernel} needs a weight of {params[0]}:{params[1]} (or sparser) sparsity along "
                f"its input features, the weight is {format_type(w)}"]
    if kind == "semi" and w.dtype not in ("f16", "bf16"):
        return [f"kernel {op.kernel} runs f16 / bf16 weights, not {w.dtype}"]
    if kind == "unstructured" and not isinstance(enc, (NMSparse, BlockSparse, Unstructured)):
        return [f"kernel {op.kernel} skips a weight's zeros, the weight is {format_type(w)}"]
    if kind == "unstructured" and w.dtype not in ("f32", "bf16"):
        return [f"kernel {op.kernel} runs f32 / bf16 weights, not {w.dtype}"]
    if kind == "bsr" and w.rank == 2 and any(is_static(d) and d % b for d, b in zip(w.shape, params)):
        return [f"kernel {op.kernel}: blocks {params[0]}x{params[1]} do not tile weight{_shape(w.shape)}"]
    return []


def _check_attention(op: Attention, producers: dict[str, Op]) -> list[str]:
    q, k, v, o = op.q.type, op.k.type, op.v.type, op.result.type
    if any(t.rank != 4 for t in (q, k, v, o)):
        return [f"q{_shape(q.shape)}, k{_shape(k.shape)}, v{_shape(v.shape)} and result"
                f"{_shape(o.shape)} must all be rank 4 (B, H, S, D)"]
    return (_attention_heads(op) + _attention_shapes(op) + _attention_scores(op)
            + _attention_mask(op) + _attention_scalars(op))


def _attention_heads(op: Attention) -> list[str]:
    hq, hkv = op.q.type.shape[1], op.k.type.shape[1]
    problems: list[str] = []
    if op.num_heads < 1 or op.num_kv_heads < 1 or op.num_heads % op.num_kv_heads:
        problems.append(f"num_heads={op.num_heads} must be a positive multiple of num_kv_heads={op.num_kv_heads}")
    if not _same(hq, op.num_heads):
        problems.append(f"num_heads={op.num_heads} but q has {hq} heads")
    if not _same(hkv, op.num_kv_heads):
        problems.append(f"num_kv_heads={op.num_kv_heads} but k has {hkv} heads")
    return problems


def _attention_shapes(op: Attention) -> list[str]:
    (b, hq, sq, d), (kb, hkv, sk, kd) = op.q.type.shape, op.k.type.shape
    (vb, vh, vs, dv), o = op.v.type.shape, op.result.type
    problems: list[str] = []
    if not (_same(b, kb) and _same(b, vb) and _same(hkv, vh) and _same(sk, vs)):
        problems.append(f"k{_shape(op.k.type.shape)} and v{_shape(op.v.type.shape)} do not match "
                        f"each other and q{_shape(op.q.type.shape)} in batch, kv heads and length")
    if not _same(d, kd):
        problems.append(f"q head dim {d} differs from k head dim {kd}")
    if not all(_same(a, e) for a, e in zip(o.shape, (b, hq, sq, dv))):
        problems.append(f"result{_shape(o.shape)} should be {_shape((b, hq, sq, dv))}")
    if len({op.q.type.dtype, op.k.type.dtype, op.v.type.dtype, o.dtype}) > 1:
        problems.append("q, k, v and result must share one dtype")
    return problems


def _attention_scores(op: Attention) -> list[str]:
    (b, hq, sq, _), sk = op.q.type.shape, op.k.type.shape[2]
    scores = op.scores
    want = (b, hq, sq, sk)
    if scores.rank != 4 or not all(_same(a, e) for a, e in zip(scores.shape, want)):
        return [f"scores{_shape(scores.shape)} should be {_shape(want)} (B, Hq, Sq, Sk)"]
    if not isinstance(scores.sparsity, AttentionPatterns):
        return []
    patterns = scores.sparsity.patterns
    if len(patterns) != op.num_heads:
        return [f"scores carry {len(patterns)} head patterns for num_heads={op.num_heads}"]
    if not (is_static(sq) and is_static(sk)):
        return []
    masked = op.mask is not None
    return [f"head {h}: {e}" for h, p in enumerate(patterns) for e in _block_layout_problems(p, sq, sk, masked)]


def _block_layout_problems(pattern: P.Pattern, sq: int, sk: int, masked: bool) -> list[str]:
    """A layout must fit (sq, sk); under a mask it may cover fewer key blocks (a layout of the
    option attention_patterns for a prefix of the keys: each call's mask says whether its rows'
    kept keys fit it, sparsec/key_padding.py)."""
    parts = pattern.parts if isinstance(pattern, P.Union) else (pattern,)
    problems: list[str] = []
    for part in parts:
        if not isinstance(part, P.BlockSparse):
            continue
        (bq, bk), (rows, cols) = part.block, part.layout_shape
        if masked and rows == -(-sq // bq) and cols <= -(-sk // bk):
            continue
        try:
            part.check_lengths(sq, sk)
        except ValueError as e:
            problems.append(str(e))
    return problems


def _attention_mask(op: Attention) -> list[str]:
    if op.mask is None:
        return []
    m, scores = op.mask.type, op.scores.shape
    problems: list[str] = []
    if m.dtype not in ("bool", "f64", "f32", "f16", "bf16"):
        problems.append(f"mask %{op.mask.name} has dtype {m.dtype}; expected bool or a float bias")
    # Broadcasting aligns trailing dims; each mask dim must be 1 or the scores' dim.
    if m.rank > 4 or not all(d == 1 or _same(d, s) for d, s in zip(reversed(m.shape), reversed(scores))):
        problems.append(f"mask{_shape(m.shape)} does not broadcast to scores{_shape(scores)}")
    return problems


def _attention_scalars(op: Attention) -> list[str]:
    if not math.isfinite(op.scale) or op.scale <= 0:
        return [f"scale={op.scale!r} must be a positive finite float"]
    return []


def _check_opaque(op: Opaque, producers: dict[str, Op]) -> list[str]:
    return [] if op.fx_nodes else ["an opaque region must name at least one fx node"]


_OP_CHECKS: dict[type[Op], Callable[..., list[str]]] = {
    Linear: _check_linear, Attention: _check_attention, Opaque: _check_opaque,
}


def _check_ops(g: Graph) -> list[str]:
    producers = {v.name: op for op in g.ops for v in results_of(op)}
    problems: list[str] = []
    for i, op in enumerate(g.ops):
        check = _OP_CHECKS.get(type(op))
        if check is not None:
            problems.extend(f"{_describe(i, op)}: {p}" for p in check(op, producers))
    return problems


_GRAPH_CHECKS = (_check_ssa, _check_order, _check_unique, _check_encodings, _check_ops)


def verify(g: Graph) -> None:
    """Raise IRVerificationError listing every invariant `g` breaks; return None if it is well formed."""
    if not isinstance(g, Graph):
        raise TypeError(f"verify needs a Graph, got {type(g).__name__}")
    problems = [p for check in _GRAPH_CHECKS for p in check(g)]
    if problems:
        raise IRVerificationError(g.name, problems)
    logger.debug("graph %s verified (%d ops)", g.name, len(g.ops))
