"""sparsec's native CPU kernels for sparse linear layers (codegen/native/sparse_linear.cpp): packing
and calls. y = x @ W.T with W's zeros skipped, fp32.

- `SparseRows` (N:M and unstructured weights) holds a weight's kept values in two layouts, each
  built on its kernel's first call:
    `masked_linear`   (MaskedRows: values row by row, a 16-bit mask per 16 inputs) few tokens: the
                      values expanded by the masks into dense 16-wide vectors, 8 tokens at once;
                      it reads the weight once and does the dense arithmetic;
    `segments_linear` (SegmentRows: values segment of SEGMENT inputs by segment, one byte of
                      column each) more tokens: x in token tiles of 64, each kept value times its
                      input's tokens; only kept values cost arithmetic.
  The masked kernel also takes bfloat16 weights (and x), computing in float32.
  Measured on a 11008 x 4096 layer (2 cores, AVX-512, caches flushed): 2:4 at 1 token 2.0x dense
  torch (the bytes: 2.6 against 4 an element), at 8 tokens 2.5-2.9x; 10% scattered at 64 tokens
  4x. (One layout for both measured 2-3x slower on one kernel or the other.)
- `block_rows_linear` (block-sparse weights): the panels of codegen.linear_cpu's BlockRows, each
  output row against the inputs of its block row's kept blocks.

Each call returns None where the kernel cannot run it (no compiler or library: native_build says
why; a dtype it does not take), and the caller runs its torch path.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch

from sparsec.codegen import native_build
from sparsec.codegen.native_build import load_native, native_entry

__all__ = ["SEGMENT", "VALUE_DTYPES", "MaskedRows", "SegmentRows", "SparseRows", "block_rows_linear", "masked_linear",
           "native_linear_available", "native_status", "pack_sparse_rows", "segments_linear"]

VALUE_DTYPES = (torch.float32, torch.bfloat16)  # the masked kernel's weights (the others: float32)
SEGMENT = 256  # inputs a segment: columns fit a byte; its token tile rows (256 x 64 floats) stay in L2
_LANES, _TILE = 16, 64
_LIBRARY = "sparse_linear"
_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "sparsec_masked_linear": [_P, _I, _I, _P, _I, _P, _P, _I, _I, _P, _I],
    "sparsec_segments_linear": [_P, _I, _I, _P, _P, _P, _I, _I, _I, _P, _P, _P, _I],
    "sparsec_block_rows_linear": [_P, _I, _I, _P, _I, _P, _P, _P, _I, _I, _I, _I, _P, _I],
}


@dataclass(frozen=True, slots=True)
class MaskedRows:
    """The masked kernel's layout: kept values row by row, and a bit per input."""

    values: torch.Tensor     # float32 or bfloat16 (nnz,): row by row, in column order
    masks: torch.Tensor      # int16 (N, ceil(K / 16)): bit i of chunk c set when input 16 c + i is kept
    row_start: torch.Tensor  # int64 (N + 1,)


@dataclass(frozen=True, slots=True)
class SegmentRows:
    """The segments kernel's layout: kept values segment (SEGMENT inputs) by segment, row by row."""

    values: torch.Tensor   # float32 (nnz,)
    columns: torch.Tensor  # uint8 (nnz,): each value's column inside its segment
    offsets: torch.Tensor  # int64 (segments, N + 1): row o's values in segment s start at offsets[s, o]


class SparseRows:
    """A weight's kept values for the native kernels (module docstring): the masked layout, built
    when packed, and the segments layout, built from it on the segments kernel's first call (a
    layer that only ever runs a few tokens holds one)."""

    __slots__ = ("shape", "_masked", "_segments")

    def __init__(self, shape: tuple[int, int], masked: MaskedRows):
        self.shape = shape
        self._masked = masked
        self._segments: SegmentRows | None = None

    @property
    def nnz(self) -> int:
        return self._masked.values.numel()

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.shape[0] * self.shape[1])

    def masked(self) -> MaskedRows:
        return self._masked

    def segments(self) -> SegmentRows:
        """The segments layout (float32: the segments kernel's values)."""
        if self._segments is None:
            self._segments = _segment_rows(self.to_dense().float())
        return self._segments

    @property
    def dtype(self) -> torch.dtype:
        return self._masked.values.dtype

    def to_dense(self) -> torch.Tensor:
        """The weight (N, K), in its dtype."""
        N, K = self.shape
        rows = self._masked
        dense = torch.zeros(N, rows.masks.shape[1] * _LANES, dtype=rows.values.dtype)
        bits = rows.masks.to(torch.int32) & 0xFFFF
        kept = ((bits[:, :, None] >> torch.arange(_LANES, dtype=torch.int32)) & 1).bool().view(N, -1)
        dense[kept] = rows.values
        return dense[:, :K].contiguous()


def native_linear_available() -> bool:
    """Whether the kernels' library builds and loads here (codegen.native_build)."""
    return load_native(_LIBRARY) is not None


def native_status() -> str:
    """'loaded', 'disabled', 'not loaded yet' or why the library is unavailable."""
    return native_build.native_status(_LIBRARY)


def _entry(name: str):
    """The entry point `name` (ctypes), or None where the library is unavailable."""
    return native_entry(_LIBRARY, name, _SIGNATURES[name])


def _run(kernel, name: str, *args) -> None:
    status = kernel(*args, _threads())
    if status != 0:
        raise RuntimeError(f"{name} rejected its arguments (status {status})")


def pack_sparse_rows(weight: torch.Tensor) -> SparseRows:
    """`weight` (N, K), float32 or bfloat16 on CPU, for the native kernels: its nonzeros (exact zeros
    are skipped). A bfloat16 weight runs on the masked kernel only (more tokens: torch's bfloat16
    GEMM, on AMX tiles where the cores have them, beats both native kernels)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("pack_sparse_rows: the weight must be a 2-D tensor (out_features, in_features)")
    if weight.dtype not in VALUE_DTYPES or weight.device.type != "cpu":
        raise TypeError(f"pack_sparse_rows: the native kernels take float32 or bfloat16 CPU weights, got "
                        f"{weight.dtype} on {weight.device}")
    return SparseRows(tuple(weight.shape), _masked_rows(weight.detach()))


def _masked_rows(w: torch.Tensor) -> MaskedRows:
    # numpy: its boolean indexing, row counts and bit packing are several times faster than
    # torch's on CPU, and packing runs at compile time for every sparse layer of a model.
    N, K = w.shape
    chunks = -(-K // _LANES)
    kept = (w != 0).numpy()
    row_start = np.zeros(N + 1, dtype=np.int64)
    np.cumsum(np.count_nonzero(kept, axis=1), out=row_start[1:])
    bits = np.zeros((N, chunks * _LANES // 8), dtype=np.uint8)
    bits[:, :-(-K // 8)] = np.packbits(kept, axis=1, bitorder="little")  # input 16 c + i -> bit i of chunk c
    return MaskedRows(_kept_values(w, kept), torch.from_numpy(bits.view(np.int16)), torch.from_numpy(row_start))


def _kept_values(w: torch.Tensor, kept: np.ndarray) -> torch.Tensor:
    """w's values where `kept`, in row-major order, in w's dtype (bfloat16 through its bits)."""
    if w.dtype == torch.bfloat16:
        return torch.from_numpy(w.contiguous().view(torch.int16).numpy()[kept]).view(torch.bfloat16)
    return torch.from_numpy(w.contiguous().numpy()[kept])


def _segment_rows(w: torch.Tensor) -> SegmentRows:
    N, K = w.shape
    segments = -(-K // SEGMENT)
    by_segment = np.zeros((segments, N, SEGMENT), dtype=np.float32)  # zero past K
    for s in range(segments):
        width = min(SEGMENT, K - s * SEGMENT)
        by_segment[s, :, :width] = w[:, s * SEGMENT:s * SEGMENT + width].numpy()
    kept = by_segment != 0
    columns = np.broadcast_to(np.arange(SEGMENT, dtype=np.uint8), kept.shape)[kept]
    counts = np.count_nonzero(kept, axis=2)  # (segments, N)
    ends = np.cumsum(counts, axis=None).reshape(segments, N)
    offsets = np.concatenate([ends - counts, ends[:, -1:]], axis=1)
    return SegmentRows(torch.from_numpy(by_segment[kept]), torch.from_numpy(columns),
                       torch.from_numpy(np.ascontiguousarray(offsets, dtype=np.int64)))


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """x (T, K) float32, contiguous, with rows of at least `width` (zero from K on)."""
    T, K = x.shape
    if K >= width:
        return x.contiguous()
    padded = x.new_zeros(T, width)
    padded[:, :K] = x
    return padded


def masked_linear(x: torch.Tensor, rows: SparseRows) -> torch.Tensor | None:
    """x (T, K) @ W.T on the masked kernel (x in the weight's dtype; float32 arithmetic), or None
    where it cannot run."""
    name = "sparsec_masked_linear"
    kernel = _entry(name) if x.dtype == rows.dtype else None
    if kernel is None:
        return None
    N, K = rows.shape
    w = rows.masked()
    xr = _rows(x.float(), w.masks.shape[1] * _LANES)
    y = torch.empty(x.shape[0], N, dtype=torch.float32)
    _run(kernel, name, xr.data_ptr(), xr.shape[0], xr.stride(0), w.values.data_ptr(), w.values.element_size(),
         w.masks.data_ptr(), w.row_start.data_ptr(), N, K, y.data_ptr())
    return y.to(x.dtype)


def segments_linear(x: torch.Tensor, rows: SparseRows) -> torch.Tensor | None:
    """x (T, K) @ W.T on the segments kernel, or None where it cannot run."""
    name = "sparsec_segments_linear"
    kernel = _entry(name) if x.dtype == rows.dtype == torch.float32 else None
    if kernel is None:
        return None
    N, K = rows.shape
    xr = x.contiguous()
    T = xr.shape[0]
    y = torch.empty(T, N, dtype=torch.float32)
    width = min(_TILE, -(-T // _LANES) * _LANES)
    tile, scratch = torch.empty(K * width, dtype=torch.float32), torch.empty(N * width, dtype=torch.float32)
    w = rows.segments()
    _run(kernel, name, xr.data_ptr(), T, K, w.values.data_ptr(), w.columns.data_ptr(), w.offsets.data_ptr(), N, K,
         SEGMENT, y.data_ptr(), tile.data_ptr(), scratch.data_ptr())
    return y


def block_rows_linear(x: torch.Tensor, panels: torch.Tensor, panel_start: torch.Tensor, crow: torch.Tensor,
                      block_columns: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor | None:
    """x (T, K) @ W.T for a block-sparse W as block-row panels (codegen.linear_cpu.BlockRows; float32
    or bfloat16, x in the same dtype), or None where the kernel cannot run it (its blocks: bo even,
    bi a multiple of 16)."""
    (N, K), (bo, bi) = shape, block
    name = "sparsec_block_rows_linear"
    usable = x.dtype == panels.dtype and panels.dtype in VALUE_DTYPES and bo % 2 == 0 and bi % _LANES == 0
    kernel = _entry(name) if usable else None
    if kernel is None:
        return None
    xr = x.float().contiguous()
    y = torch.empty(x.shape[0], N, dtype=torch.float32)
    _run(kernel, name, xr.data_ptr(), xr.shape[0], K, panels.data_ptr(), panels.element_size(), panel_start.data_ptr(),
         crow.data_ptr(), block_columns.data_ptr(), N, K, bo, bi, y.data_ptr())
    return y.to(x.dtype)
