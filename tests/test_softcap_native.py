"""Attention-logit soft-capping (Gemma 2's softcap) in the native CPU kernels
(codegen/native/interval_attention.cpp through codegen.attention_cpu_native.run_native): every
score s = scale q.k becomes softcap * tanh(s / softcap) before the mask and the softmax, on each
kernel path (interval pieces, groups of pieces, block runs, columns and slashes); softcap = 0 is
no capping. Exact against a float64 reference built from explicit masks."""
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

pytestmark = pytest.mark.skipif(native_kernel() is None, reason="native kernel not built: "
                                + native_build.native_status("interval_attention"))

SOFTCAPS = [0.0, 5.0, 30.0]
B, HQ, HKV, D, DV = 2, 4, 2, 32, 24  # GQA, Dv != D
SCALE = D ** -0.5
SPREAD = 10.0  # q's size: scale q.k has standard deviation ~10, so the largest scores reach ~50
TOLERANCE = 5e-5  # fp32 scores of ~50 carry ~4e-6 of rounding (measured: within a fifth of this)


def capped_reference(q, k, v, keep, scale, softcap, sinks=None):
    """float64: scores = scale q k^T, capped (softcap * tanh(scores / softcap), softcap > 0), masked
    by `keep` (Sq, Sk), then a softmax over [kept scores..., sinks[h]] (no sink column for sinks
    None: GPT-OSS's per-head logits, test_sinks_native) whose sink column is dropped, @ v; a row
    that keeps no key gives 0."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~keep, -math.inf)
    if sinks is not None:
        z = sinks.double().view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        scores = torch.cat([scores, z], dim=-1)
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # no key and no sink: NaN, made 0
    if sinks is not None:
        weights = weights[..., :-1]
    return (weights @ v).masked_fill(~keep.any(-1)[:, None], 0.0)


def lengths(rng):
    """Sq, Sk up to 300 (odd ones likely, Sq != Sk mostly)."""
    Sq = int(rng.integers(1, 301))
    Sk = int(rng.integers(max(1, Sq - 80), 301))  # causal with Sk < Sq leaves early rows no key: 0
    return Sq, Sk


def columns(rng, Sk, runs):
    starts = sorted(rng.choice(Sk, size=min(runs, Sk), replace=False).tolist())
    return [(int(a), int(min(Sk, a + rng.integers(1, 12)))) for a in starts]


def band_offsets(rng, count):
    return sorted(set(rng.integers(-120, 40, size=count).tolist()))


# form -> (rng, Sq, Sk) -> pattern; each is the kernel path native_form names for it
FORMS = {
    "window": lambda rng, Sq, Sk: P.Window(int(rng.integers(0, 70)), int(rng.integers(0, 70))),
    "ashape": lambda rng, Sq, Sk: P.AShape(int(rng.integers(1, 20)), int(rng.integers(0, 60))),
    "dense": lambda rng, Sq, Sk: P.Dense(),  # causal: a prefix a row
    "columns": lambda rng, Sq, Sk: P.Columns(columns(rng, Sk, 2)),
    "window_and_columns": lambda rng, Sq, Sk: P.Window(int(rng.integers(0, 30)), 0) | P.Columns(columns(rng, Sk, 1)),
    "blocks": lambda rng, Sq, Sk: random_blocks(Sq, Sk, int(rng.choice([16, 32, 64])), int(rng.choice([16, 32, 64])),
                                                0.4, torch.Generator().manual_seed(int(rng.integers(1 << 30)))),
    "vertical_slash": lambda rng, Sq, Sk: P.VerticalSlash(columns(rng, Sk, 3), band_offsets(rng, 10)),
}
EXPECTED_FORM = {"blocks": "blocks", "vertical_slash": "slashes"}


def operands(rng, Sq, Sk):
    generator = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    q = torch.randn(B, HQ, Sq, D, generator=generator) * SPREAD
    k, v = torch.randn(B, HKV, Sk, D, generator=generator), torch.randn(B, HKV, Sk, DV, generator=generator)
    return q, k, v


def run(q, k, v, pattern, causal, softcap, heads=None):
    """run_native as the CPU executor calls it (attention_cpu._sparse_heads), into a NaN-filled out
    (heads not listed stay NaN)."""
    heads = list(range(q.shape[1])) if heads is None else heads
    out = torch.full((*q.shape[:3], v.shape[-1]), math.nan)
    run_native(q.contiguous(), k.contiguous(), v.contiguous(), out, heads, pattern, causal, SCALE, threads=2,
               softcap=softcap)
    return out


@pytest.mark.parametrize("softcap", SOFTCAPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("form", list(FORMS))
def test_softcap_matches_the_masked_reference(form, causal, softcap):
    rng = np.random.default_rng([list(FORMS).index(form), causal, int(softcap)])
    for _ in range(3):  # shapes
        keep = None
        while keep is None or keep.sum(1).max() < 2:  # where capping can change the softmax
            Sq, Sk = lengths(rng)
            pattern = FORMS[form](rng, Sq, Sk)
            keep = allowed(pattern, Sq, Sk, causal)
        assert native_form(pattern, Sq, Sk, causal) == EXPECTED_FORM.get(form, "intervals")
        q, k, v = operands(rng, Sq, Sk)
        expected = capped_reference(q, k, v, keep, SCALE, softcap)
        out = run(q, k, v, pattern, causal, softcap)
        torch.testing.assert_close(out.double(), expected, atol=TOLERANCE, rtol=TOLERANCE,
                                   msg=lambda m: f"{pattern!r} {Sq}x{Sk}: {m}")


@pytest.mark.parametrize("softcap", SOFTCAPS)
@pytest.mark.parametrize("causal", [False, True])
def test_softcap_in_groups_of_pieces(causal, softcap):
    """A temporal head in frame-transposed order: most of its pieces run in groups (attend_group),
    one pass under their mask. q, k, v gathered into that order, the output back (as
    attention_cpu._native_transposed_heads), against the natural-order reference."""
    frame, frames = 24, 9
    S = frame * frames
    base = P.MultiDiagonal([f * frame + r for f in range(-frames + 1, frames) for r in (-5, 0, 5)], 2)
    pattern = FramesTransposed(base, frame)
    assert native_form(pattern, S, S, causal) == "intervals"
    rng = np.random.default_rng([7, causal, int(softcap)])
    q, k, v = operands(rng, S, S)
    index = natural_index(S, frame)  # transposed position x holds natural token index[x]
    out_t = run(*(x[:, :, index] for x in (q, k, v)), pattern, causal, softcap)
    out = torch.empty_like(out_t)
    out[:, :, index] = out_t
    expected = capped_reference(q, k, v, allowed(base, S, S, causal), SCALE, softcap)
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.parametrize("pattern", [
    P.Window(40, 0), random_blocks(200, 200, 32, 32, 0.5, torch.Generator().manual_seed(0)),
    P.VerticalSlash([(0, 3)], [0, -1, -9])], ids=["intervals", "blocks", "slashes"])
def test_softcap_changes_the_result_and_zero_is_no_capping(pattern):
    """The scores are large enough that capping matters; softcap 0 gives bit for bit the result
    without the argument; other heads are left alone."""
    q, k, v = operands(np.random.default_rng(3), 200, 200)
    plain = run(q, k, v, pattern, True, 0.0, heads=[0, 3])
    default = torch.full_like(plain, math.nan)
    run_native(q, k, v, default, [0, 3], pattern, True, SCALE, threads=2)
    assert torch.equal(plain[:, [0, 3]], default[:, [0, 3]]) and plain[:, [1, 2]].isnan().all()
    capped = run(q, k, v, pattern, True, 5.0, heads=[0, 3])
    assert (capped[:, [0, 3]] - plain[:, [0, 3]]).abs().max() > 0.1 and capped[:, [1, 2]].isnan().all()


@pytest.mark.parametrize("softcap", [-1.0, math.nan, math.inf])
def test_the_kernels_refuse_a_softcap_out_of_range(softcap):
    q, k, v = operands(np.random.default_rng(4), 40, 40)
    for pattern in (P.Window(4, 4), random_blocks(40, 40, 16, 16, 0.5), P.VerticalSlash([], [0, -1])):
        with pytest.raises(RuntimeError, match="refused its arguments"):
            run(q, k, v, pattern, False, softcap)
