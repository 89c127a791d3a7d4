"""sparsec.explain(model, *inputs, options=None): what sparsec makes of a model, as objects.

    report = sparsec.explain(model, x)
    print(report)                          # per graph: what was found (attention layers, linear
                                           # layers with sparse weights and their kernel), the final IR
    report.graphs[0].stage("lower")        # the IR Graph after a named stage
    report.graphs[0].rewritten_code        # the rewritten ATen FX graph, as code

The model is compiled with backend="sparsec" (with `options`) and run once on `inputs` under
no_grad; every graph Dynamo produces (several after graph breaks) gives one GraphRecord, the
same content SPARSEC_DUMP_DIR writes. Dynamo's caches are reset first (torch._dynamo.reset()),
so the model is traced anew even if it was compiled before or a compile of it failed (after a
failure Dynamo may skip the frames it could not compile).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from sparsec.config import SparsecConfig, parse_options
from sparsec.dump import GraphRecord, recording
from sparsec.ir.ops import Attention, Linear, Opaque
from sparsec.ir.printer import format_type
from sparsec.ir.types import AttentionPatterns

__all__ = ["explain", "ExplainReport"]


def _estimates(op: Attention, hardware) -> str:
    """", est. dense X us -> Y us on <hw>" from the cost model; "" when it cannot price the op
    (symbolic shapes, an unsupported dtype)."""
    import dataclasses

    from sparsec.cost_models import estimate
    from sparsec.ir.types import DENSE

    if hardware is None:
        return ""
    try:
        dense = estimate(dataclasses.replace(op, scores=op.scores.with_sparsity(DENSE), tiles=None), hardware)
        chosen = estimate(op, hardware, block_m=op.tiles[0] if op.tiles else None,
                          block_n=op.tiles[1] if op.tiles else None)
    except (ValueError, TypeError):
        return ""
    tiles = f", tiles {op.tiles[0]}x{op.tiles[1]}" if op.tiles else ""
    return (f"{tiles}; est. on {hardware.name}: dense {dense * 1e6:.1f} us -> {chosen * 1e6:.1f} us"
            f"{_frame_order(op, hardware)}")


def _frame_order(op: Attention, hardware) -> str:
    """"; heads 1, 5 in frame-transposed order (frames of 256)" for the heads the executor runs
    so (codegen/frame_order.py), and "; heads 0, 2 on the native CPU kernels" for those the cpu
    executor runs on them (codegen/attention_cpu_native.py); "" for none."""
    from sparsec.cost_models import frame_transposed_heads, native_kernel_heads

    block_m, block_n = (op.tiles[0], op.tiles[1]) if op.tiles else (None, None)
    return (order_note(*frame_transposed_heads(op, hardware, block_m=block_m, block_n=block_n))
            + native_note(native_kernel_heads(op, hardware, block_m=block_m, block_n=block_n)))


def native_note(heads: tuple[int, ...]) -> str:
    """"; heads 0, 2 on the native CPU kernels", or "" for no heads."""
    if not heads:
        return ""
    return f"; head{'s' if len(heads) > 1 else ''} {', '.join(map(str, heads))} on the native CPU kernels"


def order_note(heads: tuple[int, ...], frame: int | None) -> str:
    """"; heads 1, 5 in frame-transposed order (frames of 256)", or "" for no heads (also the demo's)."""
    if not heads:
        return ""
    names = ", ".join(map(str, heads))
    return f"; head{'s' if len(heads) > 1 else ''} {names} in frame-transposed order (frames of {frame})"


def _attention_line(op: Attention, hardware=None) -> str:
    kind = "causal" if op.causal else "mask" if op.mask is not None else "full"
    if op.mask_rule == "band":
        kind += (" (runs by what it keeps: a sliding window's band, a causal prefix, left padding, padded keys; "
                 "rule 'band')")
    elif op.mask is not None and isinstance(op.scores.sparsity, AttentionPatterns):  # patterns under the mask
        kind += (f" (patterns where it cuts the keys to a prefix or pads rows on the left, rule "
                 f"{op.mask_rule or 'any'!r})")
    return (f"    attention {op.module_path or '?'}: heads {op.num_heads}/{op.num_kv_heads}, {kind}, "
            f"scale {op.scale:.4g}, scores {format_type(op.scores)}{_estimates(op, hardware)}")


def _linear_line(op: Linear) -> str:
    tokens = ""
    if op.kernel != "dense" and (op.min_tokens, op.max_tokens) != (0, None):
        tokens = f" for tokens {op.min_tokens}..{'' if op.max_tokens is None else op.max_tokens}"
    return (f"    linear {op.module_path or '?'}: weight {format_type(op.weight.type)}, "
            f"kernel {op.kernel}{tokens}")


def _summary(record: GraphRecord, hardware=None) -> list[str]:
    head = f"graph {record.name} (inner={record.inner})"
    if record.fallback_reason:
        return [f"{head}: sparsec fell back to the original graph: {record.fallback_reason}"]
    ir = record.final_ir
    if ir is None:
        return [f"{head}: no IR"]
    counts = {kind: len(ir.ops_of(cls)) for kind, cls in (("attention", Attention), ("linear", Linear),
                                                           ("opaque", Opaque))}
    lines = [f"{head}: " + ", ".join(f"{n} {kind}" for kind, n in counts.items())
             + f"; stages: {', '.join(name for name, _ in record.stages)}"]
    if record.rewritten_code:
        fused = {kind: record.rewritten_code.count(f"torch.ops.sparsec.{kind}.default(") for kind in ("attention", "linear")}
        lines.append("    run by sparsec's ops: " + ", ".join(f"{fused[k]} {k}" for k in fused)
                     + "; the rest (dense) stay the model's own ops" * any(counts[k] > fused[k] for k in fused))
    lines += [_attention_line(op, hardware) for op in ir.ops_of(Attention)]
    lines += [f"    attention {u.module_path or '?'} ({u.node}) not matched, runs as written: {u.reason}"
              for u in record.unmatched_attention]
    if record.plan is not None:
        lines.append(f"    tuned plan: {len(record.plan.layers)} layer(s) (record.plan; plan.json in dumps)")
    lines += [_linear_line(op) for op in ir.ops_of(Linear) if op.kernel != "dense" or not op.weight.type.is_dense]
    return lines


@dataclass
class ExplainReport:
    """One GraphRecord per graph Dynamo compiled, in compile order."""

    graphs: list[GraphRecord]
    hardware: Any = None    # the HardwareProfile the estimates are for (option "target", or this machine)

    def summary(self) -> str:
        """A few lines per graph: the ops found, the attention layers, the sparse linear layers."""
        lines = [f"sparsec explain: {len(self.graphs)} graph(s)"]
        for record in self.graphs:
            lines += _summary(record, self.hardware)
        return "\n".join(lines)

    def __str__(self) -> str:
        parts = [self.summary()]
        for record in self.graphs:
            if record.final_ir is not None:
                parts.append(f"--- final IR of {record.name} ---\n{record.final_ir}")
        return "\n\n".join(parts)


def explain(model: torch.nn.Module, *inputs: Any,
            options: Mapping[str, Any] | SparsecConfig | None = None) -> ExplainReport:
    """Compile `model` with sparsec, run it once on `inputs`, and report every graph."""
    from sparsec.backend import sparsec_backend

    config = parse_options(options)  # bad options raise here, before any compiling
    backend = functools.partial(sparsec_backend, options=config)
    torch._dynamo.reset()
    with recording() as records, torch.no_grad():
        torch.compile(model, backend=backend)(*inputs)
    return ExplainReport(graphs=list(records), hardware=config.hardware())
