"""BlockSparse(layout, block): table-driven. The host lists, per query block, the partial and the
whole key blocks (block_coverage.kv_block_table, cached per pattern, shapes and tiles); the mask
of partial blocks reads the layout. Params: (table, layout offset, bq, bk, layout columns).
"""
from __future__ import annotations

from sparsec.codegen.templates.common import (
    LAYOUT_HELPERS, TABLE_HELPERS, TABLE_VISIT, FamilyTemplate, PackedParams, pad_rows, table_ids,
)

KEEP = """
return _layout_keeps(LAYOUTS, params + 1, i, j, Sq, Sk)
"""


def pack(patterns, Sq, Sk, layouts) -> PackedParams:
    _, tables = table_ids(patterns)
    rows = [(table, *layouts.entry(p)) for p, table in zip(patterns, tables)]
    return PackedParams(rows=pad_rows(rows), counts={})


TEMPLATE = FamilyTemplate(family="block_sparse", keep=KEEP, visit=TABLE_VISIT, pack=pack,
                          helpers=TABLE_HELPERS, keep_helpers=LAYOUT_HELPERS,
                          table_driven=True)
