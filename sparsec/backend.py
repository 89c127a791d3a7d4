"""The torch.compile backend: `torch.compile(model, backend="sparsec", options={...})`.

For each graph Dynamo hands over:

    options -> SparsecConfig                         (bad options raise here, naming the key)
    Dynamo FX graph --aot_autograd--> ATen graph     (passes/capture.py)
      -> match attention and linear layers, lower to IR   (passes/match_*.py, passes/lower.py)
      -> IR stages: apply_patterns, analyze_weights (the real weights' zeros), choose_linear_kernels,
         ...                                                (passes/pipeline.py)
      -> rewrite the ATen graph with sparsec custom ops     (passes/rewrite_fx.py, sparsec/ops.py)
      -> compile it with Inductor (inner="inductor") or run it as is (inner="eager")

The ATen graph sparsec rewrites is the functional inference graph (traced under no_grad, no
decompositions, so the matchers see softmax and SDPA whole). The rewritten graph has the Dynamo
graph's inputs and outputs, so it is compiled exactly like a Dynamo graph: Inductor's compile_fx
(its own aot_autograd, decompositions, and backward through the custom ops' autograd when an
input requires grad), or, with inner="eager", run as is (through aot_autograd when a backward is
needed). A graph that mutates its inputs (a static KV cache, BatchNorm's running statistics)
keeps the mutations as copy_ nodes at its end, which the rewritten graph performs too (capture.py).

Any failure inside sparsec falls back: a warning on this logger names the graph and the reason,
and the original graph is compiled with Inductor (or run eagerly when inner="eager"). Errors in
the user's input (SparsecUserError, bad options) are raised instead. With fallback="raise"
(tests) internal failures are raised too.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import fx
from torch._dynamo.exc import RestartAnalysis

from sparsec.config import SparsecConfig, SparsecUserError, parse_options
from sparsec.dump import GraphRecord, next_graph_index, publish
from sparsec.passes import capture
from sparsec.passes.lower import lower
from sparsec.passes.match_attention import match_attention
from sparsec.passes.match_linear import match_linear
from sparsec.passes.pipeline import default_stages, run_pipeline
from sparsec.passes.rewrite_fx import rewrite_fx

__all__ = ["sparsec_backend", "sparsify_aten_graph"]

log = logging.getLogger(__name__)


def sparsify_aten_graph(aten_gm: fx.GraphModule, params: dict[str, str], config: SparsecConfig,
                        record: GraphRecord, weights: Mapping[str, torch.Tensor] | None = None) -> fx.GraphModule:
    """Match, lower, run the IR stages and rewrite one ATen graph; fills `record` as it goes.
    `weights` (parameter path -> real tensor) lets the stages read the linear weights' zeros."""
    record.aten_code = aten_gm.code
    # may add a node to the graph for a mask (a negation, a sum of biases)
    attention_matches = match_attention(aten_gm, unmatched=record.unmatched_attention)
    if config.attention_patterns or config.plan is not None or config.tune is not None:
        _warn_unmatched(record.unmatched_attention)
    linear_matches = match_linear(aten_gm, params)
    ir = lower(aten_gm, attention_matches, linear_matches, params, name=record.name)
    _, record.stages = run_pipeline(ir, default_stages(config, weights), verify=config.verify)
    rewritten = rewrite_fx(aten_gm, record.final_ir, rewrite_dense=config.rewrite_dense)
    record.rewritten_code = rewritten.code
    return rewritten


_warned_unmatched: set[tuple[str, str]] = set()


def _warn_unmatched(unmatched) -> None:
    """Patterns were asked for: say once per layer and reason which attention they cannot reach."""
    for u in unmatched:
        if (u.module_path, u.reason) not in _warned_unmatched:
            _warned_unmatched.add((u.module_path, u.reason))
            log.warning("attention %s (%s) is not matched, so no pattern or plan applies to it: %s",
                        u.module_path or "?", u.node, u.reason)


def _eager(gm: fx.GraphModule) -> Callable:
    from torch._functorch.aot_autograd import make_boxed_func

    return make_boxed_func(gm.forward)


def _compile_rewritten(rewritten: fx.GraphModule, example_inputs: Sequence, config: SparsecConfig) -> Callable:
    """Compile the rewritten ATen graph as Dynamo's graph would have been compiled."""
    if capture.needs_autograd(example_inputs):
        rewritten = capture.read_mutated_inputs_through_clones(rewritten)
    if config.inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(capture.views_as_reshapes(rewritten), list(example_inputs))
    if capture.needs_autograd(example_inputs):  # aot_autograd builds the backward
        return capture.run_aot(rewritten, example_inputs, lambda g, _: _eager(g))
    return rewritten.forward


def _compile_original(gm: fx.GraphModule, example_inputs: Sequence, config: SparsecConfig) -> Callable:
    if config.inner == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, list(example_inputs))


def _compile(gm, example_inputs, config, record) -> Callable:
    params_of = capture.placeholder_paths(gm)
    aten_gm = capture.capture_inference_graph(gm, example_inputs)
    params = capture.aten_param_paths(aten_gm, params_of)
    if config.tune is not None:  # option "tune": tune this graph on its first inputs, then apply
        from sparsec.model_tuning import tune_graph

        record.plan = tune_graph(aten_gm, params, example_inputs, config)
        config = dataclasses.replace(config, tune=None, plan=record.plan)
    weights = capture.param_values(gm, example_inputs, params_of)
    rewritten = sparsify_aten_graph(aten_gm, params, config, record, weights=weights)
    if not _calls_sparsec(rewritten):  # nothing to accelerate: the graph as backend="inductor" compiles it
        return _compile_original(gm, example_inputs, config)
    return _compile_rewritten(rewritten, example_inputs, config)


def _calls_sparsec(gm: fx.GraphModule) -> bool:
    return any(node.op == "call_function" and getattr(node.target, "namespace", None) == "sparsec"
               for node in gm.graph.nodes)


def sparsec_backend(gm: fx.GraphModule, example_inputs: Sequence[Any],
                    options: dict[str, Any] | SparsecConfig | None = None, mode: str | None = None) -> Callable:
    """The `backend="sparsec"` entry point (torch_dynamo_backends); see the module docstring."""
    if mode is not None:
        raise ValueError(f"backend='sparsec' takes no mode (got mode={mode!r}); pass options=... instead")
    config = parse_options(options)
    index = next_graph_index()
    record = GraphRecord(index=index, name=f"graph_{index}", dynamo_code=gm.code, inner=config.inner)
    try:
        compiled = _compile(gm, example_inputs, config, record)
    except (SparsecUserError, RestartAnalysis):
        raise  # the user's error; or Dynamo's control flow (it retraces and calls us again)
    except Exception as e:
        if config.fallback == "raise":
            raise
        compiled = _fall_back(gm, example_inputs, config, record, e)
    publish(record, config.dump_dir)
    return compiled


def _fall_back(gm, example_inputs, config: SparsecConfig, record: GraphRecord, error: Exception) -> Callable:
    record.fallback_reason = f"{type(error).__name__}: {error}"
    fallback_to = "eager" if config.inner == "eager" else "Inductor"
    log.warning("sparsec could not compile graph %s (%s); compiling the original graph with %s",
                record.name, record.fallback_reason, fallback_to)
    return _compile_original(gm, example_inputs, config)
