"""What the CPU executor reads per query block (codegen/attention_cpu_reads.py), the cost model's
input for the "cpu" profile: the per-block key unions against explicit masks, and the grouping
into calls against the executor's own plan."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsec import patterns as P
from sparsec.codegen import attention_cpu_plan
from sparsec.codegen.attention_cpu_reads import _block_unions_by_rows, cpu_block_reads, query_block_unions
from sparsec.cost_models.measure import FAMILIES, pattern_at_density
from strategies import PatternBounds, block_sparse, simple_patterns, unions

BOUNDS = PatternBounds(width=12, offset=40, max_offsets=4, column=50, column_width=8, block=9)


def reference_unions(pattern, Sq, Sk, block_m, causal):
    """Per query block from the explicit mask: (keys in the union of its rows, runs of the union,
    whether some row keeps fewer keys than the union, the union as a bool key vector)."""
    mask = pattern.mask(Sq, Sk)
    if causal:
        mask &= torch.ones(Sq, Sk, dtype=torch.bool).tril(Sk - Sq)
    found = []
    for r0 in range(0, Sq, block_m):
        rows = mask[r0:r0 + block_m]
        union = rows.any(dim=0)
        edges = torch.diff(torch.cat([torch.zeros(1), union.float(), torch.zeros(1)]))
        masked = bool((rows.sum(dim=1) < union.sum()).any())
        found.append((int(union.sum()), int((edges == 1).sum()), masked, union))
    return found


def single_part(pattern) -> bool:
    return not isinstance(pattern, (P.Union, P.AShape, P.VerticalSlash))


@st.composite
def cases(draw):
    Sq, Sk = draw(st.integers(1, 90)), draw(st.integers(1, 90))
    causal = draw(st.booleans())
    pattern = draw(st.one_of(simple_patterns(BOUNDS), unions(Sq, Sk, BOUNDS), block_sparse(Sq, Sk, BOUNDS)))
    return pattern, Sq, Sk, draw(st.sampled_from([1, 3, 8, 16, 32])), causal


@settings(max_examples=200, deadline=None)
@given(cases())
def test_block_unions_match_the_explicit_mask(case):
    pattern, Sq, Sk, block_m, causal = case
    found = query_block_unions(pattern, Sq, Sk, block_m, causal)
    reference = reference_unions(pattern, Sq, Sk, block_m, causal)
    assert len(found.keys) == len(reference) == math.ceil(Sq / block_m)
    for b, (keys, runs, masked, union) in enumerate(reference):
        assert (found.keys[b], found.runs[b]) == (keys, runs), (b, pattern)
        # Exact for one part; with several, a key one part keeps for some rows and another for the
        # rest reads as masked (never the other way round: an unmasked block is truly unmasked).
        if single_part(pattern) or isinstance(pattern, P.BlockSparse):
            assert found.masked[b] == masked, (b, pattern)
        else:
            assert found.masked[b] or not masked, (b, pattern)
    for a in range(len(reference)):  # equal unions, equal signatures, and (here) only those
        for b in range(a):
            same = torch.equal(reference[a][3], reference[b][3])
            assert (found.signature[a] == found.signature[b]) == same, (a, b, pattern)


@st.composite
def layout_cases(draw):
    """A lone BlockSparse at lengths that need not be multiples of its blocks, and a block_m that
    need not be one either."""
    Sq, Sk = draw(st.integers(1, 120)), draw(st.integers(1, 120))
    pattern = draw(block_sparse(Sq, Sk, BOUNDS))
    return pattern, Sq, Sk, draw(st.integers(1, 40)), draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(layout_cases())
def test_layout_unions_match_the_row_path(case):
    """A lone BlockSparse's unions come from its layout rows in closed form: the same arrays as
    the union of every row's intervals gives, element for element."""
    pattern, Sq, Sk, block_m, causal = case
    found = query_block_unions(pattern, Sq, Sk, block_m, causal)
    by_rows = _block_unions_by_rows(pattern, Sq, Sk, block_m, causal)
    for closed_form, reference in zip((found.keys, found.runs, found.masked, found.signature), by_rows):
        assert closed_form.dtype == reference.dtype
        np.testing.assert_array_equal(closed_form, reference)
    assert not found.masks_shift


def plan_totals(pattern, S, block_m, causal):
    plan = attention_cpu_plan._plan(pattern, S, S, causal, block_m)
    pairs = sum(c.q_blocks.shape[0] * c.length for c in plan.calls) * block_m
    return pairs, len(plan.calls)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "dense"])
def test_reads_follow_the_executor_plan(family, causal):
    """The grouping into calls is the executor's, approximated without comparing masks: pairs read
    within 25% of the plan's, calls within a factor of two (measured: pairs within 1% for most
    families, multi_diagonal's shared-mask guess the furthest off)."""
    S = 1024
    for density in (0.1, 0.3):
        pattern = pattern_at_density(family, S, density, causal=causal)
        for block_m in (64, 128):
            reads = cpu_block_reads(pattern, S, S, block_m, causal)
            rows = torch.tensor([min(block_m, S - b * block_m) for b in range(len(reads.keys))], dtype=torch.float64)
            pairs = float((torch.from_numpy(reads.keys) * rows).sum())
            plan_pairs, plan_calls = plan_totals(pattern, S, block_m, causal)
            assert pairs == pytest.approx(plan_pairs, rel=0.25), (pattern, block_m)
            assert plan_calls / 2 <= reads.calls <= 2 * plan_calls + 1, (pattern, block_m, reads.calls, plan_calls)
            unions_keys = query_block_unions(pattern, S, S, block_m, causal).keys
            assert (reads.keys >= unions_keys).all()  # buckets only grow a block's keys
            assert (reads.gathered <= reads.keys).all()


def test_dense_and_skip_heads():
    dense = cpu_block_reads(P.Dense(), 100, 100, 32, causal=True)
    assert dense.direct and dense.calls == 1 and dense.keys.tolist() == [32, 64, 96, 100]
    assert not dense.masked.any() and not dense.gathered.any()
    offset = cpu_block_reads(P.Dense(), 100, 120, 32, causal=True)  # causal offset: planned, masked
    assert not offset.direct and offset.masked.all()
    skip = cpu_block_reads(P.Skip(), 100, 100, 32, causal=False)
    assert skip.calls == 0 and not skip.keys.any()
