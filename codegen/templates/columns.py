"""Columns(ranges): vertical stripes j in [start, end).
Params: (key map, start_0, end_0, start_1, end_1, ...).

The ranges are sorted and disjoint (Columns merges them), so each range's blocks start where the
previous ranges stopped. Heads with fewer ranges than the group's NUM_RANGES repeat their last one.
The mask reads the key map (LayoutBuffer.key_bits: one int32 per key) with one load instead of
testing every range.
"""
from __future__ import annotations

from sparsec.codegen.templates.common import KEY_HELPERS, FamilyTemplate, PackedParams, pad_rows, padded

KEEP = """
return _key_map_keeps(LAYOUTS, tl.load(params), i, j, Sk)
"""

VISIT = """
visited = m_lo * 0  # blocks below this were visited by an earlier range
for r in range(NUM_RANGES):
    v_lo, v_hi, f_lo, f_hi = _interval_span(m_lo, m_hi, tl.load(params + 1 + 2 * r), -NO_LIMIT,
                                            tl.load(params + 2 + 2 * r) - 1, causal_hi, Sk, BLOCK_N)
    acc, m_i, l_i = _attend_span(acc, m_i, l_i, visited, v_lo, v_hi, f_lo, f_hi,
    $CONTEXT)
    visited = tl.maximum(visited, v_hi)
"""


def column_ranges(ranges, Sk: int) -> list[tuple[int, int]]:
    """[start, end) ranges clipped to the keys that exist (a range past Sk becomes empty)."""
    return [(min(start, Sk), min(end, Sk)) for start, end in ranges]


def pack(patterns, Sq, Sk, layouts) -> PackedParams:
    count = max(len(p.ranges) for p in patterns)
    rows = []
    for p in patterns:
        ranges = column_ranges(p.ranges, Sk)
        rows.append([layouts.key_bits(ranges, Sk)] + [x for r in padded(ranges, count, ranges[-1]) for x in r])
    return PackedParams(rows=pad_rows(rows), counts={"NUM_RANGES": count})


TEMPLATE = FamilyTemplate(family="columns", keep=KEEP, visit=VISIT, pack=pack, counts=("NUM_RANGES",),
                          helpers=KEY_HELPERS)
