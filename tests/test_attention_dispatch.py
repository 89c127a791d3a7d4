"""sparsec.attention: input validation, backend choice, and the explicit-mask dense path."""
import pytest
import torch

import sparsec
from sparsec import patterns as P
from reference import reference_attention, tolerance

HEAD_MIX = [P.Window(3, 1), P.Skip("mean"), P.Columns([(0, 2), 9]) | P.Window(0, 0), P.Skip("zero"),
            P.Dense(), P.MultiDiagonal([-4, 4], 1), P.VerticalSlash([1], [0, -3]), P.AShape(2, 2)]


@pytest.mark.parametrize("Sq,Sk", [(13, 13), (5, 17), (17, 6), (1, 9)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_path_matches_reference(Sq, Sk, causal, dtype):
    q = torch.randn(2, 8, Sq, 16, dtype=dtype)
    k, v = torch.randn(2, 4, Sk, 16, dtype=dtype), torch.randn(2, 4, Sk, 16, dtype=dtype)
    out = sparsec.attention(q, k, v, HEAD_MIX, causal=causal, backend="masked")
    ref = reference_attention(q, k, v, HEAD_MIX, causal=causal)
    atol, rtol = tolerance(dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


def test_row_without_keys_is_zero():
    q, k, v = torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
    out = sparsec.attention(q, k, v, P.Columns([(5, 6)]), causal=True, backend="masked")
    assert torch.equal(out[0, 0, :5], torch.zeros(5, 8))
    assert out[0, 0, 5].abs().sum() > 0


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    a = sparsec.attention(q, k, v, P.Dense(), backend="masked")
    b = sparsec.attention(q, k, v, P.Dense(), scale=0.25, backend="masked")
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("make,message", [
    (lambda: (torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)), "multiple of kv heads"),
    (lambda: (torch.randn(3, 4, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)), "must be 4-D"),
    (lambda: (torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 8)), "head_dim"),
    (lambda: (torch.randn(1, 1, 4, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 4, 8)), "disagree"),
    (lambda: (torch.randn(1, 1, 4, 8).double(),) * 3, "not supported"),
    (lambda: (torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8).half(), torch.randn(1, 1, 4, 8)), "dtypes differ"),
])
def test_bad_inputs_raise_clear_errors(make, message):
    q, k, v = make()
    with pytest.raises((ValueError, TypeError), match=message):
        sparsec.attention(q, k, v, P.Dense())


def test_a_scale_that_is_not_a_finite_number_is_refused():
    q = torch.randn(1, 2, 8, 8)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            sparsec.attention(q, q, q, P.Window(2, 0), scale=bad)
    with pytest.raises(TypeError, match="scale must be a number, got str"):
        sparsec.attention(q, q, q, P.Window(2, 0), scale="0.5")
    torch.testing.assert_close(sparsec.attention(q, q, q, P.Dense(), scale=torch.tensor(0.5)),
                               sparsec.attention(q, q, q, P.Dense(), scale=0.5))  # a 0-d tensor is a number


def test_an_empty_batch_gives_an_empty_output_and_gradients():
    q = torch.randn(0, 4, 9, 8, requires_grad=True)
    k, v = torch.randn(0, 2, 11, 8, requires_grad=True), torch.randn(0, 2, 11, 6, requires_grad=True)
    out = sparsec.attention(q, k, v, P.Window(3, 0), causal=True)
    assert out.shape == (0, 4, 9, 6)
    assert [g.shape for g in torch.autograd.grad(out.sum(), (q, k, v))] == [q.shape, k.shape, v.shape]


def test_bad_patterns_and_backend_raise():
    q = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="1 patterns for 2 query heads"):
        sparsec.attention(q, q, q, [P.Dense()])
    with pytest.raises(ValueError, match="layout has shape"):
        sparsec.attention(q, q, q, P.BlockSparse(torch.ones(3, 3, dtype=torch.bool), 4))
    with pytest.raises(ValueError, match="unknown backend"):
        sparsec.attention(q, q, q, P.Dense(), backend="cuda")


@pytest.mark.parametrize("backend,tiles", [("cpu", (32, 16)), ("cpu", (128, 64)), ("masked", (64, 64)),
                                           pytest.param("triton", (16, 32), marks=pytest.mark.triton)])
def test_tiles_change_the_speed_not_the_result(backend, tiles):
    q = torch.randn(1, 8, 45, 16)
    k, v = torch.randn(1, 4, 45, 16), torch.randn(1, 4, 45, 16)
    out = sparsec.attention(q, k, v, HEAD_MIX, causal=True, backend=backend, tiles=tiles)
    atol, rtol = tolerance(torch.float32)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, HEAD_MIX, causal=True), atol=atol, rtol=rtol)


@pytest.mark.parametrize("tiles", [(48, 64), (8, 16), (64,), [64, 32, 16], (64.0, 32), (True, 32), "64x32"])
def test_bad_tiles_are_named(tiles):
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="tiles must be"):
        sparsec.attention(q, q, q, P.Dense(), backend="cpu", tiles=tiles)
