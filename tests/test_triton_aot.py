"""The Triton kernels compiled ahead of time for H100 (sm_90) with Triton's compiler and ptxas.

The interpreter tests check what the kernels compute; these check that Triton's GPU compiler
accepts every family's launch as the entry points build it for CUDA, and what the binaries cost:
shared memory within the architecture's limit, no register spills at the default tiles, tensor-core
dots (wgmma) and pipelined loads. No GPU is needed (codegen/triton_aot). bench/compile_check.py
covers fp16 too, and records the figures (bench/results/compile_sm90_*.json).
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from sparsec.codegen import attention_triton, linear_triton
from sparsec.codegen.kernel_call import KernelCall
from sparsec.codegen.tiles import AttentionTiles, default_tiles, shared_memory_bytes
from sparsec.codegen.triton_aot import ARCHITECTURES, AOTCompileError, compile_call, compile_calls, target_arch
from sparsec.codegen.frame_order import FramesTransposed
from sparsec.codegen.weight_packing import pack_bsr, pack_nm
from sparsec.patterns import AShape, BlockSparse, Columns, Dense, MultiDiagonal, VerticalSlash, Window


def _ptxas_available() -> bool:
    try:
        import triton
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends and (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


pytestmark = pytest.mark.skipif(not _ptxas_available(), reason="Triton without its NVIDIA backend and ptxas")

S = 1024


def _family_patterns(causal: bool):
    layout = torch.rand(S // 64, S // 64, generator=torch.Generator().manual_seed(0)) < 0.3
    return {
        "dense": Dense(),
        "window": Window(200, 0 if causal else 200),
        "multi_diagonal": MultiDiagonal(list(range(-960, 1, 24)), 3),  # 41 bands: 5.4 KB spilled at 96 unrolled
        "columns": Columns([(0, 32), (500, 520)]),
        "a_shape": AShape(64, 256),
        # Hundreds of diagonals and columns: an unrolled test of each spilled kilobytes (and a union
        # holding them took 200 s to compile); the key map and diagonal bits keep the mask small.
        "vertical_slash": VerticalSlash([0, 1, 2, *range(300, 700, 4)], list(range(-S + 1, 1, 7))),
        "block_sparse": BlockSparse(layout, 64),
        "union": Window(128, 0) | Columns([(0, 64)]) | VerticalSlash(list(range(500, 900, 8)), list(range(-S + 1, 0, 5))),
        # a temporal head in frame-transposed order: 16 frames of 64 tokens, 93 diagonals
        "frames_transposed": FramesTransposed(MultiDiagonal([f * 64 + r for f in range(-15, 16) for r in (-8, 0, 8)], 2),
                                              64),
    }


def _attention_calls(dtype, head_dim, causal=True, tiles=None):
    q, k, v = (torch.empty(1, 2, S, head_dim, dtype=dtype) for _ in range(3))
    calls = {}
    for family, pattern in _family_patterns(causal).items():
        (call,) = attention_triton.kernel_calls(q, k, v, (pattern, pattern), causal=causal, scale=0.1,
                                                tiles=tiles, interpreted=False)
        calls[family] = call
    return calls


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_every_family_compiles_for_h100_at_the_default_tiles_without_spills(head_dim):
    calls = _attention_calls(torch.bfloat16, head_dim)
    reports = compile_calls(list(calls.values()), "h100", workers=2)
    tiles = default_tiles(head_dim, torch.bfloat16)
    for family, report in zip(calls, reports):
        assert report.error is None, report.error
        assert report.kernel == f"attention_{family}_kernel"
        assert (report.num_warps, report.num_stages) == (tiles.num_warps, tiles.num_stages)
        assert 0 < report.shared_bytes <= ARCHITECTURES[90], (family, report.shared_bytes)
        # The bound the search and the launch use to keep tiles launchable holds for every family.
        assert report.shared_bytes <= shared_memory_bytes(tiles, head_dim, torch.bfloat16), family
        assert report.mma == "wgmma", (family, report.mma)  # bf16 dots on Hopper's tensor cores
        assert report.async_loads, family                  # K / V loads pipelined by cp.async
        if report.spill_bytes is not None:
            assert report.spill_bytes == 0, (family, report.spill_bytes, tiles)
        assert report.problems() == []


def test_the_linear_kernels_compile_for_h100():
    tokens, features = 256, 256
    x, y = torch.empty(tokens, features, dtype=torch.bfloat16), torch.empty(tokens, features, dtype=torch.bfloat16)
    weight = torch.randn(features, features).to(torch.bfloat16)
    layout = torch.rand(features // 64, features // 64, generator=torch.Generator().manual_seed(1)) < 0.5
    bsr = pack_bsr(weight * layout.repeat_interleave(64, 0).repeat_interleave(64, 1), (64, 64))
    groups = weight.view(features, -1, 4)
    keep = groups.abs().argsort(dim=-1, descending=True)[..., :2]
    nm_weight = torch.zeros_like(groups).scatter(-1, keep, groups.gather(-1, keep)).view(features, features)
    tiles = linear_triton.default_tiles(tokens)
    calls = [linear_triton.bsr_kernel_call(x, bsr, None, y, "gelu", tiles, interpreted=False),
             linear_triton.nm_kernel_call(x, pack_nm(nm_weight, 2, 4), y[:, 0], y, "relu", tiles, interpreted=False)]
    for report in compile_calls(calls, "h100", workers=2):
        assert report.error is None, report.error
        assert report.mma == "wgmma" and report.shared_bytes <= ARCHITECTURES[90]
        assert report.problems() == []


def test_tiles_too_large_for_shared_memory_are_reported_and_the_bound_says_so_first():
    tiles = AttentionTiles(128, 128, num_warps=8, num_stages=3)
    calls = _attention_calls(torch.bfloat16, 256, tiles=tiles)
    report = compile_call(calls["window"], "sm_90")
    assert report.shared_bytes > ARCHITECTURES[90]
    assert any("shared memory" in p for p in report.problems())
    assert shared_memory_bytes(tiles, 256, torch.bfloat16) >= report.shared_bytes


_BROKEN = '''
import triton
import triton.language as tl


@triton.jit
def good_kernel(X, Y, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs) * 2)


@triton.jit
def broken_kernel(X, Y, BLOCK: tl.constexpr):
    a = tl.load(X + tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :])
    b = tl.load(X + tl.arange(0, 2 * BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :])
    tl.store(Y + tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :], tl.dot(a, b))
'''


def test_a_kernel_triton_refuses_is_reported_by_name_and_the_others_still_compile(tmp_path):
    source = tmp_path / "kernels.py"
    source.write_text(textwrap.dedent(_BROKEN))
    x, y = torch.empty(32 * 32), torch.empty(32 * 32)
    good = KernelCall(source, "good_kernel", (1,), (x, y), {"BLOCK": 32})
    broken = KernelCall(source, "broken_kernel", (1,), (x, y), {"BLOCK": 32})
    first, second = compile_calls([broken, good], "h100")
    assert first.error and "broken_kernel" in first.error and "sm_90" in first.error
    assert first.problems() == [first.error]
    assert second.error is None and second.problems() == [] and second.mma == "none"
    with pytest.raises(AOTCompileError, match="broken_kernel"):
        compile_call(broken, "h100")
    missing = KernelCall(source, "no_such_kernel", (1,), (x, y), {"BLOCK": 32})
    with pytest.raises(AOTCompileError, match="no @triton.jit kernel named 'no_such_kernel'"):
        compile_call(missing)


@pytest.mark.parametrize("target, arch", [("h100", 90), ("H200", 90), ("a100", 80), ("sm_90", 90), ("sm90a", 90), (80, 80)])
def test_targets_name_an_architecture(target, arch):
    assert target_arch(target) == arch


@pytest.mark.parametrize("target", ["v100", "sm_70", 75, True, None])
def test_unknown_targets_are_refused(target):
    with pytest.raises(ValueError, match="target"):
        target_arch(target)


def test_compile_calls_refuses_what_is_not_a_kernel_call():
    with pytest.raises(TypeError, match="KernelCall"):
        compile_calls(["attention"], "h100")
    with pytest.raises(ValueError, match="workers"):
        compile_calls([], "h100", workers=0)


def test_capped_and_sinked_kernels_compile_for_h100_without_spills():
    """Gemma 2's soft-capping (SOFTCAP) and GPT-OSS's sinks (SINKS) are constexpr variants of every
    family: each compiles, on the tensor cores, pipelined, without spills, in shared memory."""
    q, k, v = (torch.empty(1, 2, S, 128, dtype=torch.bfloat16) for _ in range(3))
    calls = []
    for modifiers in ({"softcap": 50.0}, {"sinks": torch.zeros(2)}, {"softcap": 30.0, "sinks": torch.zeros(2)}):
        for family in ("dense", "window", "vertical_slash", "block_sparse", "frames_transposed"):
            pattern = _family_patterns(True)[family]
            (call,) = attention_triton.kernel_calls(q, k, v, (pattern, pattern), causal=True, scale=0.1,
                                                    interpreted=False, **modifiers)
            calls.append(call)
    for call, report in zip(calls, compile_calls(calls, "h100", workers=2)):
        assert report.error is None, report.error
        assert report.mma == "wgmma" and report.async_loads, (call.kernel, report.mma)
        assert 0 < report.shared_bytes <= ARCHITECTURES[90]
        if report.spill_bytes is not None:
            assert report.spill_bytes == 0, (call.kernel, call.kwargs["SOFTCAP"], call.kwargs["SINKS"])


@pytest.mark.parametrize("head_dim, modifiers", [(64, {}), (128, {}), (128, {"softcap": 30.0, "sinks": True}),
                                                 (256, {"softcap": 30.0, "sinks": True})])
def test_the_backward_kernels_compile_for_h100_at_their_default_tiles_without_spills(head_dim, modifiers):
    """Both backward kernels of every family (codegen/attention_triton_backward.py), as the entry point
    builds them for bf16 on CUDA: tensor cores (wgmma up to head_dim 128, whose tiles have 64 rows a
    warpgroup on each kernel's own side), pipelined up to head_dim 128 (at 256 two stages spilled),
    no spills, in shared memory."""
    from sparsec.codegen.attention_triton_backward import backward_kernel_calls

    q, k, v, out, grad = (torch.empty(1, 2, S, head_dim, dtype=torch.bfloat16) for _ in range(5))
    sinks = torch.zeros(2) if modifiers.get("sinks") else None
    calls = []
    for family, pattern in _family_patterns(True).items():
        if family != "frames_transposed":  # the forward's own order; its backward runs the heads' patterns
            calls += backward_kernel_calls(grad, q, k, v, out, (pattern, pattern), causal=True, scale=0.1,
                                           softcap=modifiers.get("softcap", 0.0), sinks=sinks, interpreted=False)
    assert len(calls) == 16
    for call, report in zip(calls, compile_calls(calls, "h100", workers=2)):
        assert report.error is None, report.error
        assert report.mma == ("wgmma" if head_dim <= 128 else "mma"), (call.kernel, report.mma)
        assert report.async_loads == (head_dim <= 128), call.kernel
        assert 0 < report.shared_bytes <= ARCHITECTURES[90], (call.kernel, report.shared_bytes)
        if report.spill_bytes is not None:
            assert report.spill_bytes == 0, (call.kernel, report.spill_bytes)
