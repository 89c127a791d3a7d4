"""Calibration statistics against the explicit float64 softmax, and the per-family fitting."""
from __future__ import annotations

import math

import pytest
import torch

import sparsec.passes.attention_stats as attention_stats_module
from planted import PlantedLayer
from sparsec.passes.attention_stats import LayerSample, attention_stats, combine_stats, pool_block_mass, sample_stats
from sparsec.passes.fit_candidates import (
    MAX_SELECTED_DENSITY, block_sparse, column_ranges, fit_block_sparse, fit_candidates, fit_columns, fit_head_patterns, fit_windows,
    frame_stride, sliding_max, snap_to_stride,
)
from sparsec.patterns import BlockSparse, Columns, MultiDiagonal, Skip, VerticalSlash, Window

pytestmark = pytest.mark.usefixtures("one_thread")


def explicit_probs(q, k, causal, scale=None):
    """(Hq, Sq, Sk) float64 attention probabilities averaged over the batch, from the full map."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(Hq // Hkv, dim=1)
    scores = q.double() @ kk.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(D))
    if causal:
        i, j = torch.arange(Sq)[:, None], torch.arange(Sk)[None, :]
        scores = scores.masked_fill(j > i + (Sk - Sq), -math.inf)
    return torch.softmax(scores, dim=-1).nan_to_num(0.0).mean(dim=0)


def explicit_diagonals(probs):
    H, Sq, Sk = probs.shape
    out = torch.zeros(H, Sq + Sk - 1, dtype=torch.float64)
    for i in range(Sq):
        out[:, Sk - 1 - i + (Sq - 1) - (Sk - 1): Sq - 1 - i + Sk] += probs[:, i]
    return out


def explicit_blocks(probs, bq, bk):
    H, Sq, Sk = probs.shape
    out = torch.zeros(H, math.ceil(Sq / bq), math.ceil(Sk / bk), dtype=torch.float64)
    for a in range(out.shape[1]):
        for b in range(out.shape[2]):
            out[:, a, b] = probs[:, a * bq:(a + 1) * bq, b * bk:(b + 1) * bk].sum(dim=(1, 2))
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq,Sk", [(96, 96), (70, 130), (130, 70)])
def test_stats_match_explicit_softmax(causal, Sq, Sk, monkeypatch):
    monkeypatch.setattr(attention_stats_module, "_CHUNK_ELEMENTS", 2 * 4 * 40 * Sk)  # several chunks
    g = torch.Generator().manual_seed(Sq * 7 + Sk + causal)
    q = torch.randn(2, 4, Sq, 16, generator=g, dtype=torch.float64) * 1.5
    k = torch.randn(2, 2, Sk, 16, generator=g, dtype=torch.float64)  # GQA: 2 query heads per kv head
    stats = attention_stats(q, k, causal=causal, block=(16, 32))
    probs = explicit_probs(q, k, causal) / Sq
    torch.testing.assert_close(stats.column_mass, probs.sum(dim=1), atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(stats.diagonal_mass, explicit_diagonals(probs), atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(stats.block_mass, explicit_blocks(probs, 16, 32), atol=1e-12, rtol=1e-9)
    assert stats.rows == 2 * Sq


def test_diagonal_index_convention():
    # One query attending (almost) only to key j = i + 3: all mass at offset 3.
    S = 40
    q = torch.zeros(1, 1, S, S + 3, dtype=torch.float64)
    k = torch.zeros(1, 1, S, S + 3, dtype=torch.float64)
    q[0, 0, torch.arange(S), torch.arange(S) + 3] = 50.0
    k[0, 0, torch.arange(S), torch.arange(S)] = 50.0
    stats = attention_stats(q, k, scale=1.0)
    rows_with_target = S - 3
    assert stats.diagonal_mass[0, stats.offset_index(3)] == pytest.approx(rows_with_target / S, abs=1e-9)


def test_scale_and_float32_inputs():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 2, 64, 8, generator=g), torch.randn(1, 2, 64, 8, generator=g)
    stats = attention_stats(q, k, scale=0.7, block=(32, 32))
    probs = explicit_probs(q, k, False, scale=0.7) / 64
    torch.testing.assert_close(stats.column_mass, probs.sum(dim=1), atol=1e-6, rtol=1e-5)


def test_pool_and_combine():
    g = torch.Generator().manual_seed(5)
    q1, k1 = torch.randn(1, 2, 128, 8, generator=g), torch.randn(1, 2, 128, 8, generator=g)
    q2, k2 = torch.randn(3, 2, 128, 8, generator=g), torch.randn(3, 2, 128, 8, generator=g)
    fine = attention_stats(q1, k1, block=(16, 16))
    coarse = attention_stats(q1, k1, block=(64, 48))
    torch.testing.assert_close(pool_block_mass(fine.block_mass, (4, 3)), coarse.block_mass)
    both = combine_stats([fine, attention_stats(q2, k2, block=(16, 16))])
    joint = attention_stats(torch.cat([q1, q2]), torch.cat([k1, k2]), block=(16, 16))
    torch.testing.assert_close(both.column_mass, joint.column_mass)
    torch.testing.assert_close(both.diagonal_mass, joint.diagonal_mass)
    with pytest.raises(ValueError, match="share their shape"):
        combine_stats([fine, coarse])


def test_bad_inputs_are_named():
    q, k = torch.randn(1, 3, 8, 4), torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention_stats(q, k)
    with pytest.raises(ValueError, match="4-D"):
        attention_stats(q[0], k)
    with pytest.raises(ValueError, match="block"):
        attention_stats(q, q, block=(0, 4))


# -- fitting -------------------------------------------------------------------------------------


def test_fitted_windows_and_columns_cover_their_share():
    layer = PlantedLayer(("band", "stripes", "random"), 128, 16, seed=2)
    q, k, _ = layer.sample(1, 0)
    stats = attention_stats(q, k, block=(32, 32))
    probs = explicit_probs(q, k, False) / 128  # the test's own reference map
    for target in (0.5, 0.9, 0.99):
        for h in range(3):
            (window,) = fit_windows(stats.diagonal_mass[h], 128, 128, [target], quantum=1)
            assert float((probs[h] * window.mask(128, 128)).sum()) >= target - 1e-9
            narrower = Window(max(0, window.left - 1), window.right) if window.left else Window(0, max(0, window.right - 1))
            if narrower != window and h == 0:
                assert float((probs[h] * narrower.mask(128, 128)).sum()) < target + 0.02
            found = fit_columns(stats.column_mass[h], [target])
            if found:
                (cols,) = found
                assert float((probs[h] * cols.mask(128, 128)).sum()) >= target - 1e-9
                assert cols.density(128, 128) <= MAX_SELECTED_DENSITY
            else:  # the heaviest columns holding the share are over half the keys: no candidate
                covered = probs[h].sum(dim=0).sort(descending=True).values.cumsum(dim=0)
                needed = int(torch.searchsorted(covered, torch.tensor(target - 1e-9, dtype=covered.dtype))) + 1
                assert needed > MAX_SELECTED_DENSITY * 128, (h, target, needed)
    # the stripes head's columns at 0.99 are exactly its planted columns
    (cols,) = fit_columns(stats.column_mass[1], [0.99])
    assert cols == Columns(layer.stripe_columns(1))


def test_mass_selected_candidates_stay_sparse():
    """Columns, slashes and block layouts picked by a sample's attention mass are dropped when
    they need over MAX_SELECTED_DENSITY of the keys: on a head of random attention they fit the
    sample, not the head. The planted stripes and band heads keep theirs."""
    layer = PlantedLayer(("band", "stripes", "random"), 256, 16, seed=5)
    q, k, _ = layer.sample(1, 0)
    stats = attention_stats(q, k, block=(32, 32))
    candidates = fit_candidates(stats, tiles=[(32, 32)])
    selected = (Columns, VerticalSlash, BlockSparse)
    for h, head in enumerate(candidates):
        for p in head:
            if isinstance(p, selected):
                assert p.density(256, 256) <= MAX_SELECTED_DENSITY + 1e-9, (h, p)
    assert Columns(layer.stripe_columns(1)) in candidates[1]
    assert any(isinstance(p, BlockSparse) for p in candidates[0])


def test_frame_stride_found_from_diagonal_peaks():
    layer = PlantedLayer(("frames",), 512, 16, frame=64, frame_decay=1.0)
    q, k, _ = layer.sample(1, 0)
    stats = attention_stats(q, k, block=(64, 32))
    candidates = fit_candidates(stats, tiles=[(64, 32)])[0]
    diagonals = [p for p in candidates if isinstance(p, MultiDiagonal)]
    assert diagonals, "no MultiDiagonal candidate"
    assert all(o % 64 == 0 for p in diagonals for o in p.offsets)
    assert any(set(p.offsets) >= {-64, 0, 64} for p in diagonals)
    assert frame_stride([-129, -128, -64, -1, 0, 1, 63, 64, 128], 0) == 64
    assert frame_stride([0, 37, 50], 0) is None
    assert snap_to_stride([-64, -1, 0, 1, 63, 128], 0) == ([-64, 0, 64, 128], 1)


def test_block_sparse_keeps_causal_diagonal_blocks():
    g = torch.Generator().manual_seed(9)
    blocks = torch.rand(4, 8, generator=g, dtype=torch.float64)
    (pattern,) = fit_block_sparse(blocks, (32, 16), 128, 128, True, [0.1])
    layout = pattern.layout
    for a in range(4):  # query rows 32a..32a+31 end at keys in blocks 2a and 2a+1
        assert layout[a, 2 * a] and layout[a, 2 * a + 1]
    assert isinstance(pattern, BlockSparse) and pattern.block == (32, 16)


def test_column_ranges_caps_by_bridging_smallest_gaps():
    assert column_ranges([1, 2, 3, 7, 20]) == [(1, 4), (7, 8), (20, 21)]
    assert column_ranges([1, 2, 3, 7, 20], max_ranges=2) == [(1, 8), (20, 21)]


def test_candidates_always_hold_dense_and_skip():
    layer = PlantedLayer(("uniform", "band"), 128, 16, causal=True)
    q, k, v = layer.sample(2, 0)
    stats = sample_stats([LayerSample(q, k, v, causal=True)], block=(32, 32))
    for head in fit_candidates(stats, tiles=[(32, 32), (64, 32)]):
        assert head[0].family == "dense" and Skip("mean") in head
        assert len(set(head)) == len(head)
        for p in head:
            if isinstance(p, BlockSparse):
                p.check_lengths(128, 128)


def test_fitting_all_heads_at_once_equals_fitting_each_head():
    layer = PlantedLayer(("band", "stripes", "frames", "uniform", "random"), 256, 16, causal=True, seed=4, frame=64)
    stats = attention_stats(*layer.sample(2, 0)[:2], causal=True, block=(32, 32))
    tiles = [(32, 32), (64, 32)]
    together = fit_candidates(stats, tiles=tiles)
    pooled = {t: pool_block_mass(stats.block_mass, (t[0] // 32, t[1] // 32)) for t in set(tiles)}
    for h in range(5):
        alone = fit_head_patterns(stats, h, pooled_blocks={t: b[h] for t, b in pooled.items()})
        assert together[h] == alone
        assert [type(p) for p in together[h]] == [type(p) for p in alone]


def test_block_sparse_builder_and_sliding_max_match_their_references():
    g = torch.Generator().manual_seed(11)
    layout = torch.rand(9, 14, generator=g) < 0.4
    built, reference = block_sparse(layout, (8, 4)), BlockSparse(layout, (8, 4))
    assert built == reference and hash(built) == hash(reference) and torch.equal(built.layout, layout)
    values = torch.rand(3, 57, generator=g, dtype=torch.float64)
    for radius in (0, 1, 3, 20, 60):
        want = torch.nn.functional.max_pool1d(values[:, None], 2 * radius + 1, stride=1, padding=radius)[:, 0]
        assert torch.equal(sliding_max(values, radius), want), radius
