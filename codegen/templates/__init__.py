"""Triton source templates of the attention kernels, one per pattern family.

Each family module holds its two pieces of kernel text (the element mask and the key-block walk)
and the host code that packs its heads' parameters; common.py holds everything shared and the
renderer. `render(family)` gives the readable source.
"""
from __future__ import annotations

from sparsec.codegen.templates import (
    a_shape, block_sparse, columns, dense, frames_transposed, multi_diagonal, union, vertical_slash, window,
)
from sparsec.codegen.templates.common import FamilyTemplate, LayoutBuffer, PackedParams, kernel_name
from sparsec.codegen.templates.common import render as _render

__all__ = ["FAMILY_TEMPLATES", "FamilyTemplate", "LayoutBuffer", "PackedParams", "kernel_name", "render"]

FAMILY_TEMPLATES: dict[str, FamilyTemplate] = {
    m.TEMPLATE.family: m.TEMPLATE
    for m in (dense, window, multi_diagonal, columns, a_shape, vertical_slash, block_sparse, union, frames_transposed)
}


def render(family: str) -> str:
    """The Triton source of `family`'s kernel."""
    template = FAMILY_TEMPLATES.get(family)
    if template is None:
        raise ValueError(f"no attention kernel template for family {family!r}; known: {sorted(FAMILY_TEMPLATES)}")
    return _render(template)
