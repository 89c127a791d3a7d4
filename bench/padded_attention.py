"""Joint attention over [video, text] tokens with the text padded at the end (HunyuanVideo's layout):
sparsec's patterns under the padding mask against torch's SDPA with the mask.

    python bench/padded_attention.py --quick          # CPU: 2048 video + 128 text tokens, < 1 minute
    python bench/padded_attention.py                  # 4096 video + 256 text tokens (CPU: 8 heads, D 64)
    python bench/padded_attention.py --device cuda    # GPU: 16K video + 256 text, 24 heads, D 128, bf16

Each row is one pattern family (on the video tokens, at a target density) united with the text
columns (every query keeps the text keys), at several numbers of valid text tokens. Timed, as the
compiled model calls them (the sparsec::attention op, bench/attention.py's interleaved timing):

  sdpa_masked     torch SDPA with the (B, 1, 1, S) bool padding mask: what the layer costs dense
  sparsec_padded  the op with the patterns and the same mask: each row's kept keys
                  (sparsec/key_padding.py)
  sparsec_full    the op with the patterns and no mask (all text valid): the same kernels without
                  the padding, for its overhead

The padded output is checked against the dense path with the explicit mask (pattern masks and
padding) on the first two heads. Prints a table with speedups over the masked SDPA; JSON (device,
versions, date, command, every figure) under bench/results/ unless --no-save.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from sparsec import patterns as P
from sparsec.key_padding import patterns_at
from sparsec.ops import attention as attention_op
from sparsec.ops import patterns_to_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import (  # noqa: E402  (shared with the kernel benchmarks)
    DTYPES, _max_rel_error, _time_ms, add_device_options, pattern_for_density, write_rows)

FAMILIES = ("window", "multi_diagonal", "block_sparse")


def _patterns(family: str, video: int, total: int, density: float, heads: int, frame: int) -> tuple[P.Pattern, ...]:
    """One pattern for every head: the family on the video tokens (at `density` of their pairs)
    united with the text columns; block layouts are laid out over all `total` tokens."""
    text = P.Columns([(video, total)])
    if family == "block_sparse":
        base = pattern_for_density("block_sparse", total, density, causal=False, seed=0)
    else:
        base = pattern_for_density(family, video, density, causal=False, frame=frame)
    return (base | text,) * heads


def _inputs(args, total: int):
    g = torch.Generator().manual_seed(total)
    dtype = DTYPES[args.dtype]
    shape = (args.batch, args.heads, total, args.head_dim)
    return tuple(torch.randn(shape, generator=g).to(args.device, dtype) for _ in range(3))


def _check(q, k, v, mask, patterns, scale, got) -> float:
    """Max relative error of `got` on heads 0-1 against SDPA with pattern masks and padding explicit."""
    S = q.shape[2]
    keep = torch.stack([p.mask(S, S) for p in patterns[:2]]).to(q.device)[None] & mask
    want = torch.nn.functional.scaled_dot_product_attention(
        q[:, :2].float(), k[:, :2].float(), v[:, :2].float(), attn_mask=keep, scale=scale)
    return _max_rel_error(got[:, :2], want)


def run(args, console: Console) -> list[dict]:
    total = args.video + args.text
    q, k, v = _inputs(args, total)
    scale = 1.0 / math.sqrt(args.head_dim)
    rows = []
    for valid in args.valid:
        keep = torch.arange(total, device=args.device) < args.video + valid
        mask = keep[None, None, None, :].expand(args.batch, 1, 1, total)
        for family in args.families:
            for density in args.densities:
                patterns = _patterns(family, args.video, total, density, args.heads, args.frame)
                text = patterns_to_json(patterns)
                fns = {
                    "sdpa_masked": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                                             scale=scale),
                    "sparsec_padded": lambda: attention_op(q, k, v, mask, scale, False, text),
                    "sparsec_full": lambda: attention_op(q, k, v, None, scale, False, text),
                }
                error = _check(q, k, v, mask, patterns, scale, fns["sparsec_padded"]())
                ms = _time_ms(fns, args.device, args.min_seconds)
                kept = patterns_at(patterns[:1], total, args.video + valid)[0].density(total, args.video + valid)
                row = {"family": family, "target_density": density, "video": args.video, "text": args.text,
                       "valid_text": valid, "kept_density": kept, "max_rel_error": error,
                       **{f"{name}_ms": t for name, t in ms.items()},
                       "speedup_padded": ms["sdpa_masked"] / ms["sparsec_padded"],
                       "padding_overhead": ms["sparsec_padded"] / ms["sparsec_full"]}
                rows.append(row)
                console.print(f"  {family} {density:.0%} (valid text {valid}): masked SDPA {ms['sdpa_masked']:.2f} ms, "
                              f"sparsec padded {ms['sparsec_padded']:.2f} ms ({row['speedup_padded']:.2f}x), "
                              f"unpadded {ms['sparsec_full']:.2f} ms, error {error:.1e}")
    return rows


def print_table(rows: list[dict], console: Console) -> None:
    table = Table(title="padded joint attention: sparsec's patterns under the padding mask against SDPA with the mask")
    for name in ("family", "density", "valid text", "kept", "SDPA masked ms", "sparsec padded ms", "speedup",
                 "sparsec unpadded ms", "padded / unpadded", "max rel err"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(r["family"], f"{r['target_density']:.0%}", str(r["valid_text"]), f"{r['kept_density']:.1%}",
                      f"{r['sdpa_masked_ms']:.2f}", f"{r['sparsec_padded_ms']:.2f}", f"{r['speedup_padded']:.2f}x",
                      f"{r['sparsec_full_ms']:.2f}", f"{r['padding_overhead']:.2f}", f"{r['max_rel_error']:.1e}")
    console.print(table)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_options(parser)
    parser.add_argument("--quick", action="store_true", help="CPU, 2048 video + 128 text tokens, window at 25%%")
    parser.add_argument("--video", type=int, default=None, help="video tokens (default 4096 on CPU, 16384 on CUDA)")
    parser.add_argument("--text", type=int, default=256, help="text tokens after them, padded at the end")
    parser.add_argument("--valid", nargs="+", type=int, default=None, help="valid text tokens (default: text/4, text)")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--densities", nargs="+", type=float, default=[0.1, 0.25], help="of the video pairs")
    parser.add_argument("--frame", type=int, default=None, help="frame stride of multi_diagonal (default video / 16)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=None, help="default 8 on CPU, 24 on CUDA")
    parser.add_argument("--head-dim", type=int, default=None, help="default 64 on CPU, 128 on CUDA")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="CPU: time each point at least this long")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--output", default=None,
                        help="JSON path (default: bench/results/padded_attention_<device>_<date>.json)")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        args.device, args.video, args.text = "cpu", 2048, 128
        args.families, args.densities, args.min_seconds = ["window"], [0.25], min(args.min_seconds, 0.5)
    gpu = args.device == "cuda"
    args.video = args.video or (16384 if gpu else 4096)
    args.heads = args.heads or (24 if gpu else 8)
    args.head_dim = args.head_dim or (128 if gpu else 64)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.frame = args.frame or args.video // 16
    args.valid = args.valid or [args.text // 4, args.text]
    bad = [n for n in args.valid if not 0 <= n <= args.text]
    if bad:
        parser.error(f"--valid must be between 0 and --text {args.text}, got {bad}")
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    console = Console(width=170)
    console.print(f"{args.video} video + {args.text} text tokens, {args.heads} heads, D {args.head_dim}, {args.dtype} "
                  f"on {args.device}, batch {args.batch}")
    rows = run(args, console)
    print_table(rows, console)
    if not args.no_save:
        console.print(f"saved {write_rows('padded_attention', __file__, args, rows, argv)}")


if __name__ == "__main__":
    main()
