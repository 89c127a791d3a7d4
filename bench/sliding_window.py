"""Sliding-window attention (Mistral, Gemma 2 / 3, GPT-OSS layers): sparsec running the mask's
band (mask rule "band", sparsec/key_padding.py) against SDPA with the mask, which computes every
pair and drops all but the band.

    python bench/sliding_window.py --quick            # CPU: S 1024 and 2048, window 256, < 1 minute
    python bench/sliding_window.py                    # CPU: S 1024-4096, windows 256-1024, 8 heads, D 64
    python bench/sliding_window.py --device cuda      # GPU (needs mask_bands "on" in models): S 4K-32K,
                                                      # windows 1024 / 4096, 32 heads (8 kv), D 128, bf16
    python bench/sliding_window.py --model gemma3     # also a transformers Gemma 3 text model: Inductor
                                                      # against sparsec (Inductor inside), whole forward
    python bench/sliding_window.py --model gemma2     # the same with Gemma 2 (soft-capped logits)
    python bench/sliding_window.py --model gpt_oss    # the same with GPT-OSS (attention sinks)

Each row is one (S, window, padding) point, timed as the compiled model calls it (the
sparsec::attention op with Dense heads under rule "band", bench/attention.py's interleaved timing):

  sdpa_masked   torch SDPA with the (B, 1, S, S) bool mask transformers builds for the window
  sparsec_band  the op with the same mask: it reads the band from the mask and runs it as a
                pattern (Window) on each row's kept keys; the mask is read on every call here
                (in a model the layers of a graph that take one mask node read it once)
  band_only     sparsec.attention with the band's pattern and no mask: the kernel alone, so
                band_only / sparsec_band is what reading the mask costs

The band's output is checked against SDPA with the mask. Prints a table with speedups; JSON
(device, versions, date, command, every figure) under bench/results/ unless --no-save.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import sparsec
from sparsec import patterns as P
from sparsec.key_padding import band_pattern
from sparsec.ops import attention as attention_op
from sparsec.ops import patterns_to_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import DTYPES, _max_rel_error, _time_ms, add_device_options, write_rows  # noqa: E402


def band_mask(S: int, window: int, lengths: list[int], device: str, side: str = "right") -> torch.Tensor:
    """(B, 1, S, S) bool as transformers' sliding-window causal mask: query i keeps the `window`
    keys up to its own, of its row's `length` real tokens (padding on the right: j < length; on
    the left: j >= S - length, as batched generation pads)."""
    i, j = torch.arange(S, device=device)[:, None], torch.arange(S, device=device)[None, :]
    band = (j <= i) & (j > i - window)
    return torch.stack([band & ((j < n) if side == "right" else (j >= S - n)) for n in lengths])[:, None]


def _inputs(args, S: int):
    g = torch.Generator().manual_seed(S)
    dtype = DTYPES[args.dtype]
    shapes = [(args.batch, args.heads, S, args.head_dim)] + [(args.batch, args.kv_heads, S, args.head_dim)] * 2
    return tuple(torch.randn(shape, generator=g).to(args.device, dtype) for shape in shapes)


def _sdpa(q, k, v, mask, scale):
    group = q.shape[1] // k.shape[1]  # transformers repeats the kv heads before a masked SDPA call
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def run_layers(args, console: Console) -> list[dict]:
    rows = []
    dense = patterns_to_json((P.Dense(),) * args.heads)
    for S in args.seq:
        q, k, v = _inputs(args, S)
        scale = 1.0 / math.sqrt(args.head_dim)
        for window in args.windows:
            if window >= S:
                continue
            for padding in args.padding:
                lengths = [S] + [S - padding] * (args.batch - 1)
                mask = band_mask(S, window, lengths, args.device, args.pad_side)
                band = band_pattern(window - 1, 0, S)
                fns = {
                    "sdpa_masked": lambda: _sdpa(q, k, v, mask, scale),
                    "sparsec_band": lambda: attention_op(q, k, v, mask, scale, False, dense, 0, 0,
                                                                           "bench", "band"),
                    "band_only": lambda: sparsec.attention(q, k, v, band, causal=True, scale=scale),
                }
                error = _max_rel_error(fns["sparsec_band"](), fns["sdpa_masked"]())
                ms = _time_ms(fns, args.device, args.min_seconds)
                density = band.density(S, S, causal=True)
                row = {"seq": S, "window": window, "padding": padding, "pad_side": args.pad_side, "batch": args.batch,
                       "band_density_of_causal": density, "max_rel_error": error,
                       **{f"{name}_ms": t for name, t in ms.items()},
                       "speedup": ms["sdpa_masked"] / ms["sparsec_band"],
                       "mask_reading_share": 1.0 - ms["band_only"] / ms["sparsec_band"]}
                rows.append(row)
                console.print(f"  S {S}, window {window}, padding {padding}: masked SDPA {ms['sdpa_masked']:.2f} ms, "
                              f"sparsec band {ms['sparsec_band']:.2f} ms ({row['speedup']:.2f}x), band alone "
                              f"{ms['band_only']:.2f} ms, error {error:.1e}")
    return rows


def _gemma3(args, S: int, window: int):
    """transformers' Gemma 3 text model: five sliding layers to one full layer, SDPA attention."""
    import transformers

    config = transformers.Gemma3TextConfig(
        vocab_size=256, hidden_size=args.heads * args.head_dim // 2, intermediate_size=args.heads * args.head_dim,
        num_hidden_layers=6, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, sliding_window=window, max_position_embeddings=2 * S,
        layer_types=["sliding_attention"] * 5 + ["full_attention"], attn_implementation="sdpa")
    return transformers.Gemma3TextModel(config), "gemma3_text", 5


def _gemma2(args, S: int, window: int):
    """transformers' Gemma 2: sliding and full layers in turn, attention logits soft-capped at 50 (its
    eager attention, the one that caps: SDPA cannot; sparsec matches it with the cap)."""
    import transformers

    config = transformers.Gemma2Config(
        vocab_size=256, hidden_size=args.heads * args.head_dim // 2, intermediate_size=args.heads * args.head_dim,
        num_hidden_layers=6, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, sliding_window=window, max_position_embeddings=2 * S,
        layer_types=["sliding_attention", "full_attention"] * 3, attn_logit_softcapping=50.0,
        final_logit_softcapping=None, attn_implementation="eager")
    return transformers.Gemma2Model(config), "gemma2", 3


def _gpt_oss(args, S: int, window: int):
    """transformers' GPT-OSS: sliding and full layers in turn, a learned sink logit a head (its eager
    attention: SDPA has no sinks; sparsec matches them), 4 experts, 2 a token."""
    import transformers

    config = transformers.GptOssConfig(
        vocab_size=256, hidden_size=args.heads * args.head_dim // 2, intermediate_size=args.heads * args.head_dim // 2,
        num_hidden_layers=6, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, sliding_window=window, max_position_embeddings=2 * S, num_local_experts=4,
        num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"] * 3, attn_implementation="eager")
    model = transformers.GptOssModel(config)
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.sinks.normal_(0, 2)
    return model, "gpt_oss", 3


MODELS = {"gemma3": _gemma3, "gemma2": _gemma2, "gpt_oss": _gpt_oss}


def run_model(args, console: Console) -> list[dict]:
    """A transformers model with sliding layers of `window` (random weights; MODELS): Inductor against
    sparsec with mask_bands "on" (Inductor inside), the whole forward."""
    rows = []
    for S in args.seq:
        window = args.windows[0]
        torch.manual_seed(0)
        model, name, sliding = MODELS[args.model](args, S, window)
        model = model.eval().to(args.device, DTYPES[args.dtype])
        ids = torch.randint(0, 256, (args.batch, S), device=args.device)
        variants, first = {}, {}
        with torch.no_grad():
            reference = model(ids, use_cache=False).last_hidden_state
            for variant, backend, options in (("inductor", "inductor", None),
                                              ("sparsec", "sparsec", {"mask_bands": "on"})):
                torch._dynamo.reset()
                compiled = torch.compile(model, backend=backend, options=options)
                start = time.perf_counter()
                out = compiled(ids, use_cache=False).last_hidden_state
                first[variant] = time.perf_counter() - start
                variants[variant] = (lambda c=compiled: c(ids, use_cache=False), _max_rel_error(out, reference))
            ms = _time_ms({v: fn for v, (fn, _) in variants.items()}, args.device, args.min_seconds)
        row = {"model": name, "seq": S, "window": window, "layers": 6, "sliding_layers": sliding,
               **{f"{v}_ms": t for v, t in ms.items()},
               **{f"{v}_rel_error": err for v, (_, err) in variants.items()},
               **{f"{v}_first_call_s": t for v, t in first.items()},
               "speedup_vs_inductor": ms["inductor"] / ms["sparsec"]}
        rows.append(row)
        console.print(f"  {name}, S {S}, window {window}: Inductor {ms['inductor']:.1f} ms, sparsec "
                      f"{ms['sparsec']:.1f} ms ({row['speedup_vs_inductor']:.2f}x), "
                      f"error {row['sparsec_rel_error']:.1e}")
    return rows


def print_table(rows: list[dict], console: Console) -> None:
    table = Table(title="sliding-window attention: sparsec runs the band, SDPA the whole masked square")
    for name in ("S", "window", "padding", "band / causal", "SDPA masked ms", "sparsec band ms", "speedup",
                 "band alone ms", "mask reading", "max rel err"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(str(r["seq"]), str(r["window"]), str(r["padding"]), f"{r['band_density_of_causal']:.1%}",
                      f"{r['sdpa_masked_ms']:.2f}", f"{r['sparsec_band_ms']:.2f}", f"{r['speedup']:.2f}x",
                      f"{r['band_only_ms']:.2f}", f"{r['mask_reading_share']:.0%}", f"{r['max_rel_error']:.1e}")
    console.print(table)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_options(parser)
    parser.add_argument("--quick", action="store_true", help="CPU, S 1024 and 2048, window 256")
    parser.add_argument("--seq", nargs="+", type=int, default=None, help="sequence lengths")
    parser.add_argument("--windows", nargs="+", type=int, default=None, help="window sizes (keys a query keeps)")
    parser.add_argument("--padding", nargs="+", type=int, default=[0],
                        help="padding of every batch row but the first")
    parser.add_argument("--pad-side", choices=("right", "left"), default="right",
                        help="where the padding goes (left: transformers' batched generation)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=None, help="default 8 on CPU, 32 on CUDA")
    parser.add_argument("--kv-heads", type=int, default=None, help="default: heads on CPU, heads / 4 on CUDA")
    parser.add_argument("--head-dim", type=int, default=None, help="default 64 on CPU, 128 on CUDA")
    parser.add_argument("--model", choices=tuple(MODELS), default=None,
                        help="also time a whole model (gemma2: soft-capped attention logits; gpt_oss: sinks)")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="CPU: time each point at least this long")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--output", default=None,
                        help="JSON path (default: bench/results/sliding_window_<device>_<date>.json)")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        args.device, args.seq, args.windows = "cpu", [1024, 2048], [256]
        args.min_seconds = min(args.min_seconds, 0.5)
    gpu = args.device == "cuda"
    args.seq = args.seq or ([4096, 8192, 16384, 32768] if gpu else [1024, 2048, 4096])
    args.windows = args.windows or ([1024, 4096] if gpu else [256, 1024])
    args.heads = args.heads or (32 if gpu else 8)
    args.kv_heads = args.kv_heads or (args.heads // 4 if gpu else args.heads)
    args.head_dim = args.head_dim or (128 if gpu else 64)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    if any(w < 1 for w in args.windows) or any(p < 0 for p in args.padding):
        parser.error("--windows must be positive and --padding non-negative")
    if any(p >= min(args.seq) for p in args.padding) or (args.batch == 1 and any(args.padding)):
        parser.error("--padding needs --batch > 1 (the first row is never padded) and must be below every --seq")
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    console = Console(width=170)
    console.print(f"sliding-window attention: {args.heads} heads ({args.kv_heads} kv), D {args.head_dim}, {args.dtype} "
                  f"on {args.device}, batch {args.batch}")
    rows = run_layers(args, console)
    print_table(rows, console)
    if args.model:
        rows += run_model(args, console)
    if not args.no_save:
        console.print(f"saved {write_rows('sliding_window', __file__, args, rows, argv)}")


if __name__ == "__main__":
    main()
