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
"""
from __future__ import annotations

import heapq
import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from sparsec.cost_models.hardware import HardwareProfile
from sparsec.patterns import Pattern, Skip

__all__ = ["AttentionShape", "AttentionEstimate", "AttentionWork", "LaunchWork", "attention_work",
           "estimate_attention", "head_groups_by_family", "price_attention"]

_BYTES = {"f32": 4, "bf16": 2, "f16": 2}


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


def _coverage_counts(pattern: Pattern, shape: AttentionShape, block_m: int, block_n: int):
    """(full, partial) key blocks per query block, causal included."""
    from sparsec.codegen.block_coverage import block_coverage

    cov = block_coverage(pattern, shape.q_len, shape.kv_len, block_m, block_n, shape.causal)
    return (cov == 2).sum(dim=1).to(torch.float64), (cov == 1).sum(dim=1).to(torch.float64)


def _program_blocks(patterns, shape: AttentionShape, block_m: int, block_n: int):
    """(visited, partial, computed) per program in grid order; Skip heads in a mixed launch
    contribute programs that visit nothing and store nothing."""
    per_pattern: dict[Pattern, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    columns: tuple[list, list, list] = ([], [], [])
    for p in patterns:
        if p not in per_pattern:
            programs = math.ceil(shape.q_len / block_m)
            if isinstance(p, Skip):
                nothing = torch.zeros(programs, dtype=torch.float64)
                per_pattern[p] = (nothing, nothing, nothing)
            else:
                full, part = _coverage_counts(p, shape, block_m, block_n)
                per_pattern[p] = (full + part, part, torch.ones(programs, dtype=torch.float64))
        for column, values in zip(columns, per_pattern[p]):
            column.append(values)
    return tuple(torch.cat(column).repeat(shape.batch) for column in columns)


def _program_seconds(launch: LaunchWork, work: AttentionWork, hw: HardwareProfile) -> torch.Tensor:
    """Per-program seconds: max(compute, K/V streaming) over the blocks it visits."""
    shape, block_m, block_n = work.shape, work.block_m, work.block_n
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
    masked = torch.where(launch.partial > 0, launch.visited, 0.0) if hw.masks_whole_query_block else launch.partial
    compute = launch.visited * block_compute + masked * mask_seconds
    memory = (launch.visited * block_bytes + launch.computed * fixed_bytes) / sm_bandwidth
    return torch.maximum(compute, memory)


def _schedule(program_costs: torch.Tensor, hw: HardwareProfile) -> float:
    """Makespan of programs dealt in grid order to the first free SM slot."""
    slots = hw.sm_count * hw.programs_per_sm
    costs = program_costs.tolist()
    if len(costs) <= slots:
        return max(costs, default=0.0) if costs else 0.0
    if max(costs) - min(costs) <= 1e-12 * max(costs):  # uniform programs: closed form (waves)
        return math.ceil(len(costs) / slots) * costs[0]
    finish = [0.0] * slots
    for c in costs:
        t = heapq.heappop(finish)
        heapq.heappush(finish, t + c)
    return max(finish)


def _skip_seconds(fills: tuple[str, ...], shape: AttentionShape, hw: HardwareProfile) -> float:
    bytes_per = _BYTES[shape.dtype]
    out_bytes = shape.batch * len(fills) * shape.q_len * shape.value_dim * bytes_per
    reads_v = "mean" in fills
    v_bytes = shape.batch * shape.num_kv_heads * shape.kv_len * shape.value_dim * bytes_per if reads_v else 0
    return (out_bytes + v_bytes) / (hw.memory_bandwidth * hw.memory_efficiency) + hw.launch_overhead_s
