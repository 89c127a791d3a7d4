"""The backend's modes: Inductor as the inner compiler, dynamic shapes, grad mode, the fallback,
and attention_patterns changing a layer's output exactly as the float64 masked reference says."""
from __future__ import annotations

import functools
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsec
import sparsec.backend
from sparsec import patterns as P
from sparsec.backend import sparsec_backend
from sparsec.dump import recording
from sparsec.ir.ops import Attention, Linear
from sparsec.ir.types import AttentionPatterns
from tests.reference import reference_attention, tolerance


class OneLayer(nn.Module):
    """x -> qkv -> causal SDPA (4 heads) -> proj: one attention, two linears."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def split(self, x):
        B, S, D = x.shape
        return self.qkv(x).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.split(x)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(o.transpose(1, 2).reshape(B, S, D))


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = OneLayer()

    def forward(self, x):
        return self.attn(x)


def compiled(model, **options):
    options = {"inner": "eager", "fallback": "raise", "verify": True, "rewrite_dense": True, **options}
    return torch.compile(model, backend=functools.partial(sparsec_backend, options=options))


def test_inductor_inner_matches_eager():
    torch.manual_seed(0)
    model, x = Wrapper().eval(), torch.randn(2, 8, 32)
    with torch.no_grad(), recording() as records:
        got = compiled(model, inner="inductor")(x)
    torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-5)
    assert len(records[0].final_ir.ops_of(Attention)) == 1
    assert "torch.ops.sparsec.attention" in records[0].rewritten_code


def test_a_second_input_shape_compiles_dynamically():
    torch.manual_seed(1)
    model = Wrapper().eval()
    run = compiled(model)
    with torch.no_grad(), recording() as records:
        for seq in (8, 11, 13):
            x = torch.randn(2, seq, 32)
            torch.testing.assert_close(run(x), model(x), atol=1e-5, rtol=1e-5)
    # the second shape recompiles with a symbolic length, the third reuses it
    assert len(records) == 2
    assert any(isinstance(d, str) for d in records[1].final_ir.ops_of(Attention)[0].scores.shape)


def test_grad_mode_gives_eager_outputs_and_gradients():
    torch.manual_seed(2)
    model = Wrapper()
    x = torch.randn(2, 8, 32, requires_grad=True)
    with recording() as records:
        out = compiled(model)(x)
    grad_out = torch.randn_like(out)
    params = [x, *model.parameters()]
    grads = torch.autograd.grad(out, params, grad_out)
    expected = model(x)
    expected_grads = torch.autograd.grad(expected, params, grad_out)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
    assert len(records[0].final_ir.ops_of(Linear)) == 2  # the sparsec path ran, not a fallback


def test_an_internal_failure_falls_back_with_a_log_line(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(sparsec.backend, "sparsify_aten_graph", broken)
    torch.manual_seed(3)
    model, x = Wrapper().eval(), torch.randn(2, 8, 32)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="sparsec"), recording() as records:
        got = compiled(model, fallback="inductor")(x)
    torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-5)
    assert "planted failure" in caplog.text and records[0].name in caplog.text
    assert records[0].fallback_reason == "RuntimeError: planted failure"


def test_fallback_raise_reraises(monkeypatch):
    monkeypatch.setattr(sparsec.backend, "sparsify_aten_graph",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("planted failure")))
    with pytest.raises(Exception, match="planted failure"), torch.no_grad():
        compiled(Wrapper().eval(), fallback="raise")(torch.randn(2, 8, 32))


def _reference_one_layer(layer: OneLayer, x, head_patterns):
    """float64: the layer's linears by hand, attention from explicit pattern masks."""
    w, b = layer.qkv.weight.double(), layer.qkv.bias.double()
    B, S, D = x.shape
    qkv = (x.double() @ w.T + b).view(B, S, 3, layer.heads, D // layer.heads).permute(2, 0, 3, 1, 4)
    o = reference_attention(qkv[0], qkv[1], qkv[2], head_patterns, causal=True, scale=(D // layer.heads) ** -0.5)
    return o.transpose(1, 2).reshape(B, S, D) @ layer.proj.weight.double().T + layer.proj.bias.double()


def test_attention_patterns_change_the_layer_exactly():
    torch.manual_seed(4)
    model, x = Wrapper().eval(), torch.randn(2, 16, 32)
    head_patterns = [P.Window(3, 0), P.Skip("mean"), P.Columns([0, (4, 6)]) | P.Window(1, 0), P.Dense()]
    with torch.no_grad(), recording() as records:
        got = compiled(model, attention_patterns={"attn": head_patterns})(x)
        expected = _reference_one_layer(model.attn, x, head_patterns)
        dense = model(x)
    scores = records[0].final_ir.ops_of(Attention)[0].scores
    assert scores.sparsity == AttentionPatterns(patterns=tuple(head_patterns))
    atol, rtol = tolerance(torch.float32)
    torch.testing.assert_close(got.double(), expected, atol=10 * atol, rtol=10 * rtol)
    assert (got - dense).abs().max() > 1e-2  # the patterns did change the output


def test_attention_patterns_keys_that_match_no_layer_are_named(caplog):
    """A key that matches no attention layer (a typo) is said: a warning where no key matches any of
    the graph's layers (they stay dense), a log line where others match."""
    x = torch.randn(2, 8, 32)
    torch._dynamo.reset()  # two more compiles of Wrapper.forward: not against the others' recompile limit
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="sparsec"):
        compiled(Wrapper().eval(), attention_patterns={"atn": P.Window(2, 0)})(x)
        compiled(Wrapper().eval(), attention_patterns={"at*": P.Window(2, 0), "blocks.*": P.Dense()})(x)
    torch._dynamo.reset()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["no attention_patterns key ('atn') matches an attention layer of this graph ('attn'): they "
                        "stay dense"]
    assert "attention_patterns key(s) 'blocks.*' match no attention layer of this graph ('attn')" in caplog.text


def test_a_wrong_number_of_head_patterns_is_a_user_error():
    with pytest.raises(Exception, match="3 patterns for 4 query heads"), torch.no_grad():
        compiled(Wrapper().eval(), fallback="inductor",
                 attention_patterns={"attn": [P.Dense()] * 3})(torch.randn(2, 8, 32))


class CausalSDPA(nn.Module):
    def forward(self, q, k, v):
        group = q.shape[1] // k.shape[1]  # GQA as transformers' repeat_kv (1: none)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class HoldsAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = CausalSDPA()

    def forward(self, q, k, v):
        return self.attn(q, k, v)


@pytest.mark.parametrize("shapes", [((2, 2, 40), (2, 2, 57), (4, 4, 33)), ((3, 3, 45), (6, 3, 17), (4, 2, 20))])
def test_dynamic_true_fixes_head_counts_and_head_size_with_guards(shapes):
    """torch.compile(dynamic=True) makes every size symbolic: the heads (k's and v's too, copied per
    query head or not), the head size (the default scale 1/sqrt(D)) and Sq = Sk for is_causal are
    fixed to their values by guards, so the patterns run, and a call with other head counts compiles
    again (it matched nothing before)."""
    torch._dynamo.reset()
    run = torch.compile(HoldsAttention(), backend="sparsec", dynamic=True,
                        options={"attention_patterns": {"attn": P.Window(4, 0)}, "inner": "eager", "fallback": "raise"})
    g = torch.Generator().manual_seed(5)
    with torch.no_grad(), recording() as records:
        for heads, kv_heads, seq in shapes:
            q = torch.randn(1, heads, seq, 16, generator=g)
            k, v = (torch.randn(1, kv_heads, seq, 16, generator=g) for _ in range(2))
            want = reference_attention(q, k, v, (P.Window(4, 0),) * heads, causal=True)
            torch.testing.assert_close(run(q, k, v).double(), want, atol=2e-5, rtol=2e-5)
    assert all(len(r.final_ir.ops_of(Attention)) == 1 for r in records)
    assert not any(r.unmatched_attention for r in records)


class CausalAttention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Chained(nn.Module):
    """Rewritten ops that read each other directly: causal SDPA into causal SDPA (as its q), then a
    linear layer on the 4-D output, then another linear on that."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.a0, self.a1 = CausalAttention(), CausalAttention()
        self.first, self.second = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, q, k, v):
        return self.second(self.first(self.a1(self.a0(q, k, v), k, v)))


def test_an_op_that_reads_another_rewritten_op_reads_its_new_value():
    """Each rewritten op reads the rewritten value of the op before it (a later op was built on the
    replaced node: the second attention read the first one's dense output, a linear layer on an
    attention output read the dense attention, and a pruned linear layer after another ran it dense)."""
    torch._dynamo.reset()
    torch.manual_seed(5)
    model = sparsec.prune(Chained(), "2:4")
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    w0, w1 = P.Window(3, 0), P.Window(5, 0)
    with torch.no_grad(), recording() as records:
        got = compiled(model, weight_sparsity="always", attention_patterns={"a0": w0, "a1": w1})(q, k, v)
    torch._dynamo.reset()
    a0 = reference_attention(q.double(), k.double(), v.double(), (w0,) * 2, causal=True)
    a1 = reference_attention(a0, k.double(), v.double(), (w1,) * 2, causal=True)
    first = a1 @ model.first.weight.double().T + model.first.bias.double()
    want = first @ model.second.weight.double().T + model.second.bias.double()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    code = records[0].rewritten_code
    assert code.count("torch.ops.sparsec.attention.default(") == 2
    assert code.count("torch.ops.sparsec.linear.default(") == 2
    assert "scaled_dot_product" not in code and "addmm" not in code  # nothing of the dense ops is left
