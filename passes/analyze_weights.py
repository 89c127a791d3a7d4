"""Exact structure of a linear layer's weight: N:M, block sparsity, scattered zeros, or dense.

`weight_sparsity(weight)` looks at which entries of a 2-D weight (out_features, in_features) are
exactly zero and returns the IR sparsity encoding that describes them without loss:

- N:M along the input dimension, M in (4, 8, 16): n = the most nonzeros any group of M holds.
  Worth recording when n / M <= NM_MAX_DENSITY. The lowest n / M wins, ties go to the smallest M,
  so a weight pruned to 2:4 is reported as 2:4 (not as the equally dense 4:8).
- Block sparsity, blocks (rows, cols) with rows, cols in (16, 32, 64, 128) that divide the shape:
  density = the fraction of blocks holding a nonzero. The lowest density wins; ties go to the
  largest block, since larger blocks make faster kernels and cost nothing here.
- When both exist, the one that computes less wins (n / M against the block density); ties go to
  N:M. Otherwise, a weight with at least 1 - UNSTRUCTURED_MAX_DENSITY of zeros is Unstructured,
  and anything else is DENSE.

Only exact zeros count: nothing is approximated, so any kernel chosen from the encoding computes
the same function as the dense weight.

The pipeline stage `analyze_weights(graph, weights)` puts that encoding into the type of every
Param value a Linear op reads as its weight (and into every use of that value), so the IR dumps
show it: `%w: f32[64, 128]<block 32x32 density=0.5> = param "fc1.weight"`. `weights` maps
parameter paths (Param.target) to the real tensors; a weight without a concrete value there (a
fake or meta tensor, or none) keeps the type it has. A model's graphs (prefill and decoding
steps, graph breaks) share their weights: each tensor's encoding is found once for its current
values (codegen.weight_guard.weight_key, and the same tensor object) and reused.
"""
from __future__ import annotations

import dataclasses
import logging
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import is_fake

from sparsec.codegen.weight_guard import weight_key
from sparsec.ir.graph import Graph
from sparsec.ir.ops import Linear, Op, Value
from sparsec.ir.types import Sparsity

__all__ = [
    "BLOCK_SIZES", "NM_GROUP_SIZES", "NM_MAX_DENSITY", "UNSTRUCTURED_MAX_DENSITY",
    "BlockStructure", "NMStructure", "analyze_weights", "block_structure", "nm_structure", "weight_sparsity",
]

log = logging.getLogger(__name__)

NM_GROUP_SIZES = (4, 8, 16)
BLOCK_SIZES = (16, 32, 64, 128)
NM_MAX_DENSITY = 0.5  # an N:M kernel computes n / M of the dense work; above half it cannot win
UNSTRUCTURED_MAX_DENSITY = 0.9  # fewer than 10% zeros is reported as dense
_ANALYZED_MAX = 4096  # weights whose encodings are remembered (the least recently used go first)
_analyzed: OrderedDict[tuple, tuple[weakref.ref, Sparsity]] = OrderedDict()


@dataclass(frozen=True, slots=True)
class NMStructure:
    n: int
    m: int
    nonzero_fraction: float

    @property
    def work_fraction(self) -> float:
        return self.n / self.m


@dataclass(frozen=True, slots=True)
class BlockStructure:
    block: tuple[int, int]
    density: float  # fraction of blocks with a nonzero


def weight_sparsity(weight: torch.Tensor):
    """The IR encoding (NMSparse, BlockSparse, Unstructured or DENSE) of a 2-D weight's exact zeros."""
    from sparsec.ir.types import DENSE, BlockSparse, NMSparse, Unstructured

    nonzero = _nonzero_mask(weight)
    nm = nm_structure(nonzero)
    block = block_structure(nonzero)
    if nm is not None and (block is None or nm.work_fraction <= block.density):
        encoding = NMSparse(n=nm.n, m=nm.m, axis=-1, density=nm.nonzero_fraction)
    elif block is not None:
        encoding = BlockSparse(block=block.block, density=block.density)
    elif _fraction(nonzero) <= UNSTRUCTURED_MAX_DENSITY:
        encoding = Unstructured(density=_fraction(nonzero))
    else:
        encoding = DENSE
    log.debug("weight_sparsity: %s weight -> %s (N:M %s, blocks %s)", tuple(weight.shape), encoding, nm, block)
    return encoding


def _nonzero_mask(weight: torch.Tensor) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight_sparsity: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight_sparsity: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if weight.device.type == "meta":
        raise ValueError("weight_sparsity: the weight is a meta tensor; its values are needed to find its zeros")
    return weight.detach() != 0


def _fraction(mask: torch.Tensor) -> float:
    return mask.sum().item() / max(1, mask.numel())


def nm_structure(nonzero: torch.Tensor) -> NMStructure | None:
    """The sparsest N:M (along dim 1) that the bool `nonzero` mask satisfies, or None."""
    candidates = []
    for m, counts in _group_counts(nonzero):
        n = int(counts.max().item())
        if 0 < n <= m * NM_MAX_DENSITY:
            candidates.append((n / m, m, n))
    if not candidates:
        return None
    _, m, n = min(candidates)  # lowest n / m, then smallest m
    return NMStructure(n, m, _fraction(nonzero))


def _group_counts(nonzero: torch.Tensor):
    """(m, nonzeros in each group of m consecutive inputs) for each m of NM_GROUP_SIZES that divides
    the columns. Each size is a multiple of the one before, so its counts sum the previous counts
    (one pass over the weight's bytes, then ever smaller maps; uint8 is enough for m <= 255)."""
    rows, cols = nonzero.shape
    if nonzero.numel() == 0:
        return
    counts, width = nonzero.contiguous().view(torch.uint8), 1
    for m in NM_GROUP_SIZES:
        if cols % m:
            return  # nor does any larger size, a multiple of m
        counts = counts.view(rows, cols // m, m // width).sum(dim=-1, dtype=torch.uint8)
        width = m
        yield m, counts


def block_structure(nonzero: torch.Tensor) -> BlockStructure | None:
    """The block shape with the fewest nonzero blocks (ties: the largest block), or None when no
    block shape divides the weight or every block holds a nonzero."""
    rows, cols = nonzero.shape
    smallest = BLOCK_SIZES[0]
    if rows == 0 or cols == 0 or rows % smallest or cols % smallest:
        return None
    # Every block size is a multiple of the smallest: reduce the smallest blocks' map further
    # instead of rescanning the whole weight for each of the 16 shapes.
    base = _any_in_blocks(nonzero, smallest, smallest)
    candidates = []
    for bo in BLOCK_SIZES:
        for bi in BLOCK_SIZES:
            if rows % bo or cols % bi:
                continue
            density = _fraction(_any_in_blocks(base, bo // smallest, bi // smallest))
            candidates.append((density, -bo * bi, abs(bo - bi), (bo, bi)))
    density, _, _, block = min(candidates)
    return BlockStructure(block, density) if density < 1.0 else None


def _any_in_blocks(mask: torch.Tensor, bo: int, bi: int) -> torch.Tensor:
    rows, cols = mask.shape
    return mask.view(rows // bo, bo, cols // bi, bi).any(dim=3).any(dim=1)


# -- the pipeline stage ----------------------------------------------------------------------------


def analyze_weights(graph: Graph, weights: Mapping[str, torch.Tensor]) -> Graph:
    """`graph` with each linear weight's Param type carrying `weight_sparsity` of its real value."""
    linear_weights = {op.weight.name for op in graph.ops_of(Linear)}
    typed: dict[str, Value] = {}
    for param in graph.params:
        value = param.result
        encoding = _encoding(weights.get(param.target), value) if value.name in linear_weights else None
        if encoding is not None and encoding != value.type.sparsity:
            typed[value.name] = Value(name=value.name, type=value.type.with_sparsity(encoding))
            log.debug("analyze_weights: %s is %s", param.target, encoding)
    return graph.replace_ops([_with_values(op, typed) for op in graph.ops], provenance="analyze_weights")


def _encoding(tensor: torch.Tensor | None, value: Value) -> Sparsity | None:
    """The encoding of a concrete weight whose shape matches its IR value, else None."""
    if not isinstance(tensor, torch.Tensor) or is_fake(tensor) or tensor.device.type == "meta":
        return None
    if tuple(tensor.shape) != value.type.shape:
        log.info("analyze_weights: %%%s has shape %s in the IR but its tensor is %s; left as it is",
                 value.name, value.type.shape, tuple(tensor.shape))
        return None
    try:
        return _remembered_sparsity(tensor)
    except (TypeError, ValueError, RuntimeError) as e:  # e.g. a tensor subclass: keep the layer, unanalysed
        log.info("analyze_weights: cannot read the zeros of %%%s (%s); left as it is", value.name, e)
        return None


def _remembered_sparsity(tensor: torch.Tensor) -> Sparsity:
    """weight_sparsity(tensor), reused while the same tensor keeps the same key (an in-place write
    bumps _version; a new tensor at the same address is another object)."""
    key = weight_key(tensor)
    seen = _analyzed.get(key)
    if seen is not None and seen[0]() is tensor:
        _analyzed.move_to_end(key)
        return seen[1]
    encoding = weight_sparsity(tensor)
    _analyzed[key] = (weakref.ref(tensor), encoding)
    while len(_analyzed) > _ANALYZED_MAX:
        _analyzed.popitem(last=False)
    return encoding


def _with_values(op: Op, typed: dict[str, Value]) -> Op:
    """`op` with every operand or result named in `typed` replaced by typed[name]."""
    def swap(item):
        return typed.get(item.name, item) if isinstance(item, Value) else item

    changes = {}
    for f in dataclasses.fields(op):
        old = getattr(op, f.name)
        new = tuple(swap(v) for v in old) if isinstance(old, tuple) else swap(old)
        if new != old:
            changes[f.name] = new
    return dataclasses.replace(op, **changes) if changes else op
