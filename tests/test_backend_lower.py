"""Lowering (ATen FX + matches -> IR), the apply_patterns pass (as before/after IR text) and the
rewrite (IR -> FX with custom-op calls)."""
from __future__ import annotations

import logging
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsec import patterns as P
from sparsec.config import SparsecUserError, parse_options
from sparsec.ir.ops import Attention, Input, Linear, Opaque, Param
from sparsec.ir.parser import parse_graph
from sparsec.ir.verifier import verify
from sparsec.passes.apply_patterns import apply_patterns
from sparsec.passes.lower import lower
from sparsec.passes.match_attention import match_attention
from sparsec.passes.match_linear import match_linear
from sparsec.passes.pipeline import default_stages, run_pipeline
from sparsec.passes.rewrite_fx import rewrite_fx
from tests.aten_capture import capture_aten

BEFORE = """
graph g {
  %x: f32[2, 4, 8, 16] = input 0
  %k: f32[2, 2, 8, 16] = input 1
  %v: f32[2, 2, 8, 16] = input 2
  %m: bool[8, 8] = input 3
  %o: f32[2, 4, 8, 16] = attention %x, %k, %v, none {scale = 0.25, causal = true, heads = 4, kv_heads = 2, scores = f32[2, 4, 8, 8], module = "blocks.0.attn"}
  %o2: f32[2, 4, 8, 16] = attention %x, %k, %v, %m {scale = 0.25, causal = false, heads = 4, kv_heads = 2, scores = f32[2, 4, 8, 8], module = "blocks.1.attn"}
  %y: f32[2, 4, 8, 16] = opaque %o, %o2 {fx = ["add"]}
  return %y
}
"""

# both layers get the patterns: blocks.1.attn's mask is read at run time (sparsec/key_padding.py)
AFTER = BEFORE.replace(
    'scores = f32[2, 4, 8, 8], module = "blocks',
    'scores = f32[2, 4, 8, 8]<patterns [Window(left=2, right=0) * 2, Dense() * 2]>, module = "blocks')


def test_apply_patterns_before_after():
    config = parse_options({"attention_patterns": {"blocks.*.attn": [P.Window(2, 0)] * 2 + [P.Dense()] * 2}})
    result = apply_patterns(parse_graph(BEFORE), config)
    verify(result)
    assert result == parse_graph(AFTER)


def test_apply_patterns_rejects_a_wrong_head_count():
    config = parse_options({"attention_patterns": {"blocks.0.attn": [P.Dense()] * 3}})
    with pytest.raises(SparsecUserError, match="blocks.0.attn"):
        apply_patterns(parse_graph(BEFORE), config)


def test_apply_patterns_rejects_a_block_layout_that_does_not_fit():
    config = parse_options({"attention_patterns": {"blocks.0.attn": P.BlockSparse([[1, 1, 1]], 4)}})
    with pytest.raises(SparsecUserError, match="head 0"):
        apply_patterns(parse_graph(BEFORE), config)


def test_pipeline_records_every_stage_with_provenance():
    final, history = run_pipeline(parse_graph(BEFORE), default_stages(parse_options({})), verify=True)
    assert [name for name, _ in history] == ["lower", "apply_patterns", "analyze_weights", "choose_linear_kernels"]
    assert history[-1][1] is final and final.provenance.startswith("choose_linear_kernels (took ")


class TinyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16, bias=False)

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, 2, 8).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(o.transpose(1, 2).reshape(B, S, 16)).relu()


@pytest.fixture(scope="module")
def captured():
    torch.manual_seed(0)
    graphs, _ = capture_aten(TinyAttention().eval(), torch.randn(2, 5, 16))
    assert len(graphs) == 1
    return graphs[0]


def _lowered(captured):
    gm = captured.gm
    return lower(gm, match_attention(gm), match_linear(gm, captured.params), captured.params, name="tiny")


def test_lowering_finds_the_ops_and_round_trips_as_text(captured):
    ir = _lowered(captured)
    verify(ir)
    assert len(ir.ops_of(Attention)) == 1 and len(ir.ops_of(Linear)) == 2
    assert {op.target for op in ir.ops_of(Param)} == {"qkv.weight", "qkv.bias", "proj.weight"}
    assert len(ir.ops_of(Input)) == 1 and ir.ops_of(Opaque)
    attention = ir.ops_of(Attention)[0]
    assert (attention.causal, attention.num_heads) == (True, 2)
    assert attention.scale == pytest.approx(8 ** -0.5, rel=1e-12)
    assert attention.scores.shape == (2, 2, 5, 5)
    assert parse_graph(str(ir)) == ir


def test_lowering_drops_overlapping_matches(captured, caplog):
    gm = captured.gm
    matches = match_attention(gm)
    with caplog.at_level(logging.INFO, logger="sparsec.passes.lower"):
        ir = lower(gm, matches + matches, [], captured.params)
    assert len(ir.ops_of(Attention)) == 1
    assert "overlaps another match" in caplog.text


def test_rewrite_calls_the_custom_ops_and_computes_the_same(captured):
    ir = _lowered(captured)
    final, _ = run_pipeline(ir, default_stages(parse_options({})), verify=True)
    rewritten = rewrite_fx(captured.gm, final, rewrite_dense=True)
    targets = [n.target for n in rewritten.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.sparsec.attention.default) == 1
    assert targets.count(torch.ops.sparsec.linear.default) == 2
    assert not any("scaled_dot_product" in str(t) or t in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default)
                   for t in targets if t is not operator.getitem)
    inputs = _real_inputs(captured)
    expected = captured.gm(*inputs)
    torch.testing.assert_close(rewritten(*inputs), expected, atol=1e-5, rtol=1e-5)


def _real_inputs(captured):
    """Fresh random tensors shaped like the placeholders (parameters included)."""
    return [torch.randn(tuple(v.shape)) for v in captured.example_inputs]
