"""bench/sliding_window.py on tiny layers: every point is timed, the band's output matches SDPA with
the mask, and the JSON records every figure."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from bench_module import BENCH_DIR, load_bench


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH_DIR))  # it imports bench/attention.py's timing
    return load_bench("sliding_window")


def test_a_tiny_run_times_every_point_and_records_it(bench, tmp_path, capsys):
    output = tmp_path / "sliding.json"
    bench.main(["--device", "cpu", "--seq", "320", "--windows", "32", "400", "--padding", "0", "7", "--batch", "2",
                "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--min-seconds", "0", "--output", str(output)])
    assert "sliding-window attention: 4 heads (2 kv)" in capsys.readouterr().out
    data = json.loads(output.read_text())
    assert data["benchmark"] == "sliding_window" and data["versions"]["torch"] == torch.__version__
    rows = data["rows"]
    assert {(r["seq"], r["window"], r["padding"]) for r in rows} == {(320, 32, 0), (320, 32, 7)}  # 400 >= S: skipped
    for r in rows:
        assert r["max_rel_error"] < 1e-5
        assert r["speedup"] == pytest.approx(r["sdpa_masked_ms"] / r["sparsec_band_ms"])
        assert 0 < r["band_density_of_causal"] < 0.25


def test_padding_needs_a_batch(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--padding", "4"])


def test_left_padding_is_timed_too(bench, tmp_path):
    output = tmp_path / "left.json"
    bench.main(["--device", "cpu", "--seq", "300", "--windows", "40", "--padding", "50", "--pad-side", "left",
                "--batch", "2", "--heads", "2", "--head-dim", "16", "--min-seconds", "0", "--output", str(output)])
    (row,) = json.loads(output.read_text())["rows"]
    assert row["pad_side"] == "left" and row["max_rel_error"] < 1e-5
