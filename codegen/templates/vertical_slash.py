"""VerticalSlash(columns, offsets): column ranges plus single diagonals j == i + o.
Params: (key map, start_0, end_0, ..., start_{R-1}, end_{R-1}, o_0, ..., o_{N-1}, diagonal bits).

The columns are visited first, like Columns; then each diagonal's blocks, skipping the blocks the
column pass already visited. Heads with fewer columns or offsets than the group's NUM_RANGES /
NUM_OFFSETS are padded with entries that keep nothing: the column [0, 0) and the offset -NO_LIMIT.
The key map (LayoutBuffer.key_bits: one int32 per key, 1 in a column) answers "is key j a column"
with one load: the mask and the "did the column pass visit this block" test need no loop over the
ranges; the diagonals' mask reads the diagonal bits (common.diagonal_words, _diagonal_keeps): a
few integer operations a tile whatever the number of diagonals.
"""
from __future__ import annotations

from sparsec.codegen.templates.columns import column_ranges
from sparsec.codegen.templates.common import (
    KEY_HELPERS, NO_LIMIT, FamilyTemplate, PackedParams, clamp_offset, diagonal_words, pad_rows, padded,
)

HELPERS = KEY_HELPERS + '''

@triton.jit
def _column_free_block(n, LAYOUTS, key_bits, m_hi, causal_hi, Sk, BLOCK_N: tl.constexpr):
    """Whether the column pass skipped key block n (so a diagonal must visit it): no key of the
    block that the query block's last row may see is a column."""
    offs = n * BLOCK_N + tl.arange(0, BLOCK_N)
    bits = tl.load(LAYOUTS + key_bits + offs, mask=(offs < Sk) & (offs <= m_hi + causal_hi), other=0)
    return tl.max(bits, 0) == 0
'''

KEEP = """
return (_key_map_keeps(LAYOUTS, tl.load(params), i, j, Sk)
        | _diagonal_keeps(params + 1 + 2 * NUM_RANGES + NUM_OFFSETS, i, j, Sq))
"""

VISIT = """
key_bits = tl.load(params)
visited = m_lo * 0  # blocks below this were visited by an earlier range
for r in range(NUM_RANGES):
    v_lo, v_hi, f_lo, f_hi = _interval_span(m_lo, m_hi, tl.load(params + 1 + 2 * r), -NO_LIMIT,
                                            tl.load(params + 2 + 2 * r) - 1, causal_hi, Sk, BLOCK_N)
    acc, m_i, l_i = _attend_span(acc, m_i, l_i, visited, v_lo, v_hi, f_lo, f_hi,
    $CONTEXT)
    visited = tl.maximum(visited, v_hi)
# Diagonals are sorted too: each starts where the previous stopped, minus blocks the columns took.
visited = m_lo * 0
for r in range(NUM_OFFSETS):
    offset = tl.load(params + 1 + 2 * NUM_RANGES + r)
    v_lo, v_hi, f_lo, f_hi = _interval_span(m_lo, m_hi, 0, offset, NO_LIMIT, tl.minimum(offset, causal_hi),
                                            Sk, BLOCK_N)
    for n in range(tl.maximum(v_lo, visited), v_hi):
        if _column_free_block(n, LAYOUTS, key_bits, m_hi, causal_hi, Sk, BLOCK_N):
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, n, True,
            $CONTEXT)
    visited = tl.maximum(visited, v_hi)
"""

_NO_COLUMN = (0, 0)
_NO_OFFSET = -NO_LIMIT


def pack(patterns, Sq, Sk, layouts) -> PackedParams:
    num_ranges = max(1, max(len(p.columns) for p in patterns))
    num_offsets = max(1, max(len(p.offsets) for p in patterns))
    rows = []
    for p in patterns:
        ranges = padded(column_ranges(p.columns, Sk), num_ranges, _NO_COLUMN)
        offsets = padded([clamp_offset(o, Sq, Sk) for o in p.offsets], num_offsets, _NO_OFFSET)
        rows.append([layouts.key_bits(ranges, Sk)] + [x for r in ranges for x in r] + offsets
                    + diagonal_words([(o, o) for o in p.offsets], Sq, Sk))
    return PackedParams(rows=pad_rows(rows), counts={"NUM_RANGES": num_ranges, "NUM_OFFSETS": num_offsets})


TEMPLATE = FamilyTemplate(family="vertical_slash", keep=KEEP, visit=VISIT, pack=pack, helpers=HELPERS,
                          keep_helpers=KEY_HELPERS, counts=("NUM_RANGES", "NUM_OFFSETS"))
