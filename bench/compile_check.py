"""Compile every Triton kernel ahead of time for a GPU that is not here, and report what it costs.

    python bench/compile_check.py                       # H100 (sm_90): every attention family x
                                                        # bf16/fp16 x head_dim 64/128/256 at the
                                                        # default tiles, and the linear kernels (~2 min)
    python bench/compile_check.py --quick               # bf16, head_dim 64 and 128, every family
    python bench/compile_check.py --tiles 128x64x4x3 64x64x4x2 --families window --dtypes bf16
    python bench/compile_check.py --plan plan.json --dtypes bf16   # the launches a saved Plan makes
    python bench/compile_check.py --quick --modified    # each family also with a soft cap, sinks, both
    python bench/compile_check.py --backward --no-linear  # the backward kernels (dQ, dK / dV) instead
    python bench/compile_check.py --backward --accumulate  # ... whose dK / dV add to float32 (GQA, 2 families)

For each launch, built exactly as the entry points build it for CUDA tensors (codegen/triton_aot),
Triton's compiler and ptxas produce the sm_XX binary; the table shows its shared memory against the
architecture's limit, registers and spilled bytes per thread, the matrix instructions (wgmma,
mma.sync or none) and whether K/V loads are pipelined (cp.async), and the JSON under bench/results/
keeps every figure. These are properties of the compiled code, not timings: they tell which tiles
cannot launch (shared memory) or will run slowly (spills, no tensor cores, no pipelining) before a
GPU is lent. Compiling takes ~3-10 s a kernel on 2 cores (fp32, --dtypes fp32: 4-20 s; its exact
dots run on CUDA cores).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from sparsec.codegen import attention_triton, linear_triton
from sparsec.codegen.tiles import AttentionTiles, default_tiles
from sparsec.codegen.triton_aot import compile_calls, target_arch
from sparsec.codegen.weight_packing import pack_bsr, pack_nm
from sparsec.cost_models.measure import pattern_at_density, software_versions
from sparsec.codegen.frame_order import FramesTransposed
from sparsec.patterns import Columns, MultiDiagonal, Skip, Window
from sparsec.pruning import prune_mask

RESULTS = Path(__file__).resolve().parent / "results"
FAMILIES = ("dense", "window", "multi_diagonal", "columns", "a_shape", "vertical_slash", "block_sparse", "union",
            "frames_transposed")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SEQ = 1024      # compiled code does not depend on the lengths (runtime arguments); 16-divisible like real ones
HEADS = 2


def family_pattern(family: str, causal: bool):
    if family == "union":
        return Window(128, 0 if causal else 128) | Columns([(0, 64)])
    if family == "frames_transposed":  # a temporal head: 16 frames of 64 tokens (8 x 8 patches)
        return FramesTransposed(MultiDiagonal([k * 64 + r for k in range(-15, 16) for r in (-8, 0, 8)], 2), 64)
    return pattern_at_density(family, SEQ, 0.25, causal=causal)


def parse_tiles(text: str) -> AttentionTiles:
    try:
        block_m, block_n, warps, stages = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--tiles takes BLOCK_MxBLOCK_NxWARPSxSTAGES (e.g. 128x64x4x3), got {text!r}") from None
    return AttentionTiles(block_m, block_n, num_warps=warps, num_stages=stages)


# The score modifications the kernels compile in (Gemma 2's soft cap, GPT-OSS's sinks): (softcap, sinks).
PLAIN = ((0.0, False),)
MODIFIED = PLAIN + ((30.0, False), (0.0, True), (30.0, True))


def attention_cases(families, dtypes, head_dims, tiles_list, causal, modifications=PLAIN):
    for family in families:
        pattern = family_pattern(family, causal)
        for dtype_name in dtypes:
            for head_dim in head_dims:
                dtype = DTYPES[dtype_name]
                q, k, v = (torch.empty(1, HEADS, SEQ, head_dim, dtype=dtype) for _ in range(3))
                for tiles in tiles_list or [default_tiles(head_dim, dtype)]:
                    for softcap, sinks in modifications:
                        (call,) = attention_triton.kernel_calls(
                            q, k, v, (pattern,) * HEADS, causal=causal, scale=head_dim ** -0.5, tiles=tiles,
                            interpreted=False, softcap=softcap, sinks=torch.zeros(HEADS) if sinks else None)
                        yield {"kernel": "attention", "family": family, "dtype": dtype_name, "head_dim": head_dim,
                               "tiles": [tiles.block_m, tiles.block_n, tiles.num_warps, tiles.num_stages],
                               "default_tiles": not tiles_list, "causal": causal, "softcap": softcap,
                               "sinks": sinks}, call


def backward_cases(families, dtypes, head_dims, causal, modifications=PLAIN, accumulate=False):
    """Both backward kernels of each family (codegen/attention_triton_backward.py) at their default
    tiles (frame-transposed heads have none: their backward runs the heads' own patterns). With
    `accumulate`, GQA whose kv head's other query head is Skip("mean"): the dK / dV kernel adds to
    float32 dK / dV (what a kv head shared by two families compiles)."""
    from sparsec.codegen.attention_triton_backward import backward_kernel_calls

    for family in (f for f in families if f != "frames_transposed"):
        pattern = family_pattern(family, causal)
        for dtype_name in dtypes:
            for head_dim in head_dims:
                dtype = DTYPES[dtype_name]
                q, out, grad = (torch.empty(1, HEADS, SEQ, head_dim, dtype=dtype) for _ in range(3))
                k, v = (torch.empty(1, 1 if accumulate else HEADS, SEQ, head_dim, dtype=dtype) for _ in range(2))
                heads = (pattern, Skip("mean")) if accumulate else (pattern,) * HEADS
                for softcap, sinks in modifications:
                    calls = backward_kernel_calls(grad, q, k, v, out, heads, causal=causal,
                                                  scale=head_dim ** -0.5, interpreted=False, softcap=softcap,
                                                  sinks=torch.zeros(HEADS) if sinks else None)
                    for call in calls:
                        tiles = (call.kwargs["BLOCK_M"], call.kwargs["BLOCK_N"], call.kwargs["num_warps"],
                                 call.kwargs["num_stages"])
                        kernel = "backward_dq" if call.kernel.endswith("_dq_kernel") else "backward_dkdv"
                        yield {"kernel": kernel, "family": family, "dtype": dtype_name, "head_dim": head_dim,
                               "tiles": list(tiles), "default_tiles": True, "causal": causal, "softcap": softcap,
                               "sinks": sinks, "accumulate": bool(call.kwargs.get("ACCUMULATE", False))}, call


def linear_cases(dtypes, tokens: int = 2048, features: int = 1024):
    generator = torch.Generator().manual_seed(0)
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        x = torch.empty(tokens, features, dtype=dtype)
        y = torch.empty(tokens, features, dtype=dtype)
        tiles = linear_triton.default_tiles(tokens)
        layout = torch.rand(features // 64, features // 64, generator=generator) < 0.5
        dense = torch.randn(features, features, generator=generator).to(dtype)
        mask = layout.repeat_interleave(64, 0).repeat_interleave(64, 1)
        bsr = pack_bsr(dense * mask, (64, 64))
        call = linear_triton.bsr_kernel_call(x, bsr, None, y, "gelu", tiles, interpreted=False)
        yield {"kernel": "bsr_linear", "dtype": dtype_name, "block": [64, 64], "tokens": tokens,
               "tiles": [tiles.block_m, 64, tiles.num_warps, tiles.num_stages], "default_tiles": True}, call
        nm = pack_nm(dense * prune_mask(dense.float(), "2:4"), 2, 4)
        call = linear_triton.nm_kernel_call(x, nm, None, y, "none", tiles, interpreted=False)
        yield {"kernel": "nm_linear", "dtype": dtype_name, "nm": [2, 4], "tokens": tokens,
               "tiles": [tiles.block_m, tiles.block_n, tiles.num_warps, tiles.num_stages], "default_tiles": True}, call


def plan_cases(path: str, dtypes):
    """The launches of every attention layer of a saved Plan (sparsec.tune), at its shapes and tiles."""
    from sparsec.codegen.tiles import tiles_for
    from sparsec.plan import Plan

    plan = Plan.load(path)
    for name, layer in plan.layers.items():
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            D = layer.head_dim
            q = torch.empty(1, layer.num_heads, layer.q_len, D, dtype=dtype)
            k, v = (torch.empty(1, layer.num_kv_heads, layer.kv_len, D, dtype=dtype) for _ in range(2))
            tiles = tiles_for(*layer.tiles, D, dtype)
            calls = attention_triton.kernel_calls(q, k, v, tuple(layer.patterns), causal=layer.causal,
                                                  scale=D ** -0.5, tiles=tiles, interpreted=False)
            for call in calls:
                family = call.kernel.removeprefix("attention_").removesuffix("_kernel")
                yield {"kernel": "attention", "layer": name, "family": family, "dtype": dtype_name, "head_dim": D,
                       "tiles": [tiles.block_m, tiles.block_n, tiles.num_warps, tiles.num_stages],
                       "default_tiles": False, "causal": layer.causal}, call


def _short(problems: list[str]) -> str:
    """Problems in a table cell: spills and shared memory as figures, errors by their first line."""
    return "; ".join(p.splitlines()[0][:60] for p in problems) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="h100", help="h100, h200, a100 or sm_XX (default h100)")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=list(DTYPES))
    parser.add_argument("--head-dims", nargs="+", type=int, default=[64, 128, 256])
    parser.add_argument("--tiles", nargs="+", type=parse_tiles, default=None,
                        help="BLOCK_MxBLOCK_NxWARPSxSTAGES each (default: the default tiles of each head_dim and dtype)")
    parser.add_argument("--no-causal", action="store_true", help="compile the non-causal kernels (default causal)")
    parser.add_argument("--no-linear", action="store_true", help="skip the linear kernels")
    parser.add_argument("--quick", action="store_true", help="bf16, head_dim 64 and 128, every family")
    parser.add_argument("--modified", action="store_true",
                        help="each attention kernel also with a soft cap (30), sinks, and both (4 variants a case)")
    parser.add_argument("--backward", action="store_true",
                        help="the attention backward kernels (dQ and dK / dV of each family) instead of the forward")
    parser.add_argument("--accumulate", action="store_true",
                        help="with --backward: the dK / dV kernels that add to float32 dK / dV (a kv head shared "
                             "by two families)")
    parser.add_argument("--plan", default=None,
                        help="compile the launches of this saved Plan's layers instead (with --dtypes; no linear kernels)")
    parser.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--output", default=None, help="JSON path (default: bench/results/compile_<arch>_<date>.json)")
    args = parser.parse_args()
    if args.quick:
        args.dtypes, args.head_dims = ["bf16"], [64, 128]
    arch = target_arch(args.target)

    if args.plan:
        cases = list(plan_cases(args.plan, args.dtypes))
    elif args.backward:
        cases = list(backward_cases(args.families, args.dtypes, args.head_dims, not args.no_causal,
                                    MODIFIED if args.modified else PLAIN, args.accumulate))
    else:
        cases = list(attention_cases(args.families, args.dtypes, args.head_dims, args.tiles, not args.no_causal,
                                     MODIFIED if args.modified else PLAIN))
        if not args.no_linear:
            cases += list(linear_cases(args.dtypes))
    console = Console(width=150)
    console.print(f"compiling {len(cases)} kernels for sm_{arch} with {args.workers} worker(s)...")
    reports = compile_calls([call for _, call in cases], arch, workers=args.workers)

    table = Table(title=f"sparsec Triton kernels compiled for sm_{arch} (Triton {software_versions()['triton']})")
    for column in ("kernel", "dtype", "D", "tiles m.n.w.s", "shared KB", "regs", "spill B", "mma", "async", "s", "problems"):
        table.add_column(column)
    rows = []
    for (case, _), report in zip(cases, reports):
        row = {**case, "shared_bytes": report.shared_bytes, "shared_limit": report.shared_limit,
               "registers": report.registers, "spill_bytes": report.spill_bytes, "mma": report.mma,
               "async_loads": report.async_loads, "compile_seconds": round(report.seconds, 2),
               "problems": report.problems()}
        rows.append(row)
        name = f"{case['layer']}: {case['family']}" if "layer" in case else case.get("family", case["kernel"])
        name += f" {case['kernel'].removeprefix('backward_')}" if case["kernel"].startswith("backward") else ""
        name += (" +cap" if case.get("softcap") else "") + (" +sinks" if case.get("sinks") else "")
        table.add_row(name, case["dtype"], str(case.get("head_dim", "")), ".".join(map(str, case["tiles"])),
                      f"{report.shared_bytes / 1024:.0f}", str(report.registers), str(report.spill_bytes),
                      report.mma, "yes" if report.async_loads else "no", f"{report.seconds:.1f}",
                      _short(report.problems()))
    console.print(table)
    bad = [r for r in rows if r["problems"]]
    console.print(f"{len(rows) - len(bad)} of {len(rows)} kernels compile for sm_{arch} within its shared memory "
                  f"and without spills; {len(bad)} with problems.")
    if args.no_save:
        return
    now = datetime.datetime.now(datetime.timezone.utc)
    record = {
        "benchmark": "compile_check", "target": f"sm_{arch}", "device": "none (compiled ahead of time on CPU)",
        "versions": software_versions(), "date": now.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {"plan": args.plan} if args.plan else {"seq": SEQ, "heads": HEADS, "causal": not args.no_causal,
                                                              "modified": args.modified, "backward": args.backward},
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = Path(args.output) if args.output else RESULTS / f"compile_sm{arch}_{now:%Y%m%d_%H%M%S}.json"
    path.write_text(json.dumps(record, indent=1))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
