"""IR ops: SSA values and the few op kinds sparsec understands; everything else is Opaque.

Each op is a frozen dataclass whose `result` (or `results`, for Opaque) is the Value it defines
and whose operands are Values defined earlier in the graph. `operands_of(op)` and
`results_of(op)` give both sides uniformly, so passes and the verifier need no per-kind code.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields

from .types import TensorType

__all__ = [
    "Value", "Op", "Param", "Input", "Linear", "Attention", "Opaque", "Output",
    "operands_of", "results_of", "OP_KINDS", "linear_kernel_format",
]

# Value names are printed as %name: FX node names and plain counters both fit.
_VALUE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]*")


@dataclass(frozen=True, slots=True, kw_only=True)
class Value:
    """An SSA value, printed %name."""

    name: str
    type: TensorType

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _VALUE_NAME.fullmatch(self.name):
            raise ValueError(f"value name {self.name!r} must be letters, digits, '_' or '.' "
                             "(not starting with '.')")
        if not isinstance(self.type, TensorType):
            raise TypeError(f"value %{self.name} needs a TensorType, got {type(self.type).__name__}")


def _check_value(op: str, field: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, Value):
        raise TypeError(f"{op}.{field} must be a Value, got {type(value).__name__} {value!r}")


def _check_str(op: str, field: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{op}.{field} must be a str, got {type(value).__name__} {value!r}")


def _check_int(op: str, field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}.{field} must be an int, got {type(value).__name__} {value!r}")


def _as_tuple(op: object, field: str, kind: type) -> None:
    """Store a sequence field as a tuple (tuple children keep ops hashable and comparable)."""
    items = getattr(op, field)
    name = type(op).__name__
    if isinstance(items, (str, bytes)) or not isinstance(items, (tuple, list)):
        raise TypeError(f"{name}.{field} must be a tuple, got {type(items).__name__}")
    for i, item in enumerate(items):
        if not isinstance(item, kind):
            raise TypeError(f"{name}.{field}[{i}] must be a {kind.__name__}, got {item!r}")
    object.__setattr__(op, field, tuple(items))


@dataclass(frozen=True, slots=True, kw_only=True)
class Op:
    """Base of all ops."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Param(Op):
    """A constant parameter or buffer; target is its module path ("blocks.0.attn.qkv.weight")."""

    result: Value
    target: str

    def __post_init__(self) -> None:
        _check_value("Param", "result", self.result)
        _check_str("Param", "target", self.target)


@dataclass(frozen=True, slots=True, kw_only=True)
class Input(Op):
    """The graph's runtime input number `index`."""

    result: Value
    index: int

    def __post_init__(self) -> None:
        _check_value("Input", "result", self.result)
        _check_int("Input", "index", self.index)
        if self.index < 0:
            raise ValueError(f"Input.index must be >= 0, got {self.index}")


# Kernel names of a Linear op: the dense GEMM, or a sparse kernel for the weight's structure.
_LINEAR_KERNEL = re.compile(r"dense|bsr(\d+)x(\d+)|nm(\d+):(\d+)|semi2:4|unstructured")


def linear_kernel_format(kernel: str) -> tuple[str, tuple[int, ...]]:
    """("dense", ()), ("bsr", (rows, cols)), ("nm", (n, m)), ("semi", (2, 4)) or ("unstructured", ())
    for a kernel name ("dense", "bsr64x64", "nm2:4", "semi2:4", "unstructured"); raises ValueError
    for anything else."""
    m = _LINEAR_KERNEL.fullmatch(kernel) if isinstance(kernel, str) else None
    if m is None:
        raise ValueError(f"unknown linear kernel {kernel!r}; expected dense, bsrRxC (e.g. bsr64x64), "
                         "nmN:M (e.g. nm2:4), semi2:4 or unstructured")
    if m.group(1):
        return "bsr", (int(m.group(1)), int(m.group(2)))
    if m.group(3):
        return "nm", (int(m.group(3)), int(m.group(4)))
    if kernel == "semi2:4":
        return "semi", (2, 4)
    return (kernel, ())


@dataclass(frozen=True, slots=True, kw_only=True)
class Linear(Op):
    """y = x @ weight.T + bias; weight's TensorType.sparsity tells its structure.

    `kernel` is what computes it (passes/choose_linear_kernels.py): "dense", or a sparse kernel
    for the weight's structure, "bsrRxC" (block-sparse, R x C blocks), "nmN:M" (N:M along the
    input features), "semi2:4" (torch's 2:4 semi-structured, CUDA) or "unstructured" (scattered
    zeros: the CPU executor's native kernels). A sparse kernel runs when
    the call's token count (x's leading dims) is in [min_tokens, max_tokens] (max_tokens None:
    no upper bound), the dense GEMM otherwise.
    """

    result: Value
    x: Value
    weight: Value
    bias: Value | None = None
    module_path: str = ""
    kernel: str = "dense"
    min_tokens: int = 0
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        for field in ("result", "x", "weight"):
            _check_value("Linear", field, getattr(self, field))
        _check_value("Linear", "bias", self.bias, optional=True)
        _check_str("Linear", "module_path", self.module_path)
        linear_kernel_format(self.kernel)
        _check_int("Linear", "min_tokens", self.min_tokens)
        if self.max_tokens is not None:
            _check_int("Linear", "max_tokens", self.max_tokens)
        if self.min_tokens < 0 or (self.max_tokens is not None and self.max_tokens < self.min_tokens):
            raise ValueError(f"Linear tokens need 0 <= min_tokens <= max_tokens, got "
                             f"min_tokens={self.min_tokens}, max_tokens={self.max_tokens}")
        if self.kernel == "dense" and (self.min_tokens, self.max_tokens) != (0, None):
            raise ValueError("Linear min_tokens / max_tokens bound a sparse kernel; the dense kernel takes none")


@dataclass(frozen=True, slots=True, kw_only=True)
class Attention(Op):
    """softmax(q k^T * scale [+ mask]) v per head, q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D[v]).

    `scores` is the type of the implicit score matrix (B, Hq, Sq, Sk); its sparsity (DENSE or
    AttentionPatterns) holds the per-head patterns. `mask` is an optional bool mask or additive
    float bias broadcastable to the scores. softcap > 0 caps each score s (after the scale, before
    the mask) to softcap * tanh(s / softcap) (Gemma 2); 0: no capping. `sinks`: an optional tensor of
    Hq logits (GPT-OSS), each joining its head's softmax as a score with no value.
    """

    result: Value
    q: Value
    k: Value
    v: Value
    mask: Value | None = None
    scale: float
    causal: bool = False
    num_heads: int
    num_kv_heads: int
    scores: TensorType
    module_path: str = ""
    tiles: tuple[int, int] | None = None   # (block_m, block_n) the kernels use; None: their default
    # with a mask and patterns: which masks the patterns run under ("", "keys", "causal:D": sparsec/key_padding.py);
    # a plan's rule, with or without a mask, also keeps the blocks past its block layouts in longer calls
    mask_rule: str = ""
    softcap: float = 0.0
    sinks: Value | None = None

    def __post_init__(self) -> None:
        for field in ("result", "q", "k", "v"):
            _check_value("Attention", field, getattr(self, field))
        _check_value("Attention", "sinks", self.sinks, optional=True)
        if (isinstance(self.softcap, bool) or not isinstance(self.softcap, (int, float))
                or not 0 <= self.softcap < float("inf")):
            raise TypeError(f"Attention.softcap must be a finite float >= 0 (0: no capping), got {self.softcap!r}")
        object.__setattr__(self, "softcap", float(self.softcap))
        _check_value("Attention", "mask", self.mask, optional=True)
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise TypeError(f"Attention.scale must be a float, got {self.scale!r}")
        object.__setattr__(self, "scale", float(self.scale))
        if not isinstance(self.causal, bool):
            raise TypeError(f"Attention.causal must be a bool, got {self.causal!r}")
        _check_int("Attention", "num_heads", self.num_heads)
        _check_int("Attention", "num_kv_heads", self.num_kv_heads)
        if not isinstance(self.scores, TensorType):
            raise TypeError(f"Attention.scores must be a TensorType, got {self.scores!r}")
        _check_str("Attention", "module_path", self.module_path)
        if self.tiles is not None:
            if (not isinstance(self.tiles, tuple) or len(self.tiles) != 2
                    or not all(isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in self.tiles)):
                raise TypeError(f"Attention.tiles must be None or two positive ints (block_m, block_n), got {self.tiles!r}")
        from sparsec.key_padding import check_mask_rule

        check_mask_rule(self.mask_rule)


@dataclass(frozen=True, slots=True, kw_only=True)
class Opaque(Op):
    """A region of FX nodes (by node name) that sparsec does not understand; run as it was."""

    results: tuple[Value, ...]
    inputs: tuple[Value, ...]
    fx_nodes: tuple[str, ...]

    def __post_init__(self) -> None:
        _as_tuple(self, "results", Value)
        _as_tuple(self, "inputs", Value)
        _as_tuple(self, "fx_nodes", str)


@dataclass(frozen=True, slots=True, kw_only=True)
class Output(Op):
    """The graph's return values."""

    values: tuple[Value, ...]

    def __post_init__(self) -> None:
        _as_tuple(self, "values", Value)


OP_KINDS: tuple[type[Op], ...] = (Param, Input, Linear, Attention, Opaque, Output)


def results_of(op: Op) -> tuple[Value, ...]:
    """The values an op defines."""
    if isinstance(op, Opaque):
        return op.results
    if isinstance(op, Output):
        return ()
    return (op.result,)  # type: ignore[attr-defined]


def operands_of(op: Op) -> tuple[Value, ...]:
    """The values an op reads, in field order (absent optional operands skipped)."""
    if isinstance(op, Opaque):
        return op.inputs
    if isinstance(op, Output):
        return op.values
    return tuple(getattr(op, f.name) for f in fields(op)
                 if f.name != "result" and isinstance(getattr(op, f.name), Value))
