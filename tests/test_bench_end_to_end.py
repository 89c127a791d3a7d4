"""bench/end_to_end.py on a tiny positional DiT: every variant runs, the figures are consistent,
the dense path equals eager, and the JSON records what the benchmark README promises. (The
GPU session runs this script last; a crash there would cost the lease.)"""
from __future__ import annotations

import json
import sys

import pytest
import torch

from bench_module import BENCH_DIR, load_bench
import sparsec



@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH_DIR))  # it imports bench/attention.py's timing
    module = load_bench("end_to_end")
    return module


def test_quick_run_times_every_variant_and_records_it(bench, tmp_path, capsys):
    output = tmp_path / "e2e.json"
    bench.main(["--quick", "--frames", "2", "--patches", "8", "--dim", "64", "--depth", "1", "--min-seconds", "0",
                "--prune", "2:4", "--no-progress", "--output", str(output)])
    printed = capsys.readouterr().out
    assert "sparsec plan" in printed and "vs eager" in printed
    data = json.loads(output.read_text())
    assert data["benchmark"] == "end_to_end" and data["device_type"] == "cpu"
    assert data["versions"]["torch"] == torch.__version__ and data["command"].endswith(str(output))
    assert data["config"]["frames"] == 2 and data["config"]["head_roles"] == ["local", "temporal", "sink", "content"]
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"eager", "sparsec dense", "sparsec plan"}  # --quick leaves Inductor out
    assert rows["eager"]["speedup_vs_eager"] == 1.0
    for r in rows.values():
        assert r["ms"] > 0 and r["first_call_s"] > 0 and r["speedup_vs_inductor"] is None
        assert r["speedup_vs_eager"] == pytest.approx(rows["eager"]["ms"] / r["ms"])
    assert rows["sparsec dense"]["rel_l2_error_vs_eager"] < 1e-6
    assert rows["sparsec plan"]["rel_l2_error_vs_eager"] < 0.05
    layers = {layer["layer"]: layer for layer in data["layers"]}
    assert set(layers) == {"blocks.0.attn", "blocks.0.cross"}
    assert all(0 < layer["density"] <= 1 and layer["error"] <= data["budget"] + 1e-9 for layer in layers.values())
    assert data["tune_seconds"] > 0 and data["plan_target"] == "cpu"
    assert set(sparsec.Plan.from_dict(data["plan"]).layers) == set(layers)  # the whole plan travels
    # --prune: every variant runs the pruned model (sparsec matches eager above); the linear
    # layers sparsec compiled, by the kernel it chose for each
    assert data["prune"] == "2:4" and rows["eager"]["linear_kernels"] is None
    linears = sum(rows["sparsec dense"]["linear_kernels"].values())
    assert linears == sum(rows["sparsec plan"]["linear_kernels"].values()) >= 8


def test_bad_sizes_are_refused_by_name(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--quick", "--dim", "32", "--heads", "4"])  # head_dim 8: no room for the features
    assert "head_dim >= 14" in capsys.readouterr().err
    for spec in ("block64", "3:2"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--quick", "--prune", spec])
    assert bench.parse_args(["--quick", "--prune", "block32:0.25"]).prune == {"block": (32, 32), "density": 0.25}


def test_compile_check_builds_a_saved_plans_launches(tmp_path):
    """bench/compile_check.py --plan: one launch per pattern family of each layer, at the layer's
    shapes and the warps / stages tiles_for gives its tiles (compiling them is test_triton_aot's)."""
    from sparsec import patterns as P
    from sparsec.codegen.tiles import tiles_for
    from sparsec.plan import LayerPlan

    compile_check = load_bench("compile_check")
    layer = LayerPlan(patterns=(P.Window(8, 8), P.Dense(), P.Window(4, 0), P.Skip("mean")),
                      head_groups=((0, 2), (1,), (3,)), tiles=(64, 32), error=0.01, dense_seconds=2e-3,
                      sparse_seconds=1e-3, num_heads=4, num_kv_heads=2, q_len=300, kv_len=300, head_dim=64,
                      dtype="bf16", causal=True)
    path = tmp_path / "plan.json"
    sparsec.Plan(target="h100", budget=0.02, model_fingerprint="x", layers={"blocks.0.attn": layer}).save(path)
    cases = list(compile_check.plan_cases(str(path), ["bf16"]))
    assert [c["family"] for c, _ in cases] == ["window", "dense"]  # Skip heads launch nothing
    expected = tiles_for(64, 32, 64, torch.bfloat16)
    for case, call in cases:
        assert case["layer"] == "blocks.0.attn" and case["causal"] and case["head_dim"] == 64
        assert case["tiles"] == [64, 32, expected.num_warps, expected.num_stages]
        assert call.kwargs["BLOCK_M"] == 64 and call.kwargs["num_warps"] == expected.num_warps
        assert call.args[0].shape == (1, 4, 300, 64) and call.args[1].shape == (1, 2, 300, 64)


def test_compile_check_builds_both_backward_kernels_of_each_family():
    """bench/compile_check.py --backward: the dQ and dK / dV launches of every family but the
    frame-transposed one, at the default backward tiles, with each modification asked for."""
    from sparsec.codegen.tiles import default_backward_tiles

    compile_check = load_bench("compile_check")
    cases = list(compile_check.backward_cases(["window", "frames_transposed", "union"], ["bf16"], [128], True,
                                              compile_check.MODIFIED))
    assert [(c["family"], c["kernel"], c["softcap"], c["sinks"]) for c, _ in cases][:4] == [
        ("window", "backward_dq", 0.0, False), ("window", "backward_dkdv", 0.0, False),
        ("window", "backward_dq", 30.0, False), ("window", "backward_dkdv", 30.0, False)]
    assert len(cases) == 2 * 2 * 4 and {c["family"] for c, _ in cases} == {"window", "union"}
    tiles = default_backward_tiles(128, torch.bfloat16)
    for case, call in cases:
        own = tiles.dq if case["kernel"] == "backward_dq" else tiles.dkdv
        assert case["tiles"] == [own.block_m, own.block_n, own.num_warps, own.num_stages]
        assert call.kernel.endswith(case["kernel"].removeprefix("backward") + "_kernel")
        assert call.kwargs["SOFTCAP"] == (case["softcap"] > 0)
        assert case["accumulate"] is False and call.kwargs.get("ACCUMULATE", False) is False
    # --accumulate: GQA with a kv head shared by the family and a Skip("mean") head
    cases = list(compile_check.backward_cases(["window"], ["bf16"], [64], True, accumulate=True))
    assert [(c["kernel"], c["accumulate"]) for c, _ in cases] == [("backward_dq", False), ("backward_dkdv", True)]


def test_joint_text_runs_hunyuan_videos_layout(bench, tmp_path, capsys):
    """--joint-text: one self-attention over [video, text] tokens a block, the text padded; the plan
    names only those layers, and every variant still matches eager."""
    output = tmp_path / "joint.json"
    bench.main(["--quick", "--frames", "2", "--patches", "8", "--dim", "64", "--depth", "1", "--min-seconds", "0",
                "--joint-text", "16", "--no-progress", "--output", str(output)])
    assert "joint attention over [video, 16 text tokens]" in capsys.readouterr().out
    data = json.loads(output.read_text())
    assert data["config"]["joint_text"] is True and data["config"]["text_len"] == 16
    assert [layer["layer"] for layer in data["layers"]] == ["blocks.0.attn"]
    rows = {r["variant"]: r for r in data["rows"]}
    assert rows["sparsec dense"]["rel_l2_error_vs_eager"] < 1e-6
    assert rows["sparsec plan"]["rel_l2_error_vs_eager"] < 0.05
    with pytest.raises(SystemExit):
        bench.parse_args(["--quick", "--joint-text", "0"])
