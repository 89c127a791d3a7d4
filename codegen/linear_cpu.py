"""CPU executors of sparse linear layers, y = activation(x @ W.T + bias), that skip zero blocks.

Block-sparse (`bsr_linear_cpu`): for each block row r of W (bo output features), the inputs its
kept blocks touch are gathered from x and multiplied with that row's kept blocks side by side,
a (bo, nnz_r * bi) panel, in ONE matmul: BLAS runs on dense panels and zero blocks cost nothing.
x is transposed once, so the gather takes whole contiguous rows of x.T instead of strided
columns of x (2-3x faster), and each product lands in a contiguous slice of y.T. The panels are
packed once by `pack_block_rows`. (Batching the block rows that keep equally many blocks into
one bmm was measured slower: CPU bmm does not beat a loop of mm calls of this size.) For a few
tokens (decode, <= FEW_TOKENS) one call per block row costs more than the arithmetic, and torch's
own BSR tensor (MKL's sparse kernels, one call) runs instead: measured on a 4608 x 1152 layer at
1 token, 0.46 ms vs the panels' 2.06 ms at 10% blocks (dense 2.01 ms), 1.16 vs 2.83 ms at 30%;
from 16 tokens the panels are as fast or faster (bench/linear.py).

N:M (`nm_linear_cpu`): a tile of output features is expanded from the compressed layout into
a cache-sized dense tile and multiplied with x by BLAS, the same scheme as the Triton N:M kernel
(Triton and BLAS have no sparse dot). It stores n/m of the weight but does the dense arithmetic
plus the expansion: measured 1.5-6x slower than dense torch on CPU (bench/linear.py), where
gathering x per output feature was slower still (no shared panel for BLAS). The cost model
should keep N:M layers dense on CPU; the executor exists so such a plan still runs exactly.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsec.codegen.weight_packing import BSRWeight, NMWeight

__all__ = ["ACTIVATIONS", "FEW_TOKENS", "BlockRows", "apply_epilogue", "bsr_linear_cpu", "nm_linear_cpu", "pack_block_rows",
           "torch_bsr_takes"]

log = logging.getLogger(__name__)

ACTIVATIONS = ("none", "relu", "gelu", "silu")
_NM_TILE_ELEMENTS = 1 << 18  # dense weight rows expanded at once: 1 MB in fp32, stays in cache
FEW_TOKENS = 4  # up to this many tokens, block-sparse layers run on torch's BSR tensor


@dataclass(frozen=True, slots=True)
class BlockRows:
    """A BSR weight laid out for the CPU executor: per block row, its kept input features and its
    kept blocks side by side as one (bo, nnz_r * bi) panel."""

    shape: tuple[int, int]
    block: tuple[int, int]
    row_inputs: tuple[torch.Tensor, ...]  # int64 (nnz_r * bi,): input features block row r reads
    row_panels: tuple[torch.Tensor, ...]  # (bo, nnz_r * bi) in the weight's dtype
    # the same weight as torch's sparse BSR tensor, for a few tokens (square blocks, float32 /
    # float64: what its CPU kernels take); None: the panels run every call
    torch_bsr: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.row_panels[0].dtype if self.row_panels else torch.float32


def pack_block_rows(bsr: BSRWeight) -> BlockRows:
    """The CPU executor's layout of a packed BSR weight (built once, with the weight's pack)."""
    if not isinstance(bsr, BSRWeight):
        raise TypeError(f"pack_block_rows: needs a BSRWeight, got {type(bsr).__name__}")
    bo, bi = bsr.block
    within_block = torch.arange(bi, device=bsr.values.device)
    inputs, panels = [], []
    for start, end in zip(bsr.crow_indices[:-1].tolist(), bsr.crow_indices[1:].tolist()):
        cols = bsr.col_indices[start:end].long()
        inputs.append((cols[:, None] * bi + within_block).flatten())
        panels.append(bsr.values[start:end].permute(1, 0, 2).reshape(bo, (end - start) * bi).contiguous())
    return BlockRows(bsr.shape, bsr.block, tuple(inputs), tuple(panels), _torch_bsr(bsr))


def torch_bsr_takes(block: tuple[int, int], dtype: torch.dtype) -> bool:
    """Whether torch's BSR tensor (MKL's sparse kernels) runs a weight of these blocks and dtype on
    CPU: square blocks, float32 / float64 only. Such weights run on it for up to FEW_TOKENS tokens."""
    return block[0] == block[1] and dtype in (torch.float32, torch.float64)


def _torch_bsr(bsr: BSRWeight) -> torch.Tensor | None:
    if not torch_bsr_takes(bsr.block, bsr.values.dtype) or bsr.values.device.type != "cpu":
        return None
    with warnings.catch_warnings():  # "Sparse BSR tensor support is in beta": known, and checked by tests
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_bsr_tensor(bsr.crow_indices.long(), bsr.col_indices.long(), bsr.values, size=bsr.shape)


# -- checks and epilogue ---------------------------------------------------------------------------


def _check_call(owner: str, x: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype,
                bias: torch.Tensor | None, activation: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{owner}: x must be a tensor (..., in_features)")
    if x.device.type != "cpu":
        raise ValueError(f"{owner}: runs on CPU tensors, got x on {x.device}")
    if x.shape[-1] != shape[1]:
        raise ValueError(f"{owner}: x has {x.shape[-1]} input features, the weight {shape} has {shape[1]}")
    if x.dtype != dtype:
        raise TypeError(f"{owner}: x is {x.dtype} but the packed weight is {dtype}")
    if bias is not None and (bias.shape != (shape[0],) or bias.dtype != dtype):
        raise ValueError(f"{owner}: bias must be ({shape[0]},) {dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{owner}: activation {activation!r} is not one of {ACTIVATIONS}")


def apply_epilogue(y: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """y + bias (broadcast over the last dim), then the activation; in place on y."""
    if bias is not None:
        y.add_(bias)
    if activation == "relu":
        return y.relu_()
    if activation == "gelu":
        return y.copy_(F.gelu(y))  # exact (erf) GELU, like nn.GELU()
    if activation == "silu":
        return F.silu(y, inplace=True)
    return y


# -- block-sparse ----------------------------------------------------------------------------------


def bsr_linear_cpu(x: torch.Tensor, weight: BlockRows, bias: torch.Tensor | None = None,
                   activation: str = "none") -> torch.Tensor:
    """activation(x @ W.T + bias) for a block-sparse W packed by `pack_block_rows`; x: (..., K)."""
    if not isinstance(weight, BlockRows):
        raise TypeError(f"bsr_linear_cpu: weight must be BlockRows (pack_block_rows), got {type(weight).__name__}")
    _check_call("bsr_linear_cpu", x, weight.shape, weight.dtype, bias, activation)
    N, K = weight.shape
    bo = weight.block[0]
    if weight.torch_bsr is not None and x.numel() // K <= FEW_TOKENS:
        y = (weight.torch_bsr @ x.reshape(-1, K).t()).t().contiguous()
        return apply_epilogue(y, bias, activation).view(*x.shape[:-1], N)
    x_t = x.reshape(-1, K).t().contiguous()  # (K, tokens): gathers take whole rows
    y_t = torch.empty(N, x_t.shape[1], dtype=x.dtype)
    for r, (inputs, panel) in enumerate(zip(weight.row_inputs, weight.row_panels)):
        rows = y_t[r * bo:(r + 1) * bo]
        if inputs.numel() == 0:
            rows.zero_()
        else:
            torch.mm(panel, x_t.index_select(0, inputs), out=rows)
    y = y_t.t().contiguous()
    return apply_epilogue(y, bias, activation).view(*x.shape[:-1], N)


# -- N:M -------------------------------------------------------------------------------------------


def nm_linear_cpu(x: torch.Tensor, weight: NMWeight, bias: torch.Tensor | None = None,
                  activation: str = "none") -> torch.Tensor:
    """activation(x @ W.T + bias) for an N:M W in compressed form; x: (..., K)."""
    if not isinstance(weight, NMWeight):
        raise TypeError(f"nm_linear_cpu: weight must be an NMWeight (pack_nm), got {type(weight).__name__}")
    _check_call("nm_linear_cpu", x, weight.shape, weight.values.dtype, bias, activation)
    N, K = weight.shape
    x2 = x.reshape(-1, K)
    y_t = torch.empty(N, x2.shape[0], dtype=x.dtype)  # row slices of y.T are contiguous mm outputs
    groups, n, m = K // weight.m, weight.n, weight.m
    rows_per_tile = max(1, _NM_TILE_ELEMENTS // max(1, K))
    tile = torch.empty(rows_per_tile, groups, m, dtype=x.dtype)
    for start in range(0, N, rows_per_tile):
        end = min(N, start + rows_per_tile)
        dense = tile[:end - start].zero_()
        dense.scatter_(2, weight.indices[start:end].view(-1, groups, n).long(),
                       weight.values[start:end].view(-1, groups, n))
        torch.mm(dense.view(end - start, K), x2.t(), out=y_t[start:end])
    y = y_t.t().contiguous()
    return apply_epilogue(y, bias, activation).view(*x.shape[:-1], N)
