"""The CPU executor's native kernels against torch's SDPA-based plans, and dense SDPA.

    python bench/cpu_native.py                 # the grid below on 2 and 1 threads (252 cases): ~7 minutes
    python bench/cpu_native.py --quick         # S = 2048, 8 heads, 2 threads, window and multi_diagonal: ~15 s

For every (threads, S, heads, causal, family, density) (bench/attention.py's pattern_for_density,
families whose patterns keep a few key intervals a row, block-sparse layouts, vertical-slash, and temporal
heads and column runs (more pieces than the interval kernel takes: on the slash kernel); head_dim 64,
fp32, batch 1, one pattern for all heads; a case whose pattern codegen.attention_cpu_native.native_form
cannot run is skipped), times dense SDPA (F.scaled_dot_product_attention(is_causal=causal)), the executor
forced onto torch's plans (cpu_attention(native=False): its own choice among them) and forced
onto the native kernel (native=True), alternating call by call, and records which way
codegen.attention_cpu_choice.choose_split takes for that pattern run by that many heads on that
many threads (what the executor does). Printed and saved (JSON under bench/results/): the three
times, the choice, the loss of the choice (its time over the faster sparse way's, minus 1), the
losses of always native and always torch, and the speedups of native, torch's plans and the
choice over dense SDPA; then how often the choice is right or within 1.5%, and the mean loss of
the choice against always native and always torch.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import _time_ms, device_name, pattern_for_density, write_record  # noqa: E402

from sparsec.codegen.attention_cpu import cpu_attention  # noqa: E402
from sparsec.codegen.attention_cpu_choice import choose_split  # noqa: E402
from sparsec.codegen.attention_cpu_native import Native, native_form, native_kernel  # noqa: E402

HEAD_DIM = 64
WITHIN = 0.015  # a choice this close to the faster way counts as right (timing noise)
WAYS = ("sdpa", "torch", "native")


def grid(quick: bool) -> tuple[tuple, tuple, tuple]:
    """((S, heads), ...), families, densities."""
    if quick:
        return ((2048, 8),), ("window", "multi_diagonal"), (0.1, 0.25)
    return (((1024, 8), (2048, 8), (4096, 4)), ("window", "a_shape", "multi_diagonal", "block_sparse", "vertical_slash",
                                                "temporal", "columns"), (0.1, 0.25, 0.5))


def measure_case(S: int, heads: int, causal: bool, family: str, density: float, threads: int,
                 min_seconds: float) -> dict | None:
    """The case's row, or None when its pattern cannot run natively."""
    pattern = pattern_for_density(family, S, density, causal=causal)
    form = native_form(pattern, S, S, causal)
    if form is None:
        return None
    q, k, v = (torch.randn(1, heads, S, HEAD_DIM) for _ in range(3))
    patterns = (pattern,) * heads
    scale = HEAD_DIM ** -0.5
    times = _time_ms({"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale),
                      **{way: (lambda native=native: cpu_attention(q, k, v, patterns, causal=causal, scale=scale,
                                                                   native=native))
                         for way, native in (("torch", False), ("native", True))}}, "cpu", min_seconds)
    _, parts = choose_split(pattern, S, S, causal, None, rows=heads, width=2 * HEAD_DIM, threads=threads)
    chosen = "native" if isinstance(parts[0], Native) else "torch"
    best = min(times["torch"], times["native"])
    return {"threads": threads, "S": S, "heads": heads, "causal": causal, "family": family, "density": density,
            "kept": pattern.density(S, S, causal=causal), "pattern": repr(pattern), "form": form,
            "sdpa_ms": times["sdpa"], "torch_ms": times["torch"], "native_ms": times["native"], "chosen": chosen,
            "loss": times[chosen] / best - 1, "loss_native": times["native"] / best - 1,
            "loss_torch": times["torch"] / best - 1, "speedup_native": times["sdpa"] / times["native"],
            "speedup_torch": times["sdpa"] / times["torch"], "speedup_chosen": times["sdpa"] / times[chosen]}


def summarize(rows: list[dict]) -> dict:
    n = len(rows)
    worst = max(rows, key=lambda r: r["loss"])
    return {"cases": n, "right": sum(r["loss"] <= WITHIN for r in rows), "within": WITHIN,
            "chosen_native": sum(r["chosen"] == "native" for r in rows),
            "mean_loss": {key: sum(r[key] for r in rows) / n for key in ("loss", "loss_native", "loss_torch")},
            "worst_loss": worst["loss"],
            "worst_case": {key: worst[key] for key in ("threads", "S", "heads", "causal", "family", "density")},
            "mean_speedup": {key: sum(r[key] for r in rows) / n
                             for key in ("speedup_native", "speedup_torch", "speedup_chosen")}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="S = 2048, 8 heads, 2 threads, window and "
                                                             "multi_diagonal, 10%% / 25%%")
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="default: 2 1 (--quick: 2)")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="timing per case (all three ways together)")
    parser.add_argument("--output", default=None, help="JSON path (default: bench/results/cpu_native_<date>.json)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if native_kernel() is None:
        raise SystemExit("cpu_native: the native interval kernel is not built here (codegen.native_build): "
                         "cpu_attention(native=True) would run torch's plans")
    shapes, families, densities = grid(args.quick)
    thread_counts = args.threads or ([2] if args.quick else [2, 1])
    torch.manual_seed(0)
    rows, skipped, threads_before = [], [], torch.get_num_threads()
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for S, heads in shapes:
                for causal in (False, True):
                    for family in families:
                        for density in densities:
                            row = measure_case(S, heads, causal, family, density, threads, args.min_seconds)
                            if row is None:
                                skipped.append({"threads": threads, "S": S, "causal": causal, "family": family,
                                                "density": density})
                            else:
                                rows.append(row)
    finally:
        torch.set_num_threads(threads_before)
    table = Table(title=f"CPU executor: native interval kernel or torch's plans ({device_name('cpu')}, "
                        f"D={HEAD_DIM}, fp32)")
    for column in ("threads", "S", "heads", "causal", "family", "density", "SDPA ms", "torch ms", "native ms",
                   "chosen", "loss", "native x", "chosen x"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["threads"]), str(r["S"]), str(r["heads"]), str(r["causal"]), r["family"],
                      f"{r['density']:.2f}", f"{r['sdpa_ms']:.1f}", f"{r['torch_ms']:.1f}", f"{r['native_ms']:.1f}",
                      r["chosen"], f"{100 * r['loss']:.1f}%", f"{r['speedup_native']:.2f}",
                      f"{r['speedup_chosen']:.2f}")
    console = Console(width=150)
    console.print(table)
    for s in skipped:
        console.print(f"skipped (no interval form): {s['family']} {s['density']:.2f}, S {s['S']}, "
                      f"causal {s['causal']}, {s['threads']} threads")
    if not rows:
        raise SystemExit("cpu_native: no case has the interval form")
    summary = summarize(rows)
    loss, speedup = summary["mean_loss"], summary["mean_speedup"]
    console.print(f"the choice: right or within {100 * WITHIN:.1f}% in {summary['right']} of {summary['cases']} "
                  f"(native in {summary['chosen_native']}); mean loss: the choice {100 * loss['loss']:.1f}%, always "
                  f"native {100 * loss['loss_native']:.1f}%, always torch {100 * loss['loss_torch']:.1f}%; worst "
                  f"{100 * summary['worst_loss']:.1f}%; mean speedup over SDPA: native "
                  f"{speedup['speedup_native']:.2f}x, torch {speedup['speedup_torch']:.2f}x, the choice "
                  f"{speedup['speedup_chosen']:.2f}x")
    path = write_record("cpu_native", "cpu", {"head_dim": HEAD_DIM, "summary": summary, "rows": rows,
                                              "skipped": skipped},
                        output=args.output, command=[os.path.relpath(__file__), *argv])
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
