"""What a linear layer costs on the CPU executors (a profile whose executor is "cpu"), term by term
as codegen/linear_cpu.py and torch's dense GEMM spend it. Fitted (non-negative least squares of
the relative error) on the 2-core machine to 144 timings of dense and block-sparse layers (128 x 384
to 4096 x 4096 weights, 8-2048 tokens, 10-70% of 64 x 64 blocks; bench/results/
linear_cpu_20261202_083016.json and _091530.json): rms log error 0.2. The AVX-512 machine's
profile has its own fit of the same terms (cost_models/hardware.py).

  every call         two GEMM calls' fixed cost (gemm_call_overhead_s each: dispatch, output).
  dense, 1 token     a GEMV: the weight streamed once (up to gemv_tokens rows: the AVX-512
                     machine's MKL runs 2 like 1, 1.05x its time).
  dense, bf16        with AMX tiles (bf16_gemm_bytes_per_s set): the weight streamed at that speed,
                     then the arithmetic at gemm_efficiency of the bf16 peak, at any token count.
  dense, more        a BLAS GEMM at gemm_efficiency of the f32 peak (~66 GF/s), which first copies
                     the weight into packed panels, on every call (the weight is not prepacked):
                     6-7 ms of a 21 MB weight at 8 tokens, where the 1-token GEMV takes 2 ms.
  block-sparse, up to FEW_TOKENS tokens
                     torch's BSR tensor (MKL's sparse kernels; square fp32 blocks, other weights
                     run the panels) streams the kept blocks at torch_bsr_stream_share of the dense
                     GEMV's speed (0.5 on the 2-core AVX2 machine: 5.6-6.5 GB/s against 10-14).
  block-sparse, more tokens
                     one mm call a block row on its panel of kept blocks, their bytes and their
                     arithmetic at bsr_kernel_efficiency (0.8) of the dense path's speeds (the
                     panels' 64-row outputs), and the strided copies of x.T in and y.T out (one
                     thread).
  N:M (torch)        tiles of the weight expanded from the compressed layout (a copy of the dense
                     weight's bytes) and the dense arithmetic, at nm_kernel_efficiency (measured
                     1-6x slower than dense: it never wins on CPU). The path where the native
                     kernels cannot run (no compiler, a dtype other than float32).
  native kernels     (codegen/native/sparse_linear.cpp; float32, and bfloat16 on masked rows
                     and block rows, where the library loads):
    masked rows      N:M and unstructured weights, any token count: per 16 inputs of every row
                     (kept or not) native_chunk_seconds, and native_chunk_token_seconds a token,
                     on one core, or the kept values, their masks and offsets streamed at
                     native_stream_share of the bandwidth once per tile of 64 tokens, whichever
                     takes longer;
                     every native call also pays native_linear_call_s;
    segments         N:M and unstructured weights: per kept value native_value_seconds for each
                     tile of 64 tokens and native_value_lanes_seconds for each 16 tokens (padded),
                     on one core, and the copies of x into token tiles and of y out of them;
    block rows       block-sparse weights (bo even, bi a multiple of 16): as masked rows over the
                     kept blocks' inputs only, their values streamed.
  The executor runs each layer by the cheapest of the paths its weight has at the call's token
  count (`cpu_linear_paths`, as codegen/linear_cpu.py asks), which is what a layer costs here.
"""
from __future__ import annotations

from sparsec.cost_models.hardware import HardwareProfile

__all__ = ["cpu_linear_paths", "cpu_linear_seconds"]

_BLOCK_INDEX_BYTES = 4        # int32 column index per kept BSR block
_LANES, _TILE = 16, 64        # the native kernels' vector width and the segments kernel's token tile


def cpu_linear_seconds(M: int, N: int, K: int, dtype: str, size: int, sparsity, hw: HardwareProfile, *,
                       bias: bool = False, native: bool | None = None) -> float:
    """Seconds of y = x @ W.T (+ bias) for M token rows of an N x K weight (`size` bytes an element)
    whose sparsity is an ir.types encoding, on the CPU executors of `hw`: the cheapest path."""
    stream = hw.memory_bandwidth * hw.memory_efficiency
    fixed = 2 * hw.gemm_call_overhead_s + (M * N * size / stream if bias else 0.0)
    return fixed + min(cpu_linear_paths(M, N, K, dtype, size, sparsity, hw, native=native).values())


def cpu_linear_paths(M: int, N: int, K: int, dtype: str, size: int, sparsity, hw: HardwareProfile, *,
                     native: bool | None = None) -> dict[str, float]:
    """Seconds of each path the CPU executor has for the layer (module docstring), apart from the
    fixed cost of a call: "dense", "torch_bsr", "panels", "block_rows", "expand", "masked",
    "segments". native: whether the native kernels load (None: ask codegen.linear_cpu_native)."""
    from sparsec.codegen.linear_cpu import FEW_TOKENS, torch_bsr_takes
    from sparsec.codegen.linear_cpu_native import VALUE_DTYPES
    from sparsec.ir.types import BlockSparse, NMSparse, Unstructured, torch_dtype

    stream = hw.memory_bandwidth * hw.memory_efficiency
    gemm_rate = hw.flops(dtype) * (hw.gemm_efficiency or hw.matmul_efficiency)
    weight, flops = float(N * K * size), 2.0 * M * N * K
    if native is None:
        native = _native_available()
    wide = native and dtype == "f32"                       # every native kernel
    native = native and torch_dtype(dtype) in VALUE_DTYPES  # masked rows and block rows
    if isinstance(sparsity, BlockSparse):
        bo, bi = sparsity.block
        kept = sparsity.density * (weight + N * K / (bo * bi) * _BLOCK_INDEX_BYTES)
        paths = {}
        if M <= FEW_TOKENS and torch_bsr_takes(sparsity.block, torch_dtype(dtype)):  # codegen.linear_cpu
            paths["torch_bsr"] = kept / (stream * hw.torch_bsr_stream_share)
        efficiency = hw.bsr_kernel_efficiency
        transposes = 2 * (M * K + M * N) * size / hw.gather_bytes_per_s  # read and written, strided
        paths["panels"] = (N / bo * hw.gemm_call_overhead_s + kept / (stream * efficiency)
                           + flops * sparsity.density / (gemm_rate * efficiency) + transposes)
        if native and bo % 2 == 0 and bi % _LANES == 0:
            paths["block_rows"] = _chunk_seconds(M, N * sparsity.density * K / _LANES, kept, hw)
        return paths
    if isinstance(sparsity, (NMSparse, Unstructured)):
        paths = {}
        if isinstance(sparsity, NMSparse):
            paths["expand"] = (weight / hw.gather_bytes_per_s + flops / gemm_rate) / hw.nm_kernel_efficiency
        if native:
            values = sparsity.density * N * K
            chunks = N * -(-K // _LANES)
            paths["masked"] = _chunk_seconds(M, chunks, values * size + chunks * 2 + N * 8, hw)
            if wide:
                paths["segments"] = _segments_seconds(M, N, K, values, hw)
        return paths or {"dense": _dense_seconds(M, N, K, dtype, size, hw)}
    return {"dense": _dense_seconds(M, N, K, dtype, size, hw)}


def _dense_seconds(M: int, N: int, K: int, dtype: str, size: int, hw: HardwareProfile) -> float:
    """torch's dense linear (module docstring), apart from the fixed cost of a call."""
    stream = hw.memory_bandwidth * hw.memory_efficiency
    gemm_rate = hw.flops(dtype) * (hw.gemm_efficiency or hw.matmul_efficiency)
    weight, flops = float(N * K * size), 2.0 * M * N * K
    if dtype == "bf16" and hw.bf16_gemm_bytes_per_s:  # AMX tiles: the weight streamed, then the arithmetic
        return weight / hw.bf16_gemm_bytes_per_s + flops / gemm_rate
    if M <= hw.gemv_tokens:  # a GEMV (or torch's kernel for a few rows like one) streams the weight once
        return max((weight + M * (K + N) * size) / stream, flops / gemm_rate)
    packing = weight / hw.gemm_pack_bytes_per_s if hw.gemm_pack_bytes_per_s else 0.0
    return packing + flops / gemm_rate


def _chunk_seconds(M: int, chunks: float, weight_bytes: float, hw: HardwareProfile) -> float:
    """The masked / block-rows kernels: `chunks` row chunks of 16 inputs computed, each for M
    tokens, on hw.sm_count cores, or the weight's bytes streamed once per tile of 64 tokens,
    whichever is longer."""
    compute = chunks * (hw.native_chunk_seconds + M * hw.native_chunk_token_seconds) / hw.sm_count
    stream = -(-M // _TILE) * weight_bytes / (hw.memory_bandwidth * hw.native_stream_share)
    return hw.native_linear_call_s + max(compute, stream)


def _segments_seconds(M: int, N: int, K: int, values: float, hw: HardwareProfile) -> float:
    """The segments kernel: each kept value per token tile and per 16 tokens, and the copies of x
    into tiles and of y out of them, on hw.sm_count cores."""
    padded = -(-M // _LANES) * _LANES
    tiles = -(-padded // _TILE)
    compute = values * (tiles * hw.native_value_seconds + padded / _LANES * hw.native_value_lanes_seconds)
    copies = 4 * (2 * M * K + 2 * N * padded) / hw.gather_bytes_per_s
    return hw.native_linear_call_s + (compute + copies) / hw.sm_count


def _native_available() -> bool:
    from sparsec.codegen.linear_cpu_native import native_linear_available

    return native_linear_available()

