"""KernelCall: one launch of a Triton kernel, described rather than made.

The Triton entry points build their launches as KernelCalls (grid, arguments, constexprs, tiles)
and run them; codegen/triton_aot compiles the same description for a GPU that is not present.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["KernelCall"]


@dataclass(frozen=True)
class KernelCall:
    """`kernel` (a @triton.jit function defined in the source file `path`) launched on `grid` with
    positional `args` and keyword `kwargs` (constexprs, num_warps, num_stages)."""

    path: Path
    kernel: str
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def launch(self, kernel) -> None:
        """Launch through `kernel`, the loaded @triton.jit object of this call."""
        kernel[self.grid](*self.args, **self.kwargs)
