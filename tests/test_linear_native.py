"""The native CPU kernels of sparse linear layers (codegen/linear_cpu_native.py,
codegen/native/sparse_linear.cpp) against float64 references on fresh random weights and inputs:
masked rows and segments (N:M and scattered zeros), block rows (block-sparse panels), odd shapes
(in_features not a multiple of 16 or of a segment, one output row, rows that keep nothing), token
counts across the kernels' token blocks and tiles; the executors' paths (each run, chosen by the
cost model), and the fallbacks when the library is disabled.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from sparsec.codegen import linear_cpu, linear_cpu_native
from sparsec.codegen.linear_cpu import (NMRows, bsr_linear_cpu, cpu_path, nm_linear_cpu, pack_block_rows,
                                        pack_nm_rows, unstructured_linear_cpu)
from sparsec.codegen.linear_cpu_native import (SEGMENT, block_rows_linear, masked_linear, pack_sparse_rows,
                                               segments_linear)
from sparsec.codegen.weight_packing import pack_bsr, pack_nm
from sparsec.cost_models.hardware import get_profile
from sparsec.cost_models.linear_cost_cpu import cpu_linear_paths
from sparsec.ir.types import BlockSparse, NMSparse, Unstructured

pytestmark = pytest.mark.skipif(not linear_cpu_native.native_linear_available(),
                                reason=f"native kernels unavailable: {linear_cpu_native.native_status()}")

TOKENS = (1, 2, 3, 7, 8, 9, 16, 17, 63, 64, 65, 130, 200)


def scattered(N: int, K: int, density: float, generator: torch.Generator) -> torch.Tensor:
    w = torch.randn(N, K, generator=generator)
    return w * (torch.rand(N, K, generator=generator) < density)


def n_of_m(N: int, K: int, n: int, m: int, generator: torch.Generator) -> torch.Tensor:
    keep = torch.rand(N, K // m, m, generator=generator).argsort(-1)[..., :n]
    mask = torch.zeros(N, K // m, m, dtype=torch.bool).scatter_(-1, keep, True).view(N, K)
    return torch.randn(N, K, generator=generator) * mask


def reference(x: torch.Tensor, w: torch.Tensor, bias=None, activation="none") -> torch.Tensor:
    y = x.double() @ w.double().T
    if bias is not None:
        y = y + bias.double()
    return {"none": y, "relu": y.relu(), "gelu": torch.nn.functional.gelu(y),
            "silu": torch.nn.functional.silu(y)}[activation]


def assert_close(y: torch.Tensor, expected: torch.Tensor) -> None:
    assert y.dtype == torch.float32 and y.shape == expected.shape
    torch.testing.assert_close(y.double(), expected, atol=2e-4, rtol=2e-4)


@pytest.fixture
def generator(request) -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed())


@pytest.mark.parametrize("N, K, density", [(37, 50, 0.4), (64, 300, 0.3), (1, 16, 0.5), (130, 129, 0.1),
                                           (20, SEGMENT * 2 + 5, 0.7), (8, 1, 1.0), (3, 700, 0.02)])
def test_masked_and_segments_kernels_give_the_reference(N, K, density, generator):
    w = scattered(N, K, density, generator)
    w[N // 2] = 0  # a row that keeps nothing
    rows = pack_sparse_rows(w)
    assert rows.nnz == int((w != 0).sum()) and rows.shape == (N, K)
    for tokens in TOKENS:
        x = torch.randn(tokens, K, generator=generator)
        expected = reference(x, w)
        assert_close(masked_linear(x, rows), expected)
        assert_close(segments_linear(x, rows), expected)
        strided = torch.randn(tokens, K + 3, generator=generator)[:, 1:K + 1]  # rows not contiguous
        assert_close(segments_linear(strided, rows), reference(strided, w))
        assert_close(masked_linear(strided, rows), reference(strided, w))


@pytest.mark.parametrize("N, K", [(37, 50), (64, 300), (130, 129)])
def test_masked_kernel_takes_bfloat16_weights(N, K, generator):
    """bfloat16 values (and x), float32 arithmetic: the reference is the float64 product of the
    bfloat16 operands, and the output is rounded to bfloat16 once."""
    w = scattered(N, K, 0.4, generator).bfloat16()
    rows = pack_sparse_rows(w)
    assert rows.dtype == torch.bfloat16 and rows.masked().values.dtype == torch.bfloat16
    torch.testing.assert_close(rows.to_dense(), w, atol=0, rtol=0)
    for tokens in (1, 3, 9, 17):
        x = torch.randn(tokens, K, generator=generator).bfloat16()
        y = masked_linear(x, rows)
        assert y.dtype == torch.bfloat16
        expected = x.double() @ w.double().T
        torch.testing.assert_close(y.double(), expected, atol=1e-2 * expected.abs().max().item(), rtol=1e-2)
        assert masked_linear(x.float(), rows) is None  # x must be in the weight's dtype
    assert segments_linear(torch.randn(3, K).bfloat16(), rows) is None  # float32 only


def test_sparse_rows_layouts_hold_the_weight(generator):
    w = n_of_m(24, 96, 2, 4, generator)
    rows = pack_sparse_rows(w)
    torch.testing.assert_close(rows.to_dense(), w, atol=0, rtol=0)  # from the masked layout
    masked, segments = rows.masked(), rows.segments()
    assert masked.values.numel() == segments.values.numel() == rows.nnz == 24 * 48
    assert masked.row_start[-1] == rows.nnz and segments.offsets[-1, -1] == rows.nnz
    assert int(segments.columns.max()) < SEGMENT


def test_an_all_zero_weight_gives_zeros(generator):
    rows = pack_sparse_rows(torch.zeros(10, 40))
    for tokens in (1, 9, 70):
        x = torch.randn(tokens, 40, generator=generator)
        assert masked_linear(x, rows).abs().max() == 0 and segments_linear(x, rows).abs().max() == 0


@pytest.mark.parametrize("block", [(16, 16), (32, 64), (64, 32), (2, 16)])
def test_block_rows_kernel_gives_the_reference(block, generator):
    N, K = 4 * max(block[0], 16), 3 * block[1]
    w = torch.randn(N, K, generator=generator)
    layout = torch.rand(N // block[0], K // block[1], generator=generator) < 0.4
    layout[1] = False  # a block row that keeps nothing
    w = w * layout.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    packed = pack_block_rows(pack_bsr(w, block))
    half = pack_block_rows(pack_bsr(w.bfloat16(), block))
    for tokens in TOKENS:
        x = torch.randn(tokens, K, generator=generator)
        y = block_rows_linear(x, packed.panels, packed.panel_start, packed.crow_indices, packed.block_columns,
                              packed.shape, packed.block)
        assert_close(y, reference(x, w))
        xh = x.bfloat16()  # bfloat16 panels and x, float32 sums, a bfloat16 output
        y = block_rows_linear(xh, half.panels, half.panel_start, half.crow_indices, half.block_columns,
                              half.shape, half.block)
        expected = xh.double() @ w.bfloat16().double().T
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.double(), expected, atol=1e-2 * expected.abs().max().item(), rtol=1e-2)


def test_block_rows_kernel_declines_blocks_it_cannot_run(generator):
    w = torch.randn(24, 24, generator=generator)
    packed = pack_block_rows(pack_bsr(w, (8, 8)))  # 8 inputs a block: not a multiple of 16
    x = torch.randn(3, 24, generator=generator)
    assert block_rows_linear(x, packed.panels, packed.panel_start, packed.crow_indices, packed.block_columns,
                             packed.shape, packed.block) is None
    assert_close(bsr_linear_cpu(x, packed), reference(x, w))  # the executor's other paths


# -- the executors: every path, chosen by the cost model -------------------------------------------


def test_executors_take_the_cost_models_cheapest_path(monkeypatch):
    hardware = get_profile("cpu").with_cores(torch.get_num_threads())
    cases = [((4096, 4096), Unstructured(density=0.3)), ((4096, 4096), NMSparse(n=2, m=4, density=0.5)),
             ((4096, 4096), BlockSparse(block=(64, 64), density=0.3)),
             ((4096, 4096), BlockSparse(block=(64, 64), density=0.6))]
    seen = set()
    for shape, sparsity in cases:
        for tokens in (1, 8, 64, 512, 4096):
            paths = cpu_linear_paths(tokens, *shape, "f32", 4, sparsity, hardware)
            assert cpu_path(tokens, shape, torch.float32, sparsity) == min(paths, key=paths.get)
            seen.add(min(paths, key=paths.get))
    # the published profile sends a few tokens to the native kernels, and many to the segments
    # kernel (scattered zeros); blocks stay on block rows (measured at 4096 tokens, 60% 64 x 64
    # blocks: 588 ms against 1076 ms for BLAS on panels)
    assert {"masked", "segments", "block_rows"} <= seen


@pytest.mark.parametrize("path", ["masked", "segments", "expand"])
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_nm_executor_paths_give_the_reference(path, activation, monkeypatch, generator):
    w = n_of_m(48, 64, 2, 4, generator)
    packed = pack_nm_rows(pack_nm(w, 2, 4))
    assert isinstance(packed, NMRows) and packed.rows is not None
    monkeypatch.setattr(linear_cpu, "cpu_path", lambda *args: path)
    bias = torch.randn(48, generator=generator)
    for shape in ((1, 64), (2, 3, 64), (70, 64)):
        x = torch.randn(shape, generator=generator)
        y = nm_linear_cpu(x, packed, bias, activation)
        assert y.shape == (*shape[:-1], 48)
        assert_close(y.reshape(-1, 48), reference(x.reshape(-1, 64), w, bias, activation))


@pytest.mark.parametrize("path", ["block_rows", "panels", "torch_bsr"])
def test_bsr_executor_paths_give_the_reference(path, monkeypatch, generator):
    w = torch.randn(64, 96, generator=generator)
    w[:32, 32:] = 0
    packed = pack_block_rows(pack_bsr(w, (32, 32)))
    monkeypatch.setattr(linear_cpu, "cpu_path", lambda *args: path)
    for tokens in (1, 3, 20):
        x = torch.randn(tokens, 96, generator=generator)
        assert_close(bsr_linear_cpu(x, packed, activation="relu"), reference(x, w, activation="relu"))


def test_unstructured_executor_gives_the_reference_and_checks_its_input(generator):
    w = scattered(40, 72, 0.25, generator)
    rows = pack_sparse_rows(w)
    bias = torch.randn(40, generator=generator)
    for shape in ((1, 72), (4, 5, 72), (100, 72)):
        x = torch.randn(shape, generator=generator)
        y = unstructured_linear_cpu(x, rows, bias, "silu")
        assert_close(y.reshape(-1, 40), reference(x.reshape(-1, 72), w, bias, "silu"))
    with pytest.raises(TypeError, match="float32"):
        unstructured_linear_cpu(torch.randn(2, 72, dtype=torch.float64), rows)
    with pytest.raises(ValueError, match="72"):
        unstructured_linear_cpu(torch.randn(2, 71), rows)
    with pytest.raises(TypeError, match="SparseRows"):
        unstructured_linear_cpu(torch.randn(2, 72), w)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        pack_sparse_rows(w.double())
    half = pack_sparse_rows(w.bfloat16())  # bfloat16: the masked kernel, at any token count here
    x = torch.randn(5, 72, generator=generator).bfloat16()
    y = unstructured_linear_cpu(x, half, bias.bfloat16(), "relu")
    expected = reference(x, w.bfloat16(), bias.bfloat16(), "relu")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), expected, atol=2e-2 * expected.abs().max().item(), rtol=2e-2)


def test_without_the_library_the_executors_fall_back(monkeypatch, generator):
    monkeypatch.setenv("SPARSEC_CPU_NATIVE", "0")
    linear_cpu._cheapest.cache_clear()
    try:
        assert not linear_cpu_native.native_linear_available()
        w = n_of_m(16, 32, 1, 4, generator)
        x = torch.randn(3, 32, generator=generator)
        rows = pack_sparse_rows(w)
        assert masked_linear(x, rows) is None and segments_linear(x, rows) is None
        packed = pack_nm_rows(pack_nm(w, 1, 4))
        assert packed.rows is None
        assert_close(nm_linear_cpu(x, packed), reference(x, w))  # the expand path
        hardware = get_profile("cpu")
        assert set(cpu_linear_paths(8, 16, 32, "f32", 4, Unstructured(density=0.25), hardware)) == {"dense"}
        with pytest.raises(RuntimeError, match="unavailable"):
            unstructured_linear_cpu(x, rows)
    finally:
        linear_cpu._cheapest.cache_clear()


def test_native_paths_are_priced_term_by_term():
    """cost_models/linear_cost_cpu.py's native paths: masked rows and block rows compute every 16
    inputs of a row (masked: kept or not; block rows: the kept blocks') per token, or stream the
    kept values, whichever is longer; segments pay per kept value per 64-token tile and per 16
    tokens, and copy x and y; every native call pays its overhead. bfloat16 on the masked kernel
    only, no native path for float16."""
    hw = get_profile("cpu", calibrated=False).with_cores(2)
    N, K, M = 4096, 1000, 5
    a, b = hw.native_chunk_seconds, hw.native_chunk_token_seconds
    bandwidth = hw.memory_bandwidth * hw.native_stream_share
    values, chunks = 0.25 * N * K, N * 63
    paths = cpu_linear_paths(M, N, K, "f32", 4, Unstructured(density=0.25), hw, native=True)
    assert set(paths) == {"masked", "segments"}
    assert paths["masked"] == pytest.approx(hw.native_linear_call_s + max(
        chunks * (a + M * b) / 2, (4 * values + 2 * chunks + 8 * N) / bandwidth))
    assert paths["segments"] == pytest.approx(hw.native_linear_call_s + (values * (
        hw.native_value_seconds + hw.native_value_lanes_seconds) + 4 * (2 * M * K + 2 * N * 16) / hw.gather_bytes_per_s) / 2)
    blocks = cpu_linear_paths(M, N, 1024, "f32", 4, BlockSparse(block=(64, 64), density=0.5), hw, native=True)
    kept = 0.5 * (N * 1024 * 4 + N * 1024 / 4096 * 4)
    assert blocks["block_rows"] == pytest.approx(hw.native_linear_call_s + max(
        N * 0.5 * 1024 / 16 * (a + M * b) / 2, kept / bandwidth))
    # bfloat16: the masked kernel only, reading 2 bytes a value
    nm = cpu_linear_paths(M, N, K, "bf16", 2, NMSparse(n=2, m=4, density=0.5), hw, native=True)
    assert set(nm) == {"expand", "masked"}
    half = cpu_linear_paths(M, N, K, "bf16", 2, Unstructured(density=0.25), hw, native=True)
    assert set(half) == {"masked"}
    assert half["masked"] == pytest.approx(hw.native_linear_call_s + max(
        chunks * (a + M * b) / 2, (2 * values + 2 * chunks + 8 * N) / bandwidth))
    assert set(cpu_linear_paths(M, N, K, "f16", 2, Unstructured(density=0.25), hw, native=True)) == {"dense"}


_PORTABLE_CHECK = """
import sys, torch
from sparsec.codegen import linear_cpu_native as L
from sparsec.codegen.linear_cpu import pack_block_rows
from sparsec.codegen.weight_packing import pack_bsr
assert L.native_linear_available(), L.native_status()
g = torch.Generator().manual_seed(int(sys.argv[1]))
w = torch.randn(33, 150, generator=g) * (torch.rand(33, 150, generator=g) < 0.3)
rows, worst = L.pack_sparse_rows(w), 0.0
b = torch.randn(64, 64, generator=g)
b[:32, :32] = 0
blocks = pack_block_rows(pack_bsr(b, (32, 32)))
half, worst_half = L.pack_sparse_rows(w.bfloat16()), 0.0
for tokens in (1, 5, 9, 70):
    x = torch.randn(tokens, 150, generator=g)
    for y in (L.masked_linear(x, rows), L.segments_linear(x, rows)):
        worst = max(worst, float((y.double() - x.double() @ w.double().T).abs().max()))
    xh = x.bfloat16()
    yh = L.masked_linear(xh, half).double()
    exact = xh.double() @ w.bfloat16().double().T
    worst_half = max(worst_half, float(((yh - exact).abs() / (1 + exact.abs())).max()))
    xb = torch.randn(tokens, 64, generator=g)
    y = L.block_rows_linear(xb, blocks.panels, blocks.panel_start, blocks.crow_indices, blocks.block_columns,
                            blocks.shape, blocks.block)
    worst = max(worst, float((y.double() - xb.double() @ b.double().T).abs().max()))
print(worst, worst_half)
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 targets")
def test_the_kernels_built_for_avx2_give_the_reference(tmp_path):
    """The library built for an AVX2 target (no AVX-512: the masked kernel expands values with a
    loop) gives the same results; a fresh process, since a process loads the library once."""
    env = {**os.environ, "SPARSEC_CPU_MARCH": "x86-64-v3", "SPARSEC_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _PORTABLE_CHECK, str(torch.seed() % 2**31)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    worst, worst_half = map(float, done.stdout.strip().splitlines()[-1].split())
    assert worst < 1e-4 and worst_half < 1e-2  # float32 sums; bfloat16 outputs (8 bits of mantissa)
    assert any(tmp_path.rglob("sparse_linear_*.so"))
