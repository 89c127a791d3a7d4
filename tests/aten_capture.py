"""Capture the inference ATen forward graphs the way sparsec's backend sees them.

`capture_aten(model, *inputs)` runs torch.compile with a recording backend: each Dynamo graph goes
through aot_autograd (no_grad, so the forward graph is the inference graph) and is recorded with
the mapping from its placeholder names to parameter paths ("blocks.0.attn.q_proj.weight"), read
from the Dynamo placeholders' sources. Each recorded graph then runs eagerly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx
from torch._dynamo.backends.common import aot_autograd

from sparsec.passes.fx_utils import normalize_module_path

__all__ = ["CapturedGraph", "capture_aten", "param_path_from_source"]


@dataclass
class CapturedGraph:
    gm: fx.GraphModule                                     # the ATen forward graph
    params: dict[str, str] = field(default_factory=dict)  # placeholder name -> parameter path
    example_inputs: list = field(default_factory=list)    # real placeholder values of the run


def param_path_from_source(source_name: str) -> str | None:
    """"L['self']._modules['blocks']._modules['0']._parameters['weight']" -> "blocks.0.weight";
    None for sources that are not attributes of the compiled module (which transformers' wrappers
    pass on as L['args'][0])."""
    if not source_name.startswith(("L['self']", "L['args'][0]")):
        return None
    return normalize_module_path(source_name)


def _dynamo_param_paths(gm: fx.GraphModule, model: torch.nn.Module) -> list[str | None]:
    """For each Dynamo placeholder in order, its parameter path (None for non-parameters)."""
    param_names = {name for name, _ in model.named_parameters()}
    paths = []
    for node in gm.graph.find_nodes(op="placeholder"):
        grapharg = node.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        name = getattr(source, "name", None)
        name = name() if callable(name) else name  # a method in older torch, a property in newer
        path = param_path_from_source(name) if isinstance(name, str) else None
        paths.append(path if path in param_names else None)
    return paths


def capture_aten(model: torch.nn.Module, *inputs, dynamic: bool = False) -> tuple[list[CapturedGraph], object]:
    """Compile `model` under no_grad with a recording backend; return (graphs, output)."""
    graphs: list[CapturedGraph] = []

    def backend(dynamo_gm: fx.GraphModule, example_inputs):
        paths = _dynamo_param_paths(dynamo_gm, model)
        # aot_autograd adds no leading inputs for a Dynamo graph whose parameters are lifted.
        assert not list(dynamo_gm.parameters()), "expected parameters lifted to placeholders"

        def record(aten_gm: fx.GraphModule, _fake_inputs):
            names = [n.name for n in aten_gm.graph.find_nodes(op="placeholder")]
            captured = CapturedGraph(aten_gm, {n: p for n, p in zip(names, paths, strict=True) if p})
            graphs.append(captured)

            def run(*args):
                captured.example_inputs = list(args)  # the real values, for Interpreter runs
                return aten_gm(*args)

            return run

        return aot_autograd(fw_compiler=record)(dynamo_gm, example_inputs)

    torch._dynamo.reset()
    with torch.no_grad():
        output = torch.compile(model, backend=backend, dynamic=dynamic)(*inputs)
    return graphs, output
