"""Decode-sized forward passes of a pruned LLM MLP stack: sparsec against eager and Inductor.

    python bench/decode.py --quick                        # CPU: 1 block, 1 and 8 tokens, < 2 minutes
    python bench/decode.py                                # 2 blocks of Llama-2-7B-shaped SwiGLU MLPs
    python bench/decode.py --prune 2:4 density:0.5 --tokens 1 4

The model: `--blocks` SwiGLU MLPs as in Llama (gate and up projections dim -> hidden, a down
projection hidden -> dim, SiLU, a residual; random weights), pruned by sparsec.prune (magnitude)
to each spec in turn: N:M ("2:4"), scattered zeros at a kept density ("density:0.5", the
unstructured 50% of Wanda / SparseGPT) or 64 x 64 blocks ("block64:0.5"). For each spec and token
count (a decode step of a batch of that many sequences, or a short prefill), on the pruned model:
eager PyTorch (dense kernels on the zeros), torch.compile with Inductor, and torch.compile with
backend="sparsec" (weight_sparsity "auto": the cost model picks dense or a sparse kernel per layer
at the token count). Times interleaved call by call (bench/attention.py's timing), speedups over
eager and Inductor, each output's relative L2 error against eager's, and the kernels sparsec chose.
Rich tables; JSON (device, versions, date, command, every figure) under bench/results/ unless
--no-save.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import sparsec
from sparsec.dump import recording
from sparsec.ir.ops import Linear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import DTYPES, _time_ms, add_device_options, write_rows  # noqa: E402  (shared with the kernel benchmarks)
from end_to_end import _prune_spec, _rel_l2, check_prune_specs  # noqa: E402

SPECS = ("2:4", "density:0.5", "density:0.3", "block64:0.5")


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return x + self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def mlp_stack(dim: int, hidden: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(*(SwiGLU(dim, hidden) for _ in range(blocks))).eval()


def run_spec(spec_text: str, args, console: Console) -> list[dict]:
    device, dtype = args.device, DTYPES[args.dtype]
    torch.manual_seed(0)
    model = mlp_stack(args.dim, args.hidden, args.blocks)
    sparsec.prune(model, _prune_spec(spec_text))
    model = model.to(device, dtype)
    rows = []
    for tokens in args.tokens:
        torch._dynamo.reset()
        x = torch.randn(tokens, args.dim, device=device, dtype=dtype)
        variants = {"eager": model, "inductor": torch.compile(model, backend="inductor", dynamic=False),
                    "sparsec": torch.compile(model, backend="sparsec", dynamic=False,
                                             options={"weight_sparsity": args.weight_sparsity})}
        with torch.no_grad():
            reference = model(x)
            with recording() as records:
                errors = {name: _rel_l2(variant(x), reference) for name, variant in variants.items()}
            kernels = dict(Counter(op.kernel for r in records if r.final_ir is not None
                                   for op in r.final_ir.ops_of(Linear)))
            ms = _time_ms({name: (lambda v=variant: v(x)) for name, variant in variants.items()}, device,
                          args.min_seconds)
        for name in variants:
            rows.append({"prune": spec_text, "tokens": tokens, "variant": name, "ms": ms[name],
                         "speedup_vs_eager": ms["eager"] / ms[name], "speedup_vs_inductor": ms["inductor"] / ms[name],
                         "rel_l2_error_vs_eager": errors[name],
                         "linear_kernels": kernels if name == "sparsec" else None})
        console.print(f"  {spec_text}, {tokens} tokens: sparsec {ms['eager'] / ms['sparsec']:.2f}x eager, "
                      f"{ms['inductor'] / ms['sparsec']:.2f}x Inductor; kernels {kernels}")
    return rows


def print_table(rows: list[dict], title: str, console: Console) -> None:
    table = Table(title=title)
    for column in ("prune", "tokens", "variant", "ms", "vs eager", "vs inductor", "rel. L2 error", "sparsec kernels"):
        table.add_column(column, justify="left" if column in ("prune", "variant", "sparsec kernels") else "right")
    for r in rows:
        kernels = ", ".join(f"{k} x{n}" for k, n in (r["linear_kernels"] or {}).items())
        table.add_row(r["prune"], str(r["tokens"]), r["variant"], f"{r['ms']:.3f}", f"{r['speedup_vs_eager']:.2f}x",
                      f"{r['speedup_vs_inductor']:.2f}x", f"{r['rel_l2_error_vs_eager']:.1e}", kernels,
                      style="green" if r["variant"] == "sparsec" and r["speedup_vs_inductor"] > 1.05 else None)
    console.print(table)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_options(parser)
    parser.add_argument("--quick", action="store_true", help="CPU, one block of 1024 -> 2816, 1 and 8 tokens")
    parser.add_argument("--prune", nargs="+", default=None, help=f"sparsec.prune specs (default: {' '.join(SPECS)})")
    parser.add_argument("--tokens", nargs="+", type=int, default=None, help="default: 1 4 16 128")
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=11008)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--weight-sparsity", choices=("auto", "always"), default="auto",
                        help="sparsec's option: auto (the cost model decides per layer) or always (its sparse kernels)")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="CPU: time each point at least this long")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--output", default=None, help="JSON path (default: bench/results/decode_<device>_<date>.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.device = "cpu"
        args.dim, args.hidden, args.blocks = 1024, 2816, 1
        args.tokens = args.tokens or [1, 8]
        args.prune = args.prune or ["2:4", "density:0.5"]
        args.min_seconds = min(args.min_seconds, 0.3)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.tokens = args.tokens or [1, 4, 16, 128]
    args.prune = args.prune or list(SPECS)
    check_prune_specs(parser, args.prune)
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    console = Console(width=160)
    console.print(f"{args.blocks} SwiGLU blocks {args.dim} -> {args.hidden} -> {args.dim}, {args.dtype}, on {args.device}")
    rows = [row for spec in args.prune for row in run_spec(spec, args, console)]
    print_table(rows, "pruned MLP stack: sparsec against eager and Inductor", console)
    if not args.no_save:
        path = write_rows("decode", __file__, args, rows, argv)
        console.print(f"saved {path}")


if __name__ == "__main__":
    main()
