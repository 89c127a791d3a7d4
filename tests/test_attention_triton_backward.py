"""The Triton backward kernels (codegen/attention_triton_backward.py, through TRITON_INTERPRET=1 on
CPU) against float64 autograd of the explicit-mask reference (tests/reference.py): every family
with head fusion and GQA across families, causal or not, Sq != Sk, odd lengths, soft-capping,
sinks, Skip heads, half precision; and which backward sparsec.attention and the op run."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsec
from reference import reference_attention
from sparsec import patterns as P
from sparsec.codegen import attention_triton as at
from sparsec.codegen import attention_triton_backward as atb
from sparsec.codegen.frame_order import FramesTransposed
from sparsec.codegen.tiles import AttentionTiles, BackwardTiles
from sparsec.ops import patterns_to_json
from test_attention_triton import CLOSED_FORM, pattern_strategy

pytestmark = pytest.mark.triton

SMALL = BackwardTiles(*(AttentionTiles(16, 16, num_warps=1, num_stages=1),) * 2)
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

# Each family's two heads of the forward's tests, and the table-driven families.
FAMILIES = {
    **CLOSED_FORM,
    "block_sparse": (P.BlockSparse(torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0]], dtype=torch.bool), 16),
                     P.BlockSparse(torch.tensor([[0, 1], [1, 1]], dtype=torch.bool), (24, 24))),
    "union": (P.Window(4, 0) | P.Columns([(10, 12)]), P.MultiDiagonal([-20], 1) | P.AShape(2, 2)),
}


def _inputs(B, Hq, Hkv, Sq, Sk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, weights = (torch.randn(B, h, s, D, generator=g).to(dtype) for h, s in
                        ((Hq, Sq), (Hkv, Sk), (Hkv, Sk), (Hq, Sq)))
    return q, k, v, weights


def _check(q, k, v, weights, head_patterns, *, causal, softcap=0.0, sinks=None, tiles=SMALL, scale=None):
    """The kernels' gradients of sum(attention * weights) against float64 autograd of the reference."""
    head_patterns = tuple(head_patterns)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = at.triton_attention(q, k, v, head_patterns, causal=causal, scale=scale, softcap=softcap, sinks=sinks)
    got = atb.triton_attention_backward(weights, q, k, v, out, head_patterns, causal=causal, scale=scale,
                                        softcap=softcap, sinks=sinks, tiles=tiles)
    assert [t.dtype for t in got[:3]] == [q.dtype] * 3 and [t.shape for t in got[:3]] == [q.shape, k.shape, v.shape]
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    sink_leaf = None if sinks is None else sinks.detach().double().requires_grad_()
    want = reference_attention(*leaves, head_patterns, causal=causal, scale=scale, softcap=softcap, sinks=sink_leaf)
    inputs = leaves + ([sink_leaf] if sinks is not None else [])
    if want.requires_grad:  # (not where every head is Skip "zero": nothing moves the output)
        want = torch.autograd.grad((want * weights.double()).sum(), inputs, allow_unused=True, materialize_grads=True)
    else:
        want = [torch.zeros_like(t) for t in inputs]
    if sinks is not None:  # a -inf sink takes no weight: gradient 0 (float64 autograd gives NaN on empty rows)
        want = (*want[:3], want[3].masked_fill(torch.isinf(sinks), 0.0))
    tol = TOLERANCE[q.dtype]
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), got, want):
        assert bool(torch.isfinite(a).all()), name
        scale_of = float(b.abs().max()) if q.dtype != torch.float32 else 1.0  # half precision: relative to the size
        torch.testing.assert_close(a.double(), b, atol=tol * max(1.0, scale_of), rtol=tol, msg=lambda m: f"{name}: {m}")
    return got


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_matches_float64_gradients(family, causal):
    """Each family's two heads in one launch, next to a window head and a Skip "mean" head; kv heads
    shared across families (GQA: each kv head's gradient sums heads of two launches); Sq != Sk."""
    q, k, v, weights = _inputs(1, 4, 2, 45, 48, 16, seed=len(family))
    _check(q, k, v, weights, (*FAMILIES[family], P.Window(3, 3), P.Skip("mean")), causal=causal)


@pytest.mark.parametrize("Sq, Sk, causal, softcap, sinks", [
    (1, 37, True, 0.0, True),      # one query (a decoding step)
    (37, 1, False, 5.0, False),    # one key
    (45, 20, True, 0.0, True),     # Sq > Sk: the causal rule leaves the first rows no key
    (33, 33, False, 4.0, True),
])
def test_odd_lengths_soft_cap_and_sinks(Sq, Sk, causal, softcap, sinks):
    q, k, v, weights = _inputs(2, 4, 1, Sq, Sk, 16, seed=Sq * Sk)
    sink_logits = torch.tensor([0.5, -1.0, float("-inf"), 2.0]) if sinks else None  # -inf: that head has none
    patterns = (P.Window(6, 2), P.Columns([(0, 3)]) | P.Window(2, 0), P.Dense(), P.Skip("zero"))
    _check(q, k, v, weights, patterns, causal=causal, softcap=softcap, sinks=sink_logits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    q, k, v, weights = _inputs(1, 2, 2, 40, 40, 32, dtype=dtype, seed=3)
    _check(q, k, v, weights, (P.Window(8, 0), P.AShape(4, 8)), causal=True)


def test_default_tiles_and_head_dims_that_are_not_powers_of_two():
    """The default tiles (64 x 32 for dQ, 32 x 64 for dK / dV in fp32 they are smaller: here half
    precision's, shrunk to the lengths) and a head dim of 24 (loads padded to 32), Dv = D."""
    q, k, v, weights = _inputs(1, 2, 1, 70, 90, 24, dtype=torch.float16, seed=5)
    _check(q, k, v, weights, (P.MultiDiagonal([-30, 0], 3), P.Dense()), causal=False, tiles=None)


def test_rows_that_keep_no_key_get_zero_gradients():
    """A pattern that keeps nothing in range and rows the causal rule empties: zeros, never NaN."""
    q, k, v, weights = _inputs(1, 2, 2, 30, 20, 16, seed=7)
    dq, dk, dv, _ = _check(q, k, v, weights, (P.Columns([(40, 50)]), P.Window(0, 0)), causal=True)
    assert float(dq[:, 0].abs().max()) == 0.0 and float(dk[:, 0].abs().max()) == 0.0
    assert float(dq[:, 1, :10].abs().max()) == 0.0  # rows 0..9: no key j <= i - 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gqa_sums_a_kv_heads_query_heads_in_one_program(dtype):
    """GQA, 3 query heads a kv head: kv head 0's heads share a family (one program a key block sums
    them, storing dK / dV in the inputs' dtype), kv head 1's are all Skip (dK 0, dV the "mean"
    heads' closed form, summed); and the same heads with kv head 1 also in a family (two writers:
    the launches add in float32)."""
    q, k, v, weights = _inputs(2, 6, 2, 37, 41, 16, dtype=dtype, seed=11)
    one_writer = (P.Window(5, 1), P.Window(2, 8), P.Window(0, 0), P.Skip("mean"), P.Skip("zero"), P.Skip("mean"))
    two_writers = one_writer[:4] + (P.Columns([(3, 9)]), P.Skip("mean"))
    for head_patterns, accumulate in ((one_writer, False), (two_writers, True)):
        calls = atb.backward_kernel_calls(weights, q, k, v, weights, head_patterns, causal=True, scale=0.25,
                                          tiles=SMALL)
        dkdv = [c for c in calls if c.kernel.endswith("dkdv_kernel")]
        assert [c.grid[1] for c in dkdv] == [2] * len(dkdv)  # batch 2 x one kv head a launch
        assert {c.kwargs["ACCUMULATE"] for c in dkdv} == {accumulate}
        _, dk, dv, _ = _check(q, k, v, weights, head_patterns, causal=True, scale=0.25)
        assert (float(dk[:, 1].abs().max()) > 0.0) == accumulate  # only a kernel's head moves kv head 1's keys
        assert float(dv[:, 1].abs().max()) > 0.0


@st.composite
def backward_case(draw):
    """Random patterns (the forward's property test's: every family, unions with block layouts, Skip)
    and shapes, GQA, causal or not, a soft cap or sinks."""
    Sq, Sk = draw(st.integers(1, 60)), draw(st.integers(1, 60))
    Hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    heads = tuple(draw(pattern_strategy(Sq, Sk)) for _ in range(Hkv * group))
    softcap = draw(st.sampled_from([0.0, 0.0, 3.0]))
    sinks = draw(st.one_of(st.none(), st.lists(st.floats(-3, 3), min_size=Hkv * group, max_size=Hkv * group)))
    return Sq, Sk, Hkv, group, heads, draw(st.booleans()), softcap, sinks, draw(st.integers(0, 2**16))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(backward_case())
def test_random_patterns_and_shapes(case):
    Sq, Sk, Hkv, group, heads, causal, softcap, sinks, seed = case
    q, k, v, weights = _inputs(1, Hkv * group, Hkv, Sq, Sk, 16, seed=seed)
    _check(q, k, v, weights, heads, causal=causal, softcap=softcap,
           sinks=None if sinks is None else torch.tensor(sinks))


def test_sparsec_attention_and_the_op_run_the_triton_backward(monkeypatch):
    """After Triton's forward, sparsec.attention's gradients come from the Triton backward; so do the
    op's without a mask (SPARSEC_ATTENTION_BACKEND=triton stands for CUDA here); with a mask, the
    op's come from attention_grads."""
    import sparsec.ops as ops

    ran = {"triton": 0, "torch": 0}
    real_triton, real_torch = atb.triton_attention_backward, ops.attention_grads

    def count(name, fn):
        def counted(*args, **kwargs):
            ran[name] += 1
            return fn(*args, **kwargs)
        return counted
    monkeypatch.setattr(atb, "triton_attention_backward", count("triton", real_triton))
    monkeypatch.setattr(ops, "attention_grads", count("torch", real_torch))
    q, k, v, weights = _inputs(1, 2, 1, 24, 24, 16, seed=11)
    patterns = (P.Window(4, 0), P.Dense())
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad((sparsec.attention(*leaves, patterns, causal=True, backend="triton") * weights).sum(),
                              leaves)
    assert ran == {"triton": 1, "torch": 0}
    monkeypatch.setenv("SPARSEC_ATTENTION_BACKEND", "triton")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = torch.ops.sparsec.attention(*leaves, None, 0.25, True, patterns_to_json(patterns))
    op_grads = torch.autograd.grad((out * weights).sum(), leaves)
    assert ran == {"triton": 2, "torch": 0}
    for a, b in zip(got, op_grads):
        torch.testing.assert_close(a, b)
    mask = torch.ones(1, 1, 24, 24, dtype=torch.bool)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = torch.ops.sparsec.attention(*leaves, mask, 0.25, True, patterns_to_json(patterns))
    torch.autograd.grad((out * weights).sum(), leaves)
    assert ran == {"triton": 2, "torch": 1}


def test_sinks_of_any_layout_reach_the_kernels_as_one_logit_a_head(monkeypatch):
    """A strided sinks tensor (found by fuzzing: the op passed its view, and the kernel read logit h
    at offset h) gives the gradients of the same values contiguous, through the op and directly."""
    monkeypatch.setenv("SPARSEC_ATTENTION_BACKEND", "triton")
    q, k, v, weights = _inputs(1, 2, 2, 8, 8, 16, seed=13)
    strided = torch.tensor([[0.0, 5.0], [1.0, 5.0]])[:, 0]
    text = patterns_to_json((P.Dense(), P.Dense()))
    grads = []
    for sinks in (strided, strided.contiguous()):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
        out = torch.ops.sparsec.attention(*leaves[:3], None, 0.25, False, text, 0, 0, "", "", 0.0, None, leaves[3])
        grads.append(torch.autograd.grad((out * weights).sum(), leaves))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    out = at.triton_attention(q, k, v, (P.Dense(),) * 2, causal=False, scale=0.25, sinks=strided.contiguous())
    direct = atb.triton_attention_backward(weights, q, k, v, out, (P.Dense(),) * 2, causal=False, scale=0.25,
                                           sinks=strided)
    torch.testing.assert_close(direct[3], grads[1][3])


def test_kernel_source_is_readable_and_unknown_families_are_refused():
    source = atb.backward_kernel_source("window")
    assert "def attention_window_backward_dq_kernel(" in source
    assert "def attention_window_backward_dkdv_kernel(" in source
    assert "def _keep(" in source and "_attend_block" not in source  # the mask, not the forward's walk
    with pytest.raises(ValueError, match="frames_transposed"):
        atb.backward_kernel_source("frames_transposed")
    with pytest.raises(ValueError, match="no attention backward kernels for family 'nope'"):
        atb.backward_kernel_source("nope")


def test_what_the_backward_cannot_run_is_named():
    q, k, v, weights = _inputs(1, 2, 1, 32, 32, 16)
    transposed = FramesTransposed(P.MultiDiagonal([0], 1), 8)
    assert "frame-transposed" in atb.backward_supports(q, k, v, (transposed, P.Dense()))
    assert "3 patterns for 2 query heads" in atb.backward_supports(q, k, v, (P.Dense(),) * 3)
    with pytest.raises(ValueError, match=r"grad_out has shape \(1, 2, 31, 16\)"):
        atb.triton_attention_backward(weights[:, :, :31], q, k, v, weights, (P.Dense(),) * 2, causal=False,
                                      scale=0.25)


def test_a_compiled_layer_trains_through_the_triton_backward(monkeypatch):
    """torch.compile(backend="sparsec") with patterns, its attention op on the Triton kernels
    (SPARSEC_ATTENTION_BACKEND=triton, as on CUDA): the traced backward runs the Triton backward on
    the saved output, and the parameters' gradients match float64 autograd of the masked reference."""
    from test_backend_compile import Wrapper, _reference_one_layer, compiled

    ran = []
    real = atb.triton_attention_backward
    monkeypatch.setattr(atb, "triton_attention_backward", lambda *a, **k: ran.append(1) or real(*a, **k))
    monkeypatch.setenv("SPARSEC_ATTENTION_BACKEND", "triton")
    torch.manual_seed(5)
    model, x = Wrapper(), torch.randn(2, 20, 32)
    head_patterns = [P.Window(3, 0), P.Skip("mean"), P.Columns([0, (4, 6)]) | P.Window(1, 0), P.Dense()]
    torch._dynamo.reset()
    try:
        out = compiled(model, attention_patterns={"attn": head_patterns})(x)
    finally:  # Dynamo remembers the shapes Wrapper.forward ran at (test_backend_compile counts its recompiles)
        torch._dynamo.reset()
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, list(model.parameters()), grad_out)
    assert ran == [1]
    reference = copy.deepcopy(model).double()
    want = torch.autograd.grad(_reference_one_layer(reference.attn, x.double(), head_patterns),
                               list(reference.parameters()), grad_out.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


def _counting(monkeypatch) -> dict:
    """Counts the Triton backward's calls and attention_grads' (the torch backward) through the op."""
    import sparsec.ops as ops

    ran = {"triton": 0, "torch": 0}
    for module, name, key in ((atb, "triton_attention_backward", "triton"), (ops, "attention_grads", "torch")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, key=key, **k: ran.__setitem__(key, ran[key] + 1)
                            or real(*a, **k))
    monkeypatch.setenv("SPARSEC_ATTENTION_BACKEND", "triton")
    return ran


@pytest.mark.parametrize("kind", ["padded keys", "causal prefix", "right padded", "float mask"])
def test_masks_that_cut_keys_to_prefixes_train_through_the_triton_backward(kind, monkeypatch):
    """The op under a mask that runs its patterns on key prefixes (sparsec/key_prefix_grads.py): each
    run of rows through the Triton backward, against float64 autograd of the references; a
    right-padded causal batch's padding queries (the forward's explicit scores) through
    attention_grads on those rows only; a float mask of 0 and its lowest value that needs no
    gradient, as the bool mask."""
    import test_key_padding as kp

    ran = _counting(monkeypatch)
    Sq, lengths = {"causal prefix": (40, [40, 52, 45]), "right padded": (40, [40, 31, 9])}.get(kind,
                                                                                                (kp.S, [70, 48, 48]))
    Sk = {"causal prefix": max(lengths) + 3, "right padded": Sq}.get(kind, kp.S)
    q = kp._random(kp.B, kp.H, Sq, kp.D, seed=7).requires_grad_()
    k, v = (kp._random(kp.B, 2, Sk, kp.D, seed=s).requires_grad_() for s in (8, 9))  # GQA
    prefix = kp._prefix(lengths, Sk)[:, None, None, :]
    mask = {"causal prefix": kp._causal_prefix(Sq, lengths), "right padded": kp._right_padded(Sq, lengths),
            "float mask": torch.zeros(prefix.shape).masked_fill(~prefix, kp.LOWEST)}.get(kind, prefix)
    patterns = (P.Window(4, 0), P.Skip("mean"), P.AShape(2, 3), P.Columns([(0, 3), (25, 40)]))
    out = torch.ops.sparsec.attention(q, k, v, mask, kp.D ** -0.5, False, patterns_to_json(patterns))
    weights = kp._random(*out.shape, seed=10)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    runs = len(set(lengths))  # rows of one length run together
    padded = sum(n < Sq for n in set(lengths)) if kind == "right padded" else 0  # runs with padding queries
    assert ran == {"triton": runs, "torch": padded}
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = {"causal prefix": lambda: kp._causal_reference(q64, k64, v64, patterns, lengths),
            "right padded": lambda: kp._explicit_reference(q64, k64, v64, patterns, mask[:, 0])}.get(
        kind, lambda: reference_attention(q64, k64, v64, patterns, key_mask=kp._prefix(lengths, Sk)))()
    for g, w in zip(grads, torch.autograd.grad((want * weights.double()).sum(), (q64, k64, v64))):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5)


def test_a_right_padded_batch_with_sinks_and_a_soft_cap_matches_the_torch_backward(monkeypatch):
    """Right padding with sinks and a soft cap: the Triton backward on each run's real queries plus
    attention_grads on its padding queries give what attention_grads gives for the whole call."""
    import test_key_padding as kp

    Sq, lengths = 40, [40, 31, 9]
    q = kp._random(kp.B, kp.H, Sq, kp.D, seed=17)
    k, v = (kp._random(kp.B, 2, Sq, kp.D, seed=s) for s in (18, 19))
    sinks = torch.tensor([0.5, -1.0, 2.0, float("-inf")])
    mask = kp._right_padded(Sq, lengths)
    patterns = (P.Window(4, 0), P.Skip("mean"), P.AShape(2, 3) | P.Columns([(20, 24)]), P.Dense())
    weights = kp._random(kp.B, kp.H, Sq, kp.D, seed=20)
    grads = {}
    for backend in ("triton", "cpu"):
        monkeypatch.setenv("SPARSEC_ATTENTION_BACKEND", backend)
        leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
        out = torch.ops.sparsec.attention(*leaves[:3], mask, 0.3, False, patterns_to_json(patterns), 0, 0, "", "",
                                          5.0, None, leaves[3])
        grads[backend] = torch.autograd.grad((out * weights).sum(), leaves)
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), grads["triton"], grads["cpu"]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=lambda m: f"{name}: {m}")


def test_left_padded_rows_train_through_the_triton_backward(monkeypatch):
    """A left-padded batch: each row's own tokens through the Triton backward; its padding queries and
    keys get zero gradients."""
    import test_left_padding as lp

    ran = _counting(monkeypatch)
    S, pads = 70, [0, 21, 40]
    q = lp._random(3, lp.H, S, lp.D, seed=1).requires_grad_()
    k, v = (lp._random(3, lp.HKV, S, lp.D, seed=s).requires_grad_() for s in (2, 3))
    patterns = lp._heads(S, seed=4)
    out = torch.ops.sparsec.attention(q, k, v, lp.left_padded(S, pads), lp.SCALE, False, patterns_to_json(patterns),
                                      0, 0, "", "causal:0")
    weights = lp._random(*out.shape, seed=5)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    assert ran == {"triton": 3, "torch": 0}
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = lp._left_padded_reference(q64, k64, v64, patterns, pads)
    for g, w in zip(grads, torch.autograd.grad((want * weights.double()).sum(), (q64, k64, v64))):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5)


def test_a_float_masks_own_gradient_comes_from_the_torch_backward(monkeypatch):
    """Where the float mask needs a gradient, attention_grads computes the call (it has dS); where
    nothing needs it, the op returns none."""
    import test_key_padding as kp

    ran = _counting(monkeypatch)
    q, k, v = (kp._random(1, 2, 30, 16, seed=s).requires_grad_() for s in (1, 2, 3))
    keep = kp._prefix([22], 30)[:, None, None, :]
    bias = torch.zeros(keep.shape).masked_fill(~keep, kp.LOWEST).requires_grad_()
    out = torch.ops.sparsec.attention(q, k, v, bias, 0.25, False, patterns_to_json((P.Window(3, 3),) * 2))
    dq, dbias = torch.autograd.grad(out.sum(), (q, bias))
    assert ran == {"triton": 0, "torch": 1} and dbias.shape == bias.shape and float(dbias[..., :22].abs().max()) > 0
