"""bench/padded_attention.py on a tiny joint layer: every family and valid-text count is timed, the
padded output matches the explicit-mask dense path, and the JSON records every figure."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from bench_module import BENCH_DIR, load_bench


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH_DIR))  # it imports bench/attention.py's timing
    return load_bench("padded_attention")


def test_a_tiny_run_times_every_point_and_records_it(bench, tmp_path, capsys):
    output = tmp_path / "padded.json"
    bench.main(["--device", "cpu", "--video", "256", "--text", "32", "--valid", "5", "32", "--heads", "2",
                "--head-dim", "16", "--densities", "0.2", "--min-seconds", "0", "--output", str(output)])
    assert "256 video + 32 text tokens" in capsys.readouterr().out
    data = json.loads(output.read_text())
    assert data["benchmark"] == "padded_attention" and data["versions"]["torch"] == torch.__version__
    rows = data["rows"]
    assert {(r["family"], r["valid_text"]) for r in rows} == {(f, n) for f in bench.FAMILIES for n in (5, 32)}
    for r in rows:
        assert r["max_rel_error"] < 1e-5
        assert r["speedup_padded"] == pytest.approx(r["sdpa_masked_ms"] / r["sparsec_padded_ms"])
        assert 0 < r["kept_density"] < 1


def test_valid_text_beyond_the_text_is_refused(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--text", "16", "--valid", "17"])
