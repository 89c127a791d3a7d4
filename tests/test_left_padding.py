"""Attention patterns on left-padded batches (transformers' batched generation: row b's first p_b
tokens are padding, its queries keep no key) and block layouts at lengths other than they were made
for (sparsec/key_padding.py: patterns_at). A left-padded row runs its patterns on its own tokens
from position 0, as it would unpadded; a layout with more blocks than a call needs is cut to its
top-left corner, one with fewer leaves the call dense. Every result is checked against the float64
reference from explicit masks (tests/reference.py), each layout's corner cut here by slicing."""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hf_models import run_compiled
from reference import reference_attention
from sparsec import patterns as P
from sparsec.key_padding import key_prefix_runs
from sparsec.ops import attention as attention_op
from sparsec.ops import dense_attention, patterns_to_json
from sparsec.plan import LayerPlan, Plan
from test_key_padding import Holding
from test_mask_bands import left_padded

H, HKV, D, BLOCK = 4, 2, 16, 16
SCALE = D ** -0.5


def _random(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _layout(S: int, seed: int) -> torch.Tensor:
    blocks = math.ceil(S / BLOCK)
    return (torch.rand(blocks, blocks, generator=torch.Generator().manual_seed(seed)) < 0.5) | torch.eye(
        blocks, dtype=torch.bool)


def _heads(S: int, seed: int = 0) -> tuple[P.Pattern, ...]:
    """A block layout for S tokens, an A-shape, a vertical-slash and a Skip head: patterns that name
    absolute positions (sinks, columns, block rows), which left padding would shift."""
    return (P.BlockSparse(_layout(S, seed), BLOCK), P.AShape(3, 10), P.VerticalSlash([2, 40], [0, -1, -25]),
            P.Skip("mean"))


def _at(patterns, n: int) -> tuple[P.Pattern, ...]:
    """The patterns for n tokens from position 0: each layout's top-left corner, with the blocks
    past it kept where it has fewer (a plan's, at a longer call)."""
    blocks = math.ceil(n / BLOCK)
    out = []
    for p in patterns:
        if isinstance(p, P.BlockSparse):
            layout = torch.ones(blocks, blocks, dtype=torch.bool)
            corner = p.layout[:blocks, :blocks]
            layout[:corner.shape[0], :corner.shape[1]] = corner
            p = P.BlockSparse(layout, BLOCK)
        out.append(p)
    return tuple(out)


def _left_padded_reference(q, k, v, patterns, pads) -> torch.Tensor:
    """float64: row b's tokens after pads[b] as an unpadded causal call; its padding queries 0."""
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float64)
    S = q.shape[2]
    for b, p in enumerate(pads):
        own = slice(p, S)
        out[b:b + 1, :, own] = reference_attention(q[b:b + 1, :, own], k[b:b + 1, :, own], v[b:b + 1, :, own],
                                                   _at(patterns, S - p), causal=True, scale=SCALE)
    return out


@settings(max_examples=15, deadline=None)
@given(st.integers(33, 80), st.lists(st.integers(0, 32), min_size=1, max_size=3), st.sampled_from(["", "causal:0"]),
       st.integers(0, 1000))
def test_each_left_padded_row_runs_its_patterns_on_its_own_tokens(S, pads, rule, seed):
    """Under attention_patterns (rule "") and a plan tuned on prefill (rule "causal:0")."""
    B = len(pads)
    q, k, v = _random(B, H, S, D, seed=seed), _random(B, HKV, S, D, seed=seed + 1), _random(B, HKV, S, D, seed=seed + 2)
    patterns = _heads(S, seed)
    got = attention_op(q, k, v, left_padded(S, pads), SCALE, False, patterns_to_json(patterns), mask_rule=rule)
    torch.testing.assert_close(got.double(), _left_padded_reference(q, k, v, patterns, pads), atol=2e-5, rtol=2e-5)


def test_the_triton_kernels_run_left_padded_rows_on_strided_views(monkeypatch):
    """Each row's own tokens are a strided view of q, k, v: the Triton kernels (Triton's interpreter
    here) take them as they are."""
    monkeypatch.setenv("SPARSEC_ATTENTION_BACKEND", "triton")
    S, pads = 40, [0, 13]
    q, k, v = _random(2, H, S, D, seed=31), _random(2, HKV, S, D, seed=32), _random(2, HKV, S, D, seed=33)
    patterns = _heads(S, seed=34)
    got = attention_op(q, k, v, left_padded(S, pads), SCALE, False, patterns_to_json(patterns), mask_rule="causal:0")
    torch.testing.assert_close(got.double(), _left_padded_reference(q, k, v, patterns, pads), atol=2e-5, rtol=2e-5)


def test_gradients_of_left_padded_rows_match_the_reference(grad_blocks):
    S, pads = 70, [0, 21, 40]
    q = _random(3, H, S, D, seed=1).requires_grad_()
    k, v = (_random(3, HKV, S, D, seed=s).requires_grad_() for s in (2, 3))
    patterns = _heads(S, seed=4)
    out = attention_op(q, k, v, left_padded(S, pads), SCALE, False, patterns_to_json(patterns), mask_rule="causal:0")
    weights = _random(*out.shape, seed=5)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = _left_padded_reference(q64, k64, v64, patterns, pads)
    for g, w in zip(grads, torch.autograd.grad((want * weights).sum(), (q64, k64, v64))):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rule, window, patterns, runs", [
    ("", None, _heads(64), True),                  # attention_patterns
    ("causal:0", None, _heads(64), True),          # a plan tuned on prefill from position 0
    ("causal:3", None, _heads(64), False),         # a plan tuned on a later chunk
    ("keys", None, _heads(64), False),             # a plan tuned without the causal rule
    ("", 9, _heads(64), False),                    # a band cannot cut patterns
    ("band", 9, (P.Dense(),) * H, True),           # ... only Dense heads (a layer left dense)
])
def test_the_mask_rule_decides_which_left_padded_calls_run_the_patterns(rule, window, patterns, runs):
    q = torch.empty(2, H, 64, D)
    found = key_prefix_runs(q, q, left_padded(64, [0, 20], window), False, patterns, rule)
    assert (found is not None) == runs


def test_a_right_padded_batch_with_block_layouts_runs_each_rows_corner():
    """A right-padded row's real queries run as a shorter call: its layout's top-left corner (its
    padding queries against the row's keys under the whole layout, exactly)."""
    S, lengths = 64, [64, 30, 47]
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    mask = torch.stack([((j <= i) | (i >= n)) & (j < n) for n in lengths])[:, None]
    q, k, v = _random(3, H, S, D, seed=6), _random(3, HKV, S, D, seed=7), _random(3, HKV, S, D, seed=8)
    patterns = (P.BlockSparse(_layout(S, 9), BLOCK),) * 2 + (P.BlockSparse(_layout(S, 10), BLOCK) | P.Window(2, 0),
                                                             P.Dense())
    got = attention_op(q, k, v, mask, SCALE, False, patterns_to_json(patterns), mask_rule="causal:0")
    want = torch.zeros(3, H, S, D, dtype=torch.float64)
    for b in range(3):
        keep = mask[b, 0]
        for h, p in enumerate(patterns):
            scores = (q[b, h].double() @ k[b, h // 2].double().T) * SCALE
            probs = scores.masked_fill(~(p.mask(S, S) & keep), float("-inf")).softmax(-1).nan_to_num(0.0)
            want[b, h] = probs @ v[b, h // 2].double()
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_unmasked_calls_cut_longer_layouts_and_run_dense_past_shorter_ones(caplog):
    patterns = _heads(96, seed=11)
    q, k, v = (_random(1, H, 70, D, seed=s) for s in (12, 13, 14))
    got = attention_op(q, k, v, None, SCALE, True, patterns_to_json(patterns))
    torch.testing.assert_close(got.double(), reference_attention(q, k, v, _at(patterns, 70), causal=True, scale=SCALE),
                               atol=2e-5, rtol=2e-5)
    q, k, v = (_random(1, H, 120, D, seed=s) for s in (15, 16, 17))
    with caplog.at_level(logging.INFO, logger="sparsec.ops"):
        got = attention_op(q, k, v, None, SCALE, True, patterns_to_json(patterns), site="longer")
    torch.testing.assert_close(got, dense_attention(q, k, v, None, SCALE, True), atol=0, rtol=0)
    assert "longer" in caplog.text and "fewer blocks" in caplog.text


class LeftPaddedCausal(nn.Module):
    """Causal self-attention over a left-padded batch, masked as transformers does: p_b <= j <= i."""

    def forward(self, q, k, v, pads):
        S = q.shape[2]
        i, j = torch.arange(S, device=q.device)[:, None], torch.arange(S, device=q.device)[None, :]
        keep = (j <= i)[None] & (j[None] >= pads[:, None, None])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None])


class Causal(nn.Module):
    """Causal self-attention with no mask; on q, k, v packed in one tensor (one length) when `packed`."""

    def __init__(self, packed: bool = False):
        super().__init__()
        self.packed = packed

    def forward(self, *qkv):
        q, k, v = qkv[0].split(D, -1) if self.packed else qkv
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _plan(patterns, S: int) -> Plan:
    layer = LayerPlan(patterns=patterns, head_groups=tuple((h,) for h in range(H)), tiles=(BLOCK, BLOCK), error=0.01,
                      dense_seconds=2e-3, sparse_seconds=1e-3, num_heads=H, num_kv_heads=H, q_len=S, kv_len=S,
                      head_dim=D, dtype="f32", causal=True)
    return Plan(target="cpu", budget=0.02, model_fingerprint="x", layers={"attn": layer})


def test_a_plan_tuned_at_one_length_runs_a_left_padded_batch_of_another():
    """A plan made at 96 tokens, compiled for a batch of 80 (static lengths: the layouts are cut at
    compile time) whose rows are left-padded: every row's own tokens under the patterns."""
    patterns, pads = _heads(96, seed=18), torch.tensor([0, 30])
    q, k, v = (_random(2, H, 80, D, seed=s) for s in (19, 20, 21))
    torch._dynamo.reset()
    compiled = torch.compile(Holding("attn", LeftPaddedCausal()), backend="sparsec", dynamic=False,
                             options={"plan": _plan(patterns, 96), "inner": "eager"})
    with torch.no_grad():
        got = compiled(q, k, v, pads)
    torch.testing.assert_close(got.double(), _left_padded_reference(q, k, v, patterns, pads.tolist()), atol=2e-5,
                               rtol=2e-5)


def test_a_plan_tuned_on_shorter_rows_keeps_the_blocks_past_its_layouts():
    """Rows longer than the plan's tuning length (64 tokens, 4 x 4 blocks): the blocks past its
    layouts are kept, as dense does (no calibration call had those queries and keys)."""
    patterns, pads = _heads(64, seed=35), [0, 30]
    q, k, v = (_random(2, H, 100, D, seed=s) for s in (36, 37, 38))
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(Holding("attn", LeftPaddedCausal()), backend="sparsec", dynamic=False,
                            options={"plan": _plan(patterns, 64), "inner": "eager"})(q, k, v, torch.tensor(pads))

    want = torch.zeros(2, H, 100, D, dtype=torch.float64)
    for b, p in enumerate(pads):
        own = slice(p, 100)
        want[b:b + 1, :, own] = reference_attention(q[b:b + 1, :, own], k[b:b + 1, :, own], v[b:b + 1, :, own],
                                                    _at(patterns, 100 - p), causal=True, scale=SCALE)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dynamic", [False, True])
def test_layouts_shorter_than_a_call_are_refused_or_widened(dynamic):
    """attention_patterns: a layout with fewer blocks than the lengths need is the user's error (at
    static lengths; per call, dense); a plan's (tuned on shorter calls) keeps the blocks past it,
    cut per call at symbolic lengths."""
    layout = P.BlockSparse(_layout(48, 22), BLOCK)
    q, k, v = (_random(1, H, 70, D, seed=s) for s in (23, 24, 25))
    if not dynamic:
        torch._dynamo.reset()
        with pytest.raises(Exception, match="SparsecUserError: attention_patterns for 'attn', head 0: BlockSparse "
                           "layout has shape \\(3, 3\\).*need \\(5, 5\\)"):
            torch.compile(Holding("attn", Causal()), backend="sparsec", dynamic=False,
                          options={"attention_patterns": {"attn": [layout] * H}})(q, k, v)
    torch._dynamo.reset()
    compiled = torch.compile(Holding("attn", Causal(packed=True)), backend="sparsec",
                             options={"plan": _plan((layout,) * H, 48), "inner": "eager"})
    for n in (70, 90, 110):
        qkv = _random(1, H, n, 3 * D, seed=n)
        if dynamic:
            torch._dynamo.mark_dynamic(qkv, 2)
        with torch.no_grad():
            got = compiled(qkv)
        want = reference_attention(*qkv.split(D, -1), _at((layout,) * H, n), causal=True, scale=SCALE)
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_the_tuner_records_each_left_padded_row_from_its_first_token():
    from sparsec.model_tuning import record_attention

    q, k, v = (_random(3, H, 64, D, seed=s) for s in (26, 27, 28))
    recorded, _ = record_attention(Holding("attn", LeftPaddedCausal()), (q, k, v, torch.tensor([0, 20, 20])))
    samples = recorded["attn"]  # the most common row shape: the two rows of 44 tokens
    assert [s.q.shape[2] for s in samples] == [44, 44] and all(s.causal for s in samples)
    for s, b in zip(samples, (1, 2)):
        assert torch.equal(s.q[0], q[b, :, 20:]) and torch.equal(s.k[0], k[b, :, 20:])


@pytest.mark.models
def test_a_left_padded_llama_batch_runs_each_row_as_it_would_alone():
    """transformers' Llama with per-head patterns that name absolute positions: the real tokens of
    each left-padded row equal that row run alone, unpadded (RoPE scores depend only on i - j)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(8)
    seq, pad = 96, 29
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=H, num_key_value_heads=HKV, max_position_embeddings=2 * seq,
                                      attn_implementation="sdpa")
    model = transformers.LlamaModel(config).eval()
    options = {"attention_patterns": {"layers.*.self_attn": list(_heads(seq, seed=30))}, "inner": "eager"}
    ids = torch.randint(0, 64, (2, seq))
    padding = (torch.arange(seq)[None] >= torch.tensor([[pad], [0]])).long()
    batch, _, calls = run_compiled(model, (ids,), options, attention_mask=padding)
    assert sorted(c.keys for c in calls) == [seq - pad, seq - pad, seq, seq]  # each row on its own tokens, sparse
    alone, _, _ = run_compiled(model, (ids[:1, pad:],), options)
    torch.testing.assert_close(batch[0, pad:], alone[0], atol=1e-5, rtol=1e-5)
