"""Measured autotuning of the cost model: accuracy metrics, candidate patterns, the coefficient
fit, calibration on this CPU and the cost-model bench.

References are computed here, independently: ranks by counting, Pearson by its formula in float64,
kept fractions from explicit masks. The fit is checked on synthetic measurements priced with
coefficients changed by known factors, which it must find again.
"""
import datetime
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from bench_module import load_bench
from sparsec.codegen.tiles import AttentionTiles
from sparsec.cost_models.accuracy import model_accuracy, spearman, top1_regret
from sparsec.cost_models.attention_cost import AttentionShape, estimate_attention
from sparsec.cost_models.fit import (
    BOUNDS, CPU_FIT_PARAMETERS, CPU_LINEAR_FIT_PARAMETERS, FIT_PARAMETERS, calibrate, candidate_work, fit_measurements, fit_parameters, fit_profile,
    predict)
from sparsec.cost_models.hardware import PROFILES, get_profile, profile_for_device
from sparsec.cost_models.linear_measure import LinearCandidate
from sparsec.cost_models.measure import (
    FAMILIES, MIXED_FAMILIES, Measurement, candidate_grid, default_grid, kept_fraction, measure, measurement_device,
    mixed_candidates, pattern_at_density)
from sparsec.patterns import Dense



def shape(S, *, heads=4, head_dim=64, causal=False):
    return AttentionShape(batch=1, num_heads=heads, num_kv_heads=heads, q_len=S, kv_len=S, head_dim=head_dim,
                          value_dim=head_dim, dtype="f32", causal=causal)


# -- independent references ---------------------------------------------------------------------


def reference_ranks(values):
    """1-based ranks by counting: 1 + (number smaller) + (number equal - 1) / 2."""
    return [1 + sum(w < v for w in values) + (sum(w == v for w in values) - 1) / 2 for v in values]


def reference_spearman(x, y):
    rx, ry = reference_ranks(list(x)), reference_ranks(list(y))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def explicit_kept_fraction(pattern, S, causal):
    mask = pattern.mask(S, S)
    allowed = torch.ones(S, S, dtype=torch.bool).tril() if causal else torch.ones(S, S, dtype=torch.bool)
    return int((mask & allowed).sum()) / int(allowed.sum())


# -- accuracy: spearman ----------------------------------------------------------------------------


def test_spearman_perfect_reversed_and_hand_computed():
    assert spearman([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]) == pytest.approx(1.0)
    assert spearman([1.0, 2.0, 3.0, 4.0], [4e-3, 3e-3, 2e-3, 1e-3]) == pytest.approx(-1.0)
    # Two swapped neighbour pairs: sum d^2 = 4, rho = 1 - 6 * 4 / (5 * (25 - 1)) = 0.8.
    assert spearman([1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 1.0, 4.0, 3.0, 5.0]) == pytest.approx(0.8)
    # Only ranks matter: a monotone transform of one side changes nothing.
    assert spearman([1.0, 2.0, 3.0, 4.0, 5.0], np.exp([2.0, 1.0, 4.0, 3.0, 5.0])) == pytest.approx(0.8)


def test_spearman_ties_share_the_average_rank():
    # Ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): cov 4.5, variances 4.5 and 5 -> 4.5 / sqrt(22.5).
    assert spearman([1.0, 2.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]) == pytest.approx(3 / math.sqrt(10))
    assert math.isnan(spearman([5.0, 5.0, 5.0], [1.0, 2.0, 3.0]))  # one side has no order


def test_spearman_matches_an_independent_computation_on_random_times_with_ties():
    rng = random.Random(1234)
    for _ in range(20):
        n = rng.randint(3, 30)
        # Rounded to few values so ties are common on both sides.
        predicted = [rng.randint(1, 6) * 1e-3 for _ in range(n)]
        measured = [rng.randint(1, 8) * 1e-3 + rng.choice((0.0, 0.0, 1e-4)) for _ in range(n)]
        if len(set(predicted)) == 1 or len(set(measured)) == 1:
            continue
        assert spearman(predicted, measured) == pytest.approx(reference_spearman(predicted, measured), abs=1e-12)


# -- accuracy: top-1 regret and groups ------------------------------------------------------------


def test_top1_regret_hand_computed():
    assert top1_regret([3.0, 1.0, 2.0], [1.0, 1.5, 1.2]) == pytest.approx(0.5)   # picks 1.5, best 1.0
    assert top1_regret([3.0, 1.0, 2.0], [2.0, 0.9, 1.2]) == pytest.approx(0.0)   # picks the best
    assert top1_regret([3.0, 1.0, 2.0], [2e-3, 3.6e-3, 1.2e-3]) == pytest.approx(2.0)  # 3.6 / 1.2 - 1
    # A tie among the predicted-fastest is charged the slowest of them: 3 / 1.5 - 1.
    assert top1_regret([1.0, 1.0, 2.0], [2.0, 3.0, 1.5]) == pytest.approx(1.0)
    # Units cancel.
    assert top1_regret([3.0, 1.0, 2.0], [1e-6, 1.5e-6, 1.2e-6]) == pytest.approx(0.5)


def test_model_accuracy_per_group():
    predicted = [1.0, 2.0, 3.0, 5.0, 4.0, 6.0]
    measured = [2.0, 1.0, 3.0, 4.0, 5.0, 8.0]
    groups = ["a", "a", "b", "b", "b", ("c", 1)]
    acc = model_accuracy(predicted, measured, groups)
    # a: picks index 0 (2.0), best 1.0 -> 1.0; b: picks index 2 (3.0), best 3.0 -> 0; c: alone -> 0.
    assert acc.group_regrets == pytest.approx({"a": 1.0, "b": 0.0, str(("c", 1)): 0.0})
    assert acc.mean_regret == pytest.approx(1.0 / 3)
    assert acc.max_regret == pytest.approx(1.0)
    assert acc.candidates == 6
    assert acc.spearman == pytest.approx(reference_spearman(predicted, measured))
    assert acc.as_dict()["group_regrets"] == acc.group_regrets


@pytest.mark.parametrize("call", [spearman, top1_regret, lambda p, m: model_accuracy(p, m, ["g"] * len(p))])
@pytest.mark.parametrize("predicted, measured, message", [
    ([1.0, 2.0], [1.0, 2.0, 3.0], "3"),                 # length mismatch
    ([1.0, 2.0], [1.0, float("nan")], "non-finite"),
    ([1.0, float("inf")], [1.0, 2.0], "non-finite"),
    ([1.0, 2.0], [0.0, 2.0], "non-positive"),
    ([1.0, 2.0], [-1.0, 2.0], "non-positive"),
    ([-1.0, 2.0], [1.0, 2.0], "non-positive"),
    ([], [], "empty"),
    ([[1.0, 2.0]], [[1.0, 2.0]], "1-D"),
])
def test_accuracy_rejects_bad_times(call, predicted, measured, message):
    with pytest.raises(ValueError, match=message):
        call(predicted, measured)


def test_model_accuracy_rejects_a_group_count_mismatch():
    with pytest.raises(ValueError, match="2 group labels for 3 candidates"):
        model_accuracy([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], ["a", "b"])


# -- pattern_at_density -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "dense"])
@pytest.mark.parametrize("causal", [False, True])
def test_pattern_at_density_keeps_about_the_requested_fraction(family, causal):
    S = 512
    # vertical_slash prices hundreds of slashes per bisection step: one density keeps this fast.
    for density in ((0.1,) if family == "vertical_slash" else (0.1, 0.3)):
        pattern = pattern_at_density(family, S, density, causal=causal, seed=3)
        assert pattern.family == family
        kept = explicit_kept_fraction(pattern, S, causal)
        assert kept_fraction(pattern, S, causal) == pytest.approx(kept, abs=1e-12)
        # Each family's integer parameter moves the kept fraction in steps of < 0.035 at S = 512.
        assert kept == pytest.approx(density, abs=0.02), (family, causal, density, pattern)


def test_pattern_at_density_never_returns_a_pattern_that_keeps_nothing():
    # Random causal block layouts: the first blocks may all lie above the diagonal, where a very
    # low target would be "closest" to keeping nothing at all.
    for seed in range(10):
        pattern = pattern_at_density("block_sparse", 512, 0.005, causal=True, seed=seed)
        assert explicit_kept_fraction(pattern, 512, True) > 0, seed


def test_pattern_at_density_dense_and_bad_arguments():
    assert pattern_at_density("dense", 256, 0.3) == Dense()
    with pytest.raises(ValueError, match="no candidate builder for family 'diagonal'"):
        pattern_at_density("diagonal", 256, 0.3)
    for density in (0.0, -0.2, 1.5, float("nan")):
        with pytest.raises(ValueError, match="density must be in"):
            pattern_at_density("window", 256, density)
    for S in (0, 1, 256.0, True):
        with pytest.raises(ValueError, match="S must be an int"):
            pattern_at_density("window", S, 0.3)
    with pytest.raises(ValueError, match="unknown families"):
        candidate_grid([shape(256)], families=("window", "stripes"))


def test_mixed_candidates_run_a_plan_a_head_on_the_cpu_executor():
    """The CPU grid's "mixed" candidates give each head its own family, so each head is its own
    plan (what launch_overhead_s prices), where every other candidate runs one."""
    s = shape(512, heads=4)
    (candidate,) = mixed_candidates([s], densities=(0.1,), tiles=AttentionTiles(64, 64))
    assert candidate.family == "mixed" and len(set(candidate.head_patterns)) == 4
    for h, family in enumerate(MIXED_FAMILIES):
        assert candidate.head_patterns[h] == pattern_at_density(family, 512, 0.1)
    assert abs(candidate.density - 0.1) < 0.03
    assert sum(launch.plans for launch in candidate_work(candidate, "cpu").launches) == 4
    grid = default_grid("cpu", quick=True)
    assert {c.family for c in grid} == set(FAMILIES) | {"mixed"}
    assert all(c.family != "mixed" for c in default_grid("cuda", quick=True))


# -- fit --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_grid():
    """54 candidates on two layer shapes, three tile sizes, priced for the CPU executor (the "cpu"
    profile's): enough variety that every fitted coefficient changes some times."""
    shapes = [shape(256, head_dim=64), shape(512, head_dim=32, causal=True)]
    candidates = candidate_grid(shapes, families=("dense", "window", "columns", "block_sparse", "a_shape"),
                                densities=(0.1, 0.3),
                                tiles=(AttentionTiles(32, 32), AttentionTiles(64, 64), AttentionTiles(128, 64)))
    return candidates, [candidate_work(c, "cpu") for c in candidates]


CHANGED = {"matmul_efficiency": 0.6, "launch_overhead_s": 3.0, "row_overhead_s": 20.0, "call_overhead_s": 3.0,
           "mask_cost_per_pair": 4.0, "query_rows_exponent": 2.0}


def changed_profile(base):
    return base.replace(**{name: getattr(base, name) * factor for name, factor in CHANGED.items()})


def test_fit_recovers_changed_coefficients_and_improves_ranking(synthetic_grid):
    candidates, works = synthetic_grid
    base = PROFILES["cpu"]
    truth = changed_profile(base)
    measured = predict(truth, works)
    # The decision here: which tiles for one pattern (tile choice is what call and mask costs move).
    tile_choices = [(c.group, c.family, c.target_density) for c in candidates]
    parameters = fit_parameters(base)
    assert parameters == CPU_FIT_PARAMETERS and fit_parameters(PROFILES["h100"]) == FIT_PARAMETERS
    result = fit_profile(base, works, measured)

    for name in CHANGED:
        assert result.after[name] == pytest.approx(getattr(truth, name), rel=0.15), name
    assert result.after["matmul_efficiency"] == pytest.approx(truth.matmul_efficiency, rel=0.02)
    for name in set(parameters) - set(CHANGED):  # unchanged in the truth: found where they were
        # (exponentials share the per-pair time with the dots, which the truth slows 1.7x: the
        # fit trades a little of one for the other)
        assert result.after[name] == pytest.approx(getattr(base, name), rel=0.08), name
    assert result.before == {name: getattr(base, name) for name in parameters}
    assert result.after == {name: getattr(result.profile, name) for name in parameters}
    assert result.rms_log_error_after < 0.02 < 0.2 < result.rms_log_error_before

    before = model_accuracy(predict(base, works), measured, tile_choices)
    after = model_accuracy(predict(result.profile, works), measured, tile_choices)
    assert after.spearman > 0.999 and before.spearman < 0.99
    assert before.mean_regret > 0.0
    assert after.mean_regret < 0.2 * before.mean_regret


def test_fit_without_prior_finds_the_coefficients_exactly(synthetic_grid):
    _, works = synthetic_grid
    base = PROFILES["cpu"]
    truth = changed_profile(base).replace(mask_cost_per_pair=base.mask_cost_per_pair * 2)
    result = fit_profile(base, works, predict(truth, works), prior_weight=0.0)
    for name in CPU_FIT_PARAMETERS:
        assert result.after[name] == pytest.approx(getattr(truth, name), rel=1e-3), name
    assert result.rms_log_error_after < 1e-4


def test_fit_stays_within_bounds(synthetic_grid):
    _, works = synthetic_grid
    base = PROFILES["cpu"]
    # 20x faster than the profile can be at matmul_efficiency = 1: the fit stops at the bound.
    measured = predict(base, works) / 20
    result = fit_profile(base, works, measured)
    for name, value in result.after.items():
        low, high = BOUNDS[name]
        assert low <= value <= high, (name, value)
    assert result.after["matmul_efficiency"] == pytest.approx(1.0)
    assert result.rms_log_error_after < result.rms_log_error_before


def test_fit_measurements_equals_fit_profile_on_the_same_data(synthetic_grid):
    candidates, works = synthetic_grid
    base = PROFILES["cpu"]
    measured = predict(changed_profile(base), works)
    measurements = [Measurement(candidate=c, seconds=float(t), samples=3) for c, t in zip(candidates, measured)]
    by_measurements = fit_measurements(base, measurements, calibrated_from="synthetic")
    assert by_measurements.after == fit_profile(base, works, measured).after
    assert by_measurements.profile.calibrated_from == "synthetic"


def test_fit_rejects_bad_inputs(synthetic_grid):
    _, works = synthetic_grid
    works = works[:4]
    base = PROFILES["cpu"]
    good = predict(base, works)
    bad = [
        (dict(measured_seconds=good[:3]), "4 work items"),
        (dict(measured_seconds=np.array([])), "4 work items"),
        (dict(measured_seconds=[*good[:3], float("nan")]), "finite and positive"),
        (dict(measured_seconds=[*good[:3], float("inf")]), "finite and positive"),
        (dict(measured_seconds=[*good[:3], 0.0]), "finite and positive"),
        (dict(measured_seconds=[*good[:3], -1e-3]), "finite and positive"),
        (dict(parameters=("matmul_efficiency", "warp_count")), "cannot fit 'warp_count'"),
        (dict(parameters=()), "no parameters"),
        (dict(parameters=("matmul_efficiency", "matmul_efficiency")), "repeat"),
        (dict(prior_weight=-1.0), "prior_weight"),
        (dict(prior_weight=float("nan")), "prior_weight"),
        (dict(max_iterations=0), "max_iterations"),
    ]
    for options, message in bad:
        options.setdefault("measured_seconds", good)
        with pytest.raises(ValueError, match=message):
            fit_profile(base, works, **options)
    with pytest.raises(ValueError, match="no measurements"):
        fit_profile(base, [], [])


# -- measure and calibrate on this CPU ----------------------------------------------------------------


def tiny_candidates(lengths=(256,)):
    return candidate_grid([shape(S, heads=2, head_dim=32) for S in lengths],
                          families=("dense", "window", "block_sparse"), densities=(0.25,),
                          tiles=(AttentionTiles(64, 64), AttentionTiles(128, 64)))


def test_measure_times_every_candidate_and_restores_threads():
    candidates = tiny_candidates()[:2]
    threads = torch.get_num_threads()
    seen = []
    measurements = measure(candidates, "cpu", min_seconds=0.0, max_samples=3, threads=1,
                           progress=lambda done, total, m: seen.append((done, total)))
    assert torch.get_num_threads() == threads
    assert [m.candidate for m in measurements] == candidates
    assert all(m.seconds > 0 and m.samples == 3 for m in measurements)
    assert seen == [(1, 2), (2, 2)]
    with pytest.raises(ValueError, match="statistic"):
        measure(candidates, "cpu", statistic="mean")
    with pytest.raises(ValueError, match="threads"):
        measure(candidates, "cpu", threads=0)
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        measure(candidates, "meta")


def test_calibrate_stores_the_profile_that_get_profile_returns(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path))
    published = get_profile("cpu", calibrated=False)
    assert get_profile("cpu") == published  # nothing stored yet in this cache
    candidates = tiny_candidates()
    assert len(candidates) == 6

    report = calibrate("cpu", candidates=candidates, linear_candidates=[], save=True, threads=1, min_seconds=0.0,
                       max_samples=3)

    assert Path(report.saved_to).parent.parent == tmp_path
    assert report.profile.sm_count == 1  # timed with one thread: a one-core profile
    stored = get_profile("cpu", calibrated=True)  # for torch's threads: per-core figures times the cores
    threads = torch.get_num_threads()
    assert stored == report.profile.with_cores(threads) and stored.sm_count == threads
    assert stored.tensor_flops["f32"] == pytest.approx(report.profile.tensor_flops["f32"] * threads)
    assert profile_for_device("cpu") == stored
    assert stored.calibrated_from.startswith(f"measured on {measurement_device('cpu', threads=1)}")
    assert "1 thread," in stored.calibrated_from and "6 candidates" in stored.calibrated_from
    assert get_profile("cpu", calibrated=False) == published
    assert published.calibrated_from == "published figures"

    measured = [m.seconds for m in report.measurements]
    assert all(t > 0 for t in measured) and len(measured) == 6
    # Predictions are the analytic model's, on the published and the fitted profile.
    for m, before, after in zip(report.measurements, report.predicted_before, report.predicted_after):
        c = m.candidate
        for profile, predicted in ((published.with_cores(1), before), (report.profile, after)):
            expected = estimate_attention(c.head_patterns, c.shape, profile, block_m=c.tiles.block_m,
                                          block_n=c.tiles.block_n).seconds
            assert predicted == pytest.approx(expected, rel=1e-12)
    assert report.fit.rms_log_error_after < report.fit.rms_log_error_before
    assert report.accuracy_after.spearman == pytest.approx(reference_spearman(report.predicted_after, measured))
    # Regret per decision: dense tiles, and window / block_sparse at 25% of the pairs.
    assert set(report.accuracy_after.group_regrets) == {c.decision for c in candidates}
    assert len(report.accuracy_after.group_regrets) == 2


def test_calibrate_without_save_stores_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path))
    report = calibrate("cpu", candidates=tiny_candidates()[:2], linear_candidates=[], save=False, min_seconds=0.0,
                       max_samples=3)
    assert report.saved_to is None
    assert not (tmp_path / "profiles").exists()
    assert get_profile("cpu") == get_profile("cpu", calibrated=False)


# -- bench/cost_model.py ---------------------------------------------------------------------------


def test_bench_main_prints_and_records_every_figure(tmp_path, monkeypatch, capsys):
    bench = load_bench("cost_model")
    # The --quick grid takes ~45 s on 2 busy cores: two tiny layer shapes run the same path.
    candidates = tiny_candidates(lengths=(128, 256))
    monkeypatch.setattr(bench, "default_grid", lambda device, quick=False: candidates)
    linear = [LinearCandidate(out_features=128, in_features=128, tokens=tokens, kernel=kernel, density=density)
              for tokens in (1, 32) for kernel, density in (("dense", 1.0), ("bsr64x64", 0.5))]
    monkeypatch.setattr(bench, "linear_grid", lambda device, quick=False: linear)
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path / "cache"))
    output = tmp_path / "cost_model.json"

    bench.main(["--quick", "--no-save", "--device", "cpu", "--output", str(output)])

    printed = capsys.readouterr().out
    assert "Spearman" in printed and "regret" in printed and "held-out layer shapes" in printed
    assert not (tmp_path / "cache" / "profiles").exists()
    data = json.loads(output.read_text())
    assert data["device"] == measurement_device("cpu", threads=1)
    assert data["versions"]["torch"] == torch.__version__ and "triton" in data["versions"]
    assert datetime.datetime.fromisoformat(data["date"]).tzinfo is not None
    assert data["command"].endswith("bench/cost_model.py --quick --no-save --device cpu --output " + str(output))
    assert data["saved_to"] is None and data["cpu_threads"] == 1
    assert len(data["candidates"]) == len(candidates)
    measured = [c["measured_s"] for c in data["candidates"]]
    assert all(t > 0 for t in measured)
    for name, key in (("before (published)", "predicted_before_s"), ("after (fitted)", "predicted_after_s"),
                      ("held-out layer shapes", "predicted_held_out_s")):
        figures = data["accuracy"][name]
        predicted = [c[key] for c in data["candidates"]]
        assert figures["spearman"] == pytest.approx(reference_spearman(predicted, measured))
        assert set(figures["group_regrets"]) == {c["decision"] for c in data["candidates"]}
        assert figures["mean_regret"] >= 0 and figures["max_regret"] >= figures["mean_regret"]
    assert set(data["coefficients"]["after"]) == set(CPU_FIT_PARAMETERS) | set(CPU_LINEAR_FIT_PARAMETERS)
    assert data["fitted_profile"]["matmul_efficiency"] == data["coefficients"]["after"]["matmul_efficiency"]
    assert "sparse-or-dense choice" in printed
    rows = data["linear"]["candidates"]
    assert [(r["tokens"], r["kernel"], r["density"]) for r in rows] == [(c.tokens, c.kernel, c.density) for c in linear]
    assert all(r["measured_s"] > 0 and r["predicted_after_s"] > 0 for r in rows)
    assert data["linear"]["accuracy"]["after"]["decisions"] == 2
    assert data["linear"]["accuracy"]["after"]["spearman"] == pytest.approx(
        reference_spearman([r["predicted_after_s"] for r in rows], [r["measured_s"] for r in rows]))


def test_with_cores_scales_the_throughput_figures_only():
    cpu = PROFILES["cpu"]
    one = cpu.with_cores(1)
    assert one.sm_count == 1 and cpu.with_cores(cpu.sm_count) is cpu
    for name in ("vector_flops", "exp_per_s"):
        assert getattr(one, name) == pytest.approx(getattr(cpu, name) / cpu.sm_count)
    assert one.tensor_flops == {k: pytest.approx(v / cpu.sm_count) for k, v in cpu.tensor_flops.items()}
    for name in ("memory_bandwidth", "gather_bytes_per_s", "call_overhead_s", "launch_overhead_s", "matmul_efficiency"):
        assert getattr(one, name) == getattr(cpu, name)
    # a dense layer of many query blocks: one core takes about twice as long as two
    layer = AttentionShape(batch=1, num_heads=4, num_kv_heads=4, q_len=2048, kv_len=2048, head_dim=64,
                           value_dim=64, dtype="f32", causal=False)
    one_core, two_cores = (estimate_attention((Dense(),) * 4, layer, p, block_m=None, block_n=64).seconds
                           for p in (one, cpu.with_cores(2)))
    assert one_core / two_cores == pytest.approx(2.0, rel=0.05)
    assert get_profile("cpu", calibrated=False).sm_count == torch.get_num_threads()
    with pytest.raises(ValueError, match="cores must be >= 1"):
        cpu.with_cores(0)


def test_a_stored_calibration_reaches_executor_choices_made_before(tmp_path, monkeypatch):
    """The CPU executor caches its choices per pattern and shape: storing a calibrated profile
    forgets them, so a process that calibrates and then runs (sparsec tune --measure) uses it."""
    from sparsec.codegen.attention_cpu_choice import choose_split
    from sparsec.cost_models.calibration import save_calibrated_profile
    from sparsec.patterns import MultiDiagonal

    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path))
    choice = (MultiDiagonal([-1024, -512, 0, 512, 1024], 48), 4096, 4096, False)
    options = {"rows": 8, "width": 128, "threads": 2, "frames": False}
    assert len(choose_split(*choice, **options)[1]) == 5  # far bands: run as parts
    try:
        # A query row that costs a millisecond: parts compute every row once each, so whole is cheaper.
        save_calibrated_profile(get_profile("cpu", calibrated=False).replace(row_overhead_s=1e-3))
        assert len(choose_split(*choice, **options)[1]) == 1
    finally:
        choose_split.cache_clear()  # no choice priced with that profile outlives the test
