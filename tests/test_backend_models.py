"""backend="sparsec" on the hand-written test models and real transformers / diffusers models:
outputs equal eager, and the IR holds one Attention op per attention layer and one Linear op per
nn.Linear (summed over all graphs, so graph breaks count)."""
from __future__ import annotations

import functools

import pytest
import torch
from torch.utils._pytree import tree_leaves

from sparsec.backend import sparsec_backend
from sparsec.dump import recording
from sparsec.ir.ops import Attention, Linear
from tests import hf_models, models

OPTIONS = {"inner": "eager", "fallback": "raise", "verify": True}


def compile_and_compare(model, inputs, options=OPTIONS):
    """Run eager and sparsec under no_grad; assert equal outputs; return the graph records."""
    with torch.no_grad():
        expected = model(*inputs)
        with recording() as records:
            got = torch.compile(model, backend=functools.partial(sparsec_backend, options=options))(*inputs)
    expected_leaves = [t for t in tree_leaves(expected) if isinstance(t, torch.Tensor)]
    got_leaves = [t for t in tree_leaves(got) if isinstance(t, torch.Tensor)]
    assert len(got_leaves) == len(expected_leaves) > 0
    for g, e in zip(got_leaves, expected_leaves):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    return records


def op_counts(records) -> tuple[int, int]:
    assert records and all(r.fallback_reason is None for r in records)
    return (sum(len(r.final_ir.ops_of(Attention)) for r in records),
            sum(len(r.final_ir.ops_of(Linear)) for r in records))


@pytest.mark.parametrize("name", sorted(models.MODEL_FACTORIES))
def test_hand_written_models(name):
    model, inputs = models.MODEL_FACTORIES[name]()
    records = compile_and_compare(model, inputs)
    assert op_counts(records) == models.EXPECTED[name]
    if name == "graph_break":
        assert len(records) == 2


@pytest.mark.models
@pytest.mark.parametrize("name", sorted(hf_models.MODEL_FACTORIES))
def test_library_models(name):
    model, inputs = hf_models.MODEL_FACTORIES[name]()
    records = compile_and_compare(model, inputs)
    assert op_counts(records) == hf_models.EXPECTED[name]
