"""bench/decode.py on a tiny pruned MLP stack: every variant runs, sparsec's output matches eager's,
its sparse kernels run where asked, and the JSON records every figure."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from bench_module import BENCH_DIR, load_bench


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH_DIR))  # it imports bench/attention.py's timing
    return load_bench("decode")


def test_a_tiny_run_times_every_variant_and_records_it(bench, tmp_path, capsys):
    output = tmp_path / "decode.json"
    bench.main(["--device", "cpu", "--dim", "64", "--hidden", "96", "--blocks", "1", "--tokens", "3",
                "--prune", "density:0.3", "--weight-sparsity", "always", "--min-seconds", "0",
                "--output", str(output)])
    assert "pruned MLP stack" in capsys.readouterr().out
    data = json.loads(output.read_text())
    assert data["benchmark"] == "decode" and data["device_type"] == "cpu"
    assert data["versions"]["torch"] == torch.__version__
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"eager", "inductor", "sparsec"}
    for r in rows.values():
        assert r["prune"] == "density:0.3" and r["tokens"] == 3 and r["ms"] > 0
        assert r["speedup_vs_eager"] == pytest.approx(rows["eager"]["ms"] / r["ms"])
        assert r["rel_l2_error_vs_eager"] < 1e-5
    from sparsec.codegen.linear_cpu_native import native_linear_available
    expected = "unstructured" if native_linear_available() else "dense"
    assert rows["sparsec"]["linear_kernels"] == {expected: 3}  # gate, up and down


def test_bad_specs_fail_before_any_timing(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--prune", "density:lots"])
