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

BlockSparse options pay BLOCK_SPARSE_MARGIN in the knapsack: a layout is tied to one sequence
length and to the calibration inputs, so a closed-form family wins unless blocks are clearly
faster. Reported times are the cost model's, without the margin.
"""
from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sparsec.cost_models.attention_cost import AttentionShape, estimate_attention
from sparsec.cost_models.hardware import HardwareProfile
from sparsec.passes.fit_candidates import HeadCandidates
from sparsec.patterns import BlockSparse, Columns, Dense, MultiDiagonal, Pattern, VerticalSlash, Window

__all__ = [
    "DEFAULT_BLOCK_SIZES", "BLOCK_SPARSE_MARGIN", "CostTable", "LayerChoice", "MIN_HEAD_SAVING", "Option", "head_groups", "reexpress",
    "search_layer", "solve_knapsack",
]

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZES = tuple((bm, bn) for bm in (64, 128) for bn in (32, 64, 128))
BLOCK_SPARSE_MARGIN = 1.25
# A sparse option must save this share of the head's dense cost: below it, the saving is within
# the cost model's error, and the exact dense head is worth more than an approximation.
MIN_HEAD_SAVING = 0.1
_MAX_TIGHTENINGS = 4
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
    from sparsec.codegen.attention_triton import pattern_family as kernel_family

    return kernel_family(pattern)


def head_groups(patterns: Sequence[Pattern]) -> tuple[tuple[int, ...], ...]:
    """Heads that run in one launch: those of one family, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for h, p in enumerate(patterns):
        groups.setdefault(pattern_family(p), []).append(h)
    return tuple(tuple(heads) for heads in groups.values())


class CostTable:
    """Cost-model seconds, cached by (shape, pattern, tiles) so layers of one shape and heads
    that share a candidate ask the model once."""

    def __init__(self, hardware: HardwareProfile):
        self.hardware = hardware
        self._head: dict[tuple, float] = {}

    def head_seconds(self, pattern: Pattern, shape: AttentionShape, tiles: tuple[int, int]) -> float:
        """One head's share of a launch that runs `pattern` on every head of the layer, launch
        overhead excluded (groups pay it once, see layer_seconds)."""
        key = (shape, pattern, tiles)
        if key not in self._head:
            everyone = tuple(range(shape.num_heads))
            est = estimate_attention((pattern,) * shape.num_heads, shape, self.hardware,
                                     block_m=tiles[0], block_n=tiles[1], head_groups={"all": everyone})
            self._head[key] = max(0.0, est.seconds - self.hardware.launch_overhead_s) / shape.num_heads
        return self._head[key]

    def layer_seconds(self, patterns: Sequence[Pattern], shape: AttentionShape, tiles: tuple[int, int]) -> float:
        """The whole layer: one launch per family group, scheduled over the SMs."""
        groups = {str(g): g for g in head_groups(patterns)}
        return estimate_attention(tuple(patterns), shape, self.hardware, block_m=tiles[0], block_n=tiles[1],
                                  head_groups=groups).seconds


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

    def options(self, h: int) -> list[Option]:
        dense_cost = self.costs.head_seconds(Dense(), self.shape, self.tiles)
        found = [Option(dense_cost, 0.0, Dense())]
        for p, err in zip(self.candidates[h].patterns, self.candidates[h].squared_errors):
            if isinstance(p, Dense) or (isinstance(p, BlockSparse) and p.block != self.tiles):
                continue  # each tile size has its own block layouts
            if err > self.allowance * (1 + _ROUNDOFF):
                continue
            cost = self.costs.head_seconds(p, self.shape, self.tiles)
            if cost <= (1 - MIN_HEAD_SAVING) * dense_cost:
                found.append(Option(cost * BLOCK_SPARSE_MARGIN if isinstance(p, BlockSparse) else cost, err, p))
        return found

    def seconds(self, patterns: Sequence[Pattern]) -> float:
        return self.costs.layer_seconds(patterns, self.shape, self.tiles)

    def objective(self, patterns: Sequence[Pattern]) -> float:
        """What the search minimizes: the layer's seconds plus the BlockSparse margin."""
        margin = sum(self.costs.head_seconds(p, self.shape, self.tiles) for p in patterns if isinstance(p, BlockSparse))
        return self.seconds(patterns) + (BLOCK_SPARSE_MARGIN - 1) * margin


def _solve_tiles(problem: _LayerProblem) -> tuple[list[Pattern], list[float]]:
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


def _best_over_tiles(candidates, shape, costs, allowance, block_sizes, dense_seconds) -> LayerChoice | None:
    best, best_objective = None, None
    for tiles in block_sizes:
        problem = _LayerProblem(candidates, shape, tuple(tiles), costs, allowance)
        patterns, errors = _solve_tiles(problem)
        objective = problem.objective(patterns)
        if best is None or objective < best_objective:
            best_objective = objective
            best = LayerChoice(patterns=tuple(patterns), head_groups=head_groups(patterns), tiles=tuple(tiles),
                               squared_error=sum(errors), seconds=problem.seconds(patterns),
                               dense_seconds=dense_seconds)
    if best is None or best_objective >= dense_seconds:
        return None  # sparse is not faster: the layer stays dense
    return best


def _replace_error(choice: LayerChoice, squared_error: float) -> LayerChoice:
    return LayerChoice(patterns=choice.patterns, head_groups=choice.head_groups, tiles=choice.tiles,
                       squared_error=squared_error, seconds=choice.seconds, dense_seconds=choice.dense_seconds)
