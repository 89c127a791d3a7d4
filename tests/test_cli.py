"""The `sparsec` command line: `sparsec dump` / `sparsec tune` (with --measure) and their errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sparsec.cli import main, parse_cli_options
from sparsec.patterns import Window

ROOT = Path(__file__).resolve().parents[1]


def test_dump_writes_the_stages_of_a_factory_model(tmp_path, capsys):
    options = '{"inner": "eager", "attention_patterns": {"blocks.*.attn": {"type": "Window", "left": 2, "right": 0}}}'
    assert main(["dump", "tests.models:gpt_sdpa", "--out", str(tmp_path), "--options", options]) == 0
    (folder,) = tmp_path.iterdir()
    assert {"0_dynamo_fx.py", "2_ir_lower.txt", "3_ir_apply_patterns.txt"} <= {p.name for p in folder.iterdir()}
    assert "Window(left=2, right=0)" in (folder / "3_ir_apply_patterns.txt").read_text()
    printed = capsys.readouterr().out
    assert "blocks.0.attn" in printed and str(tmp_path) in printed


def one_tensor_factory():
    """(model, one tensor): the inputs sparsec.tune takes as one positional input."""
    import torch

    return torch.nn.Linear(8, 4), torch.randn(3, 8)


def test_dump_takes_a_lone_tensor_as_the_models_one_input(tmp_path, capsys):
    assert main(["dump", "test_cli:one_tensor_factory", "--out", str(tmp_path), "--options", '{"inner": "eager"}']) == 0
    assert "wrote 1 graph dump(s)" in capsys.readouterr().out


def test_options_json_turns_pattern_dicts_into_patterns():
    options = parse_cli_options('{"attention_patterns": {"a": {"type": "Window", "left": 1, "right": 0}, '
                                '"b": [{"type": "Window", "left": 2, "right": 2}]}}')
    assert options["attention_patterns"] == {"a": Window(1, 0), "b": [Window(2, 2)]}


@pytest.mark.parametrize("argv, message", [
    (["dump", "tests.models"], "module:factory"),
    (["dump", "no_such_module_xyz:f"], "cannot import"),
    (["dump", "tests.models:no_such_factory"], "no callable"),
    (["dump", "tests.models:gpt_sdpa", "--options", "{not json"], "not valid JSON"),
    (["dump", "tests.models:gpt_sdpa", "--options", '{"attention_patterns": {"x": {"type": "Bogus"}}}'],
     "--options attention_patterns: unknown pattern type 'Bogus'"),
    (["dump", "tests.models:gpt_sdpa", "--options", '{"foo": 1}'], "sparsec dump: --options: unknown sparsec option"),
    (["tune", "nocolon"], "sparsec tune: expected module:factory"),
    (["tune", "tests.models:gpt_sdpa", "--out", "/no/such/folder/p.json"],
     "sparsec tune: --out '/no/such/folder/p.json': folder '/no/such/folder' does not exist"),
])
def test_bad_arguments_say_what_is_wrong(argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert message in str(info.value)


def test_the_console_script_runs_in_a_fresh_process():
    result = subprocess.run([sys.executable, "-m", "sparsec.cli", "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0 and "dump" in result.stdout and "demo" in result.stdout


def test_tune_saves_a_plan_for_the_factory_model(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["tune", "sparsec.models.tiny_dit:tiny_dit", "--target", "cpu", "--budget", "0.05",
                 "--out", str(out)]) == 0
    from sparsec.plan import Plan

    plan = Plan.load(out)
    assert plan.target == "cpu" and plan.budget == 0.05
    assert {"blocks.0.attn", "blocks.1.attn"} <= set(plan.layers)  # self-attention layers of the DiT
    printed = capsys.readouterr().out
    assert "blocks.0.attn" in printed and str(out) in printed


def test_tune_names_a_bad_budget(tmp_path):
    with pytest.raises(SystemExit, match="budget"):
        main(["tune", "sparsec.models.tiny_dit:tiny_dit", "--budget", "-1", "--out", str(tmp_path / "p.json")])
    with pytest.raises(SystemExit, match="--quick-measure only applies with --measure"):
        main(["tune", "sparsec.models.tiny_dit:tiny_dit", "--quick-measure", "--out", str(tmp_path / "p.json")])


def test_tune_measure_calibrates_this_device_and_tunes_for_it(tmp_path, monkeypatch, capsys):
    import torch

    from sparsec import tuning
    from sparsec.codegen.tiles import AttentionTiles
    from sparsec.cost_models import fit
    from sparsec.cost_models.attention_cost import AttentionShape
    from sparsec.cost_models.calibration import calibrated_profile_path
    from sparsec.cost_models.hardware import HardwareProfile, get_profile, profile_for_device
    from sparsec.cost_models.linear_measure import LinearCandidate
    from sparsec.cost_models.measure import candidate_grid, measurement_device
    from sparsec.plan import Plan

    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path / "cache"))  # never the user's stored profile
    # The quick grid takes 25-45 s on 2 busy cores; three candidates at S=128 run the same path.
    shape = AttentionShape(batch=1, num_heads=2, num_kv_heads=2, q_len=128, kv_len=128, head_dim=32,
                           value_dim=32, dtype="f32", causal=False)
    candidates = candidate_grid([shape], families=("dense", "window", "block_sparse"), densities=(0.25,),
                                tiles=(AttentionTiles(64, 64),))
    grids, profiles_used = [], []

    def tiny_grid(device, quick=False):
        grids.append(quick)
        return candidates

    def recorded_profile(target):
        profiles_used.append(get_profile(target))
        return profiles_used[-1]

    monkeypatch.setattr(fit, "default_grid", tiny_grid)
    linear = [LinearCandidate(out_features=64, in_features=128, tokens=8, kernel=kernel, density=density)
              for kernel, density in (("dense", 1.0), ("bsr32x32", 0.25))]
    monkeypatch.setattr(fit, "linear_grid", lambda device, quick=False: linear)
    monkeypatch.setattr(tuning, "get_profile", recorded_profile)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = profile_for_device(device).name
    out = tmp_path / "plan.json"

    assert main(["tune", "sparsec.models.tiny_dit:tiny_dit", "--budget", "0.05", "--measure", "--quick-measure",
                 "--out", str(out)]) == 0

    assert grids == [True]
    stored = calibrated_profile_path(name)
    assert stored.parent.parent == tmp_path / "cache" and stored.exists()
    profile = HardwareProfile.from_json(stored.read_text())
    assert profile.calibrated_from.startswith(f"measured on {measurement_device(device)}, ")
    assert f"{len(candidates)} candidates" in profile.calibrated_from
    assert "linear layers: 2 timings" in profile.calibrated_from
    assert profiles_used == [profile]  # the tuning priced with the profile just measured
    plan = Plan.load(out)
    assert plan.target == name and plan.budget == 0.05
    assert {"blocks.0.attn", "blocks.1.attn"} <= set(plan.layers)
    printed = capsys.readouterr().out
    assert f"calibrated the cost model on {measurement_device(device)}" in printed
    assert f"saved to {stored}" in printed and str(out) in printed
