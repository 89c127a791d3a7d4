"""bench/left_padded.py on a tiny left-padded batch: every family, length and density is timed, the
padded output matches each row's explicit-mask reference, and the JSON records every figure."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from bench_module import BENCH_DIR, load_bench
from sparsec import patterns as P
from sparsec.ops import attention as attention_op
from sparsec.ops import patterns_to_json


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH_DIR))  # it imports bench/attention.py's timing
    return load_bench("left_padded")


def test_a_tiny_run_times_every_point_and_records_it(bench, tmp_path, capsys):
    output = tmp_path / "left.json"
    bench.main(["--device", "cpu", "--lengths", "96", "130", "--pads", "0", "0.3", "--heads", "2", "--head-dim", "16",
                "--densities", "0.3", "--min-seconds", "0", "--output", str(output)])
    assert "left-padded batch of 2 rows" in capsys.readouterr().out
    data = json.loads(output.read_text())
    assert data["benchmark"] == "left_padded" and data["versions"]["torch"] == torch.__version__
    rows = data["rows"]
    assert {(r["family"], r["S"]) for r in rows} == {(f, S) for f in bench.FAMILIES for S in (96, 130)}
    for r in rows:
        assert r["max_rel_error"] < 1e-5
        assert r["pads"] == [0, int(0.3 * r["S"])]
        assert r["speedup_padded"] == pytest.approx(r["sdpa_masked_ms"] / r["sparsec_padded_ms"])
        assert 0 < r["kept_density"] < 1


def test_the_check_catches_a_wrong_row(bench):
    """_check compares each row's own tokens: an output computed unshifted (the patterns at absolute
    positions) fails it, as does a padding query that is not 0."""
    S, pads = 64, [0, 20]
    q, k, v = (torch.randn(2, 2, S, 16) for _ in range(3))
    patterns = (P.AShape(4, 8), P.VerticalSlash([3], [0, -1]))
    mask = bench.left_padded_mask(S, pads, "cpu")
    got = attention_op(q, k, v, mask, 0.25, False, patterns_to_json(patterns), mask_rule="causal:0")
    assert bench._check(q, k, v, pads, patterns, 0.25, got) < 1e-5
    keep = torch.stack([p.mask(S, S) for p in patterns])[None] & mask
    unshifted = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.25).nan_to_num(0.0)
    assert bench._check(q, k, v, pads, patterns, 0.25, unshifted) > 1e-3
    bad = got.clone()
    bad[1, 0, 3] = 1.0
    assert bench._check(q, k, v, pads, patterns, 0.25, bad) == float("inf")


def test_pads_outside_the_row_are_refused(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--pads", "0", "1.0"])
