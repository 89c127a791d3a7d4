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

Each family is fitted for all heads at once (`fit_*_many`; the single-head `fit_*` functions are
those with one head) on the device the statistics live on, and the candidates' errors add up on
the samples' device: no per-head host round trip.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sparsec.passes.attention_stats import AttentionStats, LayerSample, pool_block_mass
from sparsec.patterns import (
    AShape, BlockSparse, Columns, Dense, MultiDiagonal, Pattern, Skip, VerticalSlash, Window,
)

__all__ = [
    "DEFAULT_RECALLS", "MAX_SELECTED_DENSITY", "HeadCandidates", "block_sparse", "column_ranges", "error_backend",
    "fit_a_shapes", "fit_a_shapes_many", "fit_block_sparse", "fit_block_sparse_many", "fit_candidates", "fit_columns",
    "fit_columns_many", "fit_head_patterns", "fit_multi_diagonals", "fit_multi_diagonals_many",
    "fit_vertical_slashes", "fit_vertical_slashes_many", "fit_windows", "fit_windows_many", "frame_stride",
    "dense_outputs", "measure_candidates", "sliding_max", "snap_to_stride",
]

log = logging.getLogger(__name__)

DEFAULT_RECALLS = (0.8, 0.9, 0.97, 0.99, 0.997, 0.999)
MAX_RANGES = 32      # column ranges per Columns / VerticalSlash pattern (kernel parameter tables)
MAX_OFFSETS = 64     # diagonals per MultiDiagonal / VerticalSlash pattern
# Guards float round-off when comparing covered mass to a share of a total.
_EPS = 1e-12
# Columns, slashes and block layouts are chosen by the calibration sample's attention mass. One
# that needs more than this share of the keys to reach its recall says the head has no such
# structure: the pick fits the sample, not the head (measured: a head of random attention took an
# 84%-dense Columns at 3% error in-sample and gave 14% on fresh inputs), for less than 2x. It
# bounds the columns kept after bridging gaps (column_ranges) as well as those chosen.
MAX_SELECTED_DENSITY = 0.5


@dataclass(frozen=True, slots=True, kw_only=True)
class HeadCandidates:
    """A head's candidate patterns and the squared error each causes on the head's output,
    ||O_h(candidate) - O_h(dense)||^2 summed over the calibration samples."""

    patterns: tuple[Pattern, ...]
    squared_errors: tuple[float, ...]
    dense_norm2: float                   # ||O_h(dense)||^2 over the same samples


# -- fitting -------------------------------------------------------------------------------------
#
# Every family is fitted for all heads at once: the statistics stay where they were computed (the
# GPU, when calibration ran there), each family is a few batched tensor operations over (heads,
# targets, ...), and the small results come to the host in one transfer per family, where the
# patterns are built. No per-head loop touches the device.


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
    return _fit(stats, pooled, recalls)


def fit_head_patterns(
    stats: AttentionStats,
    head: int,
    *,
    pooled_blocks: dict[tuple[int, int], torch.Tensor],
    recalls: Sequence[float] = DEFAULT_RECALLS,
) -> tuple[Pattern, ...]:
    """One head's candidates; `pooled_blocks` maps a tile (bm, bn) to the head's block mass
    pooled at that tile (pool_block_mass)."""
    _check_recalls(recalls)
    one = AttentionStats(q_len=stats.q_len, kv_len=stats.kv_len, causal=stats.causal, block=stats.block,
                         block_mass=stats.block_mass[head:head + 1], column_mass=stats.column_mass[head:head + 1],
                         diagonal_mass=stats.diagonal_mass[head:head + 1], rows=stats.rows)
    return _fit(one, {t: b[None] for t, b in pooled_blocks.items()}, recalls)[0]


def _fit(stats: AttentionStats, pooled: dict[tuple[int, int], torch.Tensor], recalls: Sequence[float]) -> list[tuple[Pattern, ...]]:
    diag, cols = stats.diagonal_mass, stats.column_mass
    totals = torch.stack([c.sum() for c in cols])  # per head, as a 1-D sum (bitwise what one head gets)
    targets = totals[:, None] * torch.tensor(recalls, dtype=totals.dtype, device=totals.device)
    quantum = max(1, min(64, stats.q_len // 256))
    families = [
        fit_windows_many(diag, targets, stats.q_len, stats.kv_len, quantum),
        fit_a_shapes_many(diag, cols, stats.q_len, targets, quantum),
        fit_multi_diagonals_many(diag, stats.q_len, targets),
        fit_columns_many(cols, targets),
        fit_vertical_slashes_many(cols, diag, stats.q_len, targets),
    ]
    families += [fit_block_sparse_many(blocks, targets, tile, stats.q_len, stats.kv_len, stats.causal)
                 for tile, blocks in pooled.items()]
    found = []
    for h, total in enumerate(totals.tolist()):
        head: list[Pattern] = [Dense(), Skip("mean")]
        if total > 0.0:  # otherwise no query row keeps a key: nothing to fit
            for family in families:
                head += family[h]
        found.append(tuple(dict.fromkeys(head)))
    return found


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
    """Cumulative sums along the last axis with a leading 0: prefix[..., t] = sum of values[..., :t]."""
    return F.pad(values.cumsum(-1), (1, 0))


def _one_head(values: torch.Tensor, targets: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    return values[None], torch.tensor([list(targets)], dtype=values.dtype, device=values.device)


def fit_windows(diag: torch.Tensor, Sq: int, Sk: int, targets: Sequence[float], quantum: int) -> list[Window]:
    """For each target mass, the narrowest Window(left, right) (offsets -left..right, holding
    offset 0) whose diagonals carry it."""
    return fit_windows_many(*_one_head(diag, targets), Sq, Sk, quantum)[0]


def fit_windows_many(diag: torch.Tensor, targets: torch.Tensor, Sq: int, Sk: int, quantum: int) -> list[list[Window]]:
    """fit_windows for every head: diag (H, Sq + Sk - 1), targets (H, T)."""
    H, T = targets.shape
    prefix, t0 = _prefix(diag), Sq - 1
    lefts = torch.arange(t0 + 1, device=diag.device)
    base = prefix[:, t0 - lefts]                                   # mass of offsets below -left
    need = (base[:, None, :] + targets[:, :, None] - _EPS).flatten(1)
    end = torch.searchsorted(prefix, need).view(H, T, t0 + 1)     # first t with prefix[t] >= need
    feasible = end <= diag.shape[1]
    right = (end - 1 - t0).clamp(min=0)
    width = torch.where(feasible, lefts + right, torch.iinfo(torch.int64).max)
    best = width.argmin(dim=2)
    found = torch.stack([feasible.any(dim=2), best, right.gather(2, best[..., None])[..., 0]]).tolist()
    return [[Window(_round_up(left, quantum, Sq - 1), _round_up(r, quantum, Sk - 1))
             for ok, left, r in zip(*(found[i][h] for i in range(3))) if ok] for h in range(H)]


def fit_a_shapes(diag: torch.Tensor, cols: torch.Tensor, Sq: int, targets: Sequence[float], quantum: int) -> list[AShape]:
    """For each target, the cheapest AShape(sink, window) (sink + window keys a row) whose sink
    columns plus causal band carry it. The overlap of the two for the first rows is ignored."""
    return fit_a_shapes_many(diag[None], cols[None], Sq, _one_head(cols, targets)[1], quantum)[0]


def fit_a_shapes_many(diag: torch.Tensor, cols: torch.Tensor, Sq: int, targets: torch.Tensor, quantum: int) -> list[list[AShape]]:
    """fit_a_shapes for every head: diag (H, Sq + Sk - 1), cols (H, Sk), targets (H, T)."""
    H, T = targets.shape
    t0, Sk = Sq - 1, cols.shape[1]
    prefix = _prefix(diag)
    band = prefix[:, t0 + 1:t0 + 2] - prefix[:, t0 - torch.arange(t0 + 1, device=diag.device)]  # offsets -w..0, rising in w
    sinks = sorted({min(quantum * 2 ** e, Sk) for e in range(int(math.log2(max(1, Sk // 4))) + 1)})
    need = targets[:, :, None] - _prefix(cols)[:, sinks][:, None, :] - _EPS
    windows = torch.searchsorted(band, need.flatten(1)).view(H, T, len(sinks)).tolist()
    found = []
    for h in range(H):
        head = []
        for per_sink in windows[h]:
            best = None
            for sink, w in zip(sinks, per_sink):
                if w <= t0 and (best is None or sink + w < best[0] + best[1]):
                    best = (sink, w)
            if best is not None:
                head.append(AShape(best[0], _round_up(best[1], quantum, Sq - 1)))
        found.append(head)
    return found


def fit_multi_diagonals(diag: torch.Tensor, Sq: int, targets: Sequence[float]) -> list[MultiDiagonal]:
    """For each target, the MultiDiagonal with the fewest kept diagonals (offsets x (2 width + 1))
    found among peak sets at widths 0, 1, 2, 4, ...: the heaviest local maxima of the
    width-smoothed diagonal mass, snapped to a frame stride when they sit on one."""
    return fit_multi_diagonals_many(diag[None], Sq, _one_head(diag, targets)[1])[0]


def fit_multi_diagonals_many(diag: torch.Tensor, Sq: int, targets: torch.Tensor) -> list[list[MultiDiagonal]]:
    """fit_multi_diagonals for every head: diag (H, Sq + Sk - 1), targets (H, T)."""
    H = targets.shape[0]
    widths = _widths(Sq)
    peaks = [_diagonal_peaks(diag, w) for w in widths]
    counts = torch.stack([torch.searchsorted(covered, targets - _EPS) + 1 for _, covered, _ in peaks]).tolist()
    offsets, found_peaks = [p[0].tolist() for p in peaks], [p[2].tolist() for p in peaks]
    found = []
    for h in range(H):
        head = []
        for t in range(targets.shape[1]):
            best = None
            for i, w in enumerate(widths):
                n = counts[i][h][t]
                if n <= found_peaks[i][h] and (best is None or n * (2 * w + 1) < best[0]):
                    best = (n * (2 * w + 1), w, offsets[i][h][:n])
            if best is not None:
                _, w, chosen = best
                head.append(MultiDiagonal(*snap_to_stride(sorted(o - (Sq - 1) for o in chosen), w)))
        found.append(head)
    return found


def _widths(Sq: int) -> list[int]:
    return [0] + [2 ** e for e in range(int(math.log2(max(1, Sq // 8))) + 1)]


def _diagonal_peaks(diag: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per head (diag (H, L)): the heaviest (at most MAX_OFFSETS) offsets whose +-width window is
    a local maximum of the window mass, heaviest first, (H, k); the cumulative mass of their
    windows (H, k); and how many there are (H,) (entries past that are padding)."""
    prefix, L = _prefix(diag), diag.shape[1]
    t = torch.arange(L, device=diag.device)
    windows = prefix[:, (t + width + 1).clamp(max=L)] - prefix[:, (t - width).clamp(min=0)]
    local_max = sliding_max(windows, width)
    peaks = torch.where((windows >= local_max) & (windows > 0), windows, torch.zeros((), dtype=windows.dtype, device=windows.device))
    top = peaks.topk(min(MAX_OFFSETS, L), dim=1)
    return top.indices, top.values.cumsum(1), (peaks > 0).sum(dim=1).clamp(max=MAX_OFFSETS)


def sliding_max(values: torch.Tensor, radius: int) -> torch.Tensor:
    """max(values[..., t - radius : t + radius + 1]) for every t along the last axis (the window
    clipped at the ends): what max_pool1d(kernel 2 radius + 1, padding radius) gives, in O(L)
    rather than O(L radius) (van Herk / Gil-Werman: running maxima within blocks of the window's
    length, forward and backward, so each window is one suffix and one prefix)."""
    k = 2 * radius + 1
    if k == 1:
        return values.clone()
    L = values.shape[-1]
    blocks = -(-(L + 2 * radius) // k)
    padded = F.pad(values, (radius, blocks * k - L - radius), value=-math.inf).unflatten(-1, (blocks, k))
    prefix = padded.cummax(dim=-1).values.flatten(-2)
    suffix = padded.flip(-1).cummax(dim=-1).values.flip(-1).flatten(-2)
    return torch.maximum(suffix[..., :L], prefix[..., k - 1:k - 1 + L])


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


def _heaviest(values: torch.Tensor, targets: torch.Tensor) -> list[list[np.ndarray | None]]:
    """Per head (values (H, n), targets (H, T)) and target: the indices (int64 numpy) of the
    fewest entries, heaviest first, whose sum reaches the target, or None if all positive
    entries fall short. One sort per head, one transfer of the indices the targets need."""
    order = values.argsort(dim=1, descending=True)
    covered = values.gather(1, order).cumsum(dim=1)
    counts = torch.searchsorted(covered, targets - _EPS) + 1
    counts = torch.where(counts <= (values > 0).sum(dim=1, keepdim=True), counts, 0)
    counts_host = counts.tolist()
    chosen = order[:, :max(1, max(max(row) for row in counts_host))].cpu().numpy()
    return [[chosen[h, :n] if n else None for n in row] for h, row in enumerate(counts_host)]


def column_ranges(columns: Sequence[int], max_ranges: int = MAX_RANGES) -> list[tuple[int, int]]:
    """[start, end) ranges covering sorted `columns`; at most max_ranges, by bridging the
    smallest gaps (keeping a few extra columns is cheaper than a longer parameter table)."""
    return _ranges(np.unique(np.asarray(columns, dtype=np.int64)), max_ranges)


def _ranges(cols: np.ndarray, max_ranges: int = MAX_RANGES) -> list[tuple[int, int]]:
    """column_ranges of sorted, distinct columns."""
    gaps = np.diff(cols)
    breaks = np.flatnonzero(gaps > 1)  # a range ends after cols[i]
    if len(breaks) >= max_ranges:  # keep the widest gaps (torch.topk's choice among equal ones)
        breaks = np.sort(breaks[torch.from_numpy(gaps[breaks]).topk(max_ranges - 1).indices.numpy()])
    starts = np.concatenate([cols[:1], cols[breaks + 1]]).tolist()
    ends = np.concatenate([cols[breaks], cols[-1:]]).tolist()
    return [(s, e + 1) for s, e in zip(starts, ends)]


def fit_columns(cols: torch.Tensor, targets: Sequence[float]) -> list[Columns]:
    return fit_columns_many(*_one_head(cols, targets))[0]


def fit_columns_many(cols: torch.Tensor, targets: torch.Tensor) -> list[list[Columns]]:
    """The heaviest key columns at each target, for every head: cols (H, Sk), targets (H, T)."""
    limit = MAX_SELECTED_DENSITY * cols.shape[1]  # on the columns kept after bridging (never fewer than chosen)
    return [[Columns(r) for r in (_ranges(np.sort(c)) for c in head if c is not None) if _kept_keys(r) <= limit]
            for head in _heaviest(cols, targets)]


def _kept_keys(ranges: Sequence[tuple[int, int]]) -> int:
    """How many keys [start, end) ranges keep."""
    return sum(end - start for start, end in ranges)


def fit_vertical_slashes(cols: torch.Tensor, diag: torch.Tensor, Sq: int, targets: Sequence[float]) -> list[VerticalSlash]:
    """Columns and width-0 diagonals taken together, heaviest first (MInference's vertical-slash)."""
    return fit_vertical_slashes_many(cols[None], diag[None], Sq, _one_head(cols, targets)[1])[0]


def fit_vertical_slashes_many(cols: torch.Tensor, diag: torch.Tensor, Sq: int, targets: torch.Tensor) -> list[list[VerticalSlash]]:
    """fit_vertical_slashes for every head: cols (H, Sk), diag (H, Sq + Sk - 1), targets (H, T)."""
    Sk = cols.shape[1]
    found = []
    for head in _heaviest(torch.cat([cols, diag], dim=1), targets):
        patterns = []
        for chosen in head:
            if chosen is None or chosen.size > MAX_SELECTED_DENSITY * Sk:  # a slash keeps ~one key a row
                continue
            columns = chosen[chosen < Sk]
            offsets = (chosen[chosen >= Sk] - Sk - (Sq - 1))[:MAX_OFFSETS].tolist()
            ranges = _ranges(np.sort(columns)) if columns.size else []
            if _kept_keys(ranges) + len(offsets) > MAX_SELECTED_DENSITY * Sk:  # and once gaps are bridged
                continue
            patterns.append(VerticalSlash(ranges, offsets))
        found.append(patterns)
    return found


def fit_block_sparse(blocks: torch.Tensor, tile: tuple[int, int], Sq: int, Sk: int, causal: bool,
                     targets: Sequence[float]) -> list[BlockSparse]:
    """Heaviest blocks of `blocks` (nqb, nkb) at each target, always with the anchor blocks."""
    return fit_block_sparse_many(*_one_head(blocks, targets), tile, Sq, Sk, causal)[0]


def fit_block_sparse_many(blocks: torch.Tensor, targets: torch.Tensor, tile: tuple[int, int], Sq: int, Sk: int,
                          causal: bool) -> list[list[BlockSparse]]:
    """fit_block_sparse for every head: blocks (H, nqb, nkb), targets (H, T). The layouts of all
    heads and targets are built on the device and come to the host as one bool tensor."""
    H, T = targets.shape
    cells = blocks[0].numel()
    anchors = _anchor_blocks(blocks, tile, Sq, Sk, causal).flatten(1)
    flat = blocks.flatten(1)
    rest = flat.masked_fill(anchors, 0.0)
    anchored = torch.stack([flat[h][anchors[h]].sum() for h in range(H)])  # as one head's sum
    order = rest.argsort(dim=1, descending=True)
    covered = rest.gather(1, order).cumsum(dim=1)
    counts = torch.searchsorted(covered, targets - anchored[:, None] - _EPS) + 1
    extra = targets > anchored[:, None]               # the anchors alone fall short
    feasible = ~extra | (counts <= (rest > 0).sum(dim=1, keepdim=True))
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(cells, device=order.device).expand(H, -1))
    layouts = anchors[:, None, :] | (rank[:, None, :] < torch.where(extra, counts, 0)[:, :, None])
    keep = (feasible & (layouts.float().mean(dim=2) <= MAX_SELECTED_DENSITY)).tolist()
    host = layouts.unflatten(2, blocks.shape[1:]).cpu().numpy()
    # Bool (nqb, nkb) host layouts built here: the trusted constructor skips re-checking them.
    return [[BlockSparse.from_trusted_layout(host[h, t], tile) for t in range(T) if keep[h][t]] for h in range(H)]


def block_sparse(layout: torch.Tensor, block: tuple[int, int]) -> BlockSparse:
    """BlockSparse(layout, block) for a bool layout tensor on any device, without re-checking it
    (BlockSparse.from_trusted_layout)."""
    return BlockSparse.from_trusted_layout(layout.cpu(), block)


def _anchor_blocks(blocks: torch.Tensor, tile: tuple[int, int], Sq: int, Sk: int, causal: bool) -> torch.Tensor:
    """Blocks every BlockSparse candidate keeps (blocks (H, nqb, nkb)): causal, those holding
    the causal diagonal j = i + Sk - Sq (each row's last key, so no row is left empty);
    otherwise each query block's heaviest block."""
    H, nqb, nkb = blocks.shape
    device = blocks.device
    if not causal:
        anchors = torch.zeros(H, nqb, nkb, dtype=torch.bool, device=device)
        return anchors.scatter_(2, blocks.argmax(dim=2, keepdim=True), True)
    bm, bn = tile
    first = torch.arange(nqb, device=device) * bm
    last = (first + bm).clamp(max=Sq) - 1
    lo = (first + Sk - Sq).clamp(0, Sk - 1) // bn
    hi = (last + Sk - Sq).clamp(0, Sk - 1) // bn
    kb = torch.arange(nkb, device=device)[None, :]
    has_diagonal = (last + Sk - Sq >= 0)[:, None]
    return ((kb >= lo[:, None]) & (kb <= hi[:, None]) & has_diagonal).expand(H, nqb, nkb)


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


def dense_outputs(samples: Sequence[LayerSample], *, backend: str | None = None) -> list[torch.Tensor]:
    """Dense attention of every sample: the reference that errors are measured against."""
    from sparsec.attention_dispatch import attention

    return [attention(s.q, s.k, s.v, Dense(), causal=s.causal, scale=s.scale, backend=backend or error_backend(s.q),
                      softcap=s.softcap, sinks=s.sinks) for s in samples]


def measure_candidates(
    samples: Sequence[LayerSample],
    head_patterns: Sequence[tuple[Pattern, ...]],
    *,
    backend: str | None = None,
    dense: Sequence[torch.Tensor] | None = None,
) -> list[HeadCandidates]:
    """The squared output error of every head's every candidate, summed over the samples.

    Round r runs candidate r of every head in one sparsec.attention call (heads with fewer
    candidates run Skip("zero"), which costs nothing): rounds = the longest candidate list.
    Dense candidates have error 0 by definition and are not run. Errors add up on the samples'
    device and come to the host once. `dense`: the samples' dense outputs, if already computed."""
    from sparsec.attention_dispatch import attention

    num_heads = len(head_patterns)
    rounds = max(len(p) for p in head_patterns)
    dense = dense_outputs(samples, backend=backend) if dense is None else dense
    device = samples[0].q.device
    errors = torch.zeros(rounds, num_heads, dtype=torch.float64, device=device)
    dense_norm2 = torch.zeros(num_heads, dtype=torch.float64, device=device)
    idle = Skip("zero")
    for s, reference in zip(samples, dense):
        call = dict(causal=s.causal, scale=s.scale, backend=backend or error_backend(s.q), softcap=s.softcap,
                    sinks=s.sinks)
        reference = reference.double()
        dense_norm2 += reference.square().sum(dim=(0, 2, 3))
        for r in range(rounds):
            round_patterns = [p[r] if r < len(p) and not isinstance(p[r], Dense) else idle for p in head_patterns]
            if all(p is idle for p in round_patterns):
                continue
            out = attention(s.q, s.k, s.v, round_patterns, **call)
            errors[r] += (out.double() - reference).square().sum(dim=(0, 2, 3))
    errors, dense_norm2 = errors.T.cpu(), dense_norm2.cpu()
    return [HeadCandidates(patterns=tuple(p), squared_errors=_dense_zero(p, errors[h]),
                           dense_norm2=float(dense_norm2[h]))
            for h, p in enumerate(head_patterns)]


def _dense_zero(patterns: tuple[Pattern, ...], row: torch.Tensor) -> tuple[float, ...]:
    return tuple(0.0 if isinstance(p, Dense) else e for p, e in zip(patterns, row.tolist()))
