"""choose_linear_kernels: pick, per Linear op, the dense GEMM or a sparse kernel for its weight.

The candidates follow the weight's type (set by analyze_weights) and the kernels sparsec has
(codegen/linear_triton.py, codegen/linear_cpu.py):

    BlockSparse(block=(R, C))   "bsrRxC"    R, C powers of two in [16, 256] that tile the weight
    NMSparse(n, m), input axis  "nmN:M"     m a power of two <= 64 that divides in_features
                                "semi2:4"   also, for n:4 with n <= 2, f16 / bf16, dims % 64 == 0,
                                            on a GPU target (torch's semi-structured kernels)
    Unstructured                "unstructured"  f32 / bf16 on a CPU target where the native kernels load
                                            (codegen/linear_cpu_native.py)
    DENSE                       none

Each candidate is priced with cost_models.estimate_linear_seconds on `config.hardware()`
against the dense GEMM (an N:M kernel at n/m of the weight, what it reads; semi2:4 at half the
arithmetic). The option `weight_sparsity` decides:

    "off"     every Linear stays dense
    "always"  the cheapest candidate, whatever the dense GEMM costs
    "auto"    a candidate only where it is cheaper than the dense GEMM by SPARSE_MARGIN: at the op's
              token count (x's leading dims) when it is static; when it is symbolic (dynamic
              shapes), over the token range [min_tokens, max_tokens] where it wins, found by
              searching the crossovers, and the op dispatches at run time by that range

The margin (10%, on every target) keeps near-ties dense: within it the estimates cannot tell the
kernels apart (the CPU linear model's rms log error is 0.2, and its misses were all near-ties,
such as 50% blocks at one token: estimated 1.00x, measured dense 1-23% faster; no GPU figure
has been measured yet), and a sparse kernel, a custom op, also stops Inductor fusing the
layer's neighbours into it, on a GPU as on a CPU.

The choice is recorded on the op (kernel, min_tokens, max_tokens) and printed in the IR:
    %y: f32[s0, 128] = linear %x, %w, none {kernel = "nm2:4", max_tokens = 1536, module = "fc1"}
Only exact zeros are skipped, so every choice computes the same function.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparsec.config import SparsecConfig
from sparsec.cost_models import estimate_linear_seconds
from sparsec.cost_models.hardware import HardwareProfile
from sparsec.ir.graph import Graph
from sparsec.ir.ops import Linear, Op
from sparsec.ir.types import DENSE, BlockSparse, NMSparse, Unstructured, is_static, torch_dtype

__all__ = ["beats_dense", "choose_linear_kernels", "linear_candidates", "winning_tokens", "MAX_SEARCH_TOKENS",
           "SPARSE_MARGIN"]

log = logging.getLogger(__name__)

PRICED_DTYPES = ("f32", "f16", "bf16")  # the dtypes the kernels and the cost model know
MAX_SEARCH_TOKENS = 1 << 30  # a kernel that still wins here is taken as winning at any count
SPARSE_MARGIN = 0.1  # "auto" takes a sparse kernel only where it is estimated this much faster than dense
_MIN_BLOCK, _MAX_BLOCK, _MAX_GROUP, _SEMI_TILE = 16, 256, 64, 64

Cost = Callable[[int], float]


@dataclass(frozen=True, slots=True)
class Candidate:
    kernel: str
    seconds: Cost  # token count -> estimated seconds


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _is_gpu(hardware: HardwareProfile) -> bool:
    return hardware.executor != "cpu"


def _bsr_fits(block: tuple[int, int], shape: tuple) -> bool:
    return (all(_power_of_two(b) and _MIN_BLOCK <= b <= _MAX_BLOCK for b in block)
            and all(is_static(d) and d % b == 0 for d, b in zip(shape, block)))


def _nm_fits(enc: NMSparse, shape: tuple) -> bool:
    return enc.axis in (-1, 1) and _power_of_two(enc.m) and enc.m <= _MAX_GROUP and shape[1] % enc.m == 0


def _semi_fits(enc: NMSparse, shape: tuple, dtype: str, hardware: HardwareProfile) -> bool:
    return (enc.m == 4 and enc.n <= 2 and dtype in ("f16", "bf16") and _is_gpu(hardware)
            and hasattr(torch.sparse, "to_sparse_semi_structured") and all(d % _SEMI_TILE == 0 for d in shape))


def _unstructured_fits(dtype: str, hardware: HardwareProfile) -> bool:
    from sparsec.codegen.linear_cpu_native import VALUE_DTYPES, native_linear_available

    return not _is_gpu(hardware) and torch_dtype(dtype) in VALUE_DTYPES and native_linear_available()


def _pricer(op: Linear, hardware: HardwareProfile, sparsity, semi: bool = False) -> Cost:
    (N, K), dtype = op.weight.type.shape, op.x.type.dtype
    return functools.partial(_price, N=N, K=K, dtype=dtype, sparsity=sparsity, hardware=hardware,
                             bias=op.bias is not None, semi=semi)


def _price(tokens: int, *, N, K, dtype, sparsity, hardware, bias, semi) -> float:
    return estimate_linear_seconds(tokens, N, K, dtype, sparsity, hardware, bias=bias, semi_structured=semi)


def linear_candidates(op: Linear, hardware: HardwareProfile) -> list[Candidate]:
    """The sparse kernels that fit `op`'s weight on `hardware`, each with its cost function."""
    w = op.weight.type
    if w.rank != 2 or not all(is_static(d) for d in w.shape) or op.x.type.dtype not in PRICED_DTYPES:
        return []
    enc = w.sparsity
    if isinstance(enc, Unstructured):
        return [Candidate("unstructured", _pricer(op, hardware, enc))] if _unstructured_fits(w.dtype, hardware) else []
    if isinstance(enc, BlockSparse) and _bsr_fits(enc.block, w.shape):
        return [Candidate(f"bsr{enc.block[0]}x{enc.block[1]}", _pricer(op, hardware, enc))]
    if not (isinstance(enc, NMSparse) and _nm_fits(enc, w.shape)):
        return []
    # The N:M kernel reads n/m of the weight whatever its nonzero fraction.
    read = NMSparse(n=enc.n, m=enc.m, axis=enc.axis, density=enc.n / enc.m)
    found = [Candidate(f"nm{enc.n}:{enc.m}", _pricer(op, hardware, read))]
    if _semi_fits(enc, w.shape, w.dtype, hardware):
        found.append(Candidate("semi2:4", _pricer(op, hardware, NMSparse(n=2, m=4, density=0.5), semi=True)))
    return found


def _tokens(op: Linear) -> int | None:
    lead = op.x.type.shape[:-1]
    return math.prod(lead) if all(is_static(d) for d in lead) else None  # type: ignore[arg-type]


# -- the token range where a kernel wins -----------------------------------------------------------


def _first_winner(wins: Callable[[int], bool], lo: int, hi: int) -> int:
    """The smallest t in (lo, hi] with wins(t), given not wins(lo) and wins(hi)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if wins(mid) else (mid, hi)
    return hi


def _last_winner(wins: Callable[[int], bool], lo: int, hi: int) -> int:
    """The largest t in [lo, hi) with wins(t), given wins(lo) and not wins(hi)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if wins(mid) else (lo, mid)
    return lo


def beats_dense(sparse_seconds: float, dense_seconds: float) -> bool:
    """Whether "auto" takes a sparse kernel estimated at `sparse_seconds` over the dense GEMM's
    `dense_seconds`: only SPARSE_MARGIN faster (module docstring)."""
    return sparse_seconds < (1 - SPARSE_MARGIN) * dense_seconds


def winning_tokens(sparse: Cost, dense: Cost) -> tuple[int, int | None] | None:
    """(min_tokens, max_tokens) where sparse(t) < (1 - SPARSE_MARGIN) * dense(t), max None for no
    upper bound; None if it never wins. The costs are sums and maxima of linear functions of t
    (the CPU's also step, at 2 tokens where dense turns GEMM and at codegen.linear_cpu.FEW_TOKENS),
    so the winning counts form one range or a few: each run of winning powers of two up to
    MAX_SEARCH_TOKENS, its ends found by bisection; of several ranges the best (_better_range),
    since a layer dispatches by one."""
    def wins(t: int) -> bool:
        return beats_dense(sparse(t), dense(t))

    grid = [1 << i for i in range(MAX_SEARCH_TOKENS.bit_length())]
    won = [wins(t) for t in grid]
    ranges = []
    for first in (i for i in range(len(grid)) if won[i] and (i == 0 or not won[i - 1])):
        last = first
        while last + 1 < len(grid) and won[last + 1]:
            last += 1
        low = 0 if first == 0 else _first_winner(wins, grid[first - 1], grid[first])
        high = None if last + 1 == len(grid) else _last_winner(wins, grid[last], grid[last + 1])
        ranges.append((low, high))
    return max(ranges, key=_better_range) if ranges else None


def _better_range(token_range: tuple[int, int | None]) -> tuple:
    """Sort key of winning token ranges: no upper bound beats any, then the higher end, then the lower start."""
    low, high = token_range
    return high is None, high or 0, -low


# -- the choice ------------------------------------------------------------------------------------


def _choice(op: Linear, mode: str, hardware: HardwareProfile) -> tuple[str, int, int | None]:
    """(kernel, min_tokens, max_tokens) for `op` under weight_sparsity `mode`."""
    candidates = linear_candidates(op, hardware) if mode != "off" else []
    if not candidates:
        return "dense", 0, None
    tokens = _tokens(op)
    if mode == "always":
        return min(candidates, key=lambda c: c.seconds(tokens or 1)).kernel, 0, None
    dense = _pricer(op, hardware, DENSE)
    if tokens is not None:
        best = min(candidates, key=lambda c: c.seconds(tokens))
        log.debug("linear %s: %s %.3g s vs dense %.3g s at %d tokens", op.module_path, best.kernel,
                  best.seconds(tokens), dense(tokens), tokens)
        return (best.kernel, 0, None) if beats_dense(best.seconds(tokens), dense(tokens)) else ("dense", 0, None)
    ranges = [(c, winning_tokens(c.seconds, dense)) for c in candidates]
    ranges = [(c, r) for c, r in ranges if r is not None]
    if not ranges:
        return "dense", 0, None
    best, (low, high) = max(ranges, key=lambda cr: _better_range(cr[1]))
    return best.kernel, low, high


def _choose(op: Linear, mode: str, hardware: HardwareProfile) -> Op:
    kernel, min_tokens, max_tokens = _choice(op, mode, hardware)
    if kernel != "dense":
        log.info("linear %s: kernel %s for tokens %d..%s", op.module_path or op.result.name, kernel,
                 min_tokens, "" if max_tokens is None else max_tokens)
    return dataclasses.replace(op, kernel=kernel, min_tokens=min_tokens, max_tokens=max_tokens)


def choose_linear_kernels(graph: Graph, config: SparsecConfig) -> Graph:
    """`graph` with a kernel chosen for each Linear op by `config.weight_sparsity`."""
    mode = config.weight_sparsity
    hardware = config.hardware() if mode != "off" and graph.ops_of(Linear) else None
    ops = [_choose(op, mode, hardware) if isinstance(op, Linear) else op for op in graph.ops]
    return graph.replace_ops(ops, provenance="choose_linear_kernels")
