"""IR -> text. The text is meant to be read and hand-written (pass tests are before/after text),
and parses back exactly: parse_graph(print_graph(g)) == g. Grammar, one op a line:

    # provenance: lower_attention (took 3 ms)
    graph forward {
      %x: f32[s0, 64, 128] = input 0
      %w: f32[384, 128]<nm 2:4 axis=-1 density=0.5> = param "blocks.0.attn.qkv.weight"
      %y: f32[s0, 64, 384] = linear %x, %w, none {kernel = "nm2:4", max_tokens = 4096,
            module = "blocks.0.attn.qkv"}                                   (all on one line)
      %o: f32[2, 8, 64, 64] = attention %q, %k, %v, none {scale = 0.125, causal = true,
            heads = 8, kv_heads = 2, scores = f32[2, 8, 64, 64]<patterns [Dense() * 8]>,
            module = "blocks.0.attn"}                                   (all on one line)
      %a: f32[2], %b: f32[2] = opaque %x, %o {fx = ["add_1", "gelu"]}
      return %a, %b
    }

Types are dtype[dims]<encoding>, the encoding omitted when dense: <nm N:M axis=A density=D>,
<block RxC density=D>, <unstructured density=D>, <patterns [p0, p1, ...]>. Patterns are written
as Python-like constructor calls (their repr; BlockSparse spells out its layout rows), `a | b` for
unions, and `p * k` for k consecutive heads with the same pattern. Strings are JSON strings and
floats are written with repr, so both read back exactly. Attributes at their defaults are left
out: `module = ""`, and a linear's `kernel = "dense"`, `min_tokens = 0`, no `max_tokens`.
"""
from __future__ import annotations

import json
from collections.abc import Callable

from sparsec import patterns as P

from .graph import Graph
from .ops import Attention, Input, Linear, Op, Opaque, Output, Param, Value
from .types import AttentionPatterns, BlockSparse, DenseEncoding, NMSparse, Sparsity, TensorType, Unstructured

__all__ = ["print_graph", "format_type", "format_sparsity", "format_pattern", "format_op"]

INDENT = "  "


def format_pattern(pattern: P.Pattern) -> str:
    """A pattern as a constructor call that parse_pattern reads back."""
    if isinstance(pattern, P.BlockSparse):  # its repr is a summary; spell the layout out
        return f"BlockSparse(layout={json.dumps(list(pattern.rows))}, block={pattern.block})"
    if isinstance(pattern, P.Union):
        return " | ".join(format_pattern(p) for p in pattern.parts)
    return repr(pattern)


def _format_head_run(pattern: P.Pattern, count: int) -> str:
    text = format_pattern(pattern)
    if count == 1:
        return text
    # `*` binds tighter than `|`, so a repeated union needs parentheses.
    return f"({text}) * {count}" if isinstance(pattern, P.Union) else f"{text} * {count}"


def format_head_patterns(patterns: tuple[P.Pattern, ...]) -> str:
    """[p0, p1, ...] with runs of equal consecutive patterns written `p * k`."""
    runs: list[list] = []
    for p in patterns:
        if runs and runs[-1][0] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    return "[" + ", ".join(_format_head_run(p, n) for p, n in runs) + "]"


def format_sparsity(sparsity: Sparsity) -> str:
    """The <...> suffix of a type ("" when dense)."""
    match sparsity:
        case DenseEncoding():
            return ""
        case NMSparse(n=n, m=m, axis=axis, density=density):
            return f"<nm {n}:{m} axis={axis} density={density!r}>"
        case BlockSparse(block=(rows, cols), density=density):
            return f"<block {rows}x{cols} density={density!r}>"
        case Unstructured(density=density):
            return f"<unstructured density={density!r}>"
        case AttentionPatterns(patterns=patterns):
            return f"<patterns {format_head_patterns(patterns)}>"
    raise TypeError(f"no text form for sparsity encoding {sparsity!r}")


def format_type(t: TensorType) -> str:
    """dtype[dims]<encoding>, e.g. f32[s0, 64]<unstructured density=0.5>."""
    dims = ", ".join(str(d) for d in t.shape)
    return f"{t.dtype}[{dims}]{format_sparsity(t.sparsity)}"


def _ref(value: Value | None) -> str:
    return "none" if value is None else f"%{value.name}"


def _refs(values: tuple[Value | None, ...]) -> str:
    return ", ".join(_ref(v) for v in values)


def _attrs(pairs: list[tuple[str, str]], module_path: str = "") -> str:
    if module_path:
        pairs = pairs + [("module", json.dumps(module_path))]
    return " {" + ", ".join(f"{k} = {v}" for k, v in pairs) + "}" if pairs else ""


def _param(op: Param) -> str:
    return f"param {json.dumps(op.target)}"


def _input(op: Input) -> str:
    return f"input {op.index}"


def _linear(op: Linear) -> str:
    attrs = [] if op.kernel == "dense" else [("kernel", json.dumps(op.kernel))]
    if op.min_tokens:
        attrs.append(("min_tokens", str(op.min_tokens)))
    if op.max_tokens is not None:
        attrs.append(("max_tokens", str(op.max_tokens)))
    return f"linear {_refs((op.x, op.weight, op.bias))}" + _attrs(attrs, op.module_path)


def _attention(op: Attention) -> str:
    attrs = [("scale", repr(op.scale)), ("causal", "true" if op.causal else "false"),
             ("heads", str(op.num_heads)), ("kv_heads", str(op.num_kv_heads)),
             ("scores", format_type(op.scores))]
    if op.tiles is not None:
        attrs.append(("tiles", f"[{op.tiles[0]}, {op.tiles[1]}]"))
    if op.mask_rule:
        attrs.append(("mask_rule", json.dumps(op.mask_rule)))
    if op.softcap:
        attrs.append(("softcap", repr(op.softcap)))
    if op.sinks is not None:
        attrs.append(("sinks", _ref(op.sinks)))
    return f"attention {_refs((op.q, op.k, op.v, op.mask))}" + _attrs(attrs, op.module_path)


def _opaque(op: Opaque) -> str:
    operands = " " + _refs(op.inputs) if op.inputs else ""
    return f"opaque{operands}" + _attrs([("fx", json.dumps(list(op.fx_nodes)))])


def _output(op: Output) -> str:
    return ("return " + _refs(op.values)) if op.values else "return"


_BODY: dict[type[Op], Callable] = {
    Param: _param, Input: _input, Linear: _linear, Attention: _attention, Opaque: _opaque,
}


def format_op(op: Op) -> str:
    """One op as its line of text (without indentation)."""
    if isinstance(op, Output):
        return _output(op)
    body = _BODY.get(type(op))
    if body is None:
        raise TypeError(f"no text form for op {type(op).__name__}")
    results = op.results if isinstance(op, Opaque) else (op.result,)  # type: ignore[attr-defined]
    if not results:  # an Opaque region whose values nothing reads
        return body(op)
    defs = ", ".join(f"%{v.name}: {format_type(v.type)}" for v in results)
    return f"{defs} = {body(op)}"


def print_graph(g: Graph) -> str:
    """The graph as text; parse_graph reads it back to an equal Graph."""
    lines = [f"# provenance: {line}" for line in g.provenance.splitlines()]
    lines.append(f"graph {g.name} {{")
    lines.extend(INDENT + format_op(op) for op in g.ops)
    lines.append("}")
    return "\n".join(lines) + "\n"
