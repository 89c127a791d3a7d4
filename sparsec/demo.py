"""`sparsec demo`: compile the bundled tiny DiT with per-head sparse attention patterns, on CPU.

Steps, each printed:
  1. eager output of the dense model;
  2. sparsec without patterns: must equal eager (the exact dense path);
  3. sparsec with per-head patterns on every self-attention layer ("blocks.*.attn"): windows and
     multi-diagonals at the frame stride, i.e. each head looks at nearby tokens of its own frame
     or at the same place in other frames. Checked against the eager model whose attention uses
     the same patterns as explicit masks, and compared with the dense output (how much the
     patterns change the result);
  4. sparsec.explain's summary of what was compiled;
  5. CPU timings: eager vs sparsec dense vs sparsec sparse (median of a few runs).

run_tuned_demo (`sparsec demo`, unless --no-tune) goes on with what sparsec.tune is for: the same
model with positional heads (sparsec.models.positional_dit: local, temporal, sink and content
heads), tuned for the "cpu" target on one input, compiled with the plan, and checked on a fresh
input: each layer's chosen families, the output's change against the dense model, and the times.
"""
from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparsec import patterns as P
from sparsec.backend import sparsec_backend
from sparsec.explain import explain
from sparsec.models.tiny_dit import TinyDiTConfig, example_inputs, tiny_dit, with_roles
from sparsec.plan import Plan

__all__ = ["DEMO_CONFIG", "demo_patterns", "run_demo", "DemoResult", "run_tuned_demo", "TunedDemoResult"]

# 8 frames of 16 x 16 patches: 2048 tokens, where attention is most of a forward on a CPU and the
# patterns' savings show (at 512 tokens the linear layers dominate and sparse ~ dense).
DEMO_CONFIG = TinyDiTConfig(height=32, width=32)

# float32 outputs of the same math in a different order (fused kernels, other reductions)
ATOL, RTOL = 1e-4, 1e-4


def demo_patterns(config: TinyDiTConfig) -> list[P.Pattern]:
    """One pattern per head, built from the frame stride (tokens per frame)."""
    frame = config.tokens_per_frame
    neighbours = [k * frame for k in range(-2, 3)]
    all_frames = [k * frame for k in range(-(config.frames - 1), config.frames)]
    patterns = [
        P.Window(frame // 2, frame // 2),              # nearby tokens of the same frame
        P.MultiDiagonal(neighbours, frame // 8),       # the same place, two frames either side
        P.Window(frame, frame),                        # about one frame around the token
        P.MultiDiagonal(all_frames, frame // 16),      # the same place in every frame
    ]
    return [patterns[h % len(patterns)] for h in range(config.heads)]


@dataclass
class DemoResult:
    dense_error: float          # max |sparsec dense - eager|
    sparse_error: float         # max |sparsec sparse - eager with pattern masks|
    sparse_vs_dense: float      # ||sparse - dense|| / ||dense||
    density: float              # kept fraction of the self-attention pairs
    timings: dict[str, float]   # name -> median seconds
    summary: str                # sparsec.explain's summary


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _compiled(model, options: dict) -> Callable:
    return torch.compile(model, backend=functools.partial(sparsec_backend, options=options))


def run_demo(config: TinyDiTConfig | None = None, inner: str = "eager", repeats: int = 3,
             write: Callable[[str], None] = lambda line: None) -> DemoResult:
    """Run the demo; `write` receives the report line by line."""
    config = config or DEMO_CONFIG
    model, inputs = tiny_dit(config)
    head_patterns = demo_patterns(config)
    sparse_options = {"inner": inner, "attention_patterns": {"blocks.*.attn": head_patterns}}
    write(f"tiny DiT: {config.frames} frames x {config.tokens_per_frame} tokens = {config.tokens} tokens, "
          f"dim {config.dim}, {config.heads} heads, {config.depth} blocks; inner={inner}")
    with torch.no_grad():
        eager = model(*inputs)
        dense_model = _compiled(model, {"inner": inner})
        dense = dense_model(*inputs)
        sparse_model = _compiled(model, sparse_options)
        sparse = sparse_model(*inputs)
        model.set_head_patterns(tuple(head_patterns))
        eager_masked = model(*inputs)
        model.set_head_patterns(None)
        result = DemoResult(
            dense_error=(dense - eager).abs().max().item(),
            sparse_error=(sparse - eager_masked).abs().max().item(),
            sparse_vs_dense=((sparse - dense).norm() / dense.norm()).item(),
            density=statistics.mean(p.density(config.tokens, config.tokens) for p in head_patterns),
            timings={"eager": _median_seconds(lambda: model(*inputs), repeats),
                     "sparsec dense": _median_seconds(lambda: dense_model(*inputs), repeats),
                     "sparsec sparse": _median_seconds(lambda: sparse_model(*inputs), repeats)},
            summary=explain(model, *inputs, options=sparse_options).summary())
    _report(result, head_patterns, write)
    return result


def _report(result: DemoResult, head_patterns: list[P.Pattern], write: Callable[[str], None]) -> None:
    ok = lambda error, scale: "OK" if error <= ATOL + RTOL * scale else "MISMATCH"  # noqa: E731
    write(f"sparsec dense  vs eager:               max abs diff {result.dense_error:.2e}  "
          f"{ok(result.dense_error, 1.0)}")
    write(f"sparsec sparse vs eager (same masks):  max abs diff {result.sparse_error:.2e}  "
          f"{ok(result.sparse_error, 1.0)}")
    write(f"sparse vs dense output: relative difference {result.sparse_vs_dense:.3f} "
          f"(self-attention keeps {result.density:.1%} of the pairs)")
    write("patterns per head: " + ", ".join(repr(p) for p in head_patterns))
    write(result.summary)
    write("CPU time per forward (median): " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in result.timings.items()))


@dataclass
class TunedDemoResult:
    plan: Plan
    sparse_vs_dense: float      # ||tuned - dense|| / ||dense|| on a fresh input
    timings: dict[str, float]   # name -> median seconds
    tune_seconds: float


def _order_note(layer, target) -> str:
    """"; head 1 in frame-transposed order (frames of 256)" for the heads the target's executor
    runs so, and "; head 0 on the native CPU kernels" (sparsec.explain's notes)."""
    from sparsec.cost_models import native_heads, transposed_heads
    from sparsec.cost_models.attention_cost import AttentionShape
    from sparsec.explain import native_note, order_note

    shape = AttentionShape(batch=1, num_heads=layer.num_heads, num_kv_heads=layer.num_kv_heads, q_len=layer.q_len,
                           kv_len=layer.kv_len, head_dim=layer.head_dim, value_dim=layer.head_dim, dtype=layer.dtype,
                           causal=layer.causal)
    return (order_note(*transposed_heads(layer.patterns, shape, None, layer.tiles[1], target))
            + native_note(native_heads(layer.patterns, shape, None, target)))


def run_tuned_demo(config: TinyDiTConfig | None = None, inner: str = "eager", repeats: int = 3, budget: float = 0.02,
                   target="cpu", write: Callable[[str], None] = lambda line: None) -> TunedDemoResult:
    """Tune the model with positional heads, compile it with the plan, check it on a fresh input."""
    from sparsec.model_tuning import tune

    config = with_roles(config or DEMO_CONFIG)
    model, calibration = tiny_dit(config)
    write(f"\nsparsec.tune: the same model with positional heads ({', '.join(config.head_roles)}; "
          f"rotated per block), budget {budget} per layer, target {getattr(target, 'name', target)}")
    start = time.perf_counter()
    plan = tune(model, calibration, target=target, budget=budget, progress=False)
    tune_seconds = time.perf_counter() - start
    fresh = example_inputs(config, seed=7)
    with torch.no_grad():
        dense_model = _compiled(model, {"inner": inner})
        tuned_model = _compiled(model, {"inner": inner, "plan": plan})
        dense, tuned = dense_model(*fresh), tuned_model(*fresh)
        result = TunedDemoResult(
            plan=plan, sparse_vs_dense=((tuned - dense).norm() / dense.norm()).item(), tune_seconds=tune_seconds,
            timings={"sparsec dense": _median_seconds(lambda: dense_model(*fresh), repeats),
                     "sparsec tuned": _median_seconds(lambda: tuned_model(*fresh), repeats)})
    for path, layer in plan.layers.items():
        if layer.q_len == layer.kv_len:
            heads = ", ".join(f"{type(p).__name__} {layer.density(h):.1%}" for h, p in enumerate(layer.patterns))
            write(f"  {path}: {heads}; error {layer.error:.4f}, est. {layer.speedup:.2f}x{_order_note(layer, target)}")
    write(f"tuned in {tune_seconds:.1f} s; on a fresh input the tuned output differs from dense by "
          f"{result.sparse_vs_dense:.4f} (relative L2)")
    write("CPU time per forward (median): " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in result.timings.items()))
    return result
