"""Analytic cost of sparsec's attention kernels: what a launch really pays on a device.

The model follows the kernels, not the FLOP count (ANCHORS.md lesson 4):
  - work is counted per visited key block (BLOCK_M x BLOCK_N tile), full or partial, as
    `codegen.block_coverage` lists them — pairs a tile keeps beyond the pattern are paid for;
  - a partial block also pays the element mask (vector ALU work per pair); on the CPU executor,
    which runs a query block's visited keys as one call, every block of a masked query block does;
  - a program (one query block of one head) costs max(its tensor-core time, its exponential
    time, its K/V streaming time), plus a fixed per-block loop cost;
  - programs are dealt to SM slots in grid order, as the hardware block scheduler does, so wave
    quantization and imbalance (causal, uneven patterns) show up;
  - every launch pays the launch overhead, which is what makes head fusion worth it.
Skip heads cost the V read (fill="mean") or nothing but the output write (fill="zero").

For the search, which prices thousands of candidates per layer: pattern_counts counts many
patterns' tiles at once, program_seconds prices them as arrays, head_seconds_many gives each a
head's share of an all-heads launch, and makespan_estimate replaces the schedule simulation for
large launches (launch_seconds(exact_programs=...)). estimate_attention / price_attention keep
the exact schedule.
"""
from __future__ import annotations

import heapq
import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from sparsec.cost_models.hardware import HardwareProfile
from sparsec.patterns import Pattern, Skip

__all__ = ["AttentionShape", "AttentionEstimate", "AttentionWork", "EXACT_SCHEDULE_PROGRAMS", "LaunchWork",
           "attention_work", "estimate_attention", "head_groups_by_family", "head_seconds_many", "launch_seconds", "makespan_estimate",
           "pattern_counts", "price_attention", "program_seconds", "skip_seconds"]

_BYTES = {"f32": 4, "bf16": 2, "f16": 2}
# Launches of at most this many programs are scheduled exactly by head_seconds_many (and by the
# search's layer estimates); larger ones use makespan_estimate.
EXACT_SCHEDULE_PROGRAMS = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class AttentionShape:
    batch: int
    num_heads: int
    num_kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int
    dtype: str = "bf16"
    causal: bool = False

    def __post_init__(self):
        if self.dtype not in _BYTES:
            raise ValueError(f"AttentionShape dtype must be one of {sorted(_BYTES)}, got {self.dtype!r}")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")


@dataclass(frozen=True, slots=True, kw_only=True)
class AttentionEstimate:
    seconds: float
    launches: int
    visited_blocks: int          # (head, query block, key block) tiles computed, summed over the batch
    partial_blocks: int          # of which needed the element mask
    dense_blocks: int            # tiles a dense kernel would compute at the same tile size

    @property
    def block_density(self) -> float:
        return self.visited_blocks / self.dense_blocks if self.dense_blocks else 0.0


def head_groups_by_family(head_patterns: tuple[Pattern, ...]) -> dict[str, tuple[int, ...]]:
    """Heads that share a pattern family run in one launch (head fusion)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for h, p in enumerate(head_patterns):
        groups[p.family].append(h)
    return {family: tuple(heads) for family, heads in groups.items()}


def estimate_attention(
    head_patterns: tuple[Pattern, ...],
    shape: AttentionShape,
    hardware: HardwareProfile,
    *,
    block_m: int = 128,
    block_n: int = 64,
    head_groups: dict[str, tuple[int, ...]] | None = None,
) -> AttentionEstimate:
    """Seconds for one call of sparsec.attention with these per-head patterns on `hardware`.

    `head_groups` maps a launch name to the heads it runs; by default one launch per family.
    """
    work = attention_work(head_patterns, shape, block_m=block_m, block_n=block_n, head_groups=head_groups)
    return price_attention(work, hardware)


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchWork:
    """One kernel launch: per program in grid order (query blocks fastest, then heads, then batch),
    the key blocks it visits and how many of them are partial (need the element mask)."""

    heads: tuple[int, ...]
    visited: torch.Tensor               # float64 (programs,)
    partial: torch.Tensor               # float64 (programs,)
    computed: torch.Tensor              # float64 (programs,): 1 where the program loads Q and stores O,
                                        # 0 for a Skip head's program in a mixed launch (exits at once)
    skip_fills: tuple[str, ...] = ()    # set only for a launch of Skip heads: their fills


@dataclass(frozen=True, slots=True, kw_only=True)
class AttentionWork:
    """What a call does, independent of the device: the tiles every launch visits. Computing it
    is the expensive part of an estimate; pricing it on a profile is cheap, so measured autotuning
    computes the work of each candidate once and prices it for every trial set of coefficients."""

    shape: AttentionShape
    block_m: int
    block_n: int
    launches: tuple[LaunchWork, ...]

    @property
    def dense_blocks(self) -> int:
        s = self.shape
        return s.batch * s.num_heads * math.ceil(s.q_len / self.block_m) * math.ceil(s.kv_len / self.block_n)


def attention_work(
    head_patterns: tuple[Pattern, ...],
    shape: AttentionShape,
    *,
    block_m: int = 128,
    block_n: int = 64,
    head_groups: dict[str, tuple[int, ...]] | None = None,
) -> AttentionWork:
    """The tiles each launch visits for these per-head patterns (see estimate_attention)."""
    if len(head_patterns) != shape.num_heads:
        raise ValueError(f"got {len(head_patterns)} patterns for {shape.num_heads} heads")
    groups = head_groups if head_groups is not None else head_groups_by_family(head_patterns)
    launches = []
    for heads in groups.values():
        if not heads:
            continue
        group_patterns = [head_patterns[h] for h in heads]
        if all(isinstance(p, Skip) for p in group_patterns):
            empty = torch.zeros(0, dtype=torch.float64)
            launches.append(LaunchWork(heads=tuple(heads), visited=empty, partial=empty, computed=empty,
                                       skip_fills=tuple(p.fill for p in group_patterns)))
            continue
        visited, partial, computed = _program_blocks(group_patterns, shape, block_m, block_n)
        launches.append(LaunchWork(heads=tuple(heads), visited=visited, partial=partial, computed=computed))
    return AttentionWork(shape=shape, block_m=block_m, block_n=block_n, launches=tuple(launches))


def price_attention(work: AttentionWork, hardware: HardwareProfile) -> AttentionEstimate:
    """Seconds of `work` on `hardware`: each launch's programs priced and scheduled on the SMs."""
    seconds, visited, partial = 0.0, 0, 0
    for launch in work.launches:
        if launch.skip_fills:
            seconds += _skip_seconds(launch.skip_fills, work.shape, hardware)
            continue
        costs = _program_seconds(launch, work, hardware)
        seconds += _schedule(costs, hardware) + hardware.launch_overhead_s
        visited += int(launch.visited.sum())
        partial += int(launch.partial.sum())
    return AttentionEstimate(seconds=seconds, launches=len(work.launches), visited_blocks=visited,
                             partial_blocks=partial, dense_blocks=work.dense_blocks)


def _program_blocks(patterns, shape: AttentionShape, block_m: int, block_n: int):
    """(visited, partial, computed) per program in grid order; Skip heads in a mixed launch
    contribute programs that visit nothing and store nothing."""
    counts = pattern_counts(dict.fromkeys(patterns), shape, block_m, block_n)
    columns = [np.concatenate([counts[p][i] for p in patterns]) for i in range(3)]
    return tuple(torch.from_numpy(np.tile(column, shape.batch)) for column in columns)


def pattern_counts(patterns, shape: AttentionShape, block_m: int, block_n: int) -> dict[Pattern, tuple[np.ndarray, ...]]:
    """Per pattern, float64 numpy (visited, partial, computed) per query block of one head:
    key blocks visited, of which partial, and 1 where the program loads Q and stores O (0 for
    Skip). Counted for all patterns at once (block_coverage.coverage_counts_many)."""
    from sparsec.codegen.block_coverage import coverage_counts_many

    patterns = list(dict.fromkeys(patterns))
    full, partial = coverage_counts_many(patterns, shape.q_len, shape.kv_len, block_m, block_n, shape.causal)
    full, partial = full.astype(np.float64), partial.astype(np.float64)
    computed = np.ones(full.shape[1], dtype=np.float64)
    nothing = np.zeros(full.shape[1], dtype=np.float64)
    return {p: (nothing, nothing, nothing) if isinstance(p, Skip) else (full[n] + partial[n], partial[n], computed)
            for n, p in enumerate(patterns)}


def program_seconds(visited: np.ndarray, partial: np.ndarray, computed: np.ndarray, shape: AttentionShape,
                    block_m: int, block_n: int, hw: HardwareProfile) -> np.ndarray:
    """Per-program seconds (float64 numpy, any shape): max(compute, K/V streaming) over the
    blocks each program visits."""
    bytes_per = _BYTES[shape.dtype]
    sm_flops = hw.flops(shape.dtype) * hw.matmul_efficiency / hw.sm_count
    sm_exp = hw.exp_per_s / hw.sm_count
    sm_vector = hw.vector_flops / hw.sm_count
    sm_bandwidth = hw.memory_bandwidth * hw.memory_efficiency / hw.sm_count
    pairs = block_m * block_n
    # The exponentials run on the special-function units while tensor cores do the dots: they overlap.
    block_compute = max(2 * pairs * (shape.head_dim + shape.value_dim) / sm_flops, pairs / sm_exp) + hw.block_overhead_s
    block_bytes = block_n * (shape.head_dim + shape.value_dim) * bytes_per
    mask_seconds = pairs * hw.mask_cost_per_pair / sm_vector
    fixed_bytes = block_m * (shape.head_dim + shape.value_dim) * bytes_per  # Q in, O out
    masked = np.where(partial > 0, visited, 0.0) if hw.masks_whole_query_block else partial
    compute = visited * block_compute + masked * mask_seconds
    memory = (visited * block_bytes + computed * fixed_bytes) / sm_bandwidth
    return np.maximum(compute, memory)


def _program_seconds(launch: LaunchWork, work: AttentionWork, hw: HardwareProfile) -> np.ndarray:
    return program_seconds(launch.visited.numpy(), launch.partial.numpy(), launch.computed.numpy(),
                           work.shape, work.block_m, work.block_n, hw)


def makespan_estimate(total: float, longest: float, hw: HardwareProfile) -> float:
    """What _schedule returns for programs summing to `total` seconds, the longest `longest`,
    without simulating them: the load-balanced time plus half the longest program (the last wave
    runs half full on average), never below the longest. Within about 3% of the list schedule
    from 8 waves on (1% from 15), on causal, banded and block-sparse launches."""
    return max(longest, total / (hw.sm_count * hw.programs_per_sm) + longest / 2)


def launch_seconds(head_costs, shape: AttentionShape, hardware: HardwareProfile, *,
                   exact_programs: int | None = None, totals=None) -> float:
    """Seconds of one launch whose heads have per-query-block program costs `head_costs` (a list
    of (nqb,) arrays, one a head, in launch order), launch overhead included: price_attention's
    schedule (grid order: query blocks, heads, batch). With `exact_programs`, launches of more
    programs than that use makespan_estimate instead of the list schedule; `totals`, one
    (sum, max) per head, saves reducing the costs again."""
    programs = shape.batch * sum(c.shape[0] for c in head_costs)
    if exact_programs is not None and programs > exact_programs:
        totals = totals or [(float(c.sum()), float(c.max())) for c in head_costs]
        seconds = makespan_estimate(shape.batch * sum(t for t, _ in totals), max(m for _, m in totals), hardware)
    else:
        seconds = _schedule(np.tile(np.concatenate(head_costs), shape.batch), hardware)
    return seconds + hardware.launch_overhead_s


def head_seconds_many(patterns, shape: AttentionShape, hardware: HardwareProfile, *, block_m: int, block_n: int,
                      exact_programs: int | None = EXACT_SCHEDULE_PROGRAMS) -> list[float]:
    """Per pattern p, one head's share of a launch that runs p on every head of `shape`, launch
    overhead excluded (what the search prices a head's option at): that of
    estimate_attention((p,) * H, ..., head_groups={"all": heads}), less the overhead, over H.
    Launches of more than `exact_programs` programs use makespan_estimate (a heap over SM slots
    costs ~0.3 us a program: too much for thousands of candidates at 16K)."""
    patterns = list(patterns)
    heads = shape.num_heads
    counts = pattern_counts([p for p in patterns if not isinstance(p, Skip)], shape, block_m, block_n)
    found = []
    for p in patterns:
        if isinstance(p, Skip):
            seconds = _skip_seconds((p.fill,) * heads, shape, hardware)
        else:
            costs = program_seconds(*counts[p], shape, block_m, block_n, hardware)
            seconds = launch_seconds([costs] * heads, shape, hardware, exact_programs=exact_programs,
                                     totals=[(float(costs.sum()), float(costs.max()))] * heads)
        found.append(max(0.0, seconds - hardware.launch_overhead_s) / heads)
    return found


def _schedule(program_costs, hw: HardwareProfile) -> float:
    """Makespan of programs (a 1-D tensor or array of seconds) dealt in grid order to the first
    free SM slot."""
    slots = hw.sm_count * hw.programs_per_sm
    costs = program_costs.tolist()
    if len(costs) <= slots:
        return max(costs, default=0.0) if costs else 0.0
    if max(costs) - min(costs) <= 1e-12 * max(costs):  # uniform programs: closed form (waves)
        return math.ceil(len(costs) / slots) * costs[0]
    finish = [0.0] * slots
    replace = heapq.heapreplace
    for c in costs:
        replace(finish, finish[0] + c)  # the first free slot takes the next program
    return max(finish)


def skip_seconds(fills: tuple[str, ...], shape: AttentionShape, hw: HardwareProfile) -> float:
    """Seconds of a launch of Skip heads with these fills, launch overhead included."""
    return _skip_seconds(fills, shape, hw)


def _skip_seconds(fills: tuple[str, ...], shape: AttentionShape, hw: HardwareProfile) -> float:
    bytes_per = _BYTES[shape.dtype]
    out_bytes = shape.batch * len(fills) * shape.q_len * shape.value_dim * bytes_per
    reads_v = "mean" in fills
    v_bytes = shape.batch * shape.num_kv_heads * shape.kv_len * shape.value_dim * bytes_per if reads_v else 0
    return (out_bytes + v_bytes) / (hw.memory_bandwidth * hw.memory_efficiency) + hw.launch_overhead_s
