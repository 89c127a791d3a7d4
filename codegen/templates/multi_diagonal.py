"""MultiDiagonal(offsets, width): bands |j - (i + o)| <= width.
Params: (width, o_0, ..., o_{N-1}, diagonal bits).

Offsets are sorted, so the bands' block ranges move right with the offset: each band starts where
the previous ones stopped and no block is visited twice. Heads with fewer offsets than the
group's NUM_OFFSETS repeat their last offset (a repeat visits nothing new). The mask reads the
bands' diagonals as bits (common.diagonal_words): compiled for sm_90, a test per band unrolled
spilled 48 B a thread at 32 offsets and 5.4 KB at 96 (75 s to compile).
"""
from __future__ import annotations

from sparsec.codegen.templates.common import (
    KEY_HELPERS, FamilyTemplate, PackedParams, diagonal_words, pad_rows, padded,
)

KEEP = """
return _diagonal_keeps(params + 1 + NUM_OFFSETS, i, j, Sq)
"""

VISIT = """
width = tl.load(params)
visited = m_lo * 0  # blocks below this were visited by an earlier band
for r in range(NUM_OFFSETS):
    offset = tl.load(params + 1 + r)
    v_lo, v_hi, f_lo, f_hi = _interval_span(m_lo, m_hi, 0, offset - width, NO_LIMIT,
                                            tl.minimum(offset + width, causal_hi), Sk, BLOCK_N)
    acc, m_i, l_i = _attend_span(acc, m_i, l_i, visited, v_lo, v_hi, f_lo, f_hi,
    $CONTEXT)
    visited = tl.maximum(visited, v_hi)
"""


def pack(patterns, Sq, Sk, layouts) -> PackedParams:
    count = max(len(p.offsets) for p in patterns)
    rows = []
    for p in patterns:
        width, offsets = _bounded(p.offsets, p.width, Sq + Sk)
        bands = [(o - p.width, o + p.width) for o in p.offsets]
        rows.append([width, *padded(offsets, count, offsets[-1]), *diagonal_words(bands, Sq, Sk)])
    return PackedParams(rows=pad_rows(rows), counts={"NUM_OFFSETS": count})


def _bounded(offsets, width: int, reach: int) -> tuple[int, list[int]]:
    """The head's (width, offsets) within a few `reach` (|j - i| < reach for every pair), keeping
    the same pairs: the kernel's int32 interval arithmetic stays far from overflow. A band's edges
    o -/+ width are what matter, and only inside (-reach, reach): a width up to 2 reach is kept and
    each offset clamped to reach + width (a band wholly past the keys stays past them); a wider one
    becomes 2 reach and each offset moves so that the edge inside (-reach, reach), if one is, stays
    where it was (the other lies out of reach either way)."""
    if width <= 2 * reach:
        return width, [max(-(reach + width), min(reach + width, o)) for o in offsets]
    bounded = []
    for o in offsets:
        lo, hi = o - width, o + width
        if lo >= reach or hi <= -reach:      # wholly past the keys, or before them
            bounded.append(3 * reach if lo >= reach else -3 * reach)
        elif lo > -reach:                    # only the lower edge inside
            bounded.append(lo + 2 * reach)
        elif hi < reach:                     # only the upper edge inside
            bounded.append(hi - 2 * reach)
        else:                                # every pair
            bounded.append(0)
    return 2 * reach, bounded


TEMPLATE = FamilyTemplate(family="multi_diagonal", keep=KEEP, visit=VISIT, pack=pack, counts=("NUM_OFFSETS",),
                          helpers=KEY_HELPERS)
