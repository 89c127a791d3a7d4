"""sparsec.prune: magnitude pruning to N:M, blocks and unstructured density, checked element by
element against plain loops over the original weights."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsec.pruning import BlockSpec, NMSpec, UnstructuredSpec, parse_spec, prune, prune_mask


def _model(seed=0, shapes=((64, 32), (32, 48))):
    torch.manual_seed(seed)
    layers = [nn.Linear(k, n) for k, n in shapes]
    return nn.Sequential(*[item for layer in layers for item in (layer, nn.ReLU())])


def _dense_copy(model):
    return [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]


def _check_nm(original, pruned, n, m):
    rows, cols = original.shape
    for r in range(rows):
        for g in range(0, cols, m):
            before, after = original[r, g:g + m], pruned[r, g:g + m]
            kept = after != 0
            assert int(kept.sum()) == n
            assert torch.equal(after[kept], before[kept])  # kept values are untouched
            # every kept magnitude is at least every dropped one
            assert before[kept].abs().min() >= before[~kept].abs().max()


@pytest.mark.parametrize("spec, n, m", [("2:4", 2, 4), ("1:4", 1, 4), (" 3 : 8 ", 3, 8), ("2:16", 2, 16)])
def test_nm_keeps_the_largest_of_every_group(spec, n, m):
    model = _model()
    before = _dense_copy(model)
    assert prune(model, spec) is model
    for original, layer in zip(before, [x for x in model if isinstance(x, nn.Linear)]):
        _check_nm(original, layer.weight.detach(), n, m)


@pytest.mark.parametrize("block", [(16, 8), 16, (8, 16)])
def test_block_keeps_the_blocks_of_largest_norm(block):
    torch.manual_seed(1)
    layer = nn.Linear(64, 48)
    original = layer.weight.detach().clone()
    prune(layer, {"block": block, "density": 0.3})
    bo, bi = (block, block) if isinstance(block, int) else block
    kept_norms, dropped_norms = [], []
    for r in range(0, 48, bo):
        for c in range(0, 64, bi):
            after = layer.weight.detach()[r:r + bo, c:c + bi]
            norm = original[r:r + bo, c:c + bi].norm().item()
            if torch.equal(after, original[r:r + bo, c:c + bi]):
                kept_norms.append(norm)
            else:
                assert torch.count_nonzero(after) == 0  # a block is kept whole or zeroed whole
                dropped_norms.append(norm)
    total = len(kept_norms) + len(dropped_norms)
    assert len(kept_norms) == round(0.3 * total)
    assert min(kept_norms) >= max(dropped_norms)


def test_unstructured_keeps_the_largest_fraction():
    torch.manual_seed(2)
    layer = nn.Linear(40, 30)
    original = layer.weight.detach().clone()
    prune(layer, {"density": 0.25})
    after = layer.weight.detach()
    kept = after != 0
    assert int(kept.sum()) == round(0.25 * original.numel())
    assert torch.equal(after[kept], original[kept])
    assert original[kept].abs().min() >= original[~kept].abs().max()


def test_prune_is_in_place_and_bumps_the_version():
    model = _model()
    layer = model[0]
    ptr, version = layer.weight.data_ptr(), layer.weight._version
    prune(model, "2:4")
    assert layer.weight.data_ptr() == ptr
    assert layer.weight._version > version  # what weight guards see
    assert layer.weight.requires_grad


def test_pruned_model_computes_with_the_masked_weights():
    model = _model(seed=3)
    before = _dense_copy(model)
    x = torch.randn(5, 64)
    prune(model, "2:4")
    masks = [m.weight.detach() != 0 for m in model if isinstance(m, nn.Linear)]
    ref = x.double()
    for (w, mask), layer in zip(zip(before, masks), [m for m in model if isinstance(m, nn.Linear)]):
        ref = torch.relu(ref @ (w.double() * mask).T + layer.bias.detach().double())
    assert torch.allclose(model(x).double(), ref, atol=1e-5, rtol=1e-5)


def test_filter_selects_layers_by_name():
    model = _model()
    before = _dense_copy(model)
    prune(model, "2:4", filter=lambda name, module: name == "2")
    assert torch.equal(model[0].weight.detach(), before[0])  # "0" was not selected
    _check_nm(before[1], model[2].weight.detach(), 2, 4)


def test_prune_mask_of_a_weight():
    torch.manual_seed(4)
    w = torch.randn(8, 16)
    mask = prune_mask(w, "1:4")
    assert mask.dtype == torch.bool and mask.shape == w.shape
    _check_nm(w, w * mask, 1, 4)


def test_parse_spec_forms():
    assert parse_spec("2:4") == NMSpec(2, 4)
    assert parse_spec({"block": 32, "density": 0.5}) == BlockSpec((32, 32), 0.5)
    assert parse_spec({"block": [16, 64], "density": 1}) == BlockSpec((16, 64), 1)
    assert parse_spec({"density": 0.1}) == UnstructuredSpec(0.1)


@pytest.mark.parametrize("spec, message", [
    ("2-4", "not of the form"), ("4:2", "0 < N < M"), ("0:4", "0 < N < M"), ("4:4", "0 < N < M"),
    ({"density": 0.0}, "density"), ({"density": 1.5}, "density"), ({"block": 16}, "needs a 'density'"),
    ({"block": (16, 0), "density": 0.5}, "positive"), ({"block": (1, 2, 3), "density": 0.5}, "pair"),
    ({"blocks": 16, "density": 0.5}, "unknown spec keys"),
])
def test_bad_specs_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        prune(_model(), spec)


def test_bad_spec_type():
    with pytest.raises(TypeError, match="spec must be"):
        prune(_model(), 0.5)
    with pytest.raises(TypeError, match="nn.Module"):
        prune(torch.randn(4, 4), "2:4")


def test_shape_errors_name_the_layer_and_change_nothing():
    model = _model(shapes=((64, 32), (30, 48)))  # second layer: in_features 30 is not a multiple of 4
    before = _dense_copy(model)
    with pytest.raises(ValueError, match=r"divisible by 4.*layer '2'"):
        prune(model, "2:4")
    assert torch.equal(model[0].weight.detach(), before[0])  # checked everything before changing
    with pytest.raises(ValueError, match=r"block \(16, 16\) does not divide"):
        prune(model, {"block": 16, "density": 0.5})


def test_empty_layers_are_left_alone_and_meta_weights_are_named():
    model = nn.Sequential(nn.Linear(8, 0), nn.Linear(0, 8), nn.Linear(8, 8))
    prune(model, {"density": 0.5})
    assert model[0].weight.shape == (0, 8) and int((model[2].weight != 0).sum()) == 32
    with pytest.raises(ValueError, match=r"layer '<root>' has its weight on the meta device"):
        prune(nn.Linear(8, 4, device="meta"), "2:4")
