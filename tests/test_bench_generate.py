"""bench/generate.py on a tiny pruned Llama: every variant generates with a static KV cache (the
cache written in place stays in sparsec's graphs), gives eager's greedy tokens, sparsec's 2:4
kernels run in the decoding graph where asked, and the JSON records every figure."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from bench_module import BENCH_DIR, load_bench

pytest.importorskip("transformers")
pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH_DIR))  # it imports bench/attention.py's timing
    return load_bench("generate")


def test_a_tiny_run_times_every_variant_and_records_it(bench, tmp_path, capsys):
    output = tmp_path / "generate.json"
    bench.main(["--device", "cpu", "--dim", "64", "--hidden", "96", "--layers", "1", "--heads", "4",
                "--kv-heads", "2", "--vocab", "128", "--prompt", "6", "--new-tokens", "3", "--prune", "2:4",
                "--weight-sparsity", "always", "--min-seconds", "0", "--output", str(output)])
    assert "static KV cache" in capsys.readouterr().out
    data = json.loads(output.read_text())
    assert data["benchmark"] == "generate" and data["device_type"] == "cpu"
    assert data["versions"]["torch"] == torch.__version__
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"eager", "inductor", "sparsec"}
    for r in rows.values():
        assert r["prune"] == "2:4" and r["generate_ms"] > 0 and r["first_call_s"] > 0
        assert r["decode_step_ms"] == pytest.approx(
            (r["generate_ms"] - r["prefill_and_one_token_ms"]) / 2)
        assert r["decode_speedup_vs_eager"] == pytest.approx(rows["eager"]["decode_step_ms"] / r["decode_step_ms"])
        assert r["tokens_equal_eager"]
    # the decoding graph: q, k, v, o, gate, up, down on the 2:4 kernel; the LM head (not pruned) dense
    assert rows["sparsec"]["linear_kernels"] == {"nm2:4": 7, "dense": 1}


def test_bad_arguments_fail_before_any_model_is_built(bench):
    for argv in (["--new-tokens", "1"], ["--dim", "100", "--heads", "16"], ["--prune", "density:lots"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
