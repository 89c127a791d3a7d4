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

A profile whose executor is "cpu" prices codegen/attention_cpu.py instead, which reads each query
block's exact keys (no key tiles) as a few SDPA calls: counts come from
codegen.attention_cpu_reads (pairs read, of which masked, keys gathered, calls), a pair costs
the fp32 dot products and exponential at the kernel's speed for that many query rows
(query_rows_speed, by the profile's query_rows_exponent: torch's kernel splits a call's queries in
chunks that grow with them), a query
row its softmax finish and output (row_overhead_s: what narrow patterns mostly pay), gathers
cost their bytes at a copy speed, and every SDPA call pays call_overhead_s.

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
from typing import NamedTuple

import numpy as np
import torch

from sparsec.cost_models.hardware import EXECUTORS, HardwareProfile
from sparsec.patterns import Dense, Pattern, Skip

__all__ = [
    "AttentionShape", "AttentionEstimate", "AttentionWork", "BlockCounts", "EXACT_SCHEDULE_PROGRAMS", "LaunchWork",
    "attention_work", "counts_seconds", "cpu_option_counts", "cpu_option_seconds", "estimate_attention",
    "fixed_seconds", "head_groups_by_family", "head_price", "head_seconds_many", "head_share", "launch_seconds",
    "makespan_estimate", "native_lane_seconds", "native_row_seconds", "pattern_counts", "planned_on_cpu",
    "price_attention", "program_seconds", "query_rows_speed", "skip_seconds",
]

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
    softcap: float = 0.0  # > 0: capped scores (Gemma 2); the cpu executor runs them on its native kernels
    sinks: bool = False   # sink logits (GPT-OSS): the same

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
    partial_blocks: int          # of which needed the element mask (cpu executor: both in (query, key) pairs)
    dense_blocks: int            # tiles a dense kernel would compute at the same tile size (cpu executor: pairs)

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
    block_m: int | None = 128,
    block_n: int = 64,
    head_groups: dict[str, tuple[int, ...]] | None = None,
) -> AttentionEstimate:
    """Seconds for one call of sparsec.attention with these per-head patterns on `hardware`.

    `head_groups` maps a launch name to the heads it runs; by default one launch per family.
    block_m None (cpu executor only): each pattern at the query block the executor picks for it.
    """
    work = attention_work(head_patterns, shape, block_m=block_m, block_n=block_n, head_groups=head_groups,
                          executor=hardware.executor)
    return price_attention(work, hardware)


class BlockCounts(NamedTuple):
    """One head's programs (query blocks) for one pattern, float64 numpy (nqb,) each.
    Triton: key tiles visited, of which partial, and 1 where the program loads Q and stores O.
    cpu executor: (query, key) pairs read, of which masked, query rows computed (each part's
    rows: a split pattern computes a row once a part), keys gathered, the query rows of the call
    that runs the block (blocks folded into one call count together; a pattern split in parts:
    their geometric mean weighted by pairs), and the pattern's SDPA calls."""

    visited: np.ndarray
    partial: np.ndarray
    computed: np.ndarray
    gathered: np.ndarray | None = None
    call_rows: np.ndarray | None = None
    calls: int = 0
    native: bool = False  # cpu executor: run on a native kernel (its plan pays native_overhead_s)
    moved: np.ndarray | None = None  # cpu executor: rows copied by a frame-transposed order, as gathers
    distinct: np.ndarray | None = None  # cpu executor, native: the K / V rows a vertical-slash's lanes read


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchWork:
    """One kernel launch: per program in grid order (query blocks fastest, then heads, then batch),
    the key blocks it visits and how many of them are partial (need the element mask)."""

    heads: tuple[int, ...]
    visited: torch.Tensor               # float64 (programs,)
    partial: torch.Tensor               # float64 (programs,)
    computed: torch.Tensor              # float64 (programs,): 1 where the program loads Q and stores O,
                                        # 0 for a Skip head's program in a mixed launch (exits at once);
                                        # cpu executor: the query rows it computes (BlockCounts)
    skip_fills: tuple[str, ...] = ()    # set only for a launch of Skip heads: their fills
    gathered: torch.Tensor | None = None  # cpu executor (see BlockCounts): keys gathered per program
    moved: torch.Tensor | None = None     # cpu executor: rows a frame-transposed order copies per program
    distinct: torch.Tensor | None = None  # cpu executor: K / V rows the native slash lanes read per program
    call_rows: torch.Tensor | None = None  # cpu executor: query rows of each program's call
    calls: int = 0                        # cpu executor: SDPA calls of the launch
    plans: int = 1                        # cpu executor: distinct patterns, each run on its own
    native_plans: int = 0                 # cpu executor: of those, run on a native kernel


@dataclass(frozen=True, slots=True, kw_only=True)
class AttentionWork:
    """What a call does, independent of the device: the tiles every launch visits. Computing it
    is the expensive part of an estimate; pricing it on a profile is cheap, so measured autotuning
    computes the work of each candidate once and prices it for every trial set of coefficients."""

    shape: AttentionShape
    block_m: int | None
    block_n: int
    launches: tuple[LaunchWork, ...]
    executor: str = "triton"

    @property
    def dense_blocks(self) -> int:
        """What a dense call would read in the units of the launches' `visited`: key tiles (Triton),
        (query, key) pairs (the cpu executor)."""
        s = self.shape
        if self.executor == "cpu":
            return s.batch * s.num_heads * s.q_len * s.kv_len
        return s.batch * s.num_heads * math.ceil(s.q_len / self.block_m) * math.ceil(s.kv_len / self.block_n)


def attention_work(
    head_patterns: tuple[Pattern, ...],
    shape: AttentionShape,
    *,
    block_m: int | None = 128,
    block_n: int = 64,
    head_groups: dict[str, tuple[int, ...]] | None = None,
    executor: str = "triton",
    native: bool | None = None,
) -> AttentionWork:
    """The tiles each launch visits for these per-head patterns (see estimate_attention), on the
    Triton kernels or (executor "cpu") what the CPU executor reads; native (cpu): as
    cpu_attention's, forces the native interval kernel on or off (None: the executor's choice)."""
    if executor not in EXECUTORS:
        raise ValueError(f"attention_work: executor must be one of {EXECUTORS}, got {executor!r}")
    if block_m is None and executor != "cpu":
        raise ValueError("attention_work: block_m None (the executor's own choice) is for the cpu executor only")
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
        launches.append(_launch_work(tuple(heads), group_patterns, shape, block_m, block_n, executor, native))
    return AttentionWork(shape=shape, block_m=block_m, block_n=block_n, launches=tuple(launches), executor=executor)


def price_attention(work: AttentionWork, hardware: HardwareProfile) -> AttentionEstimate:
    """Seconds of `work` on `hardware`: each launch's programs priced and scheduled on the SMs."""
    seconds, visited, partial = 0.0, 0, 0
    for launch in work.launches:
        if launch.skip_fills:
            seconds += _skip_seconds(launch.skip_fills, work.shape, hardware)
            continue
        costs = _program_seconds(launch, work, hardware)
        seconds += _schedule(costs, hardware) + fixed_seconds(hardware, plans=launch.plans - launch.native_plans,
                                                              calls=launch.calls, native_plans=launch.native_plans)
        visited += int(launch.visited.sum())
        partial += int(launch.partial.sum())
    return AttentionEstimate(seconds=seconds, launches=len(work.launches), visited_blocks=visited,
                             partial_blocks=partial, dense_blocks=work.dense_blocks)


def _launch_work(heads: tuple[int, ...], patterns, shape: AttentionShape, block_m: int | None, block_n: int,
                 executor: str, native: bool | None = None) -> LaunchWork:
    """One launch's programs in grid order; Skip heads in a mixed launch contribute programs that
    visit nothing and store nothing. The cpu executor plans each distinct pattern once for all
    its heads, so each distinct pattern's calls count once."""
    distinct = list(dict.fromkeys(patterns))
    counts = pattern_counts(distinct, shape, block_m, block_n, executor=executor, native=native)
    fields = ("visited", "partial", "computed") + (("gathered", "call_rows", "moved", "distinct") if executor == "cpu"
                                                   else ())
    columns = {name: np.concatenate([getattr(counts[p], name) for p in patterns]) for name in fields}
    columns = {name: torch.from_numpy(np.tile(column, shape.batch)) for name, column in columns.items()}
    plans = sum(planned_on_cpu(p, shape) for p in distinct) if executor == "cpu" else 1
    return LaunchWork(heads=heads, calls=sum(counts[p].calls for p in distinct), plans=plans,
                      native_plans=sum(counts[p].native for p in distinct), **columns)


def pattern_counts(patterns, shape: AttentionShape, block_m: int | None, block_n: int, *,
                   executor: str = "triton", native: bool | None = None) -> dict[Pattern, BlockCounts]:
    """Per pattern, its BlockCounts for one head. Triton: counted for all patterns at once
    (block_coverage.coverage_counts_many); Skip heads' programs do nothing. cpu executor:
    codegen.attention_cpu_reads, at block_m or (None) the executor's choice per pattern (native:
    see attention_work)."""
    if executor == "cpu":
        return {p: _cpu_counts(p, shape, block_m, native) for p in dict.fromkeys(patterns)}
    from sparsec.codegen.block_coverage import coverage_counts_many

    patterns = list(dict.fromkeys(patterns))
    full, partial = coverage_counts_many(patterns, shape.q_len, shape.kv_len, block_m, block_n, shape.causal)
    full, partial = full.astype(np.float64), partial.astype(np.float64)
    computed = np.ones(full.shape[1], dtype=np.float64)
    nothing = np.zeros(full.shape[1], dtype=np.float64)
    return {p: BlockCounts(nothing, nothing, nothing) if isinstance(p, Skip) else
            BlockCounts(full[n] + partial[n], partial[n], computed) for n, p in enumerate(patterns)}


def _cpu_counts(pattern: Pattern, shape: AttentionShape, block_m: int | None,
                native: bool | None = None) -> BlockCounts:
    """The cpu executor's work for one head of `pattern`, run whole or as disjoint parts the way
    the executor decides (codegen.attention_cpu_choice.choose_split, for all heads and the batch
    at once): cpu_option_counts of its choice."""
    from sparsec.codegen.attention_cpu_choice import choose_split

    frames = None
    if (shape.softcap or shape.sinks) and native is None:  # torch's kernel has neither: the native kernels
        native, frames = True, False
    bm, parts = choose_split(pattern, shape.q_len, shape.kv_len, shape.causal, block_m,
                             rows=shape.batch * shape.num_heads, width=shape.head_dim + shape.value_dim,
                             threads=torch.get_num_threads(), native=native, frames=frames)
    return cpu_option_counts(parts, shape, bm)


def cpu_option_counts(parts: tuple[Pattern, ...], shape: AttentionShape, block_m: int) -> BlockCounts:
    """The cpu executor's work for one head run as `parts` (disjoint; one part: the pattern
    whole) at query blocks of block_m rows (a native part: its kernel's tiles): the parts' counts
    add up, merging each part after the first copies its rows' outputs once more, and
    frame-transposed parts (codegen.frame_order; on torch's kernel or a native one) move q and
    the output rows once each, K and V once (`moved`, priced as gathered keys of the same
    bytes)."""
    from sparsec.codegen.attention_cpu_native import Native
    from sparsec.codegen.frame_order import FramesTransposed

    Sq, Sk, causal, bm = shape.q_len, shape.kv_len, shape.causal, block_m
    counts = [_cpu_part_counts(part, Sq, Sk, bm, causal) for part in parts]
    tiles = counts[0].visited.shape[0]
    rows = np.minimum(bm, Sq - np.arange(tiles) * bm)
    first = parts[0].pattern if isinstance(parts[0], Native) else parts[0]
    moved = rows + Sk / tiles if isinstance(first, FramesTransposed) else np.zeros(tiles)
    if len(counts) == 1:
        return counts[0]._replace(moved=moved)  # (a native option is one part)
    visited = sum(c.visited for c in counts)
    log_rows = sum(c.visited * np.log(c.call_rows) for c in counts)
    merged_keys = (len(parts) - 1) * rows * 2 * shape.value_dim / (shape.head_dim + shape.value_dim)
    call_rows = np.exp(np.divide(log_rows, visited, out=np.zeros_like(visited), where=visited > 0))
    return BlockCounts(visited, sum(c.partial for c in counts), sum(c.computed for c in counts),
                       sum(c.gathered for c in counts) + merged_keys, call_rows, sum(c.calls for c in counts),
                       moved=moved, distinct=np.zeros_like(visited))


def cpu_option_seconds(parts: tuple[Pattern, ...], shape: AttentionShape, block_m: int,
                       hardware: HardwareProfile) -> float:
    """Estimated seconds of the cpu executor running every head of `shape` as `parts` at query
    blocks of block_m rows (cpu_option_counts, priced as a launch prices them, less the plan's
    launch overhead, which every option on torch's kernel pays once; a native one pays its own
    instead): what codegen.attention_cpu_choice compares."""
    counts = cpu_option_counts(parts, shape, block_m)
    programs = counts_seconds(counts, shape, None, min(128, shape.kv_len), hardware)
    heads = shape.batch * shape.num_heads
    native = (hardware.native_overhead_s - hardware.launch_overhead_s) if counts.native else 0.0
    return (makespan_estimate(heads * float(programs.sum()), float(programs.max(initial=0.0)), hardware)
            + fixed_seconds(hardware, plans=0, calls=counts.calls) + native)


def _cpu_part_counts(pattern: Pattern, Sq: int, Sk: int, bm: int, causal: bool) -> BlockCounts:
    from sparsec.codegen.attention_cpu_native import Native, native_counts
    from sparsec.codegen.attention_cpu_reads import cpu_block_reads

    if isinstance(pattern, Native):  # one call of a native kernel, its tiles as query blocks
        pairs, masked, rows, fetched, distinct = native_counts(pattern.pattern, Sq, Sk, causal)
        fetched = np.zeros_like(pairs) if fetched is None else fetched  # slash lanes: in `gathered`
        return BlockCounts(pairs, masked, rows, fetched, np.full(pairs.shape, NATIVE_CALL_ROWS), native=True,
                           distinct=np.zeros_like(pairs) if distinct is None else distinct)

    reads = cpu_block_reads(pattern, Sq, Sk, bm, causal)
    rows = np.minimum(bm, Sq - np.arange(reads.keys.shape[0]) * bm)  # the last block's real rows
    return BlockCounts(reads.keys * rows, reads.keys * rows * reads.masked, rows * (reads.keys > 0),
                       reads.gathered, np.maximum(reads.call_rows, 1.0), reads.calls,
                       distinct=np.zeros(reads.keys.shape[0]))


def program_seconds(visited: np.ndarray, partial: np.ndarray, computed: np.ndarray, shape: AttentionShape,
                    block_m: int | None, block_n: int, hw: HardwareProfile, *, gathered: np.ndarray | None = None,
                    call_rows: np.ndarray | None = None, moved: np.ndarray | None = None,
                    distinct: np.ndarray | None = None) -> np.ndarray:
    """Per-program seconds (float64 numpy, any shape): max(compute, K/V streaming) over the
    blocks each program visits (BlockCounts' columns; gathered, call_rows, moved and distinct for
    the cpu executor)."""
    if hw.executor == "cpu":
        return _cpu_program_seconds(visited, partial, computed, gathered, call_rows, shape, hw, moved, distinct)
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
    compute = visited * block_compute + partial * mask_seconds
    memory = (visited * block_bytes + computed * fixed_bytes) / sm_bandwidth
    return np.maximum(compute, memory)


def _cpu_program_seconds(pairs, masked, computed, gathered, call_rows, shape: AttentionShape,
                         hw: HardwareProfile, moved=None, distinct=None) -> np.ndarray:
    """The cpu executor's query blocks: fp32 throughout (inputs are upcast), dots and exponentials
    in sequence (no separate units to overlap), gathers and a frame order's moved rows copied on
    one thread, and each query row a part computes pays row_overhead_s."""
    cores = hw.sm_count
    width = shape.head_dim + shape.value_dim
    pair_seconds = 2 * width / (hw.flops("f32") * hw.matmul_efficiency / cores) + cores / hw.exp_per_s
    native = call_rows == NATIVE_CALL_ROWS
    speed = np.where(native, hw.native_pair_speed, query_rows_speed(np.where(native, 128.0, call_rows), hw))
    mask_cost = np.where(native, hw.native_mask_cost_per_pair, hw.mask_cost_per_pair)
    compute = (pairs * pair_seconds / speed
               + masked * mask_cost * cores / hw.vector_flops)
    # gathered keys: copied on one thread while the other cores wait; on a native kernel, keys read
    # SLASH_LANES rows at a time (a vertical-slash's slashes: their lanes), native_lane_seconds each on
    # its core, and the distinct K / V rows they read, native_row_seconds each
    copies = np.where(native, gathered * native_lane_seconds(shape, hw),
                      gathered * width * 4 * cores / hw.gather_bytes_per_s)
    if distinct is not None:
        copies = copies + distinct * native_row_seconds(shape, hw)
    if moved is not None:
        copies = copies + moved * width * 4 * cores / hw.gather_bytes_per_s
    return compute + copies + computed * hw.row_overhead_s


def native_lane_seconds(shape: AttentionShape, hw: HardwareProfile) -> float:
    """What a lane of a vertical-slash's slash costs the native kernel on one core: a fixed part
    and one per unit of D + Dv (hardware.HardwareProfile.native_fetch_*)."""
    return hw.native_fetch_seconds + (shape.head_dim + shape.value_dim) * hw.native_fetch_width_seconds


def native_row_seconds(shape: AttentionShape, hw: HardwareProfile) -> float:
    """What a distinct K / V row the lanes read costs beyond them: per unit of D + Dv, the share of
    a kv head's K and V that does not fit in a core's cache, read from further out."""
    width = shape.head_dim + shape.value_dim
    spill = max(0.0, 1.0 - hw.core_cache_bytes / (shape.kv_len * width * 4))
    return width * spill * hw.native_fetch_spill_seconds


# call_rows of the cpu executor's native interval kernel (codegen/attention_cpu_native.py), which
# runs at hw.native_pair_speed instead of query_rows_speed.
NATIVE_CALL_ROWS = 0.0

# torch's fused CPU attention kernel splits a call's queries in chunks of 32 rows below 192 rows, 64
# below 768 and 256 from there on: its per-pair speed grows with the rows up to 768.
_FULL_SPEED_ROWS = 768


def query_rows_speed(call_rows, hw: HardwareProfile):
    """Per-pair speed of torch's fused CPU attention kernel on calls of `call_rows` query rows,
    relative to 128 rows: (rows / 128) ** hw.query_rows_exponent, rows capped at _FULL_SPEED_ROWS
    (a float for a number, an array for an array)."""
    return (np.minimum(call_rows, _FULL_SPEED_ROWS) / 128.0) ** hw.query_rows_exponent


def counts_seconds(counts: BlockCounts, shape: AttentionShape, block_m: int | None, block_n: int,
                   hw: HardwareProfile) -> np.ndarray:
    """program_seconds of one pattern's BlockCounts."""
    return program_seconds(counts.visited, counts.partial, counts.computed, shape, block_m, block_n, hw,
                           gathered=counts.gathered, call_rows=counts.call_rows, moved=counts.moved,
                           distinct=counts.distinct)


def _program_seconds(launch: LaunchWork, work: AttentionWork, hw: HardwareProfile) -> np.ndarray:
    extra = ({"gathered": launch.gathered.numpy(), "call_rows": launch.call_rows.numpy()}
             | {name: None if getattr(launch, name) is None else getattr(launch, name).numpy()
                for name in ("moved", "distinct")}
             if launch.call_rows is not None else {})
    if hw.executor == "cpu" and not extra:
        raise ValueError(f"profile {hw.name!r} prices the cpu executor, but this work was counted for the Triton "
                         "kernels (attention_work(executor='cpu'))")
    return program_seconds(launch.visited.numpy(), launch.partial.numpy(), launch.computed.numpy(),
                           work.shape, work.block_m, work.block_n, hw, **extra)


def makespan_estimate(total: float, longest: float, hw: HardwareProfile) -> float:
    """What _schedule returns for programs summing to `total` seconds, the longest `longest`,
    without simulating them: the load-balanced time plus half the longest program (the last wave
    runs half full on average), never below the longest. Within about 3% of the list schedule
    from 8 waves on (1% from 15), on causal, banded and block-sparse launches."""
    return max(longest, total / (hw.sm_count * hw.programs_per_sm) + longest / 2)


def fixed_seconds(hardware: HardwareProfile, *, plans: int = 1, calls: int = 0, native_plans: int = 0) -> float:
    """What a launch pays besides its programs: the launch overhead (the cpu executor: once for
    each distinct pattern, which it plans and runs on its own), the cpu executor's SDPA calls, and
    its native kernels' calls (native_overhead_s each, in place of a plan's launch overhead)."""
    return (hardware.launch_overhead_s * plans + calls * hardware.call_overhead_s
            + native_plans * hardware.native_overhead_s)


def planned_on_cpu(pattern: Pattern, shape: AttentionShape) -> bool:
    """Whether the cpu executor plans `pattern`'s heads (and pays launch_overhead_s for it): Skip
    heads are filled and Dense heads without a causal offset call SDPA directly, with no plan
    (codegen.attention_cpu._attention); an all-dense layer keeps the model's own SDPA call."""
    if isinstance(pattern, Skip):
        return False
    return not (isinstance(pattern, Dense) and (not shape.causal or shape.q_len == shape.kv_len))


def head_share(launch: float, heads: int, hardware: HardwareProfile, *, calls: int = 0, native: bool = False,
               planned: bool = True) -> float:
    """A head's price from the seconds of a launch that runs its pattern on all `heads`: its share
    of the programs, plus (cpu executor) the fixed costs of its own plan (none where it is not
    `planned`: planned_on_cpu), since candidate patterns fitted to one head are rarely another's
    (Triton: a group's launch pays them once, see search_patterns.CostTable.layer_seconds)."""
    fixed = fixed_seconds(hardware, plans=int(planned and not native), calls=calls, native_plans=int(native))
    share = max(0.0, launch - fixed) / heads
    return share + fixed if hardware.executor == "cpu" else share


def launch_seconds(head_costs, shape: AttentionShape, hardware: HardwareProfile, *,
                   exact_programs: int | None = None, totals=None, calls: int = 0, plans: int = 1,
                   native_plans: int = 0) -> float:
    """Seconds of one launch whose heads have per-query-block program costs `head_costs` (a list
    of (nqb,) arrays, one a head, in launch order), launch overhead included: price_attention's
    schedule (grid order: query blocks, heads, batch). With `exact_programs`, launches of more
    programs than that use makespan_estimate instead of the list schedule; `totals`, one
    (sum, max) per head, saves reducing the costs again. `calls`, `plans` (torch's kernel) and
    `native_plans`: see fixed_seconds."""
    programs = shape.batch * sum(c.shape[0] for c in head_costs)
    if exact_programs is not None and programs > exact_programs:
        totals = totals or [(float(c.sum()), float(c.max())) for c in head_costs]
        seconds = makespan_estimate(shape.batch * sum(t for t, _ in totals), max(m for _, m in totals), hardware)
    else:
        seconds = _schedule(np.tile(np.concatenate(head_costs), shape.batch), hardware)
    return seconds + fixed_seconds(hardware, plans=plans, calls=calls, native_plans=native_plans)


def head_seconds_many(patterns, shape: AttentionShape, hardware: HardwareProfile, *, block_m: int, block_n: int,
                      exact_programs: int | None = EXACT_SCHEDULE_PROGRAMS) -> list[float]:
    """Per pattern p, what the search prices a head's option at: head_share of
    estimate_attention((p,) * H, ..., head_groups={"all": heads}) (Triton: less the launch
    overhead, over H; the cpu executor: plus the fixed costs of the head's own plan). Launches of
    more than `exact_programs` programs use makespan_estimate (a heap over SM slots
    costs ~0.3 us a program: too much for thousands of candidates at 16K)."""
    patterns = list(patterns)
    counts = pattern_counts([p for p in patterns if not isinstance(p, Skip)], shape, block_m, block_n,
                            executor=hardware.executor)
    found = []
    for p in patterns:
        if isinstance(p, Skip):
            found.append(head_price(p, shape, hardware))
        else:
            costs = counts_seconds(counts[p], shape, block_m, block_n, hardware)
            found.append(head_price(p, shape, hardware, costs=costs, totals=(float(costs.sum()), float(costs.max())),
                                    calls=counts[p].calls, native=counts[p].native, exact_programs=exact_programs))
    return found


def head_price(pattern: Pattern, shape: AttentionShape, hardware: HardwareProfile, *, costs=None, totals=None,
               calls: int = 0, native: bool = False, exact_programs: int | None = EXACT_SCHEDULE_PROGRAMS) -> float:
    """A head's option price (head_seconds_many) from the pattern's per-query-block program costs
    of one head (costs, totals = (sum, max), calls: counts_seconds / BlockCounts); a Skip head
    needs none (no kernel of its own to plan on the cpu executor either)."""
    heads = shape.num_heads
    if isinstance(pattern, Skip):
        return max(0.0, _skip_seconds((pattern.fill,) * heads, shape, hardware) - hardware.launch_overhead_s) / heads
    planned = hardware.executor != "cpu" or planned_on_cpu(pattern, shape)
    seconds = launch_seconds([costs] * heads, shape, hardware, exact_programs=exact_programs, totals=[totals] * heads,
                             calls=calls, plans=int(planned and not native), native_plans=int(native))
    return head_share(seconds, heads, hardware, calls=calls, native=native, planned=planned)


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
