"""Sparse attention kernels against dense: sparsec.attention vs torch SDPA (and FlexAttention on CUDA).

    python bench/attention.py --quick            # CPU, S = 1024, every family at 25%: < 1 minute
    python bench/attention.py                    # CUDA when present (else CPU): the full grid
    python bench/attention.py --device cpu --lengths 4096 --head-dims 64 --families window \\
        --densities 0.25 --dtype fp32            # the CPU target: window at 25% vs SDPA

For every length S, head dim D and family at each target density, pattern_for_density() picks the
family's parameters so the kept fraction of (causally allowed) pairs is as close as possible to
the target at that S. Candidates, each on the same random q, k, v:

  sdpa            torch SDPA: on CUDA the flash backend (sdpa_kernel(FLASH_ATTENTION)), on CPU
                  torch's default (fused flash CPU kernel)
  sparsec dense   sparsec.attention(q, k, v, Dense())
  sparsec sparse  sparsec.attention(q, k, v, pattern)
  flex            CUDA only: compiled flex_attention with a BlockMask from create_block_mask and a
                  mask_mod equal to the pattern (its build time is reported apart, not timed)

TFLOP/s counts 4 * B * H * D per pair: every allowed pair for the dense candidates, only kept
pairs for the sparse ones. speedup = SDPA time / candidate time; efficiency = speedup / (1 /
density), 1.0 meaning the sparse kernel turns every skipped pair into saved time. Timing: on CUDA
triton.testing.do_bench (warm-up, median); on CPU the candidates alternate call by call (so load
from other processes hits them alike) and the median of the calls is kept. Results: a rich table,
JSON under bench/results/ (device, versions, date, command line, every figure) and a plot when
matplotlib is installed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import sparsec
from sparsec import patterns as P
from sparsec.codegen.block_coverage import kept_pairs
from sparsec.cost_models.measure import software_versions

FAMILIES = ("window", "multi_diagonal", "columns", "a_shape", "vertical_slash", "block_sparse", "temporal")
GPU_LENGTHS = (2048, 4096, 8192, 16384, 32768)
CPU_LENGTHS = (1024, 2048, 4096)
HEAD_DIMS = (64, 128)
DENSITIES = (0.1, 0.25, 0.5)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RESULTS = Path(__file__).resolve().parent / "results"
# Largest S whose outputs are checked against the explicit-mask dense path (it holds S x S masks).
CHECK_MAX_LENGTH = 4096


# -- patterns at a target density -----------------------------------------------------------------


def _density(pattern: P.Pattern, S: int, causal: bool) -> float:
    allowed = S * (S + 1) // 2 if causal else S * S
    return kept_pairs(pattern, S, S, causal) / allowed


def _closest(make: Callable[[int], P.Pattern], lo: int, hi: int, S: int, density: float, causal: bool) -> P.Pattern:
    """The pattern make(x), lo <= x <= hi, whose density is closest to `density` (density is
    nondecreasing in x): bisection, then the better of the two neighbours."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _density(make(mid), S, causal) < density:
            lo = mid
        else:
            hi = mid
    return min((make(lo), make(hi)), key=lambda p: abs(_density(p, S, causal) - density))


def _spread(count: int, start: int, stop: int) -> list[int]:
    """`count` distinct integers spread evenly over [start, stop)."""
    count = max(1, min(count, stop - start))
    return sorted({start + (stop - start) * t // count for t in range(count)})


def _block_sparse_for_density(S: int, density: float, causal: bool, seed: int) -> P.Pattern:
    """Random layout of 128-blocks (S/8 at short S) keeping round(density * blocks) of the blocks
    the causal rule allows (all blocks when not causal)."""
    block = max(1, min(128, S // 8))
    n = math.ceil(S / block)
    allowed = torch.ones(n, n, dtype=torch.bool)
    if causal:
        allowed = torch.tril(allowed)
    candidates = torch.nonzero(allowed)
    g = torch.Generator().manual_seed(seed)
    chosen = candidates[torch.randperm(len(candidates), generator=g)[: max(1, round(density * len(candidates)))]]
    layout = torch.zeros(n, n, dtype=torch.bool)
    layout[chosen[:, 0], chosen[:, 1]] = True
    return P.BlockSparse(layout, block)


def pattern_for_density(family: str, S: int, density: float, *, causal: bool = False, frame: int | None = None,
                        seed: int = 0) -> P.Pattern:
    """A `family` pattern whose kept fraction of the (causally allowed) S x S pairs is as close
    to `density` as its parameters allow. frame: the distance between MultiDiagonal bands (video:
    tokens per frame; default S // 8)."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    frame = frame or max(1, S // 8)
    if family == "window":
        return _closest(lambda w: P.Window(w, 0 if causal else w), 0, S, S, density, causal)
    if family == "a_shape":
        return _closest(lambda w: P.AShape(min(64, S // 16), w), 0, S, S, density, causal)
    if family == "multi_diagonal":
        ks = range(-4, 1) if causal else range(-2, 3)
        offsets = [k * frame for k in ks if abs(k * frame) < S]
        return _closest(lambda w: P.MultiDiagonal(offsets, w), 0, S, S, density, causal)
    if family == "columns":
        stride = max(1, S // 16)
        return _closest(lambda w: P.Columns([(s, min(S, s + w)) for s in range(0, S, stride)]), 1, stride, S, density, causal)
    if family == "vertical_slash":
        def make(lines: int) -> P.Pattern:
            return P.VerticalSlash(_spread(lines // 2, 0, S), [-o for o in _spread(lines - lines // 2, 0, S)])
        return _closest(make, 2, 2 * S, S, density, causal)
    if family == "block_sparse":
        return _block_sparse_for_density(S, density, causal, seed)
    if family == "temporal":  # a video DiT's temporal head: the same patch and its neighbours above and
        side = max(1, math.isqrt(frame))  # below (frame = side x side patches) in every frame
        offsets = [k * frame + r for k in range(-(S // frame) + 1, S // frame) for r in (-side, 0, side)]
        return _closest(lambda w: P.MultiDiagonal(offsets, w), 0, max(1, side // 2), S, density, causal)
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


# -- FlexAttention (CUDA) -------------------------------------------------------------------------


def flex_mask_mod(pattern: P.Pattern, S: int, causal: bool, device) -> Callable:
    """mask_mod(b, h, q_idx, kv_idx) equal to the pattern's keep() plus the causal rule, built from
    lookup tables on `device` (per key column, per diagonal j - i, per layout block)."""
    parts = pattern.parts if isinstance(pattern, P.Union) else (pattern,)
    mods = [_part_mask_mod(p, S, device) for p in parts]

    def mask_mod(b, h, q_idx, kv_idx):
        kept = mods[0](q_idx, kv_idx)
        for mod in mods[1:]:
            kept = kept | mod(q_idx, kv_idx)
        return kept & (kv_idx <= q_idx) if causal else kept

    return mask_mod


def _in_ranges(x: torch.Tensor, ranges) -> torch.Tensor:
    kept = torch.zeros(x.shape, dtype=torch.bool)
    for start, end in ranges:
        kept |= (x >= start) & (x < end)
    return kept


def _column_and_diagonal_tables(p: P.Pattern, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(columns (S,), diagonals (2S - 1,) indexed by j - i + S - 1): keep(i, j) = columns[j] |
    diagonals[j - i + S - 1] for the band and stripe families."""
    j, d = torch.arange(S), torch.arange(-(S - 1), S)
    none_j, none_d = torch.zeros(S, dtype=torch.bool), torch.zeros(2 * S - 1, dtype=torch.bool)
    if isinstance(p, P.Window):
        return none_j, (d >= -p.left) & (d <= p.right)
    if isinstance(p, P.MultiDiagonal):
        return none_j, _in_ranges(d, [(o - p.width, o + p.width + 1) for o in p.offsets])
    if isinstance(p, P.Columns):
        return _in_ranges(j, p.ranges), none_d
    if isinstance(p, P.AShape):
        return j < p.sink, (d >= -p.window) & (d <= 0)
    if isinstance(p, P.VerticalSlash):
        return _in_ranges(j, p.columns), _in_ranges(d, [(o, o + 1) for o in p.offsets])
    raise ValueError(f"no FlexAttention mask_mod for {p!r}")


def _part_mask_mod(p: P.Pattern, S: int, device) -> Callable:
    if isinstance(p, P.BlockSparse):
        layout = p.layout.to(device)
        bq, bk = p.block
        return lambda q_idx, kv_idx: layout[q_idx // bq, kv_idx // bk]
    if isinstance(p, P.Dense):
        return lambda q_idx, kv_idx: kv_idx >= 0
    columns, diagonals = (t.to(device) for t in _column_and_diagonal_tables(p, S))
    return lambda q_idx, kv_idx: columns[kv_idx] | diagonals[kv_idx - q_idx + (S - 1)]


def _flex_candidate(q, k, v, pattern, causal, scale):
    """(run, build seconds) for compiled flex_attention on the pattern's BlockMask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    S = q.shape[2]
    start = time.perf_counter()
    block_mask = create_block_mask(flex_mask_mod(pattern, S, causal, q.device), None, None, S, S,
                                   device=q.device, _compile=True)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - start
    compiled = torch.compile(flex_attention, dynamic=False)
    gqa = q.shape[1] != k.shape[1]
    return (lambda: compiled(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)), build_s


# -- timing ---------------------------------------------------------------------------------------


def _time_ms(fns: dict[str, Callable], device: str, min_seconds: float) -> dict[str, float]:
    """Median milliseconds per candidate. CUDA: do_bench each. CPU: the candidates alternate call
    by call until each has run >= 3 times and together >= min_seconds (at most 25 rounds)."""
    if device == "cuda":
        import triton.testing

        return {name: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
                for name, fn in fns.items()}
    for fn in fns.values():
        fn()  # warm up: plans, allocations
    samples: dict[str, list[float]] = {name: [] for name in fns}
    spent, rounds = 0.0, 0
    while (spent < min_seconds or rounds < 3) and rounds < 25:
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
            spent += samples[name][-1]
        rounds += 1
    return {name: statistics.median(values) * 1e3 for name, values in samples.items()}


def _sdpa(q, k, v, causal: bool, scale: float) -> Callable:
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def run():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **gqa)
        return run
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **gqa)


def _max_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-6))


# -- one (S, D) point ------------------------------------------------------------------------------


def _inputs(args, S: int, D: int):
    g = torch.Generator(device="cpu").manual_seed(S * 1000 + D)
    dtype = DTYPES[args.dtype]
    shape_q, shape_kv = (args.batch, args.heads, S, D), (args.batch, args.kv_heads or args.heads, S, D)
    return tuple(torch.randn(shape, generator=g).to(args.device, dtype) for shape in (shape_q, shape_kv, shape_kv))


def _flops(args, D: int, pairs: int) -> float:
    return 4.0 * args.batch * args.heads * D * pairs


def run_point(args, S: int, D: int, rows: list[dict]) -> None:
    q, k, v = _inputs(args, S, D)
    scale = 1.0 / math.sqrt(D)
    allowed = S * (S + 1) // 2 if args.causal else S * S
    dense_pattern = P.Dense()
    base = _time_ms({"sdpa": _sdpa(q, k, v, args.causal, scale),
                     "sparsec dense": lambda: sparsec.attention(q, k, v, dense_pattern, causal=args.causal, scale=scale)},
                    args.device, args.min_seconds)
    rows.append(_row(args, S, D, "dense", None, 1.0, allowed, "sparsec dense", base["sparsec dense"], base["sdpa"]))
    rows.append(_row(args, S, D, "dense", None, 1.0, allowed, "sdpa", base["sdpa"], base["sdpa"]))
    for family in args.families:
        for target in args.densities:
            pattern = pattern_for_density(family, S, target, causal=args.causal, frame=args.frame)
            kept = kept_pairs(pattern, S, S, args.causal)
            run_sparse = lambda: sparsec.attention(q, k, v, pattern, causal=args.causal, scale=scale)  # noqa: E731
            candidates = {"sdpa": _sdpa(q, k, v, args.causal, scale), "sparsec sparse": run_sparse}
            if family == "temporal":  # the token order forced each way (the plain run lets sparsec choose)
                candidates.update(_order_candidates(q, k, v, pattern, args, scale))
            notes = {}
            if args.device == "cuda" and not args.no_flex:
                try:
                    candidates["flex"], notes["flex_build_s"] = _flex_candidate(q, k, v, pattern, args.causal, scale)
                except Exception as e:  # report, keep benchmarking the rest
                    notes["flex_error"] = f"{type(e).__name__}: {e}"
            times = _time_ms(candidates, args.device, args.min_seconds)
            error = _check(q, k, v, pattern, args, scale, run_sparse) if S <= CHECK_MAX_LENGTH and not args.no_check else None
            for name in ("sparsec sparse", "sparsec natural order", "sparsec transposed order", "flex"):
                if name in times:
                    rows.append(_row(args, S, D, family, pattern, kept / allowed, kept, name, times[name], times["sdpa"],
                                     target=target, max_rel_error=error if name == "sparsec sparse" else None, **notes))
        if not args.no_save:
            save(rows, args, complete=False)


def _order_candidates(q, k, v, pattern, args, scale) -> dict[str, Callable]:
    """sparsec's kernels (CUDA) or CPU executor with the frame-transposed token order forced off and on."""
    heads = (pattern,) * q.shape[1]
    if args.device == "cuda":
        from sparsec.codegen.attention_triton import triton_attention as run
    else:
        from sparsec.codegen.attention_cpu import cpu_attention as run
    return {f"sparsec {name} order": (lambda frames=frames: run(q, k, v, heads, causal=args.causal, scale=scale,
                                                               frames=frames))
            for name, frames in (("natural", False), ("transposed", True))}


def _check(q, k, v, pattern, args, scale, run_sparse) -> float:
    """Max error of the sparse output relative to the explicit-mask dense path's output scale."""
    ref = sparsec.attention(q, k, v, pattern, causal=args.causal, scale=scale, backend="masked")
    return _max_rel_error(run_sparse(), ref)


def _row(args, S, D, family, pattern, density, pairs, candidate, ms, sdpa_ms, **extra) -> dict:
    speedup = sdpa_ms / ms
    return {"family": family, "S": S, "head_dim": D, "batch": args.batch, "heads": args.heads,
            "kv_heads": args.kv_heads or args.heads, "dtype": args.dtype, "causal": args.causal,
            "pattern": repr(pattern) if pattern is not None else "Dense()", "density": density, "pairs": pairs,
            "candidate": candidate, "ms": ms, "sdpa_ms": sdpa_ms, "tflops": _flops(args, D, pairs) / (ms * 1e-3) / 1e12,
            "speedup": speedup, "efficiency": speedup * density, **extra}


# -- reporting ------------------------------------------------------------------------------------


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("family", "S", "D", "density", "candidate", "ms", "TFLOP/s", "speedup vs SDPA", "x density", "pattern"):
        table.add_column(column, justify="left" if column in ("family", "candidate", "pattern") else "right")
    for r in rows:
        table.add_row(r["family"], str(r["S"]), str(r["head_dim"]), f"{r['density']:.3f}", r["candidate"],
                      f"{r['ms']:.3f}", f"{r['tflops']:.4g}", f"{r['speedup']:.2f}x", f"{r['efficiency']:.2f}",
                      r["pattern"] if len(r["pattern"]) <= 48 else r["pattern"][:45] + "...")
    Console(width=200).print(table)  # wide: a log keeps full numbers whatever the terminal


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({torch.get_num_threads()} threads)"


def write_record(benchmark: str, device: str, fields: dict, *, output: str | None = None, name: str | None = None,
                 command: list[str] | None = None) -> Path:
    """A benchmark's JSON (every script's): benchmark, device, versions, date and command, then
    `fields`, written to `output` or bench/results/<name or benchmark>_<date>.json."""
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    path = Path(output) if output else RESULTS / f"{name or benchmark}_{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": benchmark, "device": device_name(device), "device_type": device,
              "versions": software_versions(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, *(sys.argv if command is None else command)]), **fields}
    path.write_text(json.dumps(record, indent=1))
    return path


def write_rows(benchmark: str, script: str, args, rows: list[dict], argv: list[str],
               complete: bool | None = None) -> Path:
    """A row-table benchmark's JSON: its options (all but --output) and rows, written by
    write_record to args.output or bench/results/<benchmark>_<device>_<date>.json. `complete`
    (when given) says whether the run finished: False for the rows so far of a run that may be cut short."""
    options = {k: v for k, v in vars(args).items() if k != "output"}
    fields = {"options": options, "rows": rows} | ({} if complete is None else {"complete": complete})
    return write_record(benchmark, args.device, fields, output=args.output, name=f"{benchmark}_{args.device}",
                        command=[os.path.relpath(script), *argv])


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """--device and --dtype, as every GPU-or-CPU script takes them."""
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")


def save(rows: list[dict], args, complete: bool = True) -> Path:
    """Write the rows so far (complete=False: after each family, so a run cut short by a time
    limit keeps what it measured) to args.output, or a new dated path that becomes args.output."""
    config = {key: value for key, value in vars(args).items() if key != "output"}
    path = write_record("attention", args.device, {"complete": complete, "config": config, "rows": rows},
                        output=args.output, name=f"attention_{args.device}")
    args.output = str(path)
    return path


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    """Speedup over SDPA against density, one panel per family, one line per (S, D, candidate),
    with the ideal 1 / density dashed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    families = sorted({r["family"] for r in rows} - {"dense"})
    if not families:
        return None
    fig, axes = plt.subplots(1, len(families), figsize=(4 * len(families), 3.6), squeeze=False)
    for ax, family in zip(axes[0], families):
        mine = [r for r in rows if r["family"] == family]
        for key in sorted({(r["S"], r["head_dim"], r["candidate"]) for r in mine}):
            line = sorted((r["density"], r["speedup"]) for r in mine if (r["S"], r["head_dim"], r["candidate"]) == key)
            ax.plot(*zip(*line), marker="o" if key[2] == "sparsec sparse" else "x",
                    label=f"{key[2]} S={key[0]} D={key[1]}")
        densities = sorted({r["density"] for r in mine})
        ax.plot(densities, [1 / d for d in densities], "k--", linewidth=0.8, label="1 / density")
        ax.set_title(family)
        ax.set_xlabel("density")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("speedup over SDPA")
    axes[0][-1].legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    return out


# -- command line ---------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU, S=1024, D=64, every family at 25%%: < 1 minute")
    add_device_options(parser)
    parser.add_argument("--lengths", nargs="+", type=int, default=None, help="sequence lengths S (Sq = Sk)")
    parser.add_argument("--head-dims", nargs="+", type=int, default=None)
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=None)
    parser.add_argument("--densities", nargs="+", type=float, default=None, help="target kept fractions")
    parser.add_argument("--frame", type=int, default=None,
                        help="multi_diagonal band spacing, temporal frame length (default S // 8)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None, help="GQA: kv heads (default: --heads)")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="CPU: time each point at least this long")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads")
    parser.add_argument("--no-flex", action="store_true", help="CUDA: skip FlexAttention")
    parser.add_argument("--no-check", action="store_true", help="skip the correctness check against the masked path")
    parser.add_argument("--no-save", action="store_true", help="print only: no JSON, no plot")
    parser.add_argument("--output", default=None, help="JSON path (default bench/results/attention_<device>_<date>.json)")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if args.quick:
        args.device = "cpu"
        args.lengths = args.lengths or [1024]
        args.head_dims = args.head_dims or [64]
        args.densities = args.densities or [0.25]
        args.min_seconds = min(args.min_seconds, 0.3)
    cpu = args.device == "cpu"
    args.dtype = args.dtype or ("fp32" if cpu else "bf16")
    args.lengths = args.lengths or list(CPU_LENGTHS if cpu else GPU_LENGTHS)
    args.head_dims = args.head_dims or list(HEAD_DIMS)
    args.families = args.families or list(FAMILIES)
    args.densities = args.densities or list(DENSITIES)
    if args.heads % (args.kv_heads or args.heads):
        parser.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[dict] = []
    title = (f"attention on {device_name(args.device)}, {args.dtype}, B={args.batch}, H={args.heads}"
             f"{', causal' if args.causal else ''}")
    for S in args.lengths:
        for D in args.head_dims:
            run_point(args, S, D, rows)
            print_table([r for r in rows if r["S"] == S and r["head_dim"] == D], f"{title}, S={S}, D={D}")
    if not args.no_save:
        path = save(rows, args)
        print(f"wrote {path}")
        picture = plot(rows, path, title)
        if picture:
            print(f"wrote {picture}")


if __name__ == "__main__":
    main()
