"""sparsec.ir: types, ops, graph helpers, printer <-> parser round trips, verifier.

The references here are graphs built with the constructors, independently of the text form:
hand-written text must parse to them, and their printed text must parse back to them.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsec import patterns as P
from sparsec.ir import (DENSE, Attention, AttentionPatterns, BlockSparse, Graph, Input, IRParseError,
                        IRVerificationError, Linear, NMSparse, Opaque, Output, Param, TensorType,
                        Unstructured, Value, dtype_name, format_type, parse_graph, parse_head_patterns,
                        parse_pattern, parse_type, print_graph, torch_dtype, verify)
from sparsec.ir.printer import format_head_patterns, format_pattern

FIXTURES = Path(__file__).parent / "ir_fixtures"


def T(*shape, dtype: str = "f32", sparsity=DENSE) -> TensorType:
    return TensorType(shape=shape, dtype=dtype, sparsity=sparsity)


def V(name: str, *shape, dtype: str = "f32", sparsity=DENSE) -> Value:
    return Value(name=name, type=T(*shape, dtype=dtype, sparsity=sparsity))


HEAD_PATTERNS = (
    P.Window(4, 0),
    P.Columns([(0, 2)]) | P.Window(8, 0),
    P.BlockSparse([[1, 0], [1, 1]], 16),
    P.Skip("zero"),
)


def attention_block_graph() -> Graph:
    """The graph tests/ir_fixtures/attention_block.ir describes, built with constructors."""
    x, mask = V("x", 2, 32, 32), V("mask", 1, 1, 32, 32, dtype="bool")
    w_qkv = V("w_qkv", 64, 32, sparsity=NMSparse(n=2, m=4, density=0.5))
    b_qkv = V("b_qkv", 64)
    w_out = V("w_out", 32, 32, sparsity=BlockSparse(block=(8, 8), density=0.25))
    w_ff = V("w_ff", 16, 32, sparsity=Unstructured(density=0.1))
    qkv = V("qkv", 2, 32, 64)
    q, k, v = V("q", 2, 4, 32, 8), V("k", 2, 2, 32, 8), V("v", 2, 2, 32, 8)
    o, o2, y, z = V("o", 2, 4, 32, 8), V("o2", 2, 32, 32), V("y", 2, 32, 32), V("z", 2, 32, 16)
    scores = T(2, 4, 32, 32, sparsity=AttentionPatterns(patterns=HEAD_PATTERNS))
    ops = (
        Input(result=x, index=0), Input(result=mask, index=1),
        Param(result=w_qkv, target="blocks.0.attn.qkv.weight"),
        Param(result=b_qkv, target="blocks.0.attn.qkv.bias"),
        Param(result=w_out, target="blocks.0.attn.out.weight"),
        Param(result=w_ff, target="blocks.0.ff.weight"),
        Linear(result=qkv, x=x, weight=w_qkv, bias=b_qkv, module_path="blocks.0.attn.qkv"),
        Opaque(results=(q, k, v), inputs=(qkv,), fx_nodes=("split", "view_q", "view_k", "view_v")),
        Attention(result=o, q=q, k=k, v=v, mask=mask, scale=1 / math.sqrt(8), causal=True,
                  num_heads=4, num_kv_heads=2, scores=scores, module_path="blocks.0.attn"),
        Opaque(results=(o2,), inputs=(o,), fx_nodes=("transpose", "reshape")),
        Linear(result=y, x=o2, weight=w_out, bias=None, module_path="blocks.0.attn.out"),
        Linear(result=z, x=y, weight=w_ff, bias=None),
        Output(values=(z, o)),
    )
    return Graph(name="block0", ops=ops, provenance="built in test_ir")


def symbolic_graph() -> Graph:
    """Symbolic batch and sequence dims, GQA, every pattern family, a side-effect-only region."""
    x = V("x", "s0", "s1", 64)
    w = V("w", 32, 64, sparsity=NMSparse(n=1, m=8, axis=1, density=0.0625))
    h = V("h", "s0", "s1", 32)
    q, k, v = V("q", "s0", 8, "s1", 4), V("k", "s0", 1, "2*s1 + 1", 4), V("v", "s0", 1, "2*s1 + 1", 16)
    bias = V("attn_bias", "Max(1, s0)", 1, 1, "2*s1 + 1", dtype="bf16")
    o = V("o", "s0", 8, "s1", 16)
    patterns = (P.Dense(), P.Skip(), P.Window(0, 3), P.MultiDiagonal([-16, 0, 16], 2),
                P.Columns([(0, 4), 9]), P.AShape(4, 64), P.VerticalSlash([1, (3, 5)], [0, -7]),
                P.BlockSparse([[True, False, True]], (128, 64)) | P.AShape(1, 2))
    scores = T("s0", 8, "s1", "2*s1 + 1", sparsity=AttentionPatterns(patterns=patterns))
    ops = (
        Input(result=x, index=0), Input(result=bias, index=2), Param(result=w, target="proj.weight"),
        Linear(result=h, x=x, weight=w, bias=None, module_path="proj"),
        Opaque(results=(q, k, v), inputs=(h, x), fx_nodes=("view",)),
        Attention(result=o, q=q, k=k, v=v, mask=bias, scale=0.1, causal=False, num_heads=8,
                  num_kv_heads=1, scores=scores, tiles=(64, 32)),
        Opaque(results=(), inputs=(o,), fx_nodes=("copy_",)),
        Output(values=(o,)),
    )
    return Graph(name="forward", ops=ops)


# -- types ---------------------------------------------------------------------------------


def test_dtype_names_round_trip_and_reject_unknown():
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
                  torch.int32, torch.int8, torch.uint8, torch.bool):
        assert torch_dtype(dtype_name(dtype)) is dtype
    assert dtype_name(torch.bfloat16) == "bf16"
    with pytest.raises(ValueError, match="complex64"):
        dtype_name(torch.complex64)
    with pytest.raises(ValueError, match="'f8'"):
        torch_dtype("f8")


@pytest.mark.parametrize("make, message", [
    (lambda: NMSparse(n=3, m=2, density=0.5), "0 < n <= m"),
    (lambda: NMSparse(n=0, m=4, density=0.0), "n must be a positive int"),
    (lambda: NMSparse(n=2, m=4, density=0.75), "at most 0.5"),
    (lambda: Unstructured(density=1.5), r"\[0, 1\]"),
    (lambda: Unstructured(density=float("nan")), r"\[0, 1\]"),
    (lambda: BlockSparse(block=(0, 4), density=0.5), "block rows must be a positive int"),
    (lambda: BlockSparse(block=(4,), density=0.5), "pair"),
    (lambda: AttentionPatterns(patterns=()), "at least one"),
    (lambda: AttentionPatterns(patterns=(P.Dense(), "Dense()")), r"patterns\[1\]"),
    (lambda: T(2, -1), ">= 0"),
    (lambda: T(2, "64"), "int literal"),
    (lambda: T("s0]"), "size expression"),
    (lambda: T(" s0"), "size expression"),
    (lambda: T("Max(1, s0"), "unbalanced"),
    (lambda: T(2, dtype="float32"), "unknown IR dtype"),
    (lambda: V("bad name", 2), "value name"),
    (lambda: Linear(result=V("y", 2), x="x", weight=V("w", 2, 2)), "Linear.x must be a Value"),
    (lambda: Opaque(results=(), inputs=(), fx_nodes="gelu"), "must be a tuple"),
    (lambda: Input(result=V("x", 2), index=-1), "index must be >= 0"),
    (lambda: Graph(name="2g", ops=()), "graph name"),
])
def test_constructors_reject_bad_arguments(make, message):
    with pytest.raises((TypeError, ValueError), match=message):
        make()


def test_ops_store_sequences_as_tuples_and_are_hashable():
    region = Opaque(results=[V("a", 2)], inputs=[], fx_nodes=["gelu"])
    assert region.results == (V("a", 2),) and region.fx_nodes == ("gelu",)
    assert len({attention_block_graph(), attention_block_graph()}) == 1


# -- graph helpers -------------------------------------------------------------------------


def test_graph_helpers():
    g = attention_block_graph()
    values = g.values()
    assert list(values)[:3] == ["x", "mask", "w_qkv"] and values["q"].type == T(2, 4, 32, 8)
    assert [type(op).__name__ for op in g.users(values["o"])] == ["Opaque", "Output"]
    assert g.users("z") == (g.output,)
    assert g.producer("k") is g.ops[7] and g.producer("nope") is None
    assert [op.result.name for op in g.ops_of(Linear)] == ["qkv", "y", "z"]
    assert [op.index for op in g.inputs] == [0, 1] and len(g.params) == 4


def test_replace_ops_records_provenance_outside_equality():
    g = attention_block_graph()
    same = g.replace_ops(g.ops, provenance="noop_pass (took 0 ms)")
    assert same == g and hash(same) == hash(g) and same.provenance == "noop_pass (took 0 ms)"
    fewer = g.replace_ops(g.ops[:-1] + (Output(values=(g.values()["z"],)),), provenance="drop o")
    assert fewer != g


# -- printer <-> parser --------------------------------------------------------------------


@pytest.mark.parametrize("build", [attention_block_graph, symbolic_graph])
def test_print_parse_round_trip(build):
    g = build()
    verify(g)
    text = print_graph(g)
    back = parse_graph(text)
    assert back == g
    assert print_graph(back) == text  # the text is a fixed point
    assert str(g) == text


def test_attention_tiles_print_and_are_checked():
    text = print_graph(symbolic_graph())
    assert "tiles = [64, 32]" in text
    assert "tiles" not in print_graph(attention_block_graph())  # the kernels' default: not printed
    o = next(op for op in symbolic_graph().ops if isinstance(op, Attention))
    for bad in [(64,), (0, 32), (64.0, 32), [64, 32], (True, 32)]:
        with pytest.raises(TypeError, match="tiles"):
            Attention(result=o.result, q=o.q, k=o.k, v=o.v, scale=0.1, num_heads=8, num_kv_heads=1,
                      scores=o.scores, tiles=bad)


def test_attention_mask_rule_prints_parses_and_is_checked():
    g = symbolic_graph()
    o = next(op for op in g.ops if isinstance(op, Attention))
    ruled = g.replace_ops([dataclasses.replace(op, mask_rule="causal:3") if op is o else op for op in g.ops])
    text = print_graph(ruled)
    assert 'mask_rule = "causal:3"' in text and "mask_rule" not in print_graph(g)
    assert parse_graph(text) == ruled
    for bad, error in [("causal", ValueError), ("any", ValueError), (3, TypeError)]:
        with pytest.raises(error, match="mask rule"):
            dataclasses.replace(o, mask_rule=bad)


def test_fixture_text_parses_to_hand_built_graph():
    g = parse_graph((FIXTURES / "attention_block.ir").read_text())
    assert g == attention_block_graph()
    assert g.provenance == "hand-written fixture"
    verify(g)


def test_printed_text_reads_as_documented():
    text = print_graph(attention_block_graph())
    assert text.startswith("# provenance: built in test_ir\ngraph block0 {\n")
    assert '  %w_qkv: f32[64, 32]<nm 2:4 axis=-1 density=0.5> = param "blocks.0.attn.qkv.weight"\n' in text
    assert '  %qkv: f32[2, 32, 64] = linear %x, %w_qkv, %b_qkv {module = "blocks.0.attn.qkv"}\n' in text
    assert "  %z: f32[2, 32, 16] = linear %y, %w_ff, none\n" in text
    assert ("scores = f32[2, 4, 32, 32]<patterns [Window(left=4, right=0), Columns([(0, 2)]) | "
            "Window(left=8, right=0), BlockSparse(layout=[\"10\", \"11\"], block=(16, 16)), "
            "Skip(fill='zero')]>") in text
    assert text.endswith("  return %z, %o\n}\n")


def test_defaults_may_be_left_out_of_hand_written_text():
    g = parse_graph("""
        graph g {
          %q: f16[1, 2, 8, 4] = input 0
          %o: f16[1, 2, 8, 4] = attention %q, %q, %q, none {scale = 0.5, heads = 2, scores = f32[1, 2, 8, 8]}
          return %o
        }""")
    attn = g.ops[1]
    assert (attn.causal, attn.num_kv_heads, attn.module_path, attn.mask) == (False, 2, "", None)
    assert attn.scores == T(1, 2, 8, 8)
    verify(g)


@pytest.mark.parametrize("pattern", [
    P.Dense(), P.Skip("mean"), P.Skip("zero"), P.Window(3, 1), P.MultiDiagonal([-8, 0, 8], 1),
    P.Columns([(0, 3), 7]), P.AShape(2, 5), P.VerticalSlash([0], [0, -4]),
    P.VerticalSlash([], [2]), P.BlockSparse([[1, 0, 1], [0, 1, 1]], (8, 4)),
    P.Window(2, 0) | P.Columns([(0, 1)]) | P.BlockSparse([[0, 1], [1, 0]], 8),
])
def test_every_pattern_family_round_trips_with_the_same_mask(pattern):
    back = parse_pattern(format_pattern(pattern))
    assert back == pattern
    # Equality of values is what the IR relies on; the masks confirm it means the same pairs.
    assert torch.equal(back.mask(16, 12), pattern.mask(16, 12))


def test_head_pattern_runs_are_written_with_a_count():
    union = P.Window(1, 0) | P.Columns([0])
    heads = (P.Dense(),) * 3 + (union,) * 2 + (P.Skip(),)
    text = format_head_patterns(heads)
    assert text == ("[Dense() * 3, (Columns([(0, 1)]) | Window(left=1, right=0)) * 2, "
                    "Skip(fill='mean')]")
    assert parse_head_patterns(text) == heads


@pytest.mark.parametrize("text, line, message", [
    ("graph g {\n  %x: f32[2] = input 0\n  return %y\n}", 3, "%y is used before it is defined"),
    ("graph g {\n  %x: f32[2] = input 0\n  %x: f32[2] = input 1\n  return %x\n}", 3, "defined twice"),
    ("graph g {\n  %x: f33[2] = input 0\n}", 2, "unknown dtype 'f33'"),
    ("graph g {\n  %x: f32[2] = inptu 0\n}", 2, "unknown op 'inptu'"),
    ("graph g {\n  %x: f32[2]<nm 2:4 density=0.9> = input 0\n}", 2, "at most 0.5"),
    ("graph g {\n  %x: f32[2]<nm 2:4 dens=0.5> = input 0\n}", 2, "unknown encoding field 'dens'"),
    ("graph g {\n  %x: f32[2]<sparse> = input 0\n}", 2, "unknown sparsity encoding 'sparse'"),
    ("graph g {\n  %x: f32[2]<patterns [Windw(1, 2)]> = input 0\n}", 2, "unknown pattern 'Windw'"),
    ("graph g {\n  %x: f32[2]<patterns [Window(left=-1, right=0)]> = input 0\n}", 2, "left must be >= 0"),
    ("graph g {\n  %x: f32[2]<patterns [Dense() * 0]> = input 0\n}", 2, "positive int"),
    ("graph g {\n  %x: f32[2, ] = input 0\n}", 2, "empty dimension"),
    ("graph g {\n  %x: f32[2] = input 0\n  %y: f32[2] = linear %x, %x\n}", 3, "expected ','"),
    ("graph g {\n  %q: f32[1, 1, 2, 2] = input 0\n"
     "  %o: f32[1, 1, 2, 2] = attention %q, %q, %q, none {heads = 1, scores = f32[1, 1, 2, 2]}\n}",
     3, "missing attribute(s) scale"),
    ("graph g {\n  %x: f32[2] = input 0\n  %y: f32[2] = opaque %x {fx = [\"a\"], color = 1}\n}", 3,
     "unknown attribute 'color'"),
    ("graph g {\n  %x: f32[2] = input 0 extra\n}", 2, "unexpected 'extra'"),
    ("graph g {\n  %x: f32[2] = input 0\n", 2, "not closed"),
    ("graph g {\n  return\n}\nreturn", 4, "after the end of the graph"),
    ("  \n%x: f32[2] = input 0\n", 2, "expected 'graph NAME {'"),
])
def test_parse_errors_name_line_and_problem(text, line, message):
    with pytest.raises(IRParseError) as info:
        parse_graph(text)
    assert info.value.line_no == line
    assert message in str(info.value) and f"line {line}," in str(info.value)


# -- verifier ------------------------------------------------------------------------------


def _with_op(g: Graph, position: int, **changes) -> Graph:
    ops = list(g.ops)
    ops[position] = dataclasses.replace(ops[position], **changes)
    return g.replace_ops(ops)


def _swap(g: Graph, a: int, b: int) -> Graph:
    ops = list(g.ops)
    ops[a], ops[b] = ops[b], ops[a]
    return g.replace_ops(ops)


def _scores(*shape, patterns=HEAD_PATTERNS) -> TensorType:
    return T(*shape, sparsity=AttentionPatterns(patterns=patterns))


def _mixed_dtype_linear(g: Graph) -> Graph:
    w = V("w_ff", 16, 32, dtype="bf16", sparsity=Unstructured(density=0.1))
    return _with_op(_with_op(g, 5, result=w), 11, weight=w)


# Positions in attention_block_graph(): 0-1 inputs, 2-5 params, 6 linear qkv, 7 opaque split,
# 8 attention, 9 opaque merge, 10-11 linears, 12 output.
ATTN = 8
_BAD_BLOCK_HEAD = P.Window(1, 0) | P.BlockSparse([[1, 1, 1]], 16)

# name -> (break the reference graph g, whose values are vs; text the error must contain)
VERIFIER_CASES = {
    "use before def": (lambda g, vs: _swap(g, 6, 7),
                       "op 6 (opaque %q): operand %qkv is used before it is defined"),
    "defined twice": (lambda g, vs: _with_op(g, 1, result=vs["x"]), "%x is defined twice"),
    "operand type differs": (lambda g, vs: _with_op(g, 12, values=(V("z", 2, 32, 17),)),
                             "operand %z has type"),
    "no output": (lambda g, vs: g.replace_ops(g.ops[:-1]), "0 output ops"),
    "output not last": (lambda g, vs: _swap(g, 11, 12), "not the last op"),
    "param after compute": (lambda g, vs: _swap(g, 5, 6),
                            "op 6 (param %w_ff): params and inputs must come before"),
    "duplicate input index": (lambda g, vs: _with_op(g, 1, index=0), "input index 0"),
    "fx node in two regions": (lambda g, vs: _with_op(g, 9, fx_nodes=("transpose", "split")),
                               "fx node 'split' is also in op 7"),
    "empty opaque region": (lambda g, vs: _with_op(g, 9, fx_nodes=()), "at least one fx node"),
    "weight not a param": (lambda g, vs: _with_op(g, 11, weight=vs["o2"]),
                           "op 11 (linear %z): weight %o2 is not a param's value"),
    "linear in features": (lambda g, vs: _with_op(g, 11, x=vs["qkv"]),
                           "x has 64 input features but weight[16, 32] takes 32"),
    "linear result shape": (lambda g, vs: _with_op(g, 11, result=V("z", 2, 31, 16)),
                            "result[2, 31, 16] should be [2, 32, 16]"),
    "linear bias shape": (lambda g, vs: _with_op(g, 6, bias=vs["w_ff"]), "bias[16, 32] should be [64]"),
    "linear mixed dtypes": (lambda g, vs: _mixed_dtype_linear(g), "mixed dtypes ['bf16', 'f32']"),
    "attention rank": (lambda g, vs: _with_op(g, ATTN, q=vs["qkv"]), "must all be rank 4"),
    "heads not a multiple": (lambda g, vs: _with_op(g, ATTN, num_kv_heads=3),
                             "num_heads=4 must be a positive multiple of num_kv_heads=3"),
    "num_heads vs q": (lambda g, vs: _with_op(g, ATTN, num_heads=8,
                                              scores=_scores(2, 4, 32, 32, patterns=HEAD_PATTERNS * 2)),
                       "num_heads=8 but q has 4 heads"),
    "num_kv_heads vs k": (lambda g, vs: _with_op(g, ATTN, num_kv_heads=4), "num_kv_heads=4 but k has 2 heads"),
    "head dim": (lambda g, vs: _with_op(g, ATTN, k=V("k", 2, 2, 32, 16)),
                 "q head dim 8 differs from k head dim 16"),
    "attention result": (lambda g, vs: _with_op(g, ATTN, result=V("o", 2, 4, 32, 9)),
                         "result[2, 4, 32, 9] should be [2, 4, 32, 8]"),
    "scores shape": (lambda g, vs: _with_op(g, ATTN, scores=_scores(2, 4, 32, 16)),
                     "scores[2, 4, 32, 16] should be [2, 4, 32, 32]"),
    "pattern count": (lambda g, vs: _with_op(g, ATTN, scores=_scores(2, 4, 32, 32, patterns=HEAD_PATTERNS[:3])),
                      "3 head patterns for num_heads=4"),
    "block layout": (lambda g, vs: _with_op(g, ATTN, scores=_scores(
                         2, 4, 32, 32, patterns=HEAD_PATTERNS[:3] + (_BAD_BLOCK_HEAD,))),
                     "head 3: BlockSparse layout has shape (1, 3)"),
    "mask broadcast": (lambda g, vs: _with_op(g, ATTN, mask=V("mask", 1, 1, 32, 31, dtype="bool")),
                       "mask[1, 1, 32, 31] does not broadcast"),
    "mask dtype": (lambda g, vs: _with_op(g, ATTN, mask=V("mask", 1, 1, 32, 32, dtype="i64")),
                   "mask %mask has dtype i64"),
    "scale": (lambda g, vs: _with_op(g, ATTN, scale=-0.5), "scale=-0.5 must be a positive finite float"),
    "patterns on a value": (lambda g, vs: _with_op(g, 9, results=(
                                V("o2", 2, 32, 32, sparsity=AttentionPatterns(patterns=(P.Dense(),))),)),
                            "%o2 has attention patterns"),
    "weight encoding off a param": (lambda g, vs: _with_op(g, 0, result=V(
                                        "x", 2, 32, 32, sparsity=Unstructured(density=0.5))),
                                    "op 0 (input %x): %x has a Unstructured encoding"),
    "weight encoding on scores": (lambda g, vs: _with_op(g, ATTN, scores=T(
                                      2, 4, 32, 32, sparsity=Unstructured(density=0.5))),
                                  "scores has a Unstructured encoding"),
    "nm axis": (lambda g, vs: _with_op(g, 2, result=V(
                    "w_qkv", 64, 32, sparsity=NMSparse(n=2, m=4, axis=2, density=0.5))),
                "N:M axis 2 is out of range"),
    "nm groups": (lambda g, vs: _with_op(g, 2, result=V(
                      "w_qkv", 64, 30, sparsity=NMSparse(n=1, m=4, axis=1, density=0.25))),
                  "N:M groups of 4 do not tile dim 1 of size 30"),
    "block rank": (lambda g, vs: _with_op(g, 3, result=V(
                       "b_qkv", 64, sparsity=BlockSparse(block=(8, 8), density=0.5))),
                   "block sparsity needs a rank-2 tensor"),
}


@pytest.mark.parametrize("case", sorted(VERIFIER_CASES))
def test_verifier_names_each_problem(case):
    break_graph, message = VERIFIER_CASES[case]
    g = attention_block_graph()
    with pytest.raises(IRVerificationError) as info:
        verify(break_graph(g, g.values()))
    assert message in str(info.value), str(info.value)


def test_verifier_accepts_the_reference_graphs():
    verify(attention_block_graph())
    verify(symbolic_graph())  # symbolic dims compare as possibly equal


def test_a_masked_layers_layout_may_cover_a_prefix_of_the_keys():
    """Under a mask each call's rows may keep fewer keys: a layout with fewer key blocks (the
    option attention_patterns' for padded keys) is valid there, one with fewer query blocks is not."""
    g = attention_block_graph()
    mask = V("mask", 1, 1, 32, 32, dtype="bool")
    g = g.replace_ops([*g.ops[:ATTN], dataclasses.replace(g.ops[ATTN], mask=mask), *g.ops[ATTN + 1:]])
    narrow = HEAD_PATTERNS[:3] + (P.BlockSparse([[1], [1]], 16),)
    short = HEAD_PATTERNS[:3] + (P.BlockSparse([[1, 1]], 16),)
    problems = [
        _block_problems(_with_op(g, ATTN, scores=_scores(2, 4, 32, 32, patterns=patterns)))
        for patterns in (narrow, short)]
    assert problems[0] == [] and "head 3: BlockSparse layout has shape (1, 2)" in " ".join(problems[1])


def _block_problems(g) -> list[str]:
    try:
        verify(g)
    except IRVerificationError as e:
        return [p for p in e.problems if "BlockSparse" in p]
    return []


def test_verifier_lists_every_problem_at_once():
    g = _with_op(_with_op(attention_block_graph(), ATTN, scale=float("inf")), 1, index=0)
    with pytest.raises(IRVerificationError) as info:
        verify(g)
    assert len(info.value.problems) == 2 and "2 problem(s)" in str(info.value)


# -- hypothesis: random types and encodings round-trip ---------------------------------------

_symbols = st.integers(0, 99).map(lambda i: f"s{i}")
dims = st.one_of(
    st.integers(0, 1 << 20), _symbols,
    st.tuples(st.integers(2, 9), _symbols).map(lambda t: f"{t[0]}*{t[1]}"),
    st.tuples(_symbols, st.integers(1, 9)).map(lambda t: f"{t[0]} + {t[1]}"),
    st.tuples(st.sampled_from(["Max", "FloorDiv", "Min"]), _symbols, st.integers(1, 64))
      .map(lambda t: f"{t[0]}({t[1]}, {t[2]})"),
)
densities = st.floats(0.0, 1.0, allow_nan=False)
_lengths = st.integers(1, 64)
_ranges = st.lists(st.one_of(st.integers(0, 200), st.tuples(st.integers(0, 200), _lengths)
                             .map(lambda t: (t[0], t[0] + t[1]))), min_size=1, max_size=4)
_layouts = st.integers(1, 4).flatmap(lambda cols: st.lists(
    st.lists(st.booleans(), min_size=cols, max_size=cols), min_size=1, max_size=4))
mask_patterns = st.one_of(
    st.just(P.Dense()),
    st.builds(P.Window, st.integers(0, 512), st.integers(0, 512)),
    st.builds(P.MultiDiagonal, st.lists(st.integers(-512, 512), min_size=1, max_size=4), st.integers(0, 8)),
    st.builds(P.Columns, _ranges),
    st.builds(P.AShape, st.integers(0, 64), st.integers(0, 512)),
    st.builds(P.VerticalSlash, _ranges, st.lists(st.integers(-64, 64), max_size=3)),
    st.builds(P.BlockSparse, _layouts, st.tuples(st.integers(1, 128), st.integers(1, 128))),
)
unions = st.lists(mask_patterns, min_size=2, max_size=3, unique=True).map(lambda ps: P.Union(ps))
head_patterns = st.one_of(mask_patterns, unions, st.builds(P.Skip, st.sampled_from(["mean", "zero"])))


@st.composite
def nm_sparse(draw):
    m = draw(st.integers(1, 16))
    n = draw(st.integers(1, m))
    return NMSparse(n=n, m=m, axis=draw(st.integers(-3, 2)), density=draw(st.floats(0.0, n / m)))


encodings = st.one_of(
    st.just(DENSE), nm_sparse(), st.builds(Unstructured, density=densities),
    st.builds(BlockSparse, block=st.tuples(st.integers(1, 256), st.integers(1, 256)), density=densities),
    st.lists(head_patterns, min_size=1, max_size=8).map(lambda ps: AttentionPatterns(patterns=tuple(ps))),
)
types = st.builds(TensorType, shape=st.lists(dims, max_size=5).map(tuple),
                  dtype=st.sampled_from(["f64", "f32", "f16", "bf16", "i64", "i32", "i8", "u8", "bool"]),
                  sparsity=encodings)
names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.]{0,8}", fullmatch=True).filter(
    lambda n: n not in {"p", "lin", "att"} and not n.startswith("r"))  # names the test defines

_HYPOTHESIS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_HYPOTHESIS
@given(types)
def test_random_types_round_trip(t):
    assert parse_type(format_type(t)) == t


@_HYPOTHESIS
@given(st.lists(types, min_size=1, max_size=3), names, st.text(max_size=12),
       st.lists(st.text(max_size=8), min_size=1, max_size=3), st.floats(allow_nan=False), st.booleans(), types)
def test_random_graphs_round_trip(result_types, name, module, fx_nodes, scale, causal, scores):
    """Random types, names, strings and floats inside every op kind survive print -> parse."""
    x = Value(name=name, type=result_types[0])
    region = Opaque(results=tuple(Value(name=f"r{i}", type=t) for i, t in enumerate(result_types)),
                    inputs=(x,), fx_nodes=tuple(fx_nodes))
    r0 = region.results[0]
    ops = (Input(result=x, index=3), Param(result=Value(name="p", type=scores), target=module), region,
           Linear(result=Value(name="lin", type=scores), x=r0, weight=x, bias=None, module_path=module),
           Attention(result=Value(name="att", type=result_types[-1]), q=r0, k=x, v=x, mask=None,
                     scale=scale, causal=causal, num_heads=3, num_kv_heads=1, scores=scores,
                     module_path=module),
           Output(values=(r0, x)))
    g = Graph(name="g", ops=ops)
    assert parse_graph(print_graph(g)) == g
