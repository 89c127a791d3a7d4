"""Patterns the CPU executor runs as disjoint parts merged by log-sum-exp
(codegen/attention_cpu_choice.py), against the float64 reference built from pattern.mask()."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsec import patterns as P
from sparsec.codegen import attention_cpu
from sparsec.codegen.attention_cpu import cpu_attention
from sparsec.codegen.attention_cpu_choice import band_parts, choose_split
from reference import reference_attention

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def check(head_patterns, *, B=1, Hkv=None, Sq=61, Sk=61, D=16, causal=False, dtype=torch.float32, block_m=8,
          seed=0):
    """cpu_attention with every pattern of bands far apart run as parts (split=True: short test
    sequences would not split by the estimate, which is tested at the lengths where they do)."""
    torch.manual_seed(seed)
    Hq = len(head_patterns)
    q = torch.randn(B, Hq, Sq, D, dtype=dtype)
    k = torch.randn(B, Hkv or Hq, Sk, D, dtype=dtype)
    v = torch.randn(B, Hkv or Hq, Sk, D, dtype=dtype)
    scale = 1.0 / math.sqrt(D)
    out = cpu_attention(q, k, v, tuple(head_patterns), causal=causal, scale=scale, block_m=block_m, split=True)
    expected = reference_attention(q, k, v, head_patterns, causal=causal, scale=scale)
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    return out


def runs_split(pattern, S, *, rows=8, width=128) -> bool:
    return len(choose_split(pattern, S, S, False, rows=rows, width=width, threads=2, native=False)[1]) > 1


bands = st.one_of(
    st.builds(P.MultiDiagonal, st.lists(st.integers(-40, 40), min_size=1, max_size=6), st.integers(0, 5)),
    st.builds(P.Window, st.integers(0, 6), st.integers(0, 6)),
)


@given(parts=st.lists(bands, min_size=1, max_size=3))
@settings(max_examples=80, deadline=None)
def test_band_parts_are_disjoint_and_cover_the_pattern(parts):
    parts = list(dict.fromkeys(parts))
    pattern = parts[0] if len(parts) == 1 else P.Union(parts)
    found = band_parts(pattern)
    masks = torch.stack([part.mask(50, 57) for part in found]).to(torch.int32)
    assert torch.equal(masks.sum(dim=0) > 0, pattern.mask(50, 57))
    assert int(masks.sum(dim=0).max()) <= 1  # disjoint


def test_touching_bands_stay_together_and_other_families_stay_whole():
    assert band_parts(P.MultiDiagonal([0, 5], 2)) == (P.MultiDiagonal([0, 5], 2),)  # [-2, 2] and [3, 7] touch
    assert band_parts(P.MultiDiagonal([0, 6, 30], 2)) == (P.MultiDiagonal([0], 2), P.MultiDiagonal([6], 2),
                                                          P.MultiDiagonal([30], 2))
    assert band_parts(P.Window(4, 4) | P.MultiDiagonal([-40, 5, 40], 1)) == (
        P.MultiDiagonal([-40], 1), P.Window(4, 4) | P.MultiDiagonal([5], 1), P.MultiDiagonal([40], 1))
    for pattern in (P.Window(3, 3), P.MultiDiagonal([4], 1), P.VerticalSlash([0], [0, -20]), P.Dense(),
                    P.AShape(4, 8), P.Window(2, 2) | P.Columns([30])):
        assert band_parts(pattern) == (pattern,)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq,Sk", [(61, 61), (45, 70), (70, 33), (1, 40)])
def test_split_patterns_match_the_reference(causal, Sq, Sk):
    pattern = P.MultiDiagonal([-30, -12, -10, 0, 25], 2)
    check([pattern] * 2, B=2, Sq=Sq, Sk=Sk, causal=causal, block_m=8)
    check([pattern, P.Window(3, 0), pattern, pattern], Hkv=2, Sq=Sq, Sk=Sk, causal=causal, block_m=8)
    check([P.Window(5, 2) | P.MultiDiagonal([-33, 20], 1)] * 2, Sq=Sq, Sk=Sk, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_split_dtypes_and_gqa(dtype):
    pattern = P.MultiDiagonal([-24, 0, 20], 1)
    check([pattern] * 4, Hkv=1, Sq=64, Sk=64, dtype=dtype, block_m=16)


def test_gqa_without_the_kernels_kv_broadcast(monkeypatch):
    """Where torch's fused op wants as many K/V heads as query heads, K/V are repeated per head."""
    monkeypatch.setattr(attention_cpu, "_kernel_broadcasts_kv_heads", lambda: False)
    check([P.MultiDiagonal([-20, 0, 20], 1)] * 4, Hkv=2, Sq=48, Sk=48, block_m=16)


def test_rows_with_no_key_in_any_part_are_zero():
    """Causal: the band at +30 is all future keys, and the rows before key 0 of the band at -40
    keep nothing but their own diagonal's neighbours; rows of a part with no key give -inf to the
    merge, and rows with no key at all are 0."""
    pattern = P.MultiDiagonal([-40, 30], 1)
    out = check([pattern], causal=True, block_m=8)
    assert torch.equal(out[0, 0, :39], torch.zeros(39, 16))
    check([P.MultiDiagonal([-40, 0], 1)], Sq=20, Sk=61, causal=True, block_m=8)  # Sq < Sk: causal offset


def test_long_sequences_split_far_bands_and_keep_wide_ones_whole():
    """The decision at the executor's costs on 2 threads (bench: 8 heads, D = 64): video-like bands
    at 10% density run as parts at S = 4096 (1.2x faster measured); bands wide enough that their
    query blocks read overlapping keys (50%), and short sequences, run whole."""
    assert runs_split(P.MultiDiagonal([-1024, -512, 0, 512, 1024], 48), 4096)
    assert not runs_split(P.MultiDiagonal([-1024, -512, 0, 512, 1024], 242), 4096)
    assert not runs_split(P.MultiDiagonal([-256, -128, 0, 128, 256], 30), 1024)  # fixed costs win


@pytest.mark.parametrize("pattern, S", [
    (P.MultiDiagonal([-1024, -512, 0, 512, 1024], 48), 4096),
    (P.MultiDiagonal([-256, -128, 0, 128, 256], 30), 1024),
    (P.MultiDiagonal([k * 128 for k in range(-7, 8)], 2), 1024),  # frame stride 128: transposed order
    (P.Window(16, 16) | P.MultiDiagonal([-700, 700], 8), 2048),
])
def test_the_executor_runs_the_option_the_cost_model_prices_cheapest(pattern, S):
    """choose_split takes the least of the cost model's own estimates (cpu_option_seconds with the
    cpu profile at the kernels' threads): whole at choose_blocks' query block, or the parts at
    any query block, in either token order."""
    from sparsec.codegen.attention_cpu_choice import choose_blocks, frame_parts
    from sparsec.codegen.frame_order import FramesTransposed, frame_candidates
    from sparsec.cost_models.attention_cost import AttentionShape, cpu_option_seconds
    from sparsec.cost_models.hardware import get_profile

    shape = AttentionShape(batch=1, num_heads=8, num_kv_heads=8, q_len=S, kv_len=S, head_dim=64, value_dim=64,
                           dtype="f32")
    hardware = get_profile("cpu").with_cores(2)
    options = [(choose_blocks(pattern, S, S)[0], (pattern,))]
    options += [(bm, band_parts(pattern)) for bm in (32, 64, 128, 256)]
    for frame in frame_candidates(pattern, S, S):
        options.append((choose_blocks(FramesTransposed(pattern, frame), S, S)[0], (FramesTransposed(pattern, frame),)))
        options += [(bm, frame_parts(pattern, frame)) for bm in (32, 64, 128, 256)]
    bm, parts = choose_split(pattern, S, S, False, rows=8, width=128, threads=2)
    chosen = cpu_option_seconds(parts, shape, bm, hardware)
    assert chosen <= min(cpu_option_seconds(o, shape, b, hardware) for b, o in options) * (1 + 1e-9)


def test_forcing_the_way_gives_the_same_result_and_bad_values_are_refused():
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    pattern = (P.MultiDiagonal([-25, 0, 25], 1),) * 2
    assert len(choose_split(pattern[0], 40, 40, False, 8, split=True)[1]) == 3
    assert choose_split(pattern[0], 40, 40, False, 8, split=False)[1] == pattern[:1]
    parts, whole = (cpu_attention(q, k, v, pattern, causal=False, scale=0.3, block_m=8, split=s) for s in (True, False))
    torch.testing.assert_close(parts, whole, atol=2e-6, rtol=2e-6)
    with pytest.raises(ValueError, match="split must be None, True or False"):
        cpu_attention(q, k, v, pattern, causal=False, scale=0.3, split="yes")


@pytest.mark.parametrize("Dv", [8, 24])
def test_parts_with_a_value_head_size_unlike_the_query_head_size(Dv):
    """The fused op that returns the log-sum-exp takes one head size: the executor pads q and k or
    v with zero columns (no score changes) and drops them from the output."""
    torch.manual_seed(5)
    pattern = P.MultiDiagonal([-30, 0, 30], 2)
    q, k = torch.randn(2, 3, 61, 16), torch.randn(2, 3, 61, 16)
    v = torch.randn(2, 3, 61, Dv)
    out = cpu_attention(q, k, v, (pattern,) * 3, causal=True, scale=0.25, block_m=8, split=True)
    expected = reference_attention(q, k, v, (pattern,) * 3, causal=True, scale=0.25)
    assert out.shape == (2, 3, 61, Dv)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)
