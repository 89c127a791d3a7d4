"""bench/cpu_native.py on a tiny grid: every figure it records, checked against its own times and
choose_split's answer computed here."""
from __future__ import annotations

import json

import pytest
import torch

import sparsec.patterns as P
from bench_module import load_bench
from sparsec.codegen.attention_cpu_choice import choose_split
from sparsec.codegen.attention_cpu_native import Native, native_form, native_kernel



@pytest.mark.skipif(native_kernel() is None, reason="the native interval kernel is not built here")
def test_bench_main_records_three_ways_the_choice_its_loss_and_speedups(tmp_path, monkeypatch, capsys):
    bench = load_bench("cpu_native")
    monkeypatch.setattr(bench, "grid", lambda quick: (((256, 2),), ("window",), (0.25,)))
    output = tmp_path / "cpu_native.json"
    threads_before = torch.get_num_threads()

    bench.main(["--threads", "1", "--min-seconds", "0.001", "--output", str(output)])

    assert torch.get_num_threads() == threads_before
    printed = capsys.readouterr().out
    assert "the choice: right or within" in printed and "always native" in printed
    data = json.loads(output.read_text())
    assert data["benchmark"] == "cpu_native" and data["versions"]["torch"] == torch.__version__
    assert data["head_dim"] == 64 and data["skipped"] == []
    assert data["command"].endswith("bench/cpu_native.py --threads 1 --min-seconds 0.001 --output " + str(output))
    rows = data["rows"]
    assert [(r["S"], r["heads"], r["causal"], r["family"], r["density"], r["threads"]) for r in rows] == [
        (256, 2, False, "window", 0.25, 1), (256, 2, True, "window", 0.25, 1)]
    for r in rows:
        times = {way: r[f"{way}_ms"] for way in ("sdpa", "torch", "native")}
        assert all(ms > 0 for ms in times.values())
        pattern = bench.pattern_for_density("window", 256, 0.25, causal=r["causal"])
        assert r["pattern"] == repr(pattern) and r["kept"] == pytest.approx(pattern.density(256, 256, causal=r["causal"]))
        assert r["form"] == native_form(pattern, 256, 256, r["causal"]) == "intervals"
        _, parts = choose_split(pattern, 256, 256, r["causal"], None, rows=2, width=128, threads=1)
        assert r["chosen"] == ("native" if isinstance(parts[0], Native) else "torch")
        best = min(times["torch"], times["native"])
        assert r["loss"] == pytest.approx(times[r["chosen"]] / best - 1)
        assert r["loss_native"] == pytest.approx(times["native"] / best - 1)
        assert r["loss_torch"] == pytest.approx(times["torch"] / best - 1)
        assert min(r["loss_native"], r["loss_torch"]) == 0 and r["loss"] >= 0
        assert r["speedup_native"] == pytest.approx(times["sdpa"] / times["native"])
        assert r["speedup_torch"] == pytest.approx(times["sdpa"] / times["torch"])
        assert r["speedup_chosen"] == pytest.approx(times["sdpa"] / times[r["chosen"]])
    summary = data["summary"]
    assert summary["cases"] == len(rows) and summary["within"] == bench.WITHIN
    assert summary["right"] == sum(r["loss"] <= bench.WITHIN for r in rows)
    assert summary["chosen_native"] == sum(r["chosen"] == "native" for r in rows)
    for key in ("loss", "loss_native", "loss_torch"):
        assert summary["mean_loss"][key] == pytest.approx(sum(r[key] for r in rows) / len(rows))
    for key in ("speedup_native", "speedup_torch", "speedup_chosen"):
        assert summary["mean_speedup"][key] == pytest.approx(sum(r[key] for r in rows) / len(rows))
    assert summary["worst_loss"] == max(r["loss"] for r in rows)


def test_bench_skips_a_pattern_no_native_kernel_runs(monkeypatch):
    bench = load_bench("cpu_native")
    mixed = P.Window(4, 4) | P.BlockSparse(torch.ones(16, 16, dtype=torch.bool), 16)
    monkeypatch.setattr(bench, "pattern_for_density", lambda *args, **kwargs: mixed)
    assert native_form(mixed, 256, 256, False) is None
    assert bench.measure_case(256, 2, False, "window", 0.25, 1, 0.001) is None
