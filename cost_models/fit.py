"""Fit a hardware profile's coefficients to measured kernel times, and `calibrate`: measure, fit,
report the accuracy, store the calibrated profile.

The analytic model (attention_cost) is fixed in form; its device coefficients (how much of peak a
kernel's inner loop reaches, what a masked pair, a visited block and a launch cost) are what
measurements refine. The fit minimizes the squared error of log(predicted / measured) over the
candidates — relative error, so a 50 us kernel counts as much as a 50 ms one, which is what
ranking kernels needs — plus a weak pull of each coefficient towards its starting value
(`prior_weight`), which keeps coefficients the measurements cannot see (memory bandwidth on a
compute-bound grid, say) where they were instead of letting them drift.

Linear layers are calibrated in the same fit (`calibrate` times cost_models.linear_measure's grid
too): their terms (LINEAR_FIT_PARAMETERS: a dense GEMM's efficiency, the CPU's weight packing and
call costs, the sparse kernels' efficiencies) are fitted together with the attention terms, since
some coefficients (memory_efficiency on a GPU, gather_bytes_per_s on a CPU) price both.

Coefficients are fitted in log space (they are positive and span decades) within `BOUNDS`, by
Levenberg-Marquardt with a forward-difference Jacobian: the model has a max() of compute and memory
time and a list scheduler, so it has no closed-form gradient, but it is piecewise smooth and has
few coefficients. Each attention candidate's tile geometry (`AttentionWork`) is computed once; a
trial set of coefficients only re-prices it (a linear candidate prices itself:
LinearCandidate.seconds).
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sparsec.cost_models.accuracy import Accuracy, model_accuracy
from sparsec.cost_models.attention_cost import AttentionWork, attention_work, price_attention
from sparsec.cost_models.calibration import save_calibrated_profile
from sparsec.cost_models.hardware import HardwareProfile, get_profile, profile_for_device
from sparsec.cost_models.linear_measure import (LinearAccuracy, LinearCandidate, LinearMeasurement, linear_accuracy,
                                                linear_grid, measure_linear)
from sparsec.cost_models.measure import Candidate, Measurement, default_grid, measure, measurement_device

__all__ = ["BOUNDS", "CPU_FIT_PARAMETERS", "CPU_LINEAR_FIT_PARAMETERS", "FIT_PARAMETERS", "LINEAR_FIT_PARAMETERS",
           "CalibrationReport", "FitResult", "calibrate", "candidate_work", "fit_measurements", "fit_parameters",
           "fit_profile", "linear_fit_parameters", "predict"]

log = logging.getLogger(__name__)

FIT_PARAMETERS = ("matmul_efficiency", "memory_efficiency", "mask_cost_per_pair", "block_overhead_s",
                  "launch_overhead_s")
# The cpu executor is compute-bound (no memory term), pays a pair's softmax apart from its dot
# products (exp_per_s), and pays per query row, per SDPA call and per gathered key; its kernel's
# speed grows with a call's query rows (query_rows_exponent).
CPU_FIT_PARAMETERS = ("matmul_efficiency", "exp_per_s", "mask_cost_per_pair", "row_overhead_s", "launch_overhead_s",
                      "call_overhead_s", "gather_bytes_per_s", "query_rows_exponent", "native_pair_speed",
                      "native_mask_cost_per_pair", "native_overhead_s", "native_fetch_seconds",
                      "native_fetch_width_seconds", "native_fetch_spill_seconds")
# Linear layers (cost_models/__init__.py, linear_cost_cpu.py): the dense GEMM's efficiency and the
# sparse kernels' relative to the model of them; on a CPU also the GEMM's weight packing and call
# costs, torch's BSR streaming share at a few tokens, the streaming bandwidth (which the CPU's
# attention model does not use), and the native sparse kernels' terms.
LINEAR_FIT_PARAMETERS = ("gemm_efficiency", "memory_efficiency", "bsr_kernel_efficiency", "nm_kernel_efficiency")
CPU_LINEAR_FIT_PARAMETERS = LINEAR_FIT_PARAMETERS + ("gemm_pack_bytes_per_s", "gemm_call_overhead_s",
                                                     "torch_bsr_stream_share", "native_chunk_seconds",
                                                     "native_chunk_token_seconds", "native_stream_share",
                                                     "native_value_seconds", "native_value_lanes_seconds",
                                                     "native_linear_call_s")
# Physically meaningful ranges: efficiencies are fractions of a peak; costs are positive and finite.
BOUNDS: dict[str, tuple[float, float]] = {
    "matmul_efficiency": (1e-3, 1.0),
    "memory_efficiency": (1e-3, 1.0),
    "mask_cost_per_pair": (1e-2, 1e3),
    "block_overhead_s": (1e-10, 1e-2),
    "row_overhead_s": (1e-10, 1e-4),
    "launch_overhead_s": (1e-7, 1e-1),
    "call_overhead_s": (1e-8, 1e-1),
    "gather_bytes_per_s": (1e6, 1e13),
    "exp_per_s": (1e6, 1e15),
    "vector_flops": (1e6, 1e16),
    "query_rows_exponent": (1e-3, 1.0),
    "gemm_efficiency": (1e-3, 1.0),
    # relative to the model of the kernel, which may be pessimistic: above 1 is possible
    "bsr_kernel_efficiency": (1e-3, 10.0),
    "nm_kernel_efficiency": (1e-3, 10.0),
    "torch_bsr_stream_share": (1e-3, 10.0),
    "native_pair_speed": (1e-2, 100.0),
    "native_mask_cost_per_pair": (1e-2, 1e3),
    "native_overhead_s": (1e-7, 1e-1),
    "native_fetch_seconds": (1e-11, 1e-5),
    "native_fetch_width_seconds": (1e-14, 1e-7),
    "native_fetch_spill_seconds": (1e-14, 1e-7),
    "gemm_pack_bytes_per_s": (1e6, 1e13),
    "native_chunk_seconds": (1e-13, 1e-6),
    "native_chunk_token_seconds": (1e-13, 1e-6),
    "native_stream_share": (1e-2, 10.0),
    "native_value_seconds": (1e-13, 1e-6),
    "native_value_lanes_seconds": (1e-13, 1e-6),
    "native_linear_call_s": (1e-8, 1e-2),
    "gemm_call_overhead_s": (1e-8, 1e-1),
}


def fit_parameters(profile: HardwareProfile) -> tuple[str, ...]:
    """The coefficients measured autotuning refits for `profile`'s executor."""
    return CPU_FIT_PARAMETERS if profile.executor == "cpu" else FIT_PARAMETERS


def linear_fit_parameters(profile: HardwareProfile) -> tuple[str, ...]:
    """The linear-layer coefficients measured autotuning refits for `profile`'s executors."""
    return CPU_LINEAR_FIT_PARAMETERS if profile.executor == "cpu" else LINEAR_FIT_PARAMETERS


def candidate_work(candidate: Candidate, executor: str = "triton") -> AttentionWork:
    """What a candidate's kernels on `executor` ("triton" or "cpu") do (coefficient independent)."""
    if candidate.native and executor == "cpu":  # the native kernel picks its own tiles
        return attention_work(candidate.head_patterns, candidate.shape, block_m=None, executor=executor, native=True)
    return attention_work(candidate.head_patterns, candidate.shape, block_m=candidate.tiles.block_m,
                          block_n=candidate.tiles.block_n, executor=executor)


def predict(profile: HardwareProfile, works: Sequence[AttentionWork | LinearCandidate]) -> np.ndarray:
    """Predicted seconds of each work item (an attention candidate's work, or a linear candidate)
    on `profile`."""
    return np.array([price_attention(w, profile).seconds if isinstance(w, AttentionWork) else w.seconds(profile)
                     for w in works], dtype=np.float64)


@dataclass(frozen=True, slots=True, kw_only=True)
class FitResult:
    profile: HardwareProfile
    before: dict[str, float]            # fitted coefficients before ...
    after: dict[str, float]             # ... and after
    rms_log_error_before: float         # sqrt(mean(log(predicted / measured)^2)): ~ relative error
    rms_log_error_after: float
    iterations: int


def _check_inputs(profile: HardwareProfile, works, measured, parameters, prior_weight, max_iterations) -> np.ndarray:
    if not parameters:
        raise ValueError("fit_profile: no parameters to fit")
    if len(set(parameters)) != len(parameters):
        raise ValueError(f"fit_profile: parameters repeat a name: {list(parameters)}")
    if isinstance(prior_weight, bool) or not isinstance(prior_weight, (int, float)) or not 0 <= prior_weight < math.inf:
        raise ValueError(f"fit_profile: prior_weight must be a finite number >= 0, got {prior_weight!r}")
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 1:
        raise ValueError(f"fit_profile: max_iterations must be a positive int, got {max_iterations!r}")
    measured = np.asarray(measured, dtype=np.float64)
    if measured.ndim != 1 or measured.size != len(works):
        raise ValueError(f"fit_profile: {len(works)} work items but measured has shape {measured.shape}")
    if measured.size == 0:
        raise ValueError("fit_profile: no measurements to fit")
    if not np.all(np.isfinite(measured)) or measured.min() <= 0:
        raise ValueError("fit_profile: measured times must be finite and positive")
    for name in parameters:
        if name not in BOUNDS:
            raise ValueError(f"fit_profile: cannot fit {name!r}; fittable: {sorted(BOUNDS)}")
        if not isinstance(getattr(profile, name, None), (int, float)):
            raise ValueError(f"fit_profile: profile has no numeric coefficient {name!r}")
    return measured


class _Objective:
    """Residuals of log time, plus the prior rows, as a function of the log coefficients."""

    def __init__(self, profile, works, measured, parameters, prior_weight):
        self.profile, self.works, self.parameters = profile, works, parameters
        self.log_measured = np.log(measured)
        self.low = np.log([BOUNDS[n][0] for n in parameters])
        self.high = np.log([BOUNDS[n][1] for n in parameters])
        self.start = self.clip(np.log([float(getattr(profile, n)) for n in parameters]))
        self.prior = math.sqrt(prior_weight * len(works))

    def clip(self, x: np.ndarray) -> np.ndarray:
        return np.clip(x, self.low, self.high)

    def profile_at(self, x: np.ndarray) -> HardwareProfile:
        # exp(log(bound)) can land an ulp outside the bound: clamp in linear space too.
        return self.profile.replace(**{n: min(max(math.exp(v), BOUNDS[n][0]), BOUNDS[n][1])
                                       for n, v in zip(self.parameters, x)})

    def log_errors(self, x: np.ndarray) -> np.ndarray:
        return np.log(predict(self.profile_at(x), self.works)) - self.log_measured

    def residuals(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([self.log_errors(x), self.prior * (x - self.start)])


def _jacobian(objective: _Objective, x: np.ndarray, r: np.ndarray, step: float = 1e-4) -> np.ndarray:
    columns = []
    for i in range(x.size):
        # Step inward at an upper bound so the probe stays inside the box.
        h = -step if x[i] + step > objective.high[i] else step
        probe = x.copy()
        probe[i] += h
        columns.append((objective.residuals(probe) - r) / h)
    return np.stack(columns, axis=1)


def _levenberg_marquardt(objective: _Objective, x: np.ndarray, max_iterations: int) -> tuple[np.ndarray, int]:
    r = objective.residuals(x)
    cost, damping = float(r @ r), 1e-3
    for iteration in range(1, max_iterations + 1):
        J = _jacobian(objective, x, r)
        JtJ, gradient = J.T @ J, J.T @ r
        improved = False
        while damping < 1e10:
            step = np.linalg.solve(JtJ + damping * (np.diag(np.diag(JtJ)) + 1e-9 * np.eye(x.size)), -gradient)
            trial = objective.clip(x + step)
            r_trial = objective.residuals(trial)
            trial_cost = float(r_trial @ r_trial)
            if trial_cost < cost:
                improved = cost - trial_cost > 1e-10 * max(cost, 1e-30)
                x, r, cost, damping = trial, r_trial, trial_cost, max(damping / 3, 1e-9)
                break
            damping *= 4
        if not improved:
            return x, iteration
    return x, max_iterations


def fit_profile(
    profile: HardwareProfile,
    works: Sequence[AttentionWork | LinearCandidate],
    measured_seconds: Sequence[float],
    *,
    parameters: Sequence[str] | None = None,
    prior_weight: float = 1e-5,
    max_iterations: int = 60,
    calibrated_from: str | None = None,
) -> FitResult:
    """Refit `parameters` (default: fit_parameters(profile)) of `profile` so its predictions of
    `works` match `measured_seconds`. `calibrated_from` is recorded on the fitted profile (what
    was measured, where, when)."""
    parameters = tuple(parameters) if parameters is not None else fit_parameters(profile)
    measured = _check_inputs(profile, works, measured_seconds, parameters, prior_weight, max_iterations)
    if "gemm_efficiency" in parameters and not profile.gemm_efficiency:  # 0: the same as matmul_efficiency
        profile = profile.replace(gemm_efficiency=profile.matmul_efficiency)
    objective = _Objective(profile, list(works), measured, parameters, prior_weight)
    start = objective.start
    best, iterations = _levenberg_marquardt(objective, start, max_iterations)
    fitted = objective.profile_at(best)
    if calibrated_from is not None:
        fitted = fitted.replace(calibrated_from=calibrated_from)
    rms = lambda x: float(np.sqrt(np.mean(objective.log_errors(x) ** 2)))  # noqa: E731
    result = FitResult(profile=fitted, before={n: float(getattr(profile, n)) for n in parameters},
                       after={n: float(getattr(fitted, n)) for n in parameters},
                       rms_log_error_before=rms(start), rms_log_error_after=rms(best), iterations=iterations)
    log.info("fitted %s in %d iterations: rms log error %.3f -> %.3f", profile.name, iterations,
             result.rms_log_error_before, result.rms_log_error_after)
    return result


def fit_measurements(profile: HardwareProfile, measurements: Sequence[Measurement], **options) -> FitResult:
    """fit_profile over measured candidates."""
    works = [candidate_work(m.candidate, profile.executor) for m in measurements]
    return fit_profile(profile, works, [m.seconds for m in measurements], **options)


# -- the whole step: measure, fit, check, store ------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CalibrationReport:
    fit: FitResult
    measurements: tuple[Measurement, ...]
    predicted_before: tuple[float, ...]   # seconds per measurement, published profile
    predicted_after: tuple[float, ...]    # seconds per measurement, fitted profile
    accuracy_before: Accuracy
    accuracy_after: Accuracy
    device: str                           # what was measured (measure.measurement_device)
    saved_to: str | None                  # the calibrated profile's file, when stored
    # Linear layers, when they were measured too (the same for their candidates)
    linear_measurements: tuple[LinearMeasurement, ...] = ()
    linear_predicted_before: tuple[float, ...] = ()
    linear_predicted_after: tuple[float, ...] = ()
    linear_accuracy_before: LinearAccuracy | None = None
    linear_accuracy_after: LinearAccuracy | None = None

    @property
    def profile(self) -> HardwareProfile:
        return self.fit.profile

    def summary(self) -> str:
        """One line: how well the fitted profile ranks (and chooses) what was measured."""
        a = self.accuracy_after
        text = (f"attention: {a.candidates} candidates, Spearman {a.spearman:.3f}, mean top-1 regret "
                f"{a.mean_regret:.1%}")
        linear = self.linear_accuracy_after
        if linear is not None:
            text += (f"; linear layers: {len(self.linear_measurements)} timings, Spearman {linear.spearman:.3f}, "
                     f"sparse-or-dense choice right in {linear.right} of {linear.decisions} (mean loss "
                     f"{linear.mean_loss:.1%})")
        return text


def calibrate(
    device: torch.device | str | None = None,
    *,
    candidates: Sequence[Candidate] | None = None,
    linear_candidates: Sequence[LinearCandidate] | None = None,
    quick: bool = False,
    save: bool = True,
    parameters: Sequence[str] | None = None,
    threads: int | None = None,
    **measure_options,
) -> CalibrationReport:
    """Measured autotuning: time `candidates` (default: measure.default_grid) and
    `linear_candidates` (default: linear_measure.linear_grid; empty: attention only; a kernel the
    device cannot run is left out with a warning) on `device`
    (default: CUDA when present, else CPU), fit the device's published profile to them (default
    parameters: the attention terms, and the linear ones when linear layers were timed), and store
    the fitted profile (calibration.save_calibrated_profile, keyed by the profile's device name) so
    that hardware.get_profile returns it from then on. `threads`: CPU timing with that many torch
    threads (see measure.measure); the profile then has that many cores."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    base = get_profile(profile_for_device(device).name, calibrated=False)
    if threads is not None and device.type == "cpu":
        base = base.with_cores(threads)
    candidates = list(candidates) if candidates is not None else default_grid(device, quick=quick)
    linear = list(linear_candidates) if linear_candidates is not None else linear_grid(device, quick=quick)
    measurements = measure(candidates, device, threads=threads, **measure_options)
    linear_measurements = measure_linear(linear, device, threads=threads, skip_unsupported=True, **measure_options)
    linear = [m.candidate for m in linear_measurements]  # less any kernel this device cannot run
    works = [candidate_work(c, base.executor) for c in candidates]
    measured = [m.seconds for m in measurements]
    linear_measured = [m.seconds for m in linear_measurements]
    if parameters is None:
        parameters = tuple(dict.fromkeys(fit_parameters(base) + (linear_fit_parameters(base) if linear else ())))
    result = fit_profile(base, works + linear, measured + linear_measured, parameters=parameters)
    where = measurement_device(device, threads=threads)
    before, after = (predict(p, works) for p in (base, result.profile))
    groups = [c.decision for c in candidates]
    accuracy_before, accuracy_after = (model_accuracy(p, measured, groups) for p in (before, after))
    linear_before, linear_after = (predict(p, linear) for p in (base, result.profile))
    linear_accuracy_before, linear_accuracy_after = (
        (linear_accuracy(linear, p, linear_measured) if linear else None) for p in (linear_before, linear_after))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = CalibrationReport(
        fit=result, measurements=tuple(measurements), predicted_before=tuple(before.tolist()),
        predicted_after=tuple(after.tolist()), accuracy_before=accuracy_before, accuracy_after=accuracy_after,
        device=where, saved_to=None, linear_measurements=tuple(linear_measurements),
        linear_predicted_before=tuple(linear_before.tolist()), linear_predicted_after=tuple(linear_after.tolist()),
        linear_accuracy_before=linear_accuracy_before, linear_accuracy_after=linear_accuracy_after)
    fitted = result.profile.replace(calibrated_from=f"measured on {where}, {stamp}: {report.summary()}")
    report = dataclasses.replace(report, fit=dataclasses.replace(result, profile=fitted))
    if save:
        report = dataclasses.replace(report, saved_to=str(save_calibrated_profile(fitted)))
    log.info("calibrated %s on %s: Spearman %.3f -> %.3f, mean regret %.1f%% -> %.1f%%", base.name, where,
             accuracy_before.spearman, accuracy_after.spearman, 100 * accuracy_before.mean_regret,
             100 * accuracy_after.mean_regret)
    return report
