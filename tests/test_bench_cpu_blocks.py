"""bench/cpu_blocks.py on a tiny grid: every figure it records, checked against its own times and
choose_split's answer computed here."""
from __future__ import annotations

import json

import pytest
import torch

from bench_module import load_bench
from sparsec.codegen.attention_cpu_choice import _block_m_candidates, choose_split



def test_bench_main_records_every_block_the_choice_and_its_loss(tmp_path, monkeypatch, capsys):
    bench = load_bench("cpu_blocks")
    monkeypatch.setattr(bench, "grid", lambda quick: (((256, 2),), ("window",), (0.25,)))
    output = tmp_path / "cpu_blocks.json"
    threads_before = torch.get_num_threads()

    bench.main(["--threads", "1", "--causal", "--min-seconds", "0.001", "--output", str(output)])

    assert torch.get_num_threads() == threads_before
    printed = capsys.readouterr().out
    assert "the choice: right in" in printed and "mean loss of always one block" in printed
    data = json.loads(output.read_text())
    assert data["benchmark"] == "cpu_blocks" and data["versions"]["torch"] == torch.__version__
    assert data["command"].endswith("bench/cpu_blocks.py --threads 1 --causal --min-seconds 0.001 --output "
                                    + str(output))
    rows = data["rows"]
    assert [(r["S"], r["heads"], r["causal"], r["family"], r["threads"]) for r in rows] == [
        (256, 2, False, "window", 1), (256, 2, True, "window", 1)]
    candidates = _block_m_candidates(256)
    for r in rows:
        times = {int(bm): ms for bm, ms in r["block_ms"].items()}
        assert sorted(times) == candidates and all(ms > 0 for ms in times.values())
        pattern = bench.pattern_for_density("window", 256, 0.25, causal=r["causal"])
        assert r["pattern"] == repr(pattern)
        expected = choose_split(pattern, 256, 256, r["causal"], None, rows=2, width=128, threads=1,
                                split=False, frames=False)[0]
        assert r["chosen"] == expected and expected in candidates
        assert times[r["fastest"]] == min(times.values())
        assert r["loss"] == pytest.approx(times[r["chosen"]] / min(times.values()) - 1)
    summary = data["summary"]
    assert summary["cases"] == len(rows)
    assert summary["right"] == sum(r["chosen"] == r["fastest"] for r in rows)
    assert summary["mean_loss"] == pytest.approx(sum(r["loss"] for r in rows) / len(rows))
    assert summary["worst_loss"] == max(r["loss"] for r in rows)
    assert set(summary["always_mean_loss"]) == {str(bm) for bm in candidates}
    for bm, loss in summary["always_mean_loss"].items():
        assert loss == pytest.approx(sum(r["block_ms"][bm] / min(r["block_ms"].values()) - 1 for r in rows) / len(rows))
