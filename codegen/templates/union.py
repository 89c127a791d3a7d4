"""Union of patterns (p1 | p2 | ...): table-driven like BlockSparse; the element mask is the OR of
the parts' masks. Every closed-form part becomes intervals j in [max(lo_c, i + lo_d),
min(hi_c, i + hi_d)], every BlockSparse part a layout entry, so heads with different unions share
one kernel. Column intervals go to a per-key map and bands of diagonals (windows, multi-diagonal
bands, slashes) to diagonal bits (common.KEY_HELPERS): a union holding a VerticalSlash with
hundreds of them would otherwise unroll one test each into the mask (compiled for sm_90: 200 s and
~7 KB of spilled registers a thread). Every closed-form part is one or the other today; the general
intervals stay for any part that is neither.
Params: (table, key map, NUM_INTERVALS x (lo_c, lo_d, hi_c, hi_d), NUM_LAYOUTS x layout entry,
diagonal bits); HAS_KEY_MAP / HAS_DIAGONALS say whether any head of the group has them.
"""
from __future__ import annotations

from sparsec.codegen.templates.columns import column_ranges
from sparsec.codegen.templates.common import (
    KEY_HELPERS, LAYOUT_HELPERS, NO_LIMIT, TABLE_HELPERS, TABLE_VISIT, FamilyTemplate, LayoutBuffer, PackedParams,
    clamp_offset, diagonal_words, pad_rows, padded, table_ids,
)
from sparsec.patterns import AShape, BlockSparse, Columns, Dense, MultiDiagonal, Pattern, VerticalSlash, Window

_INTERVAL_HELPERS = '''

@triton.jit
def _interval_keeps(interval, i, j):
    """Whether j lies in [max(lo_c, i + lo_d), min(hi_c, i + hi_d)]; `interval` points at the four."""
    lo_c = tl.load(interval)
    lo_d = tl.load(interval + 1)
    hi_c = tl.load(interval + 2)
    hi_d = tl.load(interval + 3)
    return (j >= tl.maximum(lo_c, i + lo_d)) & (j <= tl.minimum(hi_c, i + hi_d))
'''

HELPERS = TABLE_HELPERS + KEY_HELPERS + _INTERVAL_HELPERS

KEEP = """
keep = (i < 0) & (j < 0)
for r in tl.static_range(NUM_INTERVALS):
    keep = keep | _interval_keeps(params + 2 + 4 * r, i, j)
for r in tl.static_range(NUM_LAYOUTS):
    keep = keep | _layout_keeps(LAYOUTS, params + 2 + 4 * NUM_INTERVALS + 4 * r, i, j, Sq, Sk)
if HAS_KEY_MAP:
    keep = keep | _key_map_keeps(LAYOUTS, tl.load(params + 1), i, j, Sk)
if HAS_DIAGONALS:
    keep = keep | _diagonal_keeps(params + 2 + 4 * NUM_INTERVALS + 4 * NUM_LAYOUTS, i, j, Sq)
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
    """(other intervals, layout entries, column ranges, diagonal bands) of one head's union."""
    bands, layout_entries, columns, diagonals = [], [], [], []
    for part in pattern.parts:
        if isinstance(part, BlockSparse):
            layout_entries.append(layouts.entry(part))
            continue
        for lo_c, lo_d, hi_c, hi_d in part_intervals(part, Sq, Sk):
            if (lo_d, hi_d) == (-NO_LIMIT, NO_LIMIT):
                columns.append((lo_c, hi_c + 1))
            elif (lo_c, hi_c) == (-NO_LIMIT, NO_LIMIT):
                diagonals.append((lo_d, hi_d))  # a band of diagonals: windows, multi-diagonals, slashes
            else:
                bands.append((lo_c, lo_d, hi_c, hi_d))
    return bands, layout_entries, columns, diagonals


def pack(patterns, Sq, Sk, layouts) -> PackedParams:
    _, tables = table_ids(patterns)
    entries = [_head_entries(p, Sq, Sk, layouts) for p in patterns]
    num_intervals = max(len(e[0]) for e in entries)
    num_layouts = max(len(e[1]) for e in entries)
    has_key_map = any(e[2] for e in entries)
    has_diagonals = any(e[3] for e in entries)
    rows = []
    for table, (bands, layout_entries, columns, diagonals) in zip(tables, entries):
        bands = padded(bands, num_intervals, _EMPTY_INTERVAL)
        layout_entries = padded(layout_entries, num_layouts, LayoutBuffer.EMPTY_ENTRY)
        key_map = layouts.key_bits(columns, Sk) if has_key_map else 0
        words = diagonal_words(diagonals, Sq, Sk) if has_diagonals else []
        rows.append([table, key_map, *(x for e in bands + layout_entries for x in e), *words])
    counts = {"NUM_INTERVALS": num_intervals, "NUM_LAYOUTS": num_layouts,
              "HAS_KEY_MAP": int(has_key_map), "HAS_DIAGONALS": int(has_diagonals)}
    return PackedParams(rows=pad_rows(rows), counts=counts)


TEMPLATE = FamilyTemplate(family="union", keep=KEEP, visit=TABLE_VISIT, pack=pack, helpers=HELPERS,
                          keep_helpers=LAYOUT_HELPERS + KEY_HELPERS + _INTERVAL_HELPERS,
                          counts=("NUM_INTERVALS", "NUM_LAYOUTS", "HAS_KEY_MAP", "HAS_DIAGONALS"),
                          table_driven=True)
