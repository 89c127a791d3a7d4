"""Time candidate attention kernels on the present device, for measured autotuning.

A candidate is one layer shape, one pattern family at a target density (the same pattern on every
head, so a launch fuses them all) and one tile size. `candidate_grid` builds the cross product
families x densities x tiles x shapes; `measure` runs each candidate on this machine:

  - CUDA: the Triton kernels (codegen/attention_triton.py) at the candidate's tiles, timed with
    triton.testing.do_bench (CUDA events, warm-up, L2 flushed between runs);
  - CPU: the CPU executor (codegen/attention_cpu.py) at the candidate's block sizes, timed as the
    median of repeated time.perf_counter runs after one warm-up call (which also builds the
    executor's cached block plan, as a compiled model would before its first timed step).

`measurement_device()` names what was measured, for the calibrated profile's record.
"""
from __future__ import annotations

import functools
import logging
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from sparsec.codegen.tiles import AttentionTiles
from sparsec.cost_models.attention_cost import AttentionShape
from sparsec.patterns import AShape, BlockSparse, Columns, Dense, MultiDiagonal, Pattern, VerticalSlash, Window

__all__ = [
    "FAMILIES", "MIXED_FAMILIES", "Candidate", "Measurement", "candidate_grid", "default_grid", "flush_cpu_caches",
    "measure", "mixed_candidates",
    "kept_fraction", "measurement_device", "pattern_at_density", "software_versions", "time_candidates",
]

log = logging.getLogger(__name__)

FAMILIES = ("dense", "window", "multi_diagonal", "columns", "a_shape", "vertical_slash", "block_sparse")
_TORCH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
_LAYOUT_BLOCK = 64        # BlockSparse candidates keep random 64 x 64 blocks, whatever the kernel tile
_STRIPES = 8              # Columns candidates: evenly spaced stripes
_FRAMES = 8               # MultiDiagonal candidates: a sequence of 8 "video frames"


# -- patterns at a target density -------------------------------------------------------------


def _family_builder(family: str, S: int, causal: bool, seed: int) -> tuple[Callable[[int], Pattern], int, int]:
    """(parameter -> pattern, smallest parameter, largest parameter): density grows with the
    parameter, so a bisection finds the one that hits a target density."""
    generator = torch.Generator().manual_seed(seed)
    if family == "window":
        return (lambda w: Window(w, 0 if causal else w)), 0, S
    if family == "multi_diagonal":
        frame = max(1, S // _FRAMES)
        steps = (-3, -2, -1, 0) if causal else (-2, -1, 0, 1, 2)
        return (lambda w: MultiDiagonal([s * frame for s in steps], w)), 0, frame
    if family == "columns":
        spacing = max(1, S // _STRIPES)
        return (lambda w: Columns([(s, s + w) for s in range(0, S, spacing)])), 1, spacing
    if family == "a_shape":
        return (lambda w: AShape(max(1, S // 32), w)), 0, S
    if family == "vertical_slash":
        order = torch.randperm(S, generator=generator).tolist()
        # Slashes below the diagonal, evenly spread, so they survive the causal rule.
        return (lambda n: VerticalSlash(order[:n], [-(t * S) // n for t in range(n)])), 1, S // 2
    if family == "block_sparse":
        rows = math.ceil(S / _LAYOUT_BLOCK)
        order = torch.randperm(rows * rows, generator=generator)

        def blocks(n: int) -> Pattern:
            layout = torch.zeros(rows * rows, dtype=torch.bool)
            layout[order[:n]] = True
            return BlockSparse(layout.view(rows, rows), _LAYOUT_BLOCK)
        return blocks, 1, rows * rows
    raise ValueError(f"no candidate builder for family {family!r}; known: {FAMILIES}")


def kept_fraction(pattern: Pattern, S: int, causal: bool) -> float:
    """pattern.density(S, S, causal) from the pattern's per-row key intervals (block_coverage), so
    it costs S x intervals work instead of the S x S x parts of evaluating the mask."""
    from sparsec.codegen.block_coverage import row_intervals

    lo, hi = (t.to(torch.int64) for t in row_intervals(pattern, S, S, causal))
    lo, order = lo.masked_fill(lo > hi, S).sort(dim=1)  # empty intervals sort last
    hi = hi.gather(1, order)
    reach_before = torch.nn.functional.pad(hi.cummax(dim=1).values[:, :-1], (1, 0), value=-1)
    kept = (hi - torch.maximum(lo, reach_before + 1) + 1).clamp(min=0).sum()  # union: count each key once
    allowed = S * (S + 1) // 2 if causal else S * S
    return int(kept) / allowed


def pattern_at_density(family: str, S: int, density: float, *, causal: bool = False, seed: int = 0) -> Pattern:
    """A pattern of `family` for an S x S score matrix whose kept fraction of the (causal) pairs is
    as close to `density` as the family's integer parameter allows. "dense" ignores `density`."""
    if isinstance(S, bool) or not isinstance(S, int) or S < 2:
        raise ValueError(f"pattern_at_density: S must be an int >= 2, got {S!r}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"pattern_at_density: density must be in (0, 1], got {density!r}")
    if family == "dense":
        return Dense()
    make, lo, hi = _family_builder(family, S, causal, seed)
    while hi - lo > 1:  # invariant: make(lo) keeps less than `density`, or lo is the smallest
        mid = (lo + hi) // 2
        if kept_fraction(make(mid), S, causal) < density:
            lo = mid
        else:
            hi = mid
    # Never a pattern that keeps nothing (causal block layouts whose blocks all lie above the
    # diagonal): there would be no kernel work to time.
    kept = {p: kept_fraction(p, S, causal) for p in (make(lo), make(hi))}
    return min(kept, key=lambda p: (kept[p] == 0, abs(kept[p] - density)))


# -- candidates -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """One kernel choice for one layer shape."""

    family: str
    target_density: float
    head_patterns: tuple[Pattern, ...]
    shape: AttentionShape
    tiles: AttentionTiles
    # CPU: run by the executor's native kernels (codegen/attention_cpu_native.py; tiles unused)
    # instead of torch's kernel at tiles.block_m
    native: bool = False

    @property
    def group(self) -> str:
        """The layer shape this candidate runs (what a held-out fit leaves out)."""
        s = self.shape
        return (f"B{s.batch} H{s.num_heads}/{s.num_kv_heads} S{s.q_len}x{s.kv_len} D{s.head_dim} "
                f"{s.dtype}{' causal' if s.causal else ''}")

    @property
    def decision(self) -> str:
        """The choice this candidate competes in, for the top-1 regret: which family and tiles keep
        about `target_density` of this layer's pairs fastest ("dense": which tiles). Not the whole
        layer shape: there the sparsest candidate always wins, so every model's regret is 0."""
        return f"{self.group} @{self.target_density:.2f}"

    @property
    def label(self) -> str:
        density = "" if self.family == "dense" else f"@{self.target_density:.2f}"
        return f"{self.family}{density} " + ("native" if self.native else f"{self.tiles.block_m}x{self.tiles.block_n}")

    @property
    def density(self) -> float:
        """Kept fraction of the (causal) pairs, averaged over heads."""
        s = self.shape
        return sum(kept_fraction(p, s.q_len, s.causal) for p in self.head_patterns) / len(self.head_patterns)


def candidate_grid(
    shapes: Iterable[AttentionShape],
    *,
    families: Sequence[str] = FAMILIES,
    densities: Sequence[float] = (0.1, 0.25, 0.5),
    tiles: Sequence[AttentionTiles] = (AttentionTiles(64, 64), AttentionTiles(128, 64)),
    seed: int = 0,
    native: bool = False,
) -> list[Candidate]:
    """families x densities x tiles x shapes; "dense" once per tile and shape. native: CPU
    candidates run by the native interval kernel (one per family and density: pass one tile)."""
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"candidate_grid: unknown families {sorted(unknown)}; known: {FAMILIES}")
    candidates = []
    for shape in shapes:
        if shape.q_len != shape.kv_len:
            raise ValueError(f"candidate_grid: patterns are built for square scores, got {shape.q_len}x{shape.kv_len}")
        for family in families:
            for density in ((1.0,) if family == "dense" else densities):
                pattern = pattern_at_density(family, shape.q_len, density, causal=shape.causal, seed=seed)
                for t in tiles:
                    candidates.append(Candidate(family=family, target_density=density, shape=shape, tiles=t,
                                                head_patterns=(pattern,) * shape.num_heads, native=native))
    return candidates


# The families a "mixed" candidate gives its heads in turn: one distinct pattern a head, each its own plan
# on the cpu executor (what launch_overhead_s prices there), where every other candidate runs one.
MIXED_FAMILIES = ("window", "multi_diagonal", "columns", "block_sparse")


def mixed_candidates(shapes: Iterable[AttentionShape], *, densities: Sequence[float], tiles: AttentionTiles,
                     seed: int = 0) -> list[Candidate]:
    """Per shape and density, one candidate whose heads take MIXED_FAMILIES in turn, each at the density."""
    candidates = []
    for shape in shapes:
        for density in densities:
            patterns = tuple(pattern_at_density(MIXED_FAMILIES[h % len(MIXED_FAMILIES)], shape.q_len, density,
                                                causal=shape.causal, seed=seed) for h in range(shape.num_heads))
            candidates.append(Candidate(family="mixed", target_density=density, shape=shape, tiles=tiles,
                                        head_patterns=patterns))
    return candidates


# The families whose patterns the CPU executor's native kernels run (a few key intervals a row, or
# a block layout): the CPU grid times them through them too.
NATIVE_FAMILIES = ("window", "multi_diagonal", "a_shape", "block_sparse", "vertical_slash")


def _shape(S: int, *, heads: int, head_dim: int, dtype: str, causal: bool) -> AttentionShape:
    return AttentionShape(batch=1, num_heads=heads, num_kv_heads=heads, q_len=S, kv_len=S,
                          head_dim=head_dim, value_dim=head_dim, dtype=dtype, causal=causal)


def default_grid(device: torch.device | str, *, quick: bool = False) -> list[Candidate]:
    """The calibration grid for `device`: GPU-sized layers on CUDA, small ones on a CPU."""
    if torch.device(device).type == "cuda":
        # The kernels' own warps and stages for each (block_m, block_n) (codegen.tiles.tiles_for at bf16).
        tiles = (AttentionTiles(128, 64, 8, 3), AttentionTiles(128, 128, 8, 3), AttentionTiles(64, 64, 4, 3))
        if quick:  # ~50 candidates (each compiles its kernels): fits a short GPU lease
            shapes = [_shape(8192, heads=16, head_dim=128, dtype="bf16", causal=c) for c in (False, True)]
            return candidate_grid(shapes, densities=(0.1, 0.3), tiles=tiles[:2])
        shapes = [_shape(S, heads=16, head_dim=d, dtype="bf16", causal=c)
                  for S in (2048, 4096, 8192, 16384) for d in (64, 128) for c in (False, True)]
        return candidate_grid(shapes, tiles=tiles)
    # Two head sizes: a pair's dot products scale with head_dim, its softmax does not; 3% density
    # for narrow patterns, whose query rows cost more than their pairs (row_overhead_s); "mixed"
    # candidates, a plan a head, so the fit can tell a plan's fixed cost from the rest. The executor
    # reads exact keys (block_n is unused), so the tiles differ in block_m only; dense heads run one
    # SDPA call whatever the tiles: timed once per shape.
    if quick:
        shapes = [_shape(S, heads=4, head_dim=d, dtype="f32", causal=False) for S, d in ((512, 64), (1024, 64), (1024, 32))]
        tiles = (AttentionTiles(64, 64), AttentionTiles(128, 64))
        densities = (0.03, 0.1, 0.3)
    else:
        shapes = [_shape(S, heads=4, head_dim=d, dtype="f32", causal=c) for S, d, c in
                  ((512, 64, False), (1024, 64, False), (1024, 64, True), (2048, 64, False), (1024, 32, False),
                   (4096, 64, False))]
        tiles = (AttentionTiles(64, 64), AttentionTiles(128, 64), AttentionTiles(256, 64))
        densities = (0.03, 0.1, 0.25, 0.5)
    sparse = [f for f in FAMILIES if f != "dense"]
    return (candidate_grid(shapes, families=("dense",), tiles=tiles[:1])
            + candidate_grid(shapes, families=sparse, densities=densities, tiles=tiles)
            + candidate_grid(shapes, families=NATIVE_FAMILIES, densities=densities, tiles=tiles[-1:], native=True)
            + mixed_candidates(shapes, densities=densities, tiles=tiles[1]))


# -- timing -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Measurement:
    candidate: Candidate
    seconds: float       # median or min (CPU) or do_bench mean (CUDA) of one call
    samples: int


def software_versions() -> dict[str, str | None]:
    """The versions a measurement ran with (recorded in every benchmark result)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda}


def measurement_device(device: torch.device | str, *, threads: int | None = None) -> str:
    """A readable name of what is being measured ("NVIDIA H100 80GB HBM3", "cpu: x86_64, 2 threads");
    `threads`: the torch threads measure() ran with, when not the current number."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = threads if threads is not None else torch.get_num_threads()
    return f"cpu: {platform.processor() or platform.machine()}, {threads} thread{'' if threads == 1 else 's'}"


def _inputs(shape: AttentionShape, device: torch.device, generator: torch.Generator):
    dtype = _TORCH_DTYPES[shape.dtype]
    q = torch.randn(shape.batch, shape.num_heads, shape.q_len, shape.head_dim, generator=generator)
    k = torch.randn(shape.batch, shape.num_kv_heads, shape.kv_len, shape.head_dim, generator=generator)
    v = torch.randn(shape.batch, shape.num_kv_heads, shape.kv_len, shape.value_dim, generator=generator)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def _runner(candidate: Candidate, device: torch.device, generator: torch.Generator) -> Callable[[], torch.Tensor]:
    q, k, v = _inputs(candidate.shape, device, generator)
    scale = 1.0 / math.sqrt(candidate.shape.head_dim)
    causal, patterns, tiles = candidate.shape.causal, candidate.head_patterns, candidate.tiles
    if device.type == "cuda":
        from sparsec.codegen.attention_triton import triton_attention

        return lambda: triton_attention(q, k, v, patterns, causal=causal, scale=scale, tiles=tiles)
    from sparsec.codegen.attention_cpu import cpu_attention

    if candidate.native:
        return lambda: cpu_attention(q, k, v, patterns, causal=causal, scale=scale, native=True)
    return lambda: cpu_attention(q, k, v, patterns, causal=causal, scale=scale,
                                 block_m=tiles.block_m, block_n=tiles.block_n)


_STATISTICS = {"median": statistics.median, "min": min}


# Read through before every CPU sample, so each call starts with its inputs out of the caches, as
# in a model, where other layers ran in between (triton.testing.do_bench clears the L2 likewise).
# Read, not written: evicting dirty lines would bill the timed call for writing the buffer back.
_CACHE_FLUSH_BYTES = 64 * 2**20


@functools.lru_cache(maxsize=1)
def _flush_buffer() -> torch.Tensor:
    return torch.ones(_CACHE_FLUSH_BYTES // 4, dtype=torch.float32)


def flush_cpu_caches() -> None:
    """Evict the CPU caches (read a buffer larger than the last level): call before timing a sample."""
    _flush_buffer().sum()


def _time_cpu(fn: Callable[[], object], min_seconds: float, max_samples: int, statistic: str) -> tuple[float, int]:
    fn()  # warm-up: caches (block plans), first-touch allocations
    samples: list[float] = []
    while len(samples) < 3 or (sum(samples) < min_seconds and len(samples) < max_samples):
        flush_cpu_caches()
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return _STATISTICS[statistic](samples), len(samples)


def _time_cuda(fn: Callable[[], object]) -> tuple[float, int]:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100)) * 1e-3, 0


def measure(
    candidates: Sequence[Candidate],
    device: torch.device | str | None = None,
    *,
    min_seconds: float = 0.05,
    max_samples: int = 15,
    statistic: str = "median",
    threads: int | None = None,
    seed: int = 0,
    progress: Callable[[int, int, Measurement], None] | None = None,
) -> list[Measurement]:
    """Seconds of one call of each candidate on `device` (default: CUDA when present, else CPU).
    CPU timing repeats a call until `min_seconds` have been spent (at least 3, at most
    `max_samples` runs) and keeps the median, or the minimum with statistic="min" (robust when
    other processes share the cores: they only ever add time). `progress(done, total, measurement)`
    is called after each candidate. `threads` (CPU) runs torch with that many threads meanwhile: on
    cores shared with other jobs, one thread times far more steadily than several, whose barrier
    waits stretch whenever one of them is descheduled."""
    return time_candidates("measure", candidates, _runner, Measurement, device, min_seconds=min_seconds,
                           max_samples=max_samples, statistic=statistic, threads=threads, seed=seed,
                           progress=progress)


def time_candidates(owner: str, candidates: Sequence, runner: Callable, record: Callable, device, *,
                    min_seconds: float, max_samples: int, statistic: str, threads: int | None, seed: int,
                    progress: Callable | None) -> list:
    """measure's timing for any kind of candidate: runner(candidate, device, generator) -> the call
    to time, or None to leave the candidate out (the runner says why); record(candidate=,
    seconds=, samples=) -> what is returned for it. `owner` names the caller in errors."""
    if statistic not in _STATISTICS:
        raise ValueError(f"{owner}: statistic must be one of {sorted(_STATISTICS)}, got {statistic!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"{owner}: threads must be a positive int, got {threads!r}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{owner}: can time on 'cpu' or 'cuda' devices, got {device}")
    generator = torch.Generator().manual_seed(seed)
    previous_threads = torch.get_num_threads()
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
    results = []
    try:
        for index, candidate in enumerate(candidates):
            fn = runner(candidate, device, generator)
            if fn is None:
                continue
            if device.type == "cuda":
                seconds, samples = _time_cuda(fn)
            else:
                seconds, samples = _time_cpu(fn, min_seconds, max_samples, statistic)
            results.append(record(candidate=candidate, seconds=seconds, samples=samples))
            log.debug("%s: %s: %.3g s", owner, candidate, seconds)
            if progress is not None:
                progress(index + 1, len(candidates), results[-1])
    finally:
        torch.set_num_threads(previous_threads)
    return results
