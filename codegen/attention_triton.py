"""Pattern-specialized flash-attention forward in Triton, with head fusion.

`triton_attention` groups the query heads by pattern family and runs each group in ONE launch,
whatever the heads' own parameters: grid (query blocks, batch x heads of the group), a per-head
int32 parameter table, and a table mapping group slot -> query head (kv head = head // (Hq / Hkv),
so GQA reads K and V in place). A layer whose heads use three families costs three launches. Skip
heads are not a kernel: torch ops write zeros or the running mean of V, and never read K.

Each family's kernel is generated from codegen/templates/ and cached by content in
codegen/kernel_cache.py; `kernel_source(family)` returns the text.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsec.attention_dispatch import skip_fill
from sparsec.codegen import kernel_cache
from sparsec.codegen.bounded_cache import bytes_bounded_cache
from sparsec.codegen.templates.tables import block_tables
from sparsec.codegen.templates import FAMILY_TEMPLATES, LayoutBuffer, kernel_name, render
from sparsec.codegen.templates.common import table_ids
from sparsec.codegen.frame_coverage import base_bands
from sparsec.codegen.frame_order import FramesTransposed, natural_index, transposed_index
from sparsec.codegen.triton_frame_order import choose_frame_order
from sparsec.codegen.kernel_call import KernelCall
from sparsec.codegen.tiles import AttentionTiles, default_tiles, fit_stages, padded_head_dim
from sparsec.patterns import BlockSparse, Dense, Pattern, Skip, Union

__all__ = [
    "HeadGroup", "KernelLaunch", "add_launch_hook", "group_heads", "kernel_call", "kernel_calls", "kernel_source", "pattern_family",
    "supports", "triton_attention",
]

log = logging.getLogger(__name__)

LOG2E = 1.4426950408889634  # the kernels use exp2: scale * log2(e) is folded into one multiplier
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
# The kernels use 2**30 as "no bound" in int32 interval arithmetic: lengths must stay far below it.
MAX_LENGTH = 1 << 28
_INT32_LIMIT = 1 << 31
_MAX_GRID_Y = 65535


@dataclass(frozen=True, slots=True)
class HeadGroup:
    """Query heads that share a pattern family: one kernel launch (torch ops for Skip)."""

    family: str
    heads: tuple[int, ...]
    patterns: tuple[Pattern, ...]


@dataclass(frozen=True, slots=True)
class KernelLaunch:
    """One kernel launch, as launch hooks see it."""

    family: str
    heads: tuple[int, ...]
    grid: tuple[int, int]
    tiles: AttentionTiles


_launch_hooks: list[Callable[[KernelLaunch], None]] = []


def add_launch_hook(hook: Callable[[KernelLaunch], None]) -> Callable[[], None]:
    """Call `hook(launch)` before every kernel launch (tests count launches with it).
    Returns a function that removes the hook."""
    _launch_hooks.append(hook)
    return lambda: _launch_hooks.remove(hook)


def pattern_family(pattern: Pattern) -> str:
    """The kernel family that runs `pattern`: its own, except that a union holding Dense is dense."""
    if isinstance(pattern, Union) and any(isinstance(part, Dense) for part in pattern.parts):
        return "dense"
    return pattern.family


def group_heads(head_patterns: Sequence[Pattern]) -> list[HeadGroup]:
    """The query heads of each family, families in order of first appearance."""
    return list(_group_heads(tuple(head_patterns)))


@functools.lru_cache(maxsize=4096)
def _group_heads(head_patterns: tuple[Pattern, ...]) -> tuple[HeadGroup, ...]:
    heads: dict[str, list[int]] = {}
    for h, p in enumerate(head_patterns):
        heads.setdefault(pattern_family(p), []).append(h)
    return tuple(HeadGroup(family, tuple(hs), tuple(head_patterns[h] for h in hs)) for family, hs in heads.items())


@functools.lru_cache(maxsize=None)
def kernel_source(family: str) -> str:
    """The generated Triton source of `family`'s kernel (tile sizes are arguments, not part of it)."""
    return render(family)


@functools.lru_cache(maxsize=None)
def _kernel_module(family: str):
    return kernel_cache.load_source(kernel_source(family), f"attention_{family}")


def _kernel(family: str):
    """The family's @triton.jit kernel (Triton then compiles one binary per constexpr combination)."""
    return getattr(_kernel_module(family), kernel_name(family))


# -- what the kernels support ----------------------------------------------------------------


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_patterns: Sequence[Pattern]) -> str | None:
    """None when `triton_attention` can run this call, else the reason it cannot."""
    return _tensor_reason(q, k, v) or _device_reason(q) or _layout_reason(q, k, v) or _pattern_reason(q, k, head_patterns)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _tensor_reason(q, k, v) -> str | None:
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return "q, k and v must be 4-D tensors (B, H, S, D)"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: need one of {SUPPORTED_DTYPES} for all three"
    if not (q.device == k.device == v.device):
        return f"q, k, v are on different devices ({q.device}, {k.device}, {v.device})"
    return None


def _device_reason(q: torch.Tensor) -> str | None:
    if q.device.type == "cuda":
        if q.dtype == torch.bfloat16 and torch.cuda.get_device_capability(q.device)[0] < 8:
            return "bf16 attention needs a GPU of compute capability 8.0 or newer"
        return None
    if q.device.type == "cpu":
        return None if _interpreting() else "CPU tensors run the Triton kernels only with TRITON_INTERPRET=1"
    return f"device {q.device.type} has no Triton attention kernels"


def _layout_reason(q, k, v) -> str | None:
    (B, Hq, Sq, D), (Bk, Hkv, Sk, Dk), (Bv, Hv, Sv, Dv) = q.shape, k.shape, v.shape
    if not (B == Bk == Bv) or Dk != D or (Hv, Sv) != (Hkv, Sk):
        return f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not agree"
    if Hkv == 0 or Hq % Hkv:
        return f"query heads {Hq} are not a multiple of kv heads {Hkv}"
    if not (0 < Sq < MAX_LENGTH and 0 < Sk < MAX_LENGTH):
        return f"sequence lengths Sq={Sq}, Sk={Sk} must be in [1, {MAX_LENGTH})"
    if not (0 < D <= MAX_HEAD_DIM and 0 < Dv <= MAX_HEAD_DIM):
        return f"head dims D={D}, Dv={Dv} must be in [1, {MAX_HEAD_DIM}]"
    if B * Hq > _MAX_GRID_Y:
        return f"batch x heads = {B * Hq} exceeds the grid limit {_MAX_GRID_Y}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        # Offsets inside one head are int32 in the kernels (batch and head offsets are int64).
        if (t.shape[2] - 1) * t.stride(2) + (t.shape[3] - 1) * t.stride(3) >= _INT32_LIMIT:
            return f"{name}'s offsets within one head exceed int32"
    return None


def _pattern_reason(q, k, head_patterns) -> str | None:
    if len(head_patterns) != q.shape[1]:
        return f"{len(head_patterns)} patterns for {q.shape[1]} query heads"
    if not all(isinstance(p, Pattern) for p in head_patterns):
        h = next(h for h, p in enumerate(head_patterns) if not isinstance(p, Pattern))
        return f"pattern of head {h} is {type(head_patterns[h]).__name__}, not a Pattern"
    return _patterns_reason(tuple(head_patterns), q.shape[2], k.shape[2])


@functools.lru_cache(maxsize=4096)  # checked once a layer, not on every call
def _patterns_reason(head_patterns: tuple[Pattern, ...], Sq: int, Sk: int) -> str | None:
    for h, p in enumerate(head_patterns):
        family = pattern_family(p)
        if family != "skip" and family not in FAMILY_TEMPLATES:
            return f"no Triton kernel for pattern family {family!r} (head {h})"
        if isinstance(p, FramesTransposed):
            try:
                p.check_lengths(Sq, Sk)
            except ValueError as e:
                return f"head {h}: {e}"
            if base_bands(p, Sq, Sk) is None:  # the order is chosen for bands only (frame_order)
                return f"head {h}: the frames_transposed kernel runs bands only, not {p.base!r}"
        for part in p.parts if isinstance(p, Union) else (p,):
            if isinstance(part, BlockSparse):
                try:
                    part.check_lengths(Sq, Sk)
                except ValueError as e:
                    return f"head {h}: {e}"
    return None


# -- the call ------------------------------------------------------------------------------


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_patterns: tuple[Pattern, ...],
    *,
    causal: bool,
    scale: float,
    tiles: AttentionTiles | None = None,
    frames: bool | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v over each head's kept pairs (DESIGN.md), one launch per family.

    q: (B, Hq, Sq, D); k: (B, Hkv, Sk, D); v: (B, Hkv, Sk, Dv); any strides. `head_patterns` holds
    one Pattern per query head. Accumulates in fp32 and returns q's dtype, shape (B, Hq, Sq, Dv).
    Heads with a frame stride may run in frame-transposed token order (codegen/
    triton_frame_order.py decides; frames True / False forces it or the natural order; the result
    is the same). softcap > 0 caps each score s to softcap * tanh(s / softcap) before the mask;
    sinks: (Hq,) float32 logits on q's device, each row's first score in its online softmax.
    """
    reason = supports(q, k, v, head_patterns)
    if reason is not None:
        raise ValueError(f"triton_attention: {reason}")
    if tiles is not None and not isinstance(tiles, AttentionTiles):
        raise TypeError(f"triton_attention: tiles must be AttentionTiles, got {type(tiles).__name__}")
    if frames not in (None, True, False):
        raise ValueError(f"triton_attention: frames must be None, True or False, got {frames!r}")
    B, Hq, Sq, D = q.shape
    Sk, Dv = k.shape[2], v.shape[3]
    tiles = _fitted(tiles or default_tiles(max(D, Dv), q.dtype, Sq, Sk), q, D, Dv)
    head_patterns, frame = choose_frame_order(tuple(head_patterns), q.shape, k.shape, v.shape, q.dtype, causal,
                                              tiles.block_m, tiles.block_n, _profile_name(q.device), frames)
    out = torch.empty(B, Hq, Sq, Dv, dtype=q.dtype, device=q.device)
    for group in group_heads(head_patterns):
        if group.family == "skip":
            _fill_skip_heads(out, v, group, Hq // k.shape[1], causal)
        elif group.family == "frames_transposed" and frame is not None:
            _launch_transposed(group, q, k, v, out, frame, bool(causal), float(scale), tiles, softcap, sinks)
        else:
            _launch(group, q, k, v, out, bool(causal), float(scale), tiles, softcap, sinks)
    return out


def _launch_transposed(group: HeadGroup, q, k, v, out, frame: int, causal: bool, scale: float,
                       tiles: AttentionTiles, softcap: float, sinks: torch.Tensor | None) -> None:
    """The transposed heads: their q, and their kv heads' k and v (one a query head, so the launch
    needs no GQA map), gathered into frame-transposed order; the outputs gathered back into `out`.
    Only these heads' rows move (codegen/triton_frame_order.py prices exactly that)."""
    heads = _device_tensor(group.heads, q.device)
    kv_heads = _device_tensor(tuple(h // (q.shape[1] // k.shape[1]) for h in group.heads), q.device)
    order = _device_index(natural_index, q.shape[2], frame, q.device)
    q_t = q.index_select(1, heads).index_select(2, order)
    k_t, v_t = (x.index_select(1, kv_heads).index_select(2, order) for x in (k, v))
    out_t = torch.empty(q.shape[0], len(group.heads), q.shape[2], v.shape[3], dtype=out.dtype, device=out.device)
    gathered_sinks = None if sinks is None else sinks.index_select(0, heads)  # the gathered heads' own
    _launch(_gathered_group(group), q_t, k_t, v_t, out_t, causal, scale, tiles, softcap, gathered_sinks)
    out.index_copy_(1, heads, out_t.index_select(2, _device_index(transposed_index, q.shape[2], frame, q.device)))


def _gathered_group(group: HeadGroup) -> HeadGroup:
    """`group` as it runs on its own gathered rows: heads 0 .. n - 1, each with its own kv head."""
    return HeadGroup(group.family, tuple(range(len(group.heads))), group.patterns)


@functools.lru_cache(maxsize=256)
def _device_index(index, length: int, frame: int, device: torch.device) -> torch.Tensor:
    """natural_index / transposed_index on `device`, copied there once."""
    return index(length, frame).to(device)


@functools.lru_cache(maxsize=4096)
def _device_tensor(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, device=device)


def _profile_name(device: torch.device) -> str:
    """The cost-model profile the order is chosen for: the device's; under the interpreter (CPU
    tensors) the H100's, as the kernels would run there."""
    from sparsec.cost_models.hardware import profile_for_device

    return profile_for_device(device).name if device.type == "cuda" else "h100"


def kernel_calls(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_patterns: tuple[Pattern, ...], *,
                 causal: bool, scale: float, tiles: AttentionTiles | None = None,
                 interpreted: bool | None = None, softcap: float = 0.0,
                 sinks: torch.Tensor | None = None) -> list[KernelCall]:
    """The launches `triton_attention` makes for these arguments (Skip heads make none; heads in
    frame-transposed order run on gathered copies of their own rows), on any device:
    codegen/triton_aot compiles them for a GPU from CPU tensors."""
    reason = _tensor_reason(q, k, v) or _layout_reason(q, k, v) or _pattern_reason(q, k, head_patterns)
    if reason is not None:
        raise ValueError(f"kernel_calls: {reason}")
    tiles = tiles or default_tiles(max(q.shape[3], v.shape[3]), q.dtype, q.shape[2], k.shape[2])
    head_patterns, frame = choose_frame_order(tuple(head_patterns), q.shape, k.shape, v.shape, q.dtype, causal,
                                              tiles.block_m, tiles.block_n, _profile_name(q.device))
    out = torch.empty(*q.shape[:3], v.shape[3], dtype=q.dtype, device=q.device)
    calls = []
    for group in group_heads(head_patterns):
        if group.family == "frames_transposed" and frame is not None:  # as _launch_transposed runs it
            n = len(group.heads)
            q_t, k_t, v_t, out_t = (torch.empty(x.shape[0], n, *x.shape[2:], dtype=x.dtype, device=x.device)
                                    for x in (q, k, v, out))
            gathered_sinks = None if sinks is None else torch.empty(n, dtype=torch.float32, device=q.device)
            calls.append(kernel_call(_gathered_group(group), q_t, k_t, v_t, out_t, bool(causal), float(scale), tiles,
                                     interpreted=interpreted, softcap=softcap, sinks=gathered_sinks))
        elif group.family != "skip":
            calls.append(kernel_call(group, q, k, v, out, bool(causal), float(scale), tiles, interpreted=interpreted,
                                     softcap=softcap, sinks=sinks))
    return calls


def _fitted(tiles: AttentionTiles, q: torch.Tensor, D: int, Dv: int) -> AttentionTiles:
    """On a GPU, `tiles` with the pipeline stages its shared memory holds (fewer stages, never a
    launch that fails for want of shared memory); an error when even one stage does not fit."""
    if not q.is_cuda:
        return tiles
    limit = _shared_memory_per_block(q.device)
    fitted = fit_stages(tiles, D, q.dtype, limit, Dv)
    if fitted is None:
        raise ValueError(f"triton_attention: tiles {tiles} need more shared memory than the device's {limit} "
                         f"bytes a block at head_dim {D}, {q.dtype}; choose smaller tiles")
    return fitted


@functools.lru_cache(maxsize=None)
def _shared_memory_per_block(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block)


def _launch(group: HeadGroup, q, k, v, out, causal: bool, scale: float, tiles: AttentionTiles,
            softcap: float = 0.0, sinks: torch.Tensor | None = None) -> None:
    call = kernel_call(group, q, k, v, out, causal, scale, tiles, softcap=softcap, sinks=sinks)
    launch = KernelLaunch(group.family, group.heads, call.grid, tiles)
    for hook in list(_launch_hooks):
        hook(launch)
    log.debug("sparsec: launching %s", launch)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        call.launch(_kernel(group.family))


def kernel_call(group: HeadGroup, q, k, v, out, causal: bool, scale: float, tiles: AttentionTiles, *,
                interpreted: bool | None = None, softcap: float = 0.0,
                sinks: torch.Tensor | None = None) -> KernelCall:
    """The launch of `group`'s kernel: grid, arguments, constexprs and tiles. `interpreted` (default:
    TRITON_INTERPRET) picks the dot precision; codegen/triton_aot passes False to compile CPU-built
    calls for a GPU. Everything but the four tensors comes from a cache (_call_template): a
    compiled layer's launches are built once."""
    template = _call_template(group, tuple(q.shape), tuple(k.shape), tuple(v.shape), q.stride(), k.stride(),
                              v.stride(), out.stride(), q.dtype, q.device, bool(causal), float(scale), tiles,
                              _interpreting() if interpreted is None else interpreted, float(softcap),
                              sinks is not None)
    if sinks is None:
        return dataclasses.replace(template, args=(q, k, v, out) + template.args[4:])
    return dataclasses.replace(template, args=(q, k, v, out) + template.args[4:7] + (sinks,) + template.args[8:])


@bytes_bounded_cache(max_bytes=256 << 20)  # holds the group's device tables (shared with their own caches)
def _call_template(group: HeadGroup, q_shape, k_shape, v_shape, q_stride, k_stride, v_stride, out_stride, dtype,
                   device: torch.device, causal: bool, scale: float, tiles: AttentionTiles,
                   interpreted: bool, softcap: float = 0.0, sinks: bool = False) -> KernelCall:
    """kernel_call with None in place of q, k, v and out."""
    B, Hq, Sq, D = q_shape
    Hkv, Sk, Dv = k_shape[1], k_shape[2], v_shape[3]
    template = FAMILY_TEMPLATES[group.family]
    head_ids, params, layouts, counts = _group_params(group.family, group.heads, group.patterns, Sq, Sk, device)
    if template.table_driven:
        distinct, _ = table_ids(group.patterns)
        tables = _device_block_tables(distinct, Sq, Sk, tiles.block_m, tiles.block_n, causal, device)
    else:
        tables = (head_ids,) * 5 + (1, 1)  # unread: the visit is closed-form
    if template.block_masks:  # the precomputed masks hold the causal rule (in token order)
        causal = False
    grid = (-(-Sq // tiles.block_m), B * len(group.heads))
    args = (None, None, None, None, head_ids, params, layouts, head_ids, *tables,  # head_ids: SINK_LOGITS unread
            *q_stride, *k_stride, *v_stride, *out_stride,
            Sq, Sk, len(group.heads), Hq // Hkv, scale * LOG2E, (softcap or 1.0) * LOG2E)
    kwargs = dict(
        HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=padded_head_dim(D), BLOCK_DV=padded_head_dim(Dv),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, CAUSAL=causal,
        DOT_PRECISION=_dot_precision(dtype, interpreted), SOFTCAP=softcap > 0, SINKS=sinks,
        NUM_PARAMS=params.shape[1], **counts,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return KernelCall(Path(_kernel_module(group.family).__file__), kernel_name(group.family), grid, args, kwargs)


def _dot_precision(dtype: torch.dtype, interpreted: bool | None) -> str:
    """fp32: exact "ieee" dots, never tf32. fp16 / bf16: the tensor cores' own precision ("tf32" is
    only the name Triton's default carries; it has no effect on 16-bit inputs). `interpreted`
    None: whether TRITON_INTERPRET is on."""
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and (_interpreting() if interpreted is None else interpreted):
        return "upcast"  # the interpreter's bf16 dot is broken; see _dot in the kernel source
    return "tf32"


@bytes_bounded_cache(max_bytes=256 << 20)  # every layer's groups of a model, on the device
def _group_params(family: str, heads: tuple[int, ...], patterns: tuple[Pattern, ...], Sq: int, Sk: int,
                  device: torch.device):
    """(head ids, per-head params, layouts buffer, constexpr counts) on `device`, built once per group."""
    layouts = LayoutBuffer()
    packed = FAMILY_TEMPLATES[family].pack(patterns, Sq, Sk, layouts)
    head_ids = torch.tensor(heads, dtype=torch.int32, device=device)
    params = torch.tensor(packed.rows, dtype=torch.int32, device=device)
    return head_ids, params, layouts.tensor().to(device), dict(packed.counts)


@bytes_bounded_cache(max_bytes=512 << 20)
def _device_block_tables(patterns: tuple[Pattern, ...], Sq: int, Sk: int, block_m: int, block_n: int,
                         causal: bool, device: torch.device):
    """The block tables of `patterns` (block_tables.py) on `device`, with their widths."""
    tables = block_tables(patterns, Sq, Sk, block_m, block_n, causal)
    return (tables.num_partial.to(device), tables.partial.to(device), tables.num_full.to(device),
            tables.full.to(device), tables.masks.to(device), tables.partial.shape[-1], tables.full.shape[-1])


# -- Skip heads ------------------------------------------------------------------------------


def _fill_skip_heads(out: torch.Tensor, v: torch.Tensor, group: HeadGroup, kv_group_size: int, causal: bool) -> None:
    """Skip heads: zeros, or the mean of V over the keys the causal rule allows (K is never read)."""
    for fill in Skip.FILLS:
        heads = [h for h, p in zip(group.heads, group.patterns) if p.fill == fill]
        if not heads:
            continue
        index = torch.tensor(heads, device=out.device)
        if fill == "zero":
            out.index_fill_(1, index, 0)
        else:
            kv_values = v.index_select(1, index // kv_group_size)
            out.index_copy_(1, index, skip_fill(kv_values, out.shape[2], "mean", causal).to(out.dtype))
