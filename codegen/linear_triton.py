"""Sparse linear layers in Triton: y = activation(x @ W.T + bias) with W packed once.

- `bsr_linear_triton`: block-sparse W (codegen/weight_packing.BSRWeight). Grid (token blocks,
  block rows of W); a program walks only its block row's kept blocks, so BLOCK_N x BLOCK_K is the
  weight's block (bo, bi) and the work is proportional to the kept blocks. Bias and activation
  (none / relu / gelu / silu) are fused into the epilogue, before the single store.
- `nm_linear_triton`: N:M W in compressed form (NMWeight: values + in-group positions). Triton
  has no sparse tensor-core dot, so each program expands its (BLOCK_N, BLOCK_G groups) tile of
  kept values back to a dense (BLOCK_N, BLOCK_G * m) tile in registers and runs a dense dot: it
  reads n/m of the weight bytes (the win at small token counts, where a linear layer is bound by
  reading its weight) but does the dense arithmetic.
- `semi_structured_linear`: torch's 2:4 semi-structured kernels (CUDA, fp16/bf16), the one
  path that turns 2:4 into fewer tensor-core operations.

Every entry checks `supports(...)` first; it returns the reason a call cannot run, or None.
fp16 / bf16 / fp32 inputs, fp32 accumulation, output in x's dtype; x may have batch dims.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from sparsec.codegen.kernel_call import KernelCall
from sparsec.codegen.weight_packing import BSRWeight, NMWeight, SemiStructuredWeight

__all__ = [
    "ACTIVATIONS", "LinearTiles", "bsr_kernel_call", "bsr_linear_triton", "default_tiles", "nm_kernel_call",
    "nm_linear_triton",
    "semi_structured_linear", "supports",
]

log = logging.getLogger(__name__)

ACTIVATIONS = ("none", "relu", "gelu", "silu")  # index = the kernels' ACTIVATION code
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MIN_DOT = 16  # tl.dot needs every operand dimension >= 16
_MAX_BLOCK = 256
_MAX_GROUP = 64
_INT32_LIMIT = 1 << 31


def _power_of_two(n: int) -> bool:
    return isinstance(n, int) and n > 0 and n & (n - 1) == 0


@dataclass(frozen=True, slots=True)
class LinearTiles:
    """Tile parameters. BSR takes BLOCK_N x BLOCK_K from the weight's block; N:M uses block_n and
    block_k (dense input features per step, a multiple of m)."""

    block_m: int = 64
    num_warps: int = 4
    num_stages: int = 3
    block_n: int = 64
    block_k: int = 64

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not _power_of_two(value) or not _MIN_DOT <= value <= _MAX_BLOCK:
                raise ValueError(f"LinearTiles.{name} must be a power of two in [{_MIN_DOT}, {_MAX_BLOCK}], got {value!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"LinearTiles.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps!r}")
        if isinstance(self.num_stages, bool) or not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"LinearTiles.num_stages must be an int >= 1, got {self.num_stages!r}")


def default_tiles(tokens: int) -> LinearTiles:
    """Tiles for `tokens` rows of x: 128-row tiles for prefill, shrunk to the token count for decode
    (a 1-token call should not compute 127 padded rows)."""
    block_m = min(128, max(_MIN_DOT, 1 << max(0, tokens - 1).bit_length()))
    return LinearTiles(block_m=block_m, num_warps=8 if block_m >= 128 else 4, num_stages=3)


# -- the kernels -----------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, INPUT_PRECISION: tl.constexpr):
    """a @ b + acc in fp32. "upcast" only under TRITON_INTERPRET with bf16, whose dot multiplies
    raw bits there (triton-lang/triton#11584): bf16 through an fp32 dot gives the same products."""
    if INPUT_PRECISION == "upcast":
        result = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        result = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return result


@triton.jit
def _epilogue(acc, bias_ptr, offs_n, n_mask, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == 1:
        acc = tl.maximum(acc, 0.0)
    elif ACTIVATION == 2:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))  # exact GELU, as nn.GELU()
    elif ACTIVATION == 3:
        acc = acc * tl.sigmoid(acc)
    return acc


@triton.jit
def _bsr_linear_kernel(
    x_ptr, crow_ptr, col_ptr, values_ptr, bias_ptr, y_ptr,
    M, N, stride_xm, stride_xk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    block_row = tl.program_id(1)
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    start = tl.load(crow_ptr + block_row)
    end = tl.load(crow_ptr + block_row + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p in range(start, end):
        col = tl.load(col_ptr + p).to(tl.int64)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (col * BLOCK_K + offs_k)[None, :] * stride_xk,
                    mask=m_mask[:, None], other=0.0)
        # The block is stored (BLOCK_N, BLOCK_K) row-major; read it transposed as (BLOCK_K, BLOCK_N).
        # p * block size stays in int32: supports() bounds the packed values below 2**31 elements.
        w = tl.load(values_ptr + p * (BLOCK_N * BLOCK_K) + offs_k[:, None] + offs_n[None, :] * BLOCK_K)
        acc = _dot(x, w, acc, INPUT_PRECISION)
    out_n = block_row * BLOCK_N + offs_n
    acc = _epilogue(acc, bias_ptr, out_n, out_n < N, HAS_BIAS, ACTIVATION)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + out_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None])


@triton.jit
def _nm_linear_kernel(
    x_ptr, values_ptr, indices_ptr, bias_ptr, y_ptr,
    M, N, K, stride_xm, stride_xk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    KEEP: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    positions = tl.arange(0, GROUP)
    m_mask = offs_m < M
    n_mask = offs_n < N
    groups = K // GROUP
    kept_per_row = groups * KEEP
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g0 in range(0, groups, BLOCK_G):
        g = g0 + offs_g
        tile_mask = n_mask[:, None] & (g < groups)[None, :]
        dense = tl.zeros((BLOCK_N, BLOCK_G, GROUP), dtype=tl.float32)
        for s in tl.static_range(KEEP):  # slot s of every group: one (BLOCK_N, BLOCK_G) load
            slot = offs_n[:, None] * kept_per_row + (g * KEEP + s)[None, :]
            value = tl.load(values_ptr + slot, mask=tile_mask, other=0.0).to(tl.float32)
            where = tl.load(indices_ptr + slot, mask=tile_mask, other=0).to(tl.int32)
            dense += tl.where(where[:, :, None] == positions[None, None, :], value[:, :, None], 0.0)
        w = tl.reshape(dense, (BLOCK_N, BLOCK_G * GROUP)).to(x_ptr.dtype.element_ty)
        offs_k = g0 * GROUP + tl.arange(0, BLOCK_G * GROUP)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
        acc = _dot(x, tl.trans(w), acc, INPUT_PRECISION)
    acc = _epilogue(acc, bias_ptr, offs_n, n_mask, HAS_BIAS, ACTIVATION)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# -- what the kernels support ----------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def supports(x: torch.Tensor, weight: BSRWeight | NMWeight, bias: torch.Tensor | None = None,
             activation: str = "none") -> str | None:
    """None when the Triton kernel for `weight`'s format can run this call, else the reason."""
    return (_call_reason(x, weight, bias, activation) or _device_reason(x)
            or _format_reason(weight))


def _call_reason(x, weight, bias, activation) -> str | None:
    if not isinstance(weight, (BSRWeight, NMWeight)):
        return f"no Triton kernel for a {type(weight).__name__} weight"
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        return "x must be a tensor (..., in_features)"
    if x.dtype not in SUPPORTED_DTYPES or x.dtype != weight.values.dtype:
        return f"x is {x.dtype} and the weight {weight.values.dtype}: need the same dtype, one of {SUPPORTED_DTYPES}"
    if x.shape[-1] != weight.shape[1]:
        return f"x has {x.shape[-1]} input features, the weight {weight.shape} has {weight.shape[1]}"
    if x.device != weight.values.device:
        return f"x is on {x.device}, the weight on {weight.values.device}"
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype or bias.device != x.device):
        return f"bias must be ({weight.shape[0]},) {x.dtype} on {x.device}, got {tuple(bias.shape)} {bias.dtype}"
    if activation not in ACTIVATIONS:
        return f"activation {activation!r} is not one of {ACTIVATIONS}"
    return None


def _device_reason(x: torch.Tensor) -> str | None:
    if x.device.type == "cuda":
        if x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] < 8:
            return "bf16 needs a GPU of compute capability 8.0 or newer"
        return None
    if x.device.type == "cpu":
        return None if _interpreting() else "CPU tensors run the Triton kernels only with TRITON_INTERPRET=1"
    return f"device {x.device.type} has no Triton linear kernels"


def _format_reason(weight: BSRWeight | NMWeight) -> str | None:
    if weight.values.numel() >= _INT32_LIMIT:
        return f"the packed weight holds {weight.values.numel()} values; the kernels index them in int32"
    if isinstance(weight, BSRWeight):
        bo, bi = weight.block
        if not (_power_of_two(bo) and _power_of_two(bi) and _MIN_DOT <= min(bo, bi) and max(bo, bi) <= _MAX_BLOCK):
            return f"BSR block {weight.block}: both sides must be powers of two in [{_MIN_DOT}, {_MAX_BLOCK}]"
        return None
    if not _power_of_two(weight.m) or weight.m > _MAX_GROUP:
        return f"N:M group size m={weight.m} must be a power of two <= {_MAX_GROUP}"
    return None


# -- the calls -------------------------------------------------------------------------------------


def _input_precision(dtype: torch.dtype, interpreted: bool | None) -> str:
    """`interpreted` None: whether TRITON_INTERPRET is on."""
    if dtype == torch.bfloat16 and (_interpreting() if interpreted is None else interpreted):
        return "upcast"  # the interpreter's bf16 dot is broken; see _dot
    # fp32 follows torch's own matmul setting, so a sparse layer matches the dense one it replaces.
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _prepare(owner, x, weight, bias, activation, tiles):
    reason = supports(x, weight, bias, activation)
    if reason is not None:
        raise ValueError(f"{owner}: {reason}")
    if tiles is not None and not isinstance(tiles, LinearTiles):
        raise TypeError(f"{owner}: tiles must be LinearTiles, got {type(tiles).__name__}")
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.empty(x2.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    return x2, y, tiles or default_tiles(x2.shape[0])


def bsr_linear_triton(x: torch.Tensor, weight: BSRWeight, bias: torch.Tensor | None = None,
                      activation: str = "none", tiles: LinearTiles | None = None) -> torch.Tensor:
    """activation(x @ W.T + bias) for a block-sparse W; x: (..., K) -> (..., N)."""
    x2, y, tiles = _prepare("bsr_linear_triton", x, weight, bias, activation, tiles)
    if x2.shape[0]:
        bsr_kernel_call(x2, weight, bias, y, activation, tiles).launch(_bsr_linear_kernel)
    return y.view(*x.shape[:-1], weight.shape[0])


def bsr_kernel_call(x2, weight: BSRWeight, bias, y, activation: str, tiles: LinearTiles, *,
                    interpreted: bool | None = None) -> KernelCall:
    """The launch of the BSR kernel for 2-D x2 into y (codegen/kernel_call); `interpreted`
    (default: TRITON_INTERPRET) picks the dot precision the interpreter needs."""
    (N, _), (bo, bi) = weight.shape, weight.block
    return KernelCall(
        Path(__file__), "_bsr_linear_kernel", (triton.cdiv(x2.shape[0], tiles.block_m), N // bo),
        (x2, weight.crow_indices, weight.col_indices, weight.values, bias if bias is not None else y, y,
         x2.shape[0], N, x2.stride(0), x2.stride(1), y.stride(0), y.stride(1)),
        dict(HAS_BIAS=bias is not None, ACTIVATION=ACTIVATIONS.index(activation),
             INPUT_PRECISION=_input_precision(x2.dtype, interpreted),
             BLOCK_M=tiles.block_m, BLOCK_N=bo, BLOCK_K=bi, num_warps=tiles.num_warps, num_stages=tiles.num_stages),
    )


def nm_linear_triton(x: torch.Tensor, weight: NMWeight, bias: torch.Tensor | None = None,
                     activation: str = "none", tiles: LinearTiles | None = None) -> torch.Tensor:
    """activation(x @ W.T + bias) for an N:M W in compressed form; x: (..., K) -> (..., N)."""
    x2, y, tiles = _prepare("nm_linear_triton", x, weight, bias, activation, tiles)
    if x2.shape[0]:
        nm_kernel_call(x2, weight, bias, y, activation, tiles).launch(_nm_linear_kernel)
    return y.view(*x.shape[:-1], weight.shape[0])


def nm_kernel_call(x2, weight: NMWeight, bias, y, activation: str, tiles: LinearTiles, *,
                   interpreted: bool | None = None) -> KernelCall:
    """The launch of the N:M kernel for 2-D x2 into y (codegen/kernel_call); `interpreted`
    (default: TRITON_INTERPRET) picks the dot precision the interpreter needs."""
    N, K = weight.shape
    # A K step covers whole groups and at least 16 inputs (tl.dot's minimum).
    block_g = max(1, max(tiles.block_k, _MIN_DOT) // weight.m)
    return KernelCall(
        Path(__file__), "_nm_linear_kernel", (triton.cdiv(x2.shape[0], tiles.block_m), triton.cdiv(N, tiles.block_n)),
        (x2, weight.values, weight.indices, bias if bias is not None else y, y,
         x2.shape[0], N, K, x2.stride(0), x2.stride(1), y.stride(0), y.stride(1)),
        dict(HAS_BIAS=bias is not None, ACTIVATION=ACTIVATIONS.index(activation),
             INPUT_PRECISION=_input_precision(x2.dtype, interpreted),
             KEEP=weight.n, GROUP=weight.m, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_G=block_g,
             num_warps=tiles.num_warps, num_stages=tiles.num_stages),
    )


def semi_structured_linear(x: torch.Tensor, weight: SemiStructuredWeight, bias: torch.Tensor | None = None,
                           activation: str = "none") -> torch.Tensor:
    """activation(x @ W.T + bias) through torch's 2:4 semi-structured kernels (CUDA, fp16 / bf16)."""
    from sparsec.codegen.linear_cpu import apply_epilogue

    if not isinstance(weight, SemiStructuredWeight):
        raise TypeError(f"semi_structured_linear: weight must be a SemiStructuredWeight, got {type(weight).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"semi_structured_linear: activation {activation!r} is not one of {ACTIVATIONS}")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"semi_structured_linear: x has {x.shape[-1]} input features, the weight has {K}")
    y = torch.nn.functional.linear(x.reshape(-1, K), weight.weight, bias)
    return apply_epilogue(y, None, activation).view(*x.shape[:-1], N)
