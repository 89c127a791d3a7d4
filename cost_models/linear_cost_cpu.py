"""What a linear layer costs on the CPU executors (a profile whose executor is "cpu"), term by term
as codegen/linear_cpu.py and torch's dense GEMM spend it. Measured on the 2-core machine
(bench/results/linear_cpu_20261202_083016.json; 1152 x 4608 and 4096 x 4096 weights, 1-256 tokens):

  dense, 1 token     a GEMV: the weight streamed once.
  dense, 2+ tokens   a BLAS GEMM, which copies the weight into packed panels on every call (the
                     weight is not prepacked): 7 ms of a 21 MB weight at 8 tokens, where the GEMV
                     takes 2 ms; then the arithmetic at the GEMM rate.
  block-sparse       the kept blocks are read at bsr_kernel_efficiency of the streaming speed
                     (~6 GB/s on 2 cores, both ways below):
                     up to FEW_TOKENS tokens, by torch's BSR tensor (MKL's sparse kernels; square
                     blocks, fp32; other weights run the panels);
                     beyond, as one mm call a block row (gemm_call_overhead_s each, ~36 us) on the
                     panels, plus their arithmetic and the transposes of x in and y out (one
                     thread, gather_bytes_per_s). (Fitted: rms log error 0.16 over 24 points.)
  N:M                tiles of the weight expanded from the compressed layout (a copy of the dense
                     weight's bytes) and the dense arithmetic, at nm_kernel_efficiency (measured
                     1.0-6x slower than dense: it never wins on CPU).
"""
from __future__ import annotations

from sparsec.cost_models.hardware import HardwareProfile

__all__ = ["cpu_linear_seconds"]

_BLOCK_INDEX_BYTES = 4  # int32 column index per kept BSR block


def cpu_linear_seconds(M: int, N: int, K: int, dtype: str, size: int, sparsity, hw: HardwareProfile, *,
                       bias: bool = False) -> float:
    """Seconds of y = x @ W.T (+ bias) for M token rows of an N x K weight (`size` bytes an element)
    whose sparsity is an ir.types encoding, on the CPU executors of `hw`."""
    from sparsec.codegen.linear_cpu import FEW_TOKENS
    from sparsec.ir.types import BlockSparse, NMSparse

    stream = hw.memory_bandwidth * hw.memory_efficiency
    gemm_rate = hw.flops(dtype) * hw.matmul_efficiency
    weight = float(N * K * size)
    epilogue = M * N * size / stream if bias else 0.0
    if isinstance(sparsity, BlockSparse):
        bo, bi = sparsity.block
        kept = sparsity.density * (weight + N * K / (bo * bi) * _BLOCK_INDEX_BYTES)
        read = kept / (stream * hw.bsr_kernel_efficiency)
        if M <= FEW_TOKENS and bo == bi and dtype == "f32":  # torch's BSR tensor (codegen.linear_cpu)
            return read + epilogue + hw.gemm_call_overhead_s
        transposes = (M * K + M * N) * size / hw.gather_bytes_per_s  # x.T in, y.T out
        return (N / bo * hw.gemm_call_overhead_s + read + 2.0 * M * N * K * sparsity.density / gemm_rate
                + transposes + epilogue)
    flops = 2.0 * M * N * K
    if isinstance(sparsity, NMSparse):
        expand = weight / hw.gather_bytes_per_s
        return (expand + flops / gemm_rate) / hw.nm_kernel_efficiency + epilogue + hw.gemm_call_overhead_s
    if M == 1:  # a GEMV streams the weight once
        return max((weight + (K + N) * size) / stream, flops / gemm_rate) + epilogue + hw.gemm_call_overhead_s
    return _packed(weight, hw) + flops / gemm_rate + epilogue + hw.gemm_call_overhead_s


def _packed(weight_bytes: float, hw: HardwareProfile) -> float:
    """BLAS's copy of a weight into packed panels on a GEMM call (none where the profile has no rate)."""
    return weight_bytes / hw.gemm_pack_bytes_per_s if hw.gemm_pack_bytes_per_s else 0.0
