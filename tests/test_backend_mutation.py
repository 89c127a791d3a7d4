"""Graphs that mutate their inputs through backend="sparsec": a decoder step that writes a static
KV cache in place (index_copy_, the way HF's StaticCache and gpt-fast decode), with the cache as
the module's buffers or as inputs, and BatchNorm's running statistics in training mode. sparsec
rewrites these graphs (its linear kernels run; no fallback), the outputs match a float64 reference
built step by step, and the mutated tensors hold the reference's values afterwards; with grad,
the backward runs. A mutation the graph cannot hold (an input's metadata, in place) is refused,
naming the input (the backend then falls back).
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import sparsec
from sparsec import linear_dispatch
from sparsec.backend import sparsec_backend
from sparsec.dump import recording
from sparsec.passes.capture import CaptureError, capture_inference_graph

HEADS, HEAD_DIM, MAX_LEN, BATCH = 2, 16, 12, 2
FEATURES = HEADS * HEAD_DIM


def attend(q, k_cache, v_cache, positions):
    """Each query (at its position) attends to the cache's keys up to that position."""
    scores = q @ k_cache.transpose(-1, -2) / HEAD_DIM ** 0.5
    allowed = torch.arange(MAX_LEN, device=q.device)[None, :] <= positions[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v_cache


class DecoderStep(nn.Module):
    """One attention layer with a static cache: writes this step's keys and values at
    `positions`, then attends over the cache. `cache_in_buffers` keeps the cache as the module's
    buffers (gpt-fast); otherwise the caller passes it (HF's StaticCache)."""

    def __init__(self, cache_in_buffers: bool):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(FEATURES, FEATURES) for _ in range(4))
        self.cache_in_buffers = cache_in_buffers
        if cache_in_buffers:
            self.register_buffer("k_cache", torch.zeros(BATCH, HEADS, MAX_LEN, HEAD_DIM))
            self.register_buffer("v_cache", torch.zeros(BATCH, HEADS, MAX_LEN, HEAD_DIM))

    def heads(self, x):
        return x.view(x.shape[0], x.shape[1], HEADS, HEAD_DIM).transpose(1, 2)

    def forward(self, x, positions, k_cache=None, v_cache=None):
        if self.cache_in_buffers:
            k_cache, v_cache = self.k_cache, self.v_cache
        k_cache.index_copy_(2, positions, self.heads(self.k(x)))
        v_cache.index_copy_(2, positions, self.heads(self.v(x)))
        out = attend(self.heads(self.q(x)), k_cache, v_cache, positions)
        return self.o(out.transpose(1, 2).reshape(x.shape))


def compiled(model, **options):
    options = {"fallback": "raise", "verify": True, "weight_sparsity": "always", **options}
    return torch.compile(model, backend=functools.partial(sparsec_backend, options=options))


@pytest.fixture(autouse=True)
def fresh():
    torch._dynamo.reset()
    linear_dispatch.kernel_calls.clear()
    torch.manual_seed(0)


def empty_cache(dtype=torch.float32):
    return [torch.zeros(BATCH, HEADS, MAX_LEN, HEAD_DIM, dtype=dtype) for _ in range(2)]


@pytest.mark.parametrize("inner", ["eager", "inductor"])
@pytest.mark.parametrize("cache_in_buffers", [True, False], ids=["buffers", "inputs"])
def test_a_static_kv_cache_decodes_like_the_float64_reference(inner, cache_in_buffers):
    model = sparsec.prune(DecoderStep(cache_in_buffers).eval(), "2:4")
    reference = copy.deepcopy(model).double()
    cache, reference_cache = empty_cache(), empty_cache(torch.float64)
    run = compiled(model, inner=inner)
    steps = [torch.arange(0, 5), torch.tensor([5]), torch.tensor([6]), torch.tensor([7])]  # prefill, 3 tokens
    with torch.no_grad(), recording() as records:
        for positions in steps:
            x = torch.randn(BATCH, len(positions), FEATURES)
            got = run(x, positions) if cache_in_buffers else run(x, positions, *cache)
            want = (reference(x.double(), positions) if cache_in_buffers
                    else reference(x.double(), positions, *reference_cache))
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    if cache_in_buffers:
        cache, reference_cache = (model.k_cache, model.v_cache), (reference.k_cache, reference.v_cache)
    for tensor, want in zip(cache, reference_cache):
        torch.testing.assert_close(tensor.double(), want, atol=1e-4, rtol=1e-4)
        assert tensor[:, :, 8:].count_nonzero() == 0  # nothing written past the last position
    assert records and all(r.fallback_reason is None for r in records)
    assert linear_dispatch.kernel_calls["nm_linear_cpu"] >= 4 * len(steps)  # the 2:4 kernels ran


def reference_batchnorm(model, x, running_mean, running_var):
    """float64 training-mode BatchNorm1d after a linear; returns the output and new statistics."""
    h = x.double() @ model.linear.weight.double().T + model.linear.bias.double()
    mean, var = h.mean(0), h.var(0, unbiased=False)
    y = (h - mean) / torch.sqrt(var + model.norm.eps) * model.norm.weight.double() + model.norm.bias.double()
    m = model.norm.momentum
    n = h.shape[0]
    return y, (1 - m) * running_mean + m * mean, (1 - m) * running_var + m * var * n / (n - 1)


class LinearNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(FEATURES, FEATURES)
        self.norm = nn.BatchNorm1d(FEATURES)

    def forward(self, x):
        return self.norm(self.linear(x))


@pytest.mark.parametrize("inner", ["eager", "inductor"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_batchnorm_running_statistics_update_in_training_mode(inner, grad):
    model = sparsec.prune(LinearNorm().train(), "2:4")
    running_mean, running_var = model.norm.running_mean.double(), model.norm.running_var.double()
    run = compiled(model, inner=inner)
    with torch.set_grad_enabled(grad), recording() as records:
        for _ in range(2):
            x = torch.randn(8, FEATURES)
            got = run(x)
            want, running_mean, running_var = reference_batchnorm(model, x, running_mean, running_var)
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(model.norm.running_mean.double(), running_mean, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model.norm.running_var.double(), running_var, atol=1e-5, rtol=1e-5)
    assert records and all(r.fallback_reason is None for r in records)
    if grad:
        got.sum().backward()
        assert model.linear.weight.grad is not None and model.linear.weight.grad.abs().sum() > 0


class TransposesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(FEATURES, FEATURES)

    def forward(self, x):
        x.t_()  # a metadata mutation: aot_autograd cannot keep it in the graph
        return (self.linear(x),)


def test_a_mutation_the_graph_cannot_hold_is_refused_naming_the_input():
    """Dynamo replays metadata mutations of its inputs itself, so the backend sees none; capture
    still refuses one (the backend then falls back) rather than lose it. Data mutations stay."""
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode

    gm = torch.fx.symbolic_trace(TransposesItsInput())
    with tracing(TracingContext(FakeTensorMode())), pytest.raises(
            CaptureError, match=r"inputs \[2\] are mutated in a way the graph cannot hold"):
        capture_inference_graph(gm, [torch.randn(FEATURES, 4)])


class CountedAttention(nn.Module):
    """Self-attention that counts its calls in a buffer (written in place, like running stats)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(FEATURES, 3 * FEATURES)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls.add_(1)
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_tuning_on_the_first_call_writes_the_graphs_inputs_once():
    """Option "tune" runs the graph once to record attention, on clones of the inputs it writes:
    after one call the buffer has been written once, as in eager."""
    model = CountedAttention().eval()
    x = torch.randn(BATCH, 64, FEATURES)
    with torch.no_grad(), recording() as records:
        got = compiled(model, inner="eager", tune={"target": "cpu", "budget": 0.05})(x)
    assert records and records[0].plan is not None and records[0].fallback_reason is None
    assert model.calls.item() == 1
    q, k, v = (x.double() @ model.qkv.weight.double().T + model.qkv.bias.double()).view(
        BATCH, 64, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
    want = ((q @ k.transpose(-1, -2)) / HEAD_DIM ** 0.5).softmax(-1) @ v
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
