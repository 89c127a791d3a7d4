"""Time linear layers on the present device, for measured autotuning of the linear-layer terms.

A candidate is one weight shape, one token count and one kernel of sparsec's (codegen/linear_*.py)
for a weight of a given structure: "dense" (torch's GEMM), "bsrRxC" at a kept-block density,
"nmN:M", "semi2:4", or "unstructured" at a nonzero density (scattered zeros; the CPU's native
kernels). `linear_grid` builds the calibration grid for a device; `measure_linear`
runs each candidate through sparsec.linear_dispatch.linear, the op a compiled model calls (so the
weight is packed once, on a warm-up call, as at a model's first step), and times it as
cost_models.measure times attention (CPU: caches flushed before every sample; CUDA: do_bench). A
sparse candidate whose kernel did not run (fell back to dense) is an error, or for calibration left
out with a warning, never a mislabelled time.

A candidate is also the work the fit prices (`seconds(profile)`: cost_models.estimate_linear_seconds),
and `linear_accuracy` scores the decision the compiler makes with it (passes/choose_linear_kernels:
the layer's sparse kernel or dense, at each token count) against the measured times.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sparsec.cost_models.hardware import HardwareProfile
from sparsec.cost_models.measure import time_candidates
from sparsec.ir.ops import linear_kernel_format
from sparsec.ir.types import DENSE, BlockSparse, NMSparse, Unstructured

log = logging.getLogger(__name__)

__all__ = ["LinearAccuracy", "LinearCandidate", "LinearMeasurement", "block_weight", "linear_accuracy",
           "linear_grid", "measure_linear", "nm_weight"]

_TORCH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


@dataclass(frozen=True, slots=True, kw_only=True)
class LinearCandidate:
    """y = x @ W.T for `tokens` rows of x and an out_features x in_features weight W, by `kernel`;
    `density`: the kept fraction of a "bsr" weight's blocks or of an "unstructured" one's elements
    (1 for the others)."""

    out_features: int
    in_features: int
    tokens: int
    kernel: str
    density: float = 1.0
    dtype: str = "f32"

    def __post_init__(self) -> None:
        kind, params = linear_kernel_format(self.kernel)
        for name in ("out_features", "in_features", "tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LinearCandidate: {name} must be a positive int, got {value!r}")
        if self.dtype not in _TORCH_DTYPES:
            raise ValueError(f"LinearCandidate: dtype must be one of {sorted(_TORCH_DTYPES)}, got {self.dtype!r}")
        if not 0.0 < self.density <= 1.0 or (kind not in ("bsr", "unstructured") and self.density != 1.0):
            raise ValueError(f"LinearCandidate: density {self.density!r} must be in (0, 1], and 1 unless the "
                             f"kernel is block-sparse or unstructured ({self.kernel})")
        if kind == "bsr" and (self.out_features % params[0] or self.in_features % params[1]):
            raise ValueError(f"LinearCandidate: a {self.out_features} x {self.in_features} weight is not made of "
                             f"{params[0]} x {params[1]} blocks")
        if kind in ("nm", "semi") and self.in_features % params[1]:
            raise ValueError(f"LinearCandidate: in_features {self.in_features} is not a multiple of {params[1]}")

    @property
    def sparsity(self):
        """The weight's ir.types encoding, as the compiler records it."""
        kind, params = linear_kernel_format(self.kernel)
        if kind == "bsr":
            return BlockSparse(block=params, density=self.density)
        if kind in ("nm", "semi"):
            return NMSparse(n=params[0], m=params[1], density=params[0] / params[1])
        if kind == "unstructured":
            return Unstructured(density=self.density)
        return DENSE

    @property
    def layer(self) -> str:
        """The weight shape and token count (the compiler's decision is made per layer and count)."""
        return f"{self.out_features}x{self.in_features} {self.dtype}, {self.tokens} tokens"

    @property
    def label(self) -> str:
        kind = linear_kernel_format(self.kernel)[0]
        return f"{self.kernel}@{self.density:.2f}" if kind in ("bsr", "unstructured") else self.kernel

    def seconds(self, hardware: HardwareProfile) -> float:
        """The cost model's estimate (cost_models.estimate_linear_seconds)."""
        from sparsec.cost_models import estimate_linear_seconds

        return estimate_linear_seconds(self.tokens, self.out_features, self.in_features, self.dtype, self.sparsity,
                                       hardware, semi_structured=self.kernel.startswith("semi"))


def _candidates(shapes, tokens, densities, dtype: str, block: int, extra: Sequence[str],
                unstructured: Sequence[float] = ()) -> list[LinearCandidate]:
    out = []
    for N, K in shapes:
        for M in tokens:
            out.append(LinearCandidate(out_features=N, in_features=K, tokens=M, kernel="dense", dtype=dtype))
            out += [LinearCandidate(out_features=N, in_features=K, tokens=M, kernel=f"bsr{block}x{block}", density=d,
                                    dtype=dtype) for d in densities]
            out += [LinearCandidate(out_features=N, in_features=K, tokens=M, kernel=k, dtype=dtype) for k in extra]
            out += [LinearCandidate(out_features=N, in_features=K, tokens=M, kernel="unstructured", density=d,
                                    dtype=dtype) for d in unstructured]
    return out


def linear_grid(device: torch.device | str, *, quick: bool = False) -> list[LinearCandidate]:
    """The calibration grid for `device`: dense, 64 x 64 block-sparse at several densities and N:M
    for a few weight shapes and token counts (1 token: the GEMV; a few: the CPU's torch-BSR path
    and native kernels; many: the GEMMs); on a CPU whose native kernels load, scattered zeros too.
    Transformer-sized bf16 layers on CUDA, smaller fp32 ones on a CPU."""
    if torch.device(device).type == "cuda":
        if quick:
            return _candidates([(4096, 4096)], (256, 2048, 8192), (0.3, 0.6), "bf16", 64, ("nm2:4", "semi2:4"))
        return _candidates([(4096, 4096), (11008, 4096), (4096, 11008)], (16, 256, 2048, 8192), (0.3, 0.5, 0.7),
                           "bf16", 64, ("nm2:4", "semi2:4"))
    from sparsec.codegen.linear_cpu_native import native_linear_available

    native = native_linear_available()
    if quick:
        return _candidates([(1024, 1024), (2048, 2048)], (1, 16, 256, 1024), (0.2, 0.5), "f32", 64, ("nm2:4",),
                           (0.1, 0.4) if native else ())
    return _candidates([(1024, 1024), (2048, 2048), (4096, 1024), (1024, 4096)], (1, 8, 64, 512, 2048),
                       (0.1, 0.3, 0.5, 0.7), "f32", 64, ("nm2:4",), (0.1, 0.3, 0.6) if native else ())


# -- weights ------------------------------------------------------------------------------------------


def block_weight(N: int, K: int, block: tuple[int, int], density: float, dtype: torch.dtype,
                 device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
    """An N x K weight keeping round(density * blocks) random blocks of `block` (at least one)."""
    rows, cols = N // block[0], K // block[1]
    layout = torch.zeros(rows * cols, dtype=torch.bool)
    layout[torch.randperm(rows * cols, generator=generator)[:max(1, round(density * rows * cols))]] = True
    mask = layout.view(rows, cols).repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return (torch.randn(N, K, generator=generator) * mask).to(dtype=dtype, device=device)


def nm_weight(N: int, K: int, n: int, m: int, dtype: torch.dtype, device: torch.device | str = "cpu",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """An N x K weight keeping n random inputs of every m."""
    kept = torch.rand(N, K // m, m, generator=generator).argsort(dim=-1)[..., :n]
    mask = torch.zeros(N, K // m, m, dtype=torch.bool).scatter_(-1, kept, True).view(N, K)
    return (torch.randn(N, K, generator=generator) * mask).to(dtype=dtype, device=device)


def _weight(candidate: LinearCandidate, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    N, K, dtype = candidate.out_features, candidate.in_features, _TORCH_DTYPES[candidate.dtype]
    kind, params = linear_kernel_format(candidate.kernel)
    if kind == "bsr":
        return block_weight(N, K, params, candidate.density, dtype, device, generator)
    if kind in ("nm", "semi"):
        return nm_weight(N, K, params[0], params[1], dtype, device, generator)
    if kind == "unstructured":
        kept = torch.rand(N, K, generator=generator) < candidate.density
        return (torch.randn(N, K, generator=generator) * kept).to(device, dtype)
    return torch.randn(N, K, generator=generator).to(device, dtype)


# -- timing -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LinearMeasurement:
    candidate: LinearCandidate
    seconds: float
    samples: int


def _runner(candidate: LinearCandidate, device: torch.device, generator: torch.Generator,
            skip_unsupported: bool = False) -> Callable[[], torch.Tensor] | None:
    """The compiled model's call for the candidate, after one warm-up call that packs the weight and
    checks that the candidate's kernel (not the dense fallback) ran: an error when it did not, or
    with skip_unsupported a warning and None (the candidate is left out)."""
    from sparsec import linear_dispatch

    W = _weight(candidate, device, generator)
    x = torch.randn(candidate.tokens, candidate.in_features, generator=generator).to(device, W.dtype)
    kernel = candidate.kernel
    dense_before = linear_dispatch.kernel_calls["dense"]
    linear_dispatch.linear(x, W, None, kernel=kernel, site="calibration")
    if kernel != "dense" and linear_dispatch.kernel_calls["dense"] != dense_before:
        reason = (f"the {kernel} kernel did not run for {candidate.layer} on {device} (it fell back to dense: "
                  "see the sparsec.linear_dispatch debug log)")
        if not skip_unsupported:
            raise RuntimeError(f"measure_linear: {reason}")
        log.warning("measure_linear: %s; left out", reason)
        return None
    return lambda: linear_dispatch.linear(x, W, None, kernel=kernel, site="calibration")


def measure_linear(
    candidates: Sequence[LinearCandidate],
    device: torch.device | str | None = None,
    *,
    min_seconds: float = 0.05,
    max_samples: int = 15,
    statistic: str = "median",
    threads: int | None = None,
    seed: int = 0,
    progress: Callable[[int, int, LinearMeasurement], None] | None = None,
    skip_unsupported: bool = False,
) -> list[LinearMeasurement]:
    """Seconds of one call of each candidate on `device` (default: CUDA when present, else CPU),
    timed as cost_models.measure.measure times attention (the same options). A candidate whose
    kernel falls back to dense here (torch's semi-structured kernels on a GPU without them, say)
    is an error, or with skip_unsupported left out with a warning."""
    runner = functools.partial(_runner, skip_unsupported=skip_unsupported)
    return time_candidates("measure_linear", candidates, runner, LinearMeasurement, device,
                           min_seconds=min_seconds, max_samples=max_samples, statistic=statistic, threads=threads,
                           seed=seed, progress=progress)


# -- how good the compiler's choice is -------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LinearAccuracy:
    """How well predicted linear times order the measured ones (Spearman over every candidate) and
    the compiler's dense-or-sparse choice on each measured sparse weight and token count."""

    spearman: float
    right: int          # choices that took the measured faster of the two
    decisions: int
    mean_loss: float    # the chosen kernel's time over the faster one's, - 1, averaged (0: no decision)
    max_loss: float

    def as_dict(self) -> dict:
        return {"spearman": self.spearman, "right": self.right, "decisions": self.decisions,
                "mean_loss": self.mean_loss, "max_loss": self.max_loss}


def linear_accuracy(candidates: Sequence[LinearCandidate], predicted: Sequence[float],
                    measured: Sequence[float]) -> LinearAccuracy:
    """Spearman of predicted against measured times, and for each sparse candidate with a dense one
    of the same layer, the choice passes.choose_linear_kernels.beats_dense makes from the predicted
    times, scored against the measured ones."""
    from sparsec.cost_models.accuracy import spearman
    from sparsec.passes.choose_linear_kernels import beats_dense

    if not len(candidates) == len(predicted) == len(measured):
        raise ValueError(f"linear_accuracy: {len(candidates)} candidates, {len(predicted)} predicted and "
                         f"{len(measured)} measured times")
    dense = {c.layer: i for i, c in enumerate(candidates) if c.kernel == "dense"}
    losses, right = [], 0
    for i, c in enumerate(candidates):
        d = dense.get(c.layer)
        if c.kernel == "dense" or d is None:
            continue
        chosen = i if beats_dense(predicted[i], predicted[d]) else d
        best = min(measured[i], measured[d])
        right += measured[chosen] == best
        losses.append(measured[chosen] / best - 1.0)
    return LinearAccuracy(spearman=spearman(predicted, measured), right=int(right), decisions=len(losses),
                          mean_loss=float(np.mean(losses)) if losses else 0.0,
                          max_loss=float(np.max(losses)) if losses else 0.0)

