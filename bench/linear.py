"""Sparse linear layers against dense: y = x @ W.T for transformer-sized weights.

    python bench/linear.py --quick          # CPU, one shape, < 1 minute
    python bench/linear.py                  # CUDA when present (else CPU): every shape and token count
    python bench/linear.py --device cpu --tokens 1 64 512

Shapes are (in_features, out_features) of real layers (Llama 4096x4096 and 4096x11008, a DiT
MLP 1152x4608). Block-sparse weights keep round(density * blocks) random blocks; 2:4 weights
keep 2 random inputs of every 4; scattered weights (CPU, fp32 / bf16) keep each element with
probability `density`. Candidates:

  CUDA: dense F.linear (torch.mm) | sparsec BSR (Triton) | torch bsr_dense_mm
        (torch.sparse._triton_ops) | sparsec N:M (Triton, 2:4) | torch semi-structured 2:4
  CPU:  dense F.linear | sparsec BSR CPU executor | torch BSR (to_sparse_bsr @) | sparsec N:M CPU
        executor | sparsec unstructured CPU executor | torch CSR (to_sparse_csr @, MKL)
  (the CPU executors run each call on the path their cost model prices cheapest: native kernels
  or torch's; codegen/linear_cpu.py)

Every candidate's output is checked against dense once (max error relative to the output scale,
recorded). For each weight and token count, sparsec's own choice (what passes/choose_linear_kernels
takes with weight_sparsity="auto": the cost model, cost_models.estimate_linear_seconds on the
device's profile, between dense and sparsec's kernels for the weight) is set against the measured
fastest of the same options: right or not, and its loss (its time over the fastest, - 1).
Results: rich tables, and JSON under bench/results/ with the device, versions, date, command and
every figure.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsec.codegen.linear_cpu import (bsr_linear_cpu, nm_linear_cpu, pack_block_rows, pack_nm_rows,
                                        unstructured_linear_cpu)
from sparsec.codegen.linear_cpu_native import native_linear_available, pack_sparse_rows
from sparsec.codegen.weight_packing import pack_bsr, pack_nm, pack_semi_structured, semi_structured_reason
from sparsec.cost_models import estimate_linear_seconds
from sparsec.cost_models.hardware import profile_for_device
from sparsec.cost_models.linear_measure import block_weight, nm_weight
from sparsec.cost_models.measure import flush_cpu_caches, software_versions
from sparsec.ir.types import DENSE, BlockSparse, NMSparse, Unstructured, dtype_name
from sparsec.passes.choose_linear_kernels import beats_dense

SHAPES = ((4096, 4096), (4096, 11008), (1152, 4608))
GPU_TOKENS = (1, 16, 128, 512, 2048, 8192)
CPU_TOKENS = (1, 4, 16, 64, 512)  # larger token counts take minutes per point on a CPU
DENSITIES = (0.1, 0.3, 0.5, 0.7)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    shape: str  # in x out
    tokens: int
    format: str  # "dense", "bsr 64x64 @ 0.30", "2:4"
    candidate: str
    ms: float | None
    speedup: float | None  # dense time (measured alongside on CPU) / this time
    max_rel_error: float | None
    note: str = ""


# -- timing ------------------------------------------------------------------------------------------


def _time_ms(fn, device: str, min_seconds: float) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100))
    fn()  # warm up (and first-touch allocations)
    samples, spent = [], 0.0
    while spent < min_seconds or len(samples) < 3:
        flush_cpu_caches()
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
        spent += samples[-1]
        if len(samples) >= 50:
            break
    return statistics.median(samples) * 1e3


def _time_pair_ms(dense_fn, fn, device: str, min_seconds: float) -> tuple[float, float]:
    """(dense ms, candidate ms). On CPU the two alternate call by call, so load from other
    processes on a shared machine hits both alike and their ratio stays meaningful; every CPU
    sample starts with the caches flushed (cost_models.measure.flush_cpu_caches), as in a model."""
    if device == "cuda":
        return _time_ms(dense_fn, device, min_seconds), _time_ms(fn, device, min_seconds)
    dense_fn(), fn()
    dense, sparse, spent = [], [], 0.0
    while spent < 2 * min_seconds or len(dense) < 5:
        for samples, f in ((dense, dense_fn), (sparse, fn)):
            flush_cpu_caches()
            start = time.perf_counter()
            f()
            samples.append(time.perf_counter() - start)
            spent += samples[-1]
        if len(dense) >= 50:
            break
    return statistics.median(dense) * 1e3, statistics.median(sparse) * 1e3


def _rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


@dataclass
class Choice:
    shape: str
    tokens: int
    format: str
    chosen: str            # the option the cost model picks: "dense" or a sparsec kernel
    fastest: str           # the measured fastest of the same options
    loss: float            # chosen's time over the fastest's, - 1
    estimated_speedup: dict[str, float]  # each sparsec kernel: estimated dense time / its time


# -- candidates --------------------------------------------------------------------------------------


def _block_candidates(W, block, device):
    """name -> (callable of x, or the reason it cannot run)."""
    if device == "cuda":
        from sparsec.codegen.linear_triton import bsr_linear_triton

        bsr = pack_bsr(W, (block, block))
        out = {"sparsec bsr (triton)": lambda x: bsr_linear_triton(x, bsr)}
        out["torch bsr_dense_mm"] = _torch_bsr_dense_mm(W, block)
        return out
    rows = pack_block_rows(pack_bsr(W, (block, block)))
    torch_bsr = W.to_sparse_bsr((block, block))
    return {"sparsec bsr (cpu)": lambda x: bsr_linear_cpu(x, rows),
            "torch bsr (cpu)": lambda x: (torch_bsr @ x.t()).t()}


def _torch_bsr_dense_mm(W, block):
    from torch.sparse import _triton_ops

    if getattr(_triton_ops, "bsr_dense_mm", None) is None:
        return "torch.sparse._triton_ops.bsr_dense_mm is unavailable"
    torch_bsr = W.to_sparse_bsr((block, block))

    def run(x):
        if x.shape[0] % 16:
            raise ValueError("bsr_dense_mm needs the token count divisible by 16")
        return _triton_ops.bsr_dense_mm(torch_bsr, x.t()).t()
    return run


def _two_four_candidates(W, device):
    nm = pack_nm(W, 2, 4)
    if device != "cuda":
        rows = pack_nm_rows(nm)
        return {"sparsec 2:4 (cpu)": lambda x: nm_linear_cpu(x, rows)}
    from sparsec.codegen.linear_triton import nm_linear_triton, semi_structured_linear

    out = {"sparsec 2:4 (triton)": lambda x: nm_linear_triton(x, nm)}
    reason = semi_structured_reason(W)
    if reason is None:
        semi = pack_semi_structured(W)
        out["torch semi-structured 2:4"] = lambda x: semi_structured_linear(x, semi)
    else:
        out["torch semi-structured 2:4"] = reason
    return out


def _scattered_candidates(W):
    rows = pack_sparse_rows(W)
    csr = W.to_sparse_csr()
    return {"sparsec unstructured (cpu)": lambda x: unstructured_linear_cpu(x, rows),
            "torch csr (cpu)": lambda x: (csr @ x.t()).t()}


def scattered_weight(N: int, K: int, density: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(N, K) * (torch.rand(N, K) < density)).to(dtype)


# -- the sweep ---------------------------------------------------------------------------------------


def _measure(rows, shape, tokens, fmt, candidates, x, W, args):
    ref = F.linear(x, W)
    dense_fn = lambda: F.linear(x, W)  # noqa: E731
    dense_ms = _time_ms(dense_fn, args.device, args.min_seconds)
    rows.append(Row(shape, tokens, fmt, "dense", dense_ms, 1.0, 0.0))
    for name, fn in candidates.items():
        if isinstance(fn, str):
            rows.append(Row(shape, tokens, fmt, name, None, None, None, fn))
            continue
        try:
            error = _rel_error(fn(x), ref)
            paired_dense_ms, ms = _time_pair_ms(dense_fn, lambda: fn(x), args.device, args.min_seconds)
        except (RuntimeError, ValueError) as e:
            rows.append(Row(shape, tokens, fmt, name, None, None, None, f"{type(e).__name__}: {e}"[:160]))
            continue
        rows.append(Row(shape, tokens, fmt, name, ms, paired_dense_ms / ms, error,
                        f"dense {paired_dense_ms:.3f} ms alongside"))


# The kernels of a weight's format that sparsec itself can pick (the torch baselines are not its options),
# and how the cost model prices each: (sparsity encoding, semi_structured).
def _sparsec_options(fmt: str, density: float | None, block: int) -> dict[str, tuple[object, bool]]:
    if fmt.startswith("scattered"):
        return {"sparsec unstructured (cpu)": (Unstructured(density=density), False)}
    if fmt == "2:4":
        nm = NMSparse(n=2, m=4, density=0.5)
        return {"sparsec 2:4 (cpu)": (nm, False), "sparsec 2:4 (triton)": (nm, False),
                "torch semi-structured 2:4": (nm, True)}
    bsr = BlockSparse(block=(block, block), density=density)
    return {"sparsec bsr (cpu)": (bsr, False), "sparsec bsr (triton)": (bsr, False)}


def choose(rows: list[Row], shape: str, tokens: int, fmt: str, density: float | None, N: int, K: int,
           args) -> Choice | None:
    """The cost model's pick among dense and sparsec's kernels that ran for this point, against the
    measured fastest of them (each at its time relative to dense measured alongside)."""
    options = _sparsec_options(fmt, density, args.block)
    measured = {r.candidate: 1.0 / r.speedup for r in rows
                if r.shape == shape and r.tokens == tokens and r.format == fmt and r.speedup
                and (r.candidate == "dense" or r.candidate in options)}
    if len(measured) < 2:
        return None
    hardware, dtype = profile_for_device(args.device), dtype_name(DTYPES[args.dtype])
    dense_s = estimate_linear_seconds(tokens, N, K, dtype, DENSE, hardware)
    estimated = {name: estimate_linear_seconds(tokens, N, K, dtype, sparsity, hardware, semi_structured=semi)
                 for name, (sparsity, semi) in options.items() if name in measured}
    best_sparse = min(estimated, key=estimated.get)
    chosen = best_sparse if beats_dense(estimated[best_sparse], dense_s) else "dense"
    fastest = min(measured, key=measured.get)
    return Choice(shape, tokens, fmt, chosen, fastest, measured[chosen] / measured[fastest] - 1,
                  {name: dense_s / seconds for name, seconds in estimated.items()})


def run_shape(K: int, N: int, args, rows: list[Row], choices: list[Choice]) -> None:
    dtype, device = DTYPES[args.dtype], args.device
    shape = f"{K}x{N}"
    weights = {d: block_weight(N, K, (args.block, args.block), d, dtype, device) for d in args.densities}
    two_four = nm_weight(N, K, 2, 4, dtype, device)
    scattered = ({d: scattered_weight(N, K, d, dtype) for d in args.densities}
                 if device == "cpu" and dtype in (torch.float32, torch.bfloat16) and native_linear_available() else {})
    for tokens in args.tokens:
        x = torch.randn(tokens, K, dtype=dtype, device=device)
        points = []
        for density, W in weights.items():
            fmt = f"bsr {args.block}x{args.block} @ {density:.2f}"
            _measure(rows, shape, tokens, fmt, _block_candidates(W, args.block, device), x, W, args)
            points.append((fmt, density))
        _measure(rows, shape, tokens, "2:4", _two_four_candidates(two_four, device), x, two_four, args)
        points.append(("2:4", None))
        for density, W in scattered.items():
            fmt = f"scattered @ {density:.2f}"
            _measure(rows, shape, tokens, fmt, _scattered_candidates(W), x, W, args)
            points.append((fmt, density))
        for fmt, density in points:
            choice = choose(rows, shape, tokens, fmt, density, N, K, args)
            if choice is not None:
                choices.append(choice)
        print(f"  {shape} tokens={tokens} done", file=sys.stderr)


# -- output ------------------------------------------------------------------------------------------


def print_table(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("shape", "tokens", "format", "candidate", "ms", "vs dense", "rel err", "note"):
        table.add_column(column, justify="right" if column in ("tokens", "ms", "vs dense", "rel err") else "left")
    for r in rows:
        speed = "" if r.speedup is None else f"{r.speedup:.2f}x"
        style = "green" if r.speedup and r.speedup > 1.0 and r.candidate != "dense" else None
        table.add_row(r.shape, str(r.tokens), r.format, r.candidate,
                      "" if r.ms is None else f"{r.ms:.3f}", speed,
                      "" if r.max_rel_error is None else f"{r.max_rel_error:.1e}", r.note, style=style)
    Console(width=160).print(table)


def print_choices(choices: list[Choice]) -> dict:
    """The choice table and its summary (returned for the JSON)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="sparsec's choice (cost model) against the measured fastest of the same options")
    for column in ("shape", "tokens", "format", "chosen", "fastest", "loss", "estimated speedup"):
        table.add_column(column, justify="right" if column in ("tokens", "loss") else "left")
    for c in choices:
        estimated = ", ".join(f"{name.split(' (')[0]} {speedup:.2f}x" for name, speedup in c.estimated_speedup.items())
        table.add_row(c.shape, str(c.tokens), c.format, c.chosen, c.fastest, f"{100 * c.loss:.1f}%", estimated,
                      style=None if c.chosen == c.fastest else "yellow")
    console = Console(width=160)
    console.print(table)
    right = sum(c.chosen == c.fastest for c in choices)
    summary = {"points": len(choices), "right": right,
               "mean_loss": sum(c.loss for c in choices) / max(1, len(choices)),
               "worst_loss": max((c.loss for c in choices), default=0.0)}
    console.print(f"the choice: right in {right} of {len(choices)}, mean loss {100 * summary['mean_loss']:.1f}%, "
                  f"worst {100 * summary['worst_loss']:.1f}%")
    return summary


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def save(rows: list[Row], choices: list[Choice], summary: dict, args) -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc)
    record = {
        "benchmark": "linear", "device": device_name(args.device), "device_type": args.device,
        **software_versions(),
        "date": stamp.isoformat(timespec="seconds"), "command": " ".join([sys.executable, *sys.argv]),
        "dtype": args.dtype, "block": args.block, "cpu_threads": torch.get_num_threads(), "results": [asdict(r) for r in rows],
        "choice": summary, "choices": [asdict(c) for c in choices],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    quick = "_quick" if args.quick else ""
    path = RESULTS / f"linear_{args.device}{quick}_{stamp:%Y%m%d_%H%M%S}.json"
    path.write_text(json.dumps(record, indent=1))
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU, 1152x4608, few token counts: < 1 minute")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--block", type=int, default=64, help="square block size of the block-sparse weights")
    parser.add_argument("--shapes", nargs="+", default=None, help="in x out, e.g. 4096x11008")
    parser.add_argument("--tokens", nargs="+", type=int, default=None)
    parser.add_argument("--densities", nargs="+", type=float, default=None)
    parser.add_argument("--min-seconds", type=float, default=0.2, help="CPU: time each point at least this long")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.device = "cpu"
        args.shapes = args.shapes or ["1152x4608"]
        args.tokens = args.tokens or [1, 8, 64, 512]
        args.densities = args.densities or [0.1, 0.3, 0.5]
        args.min_seconds = min(args.min_seconds, 0.1)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else list(SHAPES)
    args.tokens = args.tokens or list(GPU_TOKENS if args.device == "cuda" else CPU_TOKENS)
    args.densities = args.densities or list(DENSITIES)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows: list[Row] = []
    choices: list[Choice] = []
    for K, N in args.shapes:
        run_shape(K, N, args, rows, choices)
    print_table(rows, f"sparse linear, {args.dtype}, {device_name(args.device)}")
    summary = print_choices(choices)
    if not args.no_save:
        print(f"saved {save(rows, choices, summary, args)}", file=sys.stderr)


if __name__ == "__main__":
    main()
