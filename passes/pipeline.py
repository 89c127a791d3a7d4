"""The pass pipeline: a visible list of named IR -> IR stages, run in order.

    stages = default_stages(config, weights) [("apply_patterns", ...), ("analyze_weights", ...),
                                              ("choose_linear_kernels", ...)]
    final, history = run_pipeline(graph, stages, verify=True)

`history` is [(stage name, IR after it), ...], starting with ("lower", the input graph), so dumps
and sparsec.explain can show every stage by name. Each graph's provenance records the stage and
its time. With verify (tests, SPARSEC_VERIFY=1, option "verify"), the IR is verified after
lowering and after every stage; a failure names the stage that broke it.
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from sparsec.config import SparsecConfig
from sparsec.ir.graph import Graph
from sparsec.ir.verifier import verify as verify_graph

from .analyze_weights import analyze_weights
from .apply_patterns import apply_patterns
from .choose_linear_kernels import choose_linear_kernels

__all__ = ["Stage", "default_stages", "run_pipeline"]

log = logging.getLogger(__name__)

Stage = tuple[str, Callable[[Graph], Graph]]


def default_stages(config: SparsecConfig, weights: Mapping[str, torch.Tensor] | None = None) -> list[Stage]:
    """The stages sparsec runs after lowering, in order. `weights`: parameter path -> real tensor
    (the linear weights analyze_weights reads; without them their types stay as lowered)."""
    return [
        ("apply_patterns", functools.partial(apply_patterns, config=config)),
        ("analyze_weights", functools.partial(analyze_weights, weights=weights or {})),
        ("choose_linear_kernels", functools.partial(choose_linear_kernels, config=config)),
    ]


def _verified(graph: Graph, stage: str) -> Graph:
    try:
        verify_graph(graph)
    except ValueError as e:
        raise RuntimeError(f"the IR after stage {stage!r} is invalid: {e}") from e
    return graph


def run_pipeline(graph: Graph, stages: Sequence[Stage], *, verify: bool) -> tuple[Graph, list[tuple[str, Graph]]]:
    """Run `stages` on `graph`; return the final graph and the IR after each stage."""
    history = [("lower", _verified(graph, "lower") if verify else graph)]
    for name, stage in stages:
        start = time.perf_counter()
        result = stage(graph)
        took_ms = (time.perf_counter() - start) * 1e3
        graph = result.replace_ops(result.ops, provenance=f"{name} (took {took_ms:.1f} ms)")
        if verify:
            _verified(graph, name)
        log.debug("stage %s on graph %s took %.1f ms", name, graph.name, took_ms)
        history.append((name, graph))
    return graph, history
