"""weight_sparsity: the exact structure of a weight's zeros, on weights whose structure the test
builds itself from explicit masks (random nonzero values everywhere else)."""
from __future__ import annotations

import pytest
import torch

from sparsec.ir.types import DENSE, BlockSparse, NMSparse, Unstructured
from sparsec.passes.analyze_weights import block_structure, nm_structure, weight_sparsity


def _nonzero_randn(*shape):
    w = torch.randn(*shape)
    return torch.where(w == 0, torch.ones_like(w), w)  # exact zeros come from the masks only


def _fraction(mask):
    return mask.sum().item() / mask.numel()


def _nm_mask(rows, cols, n, m):
    """Keep n random positions of every group of m (a fresh random choice per group)."""
    scores = torch.rand(rows, cols // m, m)
    kept = scores.argsort(dim=-1)[..., :n]
    return torch.zeros(rows, cols // m, m, dtype=torch.bool).scatter_(-1, kept, True).view(rows, cols)


def _block_mask(layout, block):
    bo, bi = block
    return layout.repeat_interleave(bo, 0).repeat_interleave(bi, 1)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 8), (1, 8), (5, 16)])
def test_nm_structure_is_found(n, m):
    torch.manual_seed(n * 100 + m)
    mask = _nm_mask(48, 64, n, m)
    w = _nonzero_randn(48, 64) * mask
    assert weight_sparsity(w) == NMSparse(n=n, m=m, axis=-1, density=_fraction(mask))


@pytest.mark.parametrize("cols", [4, 8, 12, 16, 20, 24, 48, 6, 3])
def test_nm_structure_matches_a_group_by_group_count(cols):
    """Against the definition: for each group size dividing the columns, the most nonzeros in any
    group; the sparsest n / m at most half wins (smallest m on ties). Random masks of every
    density, so the answer varies; column counts that 8 or 16 do not divide."""
    from sparsec.passes.analyze_weights import NM_GROUP_SIZES, NM_MAX_DENSITY

    torch.manual_seed(cols)
    for density in (0.1, 0.25, 0.4, 0.6):
        mask = torch.rand(7, cols) < density
        fits = []
        for m in NM_GROUP_SIZES:
            if cols % m == 0:
                n = max(int(mask[r, g:g + m].sum()) for r in range(7) for g in range(0, cols, m))
                if 0 < n <= m * NM_MAX_DENSITY:
                    fits.append((n / m, m, n))
        got = nm_structure(mask)
        assert (None if not fits else min(fits)[1:]) == (None if got is None else (got.m, got.n)), (cols, density)


def test_equally_dense_nm_prefers_the_smallest_group():
    torch.manual_seed(0)
    w = _nonzero_randn(32, 64) * _nm_mask(32, 64, 2, 4)  # also 4:8 and 8:16
    assert weight_sparsity(w).m == 4


def test_one_extra_nonzero_breaks_2_4():
    torch.manual_seed(1)
    mask = _nm_mask(32, 64, 2, 4)
    mask[5, 8:12] = torch.tensor([True, True, True, False])  # one group of 4 holds 3
    mask[5, 12:16] = False  # ... but its group of 8 still holds at most 4
    result = weight_sparsity(_nonzero_randn(32, 64) * mask)
    assert isinstance(result, NMSparse) and (result.n, result.m) == (4, 8)


def test_block_structure_picks_the_exact_block_shape():
    torch.manual_seed(2)
    layout = torch.eye(4, dtype=torch.bool)  # diagonal blocks: any larger block shape is denser
    w = _nonzero_randn(128, 256) * _block_mask(layout, (32, 64))
    assert weight_sparsity(w) == BlockSparse(block=(32, 64), density=0.25)


def test_block_ties_go_to_the_larger_block():
    torch.manual_seed(3)
    layout = torch.zeros(2, 2, dtype=torch.bool)
    layout[0, 1] = True
    w = _nonzero_randn(128, 128) * _block_mask(layout, (64, 64))
    # 16x16 .. 64x64 all give density 0.25; 128-wide blocks give 0.5.
    assert weight_sparsity(w) == BlockSparse(block=(64, 64), density=0.25)


def test_block_density_counts_blocks_with_any_nonzero():
    torch.manual_seed(4)
    layout = torch.rand(4, 4) < 0.5
    layout[0, 0], layout[3, 3] = True, False
    w = _nonzero_randn(64, 64) * _block_mask(layout, (16, 16))
    w[63, 63] = 0.5  # one stray nonzero revives block (3, 3)
    expected = (layout.sum().item() + 1) / 16
    found = block_structure(w != 0)
    assert found is not None and found.block == (16, 16) and found.density == pytest.approx(expected)


def test_all_zero_weight_is_block_sparse_with_density_zero():
    assert weight_sparsity(torch.zeros(64, 128)) == BlockSparse(block=(64, 128), density=0.0)


def test_sparser_blocks_win_over_2_4_and_denser_blocks_lose():
    torch.manual_seed(5)
    inner = _nonzero_randn(128, 128) * _nm_mask(128, 128, 2, 4)
    sparse_layout = torch.eye(4, dtype=torch.bool)  # 25% of 32x32 blocks
    assert weight_sparsity(inner * _block_mask(sparse_layout, (32, 32))) == BlockSparse(block=(32, 32), density=0.25)
    dense_layout = ~torch.eye(4, dtype=torch.bool)  # 75% of blocks: 2:4 computes less
    result = weight_sparsity(inner * _block_mask(dense_layout, (32, 32)))
    assert isinstance(result, NMSparse) and (result.n, result.m) == (2, 4)


def test_scattered_zeros_are_unstructured():
    torch.manual_seed(6)
    mask = torch.rand(50, 30) < 0.3  # 30 and 50: no N:M group or block shape fits
    w = _nonzero_randn(50, 30) * mask
    assert weight_sparsity(w) == Unstructured(density=_fraction(mask))


def test_random_zeros_on_a_block_friendly_shape_are_unstructured():
    torch.manual_seed(7)
    mask = torch.rand(64, 64) < 0.3  # every 16x16 block holds a nonzero, groups of 4 up to 4
    mask[0, :4] = True
    w = _nonzero_randn(64, 64) * mask
    assert weight_sparsity(w) == Unstructured(density=_fraction(mask))


def test_few_zeros_are_dense():
    torch.manual_seed(8)
    w = _nonzero_randn(64, 64) * (torch.rand(64, 64) < 0.95)
    assert weight_sparsity(w) is DENSE
    assert weight_sparsity(_nonzero_randn(32, 32)) is DENSE


def test_structure_helpers_return_none_when_nothing_fits():
    ones = torch.ones(32, 30, dtype=torch.bool)
    assert nm_structure(ones) is None and block_structure(ones) is None


def test_half_precision_and_transposed_weights():
    torch.manual_seed(9)
    w = (_nonzero_randn(64, 32) * _nm_mask(64, 32, 2, 4)).to(torch.bfloat16)
    assert weight_sparsity(w) == NMSparse(n=2, m=4, density=0.5)
    w_t = (_nonzero_randn(64, 64) * _nm_mask(64, 64, 1, 4)).t().contiguous().t()  # same values, column-major
    assert weight_sparsity(w_t) == NMSparse(n=1, m=4, density=0.25)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="2-D"):
        weight_sparsity(torch.randn(4, 4, 4))
    with pytest.raises(ValueError, match="meta"):
        weight_sparsity(torch.empty(4, 4, device="meta"))
    with pytest.raises(TypeError, match="torch.Tensor"):
        weight_sparsity([[1.0, 0.0]])


def test_encodings_show_in_the_printed_ir_and_parse_back():
    from sparsec.ir.parser import parse_type
    from sparsec.ir.printer import format_type
    from sparsec.ir.types import TensorType

    torch.manual_seed(10)
    layout = torch.eye(2, dtype=torch.bool)
    weights = [_nonzero_randn(32, 64) * _nm_mask(32, 64, 2, 4), _nonzero_randn(128, 128) * _block_mask(layout, (64, 64))]
    texts = []
    for w in weights:
        t = TensorType(shape=tuple(w.shape), dtype="f32", sparsity=weight_sparsity(w))
        texts.append(format_type(t))
        assert parse_type(texts[-1]) == t
    assert "2:4" in texts[0] and "64" in texts[1] and "0.5" in texts[1]


def test_a_weight_is_analysed_once_until_it_changes(monkeypatch):
    """The graphs of one model share weights: the encoding is reused for the same tensor with the
    same values, found again after an in-place change, and never lent to another tensor."""
    from sparsec.passes import analyze_weights as A

    calls = []
    real = A.weight_sparsity
    monkeypatch.setattr(A, "weight_sparsity", lambda w: (calls.append(w), real(w))[1])
    torch.manual_seed(3)
    w = _nonzero_randn(32, 64) * _nm_mask(32, 64, 2, 4)
    first = A._remembered_sparsity(w)
    assert A._remembered_sparsity(w) == first and len(calls) == 1
    with torch.no_grad():
        w.mul_(_nm_mask(32, 64, 1, 4))  # in place: now 1:4, and its version moved
    assert A._remembered_sparsity(w) == NMSparse(n=1, m=4, axis=-1, density=_fraction(w != 0)) and len(calls) == 2
    other = w.clone()
    assert A._remembered_sparsity(other) == A._remembered_sparsity(w) and len(calls) == 3
