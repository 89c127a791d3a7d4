"""bench/attention_backward.py on tiny shapes: every family and length is timed, sparsec's gradients
match masked SDPA's, each variant's peak memory is measured in a fresh process (one family: each
process imports torch), and the JSON records every figure."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from bench_module import BENCH_DIR, load_bench


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH_DIR))  # it imports bench/attention.py's timing
    return load_bench("attention_backward")


def _tiny_run(bench, tmp_path, *options) -> list[dict]:
    output = tmp_path / "backward.json"
    bench.main(["--device", "cpu", "--lengths", "96", "--heads", "2", "--head-dim", "16", "--densities", "0.3",
                "--min-seconds", "0", "--output", str(output), *options])
    data = json.loads(output.read_text())
    assert data["benchmark"] == "attention_backward" and data["versions"]["torch"] == torch.__version__
    return data["rows"]


def test_a_tiny_run_times_every_point_and_records_it(bench, tmp_path, capsys):
    rows = _tiny_run(bench, tmp_path, "--no-memory")
    assert "forward + backward, causal, 2 heads" in capsys.readouterr().out
    assert {r["family"] for r in rows} == set(bench.FAMILIES) and {r["S"] for r in rows} == {96}
    for r in rows:
        assert r["max_rel_grad_error"] < 1e-5
        assert r["speedup_over_sdpa"] == pytest.approx(r["sdpa_ms"] / r["sparsec_ms"])
        assert all(r[f"{name}_peak_mb"] is None for name in bench.VARIANTS)
        assert 0 < r["kept_density"] < 1


def test_each_variants_peak_memory_is_measured_in_a_fresh_process(bench, tmp_path):
    (row,) = _tiny_run(bench, tmp_path, "--families", "window")
    assert all(row[f"{name}_peak_mb"] is not None and row[f"{name}_peak_mb"] >= 0 for name in bench.VARIANTS)


def test_each_variant_computes_the_same_gradients(bench):
    """The three steps differ only in how they run: sdpa_masked and sparsec give one set of
    gradients (the pattern's), and sdpa the dense ones, which differ."""
    spec = {"S": 64, "heads": 2, "head_dim": 8, "dtype": "fp32", "device": "cpu"}
    from sparsec import patterns as P
    from sparsec.attention_dispatch import causal_allowed
    from sparsec.ops import patterns_to_json

    pattern = P.Window(6, 0)
    spec.update(patterns=patterns_to_json((pattern,) * 2), mask=pattern.mask(64, 64) & causal_allowed(64, 64))
    q, k, v, grad = bench._inputs(spec)
    masked, sparse, dense = (bench.step(name, spec, q, k, v, grad) for name in ("sdpa_masked", "sparsec", "sdpa"))
    for a, b, c in zip(masked, sparse, dense):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert float((a - c).abs().max()) > 1e-3
