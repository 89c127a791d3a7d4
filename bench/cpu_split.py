"""The CPU executor's split decision: bands far apart run whole or as parts merged by log-sum-exp.

    python bench/cpu_split.py                  # the grid below on 2 and 1 threads: ~5 minutes
    python bench/cpu_split.py --quick          # S = 2048, 8 heads, 2 threads: < 1 minute

For MultiDiagonal patterns at frame strides (bench/attention.py's pattern_for_density), every
(threads, S, heads, causal, density) times the executor forced whole (cpu_attention(split=False))
and forced split (split=True), alternating call by call, and records which way
codegen.attention_cpu_choice.choose_split takes. Printed and saved (JSON under bench/results/):
both times, the choice, and the loss of the choice (its time over the faster way's, minus 1), with
the mean loss of the choice against always whole and always split.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import _time_ms, device_name, pattern_for_density, write_record  # noqa: E402

from sparsec.codegen.attention_cpu import cpu_attention  # noqa: E402
from sparsec.codegen.attention_cpu_choice import choose_split  # noqa: E402

SHAPES = ((1024, 8), (2048, 4), (2048, 8), (4096, 4))  # (S, heads)
DENSITIES = (0.1, 0.25, 0.5)
HEAD_DIM = 64


def measure_case(S: int, heads: int, causal: bool, density: float, threads: int, min_seconds: float) -> dict:
    q, k, v = (torch.randn(1, heads, S, HEAD_DIM) for _ in range(3))
    pattern = pattern_for_density("multi_diagonal", S, density, causal=causal)
    patterns = (pattern,) * heads
    scale = HEAD_DIM ** -0.5
    times = _time_ms({way: (lambda split=split: cpu_attention(q, k, v, patterns, causal=causal, scale=scale, split=split))
                      for way, split in (("whole", False), ("split", True))}, "cpu", min_seconds)
    _, parts = choose_split(pattern, S, S, causal, rows=heads, width=2 * HEAD_DIM, threads=threads, native=False)
    chosen = "split" if len(parts) > 1 else "whole"
    best = min(times.values())
    return {"threads": threads, "S": S, "heads": heads, "causal": causal, "density": density, "pattern": repr(pattern),
            "whole_ms": times["whole"], "split_ms": times["split"], "chosen": chosen,
            "loss": times[chosen] / best - 1, "loss_whole": times["whole"] / best - 1,
            "loss_split": times["split"] / best - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="S = 2048, 8 heads, 2 threads")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--min-seconds", type=float, default=0.5, help="timing per case and way")
    parser.add_argument("--output", default=None, help="JSON path (default: bench/results/cpu_split_<date>.json)")
    args = parser.parse_args()
    shapes, thread_counts = ((((2048, 8),), [2]) if args.quick else (SHAPES, args.threads))
    torch.manual_seed(0)
    rows = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for S, heads in shapes:
            for causal in (False, True):
                for density in DENSITIES:
                    rows.append(measure_case(S, heads, causal, density, threads, args.min_seconds))
    table = Table(title=f"CPU executor: bands whole or split ({device_name('cpu')}, D={HEAD_DIM}, fp32)")
    for column in ("threads", "S", "heads", "causal", "density", "whole ms", "split ms", "chosen", "loss"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["threads"]), str(r["S"]), str(r["heads"]), str(r["causal"]), f"{r['density']:.2f}",
                      f"{r['whole_ms']:.1f}", f"{r['split_ms']:.1f}", r["chosen"], f"{100 * r['loss']:.1f}%")
    console = Console()
    console.print(table)
    summary = {key: sum(r[key] for r in rows) / len(rows) for key in ("loss", "loss_whole", "loss_split")}
    console.print(f"mean loss: the choice {100 * summary['loss']:.1f}%, always whole "
                  f"{100 * summary['loss_whole']:.1f}%, always split {100 * summary['loss_split']:.1f}%")
    path = write_record("cpu_split", "cpu", {"mean_loss": summary, "rows": rows}, output=args.output)
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
