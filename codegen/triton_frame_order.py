"""Which heads the Triton kernels run in frame-transposed token order (codegen/frame_order.py).

In token order a temporal head's kernel visits, per query block, a key block or two for each of
its dozens of narrow diagonals (at S = 16K in frames of 1024, 128 x 64 tiles, a head keeping 1.5%
of the pairs visits a quarter of the key blocks, by block_coverage); in frame-transposed order the
same pairs lie in a few runs (a twentieth of the blocks). The frames_transposed kernel
(codegen/templates/frames_transposed.py) walks the renumbered pattern's block tables;
triton_attention gathers the transposed heads' q, k and v into that order, launches them
together, and gathers their outputs back.

The choice is the cost model's, for frame strides of at most BLOCK_N frames (a key tile then
holds a patch's tokens in every frame, and codegen/frame_coverage.py counts the tiles in closed
form). For each of the layer's most common frame strides, a head is transposed when it alone is
cheaper so, its gathers included; the layer's patterns with those heads transposed, plus the gathers (each transposed
head's q, k, v and output read and written once, at the device's memory bandwidth), are
priced against the patterns as they are, and the cheapest wins. The gathers move only the
transposed heads' rows, so a head's share of them is its own. `frames` True / False forces the
transposed order (where a head has a frame stride) or the natural one.
"""
from __future__ import annotations

import dataclasses
import functools
from collections import Counter

import torch

from sparsec.codegen.frame_order import FramesTransposed, frame_candidates
from sparsec.ir.types import dtype_name, torch_dtype
from sparsec.patterns import Pattern

__all__ = ["choose_frame_order", "gather_seconds", "kernel_frames", "priced_frame_order"]

# Frame strides priced a layer (the most common among its heads' candidates).
_MAX_STRIDES = 3


def choose_frame_order(head_patterns: tuple[Pattern, ...], q_shape, k_shape, v_shape, dtype: torch.dtype,
                       causal: bool, block_m: int, block_n: int, hardware,
                       frames: bool | None = None) -> tuple[tuple[Pattern, ...], int | None]:
    """(the patterns to launch, the frame stride) — FramesTransposed for the heads run in that
    order — or (head_patterns, None) when none is. `hardware`: a cost-model profile or its name."""
    patterns, frame, _ = _choose(tuple(head_patterns), tuple(q_shape), tuple(k_shape), tuple(v_shape), dtype,
                                 bool(causal), block_m, block_n, _hashable(hardware), frames)
    return patterns, frame


def kernel_frames(pattern: Pattern, Sq: int, Sk: int, block_n: int) -> tuple[int, ...]:
    """The frame strides of `pattern` the kernels consider (frame_candidates): those whose frames
    fit a key tile (T <= BLOCK_N), priced in closed form (codegen.frame_coverage)."""
    return tuple(f for f in frame_candidates(pattern, Sq, Sk) if Sq // f <= block_n)


def priced_frame_order(head_patterns: tuple[Pattern, ...], shape, block_m: int, block_n: int,
                       hardware) -> tuple[tuple[Pattern, ...], float]:
    """For the cost model (cost_models.estimate): the patterns triton_attention launches for an
    attention of `shape` (cost_models AttentionShape) and the seconds of its gathers (0 when no
    head is transposed)."""
    patterns, _, gathers = _choose(tuple(head_patterns), *_tensor_shapes(shape), torch_dtype(shape.dtype), shape.causal,
                                   block_m, block_n, _hashable(hardware), None)
    return patterns, gathers


def _tensor_shapes(shape) -> tuple[tuple[int, int, int, int], ...]:
    """The q, k and v shapes of an attention of `shape` (cost_models AttentionShape)."""
    return ((shape.batch, shape.num_heads, shape.q_len, shape.head_dim),
            (shape.batch, shape.num_kv_heads, shape.kv_len, shape.head_dim),
            (shape.batch, shape.num_kv_heads, shape.kv_len, shape.value_dim))


def _hashable(hardware) -> str:
    """A profile's name, or a profile object as its JSON text (its figures are dicts)."""
    return hardware if isinstance(hardware, str) else hardware.to_json()


def _profile(hardware: str):
    from sparsec.cost_models.hardware import HardwareProfile, get_profile

    return HardwareProfile.from_json(hardware) if hardware.lstrip().startswith("{") else get_profile(hardware)


@functools.lru_cache(maxsize=4096)  # once a layer
def _choose(head_patterns, q_shape, k_shape, v_shape, dtype, causal, block_m, block_n, hardware, frames):
    Sq, Sk = q_shape[2], k_shape[2]
    if frames is False or Sq != Sk or any(isinstance(p, FramesTransposed) for p in head_patterns):
        return head_patterns, None, 0.0  # (patterns already renumbered run as given, on the tensors as given)
    candidates = [kernel_frames(p, Sq, Sk, block_n) for p in head_patterns]
    strides = Counter(frame for found in candidates for frame in found)
    if not strides:
        return head_patterns, None, 0.0
    if frames:  # forced: the stride most heads have, for every head that has it
        frame = strides.most_common(1)[0][0]
        return tuple(FramesTransposed(p, frame) if frame in found else p
                     for p, found in zip(head_patterns, candidates)), frame, 0.0
    from sparsec.cost_models.attention_cost import AttentionShape, estimate_attention

    hw = _profile(hardware)
    shape = AttentionShape(batch=q_shape[0], num_heads=q_shape[1], num_kv_heads=k_shape[1], q_len=Sq, kv_len=Sk,
                           head_dim=q_shape[3], value_dim=v_shape[3], dtype=dtype_name(dtype), causal=causal)
    one_head = dataclasses.replace(shape, num_heads=1, num_kv_heads=1)

    def seconds(patterns, shape=shape) -> float:
        return estimate_attention(patterns, shape, hw, block_m=block_m, block_n=block_n).seconds

    best = (seconds(head_patterns), head_patterns, None, 0.0)
    for frame, _ in strides.most_common(_MAX_STRIDES):
        # a head moves when it alone runs faster transposed; then the layer, gathers included, decides
        own_gathers = _gather_seconds(1, q_shape, k_shape, v_shape, dtype, hw)
        patterns = tuple(FramesTransposed(p, frame) if frame in found and
                         seconds((FramesTransposed(p, frame),), one_head) + own_gathers < seconds((p,), one_head)
                         else p for p, found in zip(head_patterns, candidates))
        if patterns != head_patterns:
            gathers = _gather_seconds(patterns, q_shape, k_shape, v_shape, dtype, hw)
            best = min(best, (seconds(patterns) + gathers, patterns, frame, gathers), key=lambda option: option[0])
    return best[1:]


def gather_seconds(shape, transposed_heads: int, hardware) -> float:
    """The gathers of a layer of `shape` (cost_models AttentionShape) with that many heads
    transposed (_gather_seconds)."""
    from sparsec.cost_models.hardware import get_profile

    return _gather_seconds(transposed_heads, *_tensor_shapes(shape), torch_dtype(shape.dtype), get_profile(hardware))


def _gather_seconds(transposed_heads, q_shape, k_shape, v_shape, dtype, hw) -> float:
    """Each transposed head's q and its kv head's k and v gathered into transposed order, and its
    output back (attention_triton._launch_transposed): each element read and written once, plus
    the launches of the gathers. transposed_heads: a count, or the layer's patterns (its
    FramesTransposed are counted)."""
    if not isinstance(transposed_heads, int):
        transposed_heads = sum(isinstance(p, FramesTransposed) for p in transposed_heads)
    B, Sq, Sk = q_shape[0], q_shape[2], k_shape[2]
    elements = B * transposed_heads * (Sq * (q_shape[3] + v_shape[3]) + Sk * (k_shape[3] + v_shape[3]))
    moved_bytes = 2 * elements * torch.empty((), dtype=dtype).element_size()
    return moved_bytes / (hw.memory_bandwidth * hw.memory_efficiency) + 4 * hw.launch_overhead_s
