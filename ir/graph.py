"""The IR graph: a named, topologically ordered tuple of ops ending in one Output.

A pass never edits a Graph; it builds a new one with `replace_ops`, recording itself in
`provenance` (e.g. "lower_attention (took 3 ms)"). Provenance is a note for dumps, not part of
the graph: two graphs that differ only in provenance are equal.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from .ops import Input, Op, Output, Param, Value, operands_of, results_of

__all__ = ["Graph"]

_GRAPH_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


@dataclass(frozen=True, slots=True, kw_only=True)
class Graph:
    """Ops in topological order: Param/Input first, a single Output last."""

    name: str
    ops: tuple[Op, ...]
    provenance: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _GRAPH_NAME.fullmatch(self.name):
            raise ValueError(f"graph name {self.name!r} must be an identifier (dots allowed)")
        if isinstance(self.ops, (str, bytes)) or not isinstance(self.ops, (tuple, list)):
            raise TypeError(f"Graph.ops must be a tuple of ops, got {type(self.ops).__name__}")
        object.__setattr__(self, "ops", tuple(self.ops))
        for i, op in enumerate(self.ops):
            if not isinstance(op, Op):
                raise TypeError(f"Graph.ops[{i}] is {type(op).__name__}, not an IR op")
        if not isinstance(self.provenance, str):
            raise TypeError(f"Graph.provenance must be a str, got {self.provenance!r}")

    def __str__(self) -> str:
        from .printer import print_graph  # the printer imports Graph

        return print_graph(self)

    def values(self) -> dict[str, Value]:
        """Every defined value by name, in definition order."""
        return {v.name: v for op in self.ops for v in results_of(op)}

    def users(self, value: Value | str) -> tuple[Op, ...]:
        """The ops that read `value` (a Value or its name), in graph order."""
        name = value.name if isinstance(value, Value) else value
        return tuple(op for op in self.ops if any(v.name == name for v in operands_of(op)))

    def producer(self, value: Value | str) -> Op | None:
        """The op that defines `value` (a Value or its name), or None."""
        name = value.name if isinstance(value, Value) else value
        return next((op for op in self.ops if any(v.name == name for v in results_of(op))), None)

    def ops_of(self, kind: type[Op] | tuple[type[Op], ...]) -> tuple[Op, ...]:
        """The ops that are instances of `kind`, in graph order."""
        return tuple(op for op in self.ops if isinstance(op, kind))

    @property
    def inputs(self) -> tuple[Input, ...]:
        return self.ops_of(Input)  # type: ignore[return-value]

    @property
    def params(self) -> tuple[Param, ...]:
        return self.ops_of(Param)  # type: ignore[return-value]

    @property
    def output(self) -> Output:
        """The Output op (the last op of a well-formed graph)."""
        outputs = self.ops_of(Output)
        if len(outputs) != 1:
            raise ValueError(f"graph {self.name} has {len(outputs)} Output ops; expected exactly 1")
        return outputs[0]  # type: ignore[return-value]

    def replace_ops(self, new_ops: Iterable[Op], provenance: str = "") -> Graph:
        """A new graph with the same name and `new_ops`; `provenance` says which pass made it."""
        return Graph(name=self.name, ops=tuple(new_ops), provenance=provenance)
