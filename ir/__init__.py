"""sparsec's sparsity-annotated IR: types, ops, graph, printer and parser, verifier.

Sparsity lives in the types (TensorType.sparsity); ops are frozen dataclasses; a Graph prints as
text that parses back to an equal Graph (parse_graph(print_graph(g)) == g).
"""
from __future__ import annotations

from .graph import Graph
from .ops import (OP_KINDS, Attention, Input, Linear, Op, Opaque, Output, Param, Value, operands_of,
                  results_of)
from .parser import IRParseError, parse_graph, parse_head_patterns, parse_pattern, parse_type
from .printer import format_op, format_pattern, format_sparsity, format_type, print_graph
from .types import (DENSE, DTYPES, AttentionPatterns, BlockSparse, DenseEncoding, Dim, NMSparse,
                    Sparsity, TensorType, Unstructured, dtype_name, is_static, torch_dtype)
from .verifier import IRVerificationError, verification_enabled, verify

__all__ = [
    "Dim", "Sparsity", "DenseEncoding", "AttentionPatterns", "NMSparse", "BlockSparse",
    "Unstructured", "DENSE", "DTYPES", "TensorType", "dtype_name", "torch_dtype", "is_static",
    "Value", "Op", "Param", "Input", "Linear", "Attention", "Opaque", "Output", "OP_KINDS",
    "operands_of", "results_of", "Graph",
    "print_graph", "format_type", "format_sparsity", "format_pattern", "format_op",
    "IRParseError", "parse_graph", "parse_type", "parse_pattern", "parse_head_patterns",
    "IRVerificationError", "verify", "verification_enabled",
]
