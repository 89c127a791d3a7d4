"""Attention sinks (GPT-OSS's learned per-head sink logits) in the native CPU kernels
(codegen/native/interval_attention.cpp through codegen.attention_cpu_native.run_native): query
head h's rows take one more softmax logit z_h that has no value, out_i = sum_j exp(s_ij) v_j /
(sum_j exp(s_ij) + exp(z_h)) over the keys row i keeps, on each kernel path (interval pieces,
groups of pieces, block runs, columns and slashes), alone and with softcap (which caps the scores,
never the sink). z_h = -inf is no sink for head h; sinks=None is no sinks at all; a row that keeps
no key gives 0 either way. Exact against a float64 reference built from explicit masks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sparsec.patterns as P
from sparsec.codegen import native_build
from sparsec.codegen.attention_cpu_native import native_form, native_kernel, run_native
from sparsec.codegen.frame_order import FramesTransposed, natural_index
from test_attention_cpu_native import allowed, random_blocks  # the masks' rule, random block layouts
from test_softcap_native import EXPECTED_FORM, FORMS, capped_reference, lengths  # every kernel path's patterns

pytestmark = pytest.mark.skipif(native_kernel() is None, reason="native kernel not built: "
                                + native_build.native_status("interval_attention"))

B, HQ, HKV, D, DV = 2, 4, 2, 32, 24  # GQA, Dv != D
SCALE = D ** -0.5
SPREAD = 3.0  # q's size: scale q.k has standard deviation ~3, the sinks' scale (sinks())
SINK_SPREAD = 3.0
TOLERANCE = 5e-5
# name -> (sinks?, softcap): none, sinks (head 1's -inf: no sink there), sinks with the scores capped
MODES = {"none": (False, 0.0), "sinks": (True, 0.0), "sinks_softcap": (True, 5.0)}


def sinks(rng):
    """(HQ,) float32 sink logits ~ N(0, SINK_SPREAD^2), but head 1's -inf (no sink for it) and head
    3's at least SINK_SPREAD (around a row's largest score: a sink that takes much of the mass)."""
    z = torch.tensor(rng.normal(0.0, SINK_SPREAD, size=HQ), dtype=torch.float32)
    z[1] = -math.inf
    z[3] = z[3].abs() + SINK_SPREAD
    return z


def operands(rng, Sq, Sk):
    generator = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    q = torch.randn(B, HQ, Sq, D, generator=generator) * SPREAD
    k, v = torch.randn(B, HKV, Sk, D, generator=generator), torch.randn(B, HKV, Sk, DV, generator=generator)
    return q, k, v


def run(q, k, v, pattern, causal, softcap, sinks, heads=None):
    """run_native as the CPU executor calls it, into a NaN-filled out (heads not listed stay NaN)."""
    heads = list(range(q.shape[1])) if heads is None else heads
    out = torch.full((*q.shape[:3], v.shape[-1]), math.nan)
    run_native(q.contiguous(), k.contiguous(), v.contiguous(), out, heads, pattern, causal, SCALE, threads=2,
               softcap=softcap, sinks=sinks)
    return out


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("form", list(FORMS))
def test_sinks_match_the_masked_reference(form, causal, mode):
    with_sinks, softcap = MODES[mode]
    rng = np.random.default_rng([list(FORMS).index(form), causal, list(MODES).index(mode), 11])
    for _ in range(3):  # shapes
        keep = None
        while keep is None or keep.sum(1).max() < 2:
            Sq, Sk = lengths(rng)
            pattern = FORMS[form](rng, Sq, Sk)
            keep = allowed(pattern, Sq, Sk, causal)
        assert native_form(pattern, Sq, Sk, causal) == EXPECTED_FORM.get(form, "intervals")
        q, k, v = operands(rng, Sq, Sk)
        z = sinks(rng) if with_sinks else None
        expected = capped_reference(q, k, v, keep, SCALE, softcap, z)
        out = run(q, k, v, pattern, causal, softcap, z)
        torch.testing.assert_close(out.double(), expected, atol=TOLERANCE, rtol=TOLERANCE,
                                   msg=lambda m: f"{pattern!r} {Sq}x{Sk} sinks {z}: {m}")
        if with_sinks:  # the sinks change the result far past the tolerance, in the heads that have one only
            without = capped_reference(q, k, v, keep, SCALE, softcap, None)
            assert (expected - without)[:, [0, 2, 3]].abs().max() > 20 * TOLERANCE
            torch.testing.assert_close(expected[:, 1], without[:, 1])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("causal", [False, True])
def test_sinks_in_groups_of_pieces(causal, mode):
    """A temporal head in frame-transposed order: most of its pieces run in groups (attend_group).
    q, k, v gathered into that order, the output back, against the natural-order reference."""
    with_sinks, softcap = MODES[mode]
    frame, frames = 24, 9
    S = frame * frames
    base = P.MultiDiagonal([f * frame + r for f in range(-frames + 1, frames) for r in (-5, 0, 5)], 2)
    pattern = FramesTransposed(base, frame)
    assert native_form(pattern, S, S, causal) == "intervals"
    rng = np.random.default_rng([8, causal, list(MODES).index(mode)])
    q, k, v = operands(rng, S, S)
    z = sinks(rng) if with_sinks else None
    index = natural_index(S, frame)  # transposed position x holds natural token index[x]
    out_t = run(*(x[:, :, index] for x in (q, k, v)), pattern, causal, softcap, z)
    out = torch.empty_like(out_t)
    out[:, :, index] = out_t
    expected = capped_reference(q, k, v, allowed(base, S, S, causal), SCALE, softcap, z)
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE, rtol=TOLERANCE)


NO_KEY_CASES = [  # patterns where some rows keep no key
    (P.Window(130, 0), 300, 200),  # causal, Sk < Sq: the first 100 rows keep nothing
    (P.BlockSparse(torch.tensor([[True, False], [False, False], [False, True]]), 64), 160, 128),  # tile 1: none
    (P.VerticalSlash([], [-150, -3]), 200, 200),  # slashes only: rows < 3 keep nothing
    (P.Columns([(150, 160)]), 220, 200),  # rows whose causal limit is before the column
]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("pattern, Sq, Sk", NO_KEY_CASES, ids=["window", "blocks", "slashes", "columns"])
def test_a_row_that_keeps_no_key_gives_exactly_zero(pattern, Sq, Sk, mode):
    with_sinks, softcap = MODES[mode]
    keep = allowed(pattern, Sq, Sk, True)
    empty = ~keep.any(1)
    assert empty.any() and keep.any()
    rng = np.random.default_rng([9, list(MODES).index(mode)])
    q, k, v = operands(rng, Sq, Sk)
    z = sinks(rng) if with_sinks else None
    out = run(q, k, v, pattern, True, softcap, z)
    assert not out.isnan().any()
    assert (out[:, :, empty] == 0).all()
    torch.testing.assert_close(out.double(), capped_reference(q, k, v, keep, SCALE, softcap, z), atol=TOLERANCE,
                               rtol=TOLERANCE)


@pytest.mark.parametrize("pattern", [
    P.Window(40, 0), random_blocks(200, 200, 32, 32, 0.5, torch.Generator().manual_seed(0)),
    P.VerticalSlash([(0, 3)], [0, -1, -9])], ids=["intervals", "blocks", "slashes"])
def test_sinks_by_global_head_and_none_or_minus_inf_is_no_sink(pattern):
    """A listed head takes its own sink (sinks[h], h the global query head, not its place in the
    list); the others are left alone. sinks=None, the argument left out and every sink -inf give
    bit for bit the same result."""
    rng = np.random.default_rng(3)
    q, k, v = operands(rng, 200, 200)
    keep = allowed(pattern, 200, 200, True)
    plain = run(q, k, v, pattern, True, 0.0, None, heads=[3, 0])
    default = torch.full_like(plain, math.nan)
    run_native(q, k, v, default, [3, 0], pattern, True, SCALE, threads=2)
    off = run(q, k, v, pattern, True, 0.0, torch.full((HQ,), -math.inf), heads=[3, 0])
    assert torch.equal(plain[:, [0, 3]], default[:, [0, 3]]) and torch.equal(plain[:, [0, 3]], off[:, [0, 3]])
    assert plain[:, [1, 2]].isnan().all() and off[:, [1, 2]].isnan().all()
    z = torch.tensor([2.0, 0, -1.0, 0, 0.5, 0, 4.0, 0], dtype=torch.float64)[::2]  # float64, strided
    with_sinks = run(q, k, v, pattern, True, 0.0, z, heads=[3, 0])
    assert with_sinks[:, [1, 2]].isnan().all()
    assert (with_sinks[:, [0, 3]] - plain[:, [0, 3]]).abs().max() > 0.1
    expected = capped_reference(q, k, v, keep, SCALE, 0.0, z.float())
    torch.testing.assert_close(with_sinks[:, [0, 3]].double(), expected[:, [0, 3]], atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_the_kernels_refuse_a_sink_of_inf_or_nan(bad):
    q, k, v = operands(np.random.default_rng(4), 40, 40)
    z = torch.zeros(HQ)
    z[2] = bad
    for pattern in (P.Window(4, 4), random_blocks(40, 40, 16, 16, 0.5), P.VerticalSlash([], [0, -1])):
        with pytest.raises(RuntimeError, match="refused its arguments"):
            run(q, k, v, pattern, False, 0.0, z, heads=[0])  # checked for every head, listed or not
        with pytest.raises(ValueError, match="one per query head"):
            run(q, k, v, pattern, False, 0.0, torch.zeros(HQ + 1))
