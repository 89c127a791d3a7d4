"""Correctness of the compiled CUDA kernels against float64 references: the first step of a GPU lease.

    python3 bench/cuda_check.py          # one line a case; exit status 1 on any mismatch
    python3 bench/cuda_check.py --smoke  # the same cases, tiny, through Triton's interpreter on CPU

The tests run the same Triton kernels through Triton's interpreter on CPU tensors; this runs them
compiled on the GPU, at sizes past one tile (odd lengths, GQA, causal, Sq != Sk, each dtype),
with fresh random inputs, against the tests' float64 reference (tests/reference.py: the
patterns' explicit masks); also the op under masks that cut the keys to a prefix (padded text keys,
a static cache's causal prefix: sparsec/key_padding.py) and a sliding window's band, soft-capped
scores (Gemma 2's softcap) and attention sinks (GPT-OSS's), and sparsec.attention's gradients.
"""
from __future__ import annotations

import math
import os
import sys
import time

if "--smoke" in sys.argv[1:]:  # before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import sparsec  # noqa: E402
from sparsec import patterns as P  # noqa: E402
from sparsec.codegen.linear_triton import bsr_linear_triton, nm_linear_triton  # noqa: E402
from sparsec.codegen.weight_packing import pack_bsr, pack_nm  # noqa: E402
from reference import reference_attention  # noqa: E402  (tests/reference.py)

TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # relative to max |reference|


def reference(q, k, v, patterns, causal: bool, scale: float) -> torch.Tensor:
    """The tests' float64 reference (tests/reference.py: explicit masks, no sparsec code), on the CPU."""
    q, k, v = (t.detach().cpu() for t in (q, k, v))
    return reference_attention(q, k, v, patterns, causal=causal, scale=scale)


def attention_cases(Sq: int, Sk: int):
    layout = torch.rand(math.ceil(Sq / 64), math.ceil(Sk / 64)) < 0.3
    return [
        ("dense", [P.Dense()]),
        ("window", [P.Window(100, 0), P.Window(37, 12)]),
        ("multi_diagonal", [P.MultiDiagonal([-256, 0, 256], 16)]),
        ("columns", [P.Columns([(0, 40), (300, 333)])]),
        ("a_shape", [P.AShape(16, 200)]),
        ("vertical_slash", [P.VerticalSlash([(0, 8), (500, 520)], [0, -64, -300])]),
        ("block_sparse", [P.BlockSparse(layout, 64)]),
        ("union", [P.Window(50, 0) | P.Columns([(0, 32)])]),
        ("mixed", [P.Dense(), P.Window(64, 0), P.Columns([(10, 90)]), P.BlockSparse(layout, 64)]),
    ]


def check_attention(device, cases) -> list[tuple[str, float, bool]]:
    results = []
    for dtype, ((Sq, Sk), causal, (Hq, Hkv), D) in cases:
        for name, base in attention_cases(Sq, Sk):
            label = f"attention {name:15s} {str(dtype)[6:]:9s} Sq={Sq} Sk={Sk} H={Hq}/{Hkv} D={D} causal={causal}"
            patterns = (base * Hq)[:Hq]
            q = torch.randn(2, Hq, Sq, D, device=device, dtype=dtype)
            k = torch.randn(2, Hkv, Sk, D, device=device, dtype=dtype)
            v = torch.randn(2, Hkv, Sk, D, device=device, dtype=dtype)
            scale = 1 / math.sqrt(D)
            results.append(_compare(label, lambda: sparsec.attention(q, k, v, patterns, causal=causal, scale=scale,
                                                                     backend="triton"),
                                    lambda: reference(q, k, v, patterns, causal, scale), dtype))
        if Sq == Sk:
            results.append(_check_transposed(device, dtype, Sq, causal, Hq, Hkv, D))
    return results


def _check_transposed(device, dtype, S: int, causal: bool, Hq: int, Hkv: int, D: int) -> tuple[str, float, bool]:
    """A temporal head (the same patch and the ones above and below in every frame) run in
    frame-transposed token order (forced: the frames_transposed kernel and the gathers)."""
    from sparsec.codegen.attention_triton import triton_attention

    frames = next((t for t in (8, 7, 5, 4, 3, 2) if S % t == 0), 1)
    frame = S // frames
    side = max(1, math.isqrt(frame))
    patterns = (P.MultiDiagonal([f * frame + r for f in range(1 - frames, frames) for r in (-side, 0, side)], 2),) * Hq
    q = torch.randn(2, Hq, S, D, device=device, dtype=dtype)
    k, v = (torch.randn(2, Hkv, S, D, device=device, dtype=dtype) for _ in range(2))
    scale = 1 / math.sqrt(D)
    label = (f"attention {'temporal (T)':15s} {str(dtype)[6:]:9s} S={S} ({frames} frames) H={Hq}/{Hkv} D={D} "
             f"causal={causal}")
    return _compare(label, lambda: triton_attention(q, k, v, patterns, causal=causal, scale=scale, frames=True),
                    lambda: reference(q, k, v, patterns, causal, scale), dtype)


def _compare(label: str, run, expected, dtype) -> tuple[str, float, bool]:
    """(label, max error of run() relative to max |expected()|, passed); an exception fails the case.
    Printed at once: under a time limit, the cases that ran are in the log even if the rest do not."""
    start = time.perf_counter()
    try:
        out = run()
        if out.is_cuda:
            torch.cuda.synchronize()
    except Exception as error:  # report it and go on: the other cases still tell something
        result = f"{label}: {type(error).__name__}: {error}", math.inf, False
    else:
        ref = expected()
        error = float((out.double().cpu() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
        result = label, error, bool(torch.isfinite(out).all()) and error <= TOLERANCE[dtype]
    label, error, ok = result
    print(f"{'ok  ' if ok else 'FAIL'} {label}  max rel error {error:.2e}  ({time.perf_counter() - start:.1f} s, "
          "compiling included)", flush=True)
    return result


# Families checked with a cap and with sinks: each is a compile of its own (the script's step in
# bench/gpu_session.sh has 120 s), and the modifiers are common text of every kernel.
MODIFIED_FAMILIES = ("dense", "window", "vertical_slash", "block_sparse", "mixed")


def check_score_modifiers(device, dtype, shape) -> list[tuple[str, float, bool]]:
    """Every family with scores capped at 30 (softcap: c * tanh(s / c) before the mask; the scores
    drawn a few times the cap so that capping changes the result), and with sinks (a logit a head
    in each row's softmax, with no value; one head's -inf)."""
    (Sq, Sk), causal, (Hq, Hkv), D = shape
    results = []
    for name, base in attention_cases(Sq, Sk):
        if name not in MODIFIED_FAMILIES:
            continue
        patterns = (base * Hq)[:Hq]
        q = torch.randn(1, Hq, Sq, D, device=device, dtype=dtype) * 4
        k = torch.randn(1, Hkv, Sk, D, device=device, dtype=dtype) * 4
        v = torch.randn(1, Hkv, Sk, D, device=device, dtype=dtype)
        sinks = torch.randn(Hq, device=device) * 10
        sinks[0] = float("-inf")
        scale = 1 / math.sqrt(D)
        for label, modifiers in (("softcap 30", {"softcap": 30.0}), ("sinks", {"sinks": sinks})):
            def expected(modifiers=modifiers):
                q64, k64, v64 = (t.detach().cpu() for t in (q, k, v))
                given = {key: value.cpu() if isinstance(value, torch.Tensor) else value
                         for key, value in modifiers.items()}
                return reference_attention(q64, k64, v64, patterns, causal=causal, scale=scale, **given)

            results.append(_compare(f"{label:10s} {name:15s} {str(dtype)[6:]:9s} Sq={Sq} Sk={Sk} causal={causal}",
                                    lambda modifiers=modifiers: sparsec.attention(
                                        q, k, v, patterns, causal=causal, scale=scale, backend="triton", **modifiers),
                                    expected, dtype))
    return results


def check_gradients(device, dtype, shape) -> list[tuple[str, float, bool]]:
    """sparsec.attention's gradients of q, k and v (the forward and the backward on the Triton kernels:
    codegen/attention_triton_backward.py) against float64 autograd of the reference: the mixed heads
    with a Skip head, at a shape whose forward kernels check_attention compiled already."""
    (Sq, Sk), causal, (Hq, Hkv), D = shape
    base = [P.Skip("mean")] + dict(attention_cases(Sq, Sk))["mixed"]
    patterns = (base * Hq)[:Hq]
    q, grad = (torch.randn(1, Hq, Sq, D, device=device, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(1, Hkv, Sk, D, device=device, dtype=dtype) for _ in range(2))
    scale = 1 / math.sqrt(D)

    def run():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = sparsec.attention(*leaves, patterns, causal=causal, scale=scale, backend="triton")
        return torch.cat([g.flatten() for g in torch.autograd.grad(out, leaves, grad)])

    def expected():
        leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
        out = reference_attention(*leaves, patterns, causal=causal, scale=scale)
        grads = torch.autograd.grad(out, leaves, grad.cpu().double(), allow_unused=True, materialize_grads=True)
        return torch.cat([g.flatten() for g in grads])

    label = f"gradients mixed+skip      {str(dtype)[6:]:9s} Sq={Sq} Sk={Sk} H={Hq}/{Hkv} D={D} causal={causal}"
    return [_compare(label, run, expected, dtype)]


def check_key_padding(device, dtype, S: int, D: int) -> list[tuple[str, float, bool]]:
    """The op a compiled model calls, with a mask that cuts the keys to a prefix (sparsec/key_padding.py):
    padded text keys (rows of different lengths) and a static cache's causal prefix, on the Triton kernels."""
    from sparsec.ops import attention as attention_op
    from sparsec.ops import patterns_to_json

    results = []
    patterns = (P.Window(S // 8, S // 8) | P.Columns([(S - 40, S)]), P.Skip("mean"), P.AShape(16, S // 16), P.Dense())
    q, k, v = (torch.randn(2, 4, S, D, device=device, dtype=dtype) for _ in range(3))
    lengths = torch.tensor([S - 7, S - 33], device=device)
    padded = (torch.arange(S, device=device)[None, :] < lengths[:, None])[:, None, None, :]
    prefill = torch.arange(S + 24, device=device)[None, :] <= torch.arange(S, device=device)[:, None]
    cache_k, cache_v = (torch.cat([t, torch.randn(2, 4, 24, D, device=device, dtype=dtype)], dim=2) for t in (k, v))
    scale = 1 / math.sqrt(D)
    text = patterns_to_json(patterns)
    os.environ["SPARSEC_ATTENTION_BACKEND"] = "triton"
    try:
        results.append(_compare(
            f"key padding     {str(dtype)[6:]:9s} S={S} D={D} rows of {S - 7} / {S - 33} keys",
            lambda: attention_op(q, k, v, padded, scale, False, text, site="cuda_check.padded", mask_rule="keys"),
            lambda: reference_attention(*(t.cpu() for t in (q, k, v)), patterns, scale=scale,
                                        key_mask=padded[:, 0, 0].cpu()), dtype))
        results.append(_compare(
            f"causal prefix   {str(dtype)[6:]:9s} S={S} of a {S + 24}-slot cache D={D}",
            lambda: attention_op(q, cache_k, cache_v, prefill[None, None], scale, False, text, site="cuda_check.cache",
                                 mask_rule="causal:0"),
            lambda: reference(q, k, v, patterns, True, scale), dtype))
        i, j = torch.arange(S, device=device)[:, None], torch.arange(S, device=device)[None, :]
        window = torch.stack([(j <= i) & (j > i - S // 5) & (j < n) for n in (S, S - S // 10)])[:, None]
        keep = window.cpu().expand(2, 4, S, S)
        results.append(_compare(  # Dense heads under rule "band": the window's band on the Window kernel
            f"sliding window  {str(dtype)[6:]:9s} S={S} window {S // 5} D={D}",
            lambda: attention_op(q, k, v, window, scale, False, patterns_to_json((P.Dense(),) * 4),
                                 site="cuda_check.window", mask_rule="band"),
            lambda: torch.softmax((q.double().cpu() @ k.double().cpu().transpose(-1, -2) * scale)
                                  .masked_fill(~keep, float("-inf")), -1) @ v.double().cpu(), dtype))
    finally:
        os.environ.pop("SPARSEC_ATTENTION_BACKEND", None)
    return results


def check_linear(device, shape) -> list[tuple[str, float, bool]]:
    results = []
    N, K, tokens = shape
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(tokens, K, device=device, dtype=dtype)
        bias = torch.randn(N, device=device, dtype=dtype)
        layout = torch.rand(N // 64, K // 64, device=device) < 0.5
        w_bsr = torch.randn(N, K, device=device, dtype=dtype) * layout.repeat_interleave(64, 0).repeat_interleave(64, 1)
        kept = torch.rand(N, K // 4, 4, device=device).argsort(dim=-1)[..., :2]
        nm_mask = torch.zeros(N, K // 4, 4, dtype=torch.bool, device=device).scatter_(-1, kept, True).view(N, K)
        w_nm = torch.randn(N, K, device=device, dtype=dtype) * nm_mask
        for name, w, run in (("bsr 64x64", w_bsr, lambda: bsr_linear_triton(x, pack_bsr(w_bsr, (64, 64)), bias)),
                             ("nm 2:4", w_nm, lambda: nm_linear_triton(x, pack_nm(w_nm, 2, 4), bias))):
            expected = lambda w=w: x.double().cpu() @ w.double().cpu().T + bias.double().cpu()  # noqa: E731
            results.append(_compare(f"linear {name:9s} {str(dtype)[6:]:9s} {tokens}x{K} -> {N}", run, expected, dtype))
    return results


def main() -> int:
    smoke = "--smoke" in sys.argv[1:]
    if smoke:  # the same cases, tiny, through Triton's interpreter on CPU: checks this script
        device = torch.device("cpu")
        shapes = [((70, 70), True, (2, 1), 16), ((33, 90), False, (2, 2), 16), ((1, 64), True, (2, 1), 16),
                  ((40, 40), False, (1, 1), 32)]
        linear = (128, 128, 20)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        shapes = [((1000, 1000), True, (8, 2), 128), ((777, 1301), False, (4, 4), 64), ((1, 1024), True, (4, 1), 64),
                  ((640, 640), False, (2, 2), 80)]
        linear = (1536, 1024, 1000)
        print(f"{torch.cuda.get_device_name(device)}; torch {torch.__version__}")
    else:
        print("cuda_check: no CUDA device here (this checks the compiled kernels on a GPU; --smoke: a tiny dry run)")
        return 2
    torch.manual_seed(0)
    # bf16 on every shape, fp16 on one (each case compiles its kernels), the linear kernels, then fp32
    # on one shape last: its exact dots run on CUDA cores and take the longest to compile.
    half = [(torch.bfloat16, s) for s in shapes] + [(torch.float16, shapes[0])]
    results = (check_attention(device, half) + check_key_padding(device, torch.bfloat16, shapes[3][0][0], 64)
               + check_score_modifiers(device, torch.bfloat16, shapes[0])
               + check_gradients(device, torch.bfloat16, shapes[0])
               + check_linear(device, linear) + check_attention(device, [(torch.float32, shapes[1])]))
    failed = sum(not ok for _, _, ok in results)
    print(f"{failed} of {len(results)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
