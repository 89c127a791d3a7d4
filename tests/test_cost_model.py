"""Analytic attention cost model: counts the tiles kernels visit, launches, waves and skips."""
import math

import numpy as np
import pytest
import torch

from sparsec import patterns as P
from sparsec.cost_models.attention_cost import AttentionShape, estimate_attention, pattern_counts
from sparsec.cost_models.hardware import PROFILES, HardwareProfile, get_profile


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


# -- the cpu executor's profile ---------------------------------------------------------------------


def test_cpu_profile_prices_the_executor_reads(torch_kernel_only):
    from sparsec.codegen.attention_cpu_reads import cpu_block_reads
    from sparsec.cost_models.attention_cost import attention_work, price_attention

    hw = get_profile("cpu", calibrated=False)
    assert hw.executor == "cpu"
    s = shape(1024, heads=4, dtype="f32")
    window = P.Window(100, 0)
    work = attention_work((window,) * 4, s, block_m=64, executor="cpu")
    reads = cpu_block_reads(window, 1024, 1024, 64, False)
    (launch,) = work.launches
    assert launch.visited.tolist() == (reads.keys * 64).tolist() * 4  # pairs, per head
    assert launch.calls == reads.calls  # one plan for every head of the pattern
    assert launch.computed.sum() == 4 * 1024  # every query row of every head has keys
    base = price_attention(work, hw).seconds
    # Each coefficient moves the price the way its count says.
    assert price_attention(work, hw.replace(call_overhead_s=hw.call_overhead_s + 1e-3)).seconds == pytest.approx(
        base + reads.calls * 1e-3)
    assert price_attention(work, hw.replace(matmul_efficiency=hw.matmul_efficiency / 2)).seconds > base
    assert price_attention(work, hw.replace(mask_cost_per_pair=2 * hw.mask_cost_per_pair)).seconds > base
    assert price_attention(work, hw.replace(row_overhead_s=2 * hw.row_overhead_s)).seconds > base
    # Unmasked, ungathered key reads are cheaper than a masked band reading as many pairs.
    layout = torch.eye(16, dtype=torch.bool)
    blocks = estimate_attention((P.BlockSparse(layout, 64),) * 4, s, hw, block_m=64).seconds
    band = estimate_attention((P.Window(63, 0),) * 4, s, hw, block_m=64).seconds
    assert blocks < band
    # Without tiles the estimate follows the executor's own query block choice.
    from sparsec.codegen.attention_cpu_choice import choose_split
    chosen, parts = choose_split(window, 1024, 1024, False, rows=s.batch * s.num_heads, width=s.head_dim + s.value_dim,
                                 threads=torch.get_num_threads())
    assert parts == (window,)
    assert estimate_attention((window,) * 4, s, hw, block_m=None).seconds == pytest.approx(
        estimate_attention((window,) * 4, s, hw, block_m=chosen).seconds)


def test_cpu_short_sequences_pay_their_calls():
    """At S = 512 on two cores the executor's fixed costs outweigh what a band saves on a few heads
    (the tiny DiT demo measures sparse slower than dense there); at S = 4096 the band wins."""
    hw = get_profile("cpu", calibrated=False)
    for S, sparse_wins in ((256, False), (4096, True)):
        s = shape(S, heads=2, dtype="f32")
        dense = estimate_attention((P.Dense(),) * 2, s, hw, block_m=None).seconds
        mixed = estimate_attention((P.Dense(), P.Window(S // 16, 0)), s, hw, block_m=None).seconds
        assert (mixed < dense) == sparse_wins, S


@pytest.mark.parametrize("S", [48, 128])
def test_cpu_dense_heads_pay_their_sdpa_call_but_no_plan(S):
    """The executor runs Dense heads as one SDPA call with no plan (an all-dense layer keeps the
    model's own call): a dense layer pays call_overhead_s, not launch_overhead_s. On a short
    sequence a pattern that keeps nearly every pair is then never priced below dense, as the plan's
    fixed cost used to make it (a 99.7% window at S = 48 priced 1.6x faster, measured 6x slower)."""
    from sparsec.cost_models.attention_cost import head_seconds_many

    hw = get_profile("cpu")
    s = AttentionShape(batch=1, num_heads=2, num_kv_heads=2, q_len=S, kv_len=S, head_dim=16, value_dim=16,
                       dtype="f32")
    dense = estimate_attention((P.Dense(),) * 2, s, hw, block_m=None).seconds
    unfixed = hw.replace(launch_overhead_s=0.0, call_overhead_s=0.0)
    programs = estimate_attention((P.Dense(),) * 2, s, unfixed, block_m=None).seconds
    assert dense - programs == pytest.approx(hw.call_overhead_s, rel=1e-9)
    near_full = P.Window(S - 3, S - 3)
    assert estimate_attention((near_full,) * 2, s, hw, block_m=None).seconds > dense
    dense_head, window_head = head_seconds_many([P.Dense(), near_full], s, hw, block_m=64, block_n=32)
    assert window_head > dense_head


def test_cpu_rows_pay_beyond_their_pairs(torch_kernel_only):
    """Each query row a part of the plan computes costs row_overhead_s beyond its pairs (measured
    ~200 ns on 2 cores, as much as ~40 pairs at D = 64); a pattern run in two parts computes a
    row once a part that reads keys for it."""
    from sparsec.codegen.attention_cpu_choice import choose_split

    hw = get_profile("cpu", calibrated=False).with_cores(1)
    flat = hw.replace(row_overhead_s=0.0)
    s = shape(2048, heads=4, dtype="f32")

    def rows_paid(pattern):
        seconds = [estimate_attention((pattern,) * 4, s, profile, block_m=None).seconds for profile in (hw, flat)]
        return (seconds[0] - seconds[1]) / hw.row_overhead_s

    assert rows_paid(P.Window(7, 0)) == pytest.approx(4 * 2048, rel=1e-6)
    two_bands = P.MultiDiagonal((0, 700), 60)  # the second band reads keys for rows < 1408 + 60 only
    _, parts = choose_split(two_bands, 2048, 2048, False, rows=4, width=128, threads=torch.get_num_threads())
    assert len(parts) == 2
    assert 4 * (2048 + 1300) < rows_paid(two_bands) < 4 * (2048 + 1600)


def test_stored_profiles_of_an_older_model_are_ignored_with_a_warning(tmp_path, monkeypatch, caplog):
    import json
    import logging

    from sparsec.cost_models.calibration import calibrated_profile_path, save_calibrated_profile

    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path))
    published = get_profile("cpu", calibrated=False)
    save_calibrated_profile(PROFILES["cpu"].replace(matmul_efficiency=0.2, calibrated_from="now"))
    assert get_profile("cpu").matmul_efficiency == 0.2  # a current one is taken
    data = json.loads(PROFILES["cpu"].replace(matmul_efficiency=0.2, calibrated_from="before rows").to_json())
    del data["row_overhead_s"]  # stored before the field existed: fitted to another model
    calibrated_profile_path("cpu").write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="sparsec"):
        assert get_profile("cpu") == published
    assert "row_overhead_s" in caplog.text and "calibrate again" in caplog.text


def test_executor_errors_and_old_profiles():
    from sparsec.cost_models.attention_cost import attention_work, price_attention

    s = shape(256, heads=2)
    with pytest.raises(ValueError, match="executor must be one of"):
        attention_work((P.Dense(),) * 2, s, executor="tpu")
    with pytest.raises(ValueError, match="cpu executor only"):
        attention_work((P.Dense(),) * 2, s, block_m=None)
    with pytest.raises(ValueError, match="counted for the Triton kernels"):
        price_attention(attention_work((P.Window(8, 0),) * 2, s), get_profile("cpu", calibrated=False))
    with pytest.raises(ValueError, match="executor must be one of"):
        get_profile("h100").replace(executor="gpu")
    # Profiles stored before `executor` existed said masks_whole_query_block instead.
    import json
    for old, executor in ((True, "cpu"), (False, "triton")):
        data = json.loads(get_profile("cpu", calibrated=False).to_json())
        del data["executor"]
        data["masks_whole_query_block"] = old
        assert HardwareProfile.from_json(json.dumps(data)).executor == executor


# -- batched per-head prices and the schedule estimate --------------------------------------------

def list_schedule(costs, slots):
    """Programs in order, each to the slot that frees first (independent of attention_cost)."""
    finish = [0.0] * slots
    for c in costs:
        i = min(range(slots), key=lambda s: (finish[s], s))
        finish[i] += c
    return max(finish)


@pytest.mark.parametrize("target", ["h100", "cpu"])
def test_head_prices_are_a_launch_of_the_pattern_on_every_head_over_heads(target):
    from sparsec.cost_models.attention_cost import head_seconds_many

    hw = get_profile(target, calibrated=False)
    s = shape(1024, heads=8, causal=True)
    patterns = [P.Dense(), P.Window(100, 0), P.Columns([(0, 16), (500, 530)]), P.Skip("mean"), P.AShape(32, 256)]
    prices = head_seconds_many(patterns, s, hw, block_m=64, block_n=32)  # 8 x 16 programs: exact
    for p, price in zip(patterns, prices):
        launch = estimate_attention((p,) * 8, s, hw, block_m=64, block_n=32, head_groups={"all": tuple(range(8))})
        if target == "cpu" and not isinstance(p, P.Skip):  # a head pays its own plan's fixed costs
            unfixed = hw.replace(launch_overhead_s=0.0, call_overhead_s=0.0)
            fixed = launch.seconds - estimate_attention((p,) * 8, s, unfixed, block_m=64, block_n=32).seconds
            assert price == pytest.approx((launch.seconds - fixed) / 8 + fixed, rel=1e-12)
        else:
            assert price == pytest.approx((launch.seconds - hw.launch_overhead_s) / 8, rel=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_makespan_estimate_is_close_to_the_list_schedule_on_long_launches(causal):
    from sparsec.cost_models.attention_cost import head_seconds_many

    hw = get_profile("h100")
    s = shape(16384, heads=24, causal=causal)  # 24 x 256 programs, 46 waves on 132 SMs
    g = torch.Generator().manual_seed(1)
    layout = torch.rand(256, 512, generator=g) < 0.2
    patterns = [P.Dense(), P.Window(2048, 0), P.MultiDiagonal([-4096, 0, 4096], 64), P.BlockSparse(layout, (64, 32))]
    estimated = head_seconds_many(patterns, s, hw, block_m=64, block_n=32)
    scheduled = head_seconds_many(patterns, s, hw, block_m=64, block_n=32, exact_programs=None)
    for p, e, x in zip(patterns, estimated, scheduled):
        assert e == pytest.approx(x, rel=0.03), p
    costs = [1e-6 * (1 + (i * 7919) % 13) for i in range(6000)]
    from sparsec.cost_models.attention_cost import _schedule, makespan_estimate
    exact = _schedule(torch.tensor(costs, dtype=torch.float64), hw)
    assert exact == pytest.approx(list_schedule(costs, hw.sm_count), rel=1e-12)
    assert makespan_estimate(sum(costs), max(costs), hw) == pytest.approx(exact, rel=0.03)


def test_cpu_prices_a_split_pattern_as_its_parts(torch_kernel_only):
    """Far bands at S = 4096 run as parts on the cpu executor (codegen.attention_cpu_choice); the
    estimate counts each part's pairs and calls, plus the merge's copies."""
    from sparsec.codegen.attention_cpu_choice import choose_split

    s = shape(4096, heads=8, dtype="f32")
    pattern = P.MultiDiagonal([-1024, -512, 0, 512, 1024], 48)
    bm, parts = choose_split(pattern, 4096, 4096, False, rows=8, width=s.head_dim + s.value_dim,
                             threads=torch.get_num_threads())
    assert len(parts) == 5
    whole = pattern_counts([pattern], s, None, 64, executor="cpu")[pattern]
    each = pattern_counts(parts, s, bm, 64, executor="cpu")
    assert whole.calls == sum(c.calls for c in each.values())
    np.testing.assert_allclose(whole.visited, sum(c.visited for c in each.values()))
    assert (whole.gathered > sum(c.gathered for c in each.values())).all()  # the merge's copies


def test_cpu_block_density_is_the_read_fraction_of_dense_pairs():
    """On the cpu executor work is counted in (query, key) pairs, and so is the dense reference:
    a band reads its kept pairs plus its query blocks' overhang, Dense reads everything."""
    hw = get_profile("cpu", calibrated=False)
    s = shape(1024, heads=2, dtype="f32")
    band = estimate_attention((P.Window(63, 64),) * 2, s, hw, block_m=64)
    assert band.dense_blocks == 2 * 1024 * 1024
    kept = 128 / 1024
    assert kept < band.block_density < kept + 64 / 1024 + 0.01  # each row reads block_m - 1 keys more at most
    assert estimate_attention((P.Dense(),) * 2, s, hw, block_m=64).block_density == pytest.approx(1.0)


@pytest.mark.parametrize("capability, fitted_on", [("AVX2", "AVX2"), ("DEFAULT", "AVX2"), ("AVX512", "AVX512")])
def test_the_published_cpu_profile_follows_the_instruction_set(monkeypatch, capability, fitted_on):
    """torch's fused attention kernel is several times faster per pair with AVX-512: the published
    "cpu" profile is the one fitted on a machine with the instruction set torch uses here (with
    AVX-512: the Xeon's where the cores have AMX tiles, the Zen 4's where they do not)."""
    from sparsec.cost_models.hardware import _AVX512_XEON, _AVX512_ZEN4, PROFILES

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    profile = get_profile("cpu", calibrated=False).with_cores(PROFILES["cpu"].sm_count)
    assert profile.name == "cpu" and profile.executor == "cpu"
    assert (profile == PROFILES["cpu"]) == (fitted_on == "AVX2")
    if fitted_on == "AVX512":
        assert profile == _AVX512_ZEN4.with_cores(PROFILES["cpu"].sm_count)
        assert profile.matmul_efficiency > PROFILES["cpu"].matmul_efficiency
        assert profile.row_overhead_s < PROFILES["cpu"].row_overhead_s
    # AMX tiles run bf16 GEMMs several times faster than the vector units, streaming the weight
    # without packing it; with AVX-512 the cores are the Xeon's, whose other terms are faster too
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    with_amx = get_profile("cpu", calibrated=False).with_cores(PROFILES["cpu"].sm_count)
    assert with_amx.tensor_flops["bf16"] > 4 * profile.tensor_flops["bf16"]
    assert with_amx.bf16_gemm_bytes_per_s > 0 == profile.bf16_gemm_bytes_per_s
    without = with_amx.replace(tensor_flops=profile.tensor_flops, bf16_gemm_bytes_per_s=0.0)
    if fitted_on == "AVX512":
        assert without == _AVX512_XEON.with_cores(PROFILES["cpu"].sm_count)
        assert without.exp_per_s > 2 * profile.exp_per_s and without.gemm_efficiency > profile.gemm_efficiency
    else:
        assert without == profile


def test_cpu_slash_lanes_cost_more_with_wider_heads_and_beyond_a_cores_cache():
    """A vertical-slash lane on the native kernel: a fixed part and a part per unit of D + Dv; each
    distinct K / V row the lanes read, a part per unit for the share of a kv head's K and V beyond a
    core's cache (measured on the AVX-512 machine, distinct rows: ~7 ns a lane at D = 32, ~10 at
    64, ~19 at 128, ~41 at 128 with S = 8192; a temporal head's neighbouring diagonals share their
    rows: 12 ns at 128, S = 16K)."""
    from sparsec.cost_models.attention_cost import native_lane_seconds, native_row_seconds

    hw = get_profile("cpu", calibrated=False).replace(native_fetch_seconds=1e-9, native_fetch_width_seconds=1e-10,
                                                      native_fetch_spill_seconds=2e-10, core_cache_bytes=2**20)

    def shape(D, S):
        return AttentionShape(batch=1, num_heads=1, num_kv_heads=1, q_len=S, kv_len=S, head_dim=D, value_dim=D,
                              dtype="f32", causal=False)

    assert native_lane_seconds(shape(32, 1024), hw) == pytest.approx(1e-9 + 64e-10)
    assert native_lane_seconds(shape(64, 1 << 16), hw) == pytest.approx(1e-9 + 128e-10)  # not by the length
    assert native_row_seconds(shape(32, 1024), hw) == 0.0  # K and V: 256 KB, within the cache
    assert native_row_seconds(shape(64, 2048), hw) == 0.0  # exactly the cache
    assert native_row_seconds(shape(64, 4096), hw) == pytest.approx(128 * 0.5 * 2e-10)  # half of it beyond
    assert native_row_seconds(shape(128, 8192), hw) > native_row_seconds(shape(128, 4096), hw) > 0.0
