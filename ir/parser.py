"""Text -> IR: reads what printer.py writes (its docstring has the grammar), and hand-written text.

Hand-written extras: blank lines and `#` comments (whole lines, or after an op); an op may run
over several lines while one of its brackets is open; attributes with defaults may be left out
(causal = false, kv_heads = heads, module = "", kernel = "dense", min_tokens = 0, no max_tokens);
`<dense>` may be written explicitly. Errors name the (first) line and the column.
"""
from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from typing import Any

from sparsec import patterns as P

from .graph import Graph
from .ops import Attention, Input, Linear, Op, Opaque, Output, Param, Value
from .types import DENSE, DTYPES, AttentionPatterns, BlockSparse, NMSparse, Sparsity, TensorType, Unstructured

__all__ = ["IRParseError", "parse_graph", "parse_type", "parse_pattern", "parse_head_patterns"]

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_VALUE_REF = re.compile(r"%([A-Za-z0-9_][A-Za-z0-9_.]*)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_INT = re.compile(r"[-+]?\d+(?![\w.])")
_FLOAT = re.compile(r"[-+]?(?:inf|nan|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?![\w.])")
_ENCODING_VALUE = re.compile(r"[^\s>]+")
_PROVENANCE = "# provenance: "
_CLOSERS = {"[": "]", "(": ")", "<": ">", "{": "}"}


class IRParseError(ValueError):
    """Malformed IR text; the message names the line and column and shows the line."""

    def __init__(self, message: str, line_no: int, column: int, line: str):
        self.line_no, self.column, self.reason = line_no, column, message
        pointer = " " * (column - 1) + "^"
        super().__init__(f"line {line_no}, column {column}: {message}\n  {line}\n  {pointer}")


class _Cursor:
    """A position in one line of text, with the small scanning steps the grammar needs."""

    def __init__(self, text: str, line_no: int = 1):
        self.text, self.pos, self.line_no = text, 0, line_no

    def error(self, message: str, pos: int | None = None) -> IRParseError:
        return IRParseError(message, self.line_no, (self.pos if pos is None else pos) + 1, self.text)

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self, literal: str) -> bool:
        self.skip_ws()
        return self.text.startswith(literal, self.pos)

    def eat(self, literal: str) -> bool:
        if self.peek(literal):
            self.pos += len(literal)
            return True
        return False

    def expect(self, literal: str) -> None:
        if not self.eat(literal):
            raise self.error(f"expected {literal!r}, found {self._found()}")

    def match(self, pattern: re.Pattern, what: str) -> re.Match:
        self.skip_ws()
        m = pattern.match(self.text, self.pos)
        if m is None:
            raise self.error(f"expected {what}, found {self._found()}")
        self.pos = m.end()
        return m

    def eat_word(self, word: str) -> bool:
        self.skip_ws()
        m = _WORD.match(self.text, self.pos)
        if m is None or m.group() != word:
            return False
        self.pos = m.end()
        return True

    def at_end(self) -> bool:
        """True at the end of the line or at a trailing # comment."""
        self.skip_ws()
        return self.pos == len(self.text) or self.text[self.pos] == "#"

    def expect_end(self) -> None:
        if not self.at_end():
            raise self.error(f"unexpected {self._found()} at the end of the op")

    def until_closing(self, opener: str) -> str:
        """Raw text up to the bracket closing `opener` (just consumed); skips nested brackets
        and quoted strings; consumes the closer."""
        start, stack, quote = self.pos, [_CLOSERS[opener]], None
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            self.pos += 1
            if quote:
                quote = None if ch == quote else quote
                if ch == "\\":
                    self.pos += 1
            elif ch in "\"'":
                quote = ch
            elif ch in _CLOSERS and ch != "<":  # '<' only opens an encoding, never nests
                stack.append(_CLOSERS[ch])
            elif ch == stack[-1]:
                stack.pop()
                if not stack:
                    return self.text[start:self.pos - 1]
        raise self.error(f"{opener!r} is never closed", start - 1)

    def _found(self) -> str:
        rest = self.text[self.pos:].strip()
        return repr(rest[:20]) if rest else "end of line"


# -- patterns ------------------------------------------------------------------------------

_PATTERN_CLASSES: dict[str, type[P.Pattern]] = {
    cls.__name__: cls for cls in (P.Dense, P.Skip, P.Window, P.MultiDiagonal, P.Columns,
                                  P.AShape, P.VerticalSlash, P.BlockSparse)
}


def _pattern_from_ast(node: ast.expr) -> P.Pattern:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _pattern_from_ast(node.left) | _pattern_from_ast(node.right)
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise ValueError(f"expected a pattern such as Window(left=64, right=0), got {ast.unparse(node)!r}")
    cls = _PATTERN_CLASSES.get(node.func.id)
    if cls is None:
        raise ValueError(f"unknown pattern {node.func.id!r}; known: {', '.join(_PATTERN_CLASSES)}")
    try:
        args = [ast.literal_eval(a) for a in node.args]
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    except ValueError:
        raise ValueError(f"arguments of {ast.unparse(node)!r} must be literals") from None
    if None in kwargs:
        raise ValueError(f"{ast.unparse(node)!r}: ** arguments are not allowed")
    try:
        return cls(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad pattern {ast.unparse(node)!r}: {e}") from None


def _parse_expression(text: str) -> ast.expr:
    try:
        return ast.parse(text.strip(), mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"not a pattern expression ({e.msg}): {text.strip()!r}") from None


def parse_pattern(text: str) -> P.Pattern:
    """One pattern written as printer.format_pattern writes it, e.g. "Dense() | Window(left=4, right=0)"."""
    return _pattern_from_ast(_parse_expression(text))


def parse_head_patterns(text: str) -> tuple[P.Pattern, ...]:
    """A per-head list "[p0, p1 * 3, ...]" (`p * k`: k consecutive heads with pattern p)."""
    node = _parse_expression(text)
    if not isinstance(node, ast.List):
        raise ValueError(f"per-head patterns must be a [...] list, got {text.strip()!r}")
    heads: list[P.Pattern] = []
    for item in node.elts:
        count = 1
        if isinstance(item, ast.BinOp) and isinstance(item.op, ast.Mult):
            count_node, item = item.right, item.left
            count = count_node.value if isinstance(count_node, ast.Constant) else None
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"a head count after '*' must be a positive int, got {ast.unparse(count_node)!r}")
        heads.extend([_pattern_from_ast(item)] * count)
    return tuple(heads)


# -- types ---------------------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses (a dim such as Max(1, s0) holds a comma)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _parse_dims(c: _Cursor) -> tuple[int | str, ...]:
    start = c.pos
    raw = c.until_closing("[")
    if not raw.strip():
        return ()
    parts = _split_top_level(raw)
    if "" in parts:
        raise c.error("empty dimension in the shape", start)
    return tuple(int(p) if _INT.fullmatch(p) else p for p in parts)


def _encoding_fields(c: _Cursor, allowed: dict[str, Callable[[str], Any]]) -> dict[str, Any]:
    """key=value pairs up to the closing '>'."""
    values: dict[str, Any] = {}
    while not c.eat(">"):
        pos = c.pos
        key = c.match(_WORD, "key=value or '>'").group()
        if key not in allowed:
            raise c.error(f"unknown encoding field {key!r}; expected one of {', '.join(allowed)}", pos)
        c.expect("=")
        raw = c.match(_ENCODING_VALUE, f"a value for {key}").group()
        try:
            values[key] = allowed[key](raw)
        except ValueError:
            raise c.error(f"bad value {raw!r} for {key}", pos) from None
    return values


def _parse_nm(c: _Cursor) -> Sparsity:
    m = c.match(re.compile(r"(\d+):(\d+)"), "N:M such as 2:4")
    fields = _encoding_fields(c, {"axis": int, "density": float})
    return NMSparse(n=int(m.group(1)), m=int(m.group(2)), **fields)


def _parse_block(c: _Cursor) -> Sparsity:
    m = c.match(re.compile(r"(\d+)x(\d+)"), "a block size such as 32x32")
    fields = _encoding_fields(c, {"density": float})
    return BlockSparse(block=(int(m.group(1)), int(m.group(2))), **fields)


def _parse_unstructured(c: _Cursor) -> Sparsity:
    return Unstructured(**_encoding_fields(c, {"density": float}))


def _parse_patterns(c: _Cursor) -> Sparsity:
    c.expect("[")
    start = c.pos - 1
    raw = c.until_closing("[")
    try:
        patterns = parse_head_patterns("[" + raw + "]")
    except ValueError as e:
        raise c.error(str(e), start) from None
    c.expect(">")
    return AttentionPatterns(patterns=patterns)


def _parse_dense(c: _Cursor) -> Sparsity:
    c.expect(">")
    return DENSE


_ENCODINGS: dict[str, Callable[[_Cursor], Sparsity]] = {
    "dense": _parse_dense, "nm": _parse_nm, "block": _parse_block,
    "unstructured": _parse_unstructured, "patterns": _parse_patterns,
}


def _parse_sparsity(c: _Cursor) -> Sparsity:
    pos = c.pos
    kind = c.match(_WORD, "a sparsity encoding").group()
    parse = _ENCODINGS.get(kind)
    if parse is None:
        raise c.error(f"unknown sparsity encoding {kind!r}; known: {', '.join(_ENCODINGS)}", pos)
    try:
        return parse(c)
    except (TypeError, ValueError) as e:
        if isinstance(e, IRParseError):
            raise
        raise c.error(f"bad {kind} encoding: {e}", pos) from None


def _parse_type(c: _Cursor) -> TensorType:
    pos = c.pos
    dtype = c.match(_WORD, "a type such as f32[2, 64]").group()
    if dtype not in DTYPES:
        raise c.error(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}", pos)
    c.expect("[")
    shape = _parse_dims(c)
    sparsity = _parse_sparsity(c) if c.eat("<") else DENSE
    try:
        return TensorType(shape=shape, dtype=dtype, sparsity=sparsity)
    except (TypeError, ValueError) as e:
        raise c.error(str(e), pos) from None


def parse_type(text: str) -> TensorType:
    """A type written as printer.format_type writes it, e.g. "f32[s0, 64]<unstructured density=0.5>"."""
    c = _Cursor(text)
    t = _parse_type(c)
    if not c.at_end():
        raise c.error(f"unexpected {c._found()} after the type")
    return t


# -- attributes ----------------------------------------------------------------------------


def _attr_string(c: _Cursor) -> str:
    return json.loads(c.match(_STRING, 'a "string"').group())


def _attr_float(c: _Cursor) -> float:
    return float(c.match(_FLOAT, "a number").group())


def _attr_int(c: _Cursor) -> int:
    return int(c.match(_INT, "an int").group())


def _attr_bool(c: _Cursor) -> bool:
    return c.match(re.compile(r"(true|false)\b"), "true or false").group() == "true"


def _attr_int_pair(c: _Cursor) -> tuple[int, int]:
    c.expect("[")
    first = _attr_int(c)
    c.expect(",")
    second = _attr_int(c)
    c.expect("]")
    return first, second


def _attr_strings(c: _Cursor) -> tuple[str, ...]:
    c.expect("[")
    items: list[str] = []
    while not c.eat("]"):
        if items:
            c.expect(",")
        items.append(_attr_string(c))
    return tuple(items)


_REQUIRED = object()


def _parse_attrs(c: _Cursor, spec: dict[str, tuple[Callable[[_Cursor], Any], Any]]) -> dict[str, Any]:
    """{key = value, ...} by `spec`: key -> (value parser, default or _REQUIRED)."""
    values: dict[str, Any] = {}
    if c.eat("{"):
        while not c.eat("}"):
            if values:
                c.expect(",")
            pos = c.pos
            key = c.match(_WORD, "an attribute name").group()
            if key not in spec:
                raise c.error(f"unknown attribute {key!r}; expected one of {', '.join(spec)}", pos)
            if key in values:
                raise c.error(f"attribute {key!r} given twice", pos)
            c.expect("=")
            values[key] = spec[key][0](c)
    missing = [k for k, (_, default) in spec.items() if default is _REQUIRED and k not in values]
    if missing:
        raise c.error(f"missing attribute(s) {', '.join(missing)}")
    return {k: values.get(k, default) for k, (_, default) in spec.items()}


# -- ops -----------------------------------------------------------------------------------


class _Scope:
    """Values defined so far in the graph, for resolving %name operands to typed Values."""

    def __init__(self) -> None:
        self.values: dict[str, Value] = {}

    def define(self, c: _Cursor, value: Value, pos: int) -> None:
        if value.name in self.values:
            raise c.error(f"%{value.name} is defined twice", pos)
        self.values[value.name] = value

    def ref(self, c: _Cursor, *, optional: bool = False) -> Value | None:
        if optional and c.eat_word("none"):
            return None
        pos = c.pos
        name = c.match(_VALUE_REF, "a %value" + (" or none" if optional else "")).group(1)
        if name not in self.values:
            raise c.error(f"%{name} is used before it is defined", pos)
        return self.values[name]

    def refs(self, c: _Cursor, count: int, optional_last: bool = False) -> list[Value | None]:
        values = []
        for i in range(count):
            if i:
                c.expect(",")
            values.append(self.ref(c, optional=optional_last and i == count - 1))
        return values


def _single(c: _Cursor, results: list[Value], kind: str) -> Value:
    if len(results) != 1:
        raise c.error(f"{kind} defines exactly one value, got {len(results)}")
    return results[0]


def _op_input(c: _Cursor, results: list[Value], scope: _Scope) -> Op:
    return Input(result=_single(c, results, "input"), index=_attr_int(c))


def _op_param(c: _Cursor, results: list[Value], scope: _Scope) -> Op:
    return Param(result=_single(c, results, "param"), target=_attr_string(c))


def _op_linear(c: _Cursor, results: list[Value], scope: _Scope) -> Op:
    x, weight, bias = scope.refs(c, 3, optional_last=True)
    attrs = _parse_attrs(c, {"kernel": (_attr_string, "dense"), "min_tokens": (_attr_int, 0),
                             "max_tokens": (_attr_int, None), "module": (_attr_string, "")})
    return Linear(result=_single(c, results, "linear"), x=x, weight=weight, bias=bias,
                  module_path=attrs["module"], kernel=attrs["kernel"], min_tokens=attrs["min_tokens"],
                  max_tokens=attrs["max_tokens"])


def _op_attention(c: _Cursor, results: list[Value], scope: _Scope) -> Op:
    q, k, v, mask = scope.refs(c, 4, optional_last=True)
    attrs = _parse_attrs(c, {
        "scale": (_attr_float, _REQUIRED), "causal": (_attr_bool, False),
        "heads": (_attr_int, _REQUIRED), "kv_heads": (_attr_int, None),
        "scores": (_parse_type, _REQUIRED), "module": (_attr_string, ""),
        "tiles": (_attr_int_pair, None), "mask_rule": (_attr_string, ""), "softcap": (_attr_float, 0.0),
        "sinks": (scope.ref, None),
    })
    kv_heads = attrs["heads"] if attrs["kv_heads"] is None else attrs["kv_heads"]
    return Attention(result=_single(c, results, "attention"), q=q, k=k, v=v, mask=mask,
                     scale=attrs["scale"], causal=attrs["causal"], num_heads=attrs["heads"],
                     num_kv_heads=kv_heads, scores=attrs["scores"], module_path=attrs["module"],
                     tiles=attrs["tiles"], mask_rule=attrs["mask_rule"], softcap=attrs["softcap"],
                     sinks=attrs["sinks"])


def _op_opaque(c: _Cursor, results: list[Value], scope: _Scope) -> Op:
    inputs: list[Value] = []
    if c.peek("%"):
        inputs.append(scope.ref(c))
        while c.eat(","):
            inputs.append(scope.ref(c))
    attrs = _parse_attrs(c, {"fx": (_attr_strings, _REQUIRED)})
    return Opaque(results=tuple(results), inputs=tuple(inputs), fx_nodes=attrs["fx"])


_OPS: dict[str, Callable[[_Cursor, list[Value], _Scope], Op]] = {
    "input": _op_input, "param": _op_param, "linear": _op_linear,
    "attention": _op_attention, "opaque": _op_opaque,
}


def _parse_result(c: _Cursor) -> Value:
    pos = c.pos
    name = c.match(_VALUE_REF, "a %value being defined").group(1)
    c.expect(":")
    t = _parse_type(c)
    try:
        return Value(name=name, type=t)
    except (TypeError, ValueError) as e:
        raise c.error(str(e), pos) from None


def _parse_output(c: _Cursor, scope: _Scope) -> Op:
    values: list[Value] = []
    if not c.at_end():
        values.append(scope.ref(c))
        while c.eat(","):
            values.append(scope.ref(c))
    return Output(values=tuple(values))


def _parse_op(c: _Cursor, scope: _Scope) -> Op:
    if c.eat_word("return"):
        op = _parse_output(c, scope)
    else:
        results: list[Value] = []
        if not c.peek("opaque"):  # an opaque region may define nothing
            positions = []
            while not results or c.eat(","):
                positions.append(c.pos)
                results.append(_parse_result(c))
            c.expect("=")
            for value, pos in zip(results, positions):
                scope.define(c, value, pos)
        pos = c.pos
        kind = c.match(_WORD, "an op name").group()
        if kind not in _OPS:
            raise c.error(f"unknown op {kind!r}; known: {', '.join(_OPS)}, return", pos)
        try:
            op = _OPS[kind](c, results, scope)
        except (TypeError, ValueError) as e:
            if isinstance(e, IRParseError):
                raise
            raise c.error(f"bad {kind} op: {e}", pos) from None
    c.expect_end()
    return op


# -- graph ---------------------------------------------------------------------------------


def _is_blank(line: str) -> bool:
    stripped = line.strip()
    return not stripped or stripped.startswith("#")


def _scan(line: str) -> tuple[str, int]:
    """The line without its trailing # comment, and how many brackets it leaves open."""
    depth, quote, i = 0, None, 0
    while i < len(line):
        ch = line[i]
        if quote:
            quote = None if ch == quote else quote
            i += 2 if ch == "\\" else 1
            continue
        if ch == "#":
            return line[:i].rstrip(), depth
        if ch in "\"'":
            quote = ch
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
        i += 1
    return line.rstrip(), depth


def _logical_lines(lines: list[str], row: int):
    """(first line number, text) per op: an op continues onto the next lines while one of its
    brackets is open, so long attention ops can be written over several lines."""
    while row < len(lines):
        if _is_blank(lines[row]):
            row += 1
            continue
        first = row
        text, depth = _scan(lines[row])
        row += 1
        while depth > 0 and row < len(lines):
            more, more_depth = _scan(lines[row])
            text, depth = f"{text} {more.strip()}", depth + more_depth
            row += 1
        yield first + 1, text, row


def parse_graph(text: str) -> Graph:
    """The Graph that `text` (as written by print_graph, or by hand) describes."""
    if not isinstance(text, str):
        raise TypeError(f"parse_graph needs a str, got {type(text).__name__}")
    lines = text.splitlines()
    provenance: list[str] = []
    row = 0
    while row < len(lines) and _is_blank(lines[row]):
        if lines[row].lstrip().startswith(_PROVENANCE):
            provenance.append(lines[row].lstrip()[len(_PROVENANCE):])
        row += 1
    if row == len(lines):
        raise IRParseError("no 'graph NAME {' header found", max(len(lines), 1), 1, "")
    header = _Cursor(lines[row], row + 1)
    if not header.eat_word("graph"):
        raise header.error("expected 'graph NAME {'")
    name = header.match(_WORD, "a graph name").group()
    header.expect("{")
    header.expect_end()
    ops = _parse_body(lines, row + 1, name)
    return Graph(name=name, ops=tuple(ops), provenance="\n".join(provenance))


def _parse_body(lines: list[str], row: int, name: str) -> list[Op]:
    ops: list[Op] = []
    scope = _Scope()
    for line_no, text, next_row in _logical_lines(lines, row):
        c = _Cursor(text, line_no)
        if c.eat("}"):
            c.expect_end()
            for rest in range(next_row, len(lines)):
                if not _is_blank(lines[rest]):
                    raise IRParseError("text after the end of the graph", rest + 1, 1, lines[rest])
            return ops
        ops.append(_parse_op(c, scope))
    raise IRParseError(f"graph {name} is not closed with '}}'", max(len(lines), 1), 1,
                       lines[-1] if lines else "")
