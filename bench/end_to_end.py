"""End to end: the bundled video DiT with positional heads, tuned by sparsec.tune and compiled with
its plan, against eager PyTorch and torch.compile (Inductor).

    python bench/end_to_end.py --quick          # CPU: 2048 tokens, sparsec run eagerly, < 2 minutes
    python bench/end_to_end.py --device cpu     # CPU: 2048 tokens, Inductor too
    python bench/end_to_end.py --device cuda    # GPU: 16 frames of 32 x 32 patches (16K tokens), bf16
    python bench/end_to_end.py --prune block64:0.5   # the blocks' linear weights block-sparse too
    python bench/end_to_end.py --quick --joint-text 128   # [video, text] joint attention, text padded (HunyuanVideo)

The model (sparsec.models.tiny_dit, random weights) has self-attention heads with positional roles
(local, temporal, sink, content in turn, rotated per block: sparsec/models/positional_heads.py),
the structure trained video DiTs have. Steps:

  1. sparsec.tune on calibration inputs (seed 1) for this device's cost-model profile, timed;
  2. on fresh inputs (seed 2), every variant is timed (interleaved call by call on CPU, triton's
     do_bench on GPU; bench/attention.py's timing): eager, Inductor, sparsec without a plan (the exact dense path) and sparsec
     with the plan, the last two with sparsec's inner compiler (--inner, default Inductor);
  3. each variant's output against eager's on the fresh inputs: relative L2 error. The dense path
     must match eager to rounding; the plan's error is what its patterns cost end to end (its
     per-layer error on the calibration inputs is at most the budget).

With --prune the blocks' linear layers are magnitude-pruned first (sparsec.prune: N:M, 64 x 64
blocks at a density, or scattered zeros); every variant, eager included, runs the pruned model, and sparsec picks sparse
linear kernels where its cost model says they win (the table's notes list the kernels chosen).

Prints the plan's summary and a table of times, speedups over eager and over Inductor, errors and
first-call (compile) times; writes JSON (device, versions, date, command, every figure) under
bench/results/ unless --no-save.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import sparsec
from sparsec.cost_models.hardware import profile_for_device
from sparsec.dump import recording
from sparsec.ir.ops import Linear
from sparsec.models import TinyDiTConfig, example_inputs, tiny_dit, with_roles

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import DTYPES, _time_ms, add_device_options, device_name, write_record  # noqa: E402  (shared with the kernel benchmarks)

CPU_CONFIG = TinyDiTConfig(frames=8, height=32, width=32, dim=128, heads=4, depth=2)  # 2048 tokens, head_dim 32
GPU_CONFIG = TinyDiTConfig(frames=16, height=64, width=64, dim=1024, heads=16, depth=4, text_len=64,
                           text_dim=512)  # 16384 tokens, head_dim 64


def _rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30))


def _first_call_s(fn: Callable, device: str) -> float:
    """Seconds of the first call (compilation included)."""
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _plan_summary(plan: sparsec.Plan) -> list[dict]:
    rows = []
    for path, layer in plan.layers.items():
        families = sorted({type(p).__name__ for p in layer.patterns})
        rows.append({"layer": path, "q_len": layer.q_len, "kv_len": layer.kv_len, "families": families,
                     "density": statistics.mean(layer.density(h) for h in range(layer.num_heads)),
                     "groups": len(layer.head_groups), "tiles": list(layer.tiles), "error": layer.error,
                     "estimated_dense_us": layer.dense_seconds * 1e6, "estimated_sparse_us": layer.sparse_seconds * 1e6})
    return rows


def run(args) -> dict:
    device, dtype = args.device, DTYPES[args.dtype]
    config = with_roles(args.config)
    model, _ = tiny_dit(config)
    if args.prune:  # the blocks' linear layers (the eager reference is the pruned model too)
        sparsec.prune(model, args.prune, filter=lambda name, module: name.startswith("blocks."))
    model = model.to(device, dtype)
    calibration = example_inputs(config, seed=1, device=device, dtype=dtype)
    fresh = example_inputs(config, seed=2, device=device, dtype=dtype)
    target = profile_for_device(device)
    print(f"model: {config.frames} frames x {config.tokens_per_frame} tokens = {config.tokens} tokens, dim {config.dim}, "
          f"{config.heads} heads (roles {', '.join(config.head_roles)}), {config.depth} blocks, {args.dtype}, on {device}")
    if config.joint_text:
        print(f"joint attention over [video, {config.text_len} text tokens]; real text tokens: calibration "
              f"{calibration[3].tolist()}, fresh {fresh[3].tolist()}")

    start = time.perf_counter()
    plan = sparsec.tune(model, calibration, target=target, budget=args.budget, progress=not args.no_progress)
    tune_s = time.perf_counter() - start
    print(plan)
    print(f"tuned in {tune_s:.1f} s for target {plan.target}")

    inner = {"inner": args.inner}
    variants: dict[str, Callable] = {"eager": model}
    if not args.no_inductor:
        variants["inductor"] = torch.compile(model, backend="inductor")
    variants["sparsec dense"] = torch.compile(model, backend="sparsec", options=dict(inner))
    variants["sparsec plan"] = torch.compile(model, backend="sparsec", options={**inner, "plan": plan})
    with torch.no_grad():
        reference = model(*fresh)
        first_s, errors, linear_kernels = {}, {}, {}
        for name, variant in variants.items():
            with recording() as records:
                first_s[name] = _first_call_s(lambda: variant(*fresh), device)
            if name.startswith("sparsec"):
                linear_kernels[name] = dict(Counter(op.kernel for r in records if r.final_ir is not None
                                                    for op in r.final_ir.ops_of(Linear)))
            errors[name] = _rel_l2(variant(*fresh), reference)
        ms = _time_ms({name: (lambda v=variant: v(*fresh)) for name, variant in variants.items()}, device,
                      args.min_seconds)
    rows = [{"variant": name, "ms": ms[name], "speedup_vs_eager": ms["eager"] / ms[name],
             "speedup_vs_inductor": ms["inductor"] / ms[name] if "inductor" in ms else None,
             "rel_l2_error_vs_eager": errors[name], "first_call_s": first_s[name],
             "linear_kernels": linear_kernels.get(name)} for name in variants]
    return {"config": dataclasses.asdict(config), "prune": args.prune, "tune_seconds": tune_s,
            "plan_target": plan.target, "budget": args.budget, "layers": _plan_summary(plan), "rows": rows,
            "plan": plan.to_dict()}  # sparsec.Plan.from_dict(record["plan"]) gives it back


def print_table(result: dict, title: str) -> None:
    table = Table(title=title)
    for column in ("variant", "ms", "vs eager", "vs inductor", "rel. L2 error vs eager", "first call s"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for r in result["rows"]:
        versus = r["speedup_vs_inductor"]
        table.add_row(r["variant"], f"{r['ms']:.2f}", f"{r['speedup_vs_eager']:.2f}x",
                      "-" if versus is None else f"{versus:.2f}x", f"{r['rel_l2_error_vs_eager']:.2e}",
                      f"{r['first_call_s']:.1f}")
    Console(width=160).print(table)
    for r in result["rows"]:
        if r["linear_kernels"]:
            print(f"{r['variant']}: linear layers by kernel {r['linear_kernels']}")
    attention = [layer for layer in result["layers"] if layer["q_len"] == layer["kv_len"]]
    if attention:
        print(f"self-attention kept {statistics.mean(layer['density'] for layer in attention):.1%} of the pairs "
              f"(mean over {len(attention)} layers); tuning took {result['tune_seconds']:.1f} s")


def save(result: dict, args, argv: list[str]) -> Path:
    options = {k: v for k, v in vars(args).items() if k not in ("output", "config")}
    return write_record("end_to_end", args.device, {"options": options, **result}, output=args.output,
                        name=f"end_to_end_{args.device}", command=[os.path.relpath(__file__), *argv])


def _prune_spec(text: str):
    """"2:4" -> "2:4"; "block64:0.5" -> {"block": (64, 64), "density": 0.5}; "density:0.3" ->
    {"density": 0.3} (scattered zeros) (sparsec.prune's specs)."""
    if text.startswith("density:"):
        try:
            return {"density": float(text[len("density:"):])}
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected density:D (e.g. density:0.3), got {text!r}") from None
    if text.startswith("block"):
        size, _, density = text[len("block"):].partition(":")
        try:
            return {"block": (int(size), int(size)), "density": float(density)}
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected blockB:D (e.g. block64:0.5), got {text!r}") from None
    try:
        sparsec.pruning.parse_spec(text)
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def check_prune_specs(parser: argparse.ArgumentParser, specs: list[str]) -> None:
    """parser.error on the first bad sparsec.prune spec, before any model is built or timed."""
    for spec in specs:
        try:
            _prune_spec(spec)
        except argparse.ArgumentTypeError as e:
            parser.error(str(e))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU, 2048 tokens, sparsec inner eager, no Inductor")
    add_device_options(parser)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--patches", type=int, default=None, help="patches per frame side (height = width = 2 x this)")
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--joint-text", type=int, default=None, metavar="TOKENS",
                        help="HunyuanVideo's layout: self-attention over [video, TOKENS text tokens] with the text "
                             "padded (a quarter to all of it real per input) instead of cross-attention")
    parser.add_argument("--budget", type=float, default=0.02, help="sparsec.tune's per-layer error budget")
    parser.add_argument("--prune", type=_prune_spec, default=None,
                        help="prune the blocks' linear layers first: N:M (e.g. 2:4), blockB:D (e.g. block64:0.5) "
                             "or density:D (scattered zeros, e.g. density:0.3)")
    parser.add_argument("--inner", choices=("inductor", "eager"), default=None,
                        help="what runs sparsec's rewritten graphs (default inductor; eager with --quick)")
    parser.add_argument("--no-inductor", action="store_true", help="leave out the plain Inductor variant")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="CPU: time the variants at least this long")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--output", default=None, help="JSON path (default bench/results/end_to_end_<device>_<date>.json)")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if args.quick:
        args.device = "cpu"
        args.inner = args.inner or "eager"
        args.no_inductor = True
        args.min_seconds = min(args.min_seconds, 1.0)
    args.inner = args.inner or "inductor"
    args.dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    config = CPU_CONFIG if args.device == "cpu" else GPU_CONFIG
    sizes = {"frames": args.frames, "dim": args.dim, "heads": args.heads, "depth": args.depth}
    if args.joint_text is not None:
        if args.joint_text < 1:
            parser.error(f"--joint-text must be a positive number of text tokens, got {args.joint_text}")
        sizes.update(joint_text=True, text_len=args.joint_text)
    if args.patches:
        sizes.update(height=2 * args.patches, width=2 * args.patches)
    try:
        args.config = dataclasses.replace(config, **{k: v for k, v in sizes.items() if v is not None})
        with_roles(args.config)
    except ValueError as e:
        parser.error(str(e))
    return args


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    result = run(args)
    print_table(result, f"end to end on {device_name(args.device)}, {args.dtype}, sparsec inner={args.inner}")
    if not args.no_save:
        print(f"wrote {save(result, args, argv)}")


if __name__ == "__main__":
    main()
