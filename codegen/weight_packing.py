"""Packed sparse weights: built once (at compile time), read by every call of a sparse linear kernel.

A weight is (out_features, in_features) = (N, K), and the layer computes y = x @ W.T.

- `BSRWeight`: block compressed rows. Block row r holds output features r*bo .. r*bo + bo - 1;
  its kept blocks are values[crow[r]:crow[r+1]], each (bo, bi), at input block col_indices[...].
  The same layout as torch's BSR tensors, so torch's own kernels can run it as a baseline.
- `NMWeight`: N:M along the input dimension. Every group of M consecutive inputs keeps n slots:
  values (N, K // m * n) and indices (same shape, int8, or int16 when m > 127) = the position
  of each kept value inside its group. Groups with fewer than n nonzeros keep explicit zeros.
- `SemiStructuredWeight` (CUDA only): torch's 2:4 semi-structured tensor (cuSPARSELt/CUTLASS).

`pack(weight, encoding)` packs by IR encoding (sparsec.ir.types NMSparse / BlockSparse).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

__all__ = [
    "BSRWeight", "NMWeight", "SemiStructuredWeight", "PackedFormat", "pack", "pack_bsr", "pack_nm",
    "pack_semi_structured", "semi_structured_reason",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BSRWeight:
    shape: tuple[int, int]  # (out_features, in_features) of the dense weight
    block: tuple[int, int]  # (bo, bi): output features x input features of one block
    crow_indices: torch.Tensor  # int32 (N // bo + 1,)
    col_indices: torch.Tensor  # int32 (nnz_blocks,): input block index of each kept block
    values: torch.Tensor  # (nnz_blocks, bo, bi), the weight's dtype

    @property
    def density(self) -> float:
        """Kept fraction of the blocks."""
        total = (self.shape[0] // self.block[0]) * (self.shape[1] // self.block[1])
        return self.col_indices.numel() / max(1, total)

    def to_dense(self) -> torch.Tensor:
        (N, K), (bo, bi) = self.shape, self.block
        blocks = torch.zeros(N // bo, K // bi, bo, bi, dtype=self.values.dtype, device=self.values.device)
        rows = torch.repeat_interleave(torch.arange(N // bo, device=self.values.device),
                                       self.crow_indices.diff().long())
        blocks[rows, self.col_indices.long()] = self.values
        return blocks.permute(0, 2, 1, 3).reshape(N, K)


@dataclass(frozen=True, slots=True)
class NMWeight:
    shape: tuple[int, int]  # (out_features, in_features) of the dense weight
    n: int
    m: int
    values: torch.Tensor  # (N, K // m * n), the weight's dtype; slot s of group g at g * n + s
    indices: torch.Tensor  # same shape, int8 (int16 when m > 127): position of the value in its group

    @property
    def density(self) -> float:
        return self.n / self.m

    def to_dense(self) -> torch.Tensor:
        N, K = self.shape
        groups = K // self.m
        dense = torch.zeros(N, groups, self.m, dtype=self.values.dtype, device=self.values.device)
        dense.scatter_(2, self.indices.view(N, groups, self.n).long(), self.values.view(N, groups, self.n))
        return dense.view(N, K)


@dataclass(frozen=True, slots=True)
class SemiStructuredWeight:
    shape: tuple[int, int]
    weight: torch.Tensor  # a torch.sparse.SparseSemiStructuredTensor

    @property
    def density(self) -> float:
        return 0.5


PackedFormat = BSRWeight | NMWeight | SemiStructuredWeight


def _check_weight(weight: torch.Tensor, owner: str) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{owner}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{owner}: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if weight.device.type == "meta":
        raise ValueError(f"{owner}: a meta weight has no values to pack")
    return weight.detach()


# -- BSR -----------------------------------------------------------------------------------------


def pack_bsr(weight: torch.Tensor, block: tuple[int, int]) -> BSRWeight:
    """Pack the blocks of `weight` that hold a nonzero; `block` = (bo, bi) must divide its shape."""
    weight = _check_weight(weight, "pack_bsr")
    (N, K), (bo, bi) = weight.shape, _block_pair(block)
    if N % bo or K % bi:
        raise ValueError(f"pack_bsr: block {(bo, bi)} does not divide weight shape {(N, K)}")
    blocks = weight.reshape(N // bo, bo, K // bi, bi).permute(0, 2, 1, 3)  # (rows, cols, bo, bi)
    kept = (blocks != 0).flatten(2).any(dim=2)  # (rows, cols)
    block_rows, block_cols = kept.nonzero(as_tuple=True)  # row-major order: sorted by row, then col
    crow = torch.zeros(N // bo + 1, dtype=torch.int32, device=weight.device)
    crow[1:] = kept.sum(dim=1).cumsum(0)
    values = blocks[block_rows, block_cols].contiguous()
    log.debug("pack_bsr: %s blocks %s kept %d of %d", (N, K), (bo, bi), values.shape[0], kept.numel())
    return BSRWeight((N, K), (bo, bi), crow, block_cols.to(torch.int32), values)


def _block_pair(block: tuple[int, int] | int) -> tuple[int, int]:
    if isinstance(block, int) and not isinstance(block, bool):
        block = (block, block)
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"block must be a positive int or a (rows, cols) pair of them, got {block!r}")
    return tuple(block)


# -- N:M -----------------------------------------------------------------------------------------


def pack_nm(weight: torch.Tensor, n: int, m: int) -> NMWeight:
    """Compress `weight` to its n kept slots per group of m inputs; raises if a group holds more
    than n nonzeros (packing never drops a value)."""
    weight = _check_weight(weight, "pack_nm")
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise ValueError(f"pack_nm: needs ints 0 < n <= m, got n={n!r}, m={m!r}")
    N, K = weight.shape
    if K % m:
        raise ValueError(f"pack_nm: in_features {K} is not divisible by m={m} (weight shape {(N, K)})")
    groups = weight.reshape(N, K // m, m)
    nonzero = groups != 0
    most = int(nonzero.sum(dim=2).max().item()) if nonzero.numel() else 0
    if most > n:
        raise ValueError(f"pack_nm: the weight is not {n}:{m} sparse: a group of {m} holds {most} nonzeros")
    # Sort positions so nonzeros come first (stable: by position among equals); keep the first n,
    # then restore increasing position order inside each group for sequential reads.
    order = torch.sort((~nonzero).to(torch.int8), dim=2, stable=True).indices[..., :n]
    positions = order.sort(dim=2).values
    values = groups.gather(2, positions)
    index_dtype = torch.int8 if m <= 127 else torch.int16
    return NMWeight((N, K), n, m, values.reshape(N, -1).contiguous(), positions.reshape(N, -1).to(index_dtype))


# -- 2:4 semi-structured (CUDA) ------------------------------------------------------------------


def semi_structured_reason(weight: torch.Tensor) -> str | None:
    """None when torch's 2:4 semi-structured format can hold `weight`, else why not."""
    if weight.device.type != "cuda":
        return "semi-structured 2:4 runs on CUDA only"
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return f"semi-structured 2:4 needs fp16 or bf16 weights, got {weight.dtype}"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return "this torch has no torch.sparse.to_sparse_semi_structured"
    if torch.cuda.get_device_capability(weight.device)[0] < 8:
        return "semi-structured 2:4 needs compute capability 8.0 or newer"
    N, K = weight.shape
    if N % 64 or K % 64:  # the CUTLASS / cuSPARSELt kernels' minimum tile
        return f"semi-structured 2:4 needs both dims divisible by 64, got {(N, K)}"
    return None


def pack_semi_structured(weight: torch.Tensor) -> SemiStructuredWeight:
    """torch's 2:4 semi-structured copy of a 2:4-sparse fp16/bf16 CUDA weight."""
    weight = _check_weight(weight, "pack_semi_structured")
    reason = semi_structured_reason(weight)
    if reason is not None:
        raise ValueError(f"pack_semi_structured: {reason}")
    pack_nm(weight, 2, 4)  # raises if the weight is not 2:4, which torch would not check
    sparse = torch.sparse.to_sparse_semi_structured(weight.contiguous())
    return SemiStructuredWeight(tuple(weight.shape), sparse)


# -- by IR encoding ------------------------------------------------------------------------------


def pack(weight: torch.Tensor, encoding) -> BSRWeight | NMWeight:
    """Pack `weight` for the IR encoding chosen for it (NMSparse or BlockSparse)."""
    from sparsec.ir.types import BlockSparse, NMSparse

    if isinstance(encoding, NMSparse):
        if encoding.axis not in (-1, 1):
            raise ValueError(f"pack: N:M along axis {encoding.axis} is not supported; only the input dimension (-1)")
        return pack_nm(weight, encoding.n, encoding.m)
    if isinstance(encoding, BlockSparse):
        return pack_bsr(weight, encoding.block)
    raise ValueError(f"pack: no packed format for encoding {encoding!r}")
