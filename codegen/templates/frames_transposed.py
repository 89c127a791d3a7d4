"""FramesTransposed(base, frame): a pattern of bands with its tokens in frame-transposed order
(codegen/frame_order.py), which triton_attention runs for a video model's temporal heads when the
cost model says the permutation pays. Table-driven like BlockSparse: the block tables come from
the renumbered pattern's exact coverage, so a temporal head's dozens of narrow diagonals become a
few runs of whole and partial blocks.

In transposed order a block's kept pairs follow no closed form the kernel could test cheaply (a
diagonal of token pairs is scattered over the tile), so the host precomputes each partial block's
element mask as bits (tables.BlockTables.masks: block_m rows of block_n / 32 words, causal rule in
token order included) and the visit hands the block's bits to the mask in place of the head's
parameters: a load a row and a shift an element, as BlockSparse's layouts. The launch passes
CAUSAL=False (the rule lives in the masks and in the tables' full blocks).
Params: (table,).
"""
from __future__ import annotations

from sparsec.codegen.templates.common import _CONTEXT, TABLE_HELPERS, FamilyTemplate, PackedParams, pad_rows, table_ids

KEEP = """
# `params` points at this block's bits: row r's words at params + r * words
rows = i - tl.min(i)
column = j - tl.min(j)
keep = (i < 0) & (j < 0)
for w in tl.static_range((j.shape[1] + 31) // 32):
    word = tl.load(params + rows * ((j.shape[1] + 31) // 32) + w).to(tl.int64) & 0xFFFFFFFF
    in_word = (column >= 32 * w) & (column < 32 * w + 32)
    shift = tl.where(in_word, column - 32 * w, 0).to(tl.int64)
    keep = keep | (in_word & (((word >> shift) & 1) != 0))
return keep
"""

# The blocks' visit passes each partial block's bits where the others pass the head's params.
_MASKED_CONTEXT = _CONTEXT.replace("params, LAYOUTS", "block_mask, LAYOUTS")

VISIT = """
table_row = tl.load(params) * tl.num_programs(0) + start_m
for t in range(0, tl.load(KV_NUM_PARTIAL + table_row)):
    n = tl.load(KV_PARTIAL + table_row * max_partial + t)
    block_mask = BLOCK_MASKS + (table_row * max_partial + t).to(tl.int64) * (BLOCK_M * ((BLOCK_N + 31) // 32))
    acc, m_i, l_i = _attend_block(acc, m_i, l_i, n, True,
        """ + _MASKED_CONTEXT + """)
acc, m_i, l_i = _attend_table(acc, m_i, l_i, KV_NUM_FULL, KV_FULL, max_full, table_row, False,
                              $CONTEXT)
"""


def pack(patterns, Sq, Sk, layouts) -> PackedParams:
    _, tables = table_ids(patterns)
    return PackedParams(rows=pad_rows([(table,) for table in tables]), counts={})


TEMPLATE = FamilyTemplate(family="frames_transposed", keep=KEEP, visit=VISIT, pack=pack, helpers=TABLE_HELPERS,
                          table_driven=True, block_masks=True)
