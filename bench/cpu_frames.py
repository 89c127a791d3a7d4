"""The CPU executor's token order for heads of a video model: natural, or frame-transposed.

    python bench/cpu_frames.py                 # the grid below on 2 threads: ~3 minutes
    python bench/cpu_frames.py --quick         # 8 frames of 16 x 16 patches only: < 1 minute

Video tokens come frame by frame (F patches a frame, T frames). For heads of each kind below,
every (T, F, kind, causal) times the executor in natural order (cpu_attention(frames=False)),
in frame-transposed order (frames=True; codegen.frame_order), and torch's dense SDPA, alternating
call by call, and records which order codegen.attention_cpu_choice.choose_split takes. Printed
and saved (JSON under bench/results/): the times, each order's speedup over dense SDPA, the
choice and its loss (its time over the faster order's, minus 1), and the cost model's estimate of the
chosen order (cost_models, profile "cpu") over its measured time.

Head kinds (W = patches a frame side, so r = +-W is the patch above / below):
  temporal      the same patch and the ones above and below it in every frame (width 2): what
                sparsec.tune fits to bench/end_to_end.py's temporal heads;
  same_patch    the same patch in every frame (width 1);
  near_frames   the same patch in the two frames before and after (width 2);
  local         neighbours in the query's own frame (rows -2W..2W, width 2): no frame stride to use.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import _time_ms, device_name, write_record  # noqa: E402

from sparsec import patterns as P  # noqa: E402
from sparsec.codegen.attention_cpu import cpu_attention  # noqa: E402
from sparsec.codegen.attention_cpu_choice import choose_split  # noqa: E402
from sparsec.codegen.frame_order import FramesTransposed  # noqa: E402
from sparsec.cost_models.attention_cost import AttentionShape, attention_work, price_attention  # noqa: E402
from sparsec.cost_models.hardware import get_profile  # noqa: E402

GEOMETRIES = ((8, 256), (16, 256), (4, 1024), (32, 64))  # (frames T, patches a frame F)
KINDS = ("temporal", "same_patch", "near_frames", "local")
HEADS = 4
HEAD_DIM = 64


def head_pattern(kind: str, frames: int, frame: int) -> P.Pattern:
    side = math.isqrt(frame)
    every_frame = range(-frames + 1, frames)
    if kind == "temporal":
        return P.MultiDiagonal([k * frame + r for k in every_frame for r in (-side, 0, side)], 2)
    if kind == "same_patch":
        return P.MultiDiagonal([k * frame for k in every_frame], 1)
    if kind == "near_frames":
        return P.MultiDiagonal([k * frame for k in range(-2, 3)], 2)
    if kind == "local":
        return P.MultiDiagonal([r * side for r in range(-2, 3)], 2)
    raise ValueError(f"unknown head kind {kind!r}")


def measure_case(frames: int, frame: int, kind: str, causal: bool, threads: int, min_seconds: float) -> dict:
    S = frames * frame
    q, k, v = (torch.randn(1, HEADS, S, HEAD_DIM) for _ in range(3))
    pattern = head_pattern(kind, frames, frame)
    patterns = (pattern,) * HEADS
    scale = HEAD_DIM ** -0.5
    ways = {order: (lambda flag=flag: cpu_attention(q, k, v, patterns, causal=causal, scale=scale, frames=flag))
            for order, flag in (("natural", False), ("transposed", True))}
    ways["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    times = _time_ms(ways, "cpu", min_seconds)
    _, parts = choose_split(pattern, S, S, causal, rows=HEADS, width=2 * HEAD_DIM, threads=threads, native=False)
    chosen = "transposed" if isinstance(parts[0], FramesTransposed) else "natural"
    best = min(times["natural"], times["transposed"])
    shape = AttentionShape(batch=1, num_heads=HEADS, num_kv_heads=HEADS, q_len=S, kv_len=S, head_dim=HEAD_DIM,
                           value_dim=HEAD_DIM, dtype="f32", causal=causal)
    # priced on torch's kernel, as timed (the executor's choice may run the pattern natively)
    work = attention_work(patterns, shape, block_m=None, executor="cpu", native=False)
    estimated_ms = price_attention(work, get_profile("cpu")).seconds * 1e3
    return {"threads": threads, "frames": frames, "frame": frame, "S": S, "kind": kind, "causal": causal,
            "density": pattern.density(S, S, causal=causal), "pattern": repr(pattern),
            "natural_ms": times["natural"], "transposed_ms": times["transposed"], "sdpa_ms": times["sdpa"],
            "natural_vs_sdpa": times["sdpa"] / times["natural"],
            "transposed_vs_sdpa": times["sdpa"] / times["transposed"],
            "chosen": chosen, "chosen_parts": len(parts), "loss": times[chosen] / best - 1,
            "estimated_ms": estimated_ms, "estimated_vs_chosen": estimated_ms / times[chosen]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 frames of 256 patches only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-seconds", type=float, default=0.5, help="timing per case and way")
    parser.add_argument("--output", default=None, help="JSON path (default: bench/results/cpu_frames_<date>.json)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    geometries = GEOMETRIES[:1] if args.quick else GEOMETRIES
    rows = [measure_case(frames, frame, kind, causal, args.threads, args.min_seconds)
            for frames, frame in geometries for kind in KINDS for causal in (False, True)]
    table = Table(title=f"CPU executor: natural or frame-transposed order ({device_name('cpu')}, {args.threads} "
                        f"threads, {HEADS} heads, D={HEAD_DIM}, fp32)")
    for column in ("T x F", "kind", "causal", "density", "natural ms", "transposed ms", "SDPA ms",
                   "natural vs SDPA", "transposed vs SDPA", "chosen", "loss", "estimate / chosen"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(f"{r['frames']} x {r['frame']}", r["kind"], str(r["causal"]), f"{r['density']:.3f}",
                      f"{r['natural_ms']:.1f}", f"{r['transposed_ms']:.1f}", f"{r['sdpa_ms']:.1f}",
                      f"{r['natural_vs_sdpa']:.2f}x", f"{r['transposed_vs_sdpa']:.2f}x", r["chosen"],
                      f"{100 * r['loss']:.1f}%", f"{r['estimated_vs_chosen']:.2f}")
    console = Console(width=170)
    console.print(table)
    mean_loss = sum(r["loss"] for r in rows) / len(rows)
    worst = max(rows, key=lambda r: r["loss"])
    console.print(f"the choice: mean loss {100 * mean_loss:.1f}%, worst {100 * worst['loss']:.1f}% "
                  f"({worst['frames']} x {worst['frame']} {worst['kind']}, causal {worst['causal']})")
    log_errors = [math.log(r["estimated_vs_chosen"]) for r in rows]
    estimate_error = {"geometric_mean_ratio": math.exp(sum(log_errors) / len(rows)),
                      "rms_log_error": math.sqrt(sum(e * e for e in log_errors) / len(rows))}
    console.print(f"the cost model (profile 'cpu') against the chosen order: estimate / measured "
                  f"{estimate_error['geometric_mean_ratio']:.2f} (geometric mean), rms log error "
                  f"{estimate_error['rms_log_error']:.2f}")
    path = write_record("cpu_frames", "cpu", {"threads": args.threads, "heads": HEADS, "head_dim": HEAD_DIM,
                                              "mean_loss": mean_loss, "estimate_error": estimate_error,
                                              "rows": rows}, output=args.output)
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
