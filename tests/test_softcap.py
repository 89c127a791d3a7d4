"""Attention logit soft-capping (Gemma 2: each score s = scale * q.k becomes c * tanh(s / c) before
the mask and the softmax): sparsec.attention on every executor, the op and its gradients, the IR,
the matcher through the backend on transformers' Gemma 2, and the tuner's inputs, each against a
float64 reference built from explicit masks (tests/reference.py, which caps on its own)."""
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
from sparsec.dump import recording
from sparsec.ir.ops import Attention, Linear
from sparsec.ops import BAND_MIN_KEYS, patterns_to_json
from sparsec.passes.attention_stats import attention_stats

pytestmark = pytest.mark.usefixtures("one_thread")

CAP = 5.0


def _patterns(Sq: int, Sk: int, seed: int) -> list[P.Pattern]:
    """One pattern of each kind the executors treat differently, for 8 heads."""
    g = torch.Generator().manual_seed(seed)
    layout = torch.rand(math.ceil(Sq / 16), math.ceil(Sk / 16), generator=g) < 0.5
    return [P.Dense(), P.Window(9, 2), P.AShape(4, 12), P.VerticalSlash([(0, 3), (20, 24)], [0, -7]),
            P.BlockSparse(layout, (16, 16)), P.MultiDiagonal([0, -16], 2), P.Skip("mean"),
            P.Window(3, 0) | P.BlockSparse(layout, (16, 16))]


def _qkv(B, Hq, Hkv, Sq, Sk, D, dtype=torch.float32, seed=0):
    """Scores of a few times the cap: capping changes which keys dominate."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g) * 3
    k = torch.randn(B, Hkv, Sk, D, generator=g) * 3
    v = torch.randn(B, Hkv, Sk, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _run(executor: str, q, k, v, patterns, causal: bool, softcap):
    if executor == "cpu torch kernels":  # no native kernel: the explicit path for capped heads
        return cpu_attention(q, k, v, tuple(patterns), causal=causal, scale=q.shape[-1] ** -0.5, native=False,
                             softcap=softcap)
    return sparsec.attention(q, k, v, patterns, causal=causal, backend=executor, softcap=softcap)


@pytest.mark.parametrize("executor", ["cpu", "cpu torch kernels", "masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 8, 4, 37, 53, 16), (1, 8, 2, 64, 64, 32), (1, 8, 8, 1, 40, 16)])
@pytest.mark.parametrize("causal", [False, True])
def test_every_cpu_executor_caps_the_scores(executor, dtype, shape, causal):
    B, Hq, Hkv, Sq, Sk, D = shape
    patterns = _patterns(Sq, Sk, seed=Sq + Sk)
    q, k, v = _qkv(*shape, dtype=dtype, seed=Sq * Sk)
    got = _run(executor, q, k, v, patterns, causal, CAP)
    want = reference_attention(q, k, v, patterns, causal=causal, softcap=CAP)
    atol, rtol = tolerance(dtype)
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)
    uncapped = reference_attention(q, k, v, patterns, causal=causal)
    assert (uncapped - want).abs().max() > 0.1  # the capping matters at these scores


@pytest.mark.triton
@pytest.mark.parametrize("causal", [False, True])
def test_triton_kernels_cap_the_scores(causal):
    q, k, v = _qkv(1, 8, 2, 40, 48, 16, seed=5)
    patterns = _patterns(40, 48, seed=1)
    got = sparsec.attention(q, k, v, patterns, causal=causal, backend="triton", softcap=CAP)
    torch.testing.assert_close(got.double(), reference_attention(q, k, v, patterns, causal=causal, softcap=CAP),
                               atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("bad, error", [(-1.0, ValueError), (math.inf, ValueError), (math.nan, ValueError),
                                        ("5", TypeError), (True, TypeError)])
def test_a_bad_softcap_is_named(bad, error):
    from sparsec.codegen.attention_cpu import cpu_attention

    q, k, v = _qkv(1, 2, 2, 8, 8, 16)
    with pytest.raises(error, match="softcap"):
        sparsec.attention(q, k, v, P.Window(2, 2), softcap=bad)
    with pytest.raises(error, match="cpu_attention: softcap"):  # the CPU executor checks it the same way
        cpu_attention(q, k, v, (P.Window(2, 2),) * 2, causal=False, scale=0.25, softcap=bad)


def test_no_cap_is_none_or_zero():
    q, k, v = _qkv(1, 2, 2, 24, 24, 16)
    plain = sparsec.attention(q, k, v, P.Window(4, 0))
    for off in (None, 0, 0.0):
        torch.testing.assert_close(sparsec.attention(q, k, v, P.Window(4, 0), softcap=off), plain, atol=0, rtol=0)


def _explicit(q, k, v, keep, bias, scale, softcap):
    """float64, differentiable: softmax(cap(scale q k^T) + bias) over `keep`, rows with no key 0."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = q @ k.transpose(-1, -2) * scale
    s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    if keep is not None:
        s = s.masked_fill(~keep, -math.inf)
    return torch.softmax(s, dim=-1).nan_to_num(0.0) @ v


@pytest.mark.parametrize("case", ["dense, no mask", "dense, bias", "window, padded keys", "window, causal"])
def test_the_op_and_its_gradients(case, grad_blocks):
    B, Hq, Hkv, S, D = 2, 4, 2, 30, 16
    q, k, v = (t.requires_grad_() for t in _qkv(B, Hq, Hkv, S, S, D, seed=11))
    scale, causal, mask, keep, bias, patterns = D ** -0.5, False, None, None, None, ""
    if case == "dense, bias":
        mask = torch.randn(B, 1, S, S, requires_grad=True)
        bias = mask
    if case.startswith("window"):
        patterns = patterns_to_json((P.Window(5, 1),) * Hq)
        keep = P.Window(5, 1).mask(S, S)
    if case == "window, padded keys":
        mask = (torch.arange(S)[None, None, None, :] < torch.tensor([S - 7, S])[:, None, None, None])
        keep = keep & mask
    if case == "window, causal":
        causal = True
        keep = keep & torch.ones(S, S, dtype=torch.bool).tril()
    out = torch.ops.sparsec.attention(q, k, v, mask, scale, causal, patterns, 0, 0, "", "", CAP)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    bias64 = None if bias is None else bias.detach().double().requires_grad_()
    want = _explicit(*leaves, keep, bias64, scale, CAP)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    want.backward(grad.double())
    for got, expected in zip((q, k, v), leaves):
        torch.testing.assert_close(got.grad.double(), expected.grad, atol=1e-4, rtol=1e-4)
    if bias is not None:
        torch.testing.assert_close(bias.grad.double(), bias64.grad, atol=1e-5, rtol=1e-5)


class CappedModel(torch.nn.Module):
    """Two layers of Gemma 2's eager attention, scores capped at 3: one causal, one under a padding bias."""

    def forward(self, q, k, v, padding):
        outs = []
        for bias in (torch.full((q.shape[2], q.shape[2]), -math.inf).triu(1), padding[:, None, None, :]):
            s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
            s = torch.tanh(s / 3.0) * 3.0 + bias
            outs.append(s.softmax(-1) @ v)
        return outs


def test_the_ir_carries_the_cap_and_the_backend_applies_patterns_under_it():
    q, k, v = _qkv(2, 2, 2, 40, 40, 16, seed=2)
    padding = torch.zeros(2, 40).masked_fill(torch.arange(40) >= 33, -math.inf)
    model = CappedModel().eval()
    report = sparsec.explain(model, q, k, v, padding, options={"inner": "eager"})
    (record,) = report.graphs
    ops = record.final_ir.ops_of(Attention)
    assert [op.softcap for op in ops] == [3.0, 3.0] and "softcap = 3.0" in print_graph(record.final_ir)
    assert parse_graph(print_graph(record.final_ir)) == record.final_ir
    options = {"inner": "eager", "attention_patterns": {"*": P.Window(6, 0)}}
    got = torch.compile(model, backend="sparsec", options=options)(q, k, v, padding)
    keep = P.Window(6, 0).mask(40, 40)
    for out, mask in zip(got, (torch.ones(40, 40, dtype=torch.bool).tril(), padding[:, None, None, :] == 0)):
        want = _explicit(q.double(), k.double(), v.double(), keep & mask, None, 16 ** -0.5, 3.0)
        torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)


def test_an_ir_attention_refuses_a_bad_cap():
    (op,) = sparsec.explain(CappedModel().eval(), *_qkv(1, 2, 2, 8, 8, 16), torch.zeros(1, 8),
                            options={"inner": "eager"}).graphs[0].final_ir.ops_of(Attention)[:1]
    import dataclasses

    with pytest.raises(TypeError, match="softcap"):
        dataclasses.replace(op, softcap=-2.0)


def test_tuning_statistics_cap_the_scores():
    q, k, _ = _qkv(2, 4, 2, 48, 48, 16, seed=4)
    stats = attention_stats(q, k, causal=True, block=(16, 16), softcap=CAP)
    kk = k.double().repeat_interleave(2, dim=1)
    s = q.double() @ kk.transpose(-1, -2) / 4.0
    s = (CAP * torch.tanh(s / CAP)).masked_fill(torch.ones(48, 48, dtype=torch.bool).tril().logical_not(), -math.inf)
    probs = torch.softmax(s, dim=-1).mean(dim=0)
    torch.testing.assert_close(stats.column_mass, probs.sum(dim=1) / 48, atol=1e-6, rtol=1e-5)
    blocks = probs.reshape(4, 3, 16, 3, 16).sum(dim=(2, 4)) / 48
    torch.testing.assert_close(stats.block_mass, blocks, atol=1e-6, rtol=1e-5)


def _gemma2(seq: int):
    return transformers_model(
        "Gemma2Config", "Gemma2Model", "eager", seed=3, vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=48,
        max_position_embeddings=2 * seq, attn_logit_softcapping=CAP, final_logit_softcapping=None)


@pytest.mark.models
def test_gemma2_runs_its_capped_layers_sparse():
    """Gemma 2's eager attention is matched with its cap; with the rule "band" its sliding layer runs
    the band and its full layer the causal prefix, capped, equal to eager; without, the layers are
    left as the model wrote them (nothing to gain: SDPA cannot cap)."""
    seq = BAND_MIN_KEYS + 44
    model = _gemma2(seq)
    ids = torch.randint(0, 64, (2, seq))
    padding = (torch.arange(seq)[None] < torch.tensor([[seq - 30], [seq]])).long()
    for mask_bands in ("off", "on"):
        for inputs in ((ids,), (ids, padding)):
            got, ops, calls = run_compiled(model, inputs, {"inner": "eager", "mask_bands": mask_bands})
            torch.testing.assert_close(got, model(*inputs).last_hidden_state, atol=1e-5, rtol=1e-5)
            assert [op.softcap for op in ops] == [CAP, CAP]
            if mask_bands == "off":
                assert not calls
            else:
                assert {c.kwargs.get("softcap") for c in calls} == {CAP}
                assert any(P.Window(47, 0) in c[0] for c in calls) and any(P.Dense() in c[0] for c in calls)


@pytest.mark.models
def test_gemma2_is_tuned_on_capped_scores():
    seq = 96
    model = _gemma2(seq)
    recorded, _ = sparsec.model_tuning.record_attention(model, (torch.randint(0, 64, (1, seq)),))
    assert recorded and all(s.softcap == CAP for samples in recorded.values() for s in samples)


@pytest.mark.parametrize("mask_kind", ["none", "bool rows", "bias keys", "bias rows"])
def test_the_dense_path_caps_in_chunks_of_rows(mask_kind, monkeypatch):
    """ops.dense_attention with a cap: explicit scores, a few query rows at a time (the chunk made
    small here), under a bool mask or a bias of one row or one per query; causal with Sq != Sk."""
    from sparsec import attention_dispatch
    from sparsec.ops import dense_attention

    monkeypatch.setattr(attention_dispatch, "_EXPLICIT_CHUNK_ELEMENTS", 2 * 4 * 50 * 7)  # 7 rows a chunk
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 2, 30, 50, 16
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, seed=21)
    mask, keep, bias = None, None, None
    if mask_kind == "bool rows":
        mask = torch.rand(B, 1, Sq, Sk) < 0.7
        keep = mask
    elif mask_kind == "bias keys":
        mask = torch.randn(B, 1, 1, Sk)
        bias = mask.double()
    elif mask_kind == "bias rows":
        mask = torch.randn(1, Hq, Sq, Sk)
        bias = mask.double()
    causal = torch.ones(Sq, Sk, dtype=torch.bool).tril(Sk - Sq)
    got = dense_attention(q, k, v, mask, D ** -0.5, True, CAP)
    want = _explicit(q.double(), k.double(), v.double(), causal if keep is None else keep & causal, bias,
                     D ** -0.5, CAP)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_the_cost_model_prices_capped_heads_on_the_native_kernels():
    """torch's kernel cannot cap: the cpu executor's estimates for a capped layer are the native
    kernels' (Dense included), as _capped_heads runs them."""
    from sparsec.codegen.attention_cpu_native import native_kernel
    from sparsec.cost_models.attention_cost import AttentionShape, pattern_counts

    if native_kernel() is None:
        pytest.skip("the native kernels are not built here")
    shape = AttentionShape(batch=1, num_heads=8, num_kv_heads=8, q_len=2048, kv_len=2048, head_dim=64, value_dim=64,
                           dtype="f32", causal=True)
    patterns = (P.Dense(), P.Window(255, 0), P.AShape(64, 255))
    for softcap in (0.0, CAP):
        capped = AttentionShape(**{**{f: getattr(shape, f) for f in shape.__dataclass_fields__}, "softcap": softcap})
        counts = pattern_counts(patterns, capped, None, 64, executor="cpu")
        if softcap:
            assert all(counts[p].native for p in patterns)
        else:
            assert not counts[P.Dense()].native  # one SDPA call


@pytest.mark.models
@pytest.mark.parametrize("pruned", [False, True])
def test_gemma2_compiles_under_inductor_with_its_capped_layers_kept(pruned):
    """Gemma 2's capped layers left as the model wrote them (mask_bands off) under Inductor: a graph
    with nothing to accelerate is compiled as backend="inductor" compiles it, and one with sparse
    linear layers has its views retraced as reshapes (Inductor's strides for the rotated keys
    refused the captured view: "Cannot view a tensor ..."; found by fuzzing)."""
    seq = 47  # one kv head a query head: the rotated keys reach q @ k^T as views, no repeat_kv copy
    model = transformers_model(
        "Gemma2Config", "Gemma2Model", "eager", seed=3, vocab_size=64, hidden_size=64, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, head_dim=16, sliding_window=400,
        attn_logit_softcapping=CAP)
    if pruned:
        sparsec.prune(model, "2:4", filter=lambda name, module: "mlp" in name)
    ids = torch.randint(0, 64, (3, seq))
    options = {"fallback": "raise", "mask_bands": "off", "weight_sparsity": "always" if pruned else "off"}
    torch._dynamo.reset()
    with torch.no_grad(), recording() as records:
        got = torch.compile(model, backend="sparsec", options=options)(ids)
    torch.testing.assert_close(got.last_hidden_state, model(ids).last_hidden_state, atol=1e-5, rtol=1e-5)
    kernels = [op.kernel for r in records for op in r.final_ir.ops_of(Linear) if "mlp" in op.module_path]
    assert kernels and all((kernel != "dense") == pruned for kernel in kernels)
