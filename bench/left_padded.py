"""A left-padded batch (transformers' batched generation: row b's first p_b tokens are padding)
under a plan's causal patterns: sparsec runs each row's patterns on its own tokens, against torch's
SDPA with the padding mask, which is what such a call cost before (it ran dense with the mask).

    python bench/left_padded.py --quick          # CPU: S 2048, a_shape at 10%, < 1 minute
    python bench/left_padded.py                  # CPU: S 2048 and 4096, MInference's three families
    python bench/left_padded.py --device cuda    # GPU: S 8192 and 16384, 32 heads, D 128, bf16

Each row is one pattern family (every head, at a target density of the causal pairs) at one
length and one padding of the batch's rows (--pads: fractions of S, one a row). Timed, as the
compiled model calls them (the sparsec::attention op, bench/attention.py's interleaved timing):

  sdpa_masked       torch SDPA with the (B, 1, S, S) bool mask: the dense path with the mask
  sparsec_padded    the op with the patterns and the same mask, rule "causal:0" (a plan tuned on
                    prefill): each row's own tokens, from position 0 (sparsec/key_padding.py),
                    given the mask's reading as a compiled model gives each layer
  mask_read         that reading (sparsec::mask_layout), which a compiled model makes once a
                    forward for all the layers that take the mask
  sparsec_unpadded  the op with the patterns, causal, no mask: the same kernels on full rows

The padded output is checked against the explicit-mask reference on the first two heads of each
row. Prints a table with speedups over the masked SDPA; JSON (device, versions, date, command,
every figure) under bench/results/ unless --no-save.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from sparsec.attention_dispatch import causal_allowed
from sparsec.key_padding import patterns_at
from sparsec.ops import attention as attention_op
from sparsec.ops import mask_layout
from sparsec.ops import patterns_to_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import (  # noqa: E402  (shared with the kernel benchmarks)
    DTYPES, _max_rel_error, _time_ms, add_device_options, pattern_for_density, write_rows)

FAMILIES = ("a_shape", "vertical_slash", "block_sparse")


def left_padded_mask(S: int, pads: list[int], device) -> torch.Tensor:
    """(B, 1, S, S) bool: transformers' causal mask of a left-padded batch (query i of row b keeps
    keys pads[b] <= j <= i; its padding queries keep none)."""
    i, j = torch.arange(S, device=device)[:, None], torch.arange(S, device=device)[None, :]
    return torch.stack([(j <= i) & (j >= p) for p in pads])[:, None]


def _check(q, k, v, pads, patterns, scale, got) -> float:
    """Max relative error of `got` on heads 0-1 against SDPA on each row's own tokens with the
    patterns' explicit masks (the padding queries give 0)."""
    S, worst = q.shape[2], 0.0
    for b, p in enumerate(pads):
        n = S - p
        own = patterns_at(patterns[:2], n, n)
        keep = torch.stack([pattern.mask(n, n) for pattern in own]).to(q.device) & causal_allowed(n, n, q.device)
        want = torch.nn.functional.scaled_dot_product_attention(
            q[b:b + 1, :2, p:].float(), k[b:b + 1, :2, p:].float(), v[b:b + 1, :2, p:].float(), attn_mask=keep,
            scale=scale)
        worst = max(worst, _max_rel_error(got[b:b + 1, :2, p:], want))
        if p and float(got[b, :2, :p].abs().max()) != 0.0:
            return math.inf
    return worst


def run(args, console: Console) -> list[dict]:
    scale = 1.0 / math.sqrt(args.head_dim)
    rows = []
    for S in args.lengths:
        g = torch.Generator().manual_seed(S)
        shape = (len(args.pads), args.heads, S, args.head_dim)
        q, k, v = (torch.randn(shape, generator=g).to(args.device, DTYPES[args.dtype]) for _ in range(3))
        pads = [int(f * S) for f in args.pads]
        mask = left_padded_mask(S, pads, args.device)
        layout = mask_layout(mask, q, k)
        for family in args.families:
            for density in args.densities:
                patterns = (pattern_for_density(family, S, density, causal=True, seed=0),) * args.heads
                text = patterns_to_json(patterns)
                fns = {
                    "sdpa_masked": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                                             scale=scale),
                    "sparsec_padded": lambda: attention_op(q, k, v, mask, scale, False, text, mask_rule="causal:0",
                                                           mask_layout=layout),
                    "mask_read": lambda: mask_layout(mask, q, k),
                    "sparsec_unpadded": lambda: attention_op(q, k, v, None, scale, True, text),
                }
                error = _check(q, k, v, pads, patterns, scale, fns["sparsec_padded"]())
                ms = _time_ms(fns, args.device, args.min_seconds)
                row = {"family": family, "target_density": density, "S": S, "pads": pads,
                       "kept_density": patterns[0].density(S, S, causal=True), "max_rel_error": error,
                       **{f"{name}_ms": t for name, t in ms.items()},
                       "speedup_padded": ms["sdpa_masked"] / ms["sparsec_padded"],
                       "padded_over_unpadded": ms["sparsec_padded"] / ms["sparsec_unpadded"]}
                rows.append(row)
                console.print(f"  S {S} {family} {density:.0%} (pads {pads}): masked SDPA {ms['sdpa_masked']:.2f} ms, "
                              f"sparsec padded {ms['sparsec_padded']:.2f} ms ({row['speedup_padded']:.2f}x) + mask "
                              f"read {ms['mask_read']:.2f} ms once, unpadded {ms['sparsec_unpadded']:.2f} ms, "
                              f"error {error:.1e}")
    return rows


def print_table(rows: list[dict], console: Console) -> None:
    table = Table(title="left-padded batch: sparsec's patterns on each row's own tokens against SDPA with the mask")
    for name in ("S", "family", "density", "kept", "pads", "SDPA masked ms", "sparsec padded ms", "speedup",
                 "mask read ms", "sparsec unpadded ms", "padded / unpadded", "max rel err"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(str(r["S"]), r["family"], f"{r['target_density']:.0%}", f"{r['kept_density']:.1%}",
                      str(r["pads"]), f"{r['sdpa_masked_ms']:.2f}", f"{r['sparsec_padded_ms']:.2f}",
                      f"{r['speedup_padded']:.2f}x", f"{r['mask_read_ms']:.2f}", f"{r['sparsec_unpadded_ms']:.2f}",
                      f"{r['padded_over_unpadded']:.2f}", f"{r['max_rel_error']:.1e}")
    console.print(table)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_options(parser)
    parser.add_argument("--quick", action="store_true", help="CPU, S 2048, a_shape at 10%%")
    parser.add_argument("--lengths", nargs="+", type=int, default=None,
                        help="S (default 2048 4096 on CPU, 8192 16384 on CUDA)")
    parser.add_argument("--pads", nargs="+", type=float, default=[0.0, 0.25, 0.5],
                        help="each row's padding as a fraction of S, one a row (the batch)")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--densities", nargs="+", type=float, default=[0.1, 0.25], help="of the causal pairs")
    parser.add_argument("--heads", type=int, default=None, help="default 8 on CPU, 32 on CUDA")
    parser.add_argument("--head-dim", type=int, default=None, help="default 64 on CPU, 128 on CUDA")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="CPU: time each point at least this long")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--output", default=None,
                        help="JSON path (default: bench/results/left_padded_<device>_<date>.json)")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        args.device, args.lengths = "cpu", [2048]
        args.families, args.densities, args.min_seconds = ["a_shape"], [0.1], min(args.min_seconds, 0.5)
    gpu = args.device == "cuda"
    args.lengths = args.lengths or ([8192, 16384] if gpu else [2048, 4096])
    args.heads = args.heads or (32 if gpu else 8)
    args.head_dim = args.head_dim or (128 if gpu else 64)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    bad = [f for f in args.pads if not 0 <= f < 1]
    if bad:
        parser.error(f"--pads must be fractions of S in [0, 1), got {bad}")
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    console = Console(width=170)
    console.print(f"left-padded batch of {len(args.pads)} rows, {args.heads} heads, D {args.head_dim}, {args.dtype} "
                  f"on {args.device}")
    rows = run(args, console)
    print_table(rows, console)
    if not args.no_save:
        console.print(f"saved {write_rows('left_padded', __file__, args, rows, argv)}")


if __name__ == "__main__":
    main()
