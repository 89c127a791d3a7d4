"""Greedy generation with a static KV cache on a pruned Llama-shaped model (HF transformers):
sparsec against eager and Inductor.

    python bench/generate.py --quick                     # CPU: a small Llama, 2:4, < 3 minutes
    python bench/generate.py                             # 4 layers of a 2048-wide Llama, 2:4 and 50% scattered
    python bench/generate.py --prune 2:4 --new-tokens 32 --prompt 64

The model: transformers' LlamaForCausalLM from a config (random weights; `--dim`, `--hidden`,
`--layers`, `--heads`, `--kv-heads`, `--vocab`), its decoder layers' linear layers pruned by
sparsec.prune to each spec in turn (the LM head stays dense). For each spec: `generate` with
`cache_implementation="static"` (the cache is written in place, the way HF recommends compiling
generation) on eager PyTorch, with the model's forward compiled by Inductor, and compiled with
backend="sparsec" (weight_sparsity "auto": the cost model picks dense or a sparse kernel per layer
and token count; prefill and decoding steps are separate graphs). Each variant runs
`generate(prompt, max_new_tokens=N)` and `max_new_tokens=1`, interleaved call by call
(bench/attention.py's timing); a decoding step costs the difference over N - 1 tokens. Also:
whether each variant's greedy tokens equal eager's, the first call's seconds (compilation), and
the kernels sparsec chose in the decoding graph. Rich table; JSON (device, versions, date,
command, every figure) under bench/results/ unless --no-save.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import sparsec
from sparsec.dump import recording
from sparsec.ir.ops import Linear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import DTYPES, _time_ms, add_device_options, write_rows  # noqa: E402  (shared with the kernel benchmarks)
from end_to_end import _prune_spec, check_prune_specs  # noqa: E402

SPECS = ("2:4", "density:0.5")
VARIANTS = ("eager", "inductor", "sparsec")


def llama(args):
    try:
        import transformers
    except ImportError:
        sys.exit("bench/generate.py needs transformers (pip install transformers)")
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.prompt + args.new_tokens, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _generate(model, prompt, new_tokens: int):
    return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          cache_implementation="static", pad_token_id=0)


def _variant(model, name: str, weight_sparsity: str):
    """The model with its forward as the variant runs it (generate calls forward each step)."""
    if name != "eager":
        options = {"options": {"weight_sparsity": weight_sparsity}} if name == "sparsec" else {}
        model.forward = torch.compile(model.forward, backend=name, **options)
    return model


def run_spec(spec_text: str, args, console: Console) -> list[dict]:
    device, dtype = args.device, DTYPES[args.dtype]
    base = llama(args)
    sparsec.prune(base, _prune_spec(spec_text), filter=lambda name, _: ".layers." in f".{name}.")
    base = base.to(device, dtype)
    prompt = torch.randint(1, args.vocab, (1, args.prompt), device=device)
    torch._dynamo.reset()
    models, first_call_s, tokens, kernels = {}, {}, {}, {}
    with torch.no_grad():
        for name in VARIANTS:
            model = _variant(_clone(base), name, args.weight_sparsity)
            with recording() as records:
                start = time.perf_counter()
                tokens[name] = _generate(model, prompt, args.new_tokens)[0, args.prompt:].tolist()
                first_call_s[name] = time.perf_counter() - start
            if name == "sparsec":  # the decoding graph: the one with a single token row
                decode = [r for r in records if r.final_ir is not None and _token_rows(r) == 1]
                kernels = dict(Counter(op.kernel for r in decode for op in r.final_ir.ops_of(Linear)))
            models[name] = model
        fns = {}
        for name, model in models.items():
            fns[(name, args.new_tokens)] = lambda m=model: _generate(m, prompt, args.new_tokens)
            fns[(name, 1)] = lambda m=model: _generate(m, prompt, 1)
        ms = _time_ms(fns, device, args.min_seconds)
    rows = []
    for name in VARIANTS:
        step_ms = (ms[(name, args.new_tokens)] - ms[(name, 1)]) / max(1, args.new_tokens - 1)
        rows.append({"prune": spec_text, "variant": name, "generate_ms": ms[(name, args.new_tokens)],
                     "prefill_and_one_token_ms": ms[(name, 1)], "decode_step_ms": step_ms,
                     "first_call_s": first_call_s[name], "tokens_equal_eager": tokens[name] == tokens["eager"],
                     "linear_kernels": kernels if name == "sparsec" else None})
    steps = {r["variant"]: r["decode_step_ms"] for r in rows}
    for r in rows:
        r["decode_speedup_vs_eager"] = steps["eager"] / r["decode_step_ms"]
        r["decode_speedup_vs_inductor"] = steps["inductor"] / r["decode_step_ms"]
    console.print(f"  {spec_text}: decoding step sparsec {steps['sparsec']:.1f} ms, Inductor {steps['inductor']:.1f} ms, "
                  f"eager {steps['eager']:.1f} ms; kernels {kernels}")
    return rows


def _clone(model):
    import copy

    return copy.deepcopy(model)


def _token_rows(record) -> int | None:
    """Token rows of the graph's first linear layer (1 in a decoding step of one sequence)."""
    linears = record.final_ir.ops_of(Linear)
    if not linears:
        return None
    shape = linears[0].x.type.shape
    rows = 1
    for d in shape[:-1]:
        if not isinstance(d, int):
            return None
        rows *= d
    return rows


def print_table(rows: list[dict], title: str, console: Console) -> None:
    table = Table(title=title)
    columns = ("prune", "variant", "step ms", "vs eager", "vs inductor", "generate ms", "first call s",
               "tokens = eager", "sparsec kernels (decode)")
    for column in columns:
        table.add_column(column, justify="left" if column in ("prune", "variant", "sparsec kernels (decode)") else "right")
    for r in rows:
        kernels = ", ".join(f"{k} x{n}" for k, n in (r["linear_kernels"] or {}).items())
        table.add_row(r["prune"], r["variant"], f"{r['decode_step_ms']:.2f}", f"{r['decode_speedup_vs_eager']:.2f}x",
                      f"{r['decode_speedup_vs_inductor']:.2f}x", f"{r['generate_ms']:.1f}", f"{r['first_call_s']:.1f}",
                      "yes" if r["tokens_equal_eager"] else "no", kernels,
                      style="green" if r["variant"] == "sparsec" and r["decode_speedup_vs_inductor"] > 1.05 else None)
    console.print(table)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_options(parser)
    parser.add_argument("--quick", action="store_true", help="CPU, 2 layers of a 1024-wide Llama, 2:4, 8 new tokens")
    parser.add_argument("--prune", nargs="+", default=None, help=f"sparsec.prune specs (default: {' '.join(SPECS)})")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated (at least 2)")
    parser.add_argument("--weight-sparsity", choices=("auto", "always"), default="auto",
                        help="sparsec's option: auto (the cost model decides per layer) or always (its sparse kernels)")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="CPU: time each point at least this long")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--output", default=None, help="JSON path (default: bench/results/generate_<device>_<date>.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.device = "cpu"
        args.dim, args.hidden, args.layers, args.heads, args.kv_heads, args.vocab = 1024, 2816, 2, 8, 2, 8192
        args.new_tokens = 8
        args.prune = args.prune or ["2:4"]
        args.min_seconds = min(args.min_seconds, 0.5)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.prune = args.prune or list(SPECS)
    if args.new_tokens < 2:
        parser.error(f"--new-tokens must be at least 2 (a decoding step is timed from the difference), "
                     f"got {args.new_tokens}")
    if args.dim % args.heads or args.heads % args.kv_heads:
        parser.error(f"--dim {args.dim} must be a multiple of --heads {args.heads}, and that of --kv-heads {args.kv_heads}")
    check_prune_specs(parser, args.prune)
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    console = Console(width=170)
    console.print(f"Llama {args.layers} layers, {args.dim} -> {args.hidden}, {args.heads} / {args.kv_heads} heads, "
                  f"vocab {args.vocab}, {args.dtype} on {args.device}: {args.prompt}-token prompt, "
                  f"{args.new_tokens} new tokens, static cache")
    rows = [row for spec in args.prune for row in run_spec(spec, args, console)]
    print_table(rows, "greedy generation with a static KV cache: sparsec against eager and Inductor", console)
    if not args.no_save:
        path = write_rows("generate", __file__, args, rows, argv)
        console.print(f"saved {path}")


if __name__ == "__main__":
    main()
