"""What a linear layer costs on the CPU executors (a profile whose executor is "cpu"), term by term
as codegen/linear_cpu.py and torch's dense GEMM spend it. Fitted (non-negative least squares of
the relative error) on the 2-core machine to 144 timings of dense and block-sparse layers (128 x 384
to 4096 x 4096 weights, 8-2048 tokens, 10-70% of 64 x 64 blocks; bench/results/
linear_cpu_20261202_083016.json and _091530.json): rms log error 0.2. The AVX-512 machine's
profile has its own fit of the same terms (cost_models/hardware.py).

  every call         two GEMM calls' fixed cost (gemm_call_overhead_s each: dispatch, output).
  dense, 1 token     a GEMV: the weight streamed once.
  dense, 2+ tokens   a BLAS GEMM at gemm_efficiency of the f32 peak (~66 GF/s), which first copies
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
  N:M                tiles of the weight expanded from the compressed layout (a copy of the dense
                     weight's bytes) and the dense arithmetic, at nm_kernel_efficiency (measured
                     1-6x slower than dense: it never wins on CPU).
"""
from __future__ import annotations

from sparsec.cost_models.hardware import HardwareProfile

__all__ = ["cpu_linear_seconds"]

_BLOCK_INDEX_BYTES = 4        # int32 column index per kept BSR block


def cpu_linear_seconds(M: int, N: int, K: int, dtype: str, size: int, sparsity, hw: HardwareProfile, *,
                       bias: bool = False) -> float:
    """Seconds of y = x @ W.T (+ bias) for M token rows of an N x K weight (`size` bytes an element)
    whose sparsity is an ir.types encoding, on the CPU executors of `hw`."""
    from sparsec.codegen.linear_cpu import FEW_TOKENS, torch_bsr_takes
    from sparsec.ir.types import BlockSparse, NMSparse, torch_dtype

    stream = hw.memory_bandwidth * hw.memory_efficiency
    gemm_rate = hw.flops(dtype) * (hw.gemm_efficiency or hw.matmul_efficiency)
    weight, flops = float(N * K * size), 2.0 * M * N * K
    fixed = 2 * hw.gemm_call_overhead_s + (M * N * size / stream if bias else 0.0)
    if isinstance(sparsity, BlockSparse):
        bo, bi = sparsity.block
        kept = sparsity.density * (weight + N * K / (bo * bi) * _BLOCK_INDEX_BYTES)
        if M <= FEW_TOKENS and torch_bsr_takes(sparsity.block, torch_dtype(dtype)):  # codegen.linear_cpu
            return fixed + kept / (stream * hw.torch_bsr_stream_share)
        efficiency = hw.bsr_kernel_efficiency
        transposes = 2 * (M * K + M * N) * size / hw.gather_bytes_per_s  # read and written, strided
        return (fixed + N / bo * hw.gemm_call_overhead_s + kept / (stream * efficiency)
                + flops * sparsity.density / (gemm_rate * efficiency) + transposes)
    if isinstance(sparsity, NMSparse):
        return fixed + (weight / hw.gather_bytes_per_s + flops / gemm_rate) / hw.nm_kernel_efficiency
    if M == 1:  # a GEMV streams the weight once
        return fixed + max((weight + (K + N) * size) / stream, flops / gemm_rate)
    packing = weight / hw.gemm_pack_bytes_per_s if hw.gemm_pack_bytes_per_s else 0.0
    return fixed + packing + flops / gemm_rate
