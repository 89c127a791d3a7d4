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

# rewrite_dense: every layer through sparsec's ops, so the models exercise them (by default dense
# SDPA calls and linears keep their nodes: test_dense_layers_keep_the_models_own_ops)
OPTIONS = {"inner": "eager", "fallback": "raise", "verify": True, "rewrite_dense": True}


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


def _code(records) -> str:
    return "\n".join(r.rewritten_code for r in records)


@pytest.mark.parametrize("name", ["gpt_sdpa", "gpt_manual"])
def test_dense_layers_keep_the_models_own_ops(name):
    """Without patterns or sparse weights nothing is accelerated: SDPA calls and linears stay the
    model's nodes (Inductor compiles them as without sparsec), while hand-written attention is
    still fused into sparsec::attention. The IR has every layer either way."""
    model, inputs = models.MODEL_FACTORIES[name]()
    records = compile_and_compare(model, inputs, options={**OPTIONS, "rewrite_dense": False})
    assert op_counts(records) == models.EXPECTED[name]
    code = _code(records)
    assert "sparsec.linear" not in code and ("aten.addmm" in code or "aten.mm" in code)
    fused = code.count("torch.ops.sparsec.attention.default(")
    if name == "gpt_sdpa":
        assert fused == 0 and "scaled_dot_product" in code
    else:
        assert fused == op_counts(records)[0] > 0


def test_layers_with_patterns_are_rewritten_and_the_rest_kept():
    from sparsec import patterns as P

    model, inputs = models.MODEL_FACTORIES["gpt_sdpa"]()
    records = compile_and_compare(model, inputs, options={**OPTIONS, "rewrite_dense": False,
                                                          "attention_patterns": {"*": P.Dense()}})
    assert "sparsec.attention" not in _code(records)  # Dense for every head: kept
    with torch.no_grad(), recording() as records:
        torch.compile(model, backend=functools.partial(sparsec_backend, options={
            **OPTIONS, "rewrite_dense": False, "attention_patterns": {"*": P.Window(2, 0)}}))(*inputs)
    code = _code(records)
    assert code.count("torch.ops.sparsec.attention.default(") == op_counts(records)[0] > 0
    assert "scaled_dot_product" not in code


@pytest.mark.models
def test_llama_generates_with_a_static_cache_through_sparse_kernels():
    """HF generation with a static KV cache (written in place, the recommended way to compile
    generate): the graphs are rewritten, not refused; a 2:4-pruned Llama runs its linears on the
    2:4 kernels and its greedy tokens and logits match the float64 model's."""
    import copy

    import sparsec
    from sparsec import linear_dispatch

    model, _ = hf_models.llama("sdpa")
    model = sparsec.prune(hf_models.causal_lm(model), "2:4", filter=lambda name, _: "layers" in name)
    reference = copy.deepcopy(model).double()
    prompt = torch.randint(0, hf_models.VOCAB, (1, 6))
    settings = {"max_new_tokens": 4, "do_sample": False, "cache_implementation": "static",
                "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        want = reference.generate(prompt, **settings)
        model.forward = torch.compile(model.forward, backend=functools.partial(sparsec_backend, options={
            **OPTIONS, "weight_sparsity": "always"}))
        linear_dispatch.kernel_calls.clear()
        with recording() as records:
            got = model.generate(prompt, **settings)
    assert records and all(r.fallback_reason is None for r in records)
    assert any("aten.copy_" in r.rewritten_code for r in records)  # the cache writes stay in the graph
    assert linear_dispatch.kernel_calls["nm_linear_cpu"] >= 7 * hf_models.LAYERS * len(want.logits)
    assert got.sequences.tolist() == want.sequences.tolist()
    for g, w in zip(got.logits, want.logits):
        torch.testing.assert_close(g.double(), w.double(), atol=1e-4, rtol=1e-4)  # generate returns float32
