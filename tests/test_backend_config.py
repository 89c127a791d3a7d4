"""Options parse strictly into SparsecConfig; bad options raise errors that name them."""
from __future__ import annotations

import pytest
import torch

from sparsec import patterns as P
from sparsec.config import SparsecConfig, parse_options


def test_defaults_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("SPARSEC_DUMP_DIR", "/tmp/somewhere")
    monkeypatch.setenv("SPARSEC_VERIFY", "1")
    config = parse_options(None)
    assert config == SparsecConfig(inner="inductor", dump_dir="/tmp/somewhere", verify=True, fallback="inductor")
    monkeypatch.delenv("SPARSEC_DUMP_DIR")
    monkeypatch.setenv("SPARSEC_VERIFY", "0")
    assert parse_options({}).dump_dir is None and parse_options({}).verify is False


def test_all_keys_parse():
    window = P.Window(4, 0)
    config = parse_options({"inner": "eager", "dump_dir": "d", "verify": False, "fallback": "raise",
                            "attention_patterns": {"blocks.*.attn": window, "head.attn": [P.Dense(), window]}})
    assert (config.inner, config.dump_dir, config.verify, config.fallback) == ("eager", "d", False, "raise")
    assert config.patterns_for("blocks.3.attn") == window
    assert config.patterns_for("head.attn") == (P.Dense(), window)
    assert config.patterns_for("blocks.3.mlp") is None


def test_exact_paths_win_over_globs():
    config = parse_options({"attention_patterns": {"blocks.*": P.Window(1, 1), "blocks.0": P.Dense()}})
    assert config.patterns_for("blocks.0") == P.Dense()
    assert config.patterns_for("blocks.1") == P.Window(1, 1)


@pytest.mark.parametrize("options, error, words", [
    ({"innr": "eager"}, ValueError, ["'innr'", "inner"]),
    ({"inner": "tvm"}, ValueError, ["'inner'", "'inductor'", "'eager'"]),
    ({"fallback": "ignore"}, ValueError, ["'fallback'", "'raise'"]),
    ({"verify": "yes"}, TypeError, ["'verify'"]),
    ({"rewrite_dense": 1}, TypeError, ["'rewrite_dense'", "True or False"]),
    ({"dump_dir": 3}, TypeError, ["'dump_dir'"]),
    ({"attention_patterns": [P.Dense()]}, TypeError, ["'attention_patterns'", "dict"]),
    ({"attention_patterns": {"a": "window"}}, TypeError, ["'a'", "Pattern"]),
    ({"attention_patterns": {"a": [P.Dense(), 3]}}, TypeError, ["[1]", "int"]),
    ({"attention_patterns": {"a": []}}, ValueError, ["empty"]),
    ({"plan": "no/such/plan.json"}, ValueError, ["'plan'", "no/such/plan.json"]),
    ({"plan": 3}, TypeError, ["'plan'", "Plan"]),
    ({"tune": {"budgett": 0.1}}, ValueError, ["'tune'", "budgett"]),
    ({"tune": {"budget": -1}}, ValueError, ["budget"]),
    ({"target": "tpu"}, ValueError, ["'target'", "tpu", "h100"]),
    ({"weight_sparsity": "yes"}, ValueError, ["'weight_sparsity'", "auto"]),
    ("inner=eager", TypeError, ["dict"]),
])
def test_bad_options_name_the_problem(options, error, words):
    with pytest.raises(error) as info:
        parse_options(options)
    for word in words:
        assert word in str(info.value)


def test_torch_compile_rejects_an_unknown_option():
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="sparsec", options={"no_such_option": 1})
    with pytest.raises(Exception, match="no_such_option"):
        compiled(torch.randn(2, 4))


def test_the_entry_point_is_registered():
    from importlib.metadata import entry_points

    names = {e.name: e.value for e in entry_points(group="torch_dynamo_backends")}
    assert names.get("sparsec") == "sparsec.backend:sparsec_backend"
    assert "sparsec" in torch._dynamo.list_backends()


def test_plan_and_tune_exclude_each_other():
    from sparsec.plan import Plan

    plan = Plan(target="cpu", budget=0.02, model_fingerprint="x")
    assert parse_options({"plan": plan}).plan is plan
    with pytest.raises(ValueError, match="'plan' and 'tune' exclude each other"):
        parse_options({"plan": plan, "tune": {"budget": 0.05}})
