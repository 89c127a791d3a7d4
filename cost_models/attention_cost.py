"""Analytic cost of sparsec's attention kernels: what a launch really pays on a device.

The model follows the kernels, not the FLOP count (ANCHORS.md lesson 4):
  - work is counted per visited key block (BLOCK_M x BLOCK_N tile), full or partial, as
    `codegen.block_coverage` lists them — pairs a tile keeps beyond the pattern are paid for;
  - a partial block also pays the element mask (vector ALU work per pair);
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

__all__ = ["AttentionShape", "AttentionEstimate", "estimate_attention", "head_groups_by_family"]

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
    if len(head_patterns) != shape.num_heads:
        raise ValueError(f"got {len(head_patterns)} patterns for {shape.num_heads} heads")
    groups = head_groups if head_groups is not None else head_groups_by_family(head_patterns)
    seconds, launches, visited, partial = 0.0, 0, 0, 0
    for heads in groups.values():
        if not heads:
            continue
        launches += 1
        group_patterns = [head_patterns[h] for h in heads]
        if all(isinstance(p, Skip) for p in group_patterns):
            seconds += _skip_seconds(group_patterns, shape, hardware)
            continue
        program_costs, v_blocks, p_blocks = _program_costs(group_patterns, shape, hardware, block_m, block_n)
        seconds += _schedule(program_costs, hardware) + hardware.launch_overhead_s
        visited += v_blocks
        partial += p_blocks
    dense_blocks = shape.batch * shape.num_heads * math.ceil(shape.q_len / block_m) * math.ceil(shape.kv_len / block_n)
    return AttentionEstimate(seconds=seconds, launches=launches, visited_blocks=visited,
                             partial_blocks=partial, dense_blocks=dense_blocks)


def _coverage_counts(pattern: Pattern, shape: AttentionShape, block_m: int, block_n: int):
    """(full, partial) key blocks per query block, causal included."""
    from sparsec.codegen.block_coverage import block_coverage

    cov = block_coverage(pattern, shape.q_len, shape.kv_len, block_m, block_n, shape.causal)
    return (cov == 2).sum(dim=1).to(torch.float64), (cov == 1).sum(dim=1).to(torch.float64)


def _program_costs(patterns, shape: AttentionShape, hw: HardwareProfile, block_m: int, block_n: int):
    """Per-program seconds in grid order (query blocks fastest, then heads, then batch)."""
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
    per_pattern: dict[Pattern, tuple[torch.Tensor, int, int]] = {}
    per_head, visited, partial = [], 0, 0
    for p in patterns:
        if p not in per_pattern:
            if isinstance(p, Skip):
                per_pattern[p] = (torch.zeros(math.ceil(shape.q_len / block_m), dtype=torch.float64), 0, 0)
            else:
                full, part = _coverage_counts(p, shape, block_m, block_n)
                compute = (full + part) * block_compute + part * mask_seconds
                memory = ((full + part) * block_bytes + fixed_bytes) / sm_bandwidth
                per_pattern[p] = (torch.maximum(compute, memory), int((full + part).sum()), int(part.sum()))
        costs, v, pa = per_pattern[p]
        per_head.append(costs)
        visited += v * shape.batch
        partial += pa * shape.batch
    grid = torch.cat(per_head).repeat(shape.batch)
    return grid, visited, partial


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


def _skip_seconds(patterns, shape: AttentionShape, hw: HardwareProfile) -> float:
    bytes_per = _BYTES[shape.dtype]
    out_bytes = shape.batch * len(patterns) * shape.q_len * shape.value_dim * bytes_per
    reads_v = any(p.fill == "mean" for p in patterns)
    v_bytes = shape.batch * shape.num_kv_heads * shape.kv_len * shape.value_dim * bytes_per if reads_v else 0
    return (out_bytes + v_bytes) / (hw.memory_bandwidth * hw.memory_efficiency) + hw.launch_overhead_s
