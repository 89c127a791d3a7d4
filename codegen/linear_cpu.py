"""CPU executors of sparse linear layers, y = activation(x @ W.T + bias), that skip zero blocks.

Each executor has several paths and runs a call on the one the cost model prices cheapest for its
token count (`cpu_path`: cost_models.linear_cost_cpu.cpu_linear_paths, with the "cpu" profile at
torch's thread count), so that what the compiler priced is what runs.

Block-sparse (`bsr_linear_cpu`):
  - "panels": for each block row r of W (bo output features), the inputs its kept blocks touch are
    gathered from x and multiplied with that row's kept blocks side by side, a (bo, nnz_r * bi)
    panel, in ONE matmul: BLAS runs on dense panels and zero blocks cost nothing. x is transposed
    once, so the gather takes whole contiguous rows of x.T instead of strided columns of x (2-3x
    faster), and each product lands in a contiguous slice of y.T. The panels are packed once by
    `pack_block_rows`. (Batching the block rows that keep equally many blocks into one bmm was
    measured slower: CPU bmm does not beat a loop of mm calls of this size.)
  - "block_rows": the native kernel over the same panels (codegen.linear_cpu_native): at a few
    tokens one mm call per block row costs more than its arithmetic; measured faster than the
    panels up to hundreds of tokens at 30% blocks, slower at 60% from ~256 tokens.
  - "torch_bsr": torch's own BSR tensor (MKL's sparse kernels, one call), up to FEW_TOKENS tokens,
    square float32 / float64 blocks (where the native kernel does not run: another dtype, no
    compiler).

N:M (`nm_linear_cpu`) and unstructured (`unstructured_linear_cpu`) weights:
  - "masked" and "segments": the native kernels on SparseRows (codegen.linear_cpu_native): for a
    few tokens the kept values streamed once (2:4 at 1 token 2x dense), for more only the kept
    values' arithmetic.
  - "expand" (N:M only; where the native kernels cannot run): a tile of output features is
    expanded from the compressed layout into a cache-sized dense tile and multiplied with x by
    BLAS, as the Triton N:M kernel does. It does the dense arithmetic plus the expansion: measured
    1.5-6x slower than dense torch (bench/linear.py), so the cost model keeps such layers dense;
    it exists so that a plan still runs exactly.
"""
from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsec.codegen import linear_cpu_native
from sparsec.codegen.linear_cpu_native import SparseRows
from sparsec.codegen.weight_packing import BSRWeight, NMWeight

__all__ = ["ACTIVATIONS", "FEW_TOKENS", "BlockRows", "NMRows", "apply_epilogue", "bsr_linear_cpu", "cpu_path",
           "nm_linear_cpu", "pack_block_rows", "pack_nm_rows", "torch_bsr_takes", "unstructured_linear_cpu"]

log = logging.getLogger(__name__)

ACTIVATIONS = ("none", "relu", "gelu", "silu")
_NM_TILE_ELEMENTS = 1 << 18  # dense weight rows expanded at once: 1 MB in fp32, stays in cache
FEW_TOKENS = 4  # up to this many tokens, block-sparse layers may run on torch's BSR tensor


@dataclass(frozen=True, slots=True)
class BlockRows:
    """A BSR weight laid out for the CPU executor: per block row, its kept input features and its
    kept blocks side by side as one (bo, nnz_r * bi) panel."""

    shape: tuple[int, int]
    block: tuple[int, int]
    row_inputs: tuple[torch.Tensor, ...]  # int64 (nnz_r * bi,): input features block row r reads
    row_panels: tuple[torch.Tensor, ...]  # (bo, nnz_r * bi) in the weight's dtype: views of `panels`
    panels: torch.Tensor                  # every row panel, one after another (flat)
    panel_start: torch.Tensor             # int64 (N // bo,): where block row r's panel starts in `panels`
    crow_indices: torch.Tensor            # int64 (N // bo + 1,): block row r's kept blocks, as in BSRWeight
    block_columns: torch.Tensor           # int32 (nnz_blocks,): each kept block's input block
    # the same weight as torch's sparse BSR tensor, for a few tokens (square blocks, float32 /
    # float64: what its CPU kernels take); None: the panels run every call
    torch_bsr: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.panels.dtype

    @property
    def density(self) -> float:
        """Kept fraction of the blocks."""
        (N, K), (bo, bi) = self.shape, self.block
        return self.block_columns.numel() / max(1, (N // bo) * (K // bi))


@dataclass(frozen=True, slots=True)
class NMRows:
    """An N:M weight for the CPU executor: its compressed layout (the "expand" path) and, where the
    native kernels run it (float32 or bfloat16, the library loads), its SparseRows."""

    nm: NMWeight
    rows: SparseRows | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.nm.shape


def pack_block_rows(bsr: BSRWeight) -> BlockRows:
    """The CPU executor's layout of a packed BSR weight (built once, with the weight's pack)."""
    if not isinstance(bsr, BSRWeight):
        raise TypeError(f"pack_block_rows: needs a BSRWeight, got {type(bsr).__name__}")
    bo, bi = bsr.block
    within_block = torch.arange(bi, device=bsr.values.device)
    crow = bsr.crow_indices.long()
    panels = bsr.values.new_empty(bsr.values.numel())
    inputs, views = [], []
    for start, end in zip(crow[:-1].tolist(), crow[1:].tolist()):
        cols = bsr.col_indices[start:end].long()
        inputs.append((cols[:, None] * bi + within_block).flatten())
        view = panels[start * bo * bi:end * bo * bi].view(bo, (end - start) * bi)
        view.copy_(bsr.values[start:end].permute(1, 0, 2).reshape(bo, (end - start) * bi))
        views.append(view)
    return BlockRows(bsr.shape, bsr.block, tuple(inputs), tuple(views), panels, crow[:-1] * (bo * bi),
                     crow.contiguous(), bsr.col_indices.to(torch.int32).contiguous(), _torch_bsr(bsr))


def pack_nm_rows(nm: NMWeight) -> NMRows:
    """The CPU executor's layout of a packed N:M weight (built once, with the weight's pack)."""
    if not isinstance(nm, NMWeight):
        raise TypeError(f"pack_nm_rows: needs an NMWeight, got {type(nm).__name__}")
    native = nm.values.dtype in linear_cpu_native.VALUE_DTYPES and linear_cpu_native.native_linear_available()
    return NMRows(nm, linear_cpu_native.pack_sparse_rows(nm.to_dense()) if native else None)


def cpu_path(tokens: int, shape: tuple[int, int], dtype: torch.dtype, sparsity) -> str:
    """The path (cost_models.linear_cost_cpu.cpu_linear_paths) the executor takes for `tokens`
    rows of an (N, K) weight of `sparsity` (an ir.types encoding): the cheapest by the cost model."""
    from sparsec.ir.types import dtype_name

    return _cheapest(tokens, shape, dtype_name(dtype), dtype.itemsize, sparsity, torch.get_num_threads())


@functools.lru_cache(maxsize=1024)
def _encoding(kind: str, *params):
    """The ir.types encoding a packed weight is priced as (built once per value: calls are hot)."""
    from sparsec.ir.types import BlockSparse, NMSparse, Unstructured

    if kind == "bsr":
        return BlockSparse(block=params[0], density=params[1])
    if kind == "nm":
        return NMSparse(n=params[0], m=params[1], density=params[0] / params[1])
    return Unstructured(density=params[0])


@functools.lru_cache(maxsize=4096)
def _cheapest(tokens: int, shape: tuple[int, int], dtype: str, size: int, sparsity, threads: int) -> str:
    from sparsec.cost_models.hardware import get_profile
    from sparsec.cost_models.linear_cost_cpu import cpu_linear_paths

    hardware = get_profile("cpu").with_cores(max(1, threads))
    paths = cpu_linear_paths(tokens, *shape, dtype, size, sparsity, hardware)
    return min(paths, key=paths.get)


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
    x2 = x.reshape(-1, K)
    path = cpu_path(x2.shape[0], weight.shape, x.dtype, _encoding("bsr", weight.block, round(weight.density, 3)))
    y = None
    if path == "block_rows":
        y = linear_cpu_native.block_rows_linear(x2, weight.panels, weight.panel_start, weight.crow_indices,
                                                weight.block_columns, weight.shape, weight.block)
    if y is None and path == "torch_bsr" and weight.torch_bsr is not None:
        y = (weight.torch_bsr @ x2.t()).t().contiguous()
    if y is None:
        y = _bsr_panels(x2, weight)
    return apply_epilogue(y, bias, activation).view(*x.shape[:-1], N)


def _bsr_panels(x2: torch.Tensor, weight: BlockRows) -> torch.Tensor:
    bo = weight.block[0]
    x_t = x2.t().contiguous()  # (K, tokens): gathers take whole rows
    y_t = torch.empty(weight.shape[0], x_t.shape[1], dtype=x2.dtype)
    for r, (inputs, panel) in enumerate(zip(weight.row_inputs, weight.row_panels)):
        rows = y_t[r * bo:(r + 1) * bo]
        if inputs.numel() == 0:
            rows.zero_()
        else:
            torch.mm(panel, x_t.index_select(0, inputs), out=rows)
    return y_t.t().contiguous()


# -- N:M and unstructured --------------------------------------------------------------------------


def nm_linear_cpu(x: torch.Tensor, weight: NMWeight | NMRows, bias: torch.Tensor | None = None,
                  activation: str = "none") -> torch.Tensor:
    """activation(x @ W.T + bias) for an N:M W, compressed (NMWeight: the "expand" path) or as
    NMRows (pack_nm_rows: the cheapest path); x: (..., K)."""
    rows = None
    if isinstance(weight, NMRows):
        weight, rows = weight.nm, weight.rows
    if not isinstance(weight, NMWeight):
        raise TypeError(f"nm_linear_cpu: weight must be an NMWeight (pack_nm) or NMRows (pack_nm_rows), got "
                        f"{type(weight).__name__}")
    _check_call("nm_linear_cpu", x, weight.shape, weight.values.dtype, bias, activation)
    N, K = weight.shape
    x2 = x.reshape(-1, K)
    y = None
    if rows is not None:
        sparsity = _encoding("nm", weight.n, weight.m)
        y = _native_rows(x2, rows, cpu_path(x2.shape[0], weight.shape, x.dtype, sparsity))
    if y is None:
        y = _nm_expand(x2, weight)
    return apply_epilogue(y, bias, activation).view(*x.shape[:-1], N)


def unstructured_linear_cpu(x: torch.Tensor, weight: SparseRows, bias: torch.Tensor | None = None,
                            activation: str = "none") -> torch.Tensor:
    """activation(x @ W.T + bias) for a W of scattered zeros packed by
    linear_cpu_native.pack_sparse_rows (float32, or bfloat16: the masked kernel); x: (..., K).
    Raises RuntimeError where the native kernels cannot run (the compiler only picks this kernel
    where they do)."""
    if not isinstance(weight, SparseRows):
        raise TypeError(f"unstructured_linear_cpu: weight must be SparseRows (pack_sparse_rows), got "
                        f"{type(weight).__name__}")
    _check_call("unstructured_linear_cpu", x, weight.shape, weight.dtype, bias, activation)
    N, K = weight.shape
    x2 = x.reshape(-1, K)
    sparsity = _encoding("unstructured", round(weight.density, 3))
    y = _native_rows(x2, weight, cpu_path(x2.shape[0], weight.shape, x.dtype, sparsity))
    if y is None:
        raise RuntimeError(f"unstructured_linear_cpu: the native kernels are unavailable "
                           f"({linear_cpu_native.native_status()})")
    return apply_epilogue(y, bias, activation).view(*x.shape[:-1], N)


def _native_rows(x2: torch.Tensor, rows: SparseRows, path: str) -> torch.Tensor | None:
    if path == "segments":
        return linear_cpu_native.segments_linear(x2, rows)
    if path == "masked":
        return linear_cpu_native.masked_linear(x2, rows)
    return None


def _nm_expand(x2: torch.Tensor, weight: NMWeight) -> torch.Tensor:
    N, K = weight.shape
    y_t = torch.empty(N, x2.shape[0], dtype=x2.dtype)  # row slices of y.T are contiguous mm outputs
    groups, n, m = K // weight.m, weight.n, weight.m
    rows_per_tile = max(1, _NM_TILE_ELEMENTS // max(1, K))
    tile = torch.empty(rows_per_tile, groups, m, dtype=x2.dtype)
    for start in range(0, N, rows_per_tile):
        end = min(N, start + rows_per_tile)
        dense = tile[:end - start].zero_()
        dense.scatter_(2, weight.indices[start:end].view(-1, groups, n).long(),
                       weight.values[start:end].view(-1, groups, n))
        torch.mm(dense.view(end - start, K), x2.t(), out=y_t[start:end])
    return y_t.t().contiguous()
