"""The per-layer search: per-head patterns, head groups and tiles that minimize predicted time
within the error budget.

The budget bounds ||O_sparse - O_dense|| / ||O_dense|| of the layer; squared norms add over
heads, so it is a squared-error allowance shared by the heads: a multiple-choice knapsack (one
option per head, minimize summed cost, summed error <= allowance). Per tile size:

 1. every candidate gets a per-head cost from the cost model (its share of a launch running it
    on every head) and its measured squared error; options over the allowance are dropped;
 2. greedy on the lower convex hull of each head's (error, cost) options, taking the step with
    the most time saved per unit of error first (the Lagrangian relaxation's order), then a
    fill pass spending the remaining allowance on the best single-head improvements;
 3. head groups: heads of one family share a launch, so a small group is merged into another
    family's launch (re-expressing its pattern exactly in that family when possible, e.g.
    Columns -> VerticalSlash, else its own candidate of that family, else Dense) whenever the
    cost model, now with launch overheads and wave quantization, says the layer gets faster.

The fastest tile size wins; Dense at its best tile size is the baseline, and a layer whose best
sparse plan is not faster stays dense. With `verify`, the chosen patterns' error is recomputed
exactly on the whole layer, and the allowance is tightened and the search rerun if it is over.

Pricing (CostTable) is what makes the search fast at long sequences: all candidates of a layer at
one tile size are counted at once (block_coverage.coverage_counts_many, closed form per query
block) and cached per (shape, tiles, pattern), so layers of one shape share them. Inside the
search, launches of more than EXACT_SCHEDULE_PROGRAMS programs are priced with
attention_cost.makespan_estimate instead of simulating the SM schedule (within ~1-3% beyond
8 waves; a simulation costs ~0.3 us a program, and a 24-head layer at 16K asks thousands of
prices); smaller launches, and the winner's reported times and its comparison with dense, use the
exact schedule. useful_candidates drops, before their errors are measured, the candidates no
tile size would take (priced above (1 - MIN_HEAD_SAVING) x Dense everywhere they can run): exact,
since the search would never look at them, and it saves measurement rounds.

BlockSparse options pay BLOCK_SPARSE_MARGIN in the knapsack: a layout is tied to one sequence
length and to the calibration inputs, so a closed-form family wins unless blocks are clearly
faster. Reported times are the cost model's, without the margin.
"""
from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from sparsec.cost_models.attention_cost import (
    EXACT_SCHEDULE_PROGRAMS, AttentionShape, counts_seconds, estimate_attention, head_price, launch_seconds, pattern_counts,
    planned_on_cpu, program_seconds, skip_seconds,
)
from sparsec.cost_models.hardware import HardwareProfile
from sparsec.passes.fit_candidates import HeadCandidates
from sparsec.patterns import BlockSparse, Columns, Dense, MultiDiagonal, Pattern, Skip, Union, VerticalSlash, Window

__all__ = [
    "DEFAULT_BLOCK_SIZES", "BLOCK_SPARSE_MARGIN", "CostTable", "LayerChoice", "MIN_HEAD_SAVING", "Option", "head_groups", "reexpress",
    "search_layer", "solve_knapsack", "useful_candidates",
]

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZES = tuple((bm, bn) for bm in (64, 128) for bn in (32, 64, 128))
BLOCK_SPARSE_MARGIN = 1.25
# A sparse option must save this share of the head's dense cost: below it, the saving is within
# the cost model's error, and the exact dense head is worth more than an approximation.
MIN_HEAD_SAVING = 0.1
_MAX_TIGHTENINGS = 4
# Cache bounds of CostTable: BlockSparse candidates held (each a layout) and launches held.
_MAX_LAYOUTS = 2048
_MAX_LAUNCHES = 1 << 16
# Relative slack when comparing errors to the allowance (sums of float64 squares).
_ROUNDOFF = 1e-9


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerChoice:
    """What the search chose for one layer."""

    patterns: tuple[Pattern, ...]
    head_groups: tuple[tuple[int, ...], ...]
    tiles: tuple[int, int]
    squared_error: float        # summed over heads and calibration samples
    seconds: float              # cost model, chosen patterns, groups and tiles
    dense_seconds: float        # cost model, Dense at its best tiles


@dataclass(frozen=True, slots=True)
class Option:
    cost: float                 # per-head seconds as the knapsack sees them
    error: float                # squared output error
    pattern: Pattern


# -- costs ---------------------------------------------------------------------------------------


def pattern_family(pattern: Pattern) -> str:
    """The kernel family that runs a pattern (the grouping the Triton kernels use)."""
    if not isinstance(pattern, Union):  # only unions differ from their own family (one holding Dense is dense)
        return pattern.family
    from sparsec.codegen.attention_triton import pattern_family as kernel_family

    return kernel_family(pattern)


def head_groups(patterns: Sequence[Pattern]) -> tuple[tuple[int, ...], ...]:
    """Heads that run in one launch: those of one family, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for h, p in enumerate(patterns):
        groups.setdefault(pattern_family(p), []).append(h)
    return tuple(tuple(heads) for heads in groups.values())


class CostTable:
    """Cost-model seconds for the search, cached so layers of one shape and heads that share a
    candidate ask the model once.

    Per (shape, tiles) and pattern it keeps the pattern's per-query-block program costs,
    computed for many patterns at once (`prepare`: all candidates of a layer at one tile size in
    one batch of block_coverage.coverage_counts_many). From them:
      head_seconds   a head's option price (attention_cost.head_price, as head_seconds_many);
      layer_seconds  the whole layer, one launch per family group; exact by default (the list
                     schedule, as estimate_attention; on the Triton kernels with the heads the
                     kernels run in frame-transposed order as they run them), while the search
                     passes exact=False:
                     launches over EXACT_SCHEDULE_PROGRAMS programs then use makespan_estimate,
                     and each launch is cached (a head-group merge changes two launches).
    BlockSparse layouts belong to one head of one layer and are large at long sequences: their
    entries are dropped once more than _MAX_LAYOUTS are held."""

    def __init__(self, hardware: HardwareProfile):
        self.hardware = hardware
        self._tables: dict[tuple[AttentionShape, tuple[int, int] | None], _Prices] = {}
        self._layouts = 0

    def prepare(self, patterns, shape: AttentionShape, tiles: tuple[int, int]) -> None:
        """Price all of `patterns` at `tiles` in one batch (later lookups are cache hits)."""
        table = self._table(shape, tiles)
        missing = [p for p in dict.fromkeys(patterns) if p not in table.head]
        if not missing:
            return
        layouts = sum(isinstance(p, BlockSparse) for p in missing)
        if self._layouts + layouts > _MAX_LAYOUTS:  # forget first: the caller reads all of `patterns` next
            self._forget_layouts()
            missing = [p for p in dict.fromkeys(patterns) if p not in table.head]
            layouts = sum(isinstance(p, BlockSparse) for p in missing)
        self._layouts += layouts
        computed = [p for p in missing if not isinstance(p, Skip)]
        if computed:
            counts = pattern_counts(computed, shape, self._block_m(tiles), tiles[1], executor=self.hardware.executor)
            for p, row in zip(computed, self._program_costs(computed, counts, shape, tiles)):
                table.programs[p] = (row, (float(row.sum()), float(row.max())))
                table.calls[p] = counts[p].calls
                table.native[p] = counts[p].native
            self._price_transposed(computed, shape, tiles, table)
        for p in missing:
            if isinstance(p, Skip):
                table.head[p] = head_price(p, shape, self.hardware)
            else:
                costs, totals = table.programs[p]
                table.head[p] = head_price(p, shape, self.hardware, costs=costs, totals=totals, calls=table.calls[p],
                                           native=table.native[p])

    def _price_transposed(self, patterns, shape: AttentionShape, tiles: tuple[int, int], table: _Prices) -> None:
        """On the Triton kernels, a pattern with a frame stride is priced in frame-transposed order
        where that is cheaper even with the layer's gathers paid for it alone, as triton_attention
        would then run it (codegen/triton_frame_order.py; strides of at most BLOCK_N frames,
        counted in closed form). The price itself leaves the gathers to the layer's exact price
        (other heads may share them): a transposed price can only be cheaper than the head's run."""
        if self.hardware.executor == "cpu" or shape.q_len != shape.kv_len:
            return
        from sparsec.codegen.frame_order import FramesTransposed
        from sparsec.codegen.triton_frame_order import gather_seconds, kernel_frames

        moved = {}
        for p in patterns:
            frames = kernel_frames(p, shape.q_len, shape.kv_len, tiles[1])
            if frames:
                moved[p] = FramesTransposed(p, frames[0])
        if not moved:
            return
        transposed = list(moved.values())
        counts = pattern_counts(transposed, shape, tiles[0], tiles[1], executor=self.hardware.executor)
        # the gathers in program-seconds: wall time over every SM slot
        gathers = gather_seconds(shape, 1, self.hardware) * self.hardware.sm_count * self.hardware.programs_per_sm
        for p, row in zip(moved, self._program_costs(transposed, counts, shape, tiles)):
            if row.sum() + gathers < table.programs[p][1][0]:
                table.programs[p] = (row, (float(row.sum()), float(row.max())))

    def _program_costs(self, patterns, counts, shape: AttentionShape, tiles: tuple[int, int]) -> list[np.ndarray]:
        """Each pattern's per-query-block seconds: priced as one array on the Triton kernels (every
        pattern has the tiles' query blocks); one by one on the cpu executor, whose query blocks
        differ from pattern to pattern."""
        if self.hardware.executor == "cpu":
            return [counts_seconds(counts[p], shape, None, tiles[1], self.hardware) for p in patterns]
        columns = [np.stack([getattr(counts[p], name) for p in patterns]) for name in ("visited", "partial", "computed")]
        return list(program_seconds(*columns, shape, *tiles, self.hardware))

    def head_seconds(self, pattern: Pattern, shape: AttentionShape, tiles: tuple[int, int]) -> float:
        """One head's share of a launch that runs `pattern` on every head of the layer, launch
        overhead excluded (groups pay it once, see layer_seconds)."""
        table = self._table(shape, tiles)
        if pattern not in table.head:
            self.prepare([pattern], shape, tiles)
        return table.head[pattern]

    def head_prices(self, patterns: Sequence[Pattern], shape: AttentionShape, tiles: tuple[int, int]) -> list[float]:
        """head_seconds of each pattern (priced together if some are new)."""
        self.prepare(patterns, shape, tiles)
        head = self._table(shape, tiles).head
        return [head[p] for p in patterns]

    def layer_seconds(self, patterns: Sequence[Pattern], shape: AttentionShape, tiles: tuple[int, int], *,
                      exact: bool = True) -> float:
        """The whole layer: one launch per family group, scheduled over the SMs."""
        table = self._table(shape, tiles)
        if exact:
            key = tuple(patterns)
            if key not in table.layers:
                if len(table.layers) > _MAX_LAUNCHES:
                    table.layers.clear()
                run, groups, gathers = self._dispatched(key, shape, tiles)
                table.layers[key] = estimate_attention(run, shape, self.hardware, block_m=self._block_m(tiles),
                                                       block_n=tiles[1], head_groups=groups).seconds + gathers
            return table.layers[key]
        seconds = 0.0
        for group in head_groups(patterns):
            seconds += self._launch(tuple(patterns[h] for h in group), shape, tiles, table)
        return seconds

    def _dispatched(self, patterns: tuple[Pattern, ...], shape: AttentionShape, tiles: tuple[int, int]):
        """(patterns, launch groups, extra seconds) of the layer as the kernels run it: on the
        Triton kernels, heads the cost model runs in frame-transposed order (codegen/
        triton_frame_order.py) are one launch of their own and the gathers cost their seconds."""
        groups = head_groups(patterns)
        if self.hardware.executor == "cpu":  # the executor's order is inside its head prices
            return patterns, {str(g): g for g in groups}, 0.0
        from sparsec.codegen.triton_frame_order import priced_frame_order

        run, gathers = priced_frame_order(patterns, shape, tiles[0], tiles[1], self.hardware)
        moved = tuple(h for h, (p, r) in enumerate(zip(patterns, run)) if p != r)
        groups = [tuple(h for h in g if h not in moved) for g in groups] + [moved]
        return run, {str(g): g for g in groups if g}, gathers

    def _block_m(self, tiles: tuple[int, int]) -> int | None:
        """The query block the kernels run at `tiles`: the cpu executor picks its own per pattern (a
        plan for it keeps the tiles only as its block layouts' granularity, see apply_patterns)."""
        return None if self.hardware.executor == "cpu" else tiles[0]

    def _table(self, shape: AttentionShape, tiles: tuple[int, int]) -> _Prices:
        """The caches for (shape, tiles); on the cpu executor prices do not depend on the tiles
        (_block_m; block_n is unused there, a layout carries its own blocks): one for the shape."""
        key = (shape, None if self.hardware.executor == "cpu" else tuple(tiles))
        if key not in self._tables:
            self._tables[key] = _Prices()
        return self._tables[key]

    def _launch(self, patterns: tuple[Pattern, ...], shape: AttentionShape, tiles: tuple[int, int], table: _Prices) -> float:
        if patterns not in table.launches:
            if len(table.launches) > _MAX_LAUNCHES:
                table.launches.clear()
            if all(isinstance(p, Skip) for p in patterns):
                seconds = skip_seconds(tuple(p.fill for p in patterns), shape, self.hardware)
            else:
                self.prepare(patterns, shape, tiles)
                nothing = (np.zeros(-(-shape.q_len // tiles[0])), (0.0, 0.0))  # a Skip head's programs exit at once
                programs = [nothing if isinstance(p, Skip) else table.programs[p] for p in patterns]
                distinct = [p for p in dict.fromkeys(patterns) if not isinstance(p, Skip)]
                seconds = launch_seconds([c for c, _ in programs], shape, self.hardware,
                                         exact_programs=EXACT_SCHEDULE_PROGRAMS, totals=[t for _, t in programs],
                                         calls=sum(table.calls[p] for p in distinct),
                                         plans=(sum(not table.native[p] and planned_on_cpu(p, shape) for p in distinct)
                                                if self.hardware.executor == "cpu" else 1),
                                         native_plans=sum(table.native[p] for p in distinct))
            table.launches[patterns] = seconds
        return table.launches[patterns]

    def _forget_layouts(self) -> None:
        for table in self._tables.values():
            for cache in (table.programs, table.head, table.calls, table.native):
                for p in [p for p in cache if isinstance(p, BlockSparse)]:
                    del cache[p]
            table.launches.clear()
            table.layers.clear()
        self._layouts = 0


@dataclass
class _Prices:
    """CostTable's caches for one (shape, tiles)."""

    programs: dict = field(default_factory=dict)   # pattern -> ((nqb,) seconds, (their sum, their max))
    calls: dict = field(default_factory=dict)      # pattern -> the cpu executor's SDPA calls (0: Triton)
    native: dict = field(default_factory=dict)     # pattern -> run on the cpu executor's native kernels
    head: dict = field(default_factory=dict)       # pattern -> head_seconds
    launches: dict = field(default_factory=dict)   # patterns of one launch -> seconds (search estimate)
    layers: dict = field(default_factory=dict)     # patterns of the layer -> exact seconds


# -- knapsack ------------------------------------------------------------------------------------


def _lower_hull(options: Sequence[Option]) -> list[int]:
    """Indices of the options on the lower convex hull of (error, cost), error ascending: each
    step saves time at a falling rate per unit of error added."""
    order = sorted(range(len(options)), key=lambda i: (options[i].error, options[i].cost))
    pareto = []
    for i in order:
        if not pareto or options[i].cost < options[pareto[-1]].cost:
            pareto.append(i)
    hull: list[int] = []
    for i in pareto:
        while len(hull) >= 2 and _slope(options, hull[-2], hull[-1]) >= _slope(options, hull[-2], i):
            hull.pop()
        hull.append(i)
    return hull


def _slope(options: Sequence[Option], a: int, b: int) -> float:
    return (options[b].cost - options[a].cost) / max(options[b].error - options[a].error, 1e-300)


def solve_knapsack(options: Sequence[Sequence[Option]], allowance: float) -> list[int]:
    """Per head, the index of the chosen option: least summed cost with summed error within
    `allowance` (greedy on convex hulls, then a fill pass). Each head needs an error-0 option
    (Dense) so that a feasible start exists."""
    hulls = [_lower_hull(opts) for opts in options]
    choice = [hull[0] for hull in hulls]
    used = sum(options[h][c].error for h, c in enumerate(choice))
    steps = [(_saving_rate(options[h], hull, 0), h, 0) for h, hull in enumerate(hulls) if len(hull) > 1]
    heapq.heapify(steps)
    while steps:
        _, h, pos = heapq.heappop(steps)
        here, there = options[h][hulls[h][pos]], options[h][hulls[h][pos + 1]]
        if used + there.error - here.error > allowance * (1 + _ROUNDOFF):
            continue  # this head's later hull steps cost even more error per second saved
        used += there.error - here.error
        choice[h] = hulls[h][pos + 1]
        if pos + 2 < len(hulls[h]):
            heapq.heappush(steps, (_saving_rate(options[h], hulls[h], pos + 1), h, pos + 1))
    return _fill(options, choice, allowance - used)


def _saving_rate(options: Sequence[Option], hull: list[int], pos: int) -> float:
    """Negative seconds saved per unit of error of hull step pos -> pos + 1 (heapq pops the
    smallest, so the best step first)."""
    return _slope(options, hull[pos], hull[pos + 1])


def _fill(options: Sequence[Sequence[Option]], choice: list[int], slack: float) -> list[int]:
    """Spend the remaining allowance: repeatedly the single-head change saving most time."""
    while True:
        best = None
        for h, opts in enumerate(options):
            current = opts[choice[h]]
            for i, o in enumerate(opts):
                extra = o.error - current.error
                saved = current.cost - o.cost
                if saved > 0 and extra <= slack * (1 + _ROUNDOFF) and (best is None or saved > best[0]):
                    best = (saved, h, i, extra)
        if best is None:
            return choice
        _, h, i, extra = best
        choice[h] = i
        slack -= extra


# -- head groups ---------------------------------------------------------------------------------


def reexpress(pattern: Pattern, family: str) -> Pattern | None:
    """The same mask written in another family's terms, when that family can express it."""
    if pattern_family(pattern) == family:
        return pattern
    if family == "vertical_slash":
        if isinstance(pattern, Columns):
            return VerticalSlash(pattern.ranges, [])
        if isinstance(pattern, MultiDiagonal) and pattern.width == 0:
            return VerticalSlash([], pattern.offsets)
        if isinstance(pattern, Window) and pattern.left == pattern.right == 0:
            return VerticalSlash([], [0])
    if family == "multi_diagonal" and isinstance(pattern, Window) and (pattern.left + pattern.right) % 2 == 0:
        return MultiDiagonal([(pattern.right - pattern.left) // 2], (pattern.left + pattern.right) // 2)
    if family == "window" and isinstance(pattern, MultiDiagonal) and len(pattern.offsets) == 1:
        o, w = pattern.offsets[0], pattern.width
        if o - w <= 0 <= o + w:
            return Window(w - o, o + w)
    return None


@dataclass
class _LayerProblem:
    """One tile size's search state."""

    candidates: Sequence[HeadCandidates]
    shape: AttentionShape
    tiles: tuple[int, int]
    costs: CostTable
    allowance: float

    def prepare(self) -> None:
        """Price every head's candidates at this tile size in one batch."""
        self.costs.prepare([Dense()] + [p for c in self.candidates for p in c.patterns if self._priced(p)],
                           self.shape, self.tiles)

    def _priced(self, p: Pattern) -> bool:
        return not isinstance(p, BlockSparse) or p.block == self.tiles  # each tile size has its own layouts

    def options(self, h: int) -> list[Option]:
        dense_cost = self.costs.head_seconds(Dense(), self.shape, self.tiles)
        found = [Option(dense_cost, 0.0, Dense())]
        for p, err in zip(self.candidates[h].patterns, self.candidates[h].squared_errors):
            if isinstance(p, Dense) or not self._priced(p):
                continue
            if err > self.allowance * (1 + _ROUNDOFF):
                continue
            cost = self.costs.head_seconds(p, self.shape, self.tiles)
            if cost <= (1 - MIN_HEAD_SAVING) * dense_cost:
                found.append(Option(cost * BLOCK_SPARSE_MARGIN if isinstance(p, BlockSparse) else cost, err, p))
        return found

    def seconds(self, patterns: Sequence[Pattern], *, exact: bool = False) -> float:
        return self.costs.layer_seconds(patterns, self.shape, self.tiles, exact=exact)

    def objective(self, patterns: Sequence[Pattern], *, exact: bool = False) -> float:
        """What the search minimizes: the layer's seconds plus the BlockSparse margin."""
        margin = sum(self.costs.head_seconds(p, self.shape, self.tiles) for p in patterns if isinstance(p, BlockSparse))
        return self.seconds(patterns, exact=exact) + (BLOCK_SPARSE_MARGIN - 1) * margin


def useful_candidates(head_patterns: Sequence[Sequence[Pattern]], shape: AttentionShape, costs: CostTable,
                      block_sizes: Sequence[tuple[int, int]] = DEFAULT_BLOCK_SIZES) -> list[tuple[Pattern, ...]]:
    """Each head's candidates less those no tile size would take as an option: priced above
    (1 - MIN_HEAD_SAVING) x Dense at every tile size they run at (BlockSparse: its own), a price
    that does not depend on the measured error. Pruning them before measuring is exact: the
    search never looks at them. Dense stays first."""
    distinct = list(dict.fromkeys(p for patterns in head_patterns for p in patterns))
    cheap: set[Pattern] = set()
    for tiles in map(tuple, block_sizes):
        priced = [p for p in distinct if p not in cheap and (not isinstance(p, BlockSparse) or p.block == tiles)]
        dense, *prices = costs.head_prices([Dense(), *priced], shape, tiles)
        cheap.update(p for p, price in zip(priced, prices) if price <= (1 - MIN_HEAD_SAVING) * dense)
    return [tuple(p for p in patterns if isinstance(p, Dense) or p in cheap) for patterns in head_patterns]


def _solve_tiles(problem: _LayerProblem) -> tuple[list[Pattern], list[float]]:
    problem.prepare()
    options = [problem.options(h) for h in range(problem.shape.num_heads)]
    choice = solve_knapsack(options, problem.allowance)
    patterns = [options[h][c].pattern for h, c in enumerate(choice)]
    errors = [options[h][c].error for h, c in enumerate(choice)]
    return _merge_groups(problem, options, patterns, errors)


def _merge_groups(problem: _LayerProblem, options, patterns: list[Pattern], errors: list[float]):
    """Move whole family groups into another family's launch while the layer gets faster."""
    while True:
        current = problem.objective(patterns)
        best = None
        groups = sorted(head_groups(patterns), key=len)
        families = {pattern_family(patterns[g[0]]) for g in groups} | {"dense"}
        for group in groups:
            own = pattern_family(patterns[group[0]])
            for family in sorted(families - {own}):
                moved = _move_group(problem, options, patterns, errors, group, family)
                if moved is not None:
                    objective = problem.objective(moved[0])
                    if objective < current and (best is None or objective < best[0]):
                        best = (objective, moved)
        if best is None:
            return patterns, errors
        log.debug("merged a head group: objective %.3g s -> %.3g s", current, best[0])
        patterns, errors = best[1]


def _move_group(problem, options, patterns, errors, group, family):
    """Patterns with every head of `group` in `family` (cheapest way within the allowance), or
    None. A head keeps its mask when the family can express it, else takes one of its own
    candidates of that family."""
    patterns, errors = list(patterns), list(errors)
    for h in group:
        same_mask = reexpress(patterns[h], family)
        ways = [Option(problem.costs.head_seconds(same_mask, problem.shape, problem.tiles), errors[h], same_mask)] if same_mask else []
        ways += [o for o in options[h] if pattern_family(o.pattern) == family]
        slack = problem.allowance - (sum(errors) - errors[h])
        ways = [o for o in ways if o.error <= slack * (1 + _ROUNDOFF)]
        if not ways:
            return None
        way = min(ways, key=lambda o: o.cost)
        patterns[h], errors[h] = way.pattern, way.error
    return patterns, errors


# -- the layer -----------------------------------------------------------------------------------


def search_layer(
    candidates: Sequence[HeadCandidates],
    shape: AttentionShape,
    costs: CostTable,
    *,
    budget: float,
    block_sizes: Sequence[tuple[int, int]] = DEFAULT_BLOCK_SIZES,
    verify: Callable[[tuple[Pattern, ...]], float] | None = None,
) -> LayerChoice:
    """The fastest plan for one layer whose relative output error stays within `budget`.

    `candidates[h]` holds head h's patterns and measured squared errors; `verify(patterns)`, if
    given, returns the exact squared error of the whole layer with those patterns."""
    if len(candidates) != shape.num_heads:
        raise ValueError(f"search_layer: {len(candidates)} candidate lists for {shape.num_heads} heads")
    if budget < 0:
        raise ValueError(f"search_layer: budget must be >= 0, got {budget}")
    if not block_sizes:
        raise ValueError("search_layer: no block sizes to search")
    block_sizes = launchable_block_sizes(block_sizes, shape, costs.hardware)
    dense = (Dense(),) * shape.num_heads
    dense_seconds, dense_tiles = min((costs.layer_seconds(dense, shape, t), t) for t in block_sizes)
    target = budget ** 2 * sum(c.dense_norm2 for c in candidates)
    allowance = target
    for _ in range(_MAX_TIGHTENINGS + 1):
        choice = _best_over_tiles(candidates, shape, costs, allowance, block_sizes, dense_seconds)
        if choice is None:
            break
        if verify is None:
            return choice
        measured = verify(choice.patterns)
        if measured <= target * (1 + 1e-6):
            return _replace_error(choice, measured)
        log.info("layer squared error %.3g over the allowance %.3g on verification; tightening", measured, target)
        allowance *= 0.9 * target / measured
    return LayerChoice(patterns=dense, head_groups=(tuple(range(shape.num_heads)),), tiles=dense_tiles,
                       squared_error=0.0, seconds=dense_seconds, dense_seconds=dense_seconds)


def launchable_block_sizes(block_sizes: Sequence[tuple[int, int]], shape: AttentionShape,
                           hardware: HardwareProfile) -> list[tuple[int, int]]:
    """The (block_m, block_n) whose kernels fit the target's shared memory a block for this head dim
    and dtype with K and V still double-buffered (codegen.tiles.fit_stages: the launch drops stages
    that do not fit), or if none does, at one stage; on the cpu executor all of them. A plan must
    never pin tiles its GPU cannot launch (head_dim 256 at 128 x 128 needs 450 KB at 2 stages)."""
    if hardware.executor == "cpu":
        return [tuple(t) for t in block_sizes]
    from sparsec.codegen.tiles import fit_stages, tiles_for
    from sparsec.ir.types import torch_dtype

    dtype = torch_dtype(shape.dtype)
    limit = hardware.shared_memory_per_block
    pipelined, fitting = [], []
    for block_m, block_n in block_sizes:
        wanted = tiles_for(block_m, block_n, shape.head_dim, dtype)
        fitted = fit_stages(wanted, shape.head_dim, dtype, limit, shape.value_dim)
        if fitted is not None:
            fitting.append((block_m, block_n))
            if fitted.num_stages >= min(2, wanted.num_stages):  # still double-buffered, as the cost model assumes
                pipelined.append((block_m, block_n))
    fitting = pipelined or fitting
    if not fitting:
        raise ValueError(f"search_layer: none of the block sizes {list(block_sizes)} fits the {limit} bytes of "
                         f"shared memory a block on {hardware.name} at head_dim {shape.head_dim}, {shape.dtype}")
    return fitting


def _best_over_tiles(candidates, shape, costs, allowance, block_sizes, dense_seconds) -> LayerChoice | None:
    """The best plan over the tile sizes. Tile sizes compete on the search's objective (launches
    over EXACT_SCHEDULE_PROGRAMS programs estimated); the winner is then priced exactly, and that
    decides against dense and is what the plan reports."""
    best, best_objective = None, None
    for tiles in block_sizes:
        problem = _LayerProblem(candidates, shape, tuple(tiles), costs, allowance)
        patterns, errors = _solve_tiles(problem)
        objective = problem.objective(patterns)
        if best is None or objective < best_objective:
            best_objective, best = objective, (problem, patterns, errors)
    if best is None:
        return None
    problem, patterns, errors = best
    if problem.objective(patterns, exact=True) >= dense_seconds:
        return None  # sparse is not faster: the layer stays dense
    return LayerChoice(patterns=tuple(patterns), head_groups=head_groups(patterns), tiles=problem.tiles,
                       squared_error=sum(errors), seconds=problem.seconds(patterns, exact=True),
                       dense_seconds=dense_seconds)


def _replace_error(choice: LayerChoice, squared_error: float) -> LayerChoice:
    return LayerChoice(patterns=choice.patterns, head_groups=choice.head_groups, tiles=choice.tiles,
                       squared_error=squared_error, seconds=choice.seconds, dense_seconds=choice.dense_seconds)
