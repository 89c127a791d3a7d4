"""The attention backward (sparsec.attention_grads) against float64 autograd of explicit-mask references:
random patterns and shapes in blocks of any number of query rows, gathered keys or all of them;
float-mask gradients summed to every mask shape; and the blocks it computes are bounded."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsec
import sparsec.attention_grads as attention_grads
from sparsec import patterns as P
from sparsec.ops import patterns_to_json
from reference import reference_attention
from strategies import PatternBounds, skips, unions

pytestmark = pytest.mark.usefixtures("one_thread")

BOUNDS = PatternBounds(width=6, offset=8, max_offsets=3, column=12, column_width=4, block=5)


def _leaves(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def _op_grads(q, k, v, mask, scale, causal, head_patterns, weights, softcap=0.0, sinks=None):
    """Gradients of sum(sparsec::attention(...) * weights) with respect to q, k, v (and the float mask, sinks)."""
    inputs = [q, k, v] + ([mask] if mask is not None and mask.is_floating_point() else []) + \
        ([sinks] if sinks is not None else [])
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    q_, k_, v_ = inputs[:3]
    mask_ = inputs[3] if len(inputs) > 3 and mask is not None and mask.is_floating_point() else mask
    sinks_ = inputs[-1] if sinks is not None else None
    text = patterns_to_json(head_patterns) if head_patterns else ""
    out = torch.ops.sparsec.attention(q_, k_, v_, mask_, scale, causal, text, 0, 0, "", "", softcap, None, sinks_)
    return torch.autograd.grad((out * weights).sum(), inputs)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_patterns_and_shapes_match_float64_autograd(data):
    """Any block height (ROWS_ELEMENTS) and gathering threshold (GATHER_SHARE) gives the reference's
    gradients: GQA, causal or not, Sq != Sk, Skip heads, unions with block layouts, a soft cap, sinks."""
    draw = data.draw
    Hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    Hq, B, D = Hkv * group, draw(st.integers(1, 2)), draw(st.sampled_from([4, 8]))
    Sq, Sk = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    causal, softcap = draw(st.booleans()), draw(st.sampled_from([0.0, 0.0, 4.0]))
    patterns = tuple(draw(st.one_of(unions(Sq, Sk, BOUNDS), skips)) for _ in range(Hq))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, s, D, generator=g) for h, s in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))
    sinks = torch.randn(Hq, generator=g) if draw(st.booleans()) else None
    weights = torch.randn(B, Hq, Sq, D, generator=g)
    rows = draw(st.sampled_from([1, 2, 5, Sq]))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention_grads, "ROWS_ELEMENTS", B * Hq * Sk * rows)
        patch.setattr(attention_grads, "GATHER_SHARE", draw(st.sampled_from([0.0, 0.5, 1.0])))
        got = _op_grads(q, k, v, None, 0.3, causal, patterns, weights, softcap, sinks)
    leaves = _leaves(q, k, v) + (_leaves(sinks) if sinks is not None else [])
    want = reference_attention(*leaves[:3], patterns, causal=causal, scale=0.3, softcap=softcap,
                               sinks=leaves[3] if sinks is not None else None)
    if want.requires_grad:  # (a Skip head's weights take no gradient: all Skip "zero", none at all)
        want = torch.autograd.grad((want * weights.double()).sum(), leaves, allow_unused=True, materialize_grads=True)
    else:
        want = [torch.zeros_like(t) for t in leaves]
    for name, a, b in zip("q k v sinks".split(), got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")


def _dense_bias_reference(q, k, v, bias, scale, causal):
    """float64 softmax(q k^T * scale + bias) v, GQA by head index, causal j <= i + Sk - Sq."""
    Hq, Hkv, Sq, Sk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    kv = torch.arange(Hq) // (Hq // Hkv)
    scores = q @ k[:, kv].transpose(-1, -2) * scale + bias
    if causal:
        scores = scores.masked_fill(torch.arange(Sk)[None, :] > torch.arange(Sq)[:, None] + (Sk - Sq), -math.inf)
    return torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v[:, kv]


@pytest.mark.parametrize("shape", [(7, 9), (2, 1, 1, 9), (1, 4, 7, 9), (2, 1, 7, 1), (4, 1, 9)])
@pytest.mark.parametrize("rows", [1, 3, 7])
def test_a_float_masks_gradient_is_summed_to_its_shape(shape, rows, monkeypatch):
    """A bias of any broadcastable shape (per query row or one row for all, per key or one value
    for all keys) gets the score gradients summed over what it broadcasts, block by block."""
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 2, 7, 9, 8
    g = torch.Generator().manual_seed(sum(shape) + rows)
    q, k, v = torch.randn(B, Hq, Sq, D, generator=g), torch.randn(B, Hkv, Sk, D, generator=g), \
        torch.randn(B, Hkv, Sk, D, generator=g)
    bias, weights = torch.randn(shape, generator=g), torch.randn(B, Hq, Sq, D, generator=g)
    monkeypatch.setattr(attention_grads, "ROWS_ELEMENTS", B * Hq * Sk * rows)
    got = _op_grads(q, k, v, bias, 0.4, True, None, weights)
    leaves = _leaves(q, k, v, bias)
    want = torch.autograd.grad((_dense_bias_reference(*leaves[:3], leaves[3], 0.4, True) * weights.double()).sum(),
                               leaves)
    assert got[3].shape == bias.shape
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_blocks_hold_a_bounded_number_of_rows_and_only_the_keys_they_keep(monkeypatch):
    """At S = 256 with a 16-key causal window, blocks of 32 rows compute 32 x 48 scores at most
    (the window's keys of the block, gathered), never 256 x 256, and the gradients are exact."""
    B, H, S, D, width, rows = 1, 2, 256, 8, 16, 32
    seen = []
    softmax = attention_grads.softmax_with_sinks

    def spy(scores, sinks):
        seen.append(tuple(scores.shape))
        return softmax(scores, sinks)

    monkeypatch.setattr(attention_grads, "softmax_with_sinks", spy)
    monkeypatch.setattr(attention_grads, "ROWS_ELEMENTS", B * H * S * rows)
    g = torch.Generator().manual_seed(5)
    q, k, v, weights = (torch.randn(B, H, S, D, generator=g) for _ in range(4))
    patterns = (P.Window(width, 0), P.Window(width // 2, 0))
    got = _op_grads(q, k, v, None, D ** -0.5, True, patterns, weights)
    assert len(seen) == S // rows
    assert all(shape[2] == rows and shape[3] <= rows + width for shape in seen), seen
    leaves = _leaves(q, k, v)
    want = reference_attention(*leaves, patterns, causal=True, scale=D ** -0.5)
    for a, b in zip(got, torch.autograd.grad((want * weights.double()).sum(), leaves)):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_a_block_that_keeps_no_key_gives_zero_gradients(monkeypatch):
    """Rows that keep no key (a diagonal past the keys' end) give zero output and zero gradients,
    sinks or not, in blocks of their own."""
    B, H, S, D = 1, 2, 12, 4
    monkeypatch.setattr(attention_grads, "ROWS_ELEMENTS", B * H * S * 4)
    g = torch.Generator().manual_seed(9)
    q, k, v, weights = (torch.randn(B, H, S, D, generator=g) for _ in range(4))
    sinks = torch.randn(H, generator=g)
    patterns = (P.MultiDiagonal([-8], 0),) * H  # rows 0..7 keep nothing
    dq, dk, dv, dsinks = _op_grads(q, k, v, None, 0.5, False, patterns, weights, sinks=sinks)
    assert bool((dq[:, :, :8] == 0).all()) and bool((dk[:, :, 4:] == 0).all())
    leaves = _leaves(q, k, v, sinks)
    want = reference_attention(*leaves[:3], patterns, scale=0.5, sinks=leaves[3])
    for a, b in zip((dq, dk, dv, dsinks), torch.autograd.grad((want * weights.double()).sum(), leaves)):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dropped", [float("-inf"), torch.finfo(torch.float32).min])
def test_a_float_masks_dropped_pairs_stay_dropped_where_patterns_run_on_its_rows(dropped):
    """A causal float mask (transformers writes the dtype's lowest value, not -inf) read as key
    runs: the forward drops its pairs, so rows whose pattern keeps only dropped keys give 0 and no
    gradient, and the bias's gradient is the kept pairs' score gradient, as for -inf."""
    B, H, S, D = 1, 2, 12, 8
    g = torch.Generator().manual_seed(3)
    q, k, v, weights = (torch.randn(B, H, S, D, generator=g) for _ in range(4))
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    bias = torch.zeros(1, 1, S, S).masked_fill(~causal, dropped)
    patterns = (P.VerticalSlash([], [1]), P.Window(2, 0))  # head 0 keeps only j = i + 1: all dropped
    got = _op_grads(q, k, v, bias, 0.5, False, patterns, weights)
    leaves = _leaves(q, k, v, bias)
    keep = torch.stack([p.mask(S, S) for p in patterns]) & causal
    scores = (leaves[0] @ leaves[1].transpose(-1, -2) * 0.5 + leaves[3]).masked_fill(~keep, -math.inf)
    want = torch.softmax(scores, dim=-1).nan_to_num(0.0) @ leaves[2]
    for a, b in zip(got, torch.autograd.grad((want * weights.double()).sum(), leaves)):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)
    assert float(got[2][:, 0].abs().max()) == 0.0


@pytest.mark.parametrize("backend", ["cpu", "cpu without native kernels", "masked",
                                     pytest.param("triton", marks=pytest.mark.triton)])
def test_sparsec_attention_is_differentiable_on_every_executor(backend, monkeypatch):
    """sparsec.attention's executors write their output where autograd cannot see (native and
    Triton kernels); its gradients come from attention_grads whichever ran, for q, k, v and sinks."""
    if backend == "cpu without native kernels":
        monkeypatch.setenv("SPARSEC_CPU_NATIVE", "0")
    B, Hq, Hkv, S, D = 1, 4, 2, 40, 16
    g = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(B, h, S, D, generator=g).requires_grad_() for h in (Hq, Hkv, Hkv))
    sinks = torch.randn(Hq, generator=g).requires_grad_()
    weights = torch.randn(B, Hq, S, D, generator=g)
    layout = torch.rand(3, 3, generator=torch.Generator().manual_seed(1)) < 0.6
    patterns = [P.Dense(), P.Window(6, 0), P.Skip("mean"), P.BlockSparse(layout, 16) | P.Columns([(0, 2)])]
    out = sparsec.attention(q, k, v, patterns, causal=True, backend=backend.split()[0], sinks=sinks)
    got = torch.autograd.grad((out * weights).sum(), (q, k, v, sinks))
    leaves = _leaves(q, k, v, sinks)
    want = reference_attention(*leaves[:3], patterns, causal=True, sinks=leaves[3])
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    for name, a, b in zip("q k v sinks".split(), got, torch.autograd.grad((want * weights.double()).sum(), leaves)):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_no_gradient_no_graph():
    """Without inputs that require a gradient (or under no_grad) the executor's output is returned
    as it is: no autograd node."""
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    assert sparsec.attention(q, k, v, P.Window(3, 0)).grad_fn is None
    with torch.no_grad():
        assert sparsec.attention(q.requires_grad_(), k, v, P.Window(3, 0)).grad_fn is None


def test_a_float32_bias_on_bf16_inputs_weighs_the_same_rows_forward_and_backward():
    """A float32 bias of the lowest value on every key of some rows, with the causal rule, on bf16
    q, k, v (found by fuzzing): the forward cast the bias to bf16, where that value is -inf, and
    gave those rows 0, while the backward (float32) gave them uniform weights. Both now take the
    bias as it is, as SDPA does without the causal rule, and equal the float64 reference."""
    S, D = 6, 16
    g = torch.Generator().manual_seed(7)
    q, k, v, weights = (torch.randn(1, 1, S, D, generator=g).to(torch.bfloat16) for _ in range(4))
    keep = torch.ones(S, S, dtype=torch.bool).tril()
    keep[:3] = False  # rows 0-2: every key weighed by the lowest value
    bias = torch.zeros(1, 1, S, S).masked_fill(~keep, torch.finfo(torch.float32).min)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = torch.ops.sparsec.attention(*leaves, bias, D ** -0.5, True, "")
    got = torch.autograd.grad((out * weights).sum(), leaves)
    ref_leaves = _leaves(q, k, v)
    scores = ref_leaves[0] @ ref_leaves[1].transpose(-1, -2) * D ** -0.5 + bias.double()
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    want = torch.softmax(scores.masked_fill(~causal, -math.inf), dim=-1) @ ref_leaves[2]
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)
    for a, b in zip(got, torch.autograd.grad((want * weights.double()).sum(), ref_leaves)):
        torch.testing.assert_close(a.double(), b, atol=3e-2, rtol=3e-2)
