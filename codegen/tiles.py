"""Tile sizes of the attention kernels, and defaults that are good on H100.

The kernels take BLOCK_M, BLOCK_N, num_warps and num_stages as arguments, so the cost model can
choose them; `default_tiles` is the choice when nobody did, `tiles_for` the warps and stages that go
with a chosen (block_m, block_n). The fp16 / bf16 defaults are FlashAttention-2-style tiles, checked
by compiling every family for sm_90 (codegen/triton_aot, tests/test_triton_aot.py,
bench/results/compile_sm90_*.json) so that none needs more registers than a thread has:
    head_dim <= 64: 128 x 64, 8 warps, 3 stages  (128 x 128 with 4 warps spilled 240-340 B a thread)
    head_dim 128:   128 x 64, 8 warps, 3 stages
    head_dim 256:   64 x 32,  8 warps, 2 stages  (64 x 64 with 8 warps spilled in the dense kernel,
                                                  64 x 32 with 4 warps in four masked families)
A block of the default's rows or more runs on the default's warps; smaller ones on at most 4.
fp32 runs exact ("ieee") dots on CUDA cores, whose operands live in registers: at head_dim 64,
128 x 64 tiles spilled 2.4-7.3 KB a thread and took ~45 s to compile here, 64 x 32 spilled ~350 B;
so fp32 tiles are 32 x 32 (head_dim <= 64) and 32 x 16 (128, 256), 4 warps, 2 stages: no spill in
the dense and window kernels, 5-10 s to compile.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

__all__ = ["AttentionTiles", "BackwardTiles", "default_backward_tiles", "default_tiles", "fit_stages",
           "padded_head_dim", "shared_memory_bytes", "tiles_for"]

_MIN_BLOCK = 16  # tl.dot needs every operand dimension >= 16


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True, slots=True)
class AttentionTiles:
    """BLOCK_M query rows x BLOCK_N keys per step, num_warps per program, num_stages of pipelining."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < _MIN_BLOCK or not _is_power_of_two(value):
                raise ValueError(f"AttentionTiles.{name} must be a power of two >= {_MIN_BLOCK}, got {value!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"AttentionTiles.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps!r}")
        if isinstance(self.num_stages, bool) or not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"AttentionTiles.num_stages must be an int >= 1, got {self.num_stages!r}")


# (largest head_dim, tiles) in increasing head_dim; head_dim is padded to a power of two first.
_HALF_PRECISION = (
    (64, AttentionTiles(128, 64, num_warps=8, num_stages=3)),
    (128, AttentionTiles(128, 64, num_warps=8, num_stages=3)),
    (256, AttentionTiles(64, 32, num_warps=8, num_stages=2)),
)
_SINGLE_PRECISION = (
    (64, AttentionTiles(32, 32, num_warps=4, num_stages=2)),
    (128, AttentionTiles(32, 16, num_warps=4, num_stages=2)),
    (256, AttentionTiles(32, 16, num_warps=4, num_stages=2)),
)


def default_tiles(head_dim: int, dtype: torch.dtype, q_len: int | None = None, k_len: int | None = None) -> AttentionTiles:
    """H100-good tiles for `head_dim` and `dtype`, shrunk when the sequences are shorter than a tile
    (decode with q_len = 1 should not compute 128 padded rows)."""
    tiles = _table_tiles(head_dim, dtype)
    return tiles_for(_shrink_to(tiles.block_m, q_len), _shrink_to(tiles.block_n, k_len), head_dim, dtype)


@dataclass(frozen=True, slots=True)
class BackwardTiles:
    """Tiles of the two backward kernels (templates/backward.py). The dQ kernel owns block_m query
    rows and steps over block_n keys; the dK / dV kernel owns block_n keys and steps over block_m
    query rows. Each kernel's own side is the larger: its accumulators live there."""

    dq: AttentionTiles
    dkdv: AttentionTiles


# The backward kernels hold more a program than the forward: the dK / dV kernel keeps K, V and two
# fp32 accumulators of its keys x head_dim, the dQ kernel Q, dO and one. Compiled for sm_90
# (tests/test_triton_aot.py): square 64 x 64 tiles spilled 8-112 B a thread in the dK / dV kernels
# of the diagonal-bit masks (multi_diagonal, vertical_slash, union) at head_dim 64 and 128; these
# spill nothing in any family, soft cap and sinks included, on wgmma up to head_dim 128 (mma.sync at
# 256: 32-row tiles, one stage, as two spilled; 32 x 32 dQ tiles spilled with a soft cap), except
# fp32 at head_dim 256, whose dQ kernel spills ~250 B at the smallest tiles (fp32 dots run on CUDA
# cores with operands in registers).
def _backward(dq: tuple[int, int, int, int], dkdv: tuple[int, int, int, int]) -> BackwardTiles:
    """BackwardTiles from (block_m, block_n, num_warps, num_stages) of each kernel."""
    return BackwardTiles(AttentionTiles(*dq), AttentionTiles(*dkdv))


_BACKWARD_HALF_PRECISION = (
    (64, _backward((64, 32, 4, 2), (32, 64, 4, 2))),
    (128, _backward((64, 32, 4, 2), (32, 64, 8, 2))),
    (256, _backward((32, 16, 8, 1), (32, 32, 8, 1))),
)
_BACKWARD_SINGLE_PRECISION = (
    (64, _backward((32, 16, 4, 1), (16, 32, 4, 1))),
    (128, _backward((16, 16, 8, 1), (16, 16, 4, 1))),
    (256, _backward((16, 16, 8, 1), (16, 16, 8, 1))),
)


def default_backward_tiles(head_dim: int, dtype: torch.dtype, q_len: int | None = None,
                           k_len: int | None = None) -> BackwardTiles:
    """Tiles of the backward kernels for `head_dim` and `dtype`, shrunk to short sequences."""
    table = _BACKWARD_SINGLE_PRECISION if dtype == torch.float32 else _BACKWARD_HALF_PRECISION
    padded = padded_head_dim(head_dim)
    tiles = next((tiles for largest, tiles in table if padded <= largest), None)
    if tiles is None:
        raise ValueError(f"no attention tiles for head_dim {head_dim}: the kernels support head_dim <= 256")

    def shrunk(t: AttentionTiles) -> AttentionTiles:
        return dataclasses.replace(t, block_m=_shrink_to(t.block_m, q_len), block_n=_shrink_to(t.block_n, k_len))
    return BackwardTiles(shrunk(tiles.dq), shrunk(tiles.dkdv))


def tiles_for(block_m: int, block_n: int, head_dim: int, dtype: torch.dtype) -> AttentionTiles:
    """(block_m, block_n) with the warps and stages that go with them: the default's stages, and
    its warps for a block of at least the default's rows, else at most 4 (a warpgroup per 64 rows)."""
    base = _table_tiles(head_dim, dtype)
    warps = base.num_warps if block_m >= base.block_m else min(base.num_warps, 4)
    return AttentionTiles(block_m, block_n, num_warps=warps, num_stages=base.num_stages)


def _table_tiles(head_dim: int, dtype: torch.dtype) -> AttentionTiles:
    table = _SINGLE_PRECISION if dtype == torch.float32 else _HALF_PRECISION
    padded = max(_MIN_BLOCK, 1 << (head_dim - 1).bit_length())
    for largest, tiles in table:
        if padded <= largest:
            return tiles
    raise ValueError(f"no attention tiles for head_dim {head_dim}: the kernels support head_dim <= 256")


def _shrink_to(block: int, length: int | None) -> int:
    if length is None:
        return block
    return min(block, max(_MIN_BLOCK, 1 << (length - 1).bit_length()))


def shared_memory_bytes(tiles: AttentionTiles, head_dim: int, dtype: torch.dtype, value_dim: int | None = None) -> int:
    """Shared memory a launch at `tiles` needs, from above: the Q tile and, pipelined, num_stages + 1
    K and V tiles (Triton buffers K and V num_stages deep; the table-driven kernels were seen keeping
    one more), else one. Compiled for sm_90 (bench/results/compile_sm90_*.json) no family needed more."""
    element = torch.empty((), dtype=dtype).element_size()
    d, dv = padded_head_dim(head_dim), padded_head_dim(value_dim or head_dim)
    buffers = tiles.num_stages + 1 if tiles.num_stages > 1 else 1
    return element * (tiles.block_m * d + buffers * tiles.block_n * (d + dv))


def fit_stages(tiles: AttentionTiles, head_dim: int, dtype: torch.dtype, limit: int,
               value_dim: int | None = None) -> AttentionTiles | None:
    """`tiles` with as many of its pipeline stages as fit in `limit` bytes of shared memory a block;
    None when even one stage does not fit."""
    for stages in range(tiles.num_stages, 0, -1):
        fitted = tiles if stages == tiles.num_stages else dataclasses.replace(tiles, num_stages=stages)
        if shared_memory_bytes(fitted, head_dim, dtype, value_dim) <= limit:
            return fitted
    return None


def padded_head_dim(d: int) -> int:
    """Head dims load into power-of-two tiles of at least 16 (the kernels' BLOCK_D)."""
    return max(_MIN_BLOCK, 1 << (d - 1).bit_length())
