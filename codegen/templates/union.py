"""Union of patterns (p1 | p2 | ...): table-driven like BlockSparse; the element mask is the OR of
the parts' masks. Every closed-form part becomes intervals j in [max(lo_c, i + lo_d),
min(hi_c, i + hi_d)], every BlockSparse part a layout entry, so heads with different unions share
one kernel. Params: (table, NUM_INTERVALS x (lo_c, lo_d, hi_c, hi_d), NUM_LAYOUTS x layout entry).
"""
from __future__ import annotations

from sparsec.codegen.templates.columns import column_ranges
from sparsec.codegen.templates.common import (
    NO_LIMIT, TABLE_HELPERS, TABLE_VISIT, FamilyTemplate, LayoutBuffer, PackedParams, clamp_offset, pad_rows,
    padded, table_ids,
)
from sparsec.patterns import AShape, BlockSparse, Columns, Dense, MultiDiagonal, Pattern, VerticalSlash, Window

HELPERS = TABLE_HELPERS + '''

@triton.jit
def _interval_keeps(interval, i, j):
    """Whether j lies in [max(lo_c, i + lo_d), min(hi_c, i + hi_d)]; `interval` points at the four."""
    lo_c = tl.load(interval)
    lo_d = tl.load(interval + 1)
    hi_c = tl.load(interval + 2)
    hi_d = tl.load(interval + 3)
    return (j >= tl.maximum(lo_c, i + lo_d)) & (j <= tl.minimum(hi_c, i + hi_d))
'''

KEEP = """
keep = _interval_keeps(params + 1, i, j)
for r in tl.static_range(1, NUM_INTERVALS):
    keep = keep | _interval_keeps(params + 1 + 4 * r, i, j)
for r in tl.static_range(NUM_LAYOUTS):
    keep = keep | _layout_keeps(LAYOUTS, params + 1 + 4 * NUM_INTERVALS + 4 * r, i, j, Sq, Sk)
return keep
"""

_EMPTY_INTERVAL = (NO_LIMIT, -NO_LIMIT, -NO_LIMIT, NO_LIMIT)


def _band(lo: int, hi: int) -> tuple[int, int, int, int]:
    return (-NO_LIMIT, lo, NO_LIMIT, hi)


def _columns(ranges, Sk: int) -> list[tuple[int, int, int, int]]:
    return [(start, -NO_LIMIT, end - 1, NO_LIMIT) for start, end in column_ranges(ranges, Sk)]


def part_intervals(part: Pattern, Sq: int, Sk: int) -> list[tuple[int, int, int, int]]:
    """A closed-form part's kept set as (lo_c, lo_d, hi_c, hi_d) intervals."""
    off = lambda x: clamp_offset(x, Sq, Sk)  # noqa: E731
    if isinstance(part, Dense):
        return [_band(-NO_LIMIT, NO_LIMIT)]
    if isinstance(part, Window):
        return [_band(-off(part.left), off(part.right))]
    if isinstance(part, MultiDiagonal):
        return [_band(off(o - part.width), off(o + part.width)) for o in part.offsets]  # edges clamped
    if isinstance(part, Columns):
        return _columns(part.ranges, Sk)
    if isinstance(part, AShape):
        return _columns([(0, part.sink)] if part.sink else [], Sk) + [_band(-off(part.window), 0)]
    if isinstance(part, VerticalSlash):
        return _columns(part.columns, Sk) + [_band(off(o), off(o)) for o in part.offsets]
    raise ValueError(f"the union kernel has no interval form for {part!r}")


def _head_entries(pattern: Pattern, Sq: int, Sk: int, layouts: LayoutBuffer):
    intervals, layout_entries = [], []
    for part in pattern.parts:
        if isinstance(part, BlockSparse):
            layout_entries.append(layouts.entry(part))
        else:
            intervals.extend(part_intervals(part, Sq, Sk))
    return intervals, layout_entries


def pack(patterns, Sq, Sk, layouts) -> PackedParams:
    _, tables = table_ids(patterns)
    entries = [_head_entries(p, Sq, Sk, layouts) for p in patterns]
    num_intervals = max(1, max(len(i) for i, _ in entries))
    num_layouts = max(len(lay) for _, lay in entries)
    rows = []
    for table, (intervals, layout_entries) in zip(tables, entries):
        intervals = padded(intervals, num_intervals, _EMPTY_INTERVAL)
        layout_entries = padded(layout_entries, num_layouts, LayoutBuffer.EMPTY_ENTRY)
        rows.append([table, *(x for e in intervals + layout_entries for x in e)])
    return PackedParams(rows=pad_rows(rows), counts={"NUM_INTERVALS": num_intervals, "NUM_LAYOUTS": num_layouts})


TEMPLATE = FamilyTemplate(family="union", keep=KEEP, visit=TABLE_VISIT, pack=pack, helpers=HELPERS,
                          counts=("NUM_INTERVALS", "NUM_LAYOUTS"), table_driven=True)
