"""Sparse linear kernels against a float64 reference: activation(x @ (W * mask).T + bias), with the
mask built here from explicit block layouts / N:M choices.

The Triton kernels run through TRITON_INTERPRET=1 (tests/conftest.py) at tiny sizes; the CPU
executors at larger ones. Also: packing round trips, `supports` reasons, and the weight guard.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsec.codegen.linear_cpu import bsr_linear_cpu, nm_linear_cpu, pack_block_rows
from sparsec.codegen.linear_triton import LinearTiles, bsr_linear_triton, nm_linear_triton, supports
from sparsec.codegen.weight_guard import PackedWeight
from sparsec.codegen.weight_packing import pack_bsr, pack_nm, pack_semi_structured, semi_structured_reason

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = ("none", "relu", "gelu", "silu")
# Max error relative to the largest reference output: output rounding plus the rounding of the
# unfused bias / activation steps of the CPU executors.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}

_REFERENCE_ACTIVATION = {"none": lambda y: y, "relu": torch.relu, "gelu": F.gelu, "silu": F.silu}


def _randn(*shape, dtype=torch.float32):
    w = torch.randn(*shape, dtype=torch.float64)
    return torch.where(w == 0, torch.ones_like(w), w).to(dtype)


def _block_weight(shape, block, density, dtype, empty_row=True):
    """A weight whose zero blocks follow a random layout (one block row left empty)."""
    (N, K), (bo, bi) = shape, block
    layout = torch.rand(N // bo, K // bi) < density
    layout[0, 0] = True
    if empty_row and N // bo > 1:
        layout[-1] = False  # an output block row with no kept block: only bias
    mask = layout.repeat_interleave(bo, 0).repeat_interleave(bi, 1)
    return _randn(N, K, dtype=dtype) * mask


def _nm_weight(shape, n, m, dtype):
    N, K = shape
    kept = torch.rand(N, K // m, m).argsort(dim=-1)[..., :n]
    mask = torch.zeros(N, K // m, m, dtype=torch.bool).scatter_(-1, kept, True).view(N, K)
    return _randn(N, K, dtype=dtype) * mask


def _reference(x, w, bias, activation):
    y = x.double() @ w.double().T
    if bias is not None:
        y = y + bias.double()
    return _REFERENCE_ACTIVATION[activation](y)


def _assert_close(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    error = (y.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"max error {error} vs output scale {scale}"


# -- packing -----------------------------------------------------------------------------------------


def test_bsr_pack_round_trip_and_layout():
    torch.manual_seed(0)
    w = _block_weight((96, 128), (32, 16), 0.4, torch.float32)
    packed = pack_bsr(w, (32, 16))
    assert torch.equal(packed.to_dense(), w)
    blocks = w.view(3, 32, 8, 16).permute(0, 2, 1, 3)
    nonzero = [(r, c) for r in range(3) for c in range(8) if blocks[r, c].count_nonzero()]
    assert packed.col_indices.tolist() == [c for _, c in nonzero]
    assert packed.crow_indices.tolist() == [sum(1 for r2, _ in nonzero if r2 < r) for r in range(4)]
    assert packed.density == pytest.approx(len(nonzero) / 24)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 8), (3, 8)])
def test_nm_pack_round_trip(n, m):
    torch.manual_seed(1)
    w = _nm_weight((16, 64), n, m, torch.float32)
    w[0, :m] = 0  # a group with fewer than n nonzeros keeps explicit zeros
    packed = pack_nm(w, n, m)
    assert packed.values.shape == (16, 64 // m * n) and packed.indices.dtype == torch.int8
    assert torch.equal(packed.to_dense(), w)


def test_packing_rejects_what_does_not_fit():
    w = torch.randn(32, 64)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        pack_nm(w, 2, 4)
    with pytest.raises(ValueError, match="not divisible by m=4"):
        pack_nm(torch.zeros(8, 30), 2, 4)
    with pytest.raises(ValueError, match="does not divide"):
        pack_bsr(w, (24, 16))
    with pytest.raises(ValueError, match="2-D"):
        pack_bsr(torch.randn(4), (16, 16))


# -- CPU executors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("block", [(32, 64), (16, 16)])
def test_bsr_cpu_matches_reference(dtype, with_bias, block):
    torch.manual_seed(2)
    w = _block_weight((192, 256), block, 0.3, dtype)
    x = _randn(3, 37, 256, dtype=dtype)  # batch dims, odd token count
    bias = _randn(192, dtype=dtype) if with_bias else None
    y = bsr_linear_cpu(x, pack_block_rows(pack_bsr(w, block)), bias)
    _assert_close(y, _reference(x, w, bias, "none"), dtype)


@pytest.mark.parametrize("tokens", [1, 3, 4, 5])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [(16, 16), (32, 16)])
def test_bsr_cpu_decode_path_matches_reference(tokens, dtype, block):
    """A few tokens run on torch's BSR tensor (square blocks, float32), more on the panels; both exact."""
    torch.manual_seed(7)
    w = _block_weight((128, 96), block, 0.3, dtype)
    packed = pack_block_rows(pack_bsr(w, block))
    assert (packed.torch_bsr is not None) == (dtype == torch.float32 and block[0] == block[1])
    x, bias = _randn(1, tokens, 96, dtype=dtype), _randn(128, dtype=dtype)
    _assert_close(bsr_linear_cpu(x, packed, bias, "relu"), _reference(x, w, bias, "relu"), dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cpu_epilogues(activation):
    torch.manual_seed(3)
    w = _block_weight((64, 128), (16, 32), 0.5, torch.float32)
    wn = _nm_weight((64, 128), 2, 4, torch.float32)
    x, bias = _randn(9, 128), _randn(64)
    y = bsr_linear_cpu(x, pack_block_rows(pack_bsr(w, (16, 32))), bias, activation)
    _assert_close(y, _reference(x, w, bias, activation), torch.float32)
    y = nm_linear_cpu(x, pack_nm(wn, 2, 4), bias, activation)
    _assert_close(y, _reference(x, wn, bias, activation), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("n, m", [(2, 4), (3, 8), (1, 16)])
def test_nm_cpu_matches_reference(dtype, with_bias, n, m):
    torch.manual_seed(4)
    w = _nm_weight((96, 128), n, m, dtype)
    x = _randn(2, 19, 128, dtype=dtype)
    bias = _randn(96, dtype=dtype) if with_bias else None
    y = nm_linear_cpu(x, pack_nm(w, n, m), bias)
    _assert_close(y, _reference(x, w, bias, "none"), dtype)


def test_cpu_executors_check_their_inputs():
    packed = pack_block_rows(pack_bsr(_block_weight((32, 32), (16, 16), 0.5, torch.float32), (16, 16)))
    with pytest.raises(ValueError, match="input features"):
        bsr_linear_cpu(torch.randn(4, 16), packed)
    with pytest.raises(TypeError, match="float16"):
        bsr_linear_cpu(torch.randn(4, 32, dtype=torch.float16), packed)
    with pytest.raises(ValueError, match="activation"):
        bsr_linear_cpu(torch.randn(4, 32), packed, activation="tanh")
    with pytest.raises(ValueError, match="bias"):
        nm_linear_cpu(torch.randn(4, 32), pack_nm(torch.zeros(32, 32), 2, 4), torch.randn(31))


# -- Triton kernels (interpreter: tiny sizes) ---------------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_bsr_triton_matches_reference(dtype, with_bias):
    torch.manual_seed(5)
    w = _block_weight((64, 64), (16, 32), 0.5, dtype)
    x = _randn(3, 7, 64, dtype=dtype)  # 21 tokens: a partial token tile
    bias = _randn(64, dtype=dtype) if with_bias else None
    y = bsr_linear_triton(x, pack_bsr(w, (16, 32)), bias)
    _assert_close(y, _reference(x, w, bias, "none"), dtype)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("n, m", [(2, 4), (3, 8)])
def test_nm_triton_matches_reference(dtype, with_bias, n, m):
    torch.manual_seed(6)
    w = _nm_weight((48, 64), n, m, dtype)  # 48 outputs: a partial output tile of 32
    x = _randn(2, 5, 64, dtype=dtype)
    bias = _randn(48, dtype=dtype) if with_bias else None
    tiles = LinearTiles(block_m=16, block_n=32, block_k=32, num_warps=2, num_stages=1)
    y = nm_linear_triton(x, pack_nm(w, n, m), bias, tiles=tiles)
    _assert_close(y, _reference(x, w, bias, "none"), dtype)


@pytest.mark.triton
@pytest.mark.parametrize("activation", ACTIVATIONS[1:])
def test_triton_fused_epilogues(activation):
    torch.manual_seed(7)
    w = _block_weight((32, 64), (16, 16), 0.5, torch.float32)
    wn = _nm_weight((32, 64), 2, 4, torch.float32)
    x, bias = _randn(13, 64), _randn(32)
    y = bsr_linear_triton(x, pack_bsr(w, (16, 16)), bias, activation, LinearTiles(block_m=16, num_warps=2))
    _assert_close(y, _reference(x, w, bias, activation), torch.float32)
    y = nm_linear_triton(x, pack_nm(wn, 2, 4), bias, activation)
    _assert_close(y, _reference(x, wn, bias, activation), torch.float32)


@pytest.mark.triton
def test_triton_strided_input_and_no_tokens():
    torch.manual_seed(8)
    w = _block_weight((32, 32), (16, 16), 0.5, torch.float32)
    x = _randn(32, 20).t()  # (20, 32) view with strides (1, 20)
    y = bsr_linear_triton(x, pack_bsr(w, (16, 16)))
    _assert_close(y, _reference(x, w, None, "none"), torch.float32)
    assert bsr_linear_triton(torch.randn(0, 32), pack_bsr(w, (16, 16))).shape == (0, 32)


def test_supports_names_the_problem():
    w = _block_weight((48, 32), (16, 16), 0.5, torch.float32)
    packed = pack_bsr(w, (16, 16))
    assert supports(torch.randn(4, 32), packed) is None
    assert "same dtype" in supports(torch.randn(4, 32, dtype=torch.float16), packed)
    assert "input features" in supports(torch.randn(4, 16), packed)
    assert "activation" in supports(torch.randn(4, 32), packed, activation="tanh")
    assert "powers of two" in supports(torch.randn(4, 48), pack_bsr(torch.randn(48, 48), (24, 16)))
    assert "group size" in supports(torch.randn(4, 24), pack_nm(torch.zeros(8, 24), 2, 6))
    with pytest.raises(ValueError, match="bsr_linear_triton: .*input features"):
        bsr_linear_triton(torch.randn(4, 16), packed)


def test_semi_structured_needs_cuda_here():
    w = _nm_weight((64, 64), 2, 4, torch.float16)
    if torch.cuda.is_available():
        pytest.skip("checked on CUDA by bench/linear.py")
    assert "CUDA" in semi_structured_reason(w)
    with pytest.raises(ValueError, match="CUDA"):
        pack_semi_structured(w)


# -- the weight guard ---------------------------------------------------------------------------------


def _guarded_bsr(block=(16, 16)):
    return PackedWeight(lambda w: pack_block_rows(pack_bsr(w, block)), name="layer.weight")


def test_guard_packs_once_while_the_weight_is_unchanged():
    torch.manual_seed(9)
    weight = torch.nn.Parameter(_block_weight((32, 64), (16, 16), 0.5, torch.float32))
    guard = _guarded_bsr()
    first = guard.get(weight)
    assert guard.get(weight) is first and guard.packs == 1


def test_guard_repacks_after_in_place_change_and_computes_the_new_result():
    torch.manual_seed(10)
    weight = torch.nn.Parameter(_block_weight((32, 64), (16, 16), 0.5, torch.float32))
    guard, x = _guarded_bsr(), _randn(5, 64)
    bsr_linear_cpu(x, guard.get(weight))
    new_values = _block_weight((32, 64), (16, 16), 0.5, torch.float32)
    with torch.no_grad():
        weight.copy_(new_values)  # same storage, new version
    y = bsr_linear_cpu(x, guard.get(weight))
    _assert_close(y, _reference(x, new_values, None, "none"), torch.float32)
    assert guard.packs == 2


def test_guard_repacks_after_the_tensor_is_replaced():
    torch.manual_seed(11)
    layer = torch.nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        layer.weight.copy_(_block_weight((32, 64), (16, 16), 0.5, torch.float32))
    guard, x = _guarded_bsr(), _randn(3, 64)
    guard.get(layer.weight)
    replacement = _block_weight((32, 64), (16, 16), 0.3, torch.float32)
    layer.weight.data = replacement.clone()
    y = bsr_linear_cpu(x, guard.get(layer.weight))
    _assert_close(y, _reference(x, replacement, None, "none"), torch.float32)


def test_guard_falls_back_when_the_weight_leaves_its_format():
    torch.manual_seed(12)
    weight = torch.nn.Parameter(_nm_weight((16, 32), 2, 4, torch.float32))
    guard = PackedWeight(lambda w: pack_nm(w, 2, 4))
    assert guard.get(weight) is not None
    with torch.no_grad():
        weight.add_(1.0)  # every entry nonzero now: not 2:4
    assert guard.get(weight) is None  # caller runs dense; never the stale pack
    with torch.no_grad():
        weight.copy_(_nm_weight((16, 32), 2, 4, torch.float32))
    again = guard.get(weight)
    assert again is not None and torch.equal(again.to_dense(), weight.detach())


def test_guard_invalidate_and_inference_tensors():
    weight = _nm_weight((16, 32), 2, 4, torch.float32)
    guard = PackedWeight(lambda w: pack_nm(w, 2, 4))
    guard.get(weight)
    guard.invalidate()
    guard.get(weight)
    assert guard.packs == 2
    with torch.inference_mode():
        frozen = weight.clone()
    assert guard.get(frozen) is None
