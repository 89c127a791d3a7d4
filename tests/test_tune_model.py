"""sparsec.tune on a model, plans applied by the backend (option "plan"), and option "tune".

The model's attention layers see planted q, k, v (tests/planted.py): each layer's inputs are the
model's inputs, so the tuner records exactly the planted heads, through the compiled graph's
sparsec::attention calls. Outputs are compared with a float64 eager reference built from the
plan's patterns as explicit masks.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsec
from planted import EXPECTED_FAMILIES, PlantedLayer, cheap_calls_cpu
from reference import reference_attention
from sparsec import patterns as P
from sparsec.config import SparsecUserError
from sparsec.ir.types import DENSE
from sparsec.plan import Plan

BUDGET = 0.05
KINDS = ("band", "stripes", "frames", "uniform", "random", "band", "stripes", "frames")
SEQ, DIM = 512, 32


class Attention(nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


class TwoLayers(nn.Module):
    """Two attention layers over given q, k, v; the output keeps every head apart."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Attention(causal=False), Attention(causal=True)])

    def forward(self, q0, k0, v0, q1, k1, v1):
        return torch.cat([self.layers[0](q0, k0, v0), self.layers[1](q1, k1, v1)], dim=-1)


def planted():
    return [PlantedLayer(KINDS[3 * i:] + KINDS[:3 * i], SEQ, DIM, causal=bool(i), seed=i, frame=128, frame_decay=1.0)
            for i in range(2)]


def inputs(seed: int) -> tuple[torch.Tensor, ...]:
    return tuple(t for layer in planted() for t in layer.sample(1, seed=seed + layer.seed))


def reference(plan: Plan | None, xs) -> torch.Tensor:
    """float64 output of TwoLayers with each layer's planned patterns as explicit masks."""
    outs = []
    for i, layer in enumerate(planted()):
        q, k, v = xs[3 * i:3 * i + 3]
        patterns = plan.layers[f"layers.{i}"].patterns if plan is not None else [P.Dense()] * len(KINDS)
        outs.append(reference_attention(q, k, v, patterns, causal=layer.causal))
    return torch.cat(outs, dim=-1)


@pytest.fixture(scope="module")
def tuned() -> Plan:
    return sparsec.tune(TwoLayers(), inputs(0), target=cheap_calls_cpu(), budget=BUDGET, progress=False)


def test_tune_finds_planted_families(tuned):
    assert set(tuned.layers) == {"layers.0", "layers.1"}
    hits = total = 0
    for i, layer in enumerate(planted()):
        chosen = tuned.layers[f"layers.{i}"]
        assert (chosen.num_heads, chosen.q_len, chosen.causal) == (len(KINDS), SEQ, layer.causal)
        for kind, p in zip(layer.kinds, chosen.patterns):
            total += 1
            hits += p.family in EXPECTED_FAMILIES[kind]
        assert chosen.error <= BUDGET * (1 + 1e-6) and chosen.sparse_seconds < chosen.dense_seconds
    assert hits >= 0.9 * total, str(tuned)


def test_plan_applies_exactly(tuned, tmp_path):
    """The compiled model equals the float64 masked reference of the plan's patterns (random,
    well-conditioned inputs: the planted ones have logits too large for an fp32 comparison)."""
    path = tmp_path / "plan.json"
    tuned.save(path)
    g = torch.Generator().manual_seed(7)
    xs = tuple(torch.randn(1, len(KINDS), SEQ, DIM, generator=g) for _ in range(6))
    for plan_option in (tuned, str(path)):
        torch._dynamo.reset()
        compiled = torch.compile(TwoLayers(), backend="sparsec", options={"plan": plan_option, "inner": "eager"})
        with torch.no_grad():
            out = compiled(*xs)
        torch.testing.assert_close(out.double(), reference(tuned, xs), atol=2e-5, rtol=1e-4)


def test_a_decoding_step_keeps_dense_scores(tuned, caplog):
    """The plan's patterns are positioned for queries and keys aligned as at tuning (Sq = Sk); a
    decoding step (1 query, the last position, against Sk keys) would read them with its query at
    position 0. It runs dense, with a log line, and equals the float64 eager model. (Layer 1's causal
    SDPA with Sq != Sk aligns its queries top-left, unlike sparsec's causal rule: it is not matched
    and stays torch's call.)"""
    import logging

    g = torch.Generator().manual_seed(8)
    xs = []
    for _ in range(2):
        xs += [torch.randn(1, len(KINDS), 1, DIM, generator=g)]
        xs += [torch.randn(1, len(KINDS), SEQ + 1, DIM, generator=g) for _ in range(2)]
    torch._dynamo.reset()
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="sparsec.passes.apply_patterns"):
        report = sparsec.explain(TwoLayers(), *xs, options={"plan": tuned, "inner": "eager"})
        out = torch.compile(TwoLayers(), backend="sparsec", options={"plan": tuned, "inner": "eager"})(*xs)
    ops = [op for op in report.graphs[0].final_ir.ops if type(op).__name__ == "Attention"]
    assert [op.module_path for op in ops] == ["layers.0"] and ops[0].scores.sparsity == DENSE
    assert "dense kept for this call" in caplog.text and "(1, 513)" in caplog.text
    assert any(not isinstance(p, P.Dense) for p in tuned.layers["layers.0"].patterns)  # the plan is sparse there
    torch.testing.assert_close(out.double(), TwoLayers()(*(x.double() for x in xs)), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("pattern, warned", [
    (P.Window(8, 0), True), (P.AShape(4, 8), True), (P.VerticalSlash([(0, 4)], [0]), True),
    (P.Columns([(0, 4)]), False), (P.VerticalSlash([(0, 4)], []), False), (P.Dense(), False),
])
def test_option_patterns_tied_to_query_positions_warn_on_a_decoding_step(pattern, warned, caplog):
    """The option applies its patterns as given (query i at position i) also where Sq != Sk; for
    patterns that depend on query positions that is rarely what a decoding step means: a warning.
    The result is still exactly DESIGN.md's (float64 masked reference)."""
    import logging

    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(1, len(KINDS), 1 if i % 3 == 0 else 64, DIM, generator=g) for i in range(3)] * 2
    torch._dynamo.reset()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="sparsec.passes.apply_patterns"):
        out = torch.compile(TwoLayers(), backend="sparsec", options={
            "attention_patterns": {"layers.0": pattern}, "inner": "eager"})(*xs)
    assert ("queries are the last Sq positions" in caplog.text) == warned
    want = reference_attention(*xs[:3], [pattern] * len(KINDS))
    torch.testing.assert_close(out[..., :DIM].double(), want, atol=2e-5, rtol=1e-4)


def test_error_on_fresh_planted_inputs_stays_near_budget(tuned):
    fresh = inputs(100)
    torch._dynamo.reset()
    compiled = torch.compile(TwoLayers(), backend="sparsec", options={"plan": tuned, "inner": "eager"})
    with torch.no_grad():
        out = compiled(*fresh).double()
    dense = reference(None, fresh)
    for i in range(2):
        cols = slice(i * DIM, (i + 1) * DIM)
        relative = float((out[..., cols] - dense[..., cols]).norm() / dense[..., cols].norm())
        assert relative <= 1.5 * BUDGET, (i, relative)


def test_plan_tiles_and_patterns_show_in_the_ir(tuned):
    """A plan for a GPU pins the kernels' tiles; one for the cpu target (this one) leaves the query
    block to the CPU executor's per-pattern choice, as its search priced it."""
    assert tuned.target == "cpu"
    for plan, pinned in ((tuned, False), (dataclasses.replace(tuned, target="h100"), True)):
        report = sparsec.explain(TwoLayers(), *inputs(0), options={"plan": plan, "inner": "eager"})
        (record,) = report.graphs
        ops = [op for op in record.stage("apply_patterns").ops if type(op).__name__ == "Attention"]
        assert [op.module_path for op in ops] == ["layers.0", "layers.1"]
        for op in ops:
            layer = plan.layers[op.module_path]
            assert op.scores.sparsity.patterns == layer.patterns
            assert op.tiles == (tuple(layer.tiles) if pinned else None)
        shown = "tiles = [" in str(record.stage("apply_patterns"))
        assert shown == pinned


def test_attention_patterns_override_the_plan(tuned):
    window = P.Window(8, 8)
    report = sparsec.explain(TwoLayers(), *inputs(0), options={
        "plan": tuned, "inner": "eager", "attention_patterns": {"layers.0": window}})
    ops = [op for op in report.graphs[0].final_ir.ops if type(op).__name__ == "Attention"]
    assert ops[0].scores.sparsity.patterns == (window,) * len(KINDS) and ops[0].tiles is None
    assert ops[1].scores.sparsity.patterns == tuned.layers["layers.1"].patterns


def _user_error(call, match: str) -> None:
    """`call` raises SparsecUserError (Dynamo wraps it in BackendCompilerFailed) matching `match`."""
    torch._dynamo.reset()  # after a failed compile Dynamo may not retrace the same frames
    with pytest.raises(Exception) as info:
        call()
    torch._dynamo.reset()
    error = getattr(info.value, "inner_exception", info.value)
    assert isinstance(error, SparsecUserError), repr(info.value)
    assert re.search(match, str(error)), str(error)


def test_plan_for_another_model_is_refused(tuned, tmp_path, caplog):
    data = tuned.to_dict()
    first_only = Plan.from_dict({**data, "layers": {"layers.0": data["layers"]["layers.0"]}})
    with caplog.at_level(logging.WARNING, logger="sparsec"):  # a plan for a model with fewer layers
        sparsec.explain(TwoLayers(), *inputs(0), options={"plan": first_only, "inner": "eager"})
    assert "no entry for attention layer(s) 'layers.1' of this model: they stay dense" in caplog.text
    renamed = Plan.from_dict({**data, "layers": {f"other.{k}": v for k, v in data["layers"].items()}})
    _user_error(lambda: sparsec.explain(TwoLayers(), *inputs(0), options={"plan": renamed, "inner": "eager"}),
                "another model")
    fewer_heads = [t[:, :4] for t in inputs(0)]
    _user_error(lambda: sparsec.explain(TwoLayers(), *fewer_heads, options={"plan": tuned, "inner": "eager"}),
                r"heads.*another model")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(ValueError, match="'plan'.*version"):
        sparsec.explain(TwoLayers(), *inputs(0), options={"plan": str(path)})


def test_a_plans_gqa_layer_applies_to_kv_heads_copied_per_query_head(tuned, caplog):
    """A plan tuned where the graph showed GQA (fewer kv heads) applies to a graph whose k and v
    reach the attention already copied for every query head (an expansion the matcher does not
    see through): same query heads and head size, so the patterns are the plan's, with a log line."""
    heads = len(KINDS)
    grouped = Plan.from_dict({**tuned.to_dict(), "layers": {
        path: {**layer, "num_kv_heads": heads // 2} for path, layer in tuned.to_dict()["layers"].items()}})
    with caplog.at_level(logging.INFO, logger="sparsec.passes.apply_patterns"):
        report = sparsec.explain(TwoLayers(), *inputs(0), options={"plan": grouped, "inner": "eager"})
    ops = [op for op in report.graphs[0].final_ir.ops if type(op).__name__ == "Attention"]
    assert [op.scores.sparsity.patterns for op in ops] == [tuned.layers[f"layers.{i}"].patterns for i in (0, 1)]
    assert "every query head's copy" in caplog.text


def test_fingerprint_names_the_model(tuned):
    from sparsec.model_tuning import model_attention_layers
    from sparsec.plan import attention_fingerprint

    same = sparsec.explain(TwoLayers(), *inputs(0), options={"inner": "eager"})
    assert attention_fingerprint(model_attention_layers(same.graphs)) == tuned.model_fingerprint
    other = sparsec.explain(TwoLayers(), *(t[:, :4] for t in inputs(0)), options={"inner": "eager"})
    with pytest.raises(ValueError, match="another model"):
        tuned.check_fingerprint(attention_fingerprint(model_attention_layers(other.graphs)))


def test_tune_option_tunes_on_the_first_call(tmp_path, monkeypatch):
    # The planted heads are short (S = 512): the AVX2 machine's published profile finds them worth
    # running sparse; an AVX-512 one's faster kernels make dense cheaper at this length.
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    xs = tuple(t[:, :4] for t in inputs(0))  # 4 heads: band, stripes, frames, uniform / uniform, random, band, stripes
    report = sparsec.explain(TwoLayers(), *xs, options={
        "tune": {"target": "cpu", "budget": BUDGET}, "inner": "eager", "dump_dir": str(tmp_path)})
    (record,) = report.graphs
    plan = record.plan
    assert set(plan.layers) == {"layers.0", "layers.1"}
    assert any(not isinstance(p, P.Dense) for layer in plan.layers.values() for p in layer.patterns)
    ops = [op for op in record.final_ir.ops if type(op).__name__ == "Attention"]
    assert all(op.scores.sparsity.patterns == plan.layers[op.module_path].patterns for op in ops)
    (folder,) = tmp_path.iterdir()
    assert Plan.load(folder / "plan.json").layers.keys() == plan.layers.keys()
    assert "layers.0" in (folder / "plan.txt").read_text()


def test_tune_refuses_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        sparsec.tune(lambda x: x, (torch.zeros(1),))
    with pytest.raises(TypeError, match="example_inputs"):
        sparsec.tune(TwoLayers(), {"q": 1})
    with pytest.raises(ValueError, match="budget"):
        sparsec.tune(TwoLayers(), inputs(0), target="cpu", budget=-1, progress=False)
    with pytest.raises(TypeError, match="more_inputs"):
        sparsec.tune(TwoLayers(), inputs(0), target="cpu", more_inputs=inputs(1)[0], progress=False)


def test_more_inputs_are_recorded_and_the_budget_covers_them_all():
    """Each further input adds a recorded call per layer; the plan's error is measured over all of
    them: the exact masked output of every input, together, is within the budget of dense."""
    from sparsec.model_tuning import record_attention

    recorded, _ = record_attention(TwoLayers(), inputs(0), [inputs(1), inputs(2)])
    assert {path: len(samples) for path, samples in recorded.items()} == {"layers.0": 3, "layers.1": 3}
    assert not torch.equal(recorded["layers.0"][0].q, recorded["layers.0"][1].q)
    plan = sparsec.tune(TwoLayers(), inputs(0), target=cheap_calls_cpu(), budget=BUDGET, progress=False,
                        more_inputs=[inputs(1)])
    for i, layer in enumerate(planted()):
        path = f"layers.{i}"
        assert plan.layers[path].error <= BUDGET + 1e-9
        squared, norm = 0.0, 0.0
        for xs in (inputs(0), inputs(1)):
            q, k, v = xs[3 * i:3 * i + 3]
            dense = reference_attention(q, k, v, [P.Dense()] * len(KINDS), causal=layer.causal)
            sparse = reference_attention(q, k, v, plan.layers[path].patterns, causal=layer.causal)
            squared += float((sparse - dense).square().sum())
            norm += float(dense.square().sum())
        # The plan's error is measured in the executor's fp32 against an fp32 dense output; the planted
        # logits are large enough for that to differ from this float64 recomputation by ~0.5%.
        assert (squared / norm) ** 0.5 == pytest.approx(plan.layers[path].error, rel=1e-2, abs=1e-6)


def test_a_short_layer_stays_dense_on_the_cpu():
    """At 48 tokens the executor's fixed costs outweigh anything a pattern saves: on the published
    cpu profile the plan keeps every head dense (it once chose near-full windows, 1.6x faster by
    the model's count and 6x slower measured: dense was charged a plan it does not run)."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 48, 16, generator=g) for _ in range(3))
    model = TwoLayers()
    plan = sparsec.tune(model, (q, k, v, q, k, v), target="cpu", budget=BUDGET, progress=False)
    assert len(plan.layers) == 2
    assert all(isinstance(p, P.Dense) for layer in plan.layers.values() for p in layer.patterns)
