"""Hypothesis strategies that draw random sparsec patterns, for the property tests.

Every closed-form family, their unions, BlockSparse with a random layout and Skip. How far a
pattern reaches (window sizes, diagonal offsets, columns, layout blocks) is a PatternBounds: each
test draws at the sizes its float64 reference can afford.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from sparsec import patterns as P


@dataclass(frozen=True, slots=True, kw_only=True)
class PatternBounds:
    """How far a drawn pattern reaches."""

    width: int          # Window and AShape sizes: 0..width
    offset: int         # diagonal offsets: -offset..offset
    max_offsets: int    # diagonals a pattern lists: 1..max_offsets
    column: int         # a column range starts in 0..column
    column_width: int   # and spans 1..column_width columns
    block: int          # BlockSparse blocks: 1..block rows and columns


skips = st.sampled_from([P.Skip("mean"), P.Skip("zero")])


def random_layout(Sq: int, Sk: int, block: tuple[int, int], density: float, seed: int) -> torch.Tensor:
    """A BlockSparse layout for Sq x Sk keeping each block with probability `density`."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(math.ceil(Sq / block[0]), math.ceil(Sk / block[1]), generator=g) < density


def simple_patterns(bounds: PatternBounds) -> st.SearchStrategy[P.Pattern]:
    """One closed-form pattern: Dense, Window, MultiDiagonal, Columns, AShape or VerticalSlash."""
    sizes = st.integers(0, bounds.width)
    offsets = st.lists(st.integers(-bounds.offset, bounds.offset), min_size=1, max_size=bounds.max_offsets)
    column_ranges = st.lists(st.tuples(st.integers(0, bounds.column), st.integers(1, bounds.column_width))
                             .map(lambda t: (t[0], t[0] + t[1])), min_size=1, max_size=3)
    return st.one_of(
        st.just(P.Dense()),
        st.builds(P.Window, sizes, sizes),
        st.builds(P.MultiDiagonal, offsets, st.integers(0, 3)),
        st.builds(P.Columns, column_ranges),
        st.builds(P.AShape, sizes, sizes),
        st.builds(P.VerticalSlash, column_ranges, offsets),
    )


@st.composite
def block_sparse(draw, Sq: int, Sk: int, bounds: PatternBounds, *, block: tuple[int, int] | None = None,
                 density: float | None = None) -> P.BlockSparse:
    """A random layout for Sq x Sk; `block` and `density` are drawn unless given."""
    block = block or (draw(st.integers(1, bounds.block)), draw(st.integers(1, bounds.block)))
    density = draw(st.floats(0, 1)) if density is None else density
    return P.BlockSparse(random_layout(Sq, Sk, block, density, seed=draw(st.integers(0, 999))), block)


@st.composite
def unions(draw, Sq: int, Sk: int, bounds: PatternBounds, *, max_parts: int = 3,
           with_blocks: bool = True) -> P.Pattern:
    """1..max_parts simple patterns and, half the time when `with_blocks`, a BlockSparse of
    density 0.3: their Union, or the pattern itself when only one is distinct."""
    parts = draw(st.lists(simple_patterns(bounds), min_size=1, max_size=max_parts))
    if with_blocks and draw(st.booleans()):
        parts.append(draw(block_sparse(Sq, Sk, bounds, density=0.3)))
    return parts[0] if len(set(parts)) == 1 else P.Union(parts)
