"""Capture: a Dynamo FX graph -> the aot_autograd ATen graph sparsec lowers, and parameter paths.

Dynamo hands the backend graphs whose parameters and buffers are placeholders with real values
(their `grapharg` source says where they live: L['self']._modules['blocks']._modules['0']...).
aot_autograd traces such a graph, under no_grad, to its functional inference ATen graph with no
decomposition table: softmax, SDPA, addmm stay whole, as the matchers expect. (Inductor's table
would split softmax into amax/exp/sum/div; Inductor applies it itself when it compiles the
rewritten graph.) The ATen graph's placeholders are the Dynamo graph's inputs in the same order
(plus, first, any parameters Dynamo left as attributes, which aot_autograd lifts).

Inputs mutated in place (a static KV cache written with index_copy_, BatchNorm's running
statistics) stay in the graph, as aot_autograd keeps them for Inductor: the functional graph ends
with `copy_(input, new_value)` nodes, which the rewrite leaves alone, so the rewritten graph
mutates its inputs exactly as the Dynamo graph does. A mutation aot_autograd cannot keep in the
graph (of an input's metadata: `x.transpose_()`, `x.resize_()`) would return the new value as an
extra output that only aot_autograd's runtime wrapper applies; such graphs are refused
(CaptureError, the backend falls back).

    run_aot(gm, example_inputs, fw_compiler)    aot_autograd; fw_compiler(aten_gm, fake_inputs)
                                                gets each forward / backward / inference graph
    capture_inference_graph(gm, example_inputs) the inference ATen graph
    placeholder_paths(gm)                       Dynamo placeholder index -> parameter path
    param_values(gm, example_inputs, paths)     parameter path -> its real tensor
    aten_param_paths(aten_gm, paths)            ATen placeholder name -> parameter path
    mutated_inputs(gm)                          positions of the inputs the graph copies new values into
    read_mutated_inputs_through_clones(gm)      for autograd: reads of a mutated input see a clone
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import fx

from .fx_utils import normalize_module_path

__all__ = [
    "run_aot", "capture_inference_graph", "placeholder_paths", "param_values", "aten_param_paths", "needs_autograd",
    "mutated_inputs", "read_mutated_inputs_through_clones", "CaptureError",
]

log = logging.getLogger(__name__)

FwCompiler = Callable[[fx.GraphModule, list], Callable]


class CaptureError(RuntimeError):
    """The Dynamo graph cannot be captured in a form sparsec rewrites (the backend falls back)."""


def run_aot(gm: fx.GraphModule, example_inputs: Sequence, fw_compiler: FwCompiler,
            bw_compiler: FwCompiler | None = None, keep_input_mutations: bool = False) -> Callable:
    """aot_autograd without a decomposition table; returns the compiled callable. With
    `keep_input_mutations`, an inference graph mutates its inputs itself (copy_ nodes)."""
    from torch._functorch.aot_autograd import aot_module_simplified

    return aot_module_simplified(gm, list(example_inputs), fw_compiler=fw_compiler,
                                 bw_compiler=bw_compiler or fw_compiler, inference_compiler=fw_compiler,
                                 keep_inference_input_mutations=keep_input_mutations)


def needs_autograd(example_inputs: Sequence) -> bool:
    """Whether aot_autograd will build a joint forward/backward graph for these inputs."""
    return torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


def _source_name(node: fx.Node) -> str | None:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    name = source.name
    return name() if callable(name) else name  # a method in older torch, a property in newer


def _is_module_state(node: fx.Node, source: str) -> bool:
    """A parameter or buffer of the model (constants across calls), not a runtime input."""
    example = getattr(node.meta.get("grapharg"), "example", None)
    return isinstance(example, torch.nn.Parameter) or "._buffers[" in source or "._parameters[" in source


def placeholder_paths(gm: fx.GraphModule) -> list[str | None]:
    """For each placeholder of the ATen graph aot_autograd will make from the Dynamo graph `gm`,
    in order: the parameter/buffer path ("blocks.0.attn.qkv.weight"), or None for an input."""
    lifted = [name for name, _ in gm.named_parameters(remove_duplicate=False)]
    lifted += [name for name, _ in gm.named_buffers(remove_duplicate=False)]
    paths: list[str | None] = list(lifted)  # attributes aot_autograd lifts to leading inputs
    for node in gm.graph.find_nodes(op="placeholder"):
        source = _source_name(node)
        paths.append(normalize_module_path(source) if source and _is_module_state(node, source) else None)
    return paths


def param_values(gm: fx.GraphModule, example_inputs: Sequence, paths: Sequence[str | None]) -> dict[str, torch.Tensor]:
    """Parameter path -> its tensor, for the placeholders `placeholder_paths(gm)` names: the
    attributes aot_autograd lifts, then Dynamo's example inputs (the real parameters)."""
    lifted = [t for _, t in gm.named_parameters(remove_duplicate=False)]
    lifted += [t for _, t in gm.named_buffers(remove_duplicate=False)]
    values = [*lifted, *example_inputs]
    return {path: value for path, value in zip(paths, values)
            if path and isinstance(value, torch.Tensor)}


def aten_param_paths(aten_gm: fx.GraphModule, paths: Sequence[str | None]) -> dict[str, str]:
    """ATen placeholder name -> parameter path, from `placeholder_paths` of its Dynamo graph."""
    names = [n.name for n in aten_gm.graph.find_nodes(op="placeholder")]
    if len(names) != len(paths):
        raise CaptureError(f"the ATen graph has {len(names)} placeholders but the Dynamo graph "
                           f"gives {len(paths)} inputs; cannot map parameters")
    return {name: path for name, path in zip(names, paths) if path}


def _check_mutations_in_graph() -> None:
    """Refuse graphs with an input mutation aot_autograd did not keep in the graph: their
    functional ATen graph returns the new value as an extra output, which only aot_autograd's
    runtime wrapper knows how to apply."""
    from torch._functorch._aot_autograd.schemas import MutationType
    from torch._guards import TracingContext

    context = TracingContext.try_get()
    meta = getattr(context, "fw_metadata", None)
    if meta is None:
        raise CaptureError("no aot_autograd metadata to check input mutations")
    outside = [i for i, info in enumerate(meta.input_info) if info.mutation_type == MutationType.MUTATED_OUT_GRAPH]
    if outside:
        raise CaptureError(f"inputs {outside} are mutated in a way the graph cannot hold "
                           "(their metadata: a view, resize_ or set_ in place)")


def capture_inference_graph(gm: fx.GraphModule, example_inputs: Sequence) -> fx.GraphModule:
    """The inference ATen graph of `gm`, traced under no_grad. sparsec rewrites it and compiles the
    result like a Dynamo graph, so graphs that need autograd are differentiated through the
    custom ops' backward."""
    captured: list[fx.GraphModule] = []

    def record(aten_gm: fx.GraphModule, _inputs: list) -> Callable:
        _check_mutations_in_graph()
        captured.append(aten_gm)
        return aten_gm.forward

    with torch.no_grad():
        run_aot(gm, example_inputs, record, keep_input_mutations=True)
    if len(captured) != 1:
        raise CaptureError(f"expected one inference graph from aot_autograd, got {len(captured)}")
    return captured[0]


def views_as_reshapes(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` with every aten.view as aten.reshape, in place, before Inductor traces it again.

    A view records that the strides the capture saw allowed it; Inductor's retrace propagates
    strides through its own decompositions and may give the input other ones (Gemma 2's keys after
    rotary embeddings, transposed for q @ k^T: "Cannot view a tensor with shape [3, 4, 16, 47] and
    strides (3008, 16, 1, 64)"). A reshape is a view wherever the strides allow one and a copy
    otherwise; in this functional graph nothing writes through a view, so the results are equal."""
    changed = False
    for node in gm.graph.find_nodes(op="call_function", target=torch.ops.aten.view.default):
        node.target = torch.ops.aten.reshape.default
        changed = True
    if changed:
        gm.recompile()
    return gm


def _input_copies(graph: fx.Graph) -> list[fx.Node]:
    """The copy_ nodes that write an input (mutations aot_autograd kept in the graph)."""
    return [n for n in graph.find_nodes(op="call_function", target=torch.ops.aten.copy_.default)
            if n.args[0].op == "placeholder"]


def mutated_inputs(gm: fx.GraphModule) -> set[int]:
    """Positions (among the placeholders) of the inputs `gm` writes new values into."""
    targets = {c.args[0] for c in _input_copies(gm.graph)}
    return {i for i, p in enumerate(gm.graph.find_nodes(op="placeholder")) if p in targets}


def read_mutated_inputs_through_clones(gm: fx.GraphModule) -> fx.GraphModule:
    """Where the graph ends by copying new values into its inputs (kept mutations), make every
    other read of such an input read a clone taken first, in place. Needed before differentiating
    the graph: an op that saves the input for its backward (BatchNorm saves its running
    statistics) would otherwise find it changed by the copy_ ("modified by an inplace
    operation"). A graph without such copies is returned as is."""
    graph = gm.graph
    copies = _input_copies(graph)
    if not copies:
        return gm
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    for target in dict.fromkeys(c.args[0] for c in copies):
        with graph.inserting_before(first_op):
            clone = graph.call_function(torch.ops.aten.clone.default, (target,))
        clone.meta = dict(target.meta)
        target.replace_all_uses_with(clone, delete_user_cb=lambda user: user not in copies and user is not clone)
    graph.lint()
    gm.recompile()
    return gm
