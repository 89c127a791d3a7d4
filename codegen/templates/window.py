"""Window(left, right): one diagonal band, i - left <= j <= i + right. Params: (left, right)."""
from __future__ import annotations

from sparsec.codegen.templates.common import FamilyTemplate, PackedParams, clamp_offset, pad_rows

KEEP = """
left = tl.load(params)
right = tl.load(params + 1)
return (j >= i - left) & (j <= i + right)
"""

VISIT = """
left = tl.load(params)
right = tl.load(params + 1)
v_lo, v_hi, f_lo, f_hi = _interval_span(m_lo, m_hi, 0, -left, NO_LIMIT, tl.minimum(right, causal_hi), Sk, BLOCK_N)
acc, m_i, l_i = _attend_span(acc, m_i, l_i, 0, v_lo, v_hi, f_lo, f_hi,
    $CONTEXT)
"""


def pack(patterns, Sq, Sk, layouts) -> PackedParams:
    rows = [(clamp_offset(p.left, Sq, Sk), clamp_offset(p.right, Sq, Sk)) for p in patterns]
    return PackedParams(rows=pad_rows(rows), counts={})


TEMPLATE = FamilyTemplate(family="window", keep=KEEP, visit=VISIT, pack=pack)
