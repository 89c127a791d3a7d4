"""The custom ops sparsec::attention / sparsec::linear against float64 references."""
from __future__ import annotations

import math

import pytest
import torch

import sparsec.ops as sparsec_ops
from sparsec import patterns as P
from tests.reference import reference_attention, tolerance


def _dense_reference(q, k, v, mask, scale, causal):
    """float64 softmax(q k^T * scale + mask) v with explicit masks; GQA by head index."""
    Hq, Hkv, Sq, Sk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    kv = torch.arange(Hq) // (Hq // Hkv)
    scores = q.double() @ k.double()[:, kv].transpose(-1, -2) * scale
    keep = torch.ones(Sq, Sk, dtype=torch.bool)
    if causal:
        keep = torch.arange(Sk)[None, :] <= torch.arange(Sq)[:, None] + (Sk - Sq)
    if mask is not None and mask.dtype == torch.bool:
        keep = keep & mask
    elif mask is not None:
        scores = scores + mask.double()
    probs = torch.softmax(scores.masked_fill(~keep, -math.inf), dim=-1).nan_to_num(0.0)
    return probs @ v.double()[:, kv]


def _qkv(Hq=4, Hkv=2, Sq=6, Sk=6, D=8, requires_grad=False):
    make = lambda *s: torch.randn(*s, requires_grad=requires_grad)  # noqa: E731
    return make(2, Hq, Sq, D), make(2, Hkv, Sk, D), make(2, Hkv, Sk, D)


@pytest.mark.parametrize("Hkv, Sq, Sk, causal, mask_kind", [
    (4, 6, 6, False, None), (2, 6, 6, True, None), (1, 3, 7, True, None),
    (2, 6, 6, False, "bool"), (2, 5, 7, True, "bias"), (4, 6, 6, True, "bool"),
])
def test_dense_attention_matches_the_reference(Hkv, Sq, Sk, causal, mask_kind):
    q, k, v = _qkv(Hkv=Hkv, Sq=Sq, Sk=Sk)
    mask = {"bool": torch.rand(Sq, Sk) > 0.3, "bias": torch.randn(2, 1, Sq, Sk), None: None}[mask_kind]
    out = torch.ops.sparsec.attention(q, k, v, mask, 0.3, causal, "")
    torch.testing.assert_close(out.double(), _dense_reference(q, k, v, mask, 0.3, causal), atol=2e-5, rtol=2e-5)
    assert out.is_contiguous()


def test_patterns_match_the_masked_reference():
    q, k, v = _qkv()
    head_patterns = (P.Window(1, 0), P.Skip("mean"), P.Columns([0, (3, 5)]), P.MultiDiagonal([-2, 0], 0))
    out = torch.ops.sparsec.attention(q, k, v, None, 0.25, True, sparsec_ops.patterns_to_json(head_patterns))
    atol, rtol = tolerance(torch.float32)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, head_patterns, causal=True, scale=0.25),
                               atol=atol, rtol=rtol)


def test_patterns_with_a_mask_that_does_not_pad_keys_run_dense_with_the_mask():
    """(tests/test_key_padding.py covers masks that cut the keys to a prefix: the patterns run on them.)"""
    q, k, v = _qkv()
    mask = torch.ones(6, 6, dtype=torch.bool).triu()  # each query keeps a suffix of the keys
    got = torch.ops.sparsec.attention(q, k, v, mask, 0.3, False, sparsec_ops.patterns_to_json((P.Window(1, 0),) * 4))
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                                            scale=0.3, enable_gqa=True)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_patterns_json_round_trips():
    head_patterns = (P.Window(3, 1) | P.Columns([0]), P.BlockSparse([[1, 0], [1, 1]], 4), P.Skip("zero"))
    assert sparsec_ops.patterns_from_json(sparsec_ops.patterns_to_json(head_patterns)) == head_patterns


@pytest.mark.parametrize("head_patterns", [None, (P.Window(2, 0), P.Skip("mean"), P.Dense(), P.Columns([1]))])
def test_attention_backward_matches_float64_autograd(head_patterns, grad_blocks):
    q, k, v = _qkv(requires_grad=True)
    bias = None if head_patterns else torch.randn(6, 6, requires_grad=True)
    text = sparsec_ops.patterns_to_json(head_patterns) if head_patterns else ""
    out = torch.ops.sparsec.attention(q, k, v, bias, 0.3, True, text)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [q, k, v] + ([bias] if bias is not None else []), grad_out)
    leaves = [t.detach().double().requires_grad_() for t in [q, k, v] + ([bias] if bias is not None else [])]
    if head_patterns:
        expected = reference_attention(*leaves[:3], head_patterns, causal=True, scale=0.3)
    else:
        expected = _dense_reference(*leaves[:3], leaves[3], 0.3, True)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out.double())
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_linear_is_exact():
    x, w, b = torch.randn(2, 3, 5), torch.randn(4, 5), torch.randn(4)
    expected = x.double() @ w.double().T + b.double()
    torch.testing.assert_close(torch.ops.sparsec.linear(x, w, b).double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.ops.sparsec.linear(x, w, None).double(), x.double() @ w.double().T,
                               atol=1e-5, rtol=1e-5)


def test_linear_backward_matches_float64_autograd():
    x, w, b = (torch.randn(*s, requires_grad=True) for s in ((2, 3, 5), (4, 5), (4,)))
    grad_out = torch.randn(2, 3, 4)
    grads = torch.autograd.grad(torch.ops.sparsec.linear(x, w, b), [x, w, b], grad_out)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    expected = torch.autograd.grad(x64 @ w64.T + b64, [x64, w64, b64], grad_out.double())
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_fake_implementations_and_registrations_pass_opcheck():
    q, k, v = _qkv(requires_grad=True)
    torch.library.opcheck(torch.ops.sparsec.attention.default, (q, k, v, None, 0.3, True, ""),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(torch.ops.sparsec.linear.default, (torch.randn(3, 5), torch.randn(4, 5), torch.randn(4)),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
