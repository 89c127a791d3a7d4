"""The search: knapsack, head-group merging, verification, and tune_layers on planted heads."""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from planted import EXPECTED_FAMILIES, PlantedLayer, cheap_calls_cpu
from reference import reference_attention
from sparsec import patterns as P
from sparsec.cost_models.attention_cost import AttentionShape
from sparsec.cost_models.hardware import get_profile
from sparsec.passes.attention_stats import AttentionStats
from sparsec.passes.fit_candidates import HeadCandidates, measure_candidates
from sparsec.passes.search_patterns import (
    DEFAULT_BLOCK_SIZES, CostTable, Option, head_groups, launchable_block_sizes, reexpress, search_layer,
    solve_knapsack, useful_candidates,
)
from sparsec.tuning import LayerSample, tune_layer, tune_layers

pytestmark = pytest.mark.usefixtures("one_thread")

BUDGET = 0.02


# -- knapsack ------------------------------------------------------------------------------------


def brute_force(options, allowance):
    best = None
    for choice in itertools.product(*[range(len(o)) for o in options]):
        error = sum(options[h][c].error for h, c in enumerate(choice))
        cost = sum(options[h][c].cost for h, c in enumerate(choice))
        if error <= allowance and (best is None or cost < best):
            best = cost
    return best


def random_options(rng, heads, per_head):
    dense = P.Dense()
    options = []
    for _ in range(heads):
        opts = [Option(1.0, 0.0, dense)]
        opts += [Option(rng.uniform(0.05, 1.0), rng.uniform(0.0, 1.0), P.Window(i, 0)) for i in range(per_head)]
        options.append(opts)
    return options


def test_knapsack_is_feasible_and_near_optimal():
    rng = random.Random(0)
    ratios = []
    for _ in range(40):
        options = random_options(rng, 4, 4)
        allowance = rng.uniform(0.1, 1.5)
        choice = solve_knapsack(options, allowance)
        error = sum(options[h][c].error for h, c in enumerate(choice))
        cost = sum(options[h][c].cost for h, c in enumerate(choice))
        assert error <= allowance * (1 + 1e-9)
        ratios.append(cost / brute_force(options, allowance))
    assert min(ratios) >= 1 - 1e-12
    assert sum(r <= 1 + 1e-9 for r in ratios) >= 30, ratios  # optimal on most instances
    assert max(ratios) < 1.3


def test_knapsack_spends_budget_where_it_saves_most():
    dense = P.Dense()
    # head 0 saves 0.9 s for error 1; head 1 saves 0.5 s for error 1: only one fits
    options = [[Option(1.0, 0.0, dense), Option(0.1, 1.0, P.Window(1, 0))],
               [Option(1.0, 0.0, dense), Option(0.5, 1.0, P.Window(2, 0))]]
    assert solve_knapsack(options, 1.0) == [1, 0]
    assert solve_knapsack(options, 0.5) == [0, 0]
    assert solve_knapsack(options, 2.0) == [1, 1]


# -- groups and re-expression --------------------------------------------------------------------


@pytest.mark.parametrize("pattern,family", [
    (P.Columns([(0, 3), 40]), "vertical_slash"),
    (P.MultiDiagonal([-8, 0, 8], 0), "vertical_slash"),
    (P.Window(0, 0), "vertical_slash"),
    (P.Window(6, 2), "multi_diagonal"),
    (P.MultiDiagonal([-2], 4), "window"),
])
def test_reexpress_keeps_the_mask(pattern, family):
    other = reexpress(pattern, family)
    assert other is not None and other.family == family
    assert torch.equal(other.mask(64, 80), pattern.mask(64, 80))


def test_reexpress_refuses_what_it_cannot_express():
    assert reexpress(P.Window(3, 0), "multi_diagonal") is None  # odd band: no centre offset
    assert reexpress(P.AShape(4, 8), "vertical_slash") is None


def test_lone_head_is_merged_into_another_family_launch():
    # Seven VerticalSlash heads and one Columns head, all exact: on an H100 at this size one
    # launch less is worth more than the Columns kernel's own savings.
    H, S = 8, 1024
    shape = AttentionShape(batch=1, num_heads=H, num_kv_heads=H, q_len=S, kv_len=S, head_dim=64,
                           value_dim=64, dtype="bf16", causal=True)
    slash = P.VerticalSlash([(0, 64)], [0, -1, -2])
    cols = P.Columns([(0, 64), (512, 576)])
    cands = [HeadCandidates(patterns=(P.Dense(), slash), squared_errors=(0.0, 0.0), dense_norm2=1.0)] * (H - 1)
    cands.append(HeadCandidates(patterns=(P.Dense(), cols), squared_errors=(0.0, 0.0), dense_norm2=1.0))
    costs = CostTable(get_profile("h100", calibrated=False))
    choice = search_layer(cands, shape, costs, budget=BUDGET, block_sizes=[(64, 64)])
    assert choice.patterns[:-1] == (slash,) * (H - 1)
    assert choice.patterns[-1] == P.VerticalSlash(cols.ranges, [])
    assert choice.head_groups == (tuple(range(H)),)
    unmerged = costs.layer_seconds(choice.patterns[:-1] + (cols,), shape, (64, 64))
    assert choice.seconds < unmerged < choice.dense_seconds


def test_verification_tightens_until_the_exact_error_fits():
    H, S = 4, 512
    shape = AttentionShape(batch=1, num_heads=H, num_kv_heads=H, q_len=S, kv_len=S, head_dim=64,
                           value_dim=64, dtype="f32", causal=False)
    levels = [P.Window(w, w) for w in (8, 16, 32, 64)]
    errors = (0.0, 1.6e-3, 8e-4, 4e-4, 2e-4)
    cands = [HeadCandidates(patterns=(P.Dense(), *levels), squared_errors=errors, dense_norm2=1.0)] * H
    allowance = BUDGET ** 2 * H
    by_pattern = dict(zip((P.Dense(), *levels), errors))
    calls = []

    def verify(patterns):  # the exact error is 3x what the per-head numbers promised
        calls.append(patterns)
        return 3 * sum(by_pattern[p] for p in patterns)

    choice = search_layer(cands, shape, CostTable(get_profile("cpu", calibrated=False)), budget=BUDGET,
                          block_sizes=[(64, 32)], verify=verify)
    assert len(calls) >= 2
    assert choice.squared_error <= allowance * (1 + 1e-6)
    assert verify(choice.patterns) == pytest.approx(choice.squared_error)
    assert any(p != P.Dense() for p in choice.patterns)


def test_measured_errors_match_float64_reference():
    layer = PlantedLayer(("band", "stripes"), 128, 16, causal=True)
    q, k, v = layer.sample(2, 1)
    heads = [(P.Dense(), P.Window(4, 0), P.Skip("mean")), (P.Columns(layer.stripe_columns(1)), P.AShape(1, 8))]
    measured = measure_candidates([LayerSample(q, k, v, causal=True)], heads, backend="masked")
    dense = reference_attention(q, k, v, [P.Dense()] * 2, causal=True)
    for h, cands in enumerate(heads):
        assert measured[h].dense_norm2 == pytest.approx(float(dense[:, h].square().sum()), rel=1e-5)
        for r, p in enumerate(cands):
            out = reference_attention(q, k, v, [p, p], causal=True)
            want = float((out[:, h] - dense[:, h]).square().sum())
            assert measured[h].squared_errors[r] == pytest.approx(want, rel=1e-3, abs=1e-6)


# -- tune_layers on planted heads -----------------------------------------------------------------

KINDS = ("band", "stripes", "frames", "uniform", "random", "band", "stripes", "frames")


def planted_layers():
    return {f"blocks.{i}.attn": PlantedLayer(KINDS[3 * i:] + KINDS[:3 * i], 512, 32, causal=bool(i), seed=i,
                                             frame=128, frame_decay=1.0) for i in range(2)}


@pytest.fixture(scope="module")
def tuned():
    layers = planted_layers()
    recorded = {name: [LayerSample(*layer.sample(1, seed=0), causal=layer.causal)] for name, layer in layers.items()}
    return layers, tune_layers(recorded, target=cheap_calls_cpu(), budget=BUDGET, progress=False)


def test_planted_families_are_found(tuned):
    layers, plan = tuned
    hits, total = 0, 0
    for name, layer in layers.items():
        chosen = plan.layers[name].patterns
        for kind, p in zip(layer.kinds, chosen):
            total += 1
            hits += p.family in EXPECTED_FAMILIES[kind]
            if kind == "uniform":
                assert isinstance(p, P.Skip), (name, p)
            if kind == "random":
                assert isinstance(p, P.Dense), (name, p)
    assert hits >= 0.9 * total, str(plan)


def test_planted_plan_is_faster_and_grouped_by_family(tuned):
    _, plan = tuned
    for layer in plan.layers.values():
        assert layer.sparse_seconds < layer.dense_seconds
        assert layer.error <= BUDGET * (1 + 1e-6)
        assert layer.head_groups == head_groups(layer.patterns)
        assert len({p.family for p in layer.patterns}) == len(layer.head_groups)


def test_error_on_fresh_inputs_stays_near_budget(tuned):
    layers, plan = tuned
    for name, layer in layers.items():
        q, k, v = layer.sample(1, seed=1234)
        dense = reference_attention(q, k, v, [P.Dense()] * len(layer.kinds), causal=layer.causal)
        sparse = reference_attention(q, k, v, plan.layers[name].patterns, causal=layer.causal)
        relative = float((sparse - dense).norm() / dense.norm())
        assert relative <= 1.5 * BUDGET, (name, relative)


def test_small_layers_stay_dense_on_h100():
    # At S = 256 a launch's fixed cost dominates on an H100: splitting heads into family launches
    # is slower than one dense launch, so the search must keep the layer dense.
    layer = PlantedLayer(KINDS, 256, 32, seed=3, frame=64)
    plan = tune_layers({"attn": [LayerSample(*layer.sample(1, 0))]}, target="h100", budget=BUDGET,
                       progress=False)
    chosen = plan.layers["attn"]
    assert all(isinstance(p, P.Dense) for p in chosen.patterns)
    assert chosen.sparse_seconds == chosen.dense_seconds and chosen.error == 0.0


def test_gqa_layer_tunes_and_records_kv_heads():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, h, 128, 16, generator=g) for h in (4, 2, 2))
    plan = tune_layers({"gqa": [LayerSample(q, k, v, causal=True)]}, target="cpu", budget=0.05, progress=False)
    chosen = plan.layers["gqa"]
    assert (chosen.num_heads, chosen.num_kv_heads, chosen.causal) == (4, 2, True)
    dense = reference_attention(q, k, v, [P.Dense()] * 4, causal=True)
    sparse = reference_attention(q, k, v, chosen.patterns, causal=True)
    assert float((sparse - dense).norm() / dense.norm()) == pytest.approx(chosen.error, rel=1e-3, abs=1e-6)


def test_bad_recordings_are_named():
    q = torch.randn(1, 2, 64, 8)
    with pytest.raises(ValueError, match="no recorded samples"):
        tune_layers({"a": []}, progress=False)
    with pytest.raises(ValueError, match="differ in shape"):
        tune_layers({"a": [LayerSample(q, q, q), LayerSample(q, q, q, causal=True)]}, progress=False)
    with pytest.raises(ValueError, match="dtype"):
        tune_layers({"a": [LayerSample(q.double(), q.double(), q.double())]}, progress=False)
    with pytest.raises(ValueError, match="budget"):
        tune_layers({"a": [LayerSample(q, q, q)]}, budget=-0.1, progress=False)
    assert not math.isnan(BUDGET)


# -- the measure_errors hook ----------------------------------------------------------------------


def hooked_tune(sparse_error, timings=None):
    """tune_layers on one planted layer whose measure_errors hook gives every sparse candidate
    `sparse_error` (Dense 0): the layer plan, the recording and the hook's calls."""
    layer = PlantedLayer(("band", "stripes", "frames", "uniform"), 512, 32, causal=True, frame=128, frame_decay=1.0)
    recorded = {"attn": [LayerSample(*layer.sample(1, seed=0), causal=True)]}
    calls = []

    def measure_errors(samples, stats, head_patterns):
        calls.append((samples, stats, head_patterns))
        return [HeadCandidates(patterns=p, squared_errors=tuple(0.0 if c == P.Dense() else sparse_error for c in p),
                               dense_norm2=1.0) for p in head_patterns]

    plan = tune_layers(recorded, target="cpu", budget=BUDGET, progress=False, timings=timings,
                       measure_errors=measure_errors)
    return plan.layers["attn"], recorded, calls


def test_measure_errors_hook_gets_each_heads_candidates():
    timings = {}
    _, recorded, calls = hooked_tune(0.0, timings)
    assert len(calls) == 1  # one call per layer, all heads at once
    samples, stats, head_patterns = calls[0]
    assert samples is recorded["attn"]
    assert isinstance(stats, AttentionStats) and stats.num_heads == 4 and stats.q_len == 512
    assert len(head_patterns) == 4
    assert all(isinstance(p, tuple) and p[0] == P.Dense() and len(p) > 1 for p in head_patterns)
    assert "measure" in timings and "verify" not in timings  # the hook is timed; nothing to verify against


def test_measure_errors_hook_drives_the_choice():
    everything_fails, _, _ = hooked_tune(1e9)
    assert all(p == P.Dense() for p in everything_fails.patterns)
    assert everything_fails.error == 0.0 and everything_fails.sparse_seconds == everything_fails.dense_seconds
    nothing_fails, _, calls = hooked_tune(0.0)
    # Skip computes nothing: the cheapest candidate of every head here.
    assert all(P.Skip("mean") in p for p in calls[0][2])
    assert nothing_fails.patterns == (P.Skip("mean"),) * 4
    assert nothing_fails.error == 0.0 and nothing_fails.sparse_seconds < nothing_fails.dense_seconds


def test_bad_measure_errors_hook_is_named():
    q = torch.randn(1, 2, 64, 8)
    with pytest.raises(TypeError, match="measure_errors"):
        tune_layers({"a": [LayerSample(q, q, q)]}, progress=False, measure_errors="proxy")
    with pytest.raises(TypeError, match="measure_errors"):
        tune_layer([LayerSample(q, q, q)], CostTable(get_profile("cpu")), budget=BUDGET, measure_errors=0.5)
    with pytest.raises(ValueError, match="one HeadCandidates per head"):
        tune_layers({"a": [LayerSample(q, q, q)]}, progress=False, measure_errors=lambda samples, stats, heads: [])


# -- pricing for the search at scale ------------------------------------------------------------


def synthetic_candidates(rng, heads, S):
    """Per head a Dense, a Skip, windows, columns, diagonals and block layouts with errors that
    fall as the pattern keeps more (no attention needed: the search only reads the numbers)."""
    found = []
    for _ in range(heads):
        patterns = [P.Dense(), P.Skip("mean")]
        patterns += [P.Window(w, 0) for w in (16, 64, 256, S // 2)] + [P.Window(S, S)]  # the last costs what Dense does
        patterns += [P.Columns([(0, 8 * k)] + [(rng.randrange(S - 8), S - 1)]) for k in (1, 4)]
        patterns += [P.MultiDiagonal([0, -S // 4], w) for w in (2, 16)]
        for tiles in ((64, 32), (128, 64)):
            g = torch.Generator().manual_seed(rng.randrange(1 << 30))
            layout = torch.rand(-(-S // tiles[0]), -(-S // tiles[1]), generator=g) < rng.uniform(0.1, 0.95)
            patterns.append(P.BlockSparse(layout, tiles))
        errors = [0.0, rng.uniform(0.1, 1.0)] + [rng.uniform(0, 2e-3) / (1 + i) for i in range(len(patterns) - 2)]
        found.append(HeadCandidates(patterns=tuple(patterns), squared_errors=tuple(errors), dense_norm2=1.0))
    return found


def layer_shape(S, heads, causal=True):
    return AttentionShape(batch=1, num_heads=heads, num_kv_heads=heads, q_len=S, kv_len=S, head_dim=64,
                          value_dim=64, dtype="bf16", causal=causal)


@pytest.mark.parametrize("S,heads,target", [(512, 6, "cpu"), (1024, 8, "h100"), (4096, 16, "h100")])
def test_pruning_unpriceable_candidates_changes_nothing(S, heads, target, monkeypatch):
    """useful_candidates drops what no tile size could take; the search must not notice. (cpu: on
    torch's kernel, whose fixed costs leave candidates to prune at S = 512.)"""
    monkeypatch.setenv("SPARSEC_CPU_NATIVE", "0")
    rng = random.Random(S + heads)
    shape = layer_shape(S, heads)
    blocks = [(64, 32), (128, 64)]
    cands = synthetic_candidates(rng, heads, S)
    kept = useful_candidates([c.patterns for c in cands], shape, CostTable(get_profile(target, calibrated=False)), blocks)
    assert sum(map(len, kept)) < sum(len(c.patterns) for c in cands)  # something was pruned
    pruned = [HeadCandidates(patterns=k, squared_errors=tuple(c.squared_errors[c.patterns.index(p)] for p in k),
                             dense_norm2=c.dense_norm2) for c, k in zip(cands, kept)]
    full = search_layer(cands, shape, CostTable(get_profile(target, calibrated=False)), budget=BUDGET, block_sizes=blocks)
    less = search_layer(pruned, shape, CostTable(get_profile(target, calibrated=False)), budget=BUDGET, block_sizes=blocks)
    assert (less.patterns, less.tiles, less.seconds, less.squared_error) == (full.patterns, full.tiles, full.seconds,
                                                                           full.squared_error)


def test_cost_table_forgetting_layouts_changes_nothing(monkeypatch):
    import sparsec.passes.search_patterns as search_patterns

    rng = random.Random(7)
    shape = layer_shape(512, 6)
    cands = synthetic_candidates(rng, 6, 512)
    blocks = [(64, 32), (128, 64)]
    kept = search_layer(cands, shape, CostTable(get_profile("cpu", calibrated=False)), budget=BUDGET, block_sizes=blocks)
    monkeypatch.setattr(search_patterns, "_MAX_LAYOUTS", 3)  # forget BlockSparse prices all the time
    forgot = search_layer(cands, shape, CostTable(get_profile("cpu", calibrated=False)), budget=BUDGET, block_sizes=blocks)
    assert (forgot.patterns, forgot.tiles, forgot.seconds) == (kept.patterns, kept.tiles, kept.seconds)


def test_search_estimates_equal_exact_prices_on_small_launches_and_stay_close_on_large():
    costs = CostTable(get_profile("h100", calibrated=False))
    rng = random.Random(3)
    for S, heads, tolerance in ((1024, 8, 0.0), (16384, 24, 0.03)):
        shape = layer_shape(S, heads)
        patterns = [c.patterns[rng.randrange(len(c.patterns))] for c in synthetic_candidates(rng, heads, S)]
        for tiles in ((64, 32), (128, 64)):
            patterns = [p if not isinstance(p, P.BlockSparse) or p.block == tiles else P.Dense() for p in patterns]
            exact = costs.layer_seconds(patterns, shape, tiles)
            assert exact == pytest.approx(costs.layer_seconds(patterns, shape, tiles, exact=False), rel=tolerance, abs=0)


def test_tune_layers_reports_phase_timings():
    layer = PlantedLayer(("band", "stripes"), 128, 16, causal=True)
    timings = {}
    tune_layers({"attn": [LayerSample(*layer.sample(1, 0), causal=True)]}, target="cpu", budget=BUDGET,
                progress=False, timings=timings, block_sizes=DEFAULT_BLOCK_SIZES[:2])
    assert set(timings) >= {"stats", "fit", "prune", "measure", "search"}
    assert all(t >= 0 for t in timings.values())


def _shape(head_dim, dtype):
    return AttentionShape(batch=1, num_heads=4, num_kv_heads=4, q_len=4096, kv_len=4096, head_dim=head_dim,
                          value_dim=head_dim, dtype=dtype, causal=True)


def test_a_gpu_plan_only_takes_tiles_its_shared_memory_holds_double_buffered():
    # head_dim 256: Q 64 KB and K + V 128 KB a stage at 128 x 128; no GPU holds two stages of that.
    h100 = launchable_block_sizes(DEFAULT_BLOCK_SIZES, _shape(256, "bf16"), get_profile("h100"))
    assert (128, 128) not in h100 and (64, 128) not in h100 and (64, 32) in h100
    assert set(launchable_block_sizes(DEFAULT_BLOCK_SIZES, _shape(64, "bf16"), get_profile("h100"))) == set(DEFAULT_BLOCK_SIZES)
    # A100 has 163 KB a block, H100 227 KB.
    assert (128, 64) not in launchable_block_sizes(DEFAULT_BLOCK_SIZES, _shape(256, "bf16"), get_profile("a100"))
    # The CPU executor has no such limit.
    assert set(launchable_block_sizes(DEFAULT_BLOCK_SIZES, _shape(256, "f32"), get_profile("cpu"))) == set(DEFAULT_BLOCK_SIZES)
    with pytest.raises(ValueError, match="shared memory"):
        launchable_block_sizes([(256, 256)], _shape(256, "f32"), get_profile("a100"))
