"""bench/attention_backward.py on tiny shapes: every family and length is timed, sparsec's gradients
match masked SDPA's, each variant's peak memory is measured in a fresh process (one family: each
process imports torch), and the JSON records every figure. FlexAttention (CUDA only) is off on CPU; its
wiring (timing, gradient check, table, a failed build) runs with a stand-in or a broken mask_mod."""
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


def test_gqa_runs_every_variant_on_fewer_kv_heads(bench, tmp_path, capsys):
    """--kv-heads: k and v have fewer heads (SDPA with enable_gqa, sparsec natively); the gradients
    still match the masked SDPA's. A count that does not divide the heads is refused."""
    rows = _tiny_run(bench, tmp_path, "--no-memory", "--families", "window", "--heads", "4", "--kv-heads", "2")
    assert "4 heads (2 kv heads)" in capsys.readouterr().out
    assert len(rows) == 1 and rows[0]["max_rel_grad_error"] < 1e-5
    q, k, v, grad = bench._inputs({"S": 8, "heads": 4, "kv_heads": 2, "head_dim": 4, "dtype": "fp32", "device": "cpu"})
    assert (q.shape[1], k.shape[1], v.shape[1], grad.shape[1]) == (4, 2, 2, 4)
    with pytest.raises(SystemExit, match="--kv-heads must divide --heads"):
        bench.parse_args(["--heads", "4", "--kv-heads", "3"])


def test_a_tiny_run_times_every_point_and_records_it(bench, tmp_path, capsys):
    rows = _tiny_run(bench, tmp_path, "--no-memory")
    assert "forward + backward, causal, 2 heads" in capsys.readouterr().out
    assert {r["family"] for r in rows} == set(bench.FAMILIES) and {r["S"] for r in rows} == {96}
    for r in rows:
        assert r["max_rel_grad_error"] < 1e-5
        assert r["speedup_over_sdpa"] == pytest.approx(r["sdpa_ms"] / r["sparsec_ms"])
        assert all(r[f"{name}_peak_mb"] is None for name in bench.VARIANTS)
        assert 0 < r["kept_density"] < 1


def test_the_rows_so_far_are_saved_after_each_one(bench, tmp_path, monkeypatch):
    """A run cut short (a GPU lease's time limit) keeps the rows it measured, marked incomplete; the
    finished run's record says complete."""
    output = tmp_path / "backward.json"
    seen = []
    real_print_table = bench.print_table

    def at_the_table(rows, console):  # the rows are all measured, the final save not made yet
        seen.append(json.loads(output.read_text()))
        real_print_table(rows, console)
    monkeypatch.setattr(bench, "print_table", at_the_table)
    rows = _tiny_run(bench, tmp_path, "--no-memory", "--families", "window", "a_shape")
    assert seen[0]["complete"] is False and seen[0]["rows"] == rows
    assert json.loads(output.read_text())["complete"] is True


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


def test_flex_runs_on_cuda_only_and_no_flex_turns_it_off(bench):
    assert bench.runs_flex(bench.parse_args(["--device", "cuda"]))
    assert not bench.runs_flex(bench.parse_args(["--device", "cuda", "--no-flex"]))
    assert not bench.runs_flex(bench.parse_args(["--device", "cpu"]))
    assert not bench.runs_flex(bench.parse_args(["--quick", "--device", "cuda"]))  # --quick is CPU


def test_cpu_rows_carry_no_flex_figures(bench, tmp_path, capsys):
    (row,) = _tiny_run(bench, tmp_path, "--no-memory", "--families", "window")
    assert not [key for key in row if "flex" in key]
    out = capsys.readouterr().out
    assert "flex ms" not in out and "FlexAttention" not in out and "; flex" not in out


def _masked_flex(pattern, spec, q, k, v, grad) -> dict:
    """build_flex's stand-in on CPU: masked SDPA under flex's name, with made-up build times."""
    spec["flex"] = lambda q, k, v, scale: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=spec["mask"], scale=scale)
    return {"flex_build_s": 0.5, "flex_compile_s": 1.5}


def test_a_built_flex_is_timed_checked_and_reported(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "runs_flex", lambda args: True)
    monkeypatch.setattr(bench, "build_flex", _masked_flex)
    (row,) = _tiny_run(bench, tmp_path, "--no-memory", "--families", "window")
    assert row["flex_build_s"] == 0.5 and row["flex_compile_s"] == 1.5 and "flex_error" not in row
    assert row["flex_ms"] > 0 and row["speedup_over_flex"] == pytest.approx(row["flex_ms"] / row["sparsec_ms"])
    assert row["flex_max_rel_grad_error"] < 1e-5 and row["flex_peak_mb"] is None
    out = capsys.readouterr().out
    assert "flex ms" in out and "vs flex" in out and f"{row['speedup_over_flex']:.2f}x" in out


def test_a_flex_that_fails_to_build_is_recorded_and_the_run_goes_on(bench, tmp_path, capsys, monkeypatch):
    def broken(*args):
        raise RuntimeError("no mask_mod")

    monkeypatch.setattr(bench, "runs_flex", lambda args: True)
    monkeypatch.setattr(bench, "flex_mask_mod", broken)
    (row,) = _tiny_run(bench, tmp_path, "--no-memory", "--families", "window")
    assert row["flex_error"] == "RuntimeError: no mask_mod"
    assert not [key for key in row if key.startswith("flex_") and key != "flex_error"]
    assert "speedup_over_flex" not in row and row["max_rel_grad_error"] < 1e-5
    out = capsys.readouterr().out
    assert "flex failed: RuntimeError: no mask_mod" in out and "failed" in out.split("flex err")[-1]


def test_flex_memory_is_not_measured_in_a_fresh_cpu_process(bench, monkeypatch):
    """A fresh process could not rebuild the compiled flex: None, without starting one."""
    def no_process(*args, **kwargs):
        raise AssertionError("started a process for flex")

    monkeypatch.setattr(bench.subprocess, "run", no_process)
    spec = {"S": 64, "heads": 2, "head_dim": 8, "dtype": "fp32", "device": "cpu", "flex": object()}
    assert bench.peak_mb("flex", spec) is None
