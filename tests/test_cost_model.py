"""Analytic attention cost model: counts the tiles kernels visit, launches, waves and skips."""
import math

import pytest
import torch

from sparsec import patterns as P
from sparsec.cost_models.attention_cost import AttentionShape, estimate_attention
from sparsec.cost_models.hardware import HardwareProfile, get_profile


def shape(S, heads=4, causal=False, dtype="bf16", batch=1):
    return AttentionShape(batch=batch, num_heads=heads, num_kv_heads=heads, q_len=S, kv_len=S,
                          head_dim=64, value_dim=64, dtype=dtype, causal=causal)


def pooled_tiles(pattern, S, bm, bn, causal):
    """Tiles with at least one kept pair, from the explicit mask (independent of block_coverage)."""
    mask = pattern.mask(S, S)
    if causal:
        mask &= torch.ones(S, S, dtype=torch.bool).tril()
    pad = torch.zeros(math.ceil(S / bm) * bm, math.ceil(S / bn) * bn, dtype=torch.bool)
    pad[:S, :S] = mask
    tiles = pad.reshape(pad.shape[0] // bm, bm, pad.shape[1] // bn, bn).any(dim=3).any(dim=1)
    return int(tiles.sum())


@pytest.mark.parametrize("pattern", [P.Window(40, 0), P.Columns([(0, 17), (200, 230)]),
                                     P.MultiDiagonal([-96, 0, 96], 8), P.AShape(16, 50) | P.Window(0, 30)])
@pytest.mark.parametrize("causal", [False, True])
def test_visited_blocks_are_the_tiles_the_mask_touches(pattern, causal):
    S, bm, bn = 300, 64, 32
    est = estimate_attention((pattern,) * 2, shape(S, heads=2, causal=causal, batch=3), get_profile("h100"),
                             block_m=bm, block_n=bn)
    assert est.visited_blocks == 3 * 2 * pooled_tiles(pattern, S, bm, bn, causal)
    assert est.dense_blocks == 3 * 2 * math.ceil(S / bm) * math.ceil(S / bn)


def test_head_fusion_saves_launches():
    hw = get_profile("h100")
    heads = tuple(P.Window(32 * (h + 1), 0) for h in range(8))
    fused = estimate_attention(heads, shape(512, heads=8), hw)
    unfused = estimate_attention(heads, shape(512, heads=8), hw, head_groups={f"h{h}": (h,) for h in range(8)})
    assert fused.launches == 1 and unfused.launches == 8
    assert unfused.seconds - fused.seconds >= 7 * hw.launch_overhead_s * 0.999


def test_sparse_beats_dense_at_low_density_and_skip_is_cheapest():
    hw = get_profile("h100")
    s = shape(16384, heads=8)
    dense = estimate_attention((P.Dense(),) * 8, s, hw).seconds
    window = estimate_attention((P.Window(1024, 1024),) * 8, s, hw).seconds
    skip = estimate_attention((P.Skip(),) * 8, s, hw).seconds
    assert skip < window < dense
    density = P.Window(1024, 1024).density(16384, 16384)
    assert window / dense == pytest.approx(density, rel=0.25)  # tile rounding costs a little


def test_causal_costs_about_half_of_full():
    hw = get_profile("h100")
    full = estimate_attention((P.Dense(),) * 8, shape(8192, heads=8), hw).seconds
    causal = estimate_attention((P.Dense(),) * 8, shape(8192, heads=8, causal=True), hw).seconds
    assert 0.45 < causal / full < 0.75  # half the tiles, plus the diagonal and imbalance across SMs


def test_wave_quantization():
    hw = HardwareProfile(name="toy", sm_count=4, tensor_flops={"bf16": 1e12}, vector_flops=1e11, exp_per_s=1e13,
                         memory_bandwidth=1e15, shared_memory_per_sm=1, l2_bytes=1, launch_overhead_s=0.0)
    one_wave = estimate_attention((P.Dense(),) * 4, shape(128, heads=4), hw, block_m=128).seconds
    two_waves = estimate_attention((P.Dense(),) * 5, shape(128, heads=5), hw, block_m=128).seconds
    assert two_waves == pytest.approx(2 * one_wave)


def test_profiles_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="unknown hardware target"):
        get_profile("tpu")
    h100 = get_profile("h100")
    assert HardwareProfile.from_json(h100.to_json()) == h100
    from sparsec.cost_models.calibration import save_calibrated_profile
    save_calibrated_profile(h100.replace(matmul_efficiency=0.61, calibrated_from="test"))
    assert get_profile("h100").matmul_efficiency == 0.61
    assert get_profile("h100", calibrated=False).matmul_efficiency != 0.61
    with pytest.raises(ValueError, match="patterns for"):
        estimate_attention((P.Dense(),), shape(64, heads=2), h100)
    with pytest.raises(ValueError, match="dtype"):
        shape(64, dtype="f64")
