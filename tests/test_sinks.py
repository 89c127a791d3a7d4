"""Attention sinks (GPT-OSS: a logit a head that joins each row's softmax with no value, so the
keys' weights sum to less than 1): sparsec.attention on every executor, the op and its gradients
(the sinks' included), the matcher on GPT-OSS's eager attention, the IR, transformers' GPT-OSS
through the backend and the tuner's inputs, each against a float64 reference built from explicit
masks (tests/reference.py appends the sink column on its own)."""
from __future__ import annotations

import math

import pytest
import torch

import sparsec
import sparsec.model_tuning
from hf_models import run_compiled, transformers_model
from reference import reference_attention, tolerance
from sparsec import patterns as P
from sparsec.codegen.attention_cpu import cpu_attention
from sparsec.ir import parse_graph, print_graph
from sparsec.ir.ops import Attention
from sparsec.ops import BAND_MIN_KEYS, patterns_to_json
from sparsec.passes.attention_stats import attention_stats

pytestmark = pytest.mark.usefixtures("one_thread")


def _patterns(Sq: int, Sk: int, seed: int) -> list[P.Pattern]:
    g = torch.Generator().manual_seed(seed)
    layout = torch.rand(math.ceil(Sq / 16), math.ceil(Sk / 16), generator=g) < 0.5
    return [P.Dense(), P.Window(9, 2), P.AShape(4, 12), P.VerticalSlash([(0, 3), (20, 24)], [0, -7]),
            P.BlockSparse(layout, (16, 16)), P.Columns([(30, 40)]), P.Skip("mean"),
            P.Window(3, 0) | P.BlockSparse(layout, (16, 16))]


def _inputs(B, Hq, Hkv, Sq, Sk, D, dtype=torch.float32, seed=0):
    """q, k, v with scores of a few units, and sinks of the same size (one head's -inf: no sink)."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, S, D, generator=g) * 1.5 for H, S in ((Hq, Sq), (Hkv, Sk)))
    v = torch.randn(B, Hkv, Sk, D, generator=g)
    sinks = torch.randn(Hq, generator=g) * 3
    sinks[1] = float("-inf")
    return q.to(dtype), k.to(dtype), v.to(dtype), sinks


@pytest.mark.parametrize("executor", ["cpu", "cpu torch kernels", "masked"])
@pytest.mark.parametrize("shape", [(2, 8, 4, 37, 53, 16), (1, 8, 8, 1, 40, 16)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_every_cpu_executor_weighs_the_sinks(executor, shape, causal, softcap):
    B, Hq, Hkv, Sq, Sk, D = shape
    patterns = _patterns(Sq, Sk, seed=Sq + Sk)
    q, k, v, sinks = _inputs(*shape, seed=Sq * Sk)
    if executor == "cpu torch kernels":  # no native kernel: explicit scores
        got = cpu_attention(q, k, v, tuple(patterns), causal=causal, scale=D ** -0.5, native=False, softcap=softcap,
                            sinks=sinks)
    else:
        got = sparsec.attention(q, k, v, patterns, causal=causal, backend=executor, softcap=softcap or None,
                                sinks=sinks)
    want = reference_attention(q, k, v, patterns, causal=causal, softcap=softcap, sinks=sinks)
    torch.testing.assert_close(got.double(), want, atol=3e-5, rtol=3e-5)
    assert (reference_attention(q, k, v, patterns, causal=causal, softcap=softcap) - want).abs().max() > 0.05


@pytest.mark.triton
def test_triton_kernels_weigh_the_sinks():
    q, k, v, sinks = _inputs(1, 8, 2, 40, 48, 16, seed=5)
    patterns = _patterns(40, 48, seed=1)
    for causal in (False, True):
        got = sparsec.attention(q, k, v, patterns, causal=causal, backend="triton", sinks=sinks)
        torch.testing.assert_close(got.double(), reference_attention(q, k, v, patterns, causal=causal, sinks=sinks),
                                   atol=2e-5, rtol=2e-5)


def test_bf16_inputs_with_sinks():
    q, k, v, sinks = _inputs(1, 8, 4, 64, 64, 32, dtype=torch.bfloat16, seed=9)
    patterns = _patterns(64, 64, seed=2)
    got = sparsec.attention(q, k, v, patterns, causal=True, sinks=sinks)
    atol, rtol = tolerance(torch.bfloat16)
    torch.testing.assert_close(got.double(), reference_attention(q, k, v, patterns, causal=True, sinks=sinks),
                               atol=atol, rtol=rtol)


@pytest.mark.parametrize("bad, error", [(torch.zeros(3), ValueError), (torch.zeros(2, 2), ValueError),
                                        (torch.zeros(4, dtype=torch.long), TypeError), ([0.0] * 4, TypeError),
                                        (torch.tensor([0.0, math.nan, 0.0, 0.0]), ValueError),
                                        (torch.tensor([0.0, math.inf, 0.0, 0.0]), ValueError)])
def test_bad_sinks_are_named(bad, error):
    q, k, v, _ = _inputs(1, 4, 2, 8, 8, 16)
    with pytest.raises(error, match="sinks"):
        sparsec.attention(q, k, v, P.Window(2, 2), sinks=bad)


def _explicit(q, k, v, keep, sinks, scale):
    """float64, differentiable: softmax over [scale q k^T (kept pairs), sink] without the sink's column."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~keep, -math.inf)
    s = torch.cat([s, sinks.view(1, -1, 1, 1).expand(*s.shape[:3], 1)], dim=-1)
    return torch.softmax(s, dim=-1)[..., :-1] @ v


@pytest.mark.parametrize("case", ["dense", "window, padded keys"])
def test_the_op_and_its_gradients(case, grad_blocks):
    B, Hq, Hkv, S, D = 2, 4, 2, 30, 16
    q, k, v, sinks = _inputs(B, Hq, Hkv, S, S, D, seed=11)
    sinks[1] = 0.5  # a finite gradient for every head
    q, k, v, sinks = (t.requires_grad_() for t in (q, k, v, sinks))
    mask, patterns, keep = None, "", torch.ones(S, S, dtype=torch.bool)
    if case != "dense":
        patterns = patterns_to_json((P.Window(5, 1),) * Hq)
        mask = torch.arange(S)[None, None, None, :] < torch.tensor([S - 7, S])[:, None, None, None]
        keep = P.Window(5, 1).mask(S, S) & mask
    out = torch.ops.sparsec.attention(q, k, v, mask, D ** -0.5, False, patterns, 0, 0, "", "", 0.0, None, sinks)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    want = _explicit(*leaves[:3], keep, leaves[3], D ** -0.5)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    want.backward(grad.double())
    for got, expected in zip((q, k, v, sinks), leaves):
        torch.testing.assert_close(got.grad.double(), expected.grad, atol=1e-4, rtol=1e-4)


class SinkAttention(torch.nn.Module):
    """GPT-OSS's eager attention: scores + mask, a sink column per head, less the row maxima, softmax,
    the sink's column dropped."""

    def __init__(self, heads: int):
        super().__init__()
        self.sinks = torch.nn.Parameter(torch.randn(heads) * 2)

    def forward(self, q, k, v, bias):
        s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias
        column = self.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], -1)
        logits = torch.cat([s, column], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        return torch.softmax(logits, dim=-1)[..., :-1] @ v


class SinkModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = SinkAttention(2)

    def forward(self, q, k, v, bias):
        return self.attn(q, k, v, bias)


def test_the_matcher_reads_the_sinks_and_the_backend_runs_patterns_with_them():
    q, k, v, _ = _inputs(2, 2, 2, 40, 40, 16, seed=2)
    bias = torch.zeros(2, 1, 1, 40).masked_fill(torch.arange(40) >= 33, -math.inf)
    model = SinkModel().eval()
    report = sparsec.explain(model, q, k, v, bias, options={"inner": "eager"})
    (record,) = report.graphs
    (op,) = record.final_ir.ops_of(Attention)
    assert op.sinks is not None and "sinks = %" in print_graph(record.final_ir)
    assert parse_graph(print_graph(record.final_ir)) == record.final_ir
    options = {"inner": "eager", "attention_patterns": {"*": P.Window(6, 0)}}
    with torch.no_grad():
        got = torch.compile(model, backend="sparsec", options=options)(q, k, v, bias)
    keep = P.Window(6, 0).mask(40, 40) & (bias == 0)
    want = _explicit(q.double(), k.double(), v.double(), keep, model.attn.sinks.detach().double(), 16 ** -0.5)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_a_dropped_column_that_is_no_sink_is_not_matched():
    class Sliced(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2), dim=-1)[..., :-1] @ v[:, :, :-1]

    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    (record,) = sparsec.explain(Sliced(), q, k, v, options={"inner": "eager"}).graphs
    assert not record.final_ir.ops_of(Attention)
    assert any("sink" in u.reason for u in record.unmatched_attention)


def test_tuning_statistics_weigh_the_sinks():
    q, k, _, sinks = _inputs(2, 4, 2, 48, 48, 16, seed=4)
    stats = attention_stats(q, k, causal=True, block=(16, 16), sinks=sinks)
    kk = k.double().repeat_interleave(2, dim=1)
    s = (q.double() @ kk.transpose(-1, -2) / 4.0).masked_fill(torch.ones(48, 48, dtype=torch.bool).tril().logical_not(),
                                                             -math.inf)
    s = torch.cat([s, sinks.double().view(1, 4, 1, 1).expand(2, 4, 48, 1)], dim=-1)
    probs = torch.softmax(s, dim=-1)[..., :-1].mean(dim=0)
    torch.testing.assert_close(stats.column_mass, probs.sum(dim=1) / 48, atol=1e-6, rtol=1e-5)


def _gpt_oss(seq: int):
    model = transformers_model(
        "GptOssConfig", "GptOssModel", "eager", seed=0, vocab_size=64, hidden_size=32, intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=48,
        max_position_embeddings=2 * seq, num_local_experts=2, num_experts_per_tok=1,
        layer_types=["sliding_attention", "full_attention"])
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.sinks.normal_(0, 2)
    return model


@pytest.mark.models
def test_gpt_oss_runs_its_layers_with_their_sinks():
    """GPT-OSS's eager attention is matched with its sinks; with the rule "band" its sliding layer
    runs the band and its full layer the causal prefix, weighing the sinks, equal to eager; without,
    the layers are left as the model wrote them (SDPA has no sinks)."""
    seq = BAND_MIN_KEYS + 40
    model = _gpt_oss(seq)
    ids = torch.randint(0, 64, (2, seq))
    padding = (torch.arange(seq)[None] < torch.tensor([[seq - 30], [seq]])).long()
    for mask_bands in ("off", "on"):
        for inputs in ((ids,), (ids, padding)):
            got, ops, calls = run_compiled(model, inputs, {"inner": "eager", "mask_bands": mask_bands}, use_cache=False)
            torch.testing.assert_close(got, model(*inputs, use_cache=False).last_hidden_state, atol=1e-5, rtol=1e-5)
            assert len(ops) == 2 and all(op.sinks is not None for op in ops)
            if mask_bands == "off":
                assert not calls
            else:
                assert calls and all(c.kwargs.get("sinks") is not None for c in calls)
                assert any(P.Window(47, 0) in c[0] for c in calls) and any(P.Dense() in c[0] for c in calls)


@pytest.mark.models
def test_gpt_oss_is_tuned_with_its_sinks():
    model = _gpt_oss(96)
    recorded, _ = sparsec.model_tuning.record_attention(model, (torch.randint(0, 64, (1, 96)),))
    sinks = {path: layer.self_attn.sinks for path, layer in
             ((f"layers.{i}.self_attn", layer) for i, layer in enumerate(model.layers))}
    assert recorded
    for path, samples in recorded.items():
        assert all(torch.equal(s.sinks, sinks[path].detach()) for s in samples)


def test_training_through_the_backend_reaches_the_sinks():
    """A compiled model with patterns: the op's backward gives q, k, v and the sinks parameter the
    float64 reference's gradients."""
    torch.manual_seed(0)
    model = SinkModel()
    q, k, v = (torch.randn(2, 2, 40, 16, requires_grad=True) for _ in range(3))
    bias = torch.zeros(2, 1, 1, 40).masked_fill(torch.arange(40) >= 33, -math.inf)
    torch._dynamo.reset()
    options = {"inner": "eager", "attention_patterns": {"*": P.Window(6, 0)}}
    out = torch.compile(model, backend="sparsec", options=options)(q, k, v, bias)
    got = torch.autograd.grad(out.square().sum(), [q, k, v, model.attn.sinks])
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, model.attn.sinks)]
    want = _explicit(*leaves[:3], P.Window(6, 0).mask(40, 40) & (bias == 0), leaves[3], 0.25)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    for g, w in zip(got, torch.autograd.grad(want.square().sum(), leaves)):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)
