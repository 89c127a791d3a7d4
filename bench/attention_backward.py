"""Training through sparse attention: forward + backward of sparsec's attention op (its backward: the
Triton kernels of codegen/attention_triton_backward.py on CUDA, sparsec/attention_grads.py on CPU)
against torch's SDPA, dense and with the same pattern as a mask, and on CUDA FlexAttention.

    python bench/attention_backward.py --quick          # CPU: S 2048, a 10% window, < 1 minute
    python bench/attention_backward.py                  # CPU: S 2048 and 4096, window / a_shape / blocks
    python bench/attention_backward.py --device cuda    # GPU: S 4096 and 8192, 16 heads, D 128, bf16
    python bench/attention_backward.py --device cuda --no-flex   # the same without FlexAttention
    python bench/attention_backward.py --device cuda --kv-heads 4   # GQA: 4 kv heads for the 16 query heads

Each row is one pattern family (every head, causal, at a target density of the causal pairs) at
one length. Timed (bench/attention.py's interleaved timing), each a forward and the gradients of
q, k and v for a random output gradient:

  sdpa          torch SDPA, causal, dense: what the layer costs without patterns
  sdpa_masked   torch SDPA with the pattern as a (S, S) bool mask: the same weights without sparsec
  sparsec       the sparsec::attention op with the patterns (its forward kernels, its backward)
  flex          CUDA only (--no-flex skips it; CPU rows have no flex fields): flex_attention under
                torch.compile(dynamic=False) with a BlockMask from create_block_mask and bench/attention.py's
                mask_mod of the pattern. Built once per row outside the timing: the BlockMask's build
                (flex_build_s) and the first forward + backward, compiling both (flex_compile_s), are
                reported apart; a failure to build or compile is kept as the row's flex_error

and each one's peak memory above the inputs (CUDA: the allocator's peak; CPU: the peak resident
size of a fresh process over its second step, Linux only; --no-memory skips it). The gradients are checked
against sdpa_masked's. Rich table with the speedups (over flex where it ran); JSON (device, versions, date,
command, every figure) under bench/results/ unless --no-save.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from sparsec.attention_dispatch import causal_allowed
from sparsec.ops import patterns_to_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import (  # noqa: E402  (shared with the kernel benchmarks)
    DTYPES, _max_rel_error, _time_ms, add_device_options, flex_mask_mod, pattern_for_density, write_rows)

FAMILIES = ("window", "a_shape", "block_sparse")
VARIANTS = ("sdpa", "sdpa_masked", "sparsec")  # every device; "flex" joins them on CUDA (runs_flex)
# Dynamo recompiles flex_attention for each new (S, mask_mod code) and, past its recompile limit (8),
# would run it eagerly: slow and materialising the scores, timed as if compiled. Raised while building.
FLEX_RECOMPILE_LIMIT = 256


def _inputs(spec: dict):
    """q, k, v (requires grad) and the output gradient of one row's shape, seeded by S; k and v with
    spec["kv_heads"] heads (GQA where fewer than the query heads; default as many)."""
    g = torch.Generator().manual_seed(spec["S"])
    heads = (spec["heads"], spec.get("kv_heads") or spec["heads"], spec.get("kv_heads") or spec["heads"],
             spec["heads"])
    dtype = DTYPES[spec["dtype"]]
    q, k, v, grad = (torch.randn(1, h, spec["S"], spec["head_dim"], generator=g).to(spec["device"], dtype)
                     for h in heads)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), grad


def step(variant: str, spec: dict, q, k, v, grad) -> tuple[torch.Tensor, ...]:
    """One forward and backward of `variant`: the gradients of q, k and v."""
    scale = 1.0 / math.sqrt(spec["head_dim"])
    gqa = k.shape[1] != q.shape[1]
    if variant == "sdpa":
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    elif variant == "sdpa_masked":
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=spec["mask"], scale=scale,
                                                               enable_gqa=gqa)
    elif variant == "flex":
        out = spec["flex"](q, k, v, scale)
    else:
        out = torch.ops.sparsec.attention(q, k, v, None, scale, True, spec["patterns"])
    return torch.autograd.grad(out, (q, k, v), grad)


def runs_flex(args) -> bool:
    """FlexAttention's backward has no CPU implementation: CUDA only, unless --no-flex."""
    return args.device == "cuda" and not args.no_flex


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build_flex(pattern, spec: dict, q, k, v, grad) -> dict:
    """Compiles flex_attention on the pattern's BlockMask and sets spec["flex"] (q, k, v, scale) -> out,
    warmed up by one forward + backward, so the timing sees neither the build nor the compile. Returns
    the row's flex_build_s (create_block_mask, with its own compile the first time a shape is seen) and
    flex_compile_s (the first step: Dynamo, Inductor, the backward's compile), or flex_error: a failure
    here is reported, and the row goes on without flex."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    S, device = spec["S"], spec["device"]
    try:
        with torch._dynamo.config.patch(recompile_limit=FLEX_RECOMPILE_LIMIT):
            start = time.perf_counter()
            block_mask = create_block_mask(flex_mask_mod(pattern, S, True, q.device), None, None, S, S,
                                           device=q.device, _compile=True)
            _sync(device)
            build_s = time.perf_counter() - start
            compiled = torch.compile(flex_attention, dynamic=False)
            spec["flex"] = lambda q, k, v, scale: compiled(q, k, v, block_mask=block_mask, scale=scale,
                                                           enable_gqa=k.shape[1] != q.shape[1])
            start = time.perf_counter()
            step("flex", spec, q, k, v, grad)
            _sync(device)
    except Exception as e:  # report it, keep benchmarking the others
        spec.pop("flex", None)
        return {"flex_error": f"{type(e).__name__}: {e}"}
    return {"flex_build_s": build_s, "flex_compile_s": time.perf_counter() - start}


# A fresh process runs two steps and prints the second's peak resident size above what it held before
# (CPU memory): Linux's high-water mark (VmHWM), reset between them through /proc/self/clear_refs.
_PEAK_CHILD = """
import json, sys
sys.path.insert(0, {bench!r})
import torch
import attention_backward as bench
from sparsec import patterns as P
from sparsec.attention_dispatch import causal_allowed
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
heads = tuple(P.from_dict(d) for d in json.loads(spec["patterns"]))
q, k, v, grad = bench._inputs(spec)
if spec["variant"] == "sdpa_masked":
    spec["mask"] = heads[0].mask(spec["S"], spec["S"]) & causal_allowed(spec["S"], spec["S"])
def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
bench.step(spec["variant"], spec, q, k, v, grad)  # first: libraries loaded, kernels built, plans cached
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
bench.step(spec["variant"], spec, q, k, v, grad)
print((status("VmHWM") - before) / 1024)
"""


def peak_mb(variant: str, spec: dict) -> float | None:
    """Peak memory of one step above the inputs, in MB (None where it could not be measured: flex off
    CUDA, as the fresh process would have to rebuild and compile it)."""
    if spec["device"] == "cuda":
        q, k, v, grad = _inputs(spec)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(variant, spec, q, k, v, grad)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    if variant not in VARIANTS:
        return None
    child = {key: value for key, value in spec.items() if key not in ("mask", "flex")}
    child.update(variant=variant, threads=torch.get_num_threads())
    code = _PEAK_CHILD.format(bench=str(Path(__file__).resolve().parent))
    done = subprocess.run([sys.executable, "-c", code, json.dumps(child)], capture_output=True, text=True)
    if done.returncode != 0:
        return None
    return float(done.stdout.strip().splitlines()[-1])


def run(args, console: Console, on_row=None) -> list[dict]:
    """Every (length, family, density) row; on_row(rows so far) after each."""
    rows = []
    for S in args.lengths:
        for family in args.families:
            for density in args.densities:
                pattern = pattern_for_density(family, S, density, causal=True, seed=0)
                spec = {"S": S, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                        "dtype": args.dtype, "device": args.device,
                        "patterns": patterns_to_json((pattern,) * args.heads)}
                spec["mask"] = (pattern.mask(S, S) & causal_allowed(S, S)).to(args.device)
                q, k, v, grad = _inputs(spec)
                flex = build_flex(pattern, spec, q, k, v, grad) if runs_flex(args) else {}
                variants = VARIANTS + (("flex",) if "flex" in spec else ())
                fns = {name: (lambda name=name: step(name, spec, q, k, v, grad)) for name in variants}
                want = fns["sdpa_masked"]()
                errors = {name: max(_max_rel_error(a, b) for a, b in zip(fns[name](), want))
                          for name in ("sparsec", "flex") if name in fns}
                ms = _time_ms(fns, args.device, args.min_seconds)
                peaks = {name: peak_mb(name, spec) if args.memory else None for name in variants}
                row = {"family": family, "target_density": density, "S": S,
                       "kept_density": pattern.density(S, S, causal=True), "max_rel_grad_error": errors["sparsec"],
                       **{f"{name}_ms": t for name, t in ms.items()},
                       **{f"{name}_peak_mb": peak for name, peak in peaks.items()},
                       "speedup_over_sdpa": ms["sdpa"] / ms["sparsec"],
                       "speedup_over_masked": ms["sdpa_masked"] / ms["sparsec"], **flex}
                if "flex" in ms:
                    row.update(flex_max_rel_grad_error=errors["flex"], speedup_over_flex=ms["flex"] / ms["sparsec"])
                rows.append(row)
                if on_row is not None:
                    on_row(rows)
                console.print(f"  S {S} {family} {density:.0%}: SDPA {ms['sdpa']:.1f} ms, masked SDPA "
                              f"{ms['sdpa_masked']:.1f} ms, sparsec {ms['sparsec']:.1f} ms "
                              f"({row['speedup_over_sdpa']:.2f}x / {row['speedup_over_masked']:.2f}x), "
                              f"gradient error {errors['sparsec']:.1e}{_flex_summary(row)}")
    return rows


def _flex_summary(row: dict) -> str:
    """The progress line's flex part: its time and sparsec's speedup over it, or its error."""
    if "flex_error" in row:
        return f"; flex failed: {row['flex_error']}"
    if "flex_ms" not in row:
        return ""
    return (f"; flex {row['flex_ms']:.1f} ms ({row['speedup_over_flex']:.2f}x, built in {row['flex_build_s']:.1f} s, "
            f"compiled in {row['flex_compile_s']:.1f} s), gradient error {row['flex_max_rel_grad_error']:.1e}")


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _flex_cells(r: dict) -> list[str]:
    """flex ms, sparsec's speedup over it, its MB and gradient error; "failed" where it did not build."""
    if "flex_ms" not in r:
        return ["failed" if "flex_error" in r else "-"] + ["-"] * 3
    return [f"{r['flex_ms']:.1f}", f"{r['speedup_over_flex']:.2f}x", _mb(r["flex_peak_mb"]),
            f"{r['flex_max_rel_grad_error']:.1e}"]


def print_table(rows: list[dict], console: Console) -> None:
    """The flex columns only where some row tried flex (CUDA without --no-flex)."""
    flex = any("flex_ms" in r or "flex_error" in r for r in rows)
    table = Table(title="forward + backward: sparsec's attention op against SDPA (dense, and with the pattern's mask)"
                  + (" and FlexAttention" if flex else ""))
    columns = ("S", "family", "density", "kept", "SDPA ms", "masked ms", "sparsec ms", "vs SDPA", "vs masked",
               "SDPA MB", "masked MB", "sparsec MB", "grad err")
    for name in columns + (("flex ms", "vs flex", "flex MB", "flex err") if flex else ()):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(str(r["S"]), r["family"], f"{r['target_density']:.0%}", f"{r['kept_density']:.1%}",
                      f"{r['sdpa_ms']:.1f}", f"{r['sdpa_masked_ms']:.1f}", f"{r['sparsec_ms']:.1f}",
                      f"{r['speedup_over_sdpa']:.2f}x", f"{r['speedup_over_masked']:.2f}x",
                      _mb(r["sdpa_peak_mb"]), _mb(r["sdpa_masked_peak_mb"]), _mb(r["sparsec_peak_mb"]),
                      f"{r['max_rel_grad_error']:.1e}", *(_flex_cells(r) if flex else ()))
    console.print(table)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_options(parser)
    parser.add_argument("--quick", action="store_true", help="CPU, S 2048, a 10%% window")
    parser.add_argument("--lengths", nargs="+", type=int, default=None,
                        help="S (default 2048 4096 on CPU, 4096 8192 on CUDA)")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--densities", nargs="+", type=float, default=[0.1, 0.25], help="of the causal pairs")
    parser.add_argument("--heads", type=int, default=None, help="default 8 on CPU, 16 on CUDA")
    parser.add_argument("--kv-heads", type=int, default=None,
                        help="heads of k and v (GQA: fewer than --heads, dividing it); default as many as --heads")
    parser.add_argument("--head-dim", type=int, default=None, help="default 64 on CPU, 128 on CUDA")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="CPU: time each point at least this long")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak memory figures")
    parser.add_argument("--no-flex", action="store_true", help="CUDA: skip FlexAttention (never run on CPU)")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--output", default=None,
                        help="JSON path (default: bench/results/attention_backward_<device>_<date>.json)")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        args.device, args.lengths = "cpu", [2048]
        args.families, args.densities, args.min_seconds = ["window"], [0.1], min(args.min_seconds, 1.0)
    gpu = args.device == "cuda"
    args.lengths = args.lengths or ([4096, 8192] if gpu else [2048, 4096])
    args.heads = args.heads or (16 if gpu else 8)
    args.kv_heads = args.kv_heads or args.heads
    if args.kv_heads < 1 or args.heads % args.kv_heads:
        raise SystemExit(f"--kv-heads must divide --heads ({args.heads}), got {args.kv_heads}")
    args.head_dim = args.head_dim or (128 if gpu else 64)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    console = Console(width=170)
    kv = f" ({args.kv_heads} kv heads)" if args.kv_heads != args.heads else ""
    console.print(f"forward + backward, causal, {args.heads} heads{kv}, D {args.head_dim}, {args.dtype} "
                  f"on {args.device}")
    def save(rows: list[dict], complete: bool) -> Path:  # after each row too: a time limit keeps what ran
        path = write_rows("attention_backward", __file__, args, rows, argv, complete=complete)
        args.output = str(path)
        return path

    rows = run(args, console, on_row=None if args.no_save else lambda rows: save(rows, False))
    print_table(rows, console)
    if not args.no_save:
        console.print(f"saved {save(rows, True)}")


if __name__ == "__main__":
    main()
