"""The CPU executor's query block size: the block the cost model picks against the fastest one.

    python bench/cpu_blocks.py                 # the grid below (36 cases) on 2 threads
    python bench/cpu_blocks.py --causal        # non-causal and causal: twice the cases
    python bench/cpu_blocks.py --quick         # S = 2048, window and block_sparse, 10% / 25%: ~5 s

For each (threads, S, heads, causal, family, density) (bench/attention.py's pattern_for_density,
head_dim 64, fp32, one pattern for all heads), times cpu_attention(block_m=bm, split=False,
frames=False) for every candidate query block bm of codegen.attention_cpu_choice
(_block_m_candidates), alternating call by call, and records the block choose_split takes for that
pattern run whole in natural order by that many heads on that many threads (what the executor
does). Printed and saved (JSON under bench/results/, unless --no-save): every block's time, the
chosen and the fastest block, the loss of the choice (its time over the fastest's, minus 1); then
how often the choice is right (loss 0), its mean and worst loss, and the mean loss of always
taking one block, for each candidate block.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import _time_ms, device_name, pattern_for_density, write_record  # noqa: E402

from sparsec.codegen.attention_cpu import cpu_attention  # noqa: E402
from sparsec.codegen.attention_cpu_choice import _block_m_candidates, choose_split  # noqa: E402

HEAD_DIM = 64


def grid(quick: bool) -> tuple[tuple, tuple, tuple]:
    """((S, heads), ...), families, densities."""
    if quick:
        return ((2048, 8),), ("window", "block_sparse"), (0.1, 0.25)
    return (((2048, 8), (4096, 8)),
            ("window", "multi_diagonal", "columns", "a_shape", "vertical_slash", "block_sparse"), (0.1, 0.25, 0.5))


def measure_case(S: int, heads: int, causal: bool, family: str, density: float, threads: int,
                 min_seconds: float) -> dict:
    q, k, v = (torch.randn(1, heads, S, HEAD_DIM) for _ in range(3))
    pattern = pattern_for_density(family, S, density, causal=causal)
    patterns = (pattern,) * heads
    scale = HEAD_DIM ** -0.5
    times = _time_ms({str(bm): (lambda bm=bm: cpu_attention(q, k, v, patterns, causal=causal, scale=scale, block_m=bm,
                                                              split=False, frames=False))
                      for bm in _block_m_candidates(S)}, "cpu", min_seconds)
    chosen = choose_split(pattern, S, S, causal, None, rows=heads, width=2 * HEAD_DIM, threads=threads,
                          split=False, frames=False)[0]
    fastest = int(min(times, key=times.get))
    return {"threads": threads, "S": S, "heads": heads, "causal": causal, "family": family, "density": density,
            "kept": pattern.density(S, S, causal=causal), "pattern": repr(pattern), "block_ms": times,
            "chosen": chosen, "fastest": fastest, "loss": times[str(chosen)] / times[str(fastest)] - 1}


def summarize(rows: list[dict]) -> dict:
    blocks = sorted(set.intersection(*(set(r["block_ms"]) for r in rows)), key=int)
    worst = max(rows, key=lambda r: r["loss"])
    return {"cases": len(rows), "right": sum(r["loss"] == 0 for r in rows),
            "mean_loss": sum(r["loss"] for r in rows) / len(rows), "worst_loss": worst["loss"],
            "worst_case": {key: worst[key] for key in ("threads", "S", "heads", "causal", "family", "density")},
            "always_mean_loss": {bm: sum(r["block_ms"][bm] / r["block_ms"][str(r["fastest"])] - 1 for r in rows)
                                 / len(rows) for bm in blocks}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="S = 2048, window and block_sparse, 10%% / 25%%")
    parser.add_argument("--causal", action="store_true", help="causal cases too")
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--min-seconds", type=float, default=2.0, help="timing per case (all blocks together)")
    parser.add_argument("--no-save", action="store_true", help="print only: no JSON")
    parser.add_argument("--output", default=None, help="JSON path (default: bench/results/cpu_blocks_<date>.json)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    shapes, families, densities = grid(args.quick)
    torch.manual_seed(0)
    rows, threads_before = [], torch.get_num_threads()
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            rows += [measure_case(S, heads, causal, family, density, threads, args.min_seconds)
                     for S, heads in shapes for causal in ((False, True) if args.causal else (False,))
                     for family in families for density in densities]
    finally:
        torch.set_num_threads(threads_before)
    blocks = sorted({bm for r in rows for bm in r["block_ms"]}, key=int)
    table = Table(title=f"CPU executor: query block size ({device_name('cpu')}, D={HEAD_DIM}, fp32)")
    for column in ("threads", "S", "heads", "causal", "family", "density", *(f"{bm} ms" for bm in blocks),
                   "chosen", "fastest", "loss"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["threads"]), str(r["S"]), str(r["heads"]), str(r["causal"]), r["family"],
                      f"{r['density']:.2f}", *(f"{r['block_ms'][bm]:.1f}" if bm in r["block_ms"] else "-"
                                               for bm in blocks),
                      str(r["chosen"]), str(r["fastest"]), f"{100 * r['loss']:.1f}%")
    console = Console(width=150)
    console.print(table)
    summary = summarize(rows)
    worst = summary["worst_case"]
    console.print(f"the choice: right in {summary['right']} of {summary['cases']}, mean loss "
                  f"{100 * summary['mean_loss']:.1f}%, worst {100 * summary['worst_loss']:.1f}% ({worst['family']} "
                  f"{worst['density']:.2f}, S {worst['S']}, causal {worst['causal']}, {worst['threads']} threads)")
    console.print("mean loss of always one block: " + ", ".join(
        f"{bm} {100 * loss:.1f}%" for bm, loss in summary["always_mean_loss"].items()))
    if not args.no_save:
        path = write_record("cpu_blocks", "cpu", {"head_dim": HEAD_DIM, "summary": summary, "rows": rows},
                            output=args.output, command=[os.path.relpath(__file__), *argv])
        console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
