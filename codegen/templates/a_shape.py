"""AShape(sink, window): the first `sink` keys plus the band i - window <= j <= i. Params: (sink, window).

The sink's blocks start at block 0, so the band starts where the sink stopped.
"""
from __future__ import annotations

from sparsec.codegen.templates.common import FamilyTemplate, PackedParams, clamp_offset, pad_rows

KEEP = """
sink = tl.load(params)
window = tl.load(params + 1)
return (j < sink) | ((j >= i - window) & (j <= i))
"""

VISIT = """
sink = tl.load(params)
window = tl.load(params + 1)
v_lo, v_hi, f_lo, f_hi = _interval_span(m_lo, m_hi, 0, -NO_LIMIT, sink - 1, causal_hi, Sk, BLOCK_N)
acc, m_i, l_i = _attend_span(acc, m_i, l_i, 0, v_lo, v_hi, f_lo, f_hi,
    $CONTEXT)
visited = v_hi
v_lo, v_hi, f_lo, f_hi = _interval_span(m_lo, m_hi, 0, -window, NO_LIMIT, tl.minimum(0, causal_hi), Sk, BLOCK_N)
acc, m_i, l_i = _attend_span(acc, m_i, l_i, visited, v_lo, v_hi, f_lo, f_hi,
    $CONTEXT)
"""


def pack(patterns, Sq, Sk, layouts) -> PackedParams:
    rows = [(min(p.sink, Sk), clamp_offset(p.window, Sq, Sk)) for p in patterns]
    return PackedParams(rows=pad_rows(rows), counts={})


TEMPLATE = FamilyTemplate(family="a_shape", keep=KEEP, visit=VISIT, pack=pack)
