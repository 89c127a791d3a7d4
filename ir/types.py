"""IR types: tensor shapes, dtypes and the sparsity encodings that live inside them.

Sparsity is part of a value's type, so the printer, the verifier and the cost models all see it:

    DenseEncoding()                      nothing is known to be zero (the default, `DENSE`)
    AttentionPatterns(patterns)          one sparsec.patterns.Pattern per query head; only on an
                                         Attention op's `scores` type
    NMSparse(n, m, axis, density)        at most n nonzeros in every m consecutive elements along
                                         `axis` (of a weight: its input dimension)
    BlockSparse(block, density)          whole (rows, cols) blocks are zero
    Unstructured(density)                scattered zeros
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TypeAlias

import torch

from sparsec.patterns import Pattern

__all__ = [
    "Dim", "Sparsity", "DenseEncoding", "AttentionPatterns", "NMSparse", "BlockSparse",
    "Unstructured", "DENSE", "TensorType", "DTYPES", "dtype_name", "torch_dtype", "is_static",
]

# A str is a symbolic dimension: a Dynamo SymInt name ("s0") or a sympy expression ("2*s0").
Dim: TypeAlias = int | str

# Characters a symbolic dimension may use: enough for sympy's str() of size expressions
# (s0, 2*s0 + 1, FloorDiv(s0, 2), Max(1, s0)), nothing that the type syntax uses itself.
_SYMBOLIC_DIM = re.compile(r"[A-Za-z0-9_ +\-*/(),.]+")
_INT_LITERAL = re.compile(r"-?\d+")

# IR dtype name -> torch dtype. Short names keep printed types compact (f32[2, 64]).
DTYPES: dict[str, torch.dtype] = {
    "f64": torch.float64, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16,
    "i64": torch.int64, "i32": torch.int32, "i8": torch.int8, "u8": torch.uint8,
    "bool": torch.bool,
}
_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The IR name of a torch dtype ("f32" for torch.float32)."""
    try:
        return _NAMES[dtype]
    except (KeyError, TypeError):
        raise ValueError(f"dtype {dtype} has no sparsec IR name; supported: "
                         f"{', '.join(str(d) for d in _NAMES)}") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of an IR dtype name (torch.float32 for "f32")."""
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown IR dtype {name!r}; known: {', '.join(DTYPES)}") from None


def is_static(dim: Dim) -> bool:
    """Whether a dimension is a known int (not symbolic)."""
    return isinstance(dim, int)


def _check_density(owner: str, density: float) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"{owner} density must be a float, got {type(density).__name__} {density!r}")
    if not 0.0 <= density <= 1.0:  # also rejects nan
        raise ValueError(f"{owner} density must be in [0, 1], got {density!r}")
    return float(density)


def _check_positive_int(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner} {name} must be a positive int, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Sparsity:
    """Base of the sparsity encodings carried by a TensorType."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DenseEncoding(Sparsity):
    """No structure known: every element may be nonzero."""


DENSE = DenseEncoding()


@dataclass(frozen=True, slots=True, kw_only=True)
class AttentionPatterns(Sparsity):
    """Per-head attention patterns of a score matrix (B, Hq, Sq, Sk): patterns[h] for head h."""

    patterns: tuple[Pattern, ...]

    def __post_init__(self) -> None:
        if isinstance(self.patterns, Pattern) or not isinstance(self.patterns, (tuple, list)):
            raise TypeError("AttentionPatterns.patterns must be a tuple of Patterns (one per head), "
                            f"got {type(self.patterns).__name__}")
        object.__setattr__(self, "patterns", tuple(self.patterns))
        if not self.patterns:
            raise ValueError("AttentionPatterns needs at least one pattern")
        for h, p in enumerate(self.patterns):
            if not isinstance(p, Pattern):
                raise TypeError(f"AttentionPatterns.patterns[{h}] is {type(p).__name__}, not a Pattern")


@dataclass(frozen=True, slots=True, kw_only=True)
class NMSparse(Sparsity):
    """At most n nonzeros in every group of m consecutive elements along `axis`."""

    n: int
    m: int
    axis: int = -1
    density: float

    def __post_init__(self) -> None:
        _check_positive_int("NMSparse", "n", self.n)
        _check_positive_int("NMSparse", "m", self.m)
        if self.n > self.m:
            raise ValueError(f"NMSparse needs 0 < n <= m, got n={self.n}, m={self.m}")
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise TypeError(f"NMSparse axis must be an int, got {self.axis!r}")
        object.__setattr__(self, "density", _check_density("NMSparse", self.density))
        # n of every m elements is the most an N:M tensor can keep.
        if self.density > self.n / self.m:
            raise ValueError(f"NMSparse {self.n}:{self.m} keeps at most {self.n / self.m!r} of "
                             f"the elements, but density={self.density!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockSparse(Sparsity):
    """Zeros come in whole blocks of `block` = (rows, cols); `density` is the kept block fraction."""

    block: tuple[int, int]
    density: float

    def __post_init__(self) -> None:
        if not isinstance(self.block, (tuple, list)) or len(self.block) != 2:
            raise ValueError(f"BlockSparse block must be a (rows, cols) pair, got {self.block!r}")
        object.__setattr__(self, "block", tuple(self.block))
        _check_positive_int("BlockSparse", "block rows", self.block[0])
        _check_positive_int("BlockSparse", "block cols", self.block[1])
        object.__setattr__(self, "density", _check_density("BlockSparse", self.density))


@dataclass(frozen=True, slots=True, kw_only=True)
class Unstructured(Sparsity):
    """Scattered zeros; `density` is the nonzero fraction."""

    density: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "density", _check_density("Unstructured", self.density))


def _check_dim(dim: object) -> None:
    if isinstance(dim, bool):
        raise TypeError(f"a dimension must be an int or a str, got bool {dim!r}")
    if isinstance(dim, int):
        if dim < 0:
            raise ValueError(f"a dimension must be >= 0, got {dim}")
        return
    if not isinstance(dim, str):
        raise TypeError(f"a dimension must be an int or a str, got {type(dim).__name__} {dim!r}")
    # The printer writes a symbolic dim as is, so it must read back as the same str.
    if not dim or dim != dim.strip() or not _SYMBOLIC_DIM.fullmatch(dim):
        raise ValueError(f"symbolic dimension {dim!r} must be a non-empty size expression "
                         "(letters, digits, _ + - * / ( ) , . and inner spaces)")
    if _INT_LITERAL.fullmatch(dim):
        raise ValueError(f"symbolic dimension {dim!r} is an int literal; use the int {int(dim)}")
    if not _parens_balanced(dim):
        raise ValueError(f"symbolic dimension {dim!r} has unbalanced parentheses")


def _parens_balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorType:
    """Shape (ints or symbolic strs), dtype name ("f32", ...) and sparsity of a tensor."""

    shape: tuple[Dim, ...]
    dtype: str
    sparsity: Sparsity = DENSE

    def __post_init__(self) -> None:
        if not isinstance(self.shape, (tuple, list)):
            raise TypeError(f"TensorType shape must be a tuple of dims, got {type(self.shape).__name__}")
        object.__setattr__(self, "shape", tuple(self.shape))
        for dim in self.shape:
            _check_dim(dim)
        torch_dtype(self.dtype)  # raises on an unknown name
        if not isinstance(self.sparsity, Sparsity):
            raise TypeError(f"TensorType sparsity must be a Sparsity encoding, got {self.sparsity!r}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_dense(self) -> bool:
        return isinstance(self.sparsity, DenseEncoding)

    @property
    def numel(self) -> int | None:
        """Number of elements when every dim is static, else None."""
        if not all(is_static(d) for d in self.shape):
            return None
        return math.prod(self.shape)  # type: ignore[arg-type]

    def with_sparsity(self, sparsity: Sparsity) -> TensorType:
        return TensorType(shape=self.shape, dtype=self.dtype, sparsity=sparsity)
