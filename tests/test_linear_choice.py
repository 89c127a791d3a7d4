"""The weight stages as before/after IR text: analyze_weights puts each linear weight's exact
structure into its type, choose_linear_kernels records the kernel (and the token range) on the
Linear op. Also: the Linear kernel attributes in the printer, parser and verifier.

Weights here are built from explicit masks; the "auto" choices are checked against
cost_models.estimate_linear_seconds called directly.
"""
from __future__ import annotations

import pytest
import torch

from sparsec.codegen.linear_cpu_native import native_linear_available

from sparsec.config import parse_options
from sparsec.cost_models import estimate_linear_seconds
from sparsec.ir import (DENSE, BlockSparse, Graph, Input, IRParseError, IRVerificationError, Linear, NMSparse,
                        Output, Param, TensorType, Value, parse_graph, print_graph, verify)
from sparsec.passes.analyze_weights import analyze_weights
from sparsec.passes.choose_linear_kernels import SPARSE_MARGIN, choose_linear_kernels


@pytest.fixture(autouse=True)
def avx2_cpu_profile(monkeypatch):
    """The "cpu" target priced with the AVX2 machine's published profile on every machine: these
    tests check the CPU linear model against what was measured there (an AVX-512 machine's dense
    GEMM is ~5x faster, and fewer sparse layers win; AMX tiles run bf16 faster still)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)


def _nonzero(*shape):
    w = torch.randn(*shape)
    return torch.where(w == 0, torch.ones_like(w), w)


def _block_weight():
    """(64, 128): 32x32 blocks, half of them kept."""
    layout = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    return _nonzero(64, 128) * layout.repeat_interleave(32, 0).repeat_interleave(32, 1)


def _two_four_weight():
    """(128, 64): exactly 2 nonzeros in every 4 consecutive inputs."""
    kept = torch.rand(128, 16, 4).argsort(dim=-1)[..., :2]
    mask = torch.zeros(128, 16, 4, dtype=torch.bool).scatter_(-1, kept, True).view(128, 64)
    return _nonzero(128, 64) * mask


def _scattered_weight():
    """(16, 128): 1740 of 2048 entries nonzero (density 0.849609375), scattered."""
    mask = torch.zeros(16 * 128, dtype=torch.bool)
    mask[torch.randperm(16 * 128)[:1740]] = True
    return _nonzero(16, 128) * mask.view(16, 128)


BEFORE_ANALYSIS = """
graph g {
  %x: f32[2, 5, 128] = input 0
  %w_up: f32[64, 128] = param "up.weight"
  %b_up: f32[64] = param "up.bias"
  %w_down: f32[128, 64] = param "down.weight"
  %w_un: f32[16, 128] = param "un.weight"
  %w_dense: f32[16, 128] = param "dense.weight"
  %h: f32[2, 5, 64] = linear %x, %w_up, %b_up {module = "up"}
  %y: f32[2, 5, 128] = linear %h, %w_down, none {module = "down"}
  %u: f32[2, 5, 16] = linear %x, %w_un, none
  %d: f32[2, 5, 16] = linear %x, %w_dense, none
  %t: f32[128, 64] = opaque %w_down {fx = ["mul"]}
  return %y, %u, %d, %t
}
"""

AFTER_ANALYSIS = """
graph g {
  %x: f32[2, 5, 128] = input 0
  %w_up: f32[64, 128]<block 32x32 density=0.5> = param "up.weight"
  %b_up: f32[64] = param "up.bias"
  %w_down: f32[128, 64]<nm 2:4 axis=-1 density=0.5> = param "down.weight"
  %w_un: f32[16, 128]<unstructured density=0.849609375> = param "un.weight"
  %w_dense: f32[16, 128] = param "dense.weight"
  %h: f32[2, 5, 64] = linear %x, %w_up, %b_up {module = "up"}
  %y: f32[2, 5, 128] = linear %h, %w_down, none {module = "down"}
  %u: f32[2, 5, 16] = linear %x, %w_un, none
  %d: f32[2, 5, 16] = linear %x, %w_dense, none
  %t: f32[128, 64] = opaque %w_down {fx = ["mul"]}
  return %y, %u, %d, %t
}
"""


def test_analyze_weights_before_after():
    torch.manual_seed(0)
    weights = {"up.weight": _block_weight(), "up.bias": torch.zeros(64), "down.weight": _two_four_weight(),
               "un.weight": _scattered_weight(), "dense.weight": _nonzero(16, 128)}
    result = analyze_weights(parse_graph(BEFORE_ANALYSIS), weights)
    verify(result)  # every use of a weight carries its new type
    assert result == parse_graph(AFTER_ANALYSIS)  # the all-zero bias is not a linear weight: untouched
    assert parse_graph(print_graph(result)) == result


def test_analyze_weights_leaves_weights_without_real_values():
    before = parse_graph(BEFORE_ANALYSIS)
    assert analyze_weights(before, {}) == before
    assert analyze_weights(before, {"up.weight": _block_weight().to("meta"),
                                    "down.weight": torch.zeros(3, 3)}) == before  # meta / wrong shape


BEFORE_CHOICE = """
graph g {
  %x: f32[2, 5, 128] = input 0
  %w_up: f32[64, 128]<block 32x32 density=0.5> = param "up.weight"
  %w_down: f32[128, 64]<nm 2:4 axis=-1 density=0.5> = param "down.weight"
  %w_un: f32[16, 128]<unstructured density=0.25> = param "un.weight"
  %h: f32[2, 5, 64] = linear %x, %w_up, none {module = "up"}
  %y: f32[2, 5, 128] = linear %h, %w_down, none {module = "down"}
  %u: f32[2, 5, 16] = linear %x, %w_un, none
  return %y, %u
}
"""

AFTER_ALWAYS = """
graph g {
  %x: f32[2, 5, 128] = input 0
  %w_up: f32[64, 128]<block 32x32 density=0.5> = param "up.weight"
  %w_down: f32[128, 64]<nm 2:4 axis=-1 density=0.5> = param "down.weight"
  %w_un: f32[16, 128]<unstructured density=0.25> = param "un.weight"
  %h: f32[2, 5, 64] = linear %x, %w_up, none {kernel = "bsr32x32", module = "up"}
  %y: f32[2, 5, 128] = linear %h, %w_down, none {kernel = "nm2:4", module = "down"}
  %u: f32[2, 5, 16] = linear %x, %w_un, none
  return %y, %u
}
"""


@pytest.mark.parametrize("target", ["cpu", "h100"])
def test_choose_always_takes_every_kernel_that_fits(target):
    config = parse_options({"weight_sparsity": "always", "target": target})
    result = choose_linear_kernels(parse_graph(BEFORE_CHOICE), config)
    verify(result)
    expected = AFTER_ALWAYS
    if target == "cpu" and native_linear_available():  # scattered zeros: the CPU's native kernels only
        expected = expected.replace("linear %x, %w_un, none", 'linear %x, %w_un, none {kernel = "unstructured"}')
    assert result == parse_graph(expected)


def test_choose_off_keeps_every_linear_dense():
    config = parse_options({"weight_sparsity": "off"})
    always = parse_graph(AFTER_ALWAYS)
    assert choose_linear_kernels(always, config) == parse_graph(BEFORE_CHOICE)


def _one_linear(x_shape, weight: TensorType, bias: bool = False) -> Graph:
    x = Value(name="x", type=TensorType(shape=x_shape, dtype=weight.dtype))
    w = Value(name="w", type=weight)
    b = Value(name="b", type=TensorType(shape=(weight.shape[0],), dtype=weight.dtype)) if bias else None
    y = Value(name="y", type=TensorType(shape=(*x_shape[:-1], weight.shape[0]), dtype=weight.dtype))
    ops = [Input(result=x, index=0), Param(result=w, target="w")]
    ops += [Param(result=b, target="b")] if bias else []
    return Graph(name="g", ops=(*ops, Linear(result=y, x=x, weight=w, bias=b), Output(values=(y,))))


ENCODINGS = [BlockSparse(block=(16, 16), density=0.5), BlockSparse(block=(64, 64), density=0.25),
             NMSparse(n=2, m=4, density=0.5), NMSparse(n=1, m=8, density=0.125)]


@pytest.mark.parametrize("target", ["cpu", "h100"])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_auto_follows_the_cost_model_at_static_token_counts(target, encoding):
    config = parse_options({"weight_sparsity": "auto", "target": target})
    hardware = config.hardware()
    chosen = set()
    for size in (128, 2048):
        for tokens, bias in ((1, False), (24, True), (512, False), (1 << 16, True)):
            weight = TensorType(shape=(size, size), dtype="f32", sparsity=encoding)
            op = choose_linear_kernels(_one_linear((tokens, size), weight, bias), config).ops_of(Linear)[0]
            # An N:M kernel reads n/m of the weight, whatever its nonzero fraction.
            priced = (NMSparse(n=encoding.n, m=encoding.m, density=encoding.n / encoding.m)
                      if isinstance(encoding, NMSparse) else encoding)
            sparse = estimate_linear_seconds(tokens, size, size, "f32", priced, hardware, bias=bias)
            dense = estimate_linear_seconds(tokens, size, size, "f32", DENSE, hardware, bias=bias)
            assert (op.kernel != "dense") == (sparse < (1 - SPARSE_MARGIN) * dense), (size, tokens, sparse, dense)
            assert (op.min_tokens, op.max_tokens) == (0, None)
            chosen.add(op.kernel)
    # Both outcomes occur where the model says a kernel wins somewhere (N:M never does on the CPU
    # without its native kernels).
    wins_somewhere = not (target == "cpu" and isinstance(encoding, NMSparse) and not native_linear_available())
    assert ("dense" in chosen) and (len(chosen) > 1) == wins_somewhere, chosen


def test_auto_with_symbolic_tokens_records_the_crossover():
    config = parse_options({"weight_sparsity": "auto", "target": "h100"})
    encoding = BlockSparse(block=(16, 16), density=0.5)  # small blocks: slower tiles, a finite crossover
    g = _one_linear(("s0", 4096), TensorType(shape=(1024, 4096), dtype="f32", sparsity=encoding))
    op = choose_linear_kernels(g, config).ops_of(Linear)[0]
    hardware = config.hardware()

    def wins(tokens):
        return (estimate_linear_seconds(tokens, 1024, 4096, "f32", encoding, hardware)
                < (1 - SPARSE_MARGIN) * estimate_linear_seconds(tokens, 1024, 4096, "f32", DENSE, hardware))

    assert op.kernel == "bsr16x16" and op.min_tokens == 0 and op.max_tokens is not None
    assert wins(1) and wins(op.max_tokens) and not wins(op.max_tokens + 1)
    assert f'kernel = "bsr16x16", max_tokens = {op.max_tokens}' in print_graph(choose_linear_kernels(g, config))


def test_auto_with_symbolic_tokens_takes_the_better_of_two_winning_ranges(monkeypatch):
    """On the CPU without its native kernels a block-sparse layer can win at a few tokens (torch's
    BSR tensor against a GEMV), lose from FEW_TOKENS on (its panels against a GEMM) and win again at
    many tokens, where the dense GEMM's arithmetic dominates: the layer dispatches by the unbounded
    range."""
    monkeypatch.setenv("SPARSEC_CPU_NATIVE", "0")
    config = parse_options({"weight_sparsity": "auto", "target": "cpu"})
    hardware = config.hardware()
    encoding = BlockSparse(block=(16, 16), density=0.1)
    g = _one_linear(("s0", 1024), TensorType(shape=(1024, 1024), dtype="f32", sparsity=encoding))
    op = choose_linear_kernels(g, config).ops_of(Linear)[0]

    def wins(tokens):
        return (estimate_linear_seconds(tokens, 1024, 1024, "f32", encoding, hardware)
                < (1 - SPARSE_MARGIN) * estimate_linear_seconds(tokens, 1024, 1024, "f32", DENSE, hardware))

    assert wins(2) and not wins(8)  # the small range, dropped
    assert op.kernel == "bsr16x16" and op.max_tokens is None and op.min_tokens > 8
    assert wins(op.min_tokens) and not wins(op.min_tokens - 1) and wins(1 << 20)


def test_auto_with_symbolic_tokens_and_a_kernel_that_always_wins_has_no_bound():
    config = parse_options({"weight_sparsity": "auto", "target": "h100"})
    g = _one_linear(("s0", 4, 4096), TensorType(shape=(4096, 4096), dtype="f32",
                                                sparsity=BlockSparse(block=(64, 64), density=0.3)))
    op = choose_linear_kernels(g, config).ops_of(Linear)[0]
    assert (op.kernel, op.min_tokens, op.max_tokens) == ("bsr64x64", 0, None)


@pytest.mark.skipif(not hasattr(torch.sparse, "to_sparse_semi_structured"), reason="no semi-structured 2:4")
def test_semi_structured_is_a_candidate_for_half_precision_on_gpu_targets():
    weight = TensorType(shape=(64, 128), dtype="f16", sparsity=NMSparse(n=2, m=4, density=0.5))
    for target, expected in (("h100", "semi2:4"), ("cpu", "nm2:4")):
        config = parse_options({"weight_sparsity": "always", "target": target})
        assert choose_linear_kernels(_one_linear((8, 128), weight), config).ops_of(Linear)[0].kernel == expected
    f32 = TensorType(shape=weight.shape, dtype="f32", sparsity=weight.sparsity)
    config = parse_options({"weight_sparsity": "always", "target": "h100"})
    assert choose_linear_kernels(_one_linear((8, 128), f32), config).ops_of(Linear)[0].kernel == "nm2:4"


# -- the kernel attributes in the IR text --------------------------------------------------------


CHOSEN = """
graph g {
  %x: f16[s0, 128] = input 0
  %w1: f16[64, 128]<block 16x16 density=0.25> = param "a.weight"
  %w2: f16[128, 64]<nm 1:4 axis=-1 density=0.25> = param "b.weight"
  %h: f16[s0, 64] = linear %x, %w1, none {kernel = "bsr16x16", min_tokens = 2, max_tokens = 96, module = "a"}
  %y: f16[s0, 128] = linear %h, %w2, none {kernel = "semi2:4", module = "b"}
  %z: f16[s0, 128] = linear %h, %w2, none {max_tokens = 7, kernel = "nm2:4"}
  return %y, %z
}
"""


def test_linear_kernel_attributes_round_trip():
    g = parse_graph(CHOSEN)
    verify(g)
    a, b, c = g.ops_of(Linear)
    assert (a.kernel, a.min_tokens, a.max_tokens) == ("bsr16x16", 2, 96)
    assert (b.kernel, b.min_tokens, b.max_tokens) == ("semi2:4", 0, None)
    assert (c.kernel, c.max_tokens) == ("nm2:4", 7)  # attributes in any order; 1:4 fits a 2:4 kernel
    text = print_graph(g)
    assert '= linear %x, %w1, none {kernel = "bsr16x16", min_tokens = 2, max_tokens = 96, module = "a"}' in text
    assert '= linear %h, %w2, none {kernel = "nm2:4", max_tokens = 7}\n' in text
    assert parse_graph(text) == g
    dense = parse_graph(BEFORE_CHOICE)
    assert "kernel" not in print_graph(dense) and "tokens" not in print_graph(dense)
    assert all(op.kernel == "dense" for op in dense.ops_of(Linear))


@pytest.mark.parametrize("attrs, message", [
    ('kernel = "csr"', "unknown linear kernel 'csr'"),
    ('kernel = "bsr16"', "unknown linear kernel"),
    ('min_tokens = 3', "the dense kernel takes none"),
    ('kernel = "nm2:4", min_tokens = 9, max_tokens = 3', "min_tokens <= max_tokens"),
    ('kernel = "nm2:4", min_tokens = -1', "min_tokens <= max_tokens"),
    ('kernel = "nm2:4", tokens = 3', "unknown attribute 'tokens'"),
])
def test_bad_kernel_attributes_are_parse_errors(attrs, message):
    text = ("graph g {\n  %x: f32[4, 128] = input 0\n"
            '  %w: f32[64, 128]<nm 2:4 axis=-1 density=0.5> = param "w"\n'
            f"  %y: f32[4, 64] = linear %x, %w, none {{{attrs}}}\n  return %y\n}}")
    with pytest.raises(IRParseError) as info:
        parse_graph(text)
    assert info.value.line_no == 4 and message in str(info.value)


@pytest.mark.parametrize("weight, kernel, message", [
    ("f32[64, 128]<nm 2:4 axis=-1 density=0.5>", "bsr32x32", "kernel bsr32x32 needs a weight of block 32x32"),
    ("f32[64, 128]<block 16x16 density=0.5>", "bsr32x32", "kernel bsr32x32 needs a weight of block 32x32"),
    ("f32[64, 128]", "nm2:4", "kernel nm2:4 needs a weight of 2:4 (or sparser) sparsity"),
    ("f32[64, 128]<nm 4:8 axis=-1 density=0.5>", "nm2:4", "the weight is f32[64, 128]<nm 4:8"),
    ("f32[64, 128]<nm 2:4 axis=-1 density=0.5>", "semi2:4", "runs f16 / bf16 weights, not f32"),
])
def test_verifier_checks_the_kernel_against_the_weight(weight, kernel, message):
    g = parse_graph("graph g {\n  %x: f32[4, 128] = input 0\n"
                    f'  %w: {weight} = param "w"\n'
                    f'  %y: f32[4, 64] = linear %x, %w, none {{kernel = "{kernel}"}}\n  return %y\n}}')
    with pytest.raises(IRVerificationError) as info:
        verify(g)
    assert len(info.value.problems) == 1 and message in info.value.problems[0]


def test_cpu_linear_estimates_follow_the_executors(monkeypatch):
    """cost_models/linear_cost_cpu.py, term by term, for the torch paths (the native kernels off;
    tests/test_linear_native.py prices those): a dense GEMM of 2+ rows repacks its weight, a GEMV
    does not; BSR reads its kept blocks at bsr_kernel_efficiency of the streaming speed, through
    torch's BSR tensor up to FEW_TOKENS rows (square fp32 blocks) and as one mm call a block row
    beyond; N:M never beats dense on the cpu profile."""
    monkeypatch.setenv("SPARSEC_CPU_NATIVE", "0")
    from sparsec.codegen.linear_cpu import FEW_TOKENS
    from sparsec.cost_models.hardware import get_profile

    cpu = get_profile("cpu", calibrated=False)
    N, K = 4608, 1152
    weight = N * K * 4
    stream = cpu.memory_bandwidth * cpu.memory_efficiency
    gemv, gemm = (estimate_linear_seconds(m, N, K, "f32", DENSE, cpu) for m in (1, 2))
    rate = cpu.flops("f32") * cpu.gemm_efficiency
    assert gemv == pytest.approx((weight + 4 * (K + N)) / stream + 2 * cpu.gemm_call_overhead_s)
    assert gemm == pytest.approx(weight / cpu.gemm_pack_bytes_per_s + 2 * 2 * N * K / rate + 2 * cpu.gemm_call_overhead_s)
    assert gemm > 3 * gemv  # measured 9.4 ms against 2.0 ms at 8 tokens (bench/results/linear_cpu_20261202_083016.json)
    half = BlockSparse(block=(64, 64), density=0.5)
    few = estimate_linear_seconds(FEW_TOKENS, N, K, "f32", half, cpu)
    assert few == pytest.approx(0.5 * (weight + N * K / 4096 * 4) / (stream * 0.5) + 2 * cpu.gemm_call_overhead_s)
    # Past FEW_TOKENS (or for blocks torch's BSR tensor does not take) one mm call a block row.
    no_calls = cpu.replace(gemm_call_overhead_s=0.0)
    for tokens, block in ((FEW_TOKENS + 1, (64, 64)), (1, (32, 64))):
        encoding = BlockSparse(block=block, density=0.5)
        calls = (estimate_linear_seconds(tokens, N, K, "f32", encoding, cpu)
                 - estimate_linear_seconds(tokens, N, K, "f32", encoding, no_calls)) / cpu.gemm_call_overhead_s
        assert calls == pytest.approx(N / block[0] + 2), (tokens, block)  # and the two every call pays
    nm = NMSparse(n=2, m=4, density=0.5)
    for tokens in (1, 8, 64, 512, 4096):
        assert estimate_linear_seconds(tokens, N, K, "f32", nm, cpu) > estimate_linear_seconds(tokens, N, K, "f32", DENSE, cpu)
    # Few kept blocks win at every token count; at one token (a GEMV on both sides) many lose, while
    # from 5 tokens, where dense repacks its weight, the panels hold out to high densities
    # (bench/linear.py measures the same: 70% blocks 1.5x faster than dense at 64 tokens).
    for tokens in (1, 64, 512):
        dense = estimate_linear_seconds(tokens, N, K, "f32", DENSE, cpu)
        assert estimate_linear_seconds(tokens, N, K, "f32", BlockSparse(block=(64, 64), density=0.1), cpu) < dense / 2
    assert (estimate_linear_seconds(1, N, K, "f32", BlockSparse(block=(64, 64), density=0.7), cpu)
            > estimate_linear_seconds(1, N, K, "f32", DENSE, cpu))
    assert (estimate_linear_seconds(64, N, K, "f32", BlockSparse(block=(64, 64), density=0.7), cpu)
            < estimate_linear_seconds(64, N, K, "f32", DENSE, cpu))