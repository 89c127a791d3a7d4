"""The CPU executor's native interval kernel (codegen/attention_cpu_native.py): exact against a
float64 reference built from explicit masks, its operands (interval_pieces) and work counts
(native_counts) against brute force, the cost model's choice of it, and the fallback to torch's
kernel where it cannot be built."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsec.patterns as P
from sparsec.codegen import native_build
from sparsec.codegen.attention_cpu import cpu_attention
from sparsec.codegen.attention_cpu_choice import choose_split
from sparsec.codegen.attention_cpu_native import (NATIVE_SUB_M, Native, interval_pieces, native_block_m,
                                                  native_counts, native_form, native_kernel, run_native,
                                                  slash_form)

pytestmark = pytest.mark.skipif(native_kernel() is None, reason="native kernel not built: "
                                + native_build.native_status("interval_attention"))


def allowed(pattern, Sq, Sk, causal):
    keep = pattern.mask(Sq, Sk)
    if causal:
        keep = keep & (torch.arange(Sk)[None, :] <= torch.arange(Sq)[:, None] + (Sk - Sq))
    return keep


def reference(q, k, v, pattern, causal, scale):
    group = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed(pattern, q.shape[2], k.shape[2], causal), -math.inf)
    return torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v  # a row with no key gives 0


CASES = [  # pattern, Sq, Sk, causal
    (P.Window(548, 548), 1100, 1100, False),
    (P.Window(300, 0), 700, 700, True),
    (P.Window(5, 7), 100, 100, False),
    (P.Window(20, 20), 257, 300, True),  # Sq != Sk, causal offset
    (P.AShape(16, 64), 777, 777, True),
    (P.MultiDiagonal([-128, 0, 128], 8), 512, 512, False),
    (P.Columns([(0, 10), (50, 70)]), 300, 400, True),
    (P.Window(40, 0) | P.Columns([(100, 140)]), 600, 600, True),
    (P.Dense(), 333, 500, True),
    (P.VerticalSlash([(0, 4), (90, 95)], [0, -7]), 257, 257, True),
    (P.Columns([(200, 210)]), 64, 256, True),  # early rows keep no key: 0
    (P.Window(3, 3), 1, 9, False),  # Sq = 1
]


def random_blocks(Sq, Sk, bq, bk, density, generator=None):
    layout = torch.rand(math.ceil(Sq / bq), math.ceil(Sk / bk), generator=generator) < density
    return P.BlockSparse(layout, (bq, bk))


torch.manual_seed(0)
CASES += [
    (random_blocks(300, 300, 32, 32, 0.3), 300, 300, True),
    (random_blocks(200, 333, 64, 16, 0.4), 200, 333, True),  # bq != bk, Sq != Sk, partial blocks
    (random_blocks(257, 257, 16, 64, 0.5), 257, 257, False),
    (random_blocks(1100, 1100, 128, 128, 0.6), 1100, 1100, False),  # runs longer than a GEMM chunk
    (P.BlockSparse(torch.zeros(4, 4, dtype=torch.bool), 32), 128, 128, False),  # keeps nothing: 0
    (P.VerticalSlash([(c, c + 1) for c in range(0, 600, 7)], list(range(-590, 40, 9))), 600, 600, True),
    (P.VerticalSlash([(3, 4)], [-1000, 0, 5]), 300, 340, True),  # a slash that reaches no key
    (P.VerticalSlash([], [0, -1, -2]), 100, 100, False),
    # more pieces than the interval kernel takes: on the slash kernel as the same keys (slash_form)
    (P.MultiDiagonal([f * 40 + r for f in range(-6, 7) for r in (-6, 0, 6)], 2), 260, 260, True),  # temporal
    (P.Columns([(c, c + 3) for c in range(0, 300, 20)]), 300, 310, False),  # 15 column runs
    (P.Window(8, 8) | P.MultiDiagonal([-150, -100, -50, 50, 100, 150], 4) | P.Columns([(0, 2)]), 220, 200, True),
]


@pytest.mark.parametrize("pattern, Sq, Sk, causal", CASES, ids=[f"{c[0]!r}-{c[1]}x{c[2]}-{c[3]}" for c in CASES])
def test_native_kernel_matches_the_masked_reference(pattern, Sq, Sk, causal):
    """Through the executor (which may run a narrow band as slashes) and on the kernel of the
    pattern's own form (native_form: the interval kernel for bands)."""
    B, Hq, Hkv, D, Dv = 2, 4, 2, 32, 48  # GQA, Dv != D
    q, k, v = torch.randn(B, Hq, Sq, D), torch.randn(B, Hkv, Sk, D), torch.randn(B, Hkv, Sk, Dv)
    expected = reference(q, k, v, pattern, causal, 0.2)
    out = cpu_attention(q, k, v, (pattern,) * Hq, causal=causal, scale=0.2, native=True)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)
    own = torch.full((B, Hq, Sq, Dv), math.nan)
    run_native(q, k, v, own, list(range(Hq)), pattern, causal, 0.2, threads=2)
    torch.testing.assert_close(own.double(), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_kernel_per_head_patterns_and_dtypes(dtype):
    """Heads of several patterns (some native, a BlockSparse and a Skip through torch's path),
    non-contiguous inputs, each dtype."""
    S, D = 300, 64
    layout = torch.rand(math.ceil(S / 32), math.ceil(S / 32)) < 0.3
    patterns = (P.Window(30, 30), P.BlockSparse(layout, 32), P.AShape(8, 40), P.Window(30, 30))
    q, k, v = (torch.randn(1, S, 4, D).transpose(1, 2).to(dtype) for _ in range(3))
    out = cpu_attention(q, k, v, patterns, causal=True, scale=D ** -0.5, native=True)
    assert out.dtype == dtype
    for h, pattern in enumerate(patterns):
        expected = reference(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], pattern, True, D ** -0.5)
        tol = 2e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[:, h:h + 1].double(), expected, atol=tol, rtol=tol)


bands = st.one_of(
    st.builds(P.Window, st.integers(0, 90), st.integers(0, 90)),
    st.builds(P.MultiDiagonal, st.lists(st.integers(-120, 120), min_size=1, max_size=4), st.integers(0, 12)),
    st.builds(P.AShape, st.integers(1, 40), st.integers(0, 60)),
    st.builds(lambda a, w: P.Columns([(a, a + w)]), st.integers(0, 150), st.integers(1, 30)),
)
patterns_st = st.one_of(bands, st.tuples(bands, bands).filter(lambda ab: ab[0] != ab[1]).map(lambda ab: ab[0] | ab[1]))


@settings(max_examples=40, deadline=None)
@given(pattern=patterns_st, Sq=st.integers(1, 300), extra=st.integers(0, 60), causal=st.booleans())
def test_interval_pieces_are_disjoint_monotone_and_exact(pattern, Sq, extra, causal):
    Sk = Sq + extra
    pieces = interval_pieces(pattern, Sq, Sk, causal)
    if pieces is None:
        return
    assert pieces.groups.tolist() == list(range(pieces.lo.shape[0] + 1))  # in token order: a group a piece
    lo, hi = (torch.from_numpy(x.astype(np.int64)) for x in pieces[:2])
    assert ((lo >= 0) & (lo <= Sk) & (hi >= -1) & (hi <= Sk - 1) & (hi >= lo - 1)).all()
    assert (lo.diff(dim=1) >= 0).all() and (hi.diff(dim=1) >= 0).all()
    keys = torch.arange(Sk)
    inside = (keys[None, None, :] >= lo[:, :, None]) & (keys[None, None, :] <= hi[:, :, None])  # (P, Sq, Sk)
    assert (inside.sum(0) <= 1).all()  # disjoint
    assert torch.equal(inside.any(0), allowed(pattern, Sq, Sk, causal))


vertical_slashes = st.builds(
    P.VerticalSlash,
    st.lists(st.integers(0, 120).flatmap(lambda a: st.tuples(st.just(a), st.integers(a + 1, a + 12))), max_size=3),
    st.lists(st.integers(-140, 60), min_size=1, max_size=12))


@settings(max_examples=30, deadline=None)
@given(pattern=vertical_slashes, Sq=st.integers(1, 140), extra=st.integers(-20, 40), causal=st.booleans(),
       dims=st.sampled_from([(16, 16), (5, 7), (64, 3), (1, 1), (32, 80)]))
def test_slash_kernel_matches_the_masked_reference(pattern, Sq, extra, causal, dims):
    """Slashes 16 rows at a time: groups cut by the tile's end, keys off either end of K and
    cut by the causal limit, keys that are also columns, head dims that are no multiple of 4."""
    Sk = max(1, Sq + extra)
    D, Dv = dims
    q, k, v = torch.randn(1, 2, Sq, D), torch.randn(1, 1, Sk, D), torch.randn(1, 1, Sk, Dv)
    out = cpu_attention(q, k, v, (pattern,) * 2, causal=causal, scale=0.3, native=True)
    torch.testing.assert_close(out.double(), reference(q, k, v, pattern, causal, 0.3), atol=2e-5, rtol=2e-5)


def simulated_block_counts(pattern, Sq, Sk, causal, rows=None):
    """The block-runs kernel's loops run in Python, from the layout: pairs and masked pairs per tile
    (and in `rows`, when given, each tile's rows where it computes some key, else 0)."""
    bq, bk = pattern.block
    limit = [min(i + Sk - Sq, Sk - 1) if causal else Sk - 1 for i in range(Sq)]
    pairs, masked = [], []
    rows = [] if rows is None else rows
    for t, row in enumerate(pattern.layout.tolist()):
        a, R = t * bq, min(bq, Sq - t * bq)
        p_all = p_masked = 0
        computes = False
        c = 0
        while c < len(row):
            if not row[c]:
                c += 1
                continue
            end = c
            while end < len(row) and row[end]:
                end += 1
            k0, k1 = c * bk, min(min(end * bk, Sk) - 1, limit[a + R - 1]) + 1
            computes = computes or k1 > k0
            for chunk in range(k0, k1, 512):
                C = min(512, k1 - chunk)
                p_all += R * C
                p_masked += R * C if chunk + C - 1 > limit[a] else 0
            c = end
        pairs.append(p_all)
        masked.append(p_masked)
        rows.append(R if computes else 0)
    return pairs, masked


def simulated_slash_counts(pattern, Sq, Sk, causal):
    """The column-slash kernel: its columns as one piece of the interval kernel over the gathered
    columns (their count by the causal limit); apart, 16 lanes for each group of 16 rows and slash
    where some row of the group keeps the slash's key and it is no column."""
    keep = allowed(pattern, Sq, Sk, causal)
    is_column = allowed(P.Columns(pattern.columns), Sq, Sk, causal) if pattern.columns else torch.zeros_like(keep)
    count = is_column.sum(1).numpy()
    pairs, masked = simulated_counts(None, Sq, Sk, causal, pieces=(np.zeros((1, Sq), int), count[None] - 1))
    T = native_block_m(pattern, Sq)
    slash_only = keep & ~is_column
    fetched, distinct = [0] * len(pairs), [0] * len(pairs)
    for g in range(0, Sq, 16):
        read = set()  # the K / V rows the group's computed slashes read (16 from g + o)
        for o in pattern.offsets:
            if any(0 <= i + o < Sk and slash_only[i, i + o] for i in range(g, min(g + 16, Sq))):
                fetched[g // T] += 16
                read |= set(range(g + o, g + o + 16))
        distinct[g // T] += len(read)
    return pairs, masked, fetched, distinct


def simulated_counts(pattern, Sq, Sk, causal, pieces=None):
    """The kernel's loops (interval_attention.cpp) run in Python: pairs and masked pairs per tile."""
    if isinstance(pattern, P.BlockSparse):
        return simulated_block_counts(pattern, Sq, Sk, causal)
    if pattern is not None and native_form(pattern, Sq, Sk, causal) == "slashes":  # slash_form: checked apart
        return tuple(simulated_slash_counts(slash_form(pattern, Sq, Sk), Sq, Sk, causal)[:2])
    pieces = pieces if pieces is not None else interval_pieces(pattern, Sq, Sk, causal)
    lo, hi = pieces[:2]
    groups = pieces[2] if len(pieces) > 2 else np.arange(lo.shape[0] + 1)
    T, t = (native_block_m(pattern, Sq) if pattern is not None else min(256, -(-Sq // 32) * 32)), NATIVE_SUB_M
    pairs, masked = [], []
    for a in range(0, Sq, T):
        R, p_all, p_masked = min(T, Sq - a), 0, 0
        for g0, g1 in zip(groups[:-1], groups[1:]):
            if g1 - g0 > 1:  # a group: per sub-tile, from the first key any row keeps in any piece to the last
                for s0 in range(0, R, t):
                    rows = range(a + s0, a + min(s0 + t, R))
                    spans = [(lo[p][r], hi[p][r]) for p in range(g0, g1) for r in rows if hi[p][r] >= lo[p][r]]
                    if spans:
                        p_masked += len(rows) * (max(b for _, b in spans) + 1 - min(b for b, _ in spans))
                continue
            l, h = lo[g0][a:a + R], hi[g0][a:a + R]
            mid0, mid1 = l[R - 1], h[0] + 1
            middle = mid1 - mid0 >= t
            for s0 in range(0, R, t):
                n = min(t, R - s0)
                if middle:
                    width = max(0, mid0 - l[s0]) + max(0, h[s0 + n - 1] + 1 - mid1)
                else:
                    kept = [r for r in range(s0, s0 + n) if h[r] >= l[r]]
                    width = h[kept[-1]] + 1 - l[kept[0]] if kept else 0
                p_masked += n * width
            p_all += R * (mid1 - mid0) if middle else 0
        pairs.append(p_all + p_masked)
        masked.append(p_masked)
    return pairs, masked


@pytest.mark.parametrize("pattern, Sq, Sk, causal", CASES[:10] + CASES[-8:])
def test_native_counts_follow_the_kernel_loops(pattern, Sq, Sk, causal):
    pairs, masked, rows, fetched, distinct = native_counts(pattern, Sq, Sk, causal)
    expected_pairs, expected_masked = simulated_counts(pattern, Sq, Sk, causal)
    assert pairs.tolist() == expected_pairs and masked.tolist() == expected_masked
    if isinstance(pattern, P.BlockSparse):  # a tile without runs computes no row
        simulated_block_counts(pattern, Sq, Sk, causal, rows=(expected_rows := []))
        assert rows.tolist() == expected_rows
    else:
        assert rows.sum() == Sq
    if native_form(pattern, Sq, Sk, causal) == "slashes":
        expected_fetched, expected_distinct = simulated_slash_counts(slash_form(pattern, Sq, Sk), Sq, Sk, causal)[2:]
        assert fetched.tolist() == expected_fetched and distinct.tolist() == expected_distinct
    else:
        assert fetched is None and distinct is None
    computed = pairs.sum() + (0 if fetched is None else fetched.sum())
    assert computed >= allowed(pattern, Sq, Sk, causal).sum()  # every kept pair is computed


@pytest.mark.parametrize("causal", [False, True])
def test_native_counts_in_frame_transposed_order_follow_the_kernel_loops(causal):
    """A temporal head renumbered in frame-transposed order (codegen.frame_order): its pieces (most
    of them empty but near the first and last positions) counted as the kernel's loops run them."""
    from sparsec.codegen.frame_order import FramesTransposed

    S, frame = 384, 48
    pattern = FramesTransposed(P.MultiDiagonal([k * frame + r for k in range(-7, 8) for r in (-5, 0, 5)], 2), frame)
    pieces = interval_pieces(pattern, S, S, causal)
    assert pieces is not None and native_form(pattern, S, S, causal) == "intervals"
    pairs, masked, rows, fetched, _ = native_counts(pattern, S, S, causal)
    expected_pairs, expected_masked = simulated_counts(None, S, S, causal, pieces=pieces)
    assert pairs.tolist() == expected_pairs and masked.tolist() == expected_masked and fetched is None
    assert rows.sum() == S
    assert interval_pieces(pattern, S, S + frame, causal) is None  # renumbering needs Sq == Sk


def test_the_cost_model_takes_the_native_kernel_for_a_wide_window_only_where_it_pays():
    """A 25% window at S = 4096 (8 heads, 2 threads): the native kernel (measured ~3x dense SDPA
    on the AVX-512 machine, against ~2.2x through torch's kernel); never for a pattern without
    the native forms, nor when the block size, split or order is forced, nor when disabled."""
    window = P.Window(548, 548)
    bm, parts = choose_split(window, 4096, 4096, False, rows=8, width=128, threads=2)
    assert parts == (Native(window),) and bm == native_block_m(window, 4096)
    assert choose_split(window, 4096, 4096, False, 64, rows=8, width=128, threads=2) == (64, (window,))
    assert not isinstance(choose_split(window, 4096, 4096, False, rows=8, width=128, threads=2,
                                       native=False)[1][0], Native)
    # Dense heads the executor runs with one SDPA call are priced so (a causal one with Sq != Sk may
    # run natively); Skip heads never run a kernel
    assert choose_split(P.Dense(), 2048, 16, False, rows=4, width=64, threads=2)[1] == (P.Dense(),)
    assert choose_split(P.Dense(), 2048, 2048, True, rows=4, width=64, threads=2)[1] == (P.Dense(),)
    assert native_form(P.Skip("mean"), 64, 64, False) is None
    mixed = P.Window(4, 4) | P.BlockSparse(torch.ones(4, 4, dtype=torch.bool), 16)  # no native form
    assert native_form(mixed, 64, 64, False) is None
    assert choose_split(mixed, 64, 64, False, rows=8, width=128, threads=2, native=True)[1] == (mixed,)


def test_narrow_bands_run_as_slashes():
    """A band of a few keys a row runs on the slash kernel (measured: a causal 3-key band at
    S = 4096, 8 heads, 1.7 ms against 3.5 ms in the interval kernel's tiles); a wide one stays on
    the tiles. Either way the result is exact."""
    narrow, wide = P.Window(2, 0), P.Window(300, 300)
    assert choose_split(narrow, 4096, 4096, True, rows=8, width=128, threads=2)[1] == (
        Native(P.VerticalSlash([], [-2, -1, 0])),)
    assert choose_split(wide, 4096, 4096, False, rows=8, width=128, threads=2)[1] == (Native(wide),)
    q, k, v = (torch.randn(1, 2, 300, 16) for _ in range(3))
    for pattern in (narrow, P.Window(5, 3) | P.Columns([(0, 2)])):
        out = cpu_attention(q, k, v, (pattern,) * 2, causal=True, scale=0.3)
        torch.testing.assert_close(out.double(), reference(q, k, v, pattern, True, 0.3), atol=2e-5, rtol=2e-5)


def test_slash_form_keeps_the_same_keys():
    """Columns and bands beyond the interval kernel's pieces run on the slash kernel as a
    VerticalSlash with exactly their kept keys; bands of more than _MAX_SLASHES offsets do not."""
    temporal = P.MultiDiagonal([f * 64 + r for f in range(-15, 16) for r in (-8, 0, 8)], 2)
    for Sq, Sk in ((1024, 1024), (700, 1024), (1024, 600)):
        assert interval_pieces(temporal, Sq, Sk, True) is None
        assert native_form(temporal, Sq, Sk, True) == "slashes"
        slashes = slash_form(temporal, Sq, Sk)
        assert torch.equal(slashes.mask(Sq, Sk), temporal.mask(Sq, Sk))
    runs = P.Columns([(c, c + 5) for c in range(0, 1000, 50)])
    assert slash_form(runs, 1000, 1000).offsets == () and torch.equal(slash_form(runs, 1000, 1000).mask(1000, 1000),
                                                                       runs.mask(1000, 1000))
    wide = P.MultiDiagonal([k * 500 for k in range(-8, 9)], 200)  # 17 bands of 201 offsets
    assert slash_form(wide, 4096, 4096) is None and native_form(wide, 4096, 4096, False) is None


def test_without_the_native_kernel_the_executor_runs_torchs(monkeypatch, tmp_path):
    """No compiler: load_native warns once and returns None, the choice never names the native
    kernel, and the result is still exact. SPARSEC_CPU_NATIVE=0 disables it the same way."""
    window = P.Window(20, 20)
    q, k, v = (torch.randn(1, 2, 200, 16) for _ in range(3))
    expected = reference(q, k, v, window, False, 0.25)
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PATH", str(tmp_path))
    native_build._load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C.. compiler"):
            assert native_kernel() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once
            assert native_kernel() is None
        assert "no C++ compiler" in native_build.native_status("interval_attention")
        assert not isinstance(choose_split(window, 200, 200, False, rows=2, width=32)[1][0], Native)
        out = cpu_attention(q, k, v, (window,) * 2, causal=False, scale=0.25, native=True)
        torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)
    finally:
        native_build._load.cache_clear()
    monkeypatch.setenv("SPARSEC_CPU_NATIVE", "0")
    assert native_kernel() is None and native_build.native_status("interval_attention") == "disabled"


def test_calibration_times_and_prices_native_candidates():
    """The CPU calibration grid runs band families through the native kernel too, and their
    predictions move with the native terms only (what lets `calibrate` fit them)."""
    from sparsec.cost_models.fit import candidate_work, predict
    from sparsec.cost_models.hardware import get_profile
    from sparsec.cost_models.measure import NATIVE_FAMILIES, default_grid

    natives = [c for c in default_grid("cpu", quick=True) if c.native]
    assert {c.family for c in natives} == set(NATIVE_FAMILIES) and all("native" in c.label for c in natives)
    hw = get_profile("cpu", calibrated=False)
    work = candidate_work(next(c for c in natives if c.family == "window" and c.target_density >= 0.1), "cpu")
    base = predict(hw, [work])[0]
    assert predict(hw.replace(native_pair_speed=2 * hw.native_pair_speed), [work])[0] < base
    assert predict(hw.replace(native_mask_cost_per_pair=2 * hw.native_mask_cost_per_pair), [work])[0] > base
    assert predict(hw.replace(query_rows_exponent=2 * hw.query_rows_exponent), [work])[0] == base


def test_explain_names_the_heads_on_the_native_kernels(monkeypatch):
    """explain's attention line says which heads the cpu executor runs natively, and none once the
    native kernels are disabled."""
    from sparsec import explain
    from sparsec.demo import DEMO_CONFIG
    from sparsec.models import example_inputs, tiny_dit

    model, _ = tiny_dit(DEMO_CONFIG)
    inputs = example_inputs(DEMO_CONFIG, seed=4)
    options = {"inner": "eager", "target": "cpu", "attention_patterns": {"blocks.*.attn": P.Window(256, 256)}}

    def attention_lines():
        report = explain(model, *inputs, options=options)
        return [line for line in report.summary().splitlines() if ".attn:" in line]

    assert all(line.endswith("heads 0, 1, 2, 3 on the native CPU kernels") for line in attention_lines())
    monkeypatch.setenv("SPARSEC_CPU_NATIVE", "0")
    assert all("native" not in line for line in attention_lines())
