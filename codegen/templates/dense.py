"""Dense: every key block up to the causal limit; only the causal diagonal and the Sk edge are masked."""
from __future__ import annotations

from sparsec.codegen.templates.common import FamilyTemplate, PackedParams, pad_rows

KEEP = """
return j >= 0  # every key; the caller adds the causal rule and the Sk bound
"""

VISIT = """
v_lo, v_hi, f_lo, f_hi = _interval_span(m_lo, m_hi, 0, -NO_LIMIT, NO_LIMIT, causal_hi, Sk, BLOCK_N)
acc, m_i, l_i = _attend_span(acc, m_i, l_i, 0, v_lo, v_hi, f_lo, f_hi,
    $CONTEXT)
"""


def pack(patterns, Sq, Sk, layouts) -> PackedParams:
    return PackedParams(rows=pad_rows([() for _ in patterns]), counts={})


TEMPLATE = FamilyTemplate(family="dense", keep=KEEP, visit=VISIT, pack=pack)
