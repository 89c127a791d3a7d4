"""Per-head candidate patterns fitted from calibration statistics, and their measured error.

For every head and every family, parameters are fitted to cover a share ("recall") of the head's
attention mass at several levels (DEFAULT_RECALLS), which spans the family's sparsity range:

    Window(left, right)      the narrowest band around offset 0 holding the share (diagonal mass)
    AShape(sink, window)     leading sink columns + a causal band, the cheapest split of the share
    MultiDiagonal(o, width)  peaks of the diagonal mass at each width, snapped to the frame stride
                             when the peaks sit at multiples of one (video: same position in
                             neighbouring frames)
    Columns(ranges)          the heaviest key columns, as at most MAX_RANGES ranges
    VerticalSlash(c, o)      the heaviest columns and width-0 diagonals, taken together by mass
    BlockSparse(layout, t)   the heaviest blocks at each tile size t, plus every block on the
                             causal diagonal (so no query row is left without keys)
    Skip("mean"), Dense()    always

Recall only proposes; what counts is the error each candidate causes on the layer's output,
measured exactly with `sparsec.attention` on the calibration inputs (`measure_candidates`).
Parameters are rounded up to a quantum that grows with the sequence length: the rounding
barely changes cost (tiles are coarser) and lets heads and layers share candidates, so the cost
model is asked about fewer distinct patterns.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsec.passes.attention_stats import AttentionStats, LayerSample, pool_block_mass
from sparsec.patterns import (
    AShape, BlockSparse, Columns, Dense, MultiDiagonal, Pattern, Skip, VerticalSlash, Window,
)

__all__ = [
    "DEFAULT_RECALLS", "HeadCandidates", "fit_candidates", "fit_head_patterns", "frame_stride",
    "measure_candidates", "error_backend",
]

log = logging.getLogger(__name__)

DEFAULT_RECALLS = (0.8, 0.9, 0.97, 0.99, 0.997, 0.999)
MAX_RANGES = 32      # column ranges per Columns / VerticalSlash pattern (kernel parameter tables)
MAX_OFFSETS = 32     # diagonals per MultiDiagonal / VerticalSlash pattern
# Guards float round-off when comparing covered mass to a share of a total.
_EPS = 1e-12


@dataclass(frozen=True, slots=True, kw_only=True)
class HeadCandidates:
    """A head's candidate patterns and the squared error each causes on the head's output,
    ||O_h(candidate) - O_h(dense)||^2 summed over the calibration samples."""

    patterns: tuple[Pattern, ...]
    squared_errors: tuple[float, ...]
    dense_norm2: float                   # ||O_h(dense)||^2 over the same samples


# -- fitting -------------------------------------------------------------------------------------


def fit_candidates(
    stats: AttentionStats,
    *,
    tiles: Sequence[tuple[int, int]],
    recalls: Sequence[float] = DEFAULT_RECALLS,
) -> list[tuple[Pattern, ...]]:
    """Candidate patterns of every head: Dense first, then each family at each recall level,
    BlockSparse at each tile size in `tiles`; duplicates removed."""
    _check_recalls(recalls)
    pooled = {t: pool_block_mass(stats.block_mass, _pool_factor(stats.block, t)) for t in set(tiles)}
    return [fit_head_patterns(stats, h, pooled_blocks={t: b[h] for t, b in pooled.items()}, recalls=recalls)
            for h in range(stats.num_heads)]


def fit_head_patterns(
    stats: AttentionStats,
    head: int,
    *,
    pooled_blocks: dict[tuple[int, int], torch.Tensor],
    recalls: Sequence[float] = DEFAULT_RECALLS,
) -> tuple[Pattern, ...]:
    """One head's candidates; `pooled_blocks` maps a tile (bm, bn) to the head's block mass
    pooled at that tile (pool_block_mass)."""
    diag, cols = stats.diagonal_mass[head], stats.column_mass[head]
    total = float(cols.sum())
    found: list[Pattern] = [Dense(), Skip("mean")]
    if total <= 0.0:  # no query row keeps a key: nothing to fit
        return tuple(found)
    targets = [r * total for r in recalls]
    quantum = max(1, min(64, stats.q_len // 256))
    found += fit_windows(diag, stats.q_len, stats.kv_len, targets, quantum)
    found += fit_a_shapes(diag, cols, stats.q_len, targets, quantum)
    found += fit_multi_diagonals(diag, stats.q_len, targets)
    found += fit_columns(cols, targets)
    found += fit_vertical_slashes(cols, diag, stats.q_len, targets)
    for tile, blocks in pooled_blocks.items():
        found += fit_block_sparse(blocks, tile, stats.q_len, stats.kv_len, stats.causal, targets)
    return tuple(dict.fromkeys(found))


def _check_recalls(recalls: Sequence[float]) -> None:
    if not recalls or any(not 0.0 < r <= 1.0 for r in recalls):
        raise ValueError(f"recalls must be a non-empty sequence of shares in (0, 1], got {recalls!r}")


def _pool_factor(base: tuple[int, int], tile: tuple[int, int]) -> tuple[int, int]:
    if tile[0] % base[0] or tile[1] % base[1]:
        raise ValueError(f"tile {tile} is not a multiple of the statistics block {base}")
    return tile[0] // base[0], tile[1] // base[1]


def _round_up(value: int, quantum: int, limit: int) -> int:
    return min(limit, -(-value // quantum) * quantum)


def _prefix(values: torch.Tensor) -> torch.Tensor:
    """Cumulative sums with a leading 0: prefix[t] = sum of values[:t]."""
    return F.pad(values.cumsum(0), (1, 0))


def fit_windows(diag: torch.Tensor, Sq: int, Sk: int, targets: Sequence[float], quantum: int) -> list[Window]:
    """For each target mass, the narrowest Window(left, right) (offsets -left..right, holding
    offset 0) whose diagonals carry it."""
    prefix, t0 = _prefix(diag), Sq - 1
    lefts = torch.arange(t0 + 1)
    base = prefix[t0 - lefts]                       # mass of offsets below -left
    found = []
    for target in targets:
        end = torch.searchsorted(prefix, base + target - _EPS)  # first t with prefix[t] >= need
        feasible = end <= diag.shape[0]
        if not bool(feasible.any()):
            continue
        right = (end - 1 - t0).clamp(min=0)
        width = torch.where(feasible, lefts + right, torch.iinfo(torch.int64).max)
        best = int(width.argmin())
        found.append(Window(_round_up(best, quantum, Sq - 1), _round_up(int(right[best]), quantum, Sk - 1)))
    return found


def fit_a_shapes(diag: torch.Tensor, cols: torch.Tensor, Sq: int, targets: Sequence[float], quantum: int) -> list[AShape]:
    """For each target, the cheapest AShape(sink, window) (sink + window keys a row) whose sink
    columns plus causal band carry it. The overlap of the two for the first rows is ignored."""
    t0 = Sq - 1
    prefix = _prefix(diag)
    band = prefix[t0 + 1] - prefix[t0 - torch.arange(t0 + 1)]     # mass of offsets -w..0, rising in w
    col_prefix = _prefix(cols)
    sinks = sorted({min(quantum * 2 ** e, cols.shape[0]) for e in range(int(math.log2(max(1, cols.shape[0] // 4))) + 1)})
    found = []
    for target in targets:
        best = None
        for sink in sinks:
            w = int(torch.searchsorted(band, target - float(col_prefix[sink]) - _EPS))
            if w <= t0 and (best is None or sink + w < best[0] + best[1]):
                best = (sink, w)
        if best is not None:
            found.append(AShape(best[0], _round_up(best[1], quantum, Sq - 1)))
    return found


def fit_multi_diagonals(diag: torch.Tensor, Sq: int, targets: Sequence[float]) -> list[MultiDiagonal]:
    """For each target, the MultiDiagonal with the fewest kept diagonals (offsets x (2 width + 1))
    found among peak sets at widths 0, 1, 2, 4, ...: the heaviest local maxima of the
    width-smoothed diagonal mass, snapped to a frame stride when they sit on one."""
    per_width = [(w, _diagonal_peaks(diag, w)) for w in _widths(Sq)]
    found = []
    for target in targets:
        best = None
        for w, (offsets, covered) in per_width:
            n = int(torch.searchsorted(covered, target - _EPS)) + 1
            if n <= len(offsets) and (best is None or n * (2 * w + 1) < best[0]):
                best = (n * (2 * w + 1), w, offsets[:n])
        if best is not None:
            _, w, peaks = best
            offsets, width = snap_to_stride(sorted(t - (Sq - 1) for t in peaks), w)
            found.append(MultiDiagonal(offsets, width))
    return found


def _widths(Sq: int) -> list[int]:
    return [0] + [2 ** e for e in range(int(math.log2(max(1, Sq // 8))) + 1)]


def _diagonal_peaks(diag: torch.Tensor, width: int) -> tuple[list[int], torch.Tensor]:
    """The heaviest (at most MAX_OFFSETS) offsets whose +-width window is a local maximum of the
    window mass, heaviest first, and the cumulative mass of their windows."""
    prefix, L = _prefix(diag), diag.shape[0]
    t = torch.arange(L)
    windows = prefix[(t + width + 1).clamp(max=L)] - prefix[(t - width).clamp(min=0)]
    local_max = F.max_pool1d(windows[None, None], 2 * width + 1, stride=1, padding=width)[0, 0]
    peaks = torch.where((windows >= local_max) & (windows > 0), windows, torch.zeros(()))
    top = peaks.topk(min(MAX_OFFSETS, int((peaks > 0).sum())))
    return top.indices.tolist(), top.values.cumsum(0)


def frame_stride(offsets: Sequence[int], width: int) -> int | None:
    """The stride s of peaks at multiples k * s (video: the same position in neighbouring
    frames): among the offsets beyond the central band, the one whose multiples every offset
    lies closest to, within max(1, width) (peaks spread over +-1 neighbours); else None."""
    outer = sorted({abs(o) for o in offsets if abs(o) > 2 * width + 1})
    if not outer:
        return None
    deviation, stride = min((_stride_deviation(offsets, s), s) for s in outer[:MAX_OFFSETS])
    return stride if deviation <= max(1, width) else None


def _stride_deviation(offsets: Sequence[int], stride: int) -> int:
    return max(abs(o - stride * round(o / stride)) for o in offsets)


def snap_to_stride(offsets: Sequence[int], width: int) -> tuple[list[int], int]:
    """(offsets, width) on exact multiples of the frame stride, widened to keep covering the
    given diagonals, with the gaps between the extreme multiples filled (every neighbouring frame
    up to the farthest one seen) if the filled set fits MAX_OFFSETS; unchanged without a stride."""
    stride = frame_stride(offsets, width)
    if stride is None:
        return list(offsets), width
    multiples = [round(o / stride) for o in offsets]
    filled = list(range(min(multiples), max(multiples) + 1))
    chosen = filled if len(filled) <= MAX_OFFSETS else sorted(set(multiples))
    return [m * stride for m in chosen], width + _stride_deviation(offsets, stride)


def _heaviest(values: torch.Tensor, target: float) -> torch.Tensor | None:
    """Indices of the fewest entries of `values` (heaviest first) whose sum reaches target."""
    order = values.argsort(descending=True)
    covered = values[order].cumsum(0)
    n = int(torch.searchsorted(covered, target - _EPS)) + 1
    if n > int((values > 0).sum()):
        return None
    return order[:n]


def column_ranges(columns: Sequence[int], max_ranges: int = MAX_RANGES) -> list[tuple[int, int]]:
    """[start, end) ranges covering sorted `columns`; at most max_ranges, by bridging the
    smallest gaps (keeping a few extra columns is cheaper than a longer parameter table)."""
    cols = torch.tensor(sorted(set(columns)), dtype=torch.int64)
    gaps = cols[1:] - cols[:-1]
    breaks = (gaps > 1).nonzero().flatten()
    if len(breaks) >= max_ranges:
        breaks = breaks[gaps[breaks].topk(max_ranges - 1).indices].sort().values
    starts = torch.cat([cols[:1], cols[breaks + 1]]).tolist()
    ends = torch.cat([cols[breaks], cols[-1:]]).tolist()
    return [(s, e + 1) for s, e in zip(starts, ends)]


def fit_columns(cols: torch.Tensor, targets: Sequence[float]) -> list[Columns]:
    found = []
    for target in targets:
        chosen = _heaviest(cols, target)
        if chosen is not None:
            found.append(Columns(column_ranges(chosen.tolist())))
    return found


def fit_vertical_slashes(cols: torch.Tensor, diag: torch.Tensor, Sq: int, targets: Sequence[float]) -> list[VerticalSlash]:
    """Columns and width-0 diagonals taken together, heaviest first (MInference's vertical-slash)."""
    Sk = cols.shape[0]
    found = []
    for target in targets:
        chosen = _heaviest(torch.cat([cols, diag]), target)
        if chosen is None:
            continue
        columns = chosen[chosen < Sk].tolist()
        offsets = (chosen[chosen >= Sk] - Sk - (Sq - 1)).tolist()[:MAX_OFFSETS]
        found.append(VerticalSlash(column_ranges(columns) if columns else [], offsets))
    return found


def fit_block_sparse(blocks: torch.Tensor, tile: tuple[int, int], Sq: int, Sk: int, causal: bool,
                     targets: Sequence[float]) -> list[BlockSparse]:
    """Heaviest blocks of `blocks` (nqb, nkb) at each target, always with the anchor blocks."""
    anchors = _anchor_blocks(blocks, tile, Sq, Sk, causal)
    rest = blocks.flatten().masked_fill(anchors.flatten(), 0.0)
    anchored = float(blocks[anchors].sum())
    found = []
    for target in targets:
        layout = anchors.clone().flatten()
        if target > anchored:
            chosen = _heaviest(rest, target - anchored)
            if chosen is None:
                continue
            layout[chosen] = True
        if not bool(layout.all()):  # all blocks kept is Dense, already a candidate
            found.append(BlockSparse(layout.view(blocks.shape), tile))
    return found


def _anchor_blocks(blocks: torch.Tensor, tile: tuple[int, int], Sq: int, Sk: int, causal: bool) -> torch.Tensor:
    """Blocks every BlockSparse candidate keeps: causal, those holding the causal diagonal
    j = i + Sk - Sq (each row's last key, so no row is left empty); otherwise each query
    block's heaviest block."""
    nqb, nkb = blocks.shape
    if not causal:
        anchors = torch.zeros(nqb, nkb, dtype=torch.bool)
        anchors[torch.arange(nqb), blocks.argmax(dim=1)] = True
        return anchors
    bm, bn = tile
    first = torch.arange(nqb) * bm
    last = (first + bm).clamp(max=Sq) - 1
    lo = (first + Sk - Sq).clamp(0, Sk - 1) // bn
    hi = (last + Sk - Sq).clamp(0, Sk - 1) // bn
    kb = torch.arange(nkb)[None, :]
    has_diagonal = (last + Sk - Sq >= 0)[:, None]
    return (kb >= lo[:, None]) & (kb <= hi[:, None]) & has_diagonal


# -- measuring -----------------------------------------------------------------------------------


def error_backend(q: torch.Tensor) -> str:
    """The sparsec.attention backend for measuring errors: the kernels on CUDA; on the CPU the
    block-skipping executor when it is installed, else the exact masked path."""
    if q.is_cuda:
        return "auto"
    try:
        import sparsec.codegen.attention_cpu  # noqa: F401
    except ImportError:
        return "masked"
    return "cpu"


def measure_candidates(
    samples: Sequence[LayerSample],
    head_patterns: Sequence[tuple[Pattern, ...]],
    *,
    backend: str | None = None,
) -> list[HeadCandidates]:
    """The squared output error of every head's every candidate, summed over the samples.

    Round r runs candidate r of every head in one sparsec.attention call (heads with fewer
    candidates run Skip("zero"), which costs nothing): rounds = the longest candidate list.
    Dense candidates have error 0 by definition and are not run."""
    from sparsec.attention_dispatch import attention

    num_heads = len(head_patterns)
    errors = torch.zeros(num_heads, max(len(p) for p in head_patterns), dtype=torch.float64)
    dense_norm2 = torch.zeros(num_heads, dtype=torch.float64)
    idle = Skip("zero")
    for s in samples:
        run_backend = backend or error_backend(s.q)
        call = dict(causal=s.causal, scale=s.scale, backend=run_backend)
        dense = attention(s.q, s.k, s.v, Dense(), **call)
        dense_norm2 += dense.double().square().sum(dim=(0, 2, 3)).cpu()
        for r in range(errors.shape[1]):
            round_patterns = [p[r] if r < len(p) and not isinstance(p[r], Dense) else idle for p in head_patterns]
            if all(p is idle for p in round_patterns):
                continue
            out = attention(s.q, s.k, s.v, round_patterns, **call)
            errors[:, r] += (out.double() - dense.double()).square().sum(dim=(0, 2, 3)).cpu()
    return [HeadCandidates(patterns=tuple(p), squared_errors=_dense_zero(p, errors[h]),
                           dense_norm2=float(dense_norm2[h]))
            for h, p in enumerate(head_patterns)]


def _dense_zero(patterns: tuple[Pattern, ...], row: torch.Tensor) -> tuple[float, ...]:
    return tuple(0.0 if isinstance(p, Dense) else float(row[r]) for r, p in enumerate(patterns))
