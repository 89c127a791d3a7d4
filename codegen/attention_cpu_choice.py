"""The CPU executor's choices for a pattern: the native interval kernel or torch's, and on torch's
the query block size, whether bands far apart run whole or as disjoint parts merged by
log-sum-exp, and in which token order.

Native (choose_split). A pattern with the interval form (codegen.attention_cpu_native.
interval_pieces: at most 8 disjoint pieces a row), or a BlockSparse layout (block_runs), may run
on sparsec's own kernels, priced by the same model (their tiles' pairs at the profile's
native_pair_speed, masked pairs at native_mask_cost_per_pair, a vertical-slash's lanes at
native_lane_seconds): bench/cpu_native.py times both ways. A pattern of bands with a frame stride
is also priced on the interval kernel in frame-transposed order (below), permutations included.

Query block size: the candidate (32 to 256 rows) with the least estimated time, by the cost model
as below: pairs read (block_m x the union of each block's rows' keys, from
codegen.attention_cpu_reads in closed form, no planning) at the fused kernel's speed for that many
query rows, masked pairs, gathered keys, query rows and calls. bench/cpu_blocks.py times every
candidate: on the AVX-512 machine (S 2048 and 4096, 8 heads, six families at 10-50%) the choice is
right or within 1.5% in 27 of 36 cases, mean loss 2.2%, where the best fixed block (256) loses 8%
(bench/results/cpu_blocks_20261206_204804.json).

Split (choose_split). A pattern of a few bands far apart (MultiDiagonal at frame strides, or a
union of windows and diagonals) read whole makes each query block read the union of the bands'
keys: several runs a block, gathered, under a mask as wide as the union. Run as parts, each band
(or group of touching bands) is a plan of its own: one run a block, a strided view of K/V, a narrow
mask shared by the interior blocks; the kernel returns each row's log-sum-exp, and the parts'
outputs are merged by it (attention over disjoint key sets: out = sum_c exp(lse_c - lse) out_c with
lse = logsumexp_c lse_c). The parts are exact: they keep disjoint key sets whose union is the
pattern.

Splitting pays the merge and one plan a part, and wins only when the whole plan reads the bands as
separate runs: once the bands' reads overlap (wide bands, or dense), the whole plan reads fewer
keys and its blocks fold into all-keys calls; at short lengths the parts' extra calls and rows cost
more than they save. choose_split compares the two with the cost model's own estimate of the
executor (cost_models.attention_cost.cpu_option_seconds, the cpu profile at the kernels' thread
count, calibrated where a calibration is stored): pairs at the kernel's speed for the block's
query rows, masked pairs, a cost per query row of each part, gathers copied on one thread, SDPA
calls, and the merges. One source for the choice and for the estimates the tuner prices plans with:
what the executor runs is the option the model thinks cheapest. bench/cpu_split.py times both ways
over 48 cases (S 1024-4096, 4 or 8 heads, causal or not, 10-50%, 1 or 2 threads) and records the
loss of the choice against the faster way.

Order (also choose_split). A pattern of bands with a frame stride F (frame_candidates: bands near
nonzero multiples of one of its offsets, which divides S) may run in frame-transposed token order
(codegen.frame_order): the same pairs, renumbered so that a position's tokens in every frame sit
side by side. Its parts there (frame_parts) group the bands at the same offset modulo F: a
temporal head's 30-odd narrow diagonals become two or three runs of keys a row. The order is
priced like the rest (the renumbered pattern's unions, whole or as parts, best query block) plus
the permutations (q, k and v gathered, the output gathered back), and taken when that is the
least. bench/cpu_frames.py (4 heads, D = 64, 2 threads; video geometries 8 x 256 to 32 x 64
tokens; temporal, same-patch, near-frame and in-frame local heads, causal or not): the choice is
right in 31 of 32 cases (mean loss 0.2%, worst 6.1%); temporal heads run 2.3-7.0x faster than
dense SDPA instead of 0.8-4.5x, same-patch heads up to 21x, and local heads stay in natural
order (bench/results/cpu_frames_20261202_054728.json, an AVX2 machine, with the former hand-set
prices). On an AVX-512 machine with the cost model's prices: 30 of 32 right, mean loss 1.0%
(cpu_frames_20261206_155507.json).
"""
from __future__ import annotations

import functools
import itertools

from sparsec.codegen.attention_cpu_native import Native, native_block_m, native_form, native_kernel, slash_form
from sparsec.codegen.frame_order import FramesTransposed, frame_candidates, pattern_bands
from sparsec.patterns import Dense, MultiDiagonal, Pattern, Skip, Union

__all__ = ["band_parts", "choose_blocks", "choose_split", "frame_parts"]

# The query block sizes the executor considers (torch's fused kernel splits a call's queries by 32
# below 192 rows, by 64 from there: cost_models.attention_cost.query_rows_speed).
_BLOCK_M_CANDIDATES = (32, 64, 128, 256)


def choose_blocks(pattern: Pattern, Sq: int, Sk: int, causal: bool = False) -> tuple[int, int]:
    """(block_m, block_n) for `pattern` run whole in natural order, one head on one thread. Keys
    are read as exact runs, so only block_m matters (block_n, for callers that share tiles with the
    Triton kernels, is min(128, Sk)): the query block size the cost model prices least
    (choose_split with split and frames off)."""
    if isinstance(pattern, (Dense, Skip)):
        return min(128, Sq), min(128, Sk)
    return choose_split(pattern, Sq, Sk, bool(causal), split=False, frames=False)[0], min(128, Sk)


def _block_m_candidates(Sq: int) -> list[int]:
    return sorted({min(bm, Sq) for bm in _BLOCK_M_CANDIDATES})


def band_parts(pattern: Pattern) -> tuple[Pattern, ...]:
    """The pattern as disjoint parts, each one run a row, when it is made of bands only (Window,
    MultiDiagonal, and unions of them): its bands (a Window keeps j - i in [-left, right], band o of
    a MultiDiagonal [o - w, o + w]) grouped where they touch or overlap, each group a part (a
    MultiDiagonal's bands of one group stay one MultiDiagonal). Any other pattern, or bands that
    all touch: (pattern,)."""
    found = pattern_bands(pattern)
    if found is None:
        return (pattern,)
    groups: list[list[tuple[int, int, Pattern]]] = []
    for band in sorted(found, key=lambda b: b[:2]):
        if groups and band[0] <= max(last for _, last, _ in groups[-1]) + 1:
            groups[-1].append(band)
        else:
            groups.append([band])
    if len(groups) == 1:
        return (pattern,)
    return tuple(_group_pattern([p for _, _, p in group]) for group in groups)


def _group_pattern(bands: list[Pattern]) -> Pattern:
    """One part from touching bands: one MultiDiagonal when they are diagonals of one width."""
    if len(bands) == 1:
        return bands[0]
    widths = {b.width for b in bands if isinstance(b, MultiDiagonal)}
    if all(isinstance(b, MultiDiagonal) for b in bands) and len(widths) == 1:
        return MultiDiagonal([o for b in bands for o in b.offsets], widths.pop())
    return Union(bands)


def choose_split(pattern: Pattern, Sq: int, Sk: int, causal: bool, block_m: int | None = None, *, rows: int = 1,
                 width: int = 128, threads: int = 1, split: bool | None = None, frames: bool | None = None,
                 native: bool | None = None) -> tuple[int, tuple[Pattern, ...]]:
    """(block_m, parts): the query block size and the parts the executor runs `pattern` as;
    parts == (pattern,) runs it whole. Whole or split, the query block is the one with the least
    estimated time, and the parts run only when their estimate beats the whole plan's (module
    docstring). Parts that are FramesTransposed run in frame-transposed token order
    (codegen.frame_order), chosen when its estimate, permutations included, is the least; one
    part Native(pattern) runs it on a native kernel (codegen.attention_cpu_native; block_m is
    then its tile height; for narrow bands the part may be Native(the VerticalSlash with the
    same keys), their slash kernel), chosen the same way where the kernels are built and the
    pattern has their form (native_form). block_m, when given, is kept. rows: query heads x
    batch that run the pattern together; width: D + Dv; threads: the attention kernels'
    intra-op threads. split True / False forces the parts (when the pattern has several) or the
    whole plan; frames True / False forces the transposed order (when the pattern has a frame
    stride) or the natural one; native True / False forces the native kernel (where it can run)
    or torch's. Forcing block_m,
    split or frames runs torch's kernel unless native is True. Cached (_choose_split; its
    cache_clear is this function's)."""
    if native is not False and native_kernel() is None:
        native = False
    return _choose_split(pattern, Sq, Sk, causal, block_m, rows=rows, width=width, threads=threads, split=split,
                         frames=frames, native=native)


@functools.lru_cache(maxsize=1 << 14)
def _choose_split(pattern: Pattern, Sq: int, Sk: int, causal: bool, block_m: int | None, *, rows: int, width: int,
                  threads: int, split: bool | None, frames: bool | None,
                  native: bool | None) -> tuple[int, tuple[Pattern, ...]]:
    costs = _Costs(Sq, Sk, causal, rows, width, threads)
    offer_native = native is True or (native is None and block_m is None and split is None and frames is None)
    if isinstance(pattern, Dense) and (not causal or Sq == Sk) and native is not True:
        offer_native = False  # the executor runs it with one SDPA call (codegen.attention_cpu._dense_heads)
    frame_strides = () if frames is False else frame_candidates(pattern, Sq, Sk)
    native_parts = _native_parts(pattern, Sq, Sk, causal, frame_strides, frames) if offer_native else []
    if native_parts:
        native_option = min(((costs.seconds((part,), bm), bm, (part,)) for part, bm in
                             ((part, native_block_m(part.pattern, Sq)) for part in native_parts)),
                            key=lambda option: option[0])
        if native:
            return native_option[1:]
    else:
        native_option = None
    if not frame_strides:  # frames forced on a pattern without a frame stride: the natural order
        options = [_best_option(pattern, band_parts(pattern), costs, block_m, split, priced=native_option is not None)]
    else:
        options = [] if frames else [_best_option(pattern, band_parts(pattern), costs, block_m, split)]
        for frame in frame_strides:
            options.append(_best_option(FramesTransposed(pattern, frame), frame_parts(pattern, frame), costs, block_m,
                                        split))
    if native_option is not None:
        options.append(native_option)
    _, bm, parts = min(options, key=lambda option: option[0])
    return bm, parts


def _native_parts(pattern: Pattern, Sq: int, Sk: int, causal: bool, frame_strides: tuple[int, ...],
                  frames: bool | None) -> list[Native]:
    """The native kernels' ways to run `pattern` (none where they cannot): on its own form; narrow
    bands (no more than _SLASH_OFFSETS offsets in all) also as the VerticalSlash that keeps the
    same keys, which runs them up to 2x faster than the interval kernel's tiles (measured: a
    causal 3-key band at S = 4096, 1.7 ms against 3.5 ms; at 41 keys both ~6 ms); and, without
    the causal rule, at each frame stride, the interval kernel in frame-transposed order (a wide
    temporal head's diagonals become a few wide runs a row: at S = 4096, 8 frames, 3.9-4.6x dense
    SDPA against 2.7-3.7x on torch's kernel in that order). Causal, the rule cuts each frame's
    steps apart into many short pieces: slower than the slash kernel in natural order in every
    case measured (S 1024-4096, 10-25%: 19.7 ms against 11.8, 22.3 against 14.6) and priced
    15-22% below its time, so not offered. frames True: only those; False: none of them."""
    parts = []
    form = None if frames is True else native_form(pattern, Sq, Sk, causal)
    if form is not None:
        parts.append(Native(pattern))
        if form == "intervals":
            slashes = slash_form(pattern, Sq, Sk)
            if slashes is not None and len(slashes.offsets) <= _SLASH_OFFSETS:
                parts.append(Native(slashes))
    for frame in () if causal else frame_strides:
        transposed = FramesTransposed(pattern, frame)
        if native_form(transposed, Sq, Sk, causal) is not None:
            parts.append(Native(transposed))
    return parts


# The bands the choice also prices as slashes: at most this many offsets (wider ones run faster
# in the interval kernel's tiles, and counting their slashes costs more).
_SLASH_OFFSETS = 64


choose_split.cache_clear = _choose_split.cache_clear  # type: ignore[attr-defined]
choose_split.cache_info = _choose_split.cache_info  # type: ignore[attr-defined]


class _Costs:
    """What choose_split prices (module docstring): the cost model's estimate of the executor
    running an option for one pattern's lengths and heads, with the cpu profile (calibrated when
    a calibration is stored) at the kernels' thread count."""

    def __init__(self, Sq: int, Sk: int, causal: bool, rows: int, width: int, threads: int):
        from sparsec.cost_models.attention_cost import AttentionShape
        from sparsec.cost_models.hardware import get_profile

        self.shape = AttentionShape(batch=1, num_heads=rows, num_kv_heads=rows, q_len=Sq, kv_len=Sk,
                                    head_dim=width - width // 2, value_dim=width // 2, dtype="f32", causal=causal)
        self.hardware = get_profile("cpu").with_cores(max(1, threads))

    def seconds(self, option: tuple[Pattern, ...], bm: int) -> float:
        """Estimated seconds of running `option` (disjoint parts; FramesTransposed ones with the
        permutations) at query blocks of bm rows."""
        from sparsec.cost_models.attention_cost import cpu_option_seconds

        return cpu_option_seconds(option, self.shape, bm, self.hardware)


def _best_option(pattern: Pattern, parts: tuple[Pattern, ...], costs: _Costs, block_m: int | None,
                 split: bool | None, priced: bool = True) -> tuple[float, int, tuple[Pattern, ...]]:
    """(seconds, block_m, parts) of the cheaper of running `pattern` whole and as `parts`, each at
    its cheapest query block (block_m, when given). priced=False: seconds only where the choice
    needs them (0 when there is nothing to choose)."""
    candidates = [block_m] if block_m else _block_m_candidates(costs.shape.q_len)
    if len(candidates) == 1 and (len(parts) == 1 or split is False) and not priced:
        return 0.0, candidates[0], (pattern,)
    whole_seconds, whole_bm = min((costs.seconds((pattern,), bm), bm) for bm in candidates)
    if len(parts) == 1 or split is False:
        return whole_seconds, whole_bm, (pattern,)
    split_seconds, split_bm = min((costs.seconds(parts, bm), bm) for bm in candidates)
    if split or split_seconds < whole_seconds:
        return split_seconds, split_bm, parts
    return whole_seconds, whole_bm, (pattern,)


# -- frame-transposed order -------------------------------------------------------------------------------------


def frame_parts(pattern: Pattern, frame: int) -> tuple[Pattern, ...]:
    """`pattern` (bands only) as disjoint parts in frame-transposed order: bands whose offsets
    lie near the same position in other frames (the same offset modulo the frame, within their
    widths) make one part, a run of keys across those frames; bands that overlap or touch stay
    in one part too, so the parts keep disjoint key sets. One part: (FramesTransposed(pattern),)."""
    import networkx as nx

    bands = sorted(pattern_bands(pattern), key=lambda b: b[:2])

    def residue(band) -> tuple[float, float]:
        shift = round((band[0] + band[1]) / 2 / frame) * frame
        return band[0] - shift, band[1] - shift

    def touch(a, b) -> bool:
        return b[0] <= a[1] + 1 and a[0] <= b[1] + 1

    graph = nx.Graph()
    graph.add_nodes_from(range(len(bands)))
    graph.add_edges_from((a, b) for a, b in itertools.combinations(range(len(bands)), 2)
                         if touch(residue(bands[a]), residue(bands[b])) or touch(bands[a], bands[b]))
    groups = sorted(sorted(group) for group in nx.connected_components(graph))  # by first band, as given
    if len(groups) == 1:
        return (FramesTransposed(pattern, frame),)
    return tuple(FramesTransposed(_group_pattern([bands[n][2] for n in group]), frame) for group in groups)
