"""SPARSEC_DUMP_DIR / the dump_dir option write every graph's stages; sparsec.explain returns
the same as objects."""
from __future__ import annotations

import torch

from sparsec.explain import explain
from sparsec.ir.ops import Attention
from sparsec.ir.parser import parse_graph
from sparsec.patterns import MultiDiagonal, Window
from tests import models

EXPECTED_FILES = ["0_dynamo_fx.py", "1_aten_fx.py", "2_ir_lower.txt", "3_ir_apply_patterns.txt",
                  "4_ir_analyze_weights.txt", "5_ir_choose_linear_kernels.txt", "6_rewritten_fx.py"]


def _compile_with_env_dump(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEC_DUMP_DIR", str(tmp_path))
    torch._dynamo.reset()  # the same model code compiled by an earlier test would be reused
    model, inputs = models.graph_break()
    with torch.no_grad():
        torch.compile(model, backend="sparsec", options={"inner": "eager", "rewrite_dense": True})(*inputs)


def test_dump_dir_has_a_folder_per_graph_with_every_stage(monkeypatch, tmp_path):
    _compile_with_env_dump(monkeypatch, tmp_path)
    folders = sorted(p for p in tmp_path.iterdir())
    assert [f.name.split("_", 1)[0] for f in folders] == ["000", "001"]  # graph break: two graphs
    for folder in folders:
        assert sorted(p.name for p in folder.iterdir()) == EXPECTED_FILES
        assert "torch.ops.sparsec.attention" in (folder / "6_rewritten_fx.py").read_text()
        assert "def forward" in (folder / "0_dynamo_fx.py").read_text()
        ir = parse_graph((folder / "3_ir_apply_patterns.txt").read_text())
        assert len(ir.ops_of(Attention)) == 1


def test_dumps_continue_numbering_in_a_used_folder(monkeypatch, tmp_path):
    (tmp_path / "007_old").mkdir()
    _compile_with_env_dump(monkeypatch, tmp_path)
    assert sorted(p.name.split("_", 1)[0] for p in tmp_path.iterdir()) == ["007", "008", "009"]


def test_explain_reports_every_graph_and_stage():
    model, inputs = models.graph_break()
    report = explain(model, *inputs, options={"inner": "eager", "attention_patterns": {"block0.attn": Window(2, 0)}})
    assert len(report.graphs) == 2
    first = report.graphs[0]
    assert [name for name, _ in first.stages] == ["lower", "apply_patterns", "analyze_weights",
                                                  "choose_linear_kernels"]
    assert first.stage("lower").ops_of(Attention)[0].scores.is_dense
    assert not first.stage("apply_patterns").ops_of(Attention)[0].scores.is_dense
    text = str(report)
    assert "2 graph(s)" in text and "block0.attn" in text and "Window(left=2, right=0) * 4" in text
    assert "graph " + first.name in text and "return" in text  # the final IR is printed
    assert parse_graph(str(first.final_ir)) == first.final_ir


def test_explain_twice_compiles_again():
    model, inputs = models.gpt_sdpa()
    assert len(explain(model, *inputs, options={"inner": "eager"}).graphs) == 1
    assert len(explain(model, *inputs, options={"inner": "eager"}).graphs) == 1


def test_explain_prices_each_attention_layer_on_the_target():
    from sparsec.cost_models import estimate
    from sparsec.cost_models.hardware import get_profile

    model, inputs = models.gpt_sdpa()
    report = explain(model, *inputs, options={"inner": "eager", "target": "h100",
                                              "attention_patterns": {"blocks.*.attn": Window(2, 0)}})
    assert report.hardware.name == "h100"
    op = report.graphs[0].final_ir.ops_of(Attention)[0]
    expected = estimate(op, get_profile("h100")) * 1e6
    line = next(line for line in report.summary().splitlines() if op.module_path + ":" in line)
    assert f"est. on h100: dense" in line and f"-> {expected:.1f} us" in line


def test_explain_says_which_layers_sparsec_runs():
    model, inputs = models.gpt_sdpa()
    dense = explain(model, *inputs, options={"inner": "eager"}).summary()
    assert "run by sparsec's ops: 0 attention, 0 linear; the rest (dense) stay the model's own ops" in dense
    patterned = explain(model, *inputs,
                        options={"inner": "eager", "attention_patterns": {"blocks.*.attn": Window(2, 0)}})
    attention_layers = len(patterned.graphs[0].final_ir.ops_of(Attention))
    assert f"run by sparsec's ops: {attention_layers} attention, 0 linear" in patterned.summary()


def test_explain_names_the_heads_run_in_frame_transposed_order():
    """A video DiT (8 frames of 16 x 16 patches) with a temporal pattern on every self-attention
    head: on the cpu target the executor runs wide frame diagonals in frame-transposed order and
    width-1 ones on the native slash kernel (measured, 4 heads: at width 8, 5.5 ms on the native
    interval kernel in transposed order, 6.0 ms on torch's, 10.9 ms on the slash kernel; at width
    1, 2.5 ms on the slash kernel against 3.5 ms transposed), and explain says so; a local window
    stays in token order."""
    from sparsec.demo import DEMO_CONFIG
    from sparsec.models import example_inputs, tiny_dit

    model, _ = tiny_dit(DEMO_CONFIG)
    frame = (DEMO_CONFIG.height // DEMO_CONFIG.patch) * (DEMO_CONFIG.width // DEMO_CONFIG.patch)

    def temporal(width):
        return MultiDiagonal([k * frame + r for k in range(1 - DEMO_CONFIG.frames, DEMO_CONFIG.frames)
                              for r in (-16, 0, 16)], width)

    inputs = example_inputs(DEMO_CONFIG, seed=4)
    for pattern, expected in ((temporal(8), "heads 0, 1, 2, 3 in frame-transposed order (frames of "),
                              (temporal(1), "heads 0, 1, 2, 3 on the native CPU kernels"), (Window(8, 8), None)):
        report = explain(model, *inputs, options={"inner": "eager", "target": "cpu",
                                                  "attention_patterns": {"blocks.*.attn": pattern}})
        lines = [line for line in report.summary().splitlines() if ".attn:" in line]
        assert lines and all((expected in line) if expected else ("frame-transposed" not in line) for line in lines)
