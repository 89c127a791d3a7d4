"""`sparsec.tune(model, example_inputs, target=, budget=) -> Plan`: tune a whole model.

    plan = sparsec.tune(model, (x,), target="h100", budget=0.02)
    print(plan); plan.save("plan.json")
    compiled = torch.compile(model, backend="sparsec", options={"plan": plan})

The model is compiled with sparsec (dense, run eagerly, every layer through sparsec's ops: option
rewrite_dense) and run under no_grad on the example inputs (and each of more_inputs); every call
of the sparsec::attention op hands its q, k, v to a recorder under the layer's module path
(sparsec.ops.recording_attention), so the tuner sees exactly the operands the
compiled model computes, for models written any way the matchers understand. The recorded calls
go to sparsec.tuning.tune_layers (calibration statistics -> candidates with measured errors ->
cost-model search). A call whose mask cuts the keys to a prefix (padded keys, or the causal rule
over a prefix, or left padding: sparsec/key_padding.py) is recorded as each batch row's queries
against its kept keys (under the causal rule or not; a left-padded row's own tokens, from position
0), which is how the patterns run on it; where rows differ, the
layer is tuned on the rows of its most common shape (a log line says how many were left out).
Calls with any other mask or bias are left out, and a layer with no other call stays dense (the
pattern kernels take no general mask). The plan carries a fingerprint of the model's attention
layers (module path, heads, kv heads, head size) for Plan.check_fingerprint, where a caller has
the whole model's layers; a compiled model checks each of its graphs against the plan's layers
instead (passes/apply_patterns.py), as Dynamo may split the model into several.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from sparsec.cost_models.hardware import HardwareProfile
from sparsec.passes.attention_stats import LayerSample
from sparsec.plan import Plan, attention_fingerprint

__all__ = ["tune", "record_attention", "model_attention_layers"]

log = logging.getLogger(__name__)


def as_inputs(example_inputs: Any) -> tuple:
    """A model's example inputs as a tuple of positional inputs (a lone tensor is one)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError("sparsec.tune: example_inputs must be a tensor or a tuple/list of the model's positional "
                    f"inputs, got {type(example_inputs).__name__}")


@contextlib.contextmanager
def _recorded_samples() -> Iterator[dict[str, list[LayerSample]]]:
    """Module path -> the q, k, v of every sparsec::attention call made inside the block (a call
    whose mask only pads keys: each batch row against its kept keys). Calls with another mask or
    bias (a sliding window's band among them), or without a module path, are left out (they stay
    dense; a log line says so)."""
    from sparsec.key_padding import mask_prefixes
    from sparsec.ops import recording_attention

    recorded: dict[str, list[LayerSample]] = defaultdict(list)
    masked: set[str] = set()
    unnamed = 0

    def record(site, q, k, v, attn_mask, scale, is_causal, softcap=0.0, sinks=None):
        nonlocal unnamed
        B, Sq, Sk = q.shape[0], q.shape[2], k.shape[2]
        prefixes = None if attn_mask is None or is_causal else mask_prefixes(attn_mask, B, Sq, Sk)
        if prefixes is not None and any(p.dense_heads_only for p in prefixes):
            prefixes = None  # a sliding window's band: Dense heads run so, nothing to tune
        if not site:
            unnamed += 1
        elif attn_mask is not None and prefixes is None:
            masked.add(site)
        elif prefixes is None or all(p == prefixes[0] and p.length == Sk and p.causal_queries(Sq) == Sq and not p.first
                                     for p in prefixes):  # one call will do
            causal = bool(is_causal) or (prefixes is not None and prefixes[0].causal and Sq > 1)
            recorded[site].append(LayerSample(q.detach(), k.detach(), v.detach(), causal=causal, scale=float(scale),
                                              softcap=float(softcap), sinks=_sinks(sinks)))
        else:  # each row's queries under the rule (not a right-padded batch's padding, nor a left-padded
            for b, p in enumerate(prefixes):  # one's: its own tokens, from position 0) against its kept keys
                rows, keys = slice(p.first, p.causal_queries(Sq)), slice(p.first, p.length)
                recorded[site].append(LayerSample(q[b:b + 1, :, rows].detach(), k[b:b + 1, :, keys].detach(),
                                                  v[b:b + 1, :, keys].detach(),
                                                  causal=p.causal and rows.stop - rows.start > 1,
                                                  scale=float(scale), softcap=float(softcap), sinks=_sinks(sinks)))

    with recording_attention(record):
        yield recorded
    for site in sorted(masked):
        log.info("sparsec.tune: attention %s has a mask or bias that does not cut the keys to a prefix; those calls "
                 "are not tuned%s", site, "" if site in recorded else " and it stays dense")
    for site, samples in recorded.items():
        recorded[site] = _most_common_lengths(site, samples)
    if unnamed:
        log.warning("sparsec.tune: %d attention call(s) have no module path; they stay dense", unnamed)


def _sinks(sinks: torch.Tensor | None) -> torch.Tensor | None:
    """A call's sinks as the tuner keeps them: (Hq,) float32, detached."""
    return None if sinks is None else sinks.detach().reshape(-1).float()


def _most_common_lengths(site: str, samples: list[LayerSample]) -> list[LayerSample]:
    """The samples with the layer's most common (Sq, Sk, causal), the longest among equally common
    ones (the most rows and keys seen): rows of padded calls keep different numbers of keys, and a
    layer is tuned at one shape."""
    shapes = Counter((s.q.shape[2], s.k.shape[2], s.causal) for s in samples)
    if len(shapes) == 1:
        return samples
    common = max(shapes, key=lambda shape: (shapes[shape], shape[0] * shape[1]))
    kept = [s for s in samples if (s.q.shape[2], s.k.shape[2], s.causal) == common]
    log.info("sparsec.tune: attention %s was called with (Sq, Sk, causal) in %s; tuned at %s, %d of %d recorded "
             "rows left out", site, sorted(shapes), common, len(samples) - len(kept), len(samples))
    return kept


def record_attention(model: torch.nn.Module, example_inputs: Any,
                     more_inputs: Sequence[Any] = ()) -> tuple[dict[str, list[LayerSample]], list]:
    """Run `model` through sparsec (dense, eager) on `example_inputs` and each of `more_inputs`,
    and return (module path -> recorded calls, the GraphRecords of the compiled graphs). Calls
    with a mask or bias are not recorded."""
    from sparsec.backend import sparsec_backend
    from sparsec.dump import recording

    runs = [as_inputs(example_inputs), *(as_inputs(more) for more in more_inputs)]
    backend = functools.partial(sparsec_backend, options={"inner": "eager", "rewrite_dense": True})
    torch._dynamo.reset()  # a fresh compile, so the recording graphs are the ones that run
    try:
        with recording() as records, _recorded_samples() as recorded, torch.no_grad():
            compiled = torch.compile(model, backend=backend)
            for inputs in runs:
                compiled(*inputs)
    finally:
        torch._dynamo.reset()
    return dict(recorded), list(records)


def model_attention_layers(records: Sequence) -> list[tuple[str, int, int, int]]:
    """(module path, heads, kv heads, head_dim) of every attention layer in compiled graphs'
    records, in order of first appearance (the input of attention_fingerprint)."""
    from sparsec.ir.ops import Attention

    layers: dict[str, tuple[str, int, int, int]] = {}
    for record in records:
        if record.final_ir is None:
            continue
        for op in record.final_ir.ops_of(Attention):
            layers.setdefault(op.module_path, (op.module_path, op.num_heads, op.num_kv_heads, op.q.type.shape[-1]))
    return list(layers.values())


def tune(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    target: str | HardwareProfile = "h100",
    budget: float = 0.02,
    progress: bool = True,
    backend: str | None = None,
    more_inputs: Sequence[Any] = (),
) -> Plan:
    """A Plan for `model` on `target`, each attention layer within `budget` (relative L2 error
    of its output on `example_inputs`). `more_inputs`: further calibration inputs, each like
    example_inputs (e.g. other denoising timesteps, other prompts); the statistics and the
    errors then cover all of them, so the budget holds on each layer's outputs over all the
    inputs together. `backend` forces sparsec.attention's backend for the error measurements
    (default: Triton on CUDA, the CPU executor on CPU)."""
    from sparsec.tuning import tune_layers

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"sparsec.tune: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(more_inputs, torch.Tensor) or not isinstance(more_inputs, (tuple, list)):
        raise TypeError("sparsec.tune: more_inputs must be a list of inputs, each a tensor or a tuple of the model's "
                        f"positional inputs, got {type(more_inputs).__name__}")
    recorded, records = record_attention(model, example_inputs, more_inputs)
    fallbacks = [r.fallback_reason for r in records if r.fallback_reason]
    if fallbacks:
        log.warning("sparsec.tune: %d graph(s) fell back and are not tuned: %s", len(fallbacks), fallbacks)
    layers = model_attention_layers(records)
    if not recorded:
        log.warning("sparsec.tune: %s; the plan is empty", "found no attention layer to tune" if not layers else
                    f"none of the model's {len(layers)} attention layers can be tuned (their masks do not cut the "
                    "keys to a prefix, see sparsec/key_padding.py, or they have no module path)")
    fingerprint = attention_fingerprint(layers)
    return tune_layers(recorded, target=target, budget=budget, progress=progress,
                       model_fingerprint=fingerprint, backend=backend)


def tune_graph(aten_gm, params: dict[str, str], example_inputs: Sequence, config) -> Plan:
    """The backend's option "tune": a Plan for one ATen graph from its first inputs.

    The graph is lowered and rewritten densely (on a copy), run once on `example_inputs` with the
    attention recorder on (inputs the graph writes, such as a KV cache or running statistics, are
    cloned first: the real call that follows writes them once), and its recorded layers are tuned
    with the option's target (default: the option `target`, i.e. this machine) and budget."""
    import copy

    from sparsec.backend import sparsify_aten_graph
    from sparsec.dump import GraphRecord
    from sparsec.passes.capture import mutated_inputs
    from sparsec.tuning import tune_layers

    settings = dict(config.tune)
    dense = dataclasses.replace(config, tune=None, plan=None, attention_patterns=(), dump_dir=None, rewrite_dense=True)
    scratch = GraphRecord(index=-1, name="tune", dynamo_code="")
    rewritten = sparsify_aten_graph(copy.deepcopy(aten_gm), params, dense, scratch)
    written = mutated_inputs(aten_gm)
    inputs = [x.clone() if i in written else x for i, x in enumerate(example_inputs)]
    with _recorded_samples() as recorded, torch.no_grad():
        rewritten(*inputs)
    target = settings.get("target", config.target)
    hardware = config.hardware() if target == "auto" else target
    fingerprint = attention_fingerprint(model_attention_layers([scratch]))
    plan = tune_layers(dict(recorded), target=hardware, budget=settings.get("budget", 0.02), progress=False,
                       model_fingerprint=fingerprint)
    log.info("sparsec tuned %d attention layer(s) of this graph:\n%s", len(plan.layers), plan)
    return plan
