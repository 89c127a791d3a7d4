"""Hardware profiles and cost estimates of the kernels sparsec emits.

One interface for every op (STYLE.md 7): `estimate(op, hardware) -> seconds`.

  - ir.ops.Attention: the per-head patterns on `op.scores.sparsity` (DENSE: every head Dense),
    shapes and dtype from q / k / v, `causal` -> attention_cost.estimate_attention at the tiles
    the kernels would use (codegen.tiles.default_tiles, unless block_m / block_n are given).
    An explicit mask / bias operand is not something the pattern kernels take: such an op runs
    the dense path and also streams the mask.
  - ir.ops.Linear: a GEMM of 2 * M * N * K flops, M = tokens (x's leading dims), N x K = weight,
    bound by the slower of arithmetic (at the profile's gemm_efficiency of its peak, or
    matmul_efficiency where that is not set) and memory traffic (x, weight, output, bias), plus a
    launch.
    Sparse weights, following the kernels sparsec has for them (codegen/linear_*.py):
      BlockSparse(block=(bo, bi), density): the BSR kernels visit only kept blocks, so arithmetic
        and weight bytes scale with density (block indices add 4 bytes a block). A program's dot
        tile is the weight block, and tensor cores need ~64 x 64 tiles to run at the dense
        kernel's rate, so the rate drops by min(1, sqrt(bo * bi) / 64): 16 x 16 blocks then win
        only below ~25% density, in line with the 70-86% sparsity crossovers reported for BSR
        matmuls (ANCHORS.md).
      NMSparse(n, m): Triton has no sparse tensor-core dot, so the N:M kernel expands kept values
        to dense tiles in registers — dense arithmetic — but reads only `density` of the weight
        bytes plus one int8 position per kept value: a win where reading the weight dominates
        (few tokens).
      Unstructured: no kernel exploits it, so it costs the dense GEMM.
    `semi_structured=True` prices a 2:4 NMSparse weight on torch's semi-structured kernels
    (cuSPARSELt / CUTLASS): sparse tensor cores do half the arithmetic at the dense rate, and the
    weight is half its values plus 2 bits of metadata per kept value.
    On a "cpu" profile, linear layers are priced as torch's GEMM and codegen/linear_cpu.py spend
    it instead, term by term (cost_models/linear_cost_cpu.py).
"""
from __future__ import annotations

import math

from sparsec.cost_models.attention_cost import AttentionShape, estimate_attention
from sparsec.cost_models.hardware import HardwareProfile, get_profile
from sparsec.cost_models.linear_cost_cpu import cpu_linear_seconds
from sparsec.patterns import Pattern

__all__ = ["estimate", "estimate_linear_seconds", "frame_transposed_heads", "native_heads", "native_kernel_heads",
           "transposed_heads"]

_BYTES = {"f32": 4, "bf16": 2, "f16": 2}
_FULL_RATE_TILE = 64      # dot tile edge at which tensor cores reach the dense GEMM's rate
_BLOCK_INDEX_BYTES = 4    # int32 column index per kept BSR block
_NM_INDEX_BYTES = 1       # int8 in-group position per kept N:M value
_SEMI_METADATA_BYTES = 0.25  # 2 bits of position metadata per kept 2:4 value


def estimate(op, hardware: HardwareProfile | str, *, block_m: int | None = None, block_n: int | None = None) -> float:
    """Seconds one execution of `op` (ir.ops.Attention or ir.ops.Linear) takes on `hardware` (a
    profile or a target name such as "h100"). block_m / block_n override attention tiles."""
    from sparsec.ir.ops import Attention, Linear

    hardware = get_profile(hardware) if isinstance(hardware, str) else hardware
    if isinstance(op, Attention):
        return _attention_seconds(op, hardware, block_m, block_n)
    if isinstance(op, Linear):
        return _linear_seconds(op, hardware)
    raise TypeError(f"estimate: no cost model for {type(op).__name__} ops; it handles Attention and Linear")


def _static_shape(what: str, value) -> tuple[int, ...]:
    shape = value.type.shape
    if not all(isinstance(d, int) for d in shape):
        raise ValueError(f"estimate: {what} %{value.name} has symbolic shape {shape}; costs need static shapes")
    return shape


def _dtype(what: str, dtype: str) -> str:
    if dtype not in _BYTES:
        raise ValueError(f"estimate: {what} dtype {dtype!r} has no kernel; supported: {sorted(_BYTES)}")
    return dtype


def _attention_problem(op, hardware: HardwareProfile, block_m: int | None, block_n: int | None):
    """(head patterns, AttentionShape, block_m, block_n) of an Attention op, tiles defaulted as
    the executor of `hardware` picks them (_default_tiles)."""
    from sparsec.ir.types import AttentionPatterns
    from sparsec.patterns import Dense

    (B, Hq, Sq, D), (_, Hkv, Sk, _), (_, _, _, Dv) = (_static_shape(n, getattr(op, n)) for n in ("q", "k", "v"))
    dtype = _dtype("attention", op.q.type.dtype)
    sparsity = op.scores.sparsity
    patterns = sparsity.patterns if isinstance(sparsity, AttentionPatterns) else (Dense(),) * Hq
    if op.mask is not None:
        patterns = (Dense(),) * Hq
    shape = AttentionShape(batch=B, num_heads=Hq, num_kv_heads=Hkv, q_len=Sq, kv_len=Sk, head_dim=D,
                           value_dim=Dv, dtype=dtype, causal=op.causal)
    return (tuple(patterns), shape, *_default_tiles(shape, hardware, block_m, block_n))


def _default_tiles(shape: AttentionShape, hardware: HardwareProfile, block_m: int | None,
                   block_n: int | None) -> tuple[int | None, int]:
    """(block_m, block_n), each the kernels' default where not given; without tiles from a plan
    the cpu executor picks its query block per pattern (block_m None)."""
    from sparsec.codegen.tiles import default_tiles
    from sparsec.ir.types import torch_dtype

    tiles = default_tiles(max(shape.head_dim, shape.value_dim), torch_dtype(shape.dtype), shape.q_len, shape.kv_len)
    return block_m or (None if hardware.executor == "cpu" else tiles.block_m), block_n or tiles.block_n


def frame_transposed_heads(op, hardware: HardwareProfile | str, *, block_m: int | None = None,
                           block_n: int | None = None) -> tuple[tuple[int, ...], int | None]:
    """(heads, frame): the query heads of an Attention op that `hardware`'s executor runs in
    frame-transposed token order (codegen/frame_order.py), and the frame length; ((), None) if none."""
    hardware = get_profile(hardware) if isinstance(hardware, str) else hardware
    return transposed_heads(*_attention_problem(op, hardware, block_m, block_n), hardware)


def transposed_heads(patterns, shape: AttentionShape, block_m: int | None, block_n: int | None,
                     hardware: HardwareProfile | str) -> tuple[tuple[int, ...], int | None]:
    """frame_transposed_heads of per-head `patterns` for an attention of `shape` (tiles None:
    as the executor picks them)."""
    from sparsec.codegen.attention_cpu_native import Native
    from sparsec.codegen.frame_order import FramesTransposed

    hardware = get_profile(hardware) if isinstance(hardware, str) else hardware
    patterns = tuple(patterns)
    block_m, block_n = _default_tiles(shape, hardware, block_m, block_n)
    if hardware.executor == "cpu":  # on torch's kernel or a native one
        run = [part.pattern if isinstance(part, Native) else part for part in _cpu_runs(patterns, shape, block_m,
                                                                                         hardware)]
    else:
        from sparsec.codegen.triton_frame_order import priced_frame_order

        run = priced_frame_order(patterns, shape, block_m, block_n, hardware)[0]
    heads = tuple(h for h, p in enumerate(run) if isinstance(p, FramesTransposed))
    return heads, (run[heads[0]].frame if heads else None)


def native_kernel_heads(op, hardware: HardwareProfile | str, *, block_m: int | None = None,
                        block_n: int | None = None) -> tuple[int, ...]:
    """The query heads of an Attention op that `hardware`'s executor runs on the native CPU
    kernels (codegen/attention_cpu_native.py); () if none."""
    hardware = get_profile(hardware) if isinstance(hardware, str) else hardware
    patterns, shape, block_m, _ = _attention_problem(op, hardware, block_m, block_n)
    return native_heads(patterns, shape, block_m, hardware)


def native_heads(patterns, shape: AttentionShape, block_m: int | None,
                 hardware: HardwareProfile | str) -> tuple[int, ...]:
    """The query heads of per-head `patterns` that the cpu executor runs on its native kernels
    (codegen/attention_cpu_native.py); () for another executor."""
    from sparsec.codegen.attention_cpu_native import Native

    hardware = get_profile(hardware) if isinstance(hardware, str) else hardware
    if hardware.executor != "cpu":
        return ()
    patterns = tuple(patterns)
    block_m, _ = _default_tiles(shape, hardware, block_m, None)
    return tuple(h for h, part in enumerate(_cpu_runs(patterns, shape, block_m, hardware)) if isinstance(part, Native))


def _cpu_runs(patterns: tuple[Pattern, ...], shape: AttentionShape, block_m: int | None,
              hardware: HardwareProfile) -> list:
    """Per head, the first part the cpu executor runs its pattern as (codegen.attention_cpu_choice)."""
    from sparsec.codegen.attention_cpu_choice import choose_split

    return [choose_split(p, shape.q_len, shape.kv_len, shape.causal, block_m, rows=shape.batch * patterns.count(p),
                         width=shape.head_dim + shape.value_dim, threads=hardware.sm_count)[1][0] for p in patterns]


def _attention_seconds(op, hardware: HardwareProfile, block_m: int | None, block_n: int | None) -> float:
    patterns, shape, block_m, block_n = _attention_problem(op, hardware, block_m, block_n)
    gathers = 0.0
    if hardware.executor != "cpu":  # as triton_attention runs them: temporal heads maybe frame-transposed
        from sparsec.codegen.triton_frame_order import priced_frame_order

        patterns, gathers = priced_frame_order(patterns, shape, block_m, block_n, hardware)
    seconds = estimate_attention(patterns, shape, hardware, block_m=block_m, block_n=block_n).seconds + gathers
    if op.mask is not None:
        mask = op.mask.type
        mask_bytes = (math.prod(_static_shape("mask", op.mask))
                      * (1 if mask.dtype == "bool" else _BYTES.get(mask.dtype, 4)))
        seconds += mask_bytes / (hardware.memory_bandwidth * hardware.memory_efficiency)
    return seconds


def _linear_seconds(op, hardware: HardwareProfile) -> float:
    x_shape, (N, K) = _static_shape("x", op.x), _static_shape("weight", op.weight)
    dtype = _dtype("linear", op.x.type.dtype)
    tokens = math.prod(x_shape[:-1])
    return estimate_linear_seconds(tokens, N, K, dtype, op.weight.type.sparsity, hardware, bias=op.bias is not None)


def estimate_linear_seconds(tokens: int, out_features: int, in_features: int, dtype: str, sparsity,
                            hardware: HardwareProfile, *, bias: bool = False, semi_structured: bool = False) -> float:
    """Seconds of y = x @ W.T (+ bias) for `tokens` rows on `hardware`, W's sparsity an ir.types
    encoding (see the module docstring for what each one changes); `semi_structured`: a 2:4
    weight on torch's semi-structured kernels."""
    from sparsec.ir.types import BlockSparse, NMSparse

    M, N, K, size = tokens, out_features, in_features, _BYTES[_dtype("linear", dtype)]
    if hardware.executor == "cpu":
        if semi_structured:
            raise ValueError(f"estimate_linear_seconds: torch's semi-structured kernels run on GPUs; profile "
                             f"{hardware.name!r} prices the CPU executors")
        return cpu_linear_seconds(M, N, K, dtype, size, sparsity, hardware, bias=bias)
    flops, weight_bytes, rate = 2.0 * M * N * K, float(N * K * size), 1.0
    if semi_structured:
        if not (isinstance(sparsity, NMSparse) and sparsity.m == 4 and sparsity.n <= 2):
            raise ValueError(f"estimate_linear_seconds: semi-structured kernels need a 2:4 weight, got {sparsity!r}")
        flops, weight_bytes = flops / 2, N * K / 2 * (size + _SEMI_METADATA_BYTES)
    elif isinstance(sparsity, BlockSparse):
        bo, bi = sparsity.block
        flops *= sparsity.density
        weight_bytes = weight_bytes * sparsity.density + sparsity.density * (N * K / (bo * bi)) * _BLOCK_INDEX_BYTES
        rate = min(1.0, math.sqrt(bo * bi) / _FULL_RATE_TILE)
    elif isinstance(sparsity, NMSparse):
        weight_bytes = sparsity.density * N * K * (size + _NM_INDEX_BYTES)
    traffic = weight_bytes + (M * K + M * N + (N if bias else 0)) * size
    compute_s = flops / (hardware.flops(dtype) * (hardware.gemm_efficiency or hardware.matmul_efficiency) * rate)
    memory_s = traffic / (hardware.memory_bandwidth * hardware.memory_efficiency)
    seconds = max(compute_s, memory_s)
    if isinstance(sparsity, NMSparse) and not semi_structured:
        seconds /= hardware.nm_kernel_efficiency
    elif isinstance(sparsity, BlockSparse):
        seconds /= hardware.bsr_kernel_efficiency
    return seconds + hardware.launch_overhead_s
