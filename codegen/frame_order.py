"""Frame-transposed token order: the CPU executor's way to run temporal heads on dense key runs.

A video DiT's tokens come frame by frame: token i = f * F + p is position p of frame f (F tokens a
frame, T = S / F frames). A temporal head keeps, for query (f, p), the same position and its
neighbours in other frames: a MultiDiagonal with offsets k * F + r (|r| small) and a narrow width.
In that order every query block of bm rows reads, per diagonal, a run of bm + 2 * width keys of
which each row keeps 2 * width + 1: dozens of narrow runs, most of each read for nothing.

Transposed (position x = p * T + f), the same pairs lie in a few wide runs: position p's keys in
every frame are T consecutive tokens, so the union over k of the diagonals k * F + r is about
one run of (2 * width + 1) * T keys around x + r * T. The executor permutes q, k and v along the
sequence once (three gathers), runs `FramesTransposed(pattern, F)` (the same pairs, renumbered)
and un-permutes the output: exact, whatever the pattern and the causal rule, since the pattern's
row intervals in the new order come from its own (codegen.block_coverage.row_intervals).
codegen.attention_cpu_choice decides when it pays.
"""
from __future__ import annotations

import functools

import torch

from sparsec.patterns import MultiDiagonal, Pattern, Union, Window, _check_int

__all__ = ["FramesTransposed", "pattern_bands", "frame_candidates", "natural_index", "natural_rows", "transposed_index",
           "transposed_rows"]

# Frame strides worth pricing per pattern, and the shortest frame.
_MAX_FRAMES = 2
_MIN_FRAME = 8


class FramesTransposed(Pattern):
    """`base` with queries and keys renumbered in frame-transposed order: (x, y) is kept when base
    keeps (natural(x), natural(y)), natural(x) = (x % T) * frame + x // T, T = S / frame. For the
    executor only (self-attention: Sq == Sk, a multiple of frame); never stored in a Plan."""

    __slots__ = ("base", "frame")
    family = "frames_transposed"

    def __init__(self, base: Pattern, frame: int):
        if not isinstance(base, Pattern):
            raise TypeError(f"FramesTransposed: base must be a Pattern, got {type(base).__name__}")
        self._init(base=base, frame=_check_int("FramesTransposed frame", frame, minimum=1))

    def check_lengths(self, Sq: int, Sk: int) -> int:
        """The frame count T for these lengths; a clear error when they do not fit."""
        if Sq != Sk or Sq % self.frame:
            raise ValueError(f"FramesTransposed(frame={self.frame}) needs Sq == Sk, a multiple of the frame; "
                             f"got Sq={Sq}, Sk={Sk}")
        return Sq // self.frame

    def _key(self) -> tuple:
        return (self.base, self.frame)

    def keep(self, i, j, Sq, Sk):
        frames = self.check_lengths(Sq, Sk)
        return self.base.keep(_natural(i, frames, self.frame), _natural(j, frames, self.frame), Sq, Sk)

    def to_dict(self) -> dict:
        return {"type": "FramesTransposed", "base": self.base.to_dict(), "frame": self.frame}

    def __reduce__(self):
        return (FramesTransposed, (self.base, self.frame))

    def __repr__(self) -> str:
        return f"FramesTransposed({self.base!r}, frame={self.frame})"


def _natural(x: torch.Tensor, frames: int, frame: int) -> torch.Tensor:
    """Natural index of transposed positions x."""
    return (x % frames) * frame + x // frames


@functools.lru_cache(maxsize=256)
def natural_index(length: int, frame: int) -> torch.Tensor:
    """(length,) int64: transposed position x holds natural token natural_index[x] (gather the
    inputs with it)."""
    return _natural(torch.arange(length), length // frame, frame)


@functools.lru_cache(maxsize=256)
def transposed_index(length: int, frame: int) -> torch.Tensor:
    """(length,) int64: natural token i sits at transposed position transposed_index[i] (gather
    the output with it)."""
    i = torch.arange(length)
    return (i % frame) * (length // frame) + i // frame


def transposed_rows(x: torch.Tensor, frame: int) -> torch.Tensor:
    """x (B, H, S, D) with its rows in frame-transposed order, contiguous: one strided copy (the
    frames x positions grid transposed), about twice as fast as gathering rows by natural_index."""
    B, H, S, D = x.shape
    return x.reshape(B, H, S // frame, frame, D).transpose(2, 3).reshape(B, H, S, D)


def natural_rows(x: torch.Tensor, frame: int) -> torch.Tensor:
    """x (B, H, S, D) in frame-transposed order as a view of its rows in natural order, shaped
    (B, H, S // frame, frame, D) (frames x positions): copying it out is the only copy."""
    B, H, S, D = x.shape
    return x.reshape(B, H, frame, S // frame, D).transpose(2, 3)


def pattern_bands(pattern: Pattern) -> list[tuple[int, int, Pattern]] | None:
    """(first, last offset j - i, the band as a pattern) of each band, or None when the pattern
    keeps anything that is not a band."""
    if isinstance(pattern, Window):
        return [(-pattern.left, pattern.right, pattern)]
    if isinstance(pattern, MultiDiagonal):
        w = pattern.width
        return [(o - w, o + w, MultiDiagonal([o], w)) for o in pattern.offsets]
    if isinstance(pattern, Union):
        found = [pattern_bands(part) for part in pattern.parts]
        return None if any(f is None for f in found) else [band for f in found for band in f]
    return None


@functools.lru_cache(maxsize=1 << 14)
def frame_candidates(pattern: Pattern, Sq: int, Sk: int) -> tuple[int, ...]:
    """Frame strides worth pricing for `pattern` (codegen.frame_order), best first, at most
    _MAX_FRAMES: for self-attention of bands only, each band offset and each gap between
    neighbouring bands F that divides S (at least two frames, at least _MIN_FRAME tokens), scored
    by the bands whose centre lies within F / 4 of a nonzero multiple of F; two such bands at
    least (otherwise there is nothing to gather)."""
    found = pattern_bands(pattern)
    if found is None or Sq != Sk:
        return ()
    centres = sorted((first + last) / 2 for first, last, _ in found)
    offsets = {abs(round(c)) for c in centres} | {round(b - a) for a, b in zip(centres, centres[1:])}
    scores = {}
    for frame in offsets:
        if frame < _MIN_FRAME or Sq % frame or Sq // frame < 2:
            continue
        near = sum(abs(c) >= frame / 2 and abs(c - round(c / frame) * frame) <= frame / 4 for c in centres)
        if near >= 2:
            scores[frame] = near
    return tuple(sorted(scores, key=lambda f: (-scores[f], f))[:_MAX_FRAMES])
