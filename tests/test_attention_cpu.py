"""codegen.attention_cpu.cpu_attention against the float64 reference built from pattern.mask()
(tests/reference.py)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsec import patterns as P
from sparsec.codegen import attention_cpu, attention_cpu_plan
from sparsec.codegen.attention_cpu import cpu_attention
from reference import reference_attention
from strategies import PatternBounds, random_layout, skips, unions

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def check(head_patterns, *, B=1, Hkv=None, Sq=37, Sk=37, D=16, Dv=None, causal=False, dtype=torch.float32,
          block_m=None, block_n=None, seed=0):
    torch.manual_seed(seed)
    Hq = len(head_patterns)
    Hkv = Hkv or Hq
    q = torch.randn(B, Hq, Sq, D, dtype=dtype)
    k = torch.randn(B, Hkv, Sk, D, dtype=dtype)
    v = torch.randn(B, Hkv, Sk, Dv or D, dtype=dtype)
    scale = 1.0 / math.sqrt(D)
    out = cpu_attention(q, k, v, tuple(head_patterns), causal=causal, scale=scale, block_m=block_m, block_n=block_n)
    assert out.dtype == dtype and out.shape == (B, Hq, Sq, Dv or D)
    tol = TOLERANCE[dtype]
    expected = reference_attention(q, k, v, head_patterns, causal=causal, scale=scale)
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    return out


def block_sparse(Sq, Sk, block, density=0.4, seed=0):
    return P.BlockSparse(random_layout(Sq, Sk, block, density, seed), block)


FAMILIES = [
    P.Dense(), P.Window(5, 2), P.Window(0, 0), P.MultiDiagonal([-12, 0, 9], 2), P.Columns([(0, 3), (20, 26)]),
    P.AShape(4, 6), P.VerticalSlash([1, (10, 12)], [0, -7]), P.Window(1, 1) | P.Columns([30]),
    P.AShape(2, 3) | P.MultiDiagonal([15], 1), block_sparse(37, 37, (8, 5)), block_sparse(37, 37, (4, 4)) | P.Window(2, 0),
    P.Skip("mean"), P.Skip("zero"),
]


@pytest.mark.parametrize("pattern", FAMILIES, ids=repr)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("blocks", [(None, None), (8, 8), (16, 4)])
def test_every_family(pattern, causal, blocks):
    check([pattern, pattern], B=2, causal=causal, block_m=blocks[0], block_n=blocks[1])


MIX = [P.Window(3, 1), P.Skip("mean"), P.Columns([(0, 2), 9]) | P.Window(0, 0), P.Skip("zero"),
       P.Dense(), P.MultiDiagonal([-4, 4], 1), P.VerticalSlash([1], [0, -3]), P.AShape(2, 2)]


@pytest.mark.parametrize("Sq,Sk", [(13, 13), (5, 17), (17, 6), (1, 9), (1, 1), (45, 29), (64, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_mixed_heads_and_lengths(Sq, Sk, causal):
    check(MIX, B=2, Hkv=4, Sq=Sq, Sk=Sk, causal=causal, block_m=8, block_n=8)
    check(MIX, Hkv=2, Sq=Sq, Sk=Sk, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_dtypes(dtype, causal):
    check(MIX, Hkv=4, Sq=40, Sk=33, causal=causal, dtype=dtype, block_m=8, block_n=16)
    check([P.Dense(), P.Window(4, 4)], Sq=24, Sk=24, causal=causal, dtype=dtype)


def test_value_dim_differs_from_head_dim():
    check([P.Window(3, 3), P.Dense(), P.Skip("mean"), P.Columns([0])], Hkv=2, Sq=21, Sk=30, D=16, Dv=8, causal=True)


def test_rows_without_keys_are_zero():
    out = check([P.Columns([(30, 37)]), P.Window(0, 0)], Sq=37, Sk=37, causal=True, block_m=8, block_n=8)
    assert torch.equal(out[0, 0, :30], torch.zeros(30, 16))
    assert out[0, 0, 30:].abs().sum() > 0
    # Sq > Sk with causal: the first Sq - Sk rows may see no key at all, Dense included.
    out = check([P.Dense(), P.Window(2, 0)], Sq=20, Sk=7, causal=True)
    assert torch.equal(out[0, :, :13], torch.zeros(2, 13, 16))


def test_skipped_key_blocks_are_never_read():
    """NaN in every key block a head does not need must not reach the output."""
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    patterns = (P.Columns([(0, 8)]), P.Skip("zero"))
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[:, 0, 8:] = float("nan")
    poisoned_v[:, 0, 8:] = float("nan")
    poisoned_k[:, 1] = float("nan")  # a Skip head never reads K
    out = cpu_attention(q, poisoned_k, poisoned_v, patterns, causal=False, scale=0.25, block_m=16, block_n=8)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, patterns, scale=0.25), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_long_window_uses_strided_kv_and_shared_edges(causal):
    """Lengths that exercise the strided (no-gather) K/V path, edge blocks extended to a shared key
    range under per-block masks, and odd tails."""
    pattern = P.Window(40, 40 if not causal else 0)
    plan = attention_cpu_plan._plan(pattern, 301, 301, causal, 32)
    assert any(c.kv_affine is not None and c.kv_affine[1] > 0 for c in plan.calls)
    assert all(c.kv_index is None for c in plan.calls)  # nothing gathered for a band
    check([pattern] * 4, Hkv=2, Sq=301, Sk=301, causal=causal, block_m=32, block_n=16)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("B", [1, 2])
def test_pattern_heads_in_runs_and_interleaved(causal, B):
    """Block-aligned lengths: a pattern's consecutive heads are slices of q, k, v and, for B = 1,
    write straight into the output (zeroed first where blocks read no key: causal Columns rows
    before key 40), without touching other heads; interleaved heads and kv heads with some of
    their query heads go through copies."""
    window, columns = P.Window(8, 8), P.Columns([(40, 48)])
    assert any(c.strided is not None for c in attention_cpu_plan._plan(window, 128, 128, causal, 16).calls)
    check([window, window, columns, columns, P.Dense(), window], B=B, Hkv=3, Sq=128, Sk=128, causal=causal, block_m=16)
    check([window, columns, window, columns], B=B, Sq=128, Sk=128, causal=causal, block_m=16)
    check([columns, columns, window, window], B=B, Hkv=2, Sq=128, Sk=128, causal=causal)


def test_block_sparse_runs_unmasked_and_reads_only_kept_keys():
    """Whole layout blocks need no mask, and each query block reads exactly its kept keys."""
    layout = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 1], [0, 0, 0, 1]], dtype=torch.bool)
    pattern = P.BlockSparse(layout, (16, 16))
    plan = attention_cpu_plan._plan(pattern, 64, 64, False, 16)
    assert all(c.mask is None and c.rebuild is None for c in plan.calls)
    assert sum(c.q_blocks.numel() * c.length for c in plan.calls) == int(layout.sum()) * 16
    check([pattern] * 2, Sq=64, Sk=64, block_m=16)


def test_choose_blocks_takes_the_query_block_the_cost_model_prices_least():
    """The query block is the candidate the cost model (one head, one thread) prices least: narrow
    bands get short ones (less of each band edge is computed and masked); block_m never exceeds Sq."""
    from sparsec.codegen.attention_cpu_choice import _Costs

    narrow = P.MultiDiagonal([-512, 0, 512], 2)
    assert attention_cpu.choose_blocks(narrow, 2048, 2048)[0] <= 64
    costs = _Costs(2048, 2048, False, 1, 128, 1)
    for pattern in (narrow, P.Window(900, 900), P.AShape(64, 256), P.Columns([(0, 40), (700, 760)])):
        chosen = attention_cpu.choose_blocks(pattern, 2048, 2048)[0]
        assert costs.seconds((pattern,), chosen) == min(costs.seconds((pattern,), bm) for bm in (32, 64, 128, 256))
    assert attention_cpu.choose_blocks(P.Window(3, 3), 20, 20)[0] <= 20


def test_thread_count_is_restored():
    """Copies run on one thread and the attention kernels on all: the caller's setting survives."""
    before = torch.get_num_threads()
    check([P.Window(3, 3), P.Dense(), P.Columns([(0, 5)]), P.Skip("mean")], Hkv=2, Sq=40, Sk=40, causal=True)
    assert torch.get_num_threads() == before


def test_plans_without_cached_masks_and_with_small_chunks(monkeypatch):
    """Past the mask budget masks are rebuilt per call; past the gather budget calls are chunked."""
    monkeypatch.setattr(attention_cpu_plan, "_PLAN_MASK_BYTES", 1)
    monkeypatch.setattr(attention_cpu, "_GATHER_BYTES", 1)
    monkeypatch.setattr(attention_cpu_plan, "_PLAN_CHUNK_PAIRS", 1)
    attention_cpu_plan._plan.cache_clear()
    try:
        for causal in (False, True):
            check(MIX, Hkv=4, Sq=29, Sk=35, causal=causal, block_m=8, block_n=4)
            check([block_sparse(29, 35, (3, 7)), P.MultiDiagonal([-9, 9], 1)], Sq=29, Sk=35, causal=causal,
                  block_m=8, block_n=8)
    finally:
        attention_cpu_plan._plan.cache_clear()


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="one Pattern per query head"):
        cpu_attention(q, q, q, (P.Dense(),), causal=False, scale=0.5)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        cpu_attention(torch.randn(1, 3, 8, 4), q, q, (P.Dense(),) * 3, causal=False, scale=0.5)
    with pytest.raises(TypeError, match="dtype"):
        cpu_attention(q.double(), q.double(), q.double(), (P.Dense(),) * 2, causal=False, scale=0.5)
    with pytest.raises(ValueError, match="block_m must be a positive int"):
        cpu_attention(q, q, q, (P.Window(1, 1),) * 2, causal=False, scale=0.5, block_m=0)
    with pytest.raises(ValueError, match="4-D"):
        cpu_attention(q[0], q, q, (P.Dense(),) * 2, causal=False, scale=0.5)


# -- property test: random patterns, unions, shapes and tiles ------------------------------------

BOUNDS = PatternBounds(width=10, offset=30, max_offsets=3, column=40, column_width=6, block=8)


@st.composite
def head_pattern(draw, Sq, Sk):
    """Skip one head in ten, else a union of patterns (BlockSparse among them half the time)."""
    return draw(skips if draw(st.integers(0, 9)) == 0 else unions(Sq, Sk, BOUNDS))


@st.composite
def cases(draw):
    Sq, Sk = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    Hkv = draw(st.integers(1, 2))
    Hq = Hkv * draw(st.integers(1, 2))
    patterns = [draw(head_pattern(Sq, Sk)) for _ in range(Hq)]
    tiles = draw(st.sampled_from([(None, None), (4, 4), (8, 2), (16, 8), (3, 5)]))
    return patterns, Hkv, Sq, Sk, tiles, draw(st.booleans()), draw(st.integers(0, 2**16))


@settings(max_examples=60, deadline=None)
@given(cases())
def test_random_patterns_and_shapes(case):
    patterns, Hkv, Sq, Sk, (block_m, block_n), causal, seed = case
    check(patterns, Hkv=Hkv, Sq=Sq, Sk=Sk, D=8, causal=causal, block_m=block_m, block_n=block_n, seed=seed)
