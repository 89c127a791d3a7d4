"""match_attention / match_linear on the ATen graphs the backend sees, for every test model.

Counts must equal the model's attention layers and nn.Linear applications; every AttentionMatch
must describe its output exactly: a float64 reference computed from the matched q, k, v, mask,
scale, causal and GQA (with explicit masks) equals the output node's value; every LinearMatch
must equal x @ W.T + b in float64; module paths name the right modules.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import fx

import hf_models
import models
from aten_capture import capture_aten
from matcher_edge_models import EXPECTED_ATTENTION, EXPECTED_LINEAR, edge_cases
from reference import tolerance
from sparsec.passes.fx_utils import module_path, normalize_module_path
from sparsec.passes.match_attention import match_attention
from sparsec.passes.match_linear import match_linear
from sparsec.patterns import Dense

ALL_MODELS = {**{f"models.{k}": v for k, v in models.MODEL_FACTORIES.items()},
              **{f"hf.{k}": v for k, v in hf_models.MODEL_FACTORIES.items()}}
ALL_EXPECTED = {**{f"models.{k}": v for k, v in models.EXPECTED.items()},
                **{f"hf.{k}": v for k, v in hf_models.EXPECTED.items()}}


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps the value of every node in `wanted`."""

    def __init__(self, gm: fx.GraphModule, wanted: set[fx.Node]):
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, node):
        value = super().run_node(node)
        if node in self.wanted:
            self.values[node] = value
        return value


def _node_values(captured, nodes) -> dict:
    recorder = _Recorder(captured.gm, {n for n in nodes if n is not None})
    with torch.no_grad():
        recorder.run(*captured.example_inputs)
    return recorder.values


def reference_from_match(match, values) -> torch.Tensor:
    """softmax(cap(q k^T * scale) + mask) v in float64 with explicit keep masks and GQA expansion
    (cap: c * tanh(s / c) for the match's softcap c, none for 0)."""
    q, k, v = (values[n].double() for n in (match.q, match.k, match.v))
    rep = match.num_heads // match.num_kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    Sq, Sk = q.shape[-2], k.shape[-2]
    scores = q @ k.transpose(-1, -2) * match.scale
    if match.softcap:
        scores = match.softcap * torch.tanh(scores / match.softcap)
    keep = Dense().mask(Sq, Sk)
    if match.causal:
        keep = keep & torch.ones(Sq, Sk, dtype=torch.bool).tril(Sk - Sq)
    if match.mask_kind == "bool":
        keep = keep & values[match.mask]
    elif match.mask_kind == "additive":
        scores = scores + values[match.mask].double()
    scores = scores.masked_fill(~keep, -math.inf)
    return torch.softmax(scores, dim=-1) @ v


def _check_attention(match, captured, model):
    values = _node_values(captured, [match.q, match.k, match.v, match.mask, match.output])
    q, k = values[match.q], values[match.k]
    assert q.shape[1] == match.num_heads and k.shape[1] == match.num_kv_heads
    expected = reference_from_match(match, values)
    atol, rtol = tolerance(torch.float32)
    torch.testing.assert_close(values[match.output].double(), expected, atol=atol * 10, rtol=rtol * 10)
    module = model.get_submodule(match.module_path)
    assert "Attention" in type(module).__name__, f"{match.module_path} is a {type(module).__name__}"
    assert match.output in match.nodes
    _check_dead_region(match.nodes, match.output)


def _check_linear(match, captured, model):
    values = _node_values(captured, [match.x, match.weight, match.bias, match.output])
    x, w = values[match.x].double(), values[match.weight].double()
    expected = x @ w.T + (values[match.bias].double() if match.bias is not None else 0.0)
    torch.testing.assert_close(values[match.output].double(), expected, atol=1e-4, rtol=1e-4)
    module = model.get_submodule(match.module_path)
    assert isinstance(module, torch.nn.Linear), f"{match.module_path} is a {type(module).__name__}"
    assert match.weight_target == f"{match.module_path}.weight"
    _check_dead_region(match.nodes, match.output)


def _check_dead_region(nodes, output):
    """Every node but output has all its users inside the region."""
    region = set(nodes)
    for node in nodes:
        if node is not output:
            assert set(node.users) <= region, f"{node.name} has users outside the region"


@functools.cache
def _analysed(name: str):
    """(model, [(captured graph, attention matches, linear matches)]) for a registry model; cached
    because capture dominates the runtime and the matchers only read the graph (or add one
    logical_not node, which a second run would add again)."""
    factory = {**ALL_MODELS, "edge_cases": edge_cases}[name]
    model, inputs = factory()
    graphs, _ = capture_aten(model, *inputs)
    return model, [(g, match_attention(g.gm), match_linear(g.gm, g.params)) for g in graphs]


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_matches_every_model(name):
    model, analysed = _analysed(name)
    attention_layers, linear_layers = ALL_EXPECTED[name]
    attentions, linears = [], []
    for captured, found_attention, found_linear in analysed:
        captured.gm.graph.lint()  # a node the matcher added must leave the graph well formed
        for match in found_attention:
            _check_attention(match, captured, model)
        for match in found_linear:
            _check_linear(match, captured, model)
        attentions += found_attention
        linears += found_linear
    assert len(attentions) == attention_layers
    assert len(linears) == linear_layers
    paths = [m.module_path for m in attentions]
    assert len(set(paths)) == len(paths), f"two attentions share a module path: {paths}"


def test_edge_cases():
    """Accepted and rejected forms (matcher_edge_models says why), each checked numerically."""
    model, ((captured, attentions, linears),) = _analysed("edge_cases")
    for match in attentions:
        _check_attention(match, captured, model)
    for match in linears:
        _check_linear(match, captured, model)
    found = {m.module_path: (m.scale, m.mask_kind, m.num_kv_heads, m.causal, m.softcap) for m in attentions}
    expected = {path: fields for path, fields in EXPECTED_ATTENTION.items() if fields is not None}
    assert found.keys() == expected.keys()
    for path, (scale, *fields) in expected.items():
        assert found[path] == (pytest.approx(scale), *fields), path
    assert sorted(m.module_path for m in linears) == sorted(EXPECTED_LINEAR)
    probs_returned = next(m for m in attentions if m.module_path == "cases.probs_returned")
    assert not any(n.target is torch.ops.aten._softmax.default for n in probs_returned.nodes)


def test_graph_break_gives_one_attention_per_graph():
    _, analysed = _analysed("models.graph_break")
    assert [[m.module_path for m in attentions] for _, attentions, _ in analysed] == [["block0.attn"], ["block1.attn"]]


def test_what_the_matchers_read():
    """Spot checks of the fields against what the models were written with."""
    (_, ((captured, matches, _),)) = _analysed("models.dit")
    by_path = {m.module_path: m for m in matches}
    assert by_path["blocks.0.attn"].scale == pytest.approx(0.3)
    assert by_path["blocks.1.cross_attn"].scale == pytest.approx(0.2)
    cross = by_path["blocks.0.cross_attn"]
    assert (cross.q.meta["val"].shape[2], cross.k.meta["val"].shape[2]) == (models.SEQ, 5)

    (_, ((_, matches, _),)) = _analysed("models.gpt_manual")
    assert [m.mask_kind for m in matches] == ["bool", "bool", "additive"]
    assert all(m.num_kv_heads == models.KV_HEADS and m.num_heads == models.HEADS for m in matches)
    assert all(m.scale == pytest.approx(1 / math.sqrt(models.EMBED // models.HEADS)) for m in matches)

    (_, ((_, matches, _),)) = _analysed("models.gpt_sdpa")
    assert [(m.causal, m.num_kv_heads) for m in matches] == [(True, 2), (True, 2)]

    (_, ((_, matches, _),)) = _analysed("hf.llama_eager")
    assert [(m.num_heads, m.num_kv_heads, m.mask_kind) for m in matches] == [(4, 2, "additive")] * 2


@pytest.mark.parametrize("raw, expected", [
    ("L['self'].blocks[0].attn", "blocks.0.attn"),
    ("L['self'].blocks.0.attn", "blocks.0.attn"),
    ("L['self']._modules['blocks']._modules['0'].attn", "blocks.0.attn"),
    ("L['self'].__dict__['_modules']['transformer_blocks']._modules['1'].attn1", "transformer_blocks.1.attn1"),
    ("getattr(L['self'].blocks, '0').attn", "blocks.0.attn"),
    ("getattr(getattr(L['self'].a, '1').b, '2').c", "a.1.b.2.c"),
    ("self.blocks.0.attn.q_proj", "blocks.0.attn.q_proj"),
    ("L__self___blocks_10_attn_q_proj", "blocks.10.attn_q_proj"),
    ("L['self']", ""),
    ("L['args'][0].layers.0.self_attn", "layers.0.self_attn"),
    ("L['kwargs']['self'].layers[1].mlp", "layers.1.mlp"),
])
def test_normalize_module_path(raw, expected):
    assert normalize_module_path(raw) == expected


def test_module_path_unknown_is_empty():
    graph = fx.Graph()
    node = graph.placeholder("x")
    assert module_path(node) == ""
    node.meta["nn_module_stack"] = {"a": ("L['self'].enc", object), "b": ("L['self'].enc.layers[2]", object)}
    assert module_path(node) == "enc.layers.2"


class CacheAttention(torch.nn.Module):
    """A decoding step against a KV cache held as two tensors, expanded for GQA by HF's repeat_kv."""

    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, models.repeat_kv(k, 2), models.repeat_kv(v, 2))


class Decoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = CacheAttention()

    def forward(self, q, k, v):
        return self.attn(q, k, v)


def test_a_kv_cache_whose_lengths_are_symbols_of_their_own_is_matched():
    """Under dynamic shapes k's and v's lengths are two symbols (two graph inputs), which SDPA makes
    equal at run time, and repeat_kv leaves a slice over the whole symbolic length: the layer is
    matched, with its kv heads, and checked numerically."""
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 11, 8), torch.randn(2, 2, 11, 8)
    torch._dynamo.mark_dynamic(k, 2)
    torch._dynamo.mark_dynamic(v, 2)
    model = Decoder()
    graphs, _ = capture_aten(model, q, k, v)
    (captured,) = graphs
    values = [n.meta.get("val") for n in captured.gm.graph.find_nodes(op="placeholder")]
    lengths = {str(t.shape[2]) for t in values if isinstance(t, torch.Tensor) and t.shape[1] == 2}
    assert len(lengths) == 2  # k and v: one symbol each
    (match,) = match_attention(captured.gm)
    assert match.num_kv_heads == 2 and match.module_path == "attn"
    _check_attention(match, captured, model)
