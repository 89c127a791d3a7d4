"""The CPU executor's frame-transposed token order (codegen/frame_order.py): the renumbered pattern,
its row intervals, the parts it runs as, and cpu_attention in that order against the float64
reference built from pattern.mask() in natural order."""
from __future__ import annotations

import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsec import patterns as P
from sparsec.codegen.attention_cpu import cpu_attention
from sparsec.codegen.attention_cpu_choice import choose_split, frame_parts
from sparsec.codegen.attention_cpu_native import Native, native_kernel
from sparsec.codegen.frame_order import frame_candidates
from sparsec.codegen.block_coverage import kept_pairs, row_intervals
from sparsec.codegen.frame_order import FramesTransposed, natural_index, natural_rows, transposed_index, transposed_rows
from reference import reference_attention

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def temporal(frame: int, frames: int, rows: tuple[int, ...] = (0,), width: int = 1) -> P.MultiDiagonal:
    """Same position (and `rows` apart) in every other frame, as a tuned temporal head keeps."""
    return P.MultiDiagonal([k * frame + r for k in range(-frames + 1, frames) for r in rows], width)


def transposed_mask(pattern: P.Pattern, S: int, frame: int) -> torch.Tensor:
    """The pattern's mask with tokens renumbered by hand: position p * T + f is token f * frame + p."""
    T = S // frame
    natural = torch.tensor([(x % T) * frame + x // T for x in range(S)])
    return pattern.mask(S, S)[natural][:, natural]


def kept_mask(base: P.Pattern, S: int, frame: int, causal: bool) -> torch.Tensor:
    """transposed_mask with the causal rule, which FramesTransposed applies in natural order."""
    mask = transposed_mask(base, S, frame)
    if causal:
        T = S // frame
        natural = torch.tensor([(x % T) * frame + x // T for x in range(S)])
        mask &= natural[None, :] <= natural[:, None]
    return mask


def mask_of_intervals(lo: torch.Tensor, hi: torch.Tensor, S: int) -> torch.Tensor:
    j = torch.arange(S)
    return ((j >= lo[..., None]) & (j <= hi[..., None])).any(dim=1)


def test_indices_invert_each_other_and_put_each_position_of_a_frame_side_by_side():
    natural, transposed = natural_index(12, 4), transposed_index(12, 4)
    assert natural.tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]  # 3 frames of 4: position 0 of each, ...
    assert torch.equal(natural[transposed], torch.arange(12))
    assert torch.equal(transposed[natural], torch.arange(12))
    x = torch.randn(2, 3, 12, 5)
    assert torch.equal(transposed_rows(x, 4), x.index_select(2, natural))
    assert torch.equal(natural_rows(transposed_rows(x, 4), 4).reshape(x.shape), x)


bases = st.one_of(
    st.builds(P.MultiDiagonal, st.lists(st.integers(-40, 40), min_size=1, max_size=6), st.integers(0, 3)),
    st.builds(P.Window, st.integers(0, 6), st.integers(0, 6)),
    st.builds(P.Window, st.integers(0, 40), st.integers(0, 40)),  # wider than a frame: several frame steps
    st.builds(lambda left, right, offsets, width: P.Window(left, right) | P.MultiDiagonal(offsets, width),
              st.integers(0, 5), st.integers(0, 5), st.lists(st.integers(-60, 60), min_size=1, max_size=8),
              st.integers(0, 4)),
    st.builds(P.VerticalSlash, st.lists(st.integers(0, 30), min_size=1, max_size=3),
              st.lists(st.integers(-20, 20), min_size=1, max_size=3)),
)


@given(base=bases, frame=st.sampled_from([4, 6, 8, 12]), frames=st.integers(2, 5), causal=st.booleans())
@settings(max_examples=60, deadline=None)
def test_renumbered_pattern_and_its_row_intervals_match_the_permuted_mask(base, frame, frames, causal):
    S = frame * frames
    pattern = FramesTransposed(base, frame)
    assert torch.equal(pattern.mask(S, S), transposed_mask(base, S, frame))
    expected = kept_mask(base, S, frame, causal)
    lo, hi = row_intervals(pattern, S, S, causal)
    assert torch.equal(mask_of_intervals(lo, hi, S), expected)
    assert kept_pairs(pattern, S, S, causal) == int(expected.sum())


@given(base=bases, frame=st.sampled_from([4, 6, 8, 12]), frames=st.integers(2, 8),
       block_m=st.sampled_from([1, 3, 8, 16, 32]), causal=st.booleans())
@settings(max_examples=80, deadline=None)
def test_closed_form_block_unions_match_the_mask_and_the_rows(base, frame, frames, block_m, causal):
    """The cost model's per-query-block unions of a renumbered pattern of bands, in closed form
    (codegen.frame_coverage): keys, runs and masked as the explicit mask has them, each row's key
    count too, and everything (signatures included) as the general path from every row's
    intervals gives it."""
    from sparsec.codegen.attention_cpu_reads import _block_unions_by_rows, _transposed_block_unions
    from sparsec.codegen.frame_coverage import transposed_row_keys

    S = frame * frames
    pattern = FramesTransposed(base, frame)
    found = _transposed_block_unions(pattern, S, block_m, causal)
    if isinstance(base, P.VerticalSlash) and any(start < S for start, _ in base.columns):
        assert found is None  # not bands only: the general path
        return
    mask = kept_mask(base, S, frame, causal)
    assert transposed_row_keys(pattern, S, causal).tolist() == mask.sum(dim=1).tolist()
    keys, runs, masked, _ = found
    for b, r0 in enumerate(range(0, S, block_m)):
        rows = mask[r0:r0 + block_m]
        union = rows.any(dim=0)
        starts = torch.diff(union.to(torch.int8), prepend=torch.zeros(1, dtype=torch.int8)) == 1
        expected = (int(union.sum()), int(starts.sum()), bool((rows.sum(dim=1) < union.sum()).any()))
        assert (int(keys[b]), int(runs[b]), bool(masked[b])) == expected, (b, pattern)
    for closed_form, by_rows in zip(found, _block_unions_by_rows(pattern, S, S, block_m, causal)):
        assert closed_form.tolist() == by_rows.tolist()


@pytest.mark.parametrize("causal", [False, True])
def test_closed_form_block_unions_match_the_rows_at_video_lengths(causal):
    """A window with diagonals a frame and two apart (8 frames of 512), whole and as its frame
    parts, at every query block size the executor tries: the same unions as from every row."""
    from sparsec.codegen.attention_cpu_reads import _block_unions_by_rows, _transposed_block_unions

    S, frame = 4096, 512
    base = P.Window(16, 16) | P.MultiDiagonal([-2 * frame, -frame, frame, 2 * frame], 8)
    for pattern in (FramesTransposed(base, frame), *frame_parts(base, 2 * frame)):
        for block_m in (32, 64, 128, 256):
            found = _transposed_block_unions(pattern, S, block_m, causal)
            for closed_form, by_rows in zip(found, _block_unions_by_rows(pattern, S, S, block_m, causal)):
                assert closed_form.tolist() == by_rows.tolist(), (pattern, block_m)


def test_renumbered_pattern_is_a_value_and_refuses_lengths_it_cannot_renumber():
    pattern = FramesTransposed(temporal(8, 4), 8)
    assert pattern == FramesTransposed(temporal(8, 4), 8) and hash(pattern) == hash(FramesTransposed(temporal(8, 4), 8))
    assert pattern != FramesTransposed(temporal(8, 4), 16)
    assert pickle.loads(pickle.dumps(pattern)) == pattern
    assert "frame=8" in repr(pattern)
    with pytest.raises(ValueError, match="Sq == Sk"):
        pattern.mask(32, 40)
    with pytest.raises(ValueError, match="multiple of the frame"):
        pattern.mask(36, 36)
    with pytest.raises(TypeError, match="Pattern"):
        FramesTransposed("band", 8)
    with pytest.raises(ValueError, match="frame"):
        FramesTransposed(P.Dense(), 0)


@given(frame=st.sampled_from([8, 12, 16]), frames=st.integers(2, 4),
       rows=st.lists(st.integers(-5, 5), min_size=1, max_size=3), width=st.integers(0, 2),
       extra=st.lists(st.integers(-30, 30), max_size=3))
@settings(max_examples=60, deadline=None)
def test_frame_parts_are_disjoint_and_cover_the_pattern(frame, frames, rows, width, extra):
    S = frame * frames
    pattern = P.MultiDiagonal(list(temporal(frame, frames, tuple(rows), width).offsets) + extra, width)
    parts = frame_parts(pattern, frame)
    assert all(isinstance(part, FramesTransposed) and part.frame == frame for part in parts)
    masks = torch.stack([part.mask(S, S) for part in parts]).to(torch.int32)
    assert torch.equal(masks.sum(dim=0) > 0, transposed_mask(pattern, S, frame))
    assert int(masks.sum(dim=0).max()) <= 1  # disjoint: the log-sum-exp merge is exact


def test_frame_parts_group_each_position_across_frames():
    parts = frame_parts(temporal(16, 4, rows=(-4, 0, 4), width=1), 16)
    assert len(parts) == 3
    assert sorted(sorted({o % 16 for o in part.base.offsets}) for part in parts) == [[0], [4], [12]]


def test_frame_candidates_find_the_frame_stride_and_ignore_other_patterns():
    assert 64 in frame_candidates(temporal(64, 8, rows=(0,), width=2), 512, 512)
    assert frame_candidates(temporal(64, 8), 512, 400) == ()  # cross-attention lengths
    assert frame_candidates(temporal(64, 8), 500, 500) == ()  # 64 does not divide 500
    assert frame_candidates(P.Window(8, 8), 512, 512) == ()
    assert frame_candidates(P.AShape(4, 16), 512, 512) == ()
    assert frame_candidates(P.MultiDiagonal([-64, 0, 64], 1), 512, 512) == (64,)


def check(head_patterns, *, B=1, Hkv=None, S=48, D=16, causal=False, dtype=torch.float32, block_m=None,
          split=None, seed=0, native=None):
    """cpu_attention forced into frame-transposed order (native True: on the native interval
    kernel), against the reference in natural order."""
    torch.manual_seed(seed)
    Hq = len(head_patterns)
    q = torch.randn(B, Hq, S, D, dtype=dtype)
    k = torch.randn(B, Hkv or Hq, S, D, dtype=dtype)
    v = torch.randn(B, Hkv or Hq, S, D + 8, dtype=dtype)
    scale = 1.0 / math.sqrt(D)
    out = cpu_attention(q, k, v, tuple(head_patterns), causal=causal, scale=scale, block_m=block_m, split=split,
                        frames=True, native=native)
    expected = reference_attention(q, k, v, head_patterns, causal=causal, scale=scale)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("split", [None, True, False])
def test_temporal_heads_in_transposed_order_match_the_reference(causal, split):
    heads = [temporal(12, 4, rows=(0, 3), width=1), temporal(12, 4, rows=(-2,), width=0), P.Dense(),
             temporal(12, 4, rows=(0,), width=2)]
    check(heads, S=48, causal=causal, split=split, block_m=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_transposed_order_each_dtype_with_gqa_and_batch(dtype):
    heads = [temporal(8, 5, rows=(0, 1), width=1)] * 2 + [temporal(8, 5, rows=(-3, 3), width=0)] * 2
    check(heads, B=2, Hkv=2, S=40, dtype=dtype, seed=3)


def test_rows_without_keys_are_zero_in_transposed_order():
    # keys two frames ahead only: the last two frames' queries keep nothing
    pattern = P.MultiDiagonal([16, 24], 0)
    check([pattern, pattern], S=32, block_m=4)


def test_forcing_the_order_gives_the_same_result_and_bad_values_are_refused():
    torch.manual_seed(1)
    heads = (temporal(16, 6, rows=(0,), width=1),) * 2
    q, k, v = (torch.randn(1, 2, 96, 16) for _ in range(3))
    natural, transposed = (cpu_attention(q, k, v, heads, causal=False, scale=0.25, frames=f) for f in (False, True))
    torch.testing.assert_close(natural, transposed, atol=2e-6, rtol=2e-5)
    with pytest.raises(ValueError, match="frames must be None, True or False"):
        cpu_attention(q, k, v, heads, causal=False, scale=0.25, frames="yes")


@given(base=bases, frame=st.sampled_from([4, 6, 8, 12]), frames=st.integers(2, 6), causal=st.booleans())
@settings(max_examples=80, deadline=None)
def test_native_pieces_in_transposed_order_are_monotone_and_keep_exactly_the_renumbered_pairs(base, frame, frames,
                                                                                             causal):
    """codegen.frame_coverage.transposed_pieces, the native interval kernel's operands in
    frame-transposed order: every piece's ends never decrease from row to row, an empty row has
    lo == hi + 1, and the pieces are disjoint and together keep exactly the renumbered mask (with
    the causal rule in natural order)."""
    from sparsec.codegen.frame_coverage import transposed_pieces

    S = frame * frames
    found = transposed_pieces(FramesTransposed(base, frame), S, causal, 10_000)
    if isinstance(base, P.VerticalSlash) and any(start < S for start, _ in base.columns):
        assert found is None  # not bands only
        return
    lo, hi = (torch.from_numpy(x.astype("int64")) for x in found[:2])
    groups = found[2].tolist()  # consecutive pieces, every one in a group
    assert groups[0] == 0 and groups[-1] == lo.shape[0] and all(a < b for a, b in zip(groups, groups[1:]))
    assert (lo[:, 1:] >= lo[:, :-1]).all() and (hi[:, 1:] >= hi[:, :-1]).all()
    assert (lo <= hi + 1).all() and (lo >= 0).all() and (lo <= S).all() and (hi >= -1).all() and (hi < S).all()
    j = torch.arange(S)
    covered = ((j >= lo[..., None]) & (j <= hi[..., None])).sum(dim=0)  # (S, S): pieces keeping each pair
    assert torch.equal(covered, kept_mask(base, S, frame, causal).long())
    if lo.shape[0] > 1:
        assert transposed_pieces(FramesTransposed(base, frame), S, causal, lo.shape[0] - 1) is None  # too many


@pytest.mark.skipif(native_kernel() is None, reason="native kernel not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_kernel_in_transposed_order_matches_the_reference(dtype):
    """Temporal heads, a wide band and a head keeping nothing for some rows, on the native interval
    kernel in frame-transposed order (not offered with the causal rule): batch 2, GQA (two query
    heads a kv head), heads of one pattern not side by side."""
    wide = temporal(12, 4, rows=(-3, 0, 3), width=2)
    heads = [wide, temporal(12, 4, rows=(0,), width=0), P.Window(14, 14), wide, P.MultiDiagonal([24, 36], 0),
             P.Dense()]
    check(heads, B=2, Hkv=3, dtype=dtype, native=True)


@pytest.mark.skipif(native_kernel() is None, reason="native kernel not built")
def test_native_kernel_runs_causal_transposed_pieces_exactly():
    """The kernel on a causal temporal head's transposed pieces (groups of many short pieces) where
    the executor would not take it: the same as the reference, rows in that order."""
    from sparsec.codegen.attention_cpu_native import run_native

    torch.manual_seed(3)
    S, frame, pattern = 48, 12, temporal(12, 4, rows=(-3, 0, 3), width=2)
    q, k, v = (torch.randn(1, 2, S, 16) for _ in range(3))
    out = torch.empty_like(q)
    run_native(*(transposed_rows(x, frame) for x in (q, k, v)), out, [0, 1], FramesTransposed(pattern, frame),
               True, 0.25, 1)
    expected = reference_attention(q, k, v, [pattern] * 2, causal=True, scale=0.25)
    torch.testing.assert_close(natural_rows(out, frame).reshape(q.shape).double(), expected, atol=2e-5, rtol=2e-5)


def test_the_estimate_chooses_transposed_order_for_temporal_heads_only():
    """At video lengths (8 frames of 16 x 16 patches) a temporal head reads far fewer keys
    transposed on torch's kernel; a local head (neighbours in its own frame) reads fewer in natural
    order. The native kernels are faster still for this narrow one and win when offered
    (measured, 4 heads, D = 32: 3.4 ms on the slash kernel, 3.9 ms on the interval kernel in
    transposed order, 5.3 ms on torch's in that order; the model prices the two native ways
    within 2% of each other)."""
    S, frame = 2048, 256
    temporal_head = temporal(frame, 8, rows=(-16, 0, 16), width=2)
    local_head = P.MultiDiagonal([-32, -16, -1, 0, 1, 16, 32], 1)
    _, parts = choose_split(temporal_head, S, S, False, rows=4, width=64, threads=2, native=False)
    assert all(isinstance(part, FramesTransposed) and part.frame == frame for part in parts)
    _, parts = choose_split(local_head, S, S, False, rows=4, width=64, threads=2, native=False)
    assert not any(isinstance(part, FramesTransposed) for part in parts)
    _, parts = choose_split(temporal_head, S, S, False, rows=4, width=64, threads=2, frames=False, native=False)
    assert not any(isinstance(part, FramesTransposed) for part in parts)
    if native_kernel() is not None:
        parts = choose_split(temporal_head, S, S, False, rows=4, width=64, threads=2)[1]
        assert parts in ((Native(temporal_head),), (Native(FramesTransposed(temporal_head, frame)),))
        assert choose_split(temporal_head, S, S, False, rows=4, width=64, threads=2, frames=False,
                            native=True)[1] == (Native(temporal_head),)


@pytest.mark.skipif(native_kernel() is None, reason="native kernel not built")
def test_wide_temporal_heads_run_on_the_native_kernel_in_transposed_order():
    """A wide temporal head (bench/attention.py's, 25%: 45 diagonals 11 keys either side) at
    S = 4096 in 8 frames, 8 heads, D = 64: on the native interval kernel in frame-transposed order
    (measured 3.9-4.0x dense SDPA against 2.8-2.9x on torch's kernel in that order and 2.2x on the
    native kernel's slashes); causal, it stays in natural order on the slash kernel (3.2x)."""
    S, frame = 4096, 512
    head = temporal(frame, 8, rows=(-22, 0, 22), width=11)
    parts = choose_split(head, S, S, False, rows=8, width=128, threads=2)[1]
    assert parts == (Native(FramesTransposed(head, frame)),)
    parts = choose_split(head, S, S, True, rows=8, width=128, threads=2)[1]
    assert isinstance(parts[0], Native) and not isinstance(parts[0].pattern, FramesTransposed)
    # forced: frames=True and native=True runs it there (causal, not offered: the rule cuts its
    # frame steps into many short pieces, slower than the slash kernel: torch's kernel in that
    # order); native=False never
    assert choose_split(head, S, S, False, rows=8, width=128, threads=2, frames=True, native=True)[1] == (
        Native(FramesTransposed(head, frame)),)
    assert choose_split(head, S, S, True, rows=8, width=128, threads=2, frames=True, native=True)[1] == (
        FramesTransposed(head, frame),)
    assert not any(isinstance(part, Native) for part in choose_split(head, S, S, False, rows=8, width=128,
                                                                      threads=2, native=False)[1])


@given(base=bases, frame=st.sampled_from([8, 12, 16, 20]), frames=st.sampled_from([2, 3, 4, 8]),
       block_m=st.sampled_from([8, 16, 32]), block_n=st.sampled_from([8, 16]), causal=st.booleans())
@settings(max_examples=80, deadline=None)
def test_closed_form_tile_counts_match_the_exact_coverage(base, frame, frames, block_m, block_n, causal):
    """codegen.frame_coverage counts the key tiles a renumbered pattern of bands touches without
    its rows' intervals: exactly block_coverage's touched tiles (when the frames fit a key tile)."""
    from sparsec.codegen.block_coverage import EMPTY, block_coverage
    from sparsec.codegen.frame_coverage import transposed_touched_tiles

    S = frame * frames
    pattern = FramesTransposed(base, frame)
    found = transposed_touched_tiles(pattern, S, S, block_m, block_n, causal)
    keeps_columns = isinstance(base, P.VerticalSlash) and any(start < S for start, _ in base.columns)
    if keeps_columns or frames > block_n:  # not bands only, or frames wider than a tile
        assert found is None
        return
    exact = (block_coverage(pattern, S, S, block_m, block_n, causal) != EMPTY).sum(dim=1)
    assert found.tolist() == exact.tolist()
