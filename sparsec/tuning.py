"""Tune attention layers from recorded q, k, v: calibration -> candidates -> search -> Plan.

    plan = tune_layers({"blocks.0.attn": [LayerSample(q, k, v, causal=True)], ...},
                       target="h100", budget=0.02)

For each layer: pooled attention statistics (passes/attention_stats.py), per-head candidates
(passes/fit_candidates.py) less those the search could never pick (priced above 90% of dense at
every tile size; search_patterns.useful_candidates), their measured output errors, and the
cost-model search over patterns, head groups and tiles (passes/search_patterns.py), whose choice
is verified by recomputing the layer's error exactly. Work per layer is a few batched passes over
all heads, never an S x S map per head on the host: stats in query chunks, fitting batched over
heads on the statistics' device, one sparsec.attention call per candidate round, and cost-model
prices computed for all candidates of a tile size at once and cached across heads and layers of
one shape.

`timings` (a dict) collects seconds per phase, summed over layers: "stats", "measure" and
"verify" are tensor work (attention on the calibration inputs, which a GPU does quickly); "prune"
and "search" are host work (cost-model pricing, knapsack, head groups); "fit" is both: sorts and
scans of the statistics on their device, then building the patterns on the host (on a CPU run
the first part dominates it). bench/tune.py reports the split.

`measure_errors` replaces the measurement: a callable (MeasureErrors) given the layer's samples,
its statistics and every head's candidate patterns (head order), returning one HeadCandidates
per head. Its errors are taken as they are: the "measure" phase times the callable and no
"verify" pass runs (a plan's error is then the sum of its heads' errors). bench/tune.py passes
an error proxy read from the statistics, to time the host work at shapes whose attention the
machine cannot run.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from sparsec.cost_models.attention_cost import AttentionShape
from sparsec.cost_models.hardware import HardwareProfile, get_profile
from sparsec.passes.attention_stats import AttentionStats, LayerSample, sample_stats
from sparsec.passes.fit_candidates import (
    DEFAULT_RECALLS, HeadCandidates, dense_outputs, error_backend, fit_candidates, measure_candidates,
)
from sparsec.passes.search_patterns import DEFAULT_BLOCK_SIZES, CostTable, search_layer, useful_candidates
from sparsec.patterns import Pattern
from sparsec.plan import LayerPlan, Plan

__all__ = ["LayerSample", "MeasureErrors", "tune_layers", "tune_layer"]

log = logging.getLogger(__name__)

_DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}

# measure_errors(samples, stats, head_patterns) -> one HeadCandidates per head, in head order:
# head_patterns[h] are head h's candidates (Dense first), and its HeadCandidates gives a squared
# output error for each pattern it lists, with the head's dense squared norm.
MeasureErrors = Callable[[Sequence[LayerSample], AttentionStats, Sequence[tuple[Pattern, ...]]],
                         Sequence[HeadCandidates]]


def tune_layers(
    recorded: Mapping[str, Sequence[LayerSample]],
    *,
    target: str | HardwareProfile = "h100",
    budget: float = 0.02,
    block_sizes: Sequence[tuple[int, int]] = DEFAULT_BLOCK_SIZES,
    progress: bool = True,
    model_fingerprint: str = "",
    recalls: Sequence[float] = DEFAULT_RECALLS,
    backend: str | None = None,
    timings: dict[str, float] | None = None,
    measure_errors: MeasureErrors | None = None,
) -> Plan:
    """A Plan for every recorded layer (module path -> its recorded calls), for `target`
    within `budget` (relative L2 error of each layer's attention output). `timings`, if given,
    receives seconds per phase summed over the layers; `measure_errors`, if given, replaces the
    candidates' error measurement (see the module docstring)."""
    from tqdm.auto import tqdm

    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not budget >= 0:
        raise ValueError(f"tune_layers: budget must be a non-negative number, got {budget!r}")
    _check_measure_errors(measure_errors, "tune_layers")
    hardware = get_profile(target)
    costs = CostTable(hardware)
    layers = {}
    for path, samples in tqdm(recorded.items(), desc="sparsec tune", unit="layer", disable=not progress):
        layers[path] = tune_layer(samples, costs, budget=budget, block_sizes=block_sizes, recalls=recalls,
                                  backend=backend, name=path, timings=timings, measure_errors=measure_errors)
    return Plan(target=hardware.name, budget=float(budget), model_fingerprint=model_fingerprint, layers=layers)


def tune_layer(
    samples: Sequence[LayerSample],
    costs: CostTable,
    *,
    budget: float,
    block_sizes: Sequence[tuple[int, int]] = DEFAULT_BLOCK_SIZES,
    recalls: Sequence[float] = DEFAULT_RECALLS,
    backend: str | None = None,
    name: str = "layer",
    timings: dict[str, float] | None = None,
    measure_errors: MeasureErrors | None = None,
) -> LayerPlan:
    """One layer's plan from its recorded calls. `measure_errors`: see tune_layers."""
    _check_measure_errors(measure_errors, "tune_layer")
    shape = _layer_shape(samples, name)
    started = time.perf_counter()
    phase = _Phases(timings, samples[0].q.device)
    with phase("stats"):
        stats = sample_stats(samples, block=_stats_block(block_sizes))
    with phase("fit"):
        fitted = fit_candidates(stats, tiles=block_sizes, recalls=recalls)
    with phase("prune"):
        fitted = useful_candidates(fitted, shape, costs, block_sizes)
    with phase("measure"):
        if measure_errors is None:
            dense = dense_outputs(samples, backend=backend)
            candidates = measure_candidates(samples, fitted, backend=backend, dense=dense)

            def verify(patterns):
                with phase("verify"):
                    return layer_squared_error(samples, patterns, backend=backend, dense=dense)
        else:  # the hook's errors are the only ones there are: nothing to verify against
            candidates, verify = _hooked_candidates(measure_errors(samples, stats, fitted), shape, name), None
    dense_norm2 = sum(c.dense_norm2 for c in candidates)

    with phase("search", excluding="verify"):
        choice = search_layer(candidates, shape, costs, budget=budget, block_sizes=block_sizes, verify=verify)
    error = math.sqrt(choice.squared_error / dense_norm2) if dense_norm2 > 0 else 0.0
    log.info("%s: %d candidates/head on average, error %.4f, %.3g s -> %.3g s (tuned in %.2f s)", name,
             sum(len(c.patterns) for c in candidates) // len(candidates), error, choice.dense_seconds,
             choice.seconds, time.perf_counter() - started)
    return LayerPlan(patterns=choice.patterns, head_groups=choice.head_groups, tiles=choice.tiles, error=error,
                     dense_seconds=choice.dense_seconds, sparse_seconds=choice.seconds,
                     num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads, q_len=shape.q_len,
                     kv_len=shape.kv_len, head_dim=shape.head_dim, dtype=shape.dtype, causal=shape.causal)


def layer_squared_error(samples: Sequence[LayerSample], patterns: Sequence[Pattern], *, backend: str | None = None,
                        dense: Sequence[torch.Tensor] | None = None) -> float:
    """||O(patterns) - O(dense)||^2 of the whole layer, summed over the samples, computed exactly.
    `dense`: the samples' dense outputs, if already computed."""
    from sparsec.attention_dispatch import attention

    dense = dense_outputs(samples, backend=backend) if dense is None else dense
    total = 0.0
    for s, reference in zip(samples, dense):
        sparse = attention(s.q, s.k, s.v, list(patterns), causal=s.causal, scale=s.scale,
                           backend=backend or error_backend(s.q), softcap=s.softcap, sinks=s.sinks)
        total += float((sparse.double() - reference.double()).square().sum())
    return total


class _Phases:
    """Context managers that add a phase's wall time to `timings[name]` (synchronizing CUDA so
    queued kernels count in their phase); `excluding` subtracts time spent in an inner phase."""

    def __init__(self, timings: dict[str, float] | None, device: torch.device):
        self.timings, self.device = timings, device

    @contextlib.contextmanager
    def __call__(self, name: str, *, excluding: str | None = None):
        if self.timings is None:
            yield
            return
        self._sync()
        inner = self.timings.get(excluding, 0.0) if excluding else 0.0
        started = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            spent = time.perf_counter() - started
            if excluding:
                spent -= self.timings.get(excluding, 0.0) - inner
            self.timings[name] = self.timings.get(name, 0.0) + spent

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _check_measure_errors(measure_errors: MeasureErrors | None, caller: str) -> None:
    if measure_errors is not None and not callable(measure_errors):
        raise TypeError(f"{caller}: measure_errors must be a callable (samples, stats, head_patterns) -> "
                        f"HeadCandidates per head, or None; got {type(measure_errors).__name__}")


def _hooked_candidates(found: Sequence[HeadCandidates], shape: AttentionShape, name: str) -> list[HeadCandidates]:
    """measure_errors' answer, checked: one HeadCandidates per head, an error for each pattern."""
    found = list(found)
    if len(found) != shape.num_heads or not all(isinstance(c, HeadCandidates) for c in found):
        raise ValueError(f"tune: layer {name!r}: measure_errors must return one HeadCandidates per head "
                         f"({shape.num_heads}), got {[type(c).__name__ for c in found]}")
    for h, c in enumerate(found):
        if len(c.squared_errors) != len(c.patterns):
            raise ValueError(f"tune: layer {name!r}: measure_errors gave head {h} {len(c.squared_errors)} errors "
                             f"for {len(c.patterns)} patterns")
    return found


def _stats_block(block_sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The statistics block: divides every tile, so each tile's block mass is a pooling of it."""
    if not block_sizes:
        raise ValueError("tune: block_sizes is empty")
    for t in block_sizes:
        if len(t) != 2 or not all(isinstance(b, int) and b > 0 for b in t):
            raise ValueError(f"tune: each block size must be two positive ints (block_m, block_n), got {t!r}")
    return math.gcd(*(t[0] for t in block_sizes)), math.gcd(*(t[1] for t in block_sizes))


def _layer_shape(samples: Sequence[LayerSample], name: str) -> AttentionShape:
    """The layer's shape, checking that its recorded calls agree on it."""
    if not samples:
        raise ValueError(f"tune: layer {name!r} has no recorded samples")
    signatures = {_signature(s, name) for s in samples}
    if len(signatures) > 1:
        raise ValueError(f"tune: the recorded calls of layer {name!r} differ in shape, dtype, causal, scale, softcap "
                         "or sinks: "
                         f"{sorted(signatures, key=str)}")
    heads, kv_heads, q_len, kv_len, head_dim, value_dim, dtype, causal, _, softcap, sinks = signatures.pop()
    return AttentionShape(batch=samples[0].q.shape[0], num_heads=heads, num_kv_heads=kv_heads, q_len=q_len,
                          kv_len=kv_len, head_dim=head_dim, value_dim=value_dim, dtype=dtype, causal=causal,
                          softcap=softcap, sinks=sinks is not None)


def _signature(s: LayerSample, name: str) -> tuple:
    if not isinstance(s, LayerSample):
        raise TypeError(f"tune: layer {name!r}: samples must be LayerSample, got {type(s).__name__}")
    if any(not isinstance(t, torch.Tensor) or t.dim() != 4 for t in (s.q, s.k, s.v)):
        raise ValueError(f"tune: layer {name!r}: q, k, v must be 4-D tensors (B, H, S, D)")
    if s.q.dtype not in _DTYPE_NAMES:
        raise ValueError(f"tune: layer {name!r}: dtype {s.q.dtype} is not supported; use one of {list(_DTYPE_NAMES)}")
    (_, H, Sq, D), (_, Hkv, Sk, _), Dv = s.q.shape, s.k.shape, s.v.shape[-1]
    sinks = None if s.sinks is None else tuple(s.sinks.tolist())
    return (H, Hkv, Sq, Sk, D, Dv, _DTYPE_NAMES[s.q.dtype], bool(s.causal), s.scale, s.softcap, sinks)
