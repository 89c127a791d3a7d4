"""codegen.block_coverage against tile coverage computed from explicit pattern.mask() masks, and
against coverage_by_rows (the per-row computation the closed form replaced) at larger lengths."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsec import patterns as P
from sparsec.codegen.block_coverage import (
    EMPTY, FULL, PARTIAL, block_coverage, coverage_by_rows, coverage_counts, coverage_counts_many, kept_pairs,
    kv_block_table, layout_tensor, row_intervals,
)
from strategies import PatternBounds, block_sparse, random_layout, simple_patterns, skips, unions


def kept_mask(pattern, Sq, Sk, causal):
    mask = pattern.mask(Sq, Sk)
    if causal:
        mask &= torch.arange(Sk)[None, :] <= torch.arange(Sq)[:, None] + (Sk - Sq)
    return mask


def reference_coverage(pattern, Sq, Sk, block_m, block_n, causal):
    """Per tile from the explicit mask: EMPTY if no pair kept, FULL if every pair inside Sq x Sk
    is kept, else PARTIAL."""
    nqb, nkb = math.ceil(Sq / block_m), math.ceil(Sk / block_n)
    kept = torch.zeros(nqb * block_m, nkb * block_n, dtype=torch.bool)
    inside = torch.zeros_like(kept)
    kept[:Sq, :Sk] = kept_mask(pattern, Sq, Sk, causal)
    inside[:Sq, :Sk] = True
    cov = torch.full((nqb, nkb), PARTIAL, dtype=torch.uint8)
    tiles = kept.view(nqb, block_m, nkb, block_n)
    cov[~tiles.any(dim=3).any(dim=1)] = EMPTY
    cov[(tiles | ~inside.view(nqb, block_m, nkb, block_n)).all(dim=3).all(dim=1)] = FULL
    return cov


FIXED = [
    P.Dense(), P.Window(3, 5), P.Window(0, 0), P.Window(100, 0), P.MultiDiagonal([-7, 0, 9], 2),
    P.MultiDiagonal([-3, 0, 3], 1), P.Columns([(0, 3), (10, 20)]), P.Columns([40]), P.AShape(4, 6),
    P.AShape(0, 3), P.VerticalSlash([2, (5, 9)], [0, -4]), P.VerticalSlash([], [1]),
    P.Window(0, 0) | P.Columns([30]), P.AShape(2, 1) | P.MultiDiagonal([12], 0),
]


@pytest.mark.parametrize("pattern", FIXED, ids=repr)
@pytest.mark.parametrize("Sq,Sk,block_m,block_n", [(37, 37, 8, 8), (20, 45, 4, 16), (45, 19, 16, 4), (1, 33, 16, 8), (64, 64, 16, 16)])
@pytest.mark.parametrize("causal", [False, True])
def test_every_family_matches_mask(pattern, Sq, Sk, block_m, block_n, causal):
    got = block_coverage(pattern, Sq, Sk, block_m, block_n, causal)
    assert got.dtype == torch.uint8 and got.shape == (math.ceil(Sq / block_m), math.ceil(Sk / block_n))
    assert torch.equal(got, reference_coverage(pattern, Sq, Sk, block_m, block_n, causal))


@pytest.mark.parametrize("block", [(1, 1), (4, 4), (3, 5), (16, 8)])
@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_and_its_unions_match_mask(block, causal):
    Sq, Sk = 41, 29
    sparse = P.BlockSparse(random_layout(Sq, Sk, block, 0.4, seed=sum(block)), block)
    for pattern in (sparse, sparse | P.Window(2, 2), sparse | P.Columns([(0, 2)])):
        for block_m, block_n in ((8, 8), (4, 16), (1, 1)):
            got = block_coverage(pattern, Sq, Sk, block_m, block_n, causal)
            assert torch.equal(got, reference_coverage(pattern, Sq, Sk, block_m, block_n, causal)), (pattern, block_m, block_n)


def test_skip_reads_no_keys():
    assert torch.equal(block_coverage(P.Skip("mean"), 10, 12, 4, 4, True), torch.zeros(3, 3, dtype=torch.uint8))


def test_window_coverage_is_a_band_at_32k():
    """At S = 32K (no S x S mask possible in this test's time), a window's tiles form the band
    that block arithmetic predicts."""
    S, block, left = 32768, 64, 1000
    got = block_coverage(P.Window(left, 0), S, S, block, block, causal=True)
    qb = torch.arange(S // block)[:, None]
    kb = torch.arange(S // block)[None, :]
    # Query block qb holds rows [64 qb, 64 qb + 63]; it keeps keys [64 qb - 1000, 64 qb + 63].
    touched = (kb * block + block - 1 >= qb * block - left) & (kb <= qb)
    whole = (kb * block >= qb * block + block - 1 - left) & (kb < qb)
    assert torch.equal(got != EMPTY, touched)
    assert torch.equal(got == FULL, whole)


def test_kv_block_table_lists_visited_blocks_in_order():
    cov = torch.tensor([[0, 2, 1, 0], [0, 0, 0, 0], [2, 2, 2, 1]], dtype=torch.uint8)
    num, indices, full = kv_block_table(cov)
    assert num.dtype == torch.int32 and indices.dtype == torch.int32 and full.dtype == torch.bool
    assert num.tolist() == [2, 0, 4]
    assert indices.tolist() == [[1, 2, 0, 0], [0, 0, 0, 0], [0, 1, 2, 3]]
    assert full.tolist() == [[True, False, False, False], [False] * 4, [True, True, True, False]]


def test_kv_block_table_of_empty_coverage_has_one_column():
    num, indices, full = kv_block_table(torch.zeros(2, 5, dtype=torch.uint8))
    assert num.tolist() == [0, 0] and indices.shape == (2, 1) and not full.any()


@pytest.mark.parametrize("pattern", FIXED + [P.BlockSparse(random_layout(23, 31, (4, 3), 0.5, seed=1), (4, 3))], ids=repr)
@pytest.mark.parametrize("causal", [False, True])
def test_row_intervals_union_is_the_mask(pattern, causal):
    Sq, Sk = 23, 31
    lo, hi = row_intervals(pattern, Sq, Sk, causal)
    j = torch.arange(Sk)
    union = ((j[None, None, :] >= lo[:, :, None]) & (j[None, None, :] <= hi[:, :, None])).any(dim=1)
    assert torch.equal(union, kept_mask(pattern, Sq, Sk, causal))


@pytest.mark.parametrize("pattern", FIXED + [P.Skip("zero"), P.BlockSparse(random_layout(23, 31, (4, 3), 0.5, seed=2), (4, 3))], ids=repr)
@pytest.mark.parametrize("causal", [False, True])
def test_kept_pairs_counts_the_mask(pattern, causal):
    assert kept_pairs(pattern, 23, 31, causal) == int(kept_mask(pattern, 23, 31, causal).sum())


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="block_m must be a positive int"):
        block_coverage(P.Dense(), 8, 8, 0, 4, False)
    with pytest.raises(ValueError, match="Sk must be a positive int"):
        block_coverage(P.Dense(), 8, 0, 4, 4, False)
    with pytest.raises(TypeError, match="expected a Pattern"):
        block_coverage("window", 8, 8, 4, 4, False)
    with pytest.raises(ValueError, match="layout has shape"):
        block_coverage(P.BlockSparse(torch.ones(2, 2, dtype=torch.bool), 4), 16, 16, 4, 4, False)
    with pytest.raises(ValueError, match="2-D tensor"):
        kv_block_table(torch.zeros(3, dtype=torch.uint8))


def test_cached_result_cannot_be_corrupted_by_callers():
    first = block_coverage(P.Window(2, 2), 16, 16, 4, 4, False)
    first.zero_()
    assert block_coverage(P.Window(2, 2), 16, 16, 4, 4, False).any()


# -- property test: random patterns, shapes and tiles --------------------------------------------

BOUNDS = PatternBounds(width=12, offset=40, max_offsets=4, column=50, column_width=8, block=9)


@st.composite
def cases(draw):
    Sq, Sk = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    pattern = draw(unions(Sq, Sk, BOUNDS))
    tiles = (draw(st.sampled_from([1, 2, 4, 8, 16])), draw(st.sampled_from([1, 2, 4, 8, 16])))
    return pattern, Sq, Sk, tiles, draw(st.booleans())


@settings(max_examples=150, deadline=None)
@given(cases())
def test_random_patterns_match_mask(case):
    pattern, Sq, Sk, (block_m, block_n), causal = case
    got = block_coverage(pattern, Sq, Sk, block_m, block_n, causal)
    assert torch.equal(got, reference_coverage(pattern, Sq, Sk, block_m, block_n, causal))
    assert kept_pairs(pattern, Sq, Sk, causal) == int(kept_mask(pattern, Sq, Sk, causal).sum())


@st.composite
def batches(draw):
    """Several patterns of one shape (Skip, unions and BlockSparse at the tile and at other blocks
    among them), counted together by coverage_counts_many."""
    Sq, Sk = draw(st.integers(1, 80)), draw(st.integers(1, 80))
    tiles = (draw(st.sampled_from([1, 2, 3, 8, 16])), draw(st.sampled_from([1, 2, 5, 8, 16])))
    kinds = st.one_of(simple_patterns(BOUNDS), unions(Sq, Sk, BOUNDS, with_blocks=False), skips,
                      block_sparse(Sq, Sk, BOUNDS, block=tiles), block_sparse(Sq, Sk, BOUNDS))
    patterns = draw(st.lists(kinds, min_size=1, max_size=6))
    return patterns, Sq, Sk, tiles, draw(st.booleans())


@settings(max_examples=150, deadline=None)
@given(batches())
def test_counts_of_many_patterns_match_mask(case):
    patterns, Sq, Sk, (block_m, block_n), causal = case
    full, partial = coverage_counts_many(patterns, Sq, Sk, block_m, block_n, causal)
    assert full.shape == partial.shape == (len(patterns), math.ceil(Sq / block_m))
    for n, pattern in enumerate(patterns):
        ref = reference_coverage(pattern, Sq, Sk, block_m, block_n, causal)
        assert full[n].tolist() == (ref == FULL).sum(dim=1).tolist(), (n, pattern)
        assert partial[n].tolist() == (ref == PARTIAL).sum(dim=1).tolist(), (n, pattern)


def long_patterns(rng, S):
    """Patterns at a realistic scale: many ranges and diagonals, wide and narrow."""
    offsets = lambda n: [rng.randint(-S, S) for _ in range(n)]  # noqa: E731
    ranges = lambda n, w: [(s, s + rng.randint(1, w)) for s in (rng.randint(0, S) for _ in range(n))]  # noqa: E731
    return [
        P.Window(rng.randint(0, S // 3), rng.randint(0, 64)), P.AShape(rng.randint(1, 200), rng.randint(0, S // 2)),
        P.MultiDiagonal(offsets(rng.randint(1, 32)), rng.choice([0, 1, 3, 40])),
        P.MultiDiagonal([k * 97 for k in range(-4, 5)], 50),       # touching bands: tiles full jointly
        P.Columns(ranges(32, 40)), P.VerticalSlash(ranges(20, 30), offsets(32)),
        P.VerticalSlash(ranges(4, 300), list(range(-70, 1))),      # neighbouring diagonals merge into a band
        P.AShape(300, 200) | P.Columns(ranges(6, 100)), P.Dense(),
    ]


@pytest.mark.parametrize("Sq,Sk,block_m,block_n", [(1000, 1000, 64, 32), (1000, 1000, 64, 128), (777, 1250, 128, 64),
                                                   (1250, 777, 32, 48)])
@pytest.mark.parametrize("causal", [False, True])
def test_closed_form_matches_rows_at_longer_lengths(Sq, Sk, block_m, block_n, causal):
    """Longer sequences than the mask tests afford, against the per-row reference."""
    import random

    rng = random.Random(Sq * Sk + block_m + causal)
    patterns = long_patterns(rng, max(Sq, Sk))
    patterns.append(P.BlockSparse(random_layout(Sq, Sk, (block_m, block_n), 0.2, seed=3), (block_m, block_n)))
    patterns.append(P.BlockSparse(random_layout(Sq, Sk, (50, 20), 0.2, seed=4), (50, 20)))
    full, partial = coverage_counts_many(patterns, Sq, Sk, block_m, block_n, causal)
    for n, pattern in enumerate(patterns):
        rows = coverage_by_rows(pattern, Sq, Sk, block_m, block_n, causal)
        assert torch.equal(block_coverage(pattern, Sq, Sk, block_m, block_n, causal), rows), pattern
        assert full[n].tolist() == (rows == FULL).sum(dim=1).tolist(), pattern
        assert partial[n].tolist() == (rows == PARTIAL).sum(dim=1).tolist(), pattern


def test_single_pattern_counts_and_layout_tensor():
    layout = random_layout(40, 50, (8, 16), 0.5, seed=7)
    pattern = P.BlockSparse(layout, (8, 16))
    assert torch.equal(layout_tensor(pattern), pattern.layout)
    full, partial = coverage_counts(P.Window(5, 0), 40, 50, 8, 16, True)
    ref = reference_coverage(P.Window(5, 0), 40, 50, 8, 16, True)
    assert full.tolist() == (ref == FULL).sum(dim=1).tolist() and partial.tolist() == (ref == PARTIAL).sum(dim=1).tolist()


@settings(max_examples=100, deadline=None)
@given(cases())
def test_the_backward_lists_name_each_blocks_kept_pairs_by_query_and_by_key_block(case):
    """backward_block_lists by query block (the dQ kernel's) and by key block (the dK / dV kernel's),
    against the mask: each row lists, ascending, every block that keeps a pair, once; whole only
    where every pair is kept and the block lies within both lengths (loaded without bounds checks)."""
    from sparsec.codegen.templates.tables import backward_block_lists

    pattern, Sq, Sk, (block_m, block_n), causal = case
    coverage = reference_coverage(pattern, Sq, Sk, block_m, block_n, causal)
    inside = ((torch.arange(coverage.shape[0]) + 1) * block_m <= Sq)[:, None] & \
        ((torch.arange(coverage.shape[1]) + 1) * block_n <= Sk)[None, :]
    for by_key in (False, True):
        partial, whole = backward_block_lists([pattern, P.Dense()], Sq, Sk, block_m, block_n, causal, by_key=by_key)
        cov, within = (coverage.T, inside.T) if by_key else (coverage, inside)
        assert partial.count.shape == (2 * cov.shape[0],)  # the second pattern's rows follow the first's
        for row in range(cov.shape[0]):
            lists = [lst.blocks[int(lst.start[row]):int(lst.start[row]) + int(lst.count[row])].tolist()
                     for lst in (partial, whole)]
            assert all(blocks == sorted(blocks) for blocks in lists)
            assert sorted(lists[0] + lists[1]) == (cov[row] != EMPTY).nonzero().flatten().tolist()
            assert all(cov[row, c] == FULL and bool(within[row, c]) for c in lists[1])


@pytest.mark.parametrize("block_m, block_n", [(16, 32), (32, 16), (64, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_many_columns_leave_several_gaps_a_block_inside_or_outside_bands(block_m, block_n, causal):
    """Blocks that columns cover in part, with several gaps each, some of them inside bands: only the
    holes meeting a block are tested (block_coverage._gaps_in_bands), and the result is the mask's."""
    S = 700
    columns = [(j, j + 1 + j % 3) for j in range(3, S, 7)]
    pattern = P.VerticalSlash(columns, list(range(-S + 1, 1, 5))) | P.MultiDiagonal([-400, -150], 100)
    got = block_coverage(pattern, S, S, block_m, block_n, causal)
    assert torch.equal(got, reference_coverage(pattern, S, S, block_m, block_n, causal))
    assert bool((got == FULL).any()) and bool((got == PARTIAL).any())
