"""Measured autotuning of the linear-layer terms: candidates, their weights, timing through the
compiled op, the choice score, and the joint fit with attention (cost_models/linear_measure.py,
cost_models/fit.py).

The fit is checked on synthetic times priced with linear coefficients changed by known factors,
which it must find again; weights are checked by counting their zero blocks and groups; the choice
score against a hand-computed case.
"""
import logging
import math

import numpy as np
import pytest
import torch

from sparsec.codegen.tiles import AttentionTiles
from sparsec.cost_models import estimate_linear_seconds
from sparsec.cost_models.attention_cost import AttentionShape
from sparsec.cost_models.fit import (CPU_LINEAR_FIT_PARAMETERS, LINEAR_FIT_PARAMETERS, calibrate, candidate_work,
                                     fit_profile, linear_fit_parameters, predict)
from sparsec.cost_models.hardware import PROFILES, get_profile
from sparsec.cost_models.linear_measure import (LinearCandidate, block_weight, linear_accuracy, linear_grid,
                                                measure_linear, nm_weight)
from sparsec.cost_models.measure import candidate_grid
from sparsec.codegen.linear_cpu_native import native_linear_available
from sparsec.ir.types import DENSE, BlockSparse, NMSparse, Unstructured


def grid(shapes=((256, 512), (512, 256)), tokens=(1, 4, 32, 256), densities=(0.2, 0.6), extra=("nm2:4",)):
    out = []
    for N, K in shapes:
        for M in tokens:
            out.append(LinearCandidate(out_features=N, in_features=K, tokens=M, kernel="dense"))
            out += [LinearCandidate(out_features=N, in_features=K, tokens=M, kernel="bsr64x64", density=d)
                    for d in densities]
            out += [LinearCandidate(out_features=N, in_features=K, tokens=M, kernel=k) for k in extra]
    return out


# -- candidates and weights ---------------------------------------------------------------------------


def test_a_candidate_names_its_structure_and_prices_itself():
    bsr = LinearCandidate(out_features=256, in_features=512, tokens=32, kernel="bsr64x32", density=0.25)
    assert bsr.sparsity == BlockSparse(block=(64, 32), density=0.25)
    assert LinearCandidate(out_features=8, in_features=16, tokens=1, kernel="nm2:4").sparsity == NMSparse(
        n=2, m=4, density=0.5)
    assert LinearCandidate(out_features=8, in_features=16, tokens=1, kernel="dense").sparsity == DENSE
    assert bsr.layer == "256x512 f32, 32 tokens" and bsr.label == "bsr64x32@0.25"
    for profile in (get_profile("cpu", calibrated=False), PROFILES["h100"]):
        assert bsr.seconds(profile) == estimate_linear_seconds(32, 256, 512, "f32", bsr.sparsity, profile)
    semi = LinearCandidate(out_features=256, in_features=512, tokens=64, kernel="semi2:4", dtype="bf16")
    assert semi.seconds(PROFILES["h100"]) == estimate_linear_seconds(64, 256, 512, "bf16", semi.sparsity,
                                                                     PROFILES["h100"], semi_structured=True)


@pytest.mark.parametrize("arguments, message", [
    ({"kernel": "bsr64x64", "out_features": 100}, "not made of 64 x 64 blocks"),
    ({"kernel": "nm2:4", "in_features": 30}, "not a multiple of 4"),
    ({"kernel": "dense", "density": 0.5}, "density"),
    ({"kernel": "bsr64x64", "density": 0.0}, "density"),
    ({"kernel": "csr"}, "unknown linear kernel"),
    ({"kernel": "dense", "tokens": 0}, "tokens must be a positive int"),
    ({"kernel": "dense", "dtype": "f64"}, "dtype"),
])
def test_a_bad_candidate_is_refused_with_the_reason(arguments, message):
    values = {"out_features": 128, "in_features": 128, "tokens": 8, **arguments}
    with pytest.raises(ValueError, match=message):
        LinearCandidate(**values)


def test_weights_have_the_structure_they_are_made_for():
    generator = torch.Generator().manual_seed(1)
    W = block_weight(128, 192, (32, 64), 0.4, torch.float32, generator=generator)
    blocks = W.view(4, 32, 3, 64).abs().sum(dim=(1, 3)) > 0
    assert int(blocks.sum()) == round(0.4 * 12)
    nm = nm_weight(16, 32, 1, 4, torch.bfloat16, generator=generator)
    assert nm.dtype == torch.bfloat16
    assert ((nm.view(16, 8, 4) != 0).sum(dim=-1) == 1).all()


def test_the_grids_cover_every_kernel_a_compiled_layer_can_take():
    cpu, cuda = linear_grid("cpu"), linear_grid("cuda")
    native = {"unstructured"} if native_linear_available() else set()  # scattered zeros: the native kernels only
    assert {c.kernel for c in cpu} == {"dense", "bsr64x64", "nm2:4"} | native and {c.dtype for c in cpu} == {"f32"}
    assert {c.kernel for c in cuda} == {"dense", "bsr64x64", "nm2:4", "semi2:4"} and {c.dtype for c in cuda} == {"bf16"}
    for candidates in (cpu, cuda, linear_grid("cpu", quick=True)):
        layers = {c.layer for c in candidates}
        assert layers == {c.layer for c in candidates if c.kernel == "dense"}  # every sparse time has its dense one
    assert 1 in {c.tokens for c in cpu} and len(linear_grid("cpu", quick=True)) < len(cpu)


# -- timing ---------------------------------------------------------------------------------------------


def test_measure_linear_times_the_compiled_op_and_restores_threads():
    from sparsec import linear_dispatch

    candidates = grid(shapes=((128, 128),), tokens=(1, 16), densities=(0.25,))
    native = native_linear_available()
    if native:
        candidates += [LinearCandidate(out_features=128, in_features=128, tokens=t, kernel="unstructured", density=0.3)
                       for t in (1, 16)]
    threads = torch.get_num_threads()
    calls = linear_dispatch.kernel_calls.copy()
    seen = []
    measurements = measure_linear(candidates, "cpu", min_seconds=0.0, max_samples=3, threads=1,
                                  progress=lambda done, total, m: seen.append((done, total)))
    assert torch.get_num_threads() == threads
    assert [m.candidate for m in measurements] == candidates
    assert all(m.seconds > 0 and m.samples == 3 for m in measurements)
    assert seen == [(i + 1, len(candidates)) for i in range(len(candidates))]
    ran = linear_dispatch.kernel_calls - calls
    assert ran["bsr_linear_cpu"] >= 2 * 4 and ran["nm_linear_cpu"] >= 2 * 4  # warm-up and 3 samples a count
    assert ran["unstructured_linear_cpu"] >= (2 * 4 if native else 0)


def test_measure_linear_refuses_to_time_a_kernel_that_fell_back_to_dense(caplog):
    # A weight with no zero block: the block-sparse pack refuses it and the op runs dense.
    full = LinearCandidate(out_features=128, in_features=128, tokens=8, kernel="bsr64x64", density=1.0)
    with pytest.raises(RuntimeError, match="did not run"):
        measure_linear([full], "cpu", min_seconds=0.0, max_samples=3)
    # calibration leaves such a kernel out (a device without it), and says so
    dense = LinearCandidate(out_features=128, in_features=128, tokens=8, kernel="dense")
    with caplog.at_level(logging.WARNING, logger="sparsec.cost_models.linear_measure"):
        kept = measure_linear([full, dense], "cpu", min_seconds=0.0, max_samples=3, skip_unsupported=True)
    assert [m.candidate for m in kept] == [dense]
    assert "bsr64x64 kernel did not run" in caplog.text and "left out" in caplog.text
    with pytest.raises(ValueError, match="statistic"):
        measure_linear([], "cpu", statistic="mean")
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        measure_linear([], "meta")


# -- the choice score -----------------------------------------------------------------------------------


def test_linear_accuracy_scores_the_dense_or_sparse_choice():
    layer = dict(out_features=128, in_features=128, tokens=8)
    candidates = [LinearCandidate(kernel="dense", **layer),
                  LinearCandidate(kernel="bsr64x64", density=0.25, **layer),
                  LinearCandidate(kernel="bsr64x64", density=0.75, **layer),
                  LinearCandidate(kernel="nm2:4", **layer)]
    measured = [10.0, 4.0, 12.0, 30.0]
    # predicted: the 25% weight wins (right), the 75% one wins by 50% (wrong: 12 against 10),
    # N:M within the compiler's margin of dense (dense: right)
    predicted = [10.0, 5.0, 6.0, 9.9]
    accuracy = linear_accuracy(candidates, predicted, measured)
    assert (accuracy.right, accuracy.decisions) == (2, 3)
    assert accuracy.mean_loss == pytest.approx((0 + 0.2 + 0) / 3) and accuracy.max_loss == pytest.approx(0.2)
    ranks_p, ranks_m = np.argsort(np.argsort(predicted)), np.argsort(np.argsort(measured))
    assert accuracy.spearman == pytest.approx(float(np.corrcoef(ranks_p, ranks_m)[0, 1]))
    with pytest.raises(ValueError, match="4 candidates, 3 predicted"):
        linear_accuracy(candidates, predicted[:3], measured)


# -- the fit ----------------------------------------------------------------------------------------------


LINEAR_CHANGED = {"gemm_efficiency": 0.5, "gemm_pack_bytes_per_s": 3.0, "gemm_call_overhead_s": 0.4,
                  "bsr_kernel_efficiency": 0.6, "torch_bsr_stream_share": 0.5, "memory_efficiency": 0.7}


def test_the_joint_fit_recovers_changed_linear_coefficients_and_leaves_attention_alone(monkeypatch):
    monkeypatch.setenv("SPARSEC_CPU_NATIVE", "0")  # the torch paths, whose coefficients the fit refits
    base = PROFILES["cpu"]
    truth = base.replace(**{name: getattr(base, name) * factor for name, factor in LINEAR_CHANGED.items()})
    linear = grid(tokens=(1, 4, 32, 256, 1024), densities=(0.1, 0.3, 0.6))
    attention = candidate_grid([AttentionShape(batch=1, num_heads=2, num_kv_heads=2, q_len=256, kv_len=256,
                                               head_dim=32, value_dim=32, dtype="f32", causal=False)],
                               families=("dense", "window"), densities=(0.25,), tiles=(AttentionTiles(64, 64),))
    works = [candidate_work(c, "cpu") for c in attention] + linear
    parameters = linear_fit_parameters(base)
    assert parameters == CPU_LINEAR_FIT_PARAMETERS and linear_fit_parameters(PROFILES["h100"]) == LINEAR_FIT_PARAMETERS
    result = fit_profile(base, works, predict(truth, works), parameters=parameters + ("matmul_efficiency",),
                         prior_weight=0.0)
    for name in LINEAR_CHANGED:
        assert result.after[name] == pytest.approx(getattr(truth, name), rel=1e-2), name
    assert result.after["matmul_efficiency"] == pytest.approx(base.matmul_efficiency, rel=1e-3)
    assert result.rms_log_error_after < 1e-3 < 0.1 < result.rms_log_error_before


NATIVE_CHANGED = {"native_chunk_seconds": 1.6, "native_chunk_token_seconds": 0.7, "native_stream_share": 0.8,
                  "native_value_seconds": 1.4, "native_value_lanes_seconds": 0.6, "native_linear_call_s": 2.0}


@pytest.mark.skipif(not native_linear_available(), reason="the native kernels do not load here")
def test_the_fit_recovers_changed_native_kernel_coefficients():
    """The native sparse kernels' terms (masked rows, segments, block rows) are found again from
    layers on which each is the cheapest path somewhere: scattered zeros at a few densities, N:M
    and blocks, 1-256 tokens."""
    base = PROFILES["cpu"]
    truth = base.replace(**{name: getattr(base, name) * factor for name, factor in NATIVE_CHANGED.items()})
    shapes, tokens = ((1024, 2048), (2048, 1024), (256, 512)), (1, 2, 8, 16, 64, 256)
    works = grid(shapes=shapes, tokens=tokens, densities=(0.1, 0.6))
    works += [LinearCandidate(out_features=N, in_features=K, tokens=M, kernel="unstructured", density=d)
              for N, K in shapes for M in tokens for d in (0.05, 0.3, 0.8)]
    assert works[-1].sparsity == Unstructured(density=0.8) and works[-1].label == "unstructured@0.80"
    result = fit_profile(base, works, predict(truth, works), parameters=CPU_LINEAR_FIT_PARAMETERS, prior_weight=0.0)
    for name in NATIVE_CHANGED:
        assert result.after[name] == pytest.approx(getattr(truth, name), rel=1e-2), name
    assert result.rms_log_error_after < 1e-3 < 0.1 < result.rms_log_error_before


def test_a_gpu_fit_starts_gemm_efficiency_at_the_attention_efficiency():
    base = PROFILES["h100"]
    assert base.gemm_efficiency == 0.0  # unset: linear layers price at matmul_efficiency
    linear = linear_grid("cuda", quick=True)
    truth = base.replace(gemm_efficiency=0.8 * base.matmul_efficiency)
    result = fit_profile(base, linear, predict(truth, linear), parameters=("gemm_efficiency",), prior_weight=0.0)
    # unset means matmul_efficiency: the fit starts there, from the same predictions
    assert result.before == {"gemm_efficiency": base.matmul_efficiency}
    assert np.array_equal(predict(base.replace(**result.before), linear), predict(base, linear))
    assert result.after["gemm_efficiency"] == pytest.approx(truth.gemm_efficiency, rel=1e-3)
    assert math.isclose(result.rms_log_error_after, 0.0, abs_tol=1e-4)


def test_calibrate_times_linear_layers_too_and_stores_their_terms(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path))
    attention = candidate_grid([AttentionShape(batch=1, num_heads=2, num_kv_heads=2, q_len=128, kv_len=128,
                                               head_dim=32, value_dim=32, dtype="f32", causal=False)],
                               families=("dense", "window"), densities=(0.25,), tiles=(AttentionTiles(64, 64),))
    linear = grid(shapes=((128, 256),), tokens=(1, 16, 128), densities=(0.25,), extra=())
    unsupported = LinearCandidate(out_features=128, in_features=256, tokens=16, kernel="bsr64x64", density=1.0)
    report = calibrate("cpu", candidates=attention, linear_candidates=linear + [unsupported], threads=1,
                       min_seconds=0.0, max_samples=3)
    published = get_profile("cpu", calibrated=False).with_cores(1)
    assert [m.candidate for m in report.linear_measurements] == linear  # the one that runs dense left out
    assert set(CPU_LINEAR_FIT_PARAMETERS) <= set(report.fit.after)
    for m, before, after in zip(report.linear_measurements, report.linear_predicted_before,
                                report.linear_predicted_after):
        assert before == pytest.approx(m.candidate.seconds(published), rel=1e-12)
        assert after == pytest.approx(m.candidate.seconds(report.profile), rel=1e-12)
    measured = [m.seconds for m in report.linear_measurements]
    assert report.linear_accuracy_after == linear_accuracy(linear, report.linear_predicted_after, measured)
    assert report.linear_accuracy_after.decisions == 3
    assert "linear layers: 6 timings" in report.profile.calibrated_from
    assert get_profile("cpu") == report.profile.with_cores(torch.get_num_threads())
