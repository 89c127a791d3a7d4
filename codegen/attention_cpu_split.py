"""Whether the CPU executor runs a pattern whole or as disjoint parts merged by log-sum-exp.

A pattern of a few bands far apart (MultiDiagonal at frame strides) read whole makes each query
block read the union of the bands' keys: several runs a block, gathered, under a mask as wide as
the union. Run as parts, each band (or group of touching bands) is a plan of its own: one run a
block, a strided view of K/V, a narrow mask shared by the interior blocks; the kernel returns each
row's log-sum-exp, and the parts' outputs are merged by it (attention over disjoint key sets:
out = sum_c exp(lse_c - lse) out_c with lse = logsumexp_c lse_c). The parts are exact: they keep
disjoint key sets whose union is the pattern.

Splitting pays the merge and one plan a part, and wins only when the whole plan reads the bands
as separate runs: once the bands' reads overlap (wide bands, or dense), the whole plan reads fewer
keys and its blocks fold into all-keys calls. choose_split compares the two by the executor's
work estimate (attention_cpu_plan._block_m_cost) at each query block size.
"""
from __future__ import annotations

import functools

from sparsec.codegen.attention_cpu_plan import _QUERY_BLOCK_SPEED, _block_m_cost, choose_blocks
from sparsec.codegen.attention_cpu_reads import cpu_block_reads
from sparsec.codegen.block_coverage import row_intervals
from sparsec.codegen.cpu_threads import intra_op_threads
from sparsec.patterns import MultiDiagonal, Pattern

__all__ = ["band_parts", "choose_split"]

# What the decision prices, measured on the 2-core machine with torch's fused CPU kernel: a
# (query, key) pair at D + Dv = 128 on one thread (the kernel splits it over the threads), a query
# row of a plan at D + Dv = 128 (the kernel's per-row softmax and output, the output copy), an
# SDPA call of the executor (views, mask, output store), and a scale-and-add of one output element
# when a part is merged (one thread).
_PAIR_SECONDS = 9.4e-9
_ROW_SECONDS = 0.25e-6
_CALL_SECONDS = 100e-6
_MERGE_SECONDS_PER_ELEMENT = 1.5e-9


def band_parts(pattern: Pattern) -> tuple[Pattern, ...]:
    """The pattern as disjoint parts, each one run a row: a MultiDiagonal's groups of touching
    bands (band o keeps j - i in [o - w, o + w]; bands closer than 2w + 2 touch or overlap and stay
    together). Any other pattern, or bands that all touch: (pattern,)."""
    if not isinstance(pattern, MultiDiagonal) or len(pattern.offsets) < 2:
        return (pattern,)
    groups: list[list[int]] = [[pattern.offsets[0]]]
    for offset in pattern.offsets[1:]:
        if offset - groups[-1][-1] <= 2 * pattern.width + 1:
            groups[-1].append(offset)
        else:
            groups.append([offset])
    return tuple(MultiDiagonal(group, pattern.width) for group in groups) if len(groups) > 1 else (pattern,)


@functools.lru_cache(maxsize=256)
def choose_split(pattern: Pattern, Sq: int, Sk: int, causal: bool, block_m: int | None = None, *, rows: int = 1,
                 width: int = 128, threads: int = 1) -> tuple[int, tuple[Pattern, ...]]:
    """(block_m, parts): the query block size and the parts the executor runs `pattern` as;
    parts == (pattern,) runs it whole, at choose_blocks' query block. Split, the parts share the
    query block with the least estimated time, and run so only when that beats the whole plan's
    (module docstring). block_m, when given, is kept. rows: query heads x batch that run the
    pattern together; width: D + Dv; threads: the attention kernels' intra-op threads."""
    whole_bm = block_m or choose_blocks(pattern, Sq, Sk, causal)[0]
    parts = band_parts(pattern)
    if len(parts) == 1:
        return whole_bm, parts
    pair_seconds = _PAIR_SECONDS * width / 128 / max(1, threads)
    row_seconds = _ROW_SECONDS * width / 128
    merge_seconds = _MERGE_SECONDS_PER_ELEMENT * width / 2  # one row of Dv ~ width / 2

    def seconds(option: tuple[Pattern, ...], bm: int) -> float:
        work = sum(_block_m_cost(*intervals[part], Sq, Sk, bm) for part in option) * rows * pair_seconds
        calls = sum(cpu_block_reads(part, Sq, Sk, bm, causal).calls for part in option)
        per_row = len(option) * row_seconds + (len(option) - 1) * merge_seconds
        return work + calls * _CALL_SECONDS + rows * Sq * per_row

    with intra_op_threads(1):
        intervals = {part: row_intervals(part, Sq, Sk, causal) for part in (pattern,) + parts}
        candidates = [block_m] if block_m else sorted({min(bm, Sq) for bm in _QUERY_BLOCK_SPEED})
        split_bm = min(candidates, key=lambda bm: seconds(parts, bm))
        if seconds(parts, split_bm) < seconds((pattern,), whole_bm):
            return split_bm, parts
    return whole_bm, (pattern,)
