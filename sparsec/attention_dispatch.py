"""`sparsec.attention`: exact attention with one sparsity pattern per query head.

This module validates the call and picks an executor; the kernels live in codegen/:
  - CUDA tensors run the pattern-specialized Triton kernels (codegen/attention_triton.py),
  - CPU tensors run the block-skipping CPU executor (codegen/attention_cpu.py),
  - `backend="triton"` (or SPARSEC_ATTENTION_BACKEND=triton) forces the Triton kernels, which on
    CPU tensors needs TRITON_INTERPRET=1 (that is how the tests check them without a GPU),
  - `backend="masked"` is the dense path: SDPA with an explicit boolean mask. Every executor
    that cannot handle a case falls back to it with a log line.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sparsec.patterns import BlockSparse, Dense, Pattern, Skip, Union, normalize_head_patterns

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "cpu", "masked")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BACKEND_ENV = "SPARSEC_ATTENTION_BACKEND"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    patterns: Pattern | Sequence[Pattern],
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: str | None = None,
    tiles: tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v with every pair outside each head's pattern removed.

    q: (B, Hq, Sq, D); k: (B, Hkv, Sk, D); v: (B, Hkv, Sk, Dv); Hq % Hkv == 0 (GQA: query head h
    reads kv head h // (Hq // Hkv)). `patterns` is one Pattern for every head or a sequence of Hq.
    `causal` also removes j > i + (Sk - Sq). A query row with no key left gives 0.
    `backend`: "auto" (default; or the SPARSEC_ATTENTION_BACKEND environment variable),
    "triton", "cpu" or "masked" (explicit-mask dense path).
    `tiles`: (block_m, block_n) of the sparse kernels (a Plan's choice); default: chosen per shape.
    Tiles change the speed, never the result.
    `softcap` (Gemma 2's attention logit soft-capping): each score s = scale * q.k becomes
    softcap * tanh(s / softcap) before the pattern and the softmax; None or 0: no capping.
    `sinks` (GPT-OSS's attention sinks): (Hq,) logits, one a query head, each joining its head's
    softmax as one more score that takes weight but has no value: out = sum_j e^(s_j) v_j /
    (sum_j e^(s_j) + e^(sinks[h])). Skip heads do not use them (nothing is computed there).
    Differentiable in q, k, v and sinks whichever executor runs. After the Triton kernels, the
    backward's are Triton too (codegen/attention_triton_backward.py: the blocks each head's pattern
    keeps, one pair of launches a family); otherwise it recomputes the weights a block of query rows
    at a time over the keys each keeps (sparsec/attention_grads.py).
    """
    _check_tensors(q, k, v)
    softcap = check_softcap(softcap, "sparsec.attention")
    given_sinks, sinks = sinks, check_sinks(sinks, q, "sparsec.attention")
    head_patterns = normalize_head_patterns(patterns, q.shape[1])
    Sq, Sk = q.shape[2], k.shape[2]
    _check_patterns_fit(head_patterns, Sq, Sk)
    scale = check_scale(scale, q.shape[-1], "sparsec.attention")
    _check_tiles(tiles)
    if q.shape[0] == 0:  # an empty batch: an empty output (its gradients empty too), as SDPA gives
        return q.new_zeros(0, q.shape[1], Sq, v.shape[3]) + 0 * (q.sum() + k.sum() + v.sum())
    chosen = _choose_backend(q, backend)
    run = functools.partial(_execute, chosen, head_patterns, bool(causal), scale, tiles, softcap)
    inputs = (q, k, v) if given_sinks is None else (q, k, v, given_sinks)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _Differentiable.apply(q, k, v, given_sinks, sinks, run, chosen == "triton", head_patterns,
                                     bool(causal), scale, softcap)
    return run(q, k, v, sinks)


def _execute(chosen: str, head_patterns, causal: bool, scale: float, tiles, softcap: float, q, k, v,
             sinks) -> torch.Tensor:
    """The forward on the chosen executor (none of them records autograd)."""
    if chosen == "triton":
        return _run_triton(q, k, v, head_patterns, causal, scale, tiles, softcap, sinks)
    if chosen == "cpu":
        from sparsec.codegen.attention_cpu import cpu_attention
        block_m, block_n = tiles if tiles is not None else (None, None)
        return cpu_attention(q, k, v, head_patterns, causal=causal, scale=scale, block_m=block_m, block_n=block_n,
                             softcap=softcap, sinks=sinks)
    return masked_attention(q, k, v, head_patterns, causal=causal, scale=scale, softcap=softcap, sinks=sinks)


class _Differentiable(torch.autograd.Function):
    """sparsec.attention where a gradient is wanted: the executor's forward (its kernels write
    outputs autograd cannot see); the backward kernels in Triton where the forward ran Triton's
    (codegen/attention_triton_backward.py, which reads the saved output), else
    sparsec.attention_grads' blocks in torch."""

    @staticmethod
    def forward(ctx, q, k, v, given_sinks, sinks, run, triton, head_patterns, causal, scale, softcap):
        out = run(q, k, v, sinks)
        ctx.save_for_backward(q, k, v, sinks, out if triton else None)
        ctx.rule = (head_patterns, causal, scale, softcap)
        ctx.sinks_like = None if given_sinks is None else (given_sinks.shape, given_sinks.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from sparsec.attention_grads import attention_grads

        q, k, v, sinks, out = ctx.saved_tensors
        head_patterns, causal, scale, softcap = ctx.rule
        grads = None if out is None else triton_backward(grad_out, q, k, v, out, head_patterns, causal, scale,
                                                         softcap, sinks)
        if grads is None:
            dq, dk, dv, _, dsinks = attention_grads(grad_out, q, k, v, None, scale, causal, head_patterns,
                                                    softcap=softcap, sinks=sinks)
        else:
            dq, dk, dv, dsinks = grads
        like = ctx.sinks_like
        dsinks = None if like is None else dsinks.reshape(like[0]).to(like[1])
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks, None, None, None, None, None, None, None


def check_sinks(sinks, q: torch.Tensor, caller: str) -> torch.Tensor | None:
    """sinks as a contiguous float32 (Hq,) tensor on q's device, or None; a clear error for a
    tensor of another size, a non-floating dtype, or another device."""
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"{caller}: sinks must be a tensor of one logit a query head, got {type(sinks).__name__}")
    if sinks.numel() != q.shape[1] or sinks.dim() > 1 and sum(n != 1 for n in sinks.shape) > 1:
        raise ValueError(f"{caller}: sinks must hold one logit a query head ({q.shape[1]}), got shape "
                         f"{tuple(sinks.shape)}")
    if not sinks.is_floating_point():
        raise TypeError(f"{caller}: sinks must be floating point, got {sinks.dtype}")
    if sinks.device != q.device:
        raise ValueError(f"{caller}: sinks are on {sinks.device}, q on {q.device}")
    sinks = sinks.detach().reshape(-1).float().contiguous()
    if sinks.device.type == "cpu" and not bool((sinks < math.inf).all()):  # -inf: no sink; read on the CPU only
        raise ValueError(f"{caller}: sinks must be finite or -inf (no sink for that head), got {sinks.tolist()}")
    return sinks


def check_scale(scale, head_dim: int, caller: str) -> float:
    """scale as a float: 1 / sqrt(head_dim) for None; a clear error for a string, anything else float()
    refuses, or a value that is not finite (NaN gave all zeros)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, (str, bytes)):
        raise TypeError(f"{caller}: scale must be a number, got {type(scale).__name__}")
    try:
        value = float(scale)  # numbers, numpy scalars, 0-d tensors
    except (TypeError, ValueError):
        raise TypeError(f"{caller}: scale must be a number, got {type(scale).__name__}") from None
    if not math.isfinite(value):
        raise ValueError(f"{caller}: scale must be a finite number, got {value!r}")
    return value


def check_softcap(softcap, caller: str) -> float:
    """softcap as a float: 0.0 for None or 0 (no capping); a clear error for anything else that is
    not a finite positive number."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"{caller}: softcap must be a positive float or None, got {type(softcap).__name__}")
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"{caller}: softcap must be a finite number > 0 (or None / 0: no capping), got {softcap!r}")
    return float(softcap)


def _check_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"sparsec.attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"sparsec.attention: {name} must be 4-D (B, H, S, D), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"sparsec.attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"sparsec.attention: dtype {q.dtype} is not supported; use one of {SUPPORTED_DTYPES}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"sparsec.attention: q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    (B, Hq, _, D), (Bk, Hkv, Sk, Dk), (Bv, Hv, Sv, _) = q.shape, k.shape, v.shape
    if not (B == Bk == Bv):
        raise ValueError(f"sparsec.attention: batch sizes differ: q {B}, k {Bk}, v {Bv}")
    if Dk != D:
        raise ValueError(f"sparsec.attention: q head_dim {D} != k head_dim {Dk}")
    if Hv != Hkv or Sv != Sk:
        raise ValueError(f"sparsec.attention: k {tuple(k.shape)} and v {tuple(v.shape)} disagree on heads or length")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"sparsec.attention: query heads {Hq} must be a multiple of kv heads {Hkv}")
    if q.shape[2] == 0 or Sk == 0:
        raise ValueError(f"sparsec.attention: empty sequence (Sq={q.shape[2]}, Sk={Sk})")


def _check_tiles(tiles) -> None:
    """The kernels' own rule for tiles (AttentionTiles), checked for every backend."""
    from sparsec.codegen.tiles import AttentionTiles

    if tiles is None:
        return
    try:
        if not isinstance(tiles, (tuple, list)) or len(tiles) != 2:
            raise ValueError
        AttentionTiles(*tiles)
    except ValueError:
        raise ValueError(f"sparsec.attention: tiles must be (block_m, block_n), powers of two >= 16, got {tiles!r}") from None


@functools.lru_cache(maxsize=4096)  # once a layer, not on every call (errors are not cached)
def _check_patterns_fit(head_patterns: tuple[Pattern, ...], Sq: int, Sk: int) -> None:
    for h, p in enumerate(head_patterns):
        _check_pattern_fits(p, h, Sq, Sk)


def _check_pattern_fits(p: Pattern, head: int, Sq: int, Sk: int) -> None:
    parts = p.parts if isinstance(p, Union) else (p,)
    for part in parts:
        if isinstance(part, BlockSparse):
            try:
                part.check_lengths(Sq, Sk)
            except ValueError as e:
                raise ValueError(f"sparsec.attention: pattern of head {head}: {e}") from None


def _choose_backend(q: torch.Tensor, backend: str | None) -> str:
    if backend is None:
        backend = os.environ.get(_BACKEND_ENV, "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"sparsec.attention: unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    return "triton" if q.is_cuda else "cpu"


def _run_triton(q, k, v, head_patterns, causal, scale, tiles, softcap: float, sinks) -> torch.Tensor:
    from sparsec.codegen import attention_triton
    from sparsec.codegen.tiles import tiles_for

    reason = attention_triton.supports(q, k, v, head_patterns)
    if reason is not None:
        log.info("sparsec.attention: Triton kernels cannot run this call (%s); using the masked dense path", reason)
        return masked_attention(q, k, v, head_patterns, causal=causal, scale=scale, softcap=softcap, sinks=sinks)
    chosen = None if tiles is None else tiles_for(tiles[0], tiles[1], max(q.shape[-1], v.shape[-1]), q.dtype)
    return attention_triton.triton_attention(q, k, v, head_patterns, causal=causal, scale=scale, tiles=chosen,
                                             softcap=softcap, sinks=sinks)


def backward_runs_triton(q: torch.Tensor) -> bool:
    """Whether a call on q's device runs the Triton kernels (SPARSEC_ATTENTION_BACKEND or CUDA), whose
    backward needs the forward's output saved."""
    return _choose_backend(q, None) == "triton"


def triton_backward(grad_out, q, k, v, out, head_patterns, causal: bool, scale: float, softcap: float,
                    sinks) -> tuple[torch.Tensor, ...] | None:
    """(dq, dk, dv, dsinks) of a call with no mask from the Triton backward kernels, or None (with a
    log line) where they cannot run it and the caller takes sparsec.attention_grads. dsinks: float32
    (Hq,), None without sinks."""
    from sparsec.codegen import attention_triton_backward as backward

    head_patterns = tuple(head_patterns) if head_patterns else (Dense(),) * q.shape[1]
    reason = backward.backward_supports(q, k, v, head_patterns)
    if reason is not None:
        log.info("sparsec.attention: the Triton backward cannot run this call (%s); computing the gradients in "
                 "blocks with torch", reason)
        return None
    return backward.triton_attention_backward(grad_out.to(q.dtype), q, k, v, out.to(q.dtype), head_patterns,
                                              causal=causal, scale=scale, softcap=softcap, sinks=sinks)


# -- the dense path ------------------------------------------------------------------------


def causal_allowed(Sq: int, Sk: int, device: torch.device | None = None) -> torch.Tensor:
    """(Sq, Sk) bool: j <= i + (Sk - Sq), the causal rule aligned to the last query."""
    i = torch.arange(Sq, device=device)[:, None]
    j = torch.arange(Sk, device=device)[None, :]
    return j <= i + (Sk - Sq)


def skip_fill(v: torch.Tensor, Sq: int, fill: str, causal: bool) -> torch.Tensor:
    """Output of Skip heads: (B, H, Sq, Dv) zeros, or the mean of V over the allowed keys."""
    B, H, Sk, Dv = v.shape
    if fill == "zero":
        return v.new_zeros(B, H, Sq, Dv)
    if not causal:
        return v.float().mean(dim=2, keepdim=True).expand(B, H, Sq, Dv).to(v.dtype)
    counts = (torch.arange(Sq, device=v.device) + (Sk - Sq) + 1).clamp(0, Sk)
    prefix = torch.cat([v.new_zeros(B, H, 1, Dv, dtype=torch.float32), v.float().cumsum(dim=2)], dim=2)
    sums = prefix.index_select(2, counts)
    means = sums / counts.clamp(min=1)[:, None].to(torch.float32)
    return means.to(v.dtype)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_patterns: tuple[Pattern, ...],
    *,
    causal: bool,
    scale: float,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact dense attention with an explicit (Hq, Sq, Sk) mask: the fallback of every executor.
    Its memory grows as Sq * Sk, so it is a correctness path, not a fast one. With softcap or
    sinks, the scores are explicit (explicit_attention)."""
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    out = q.new_empty(B, Hq, Sq, v.shape[-1])
    allowed = causal_allowed(Sq, Sk, q.device) if causal else None
    computed = [h for h, p in enumerate(head_patterns) if not isinstance(p, Skip)]
    for h, p in enumerate(head_patterns):
        if isinstance(p, Skip):
            out[:, h] = skip_fill(v[:, h // group : h // group + 1], Sq, p.fill, causal)[:, 0]
    if not computed:
        return out
    masks = {p: head_mask(p, Sq, Sk, allowed, q.device) for p in set(head_patterns) if not isinstance(p, Skip)}
    mask = torch.stack([masks[head_patterns[h]] for h in computed])  # (Hc, Sq, Sk)
    index = torch.tensor(computed, device=q.device)
    kv_index = index // group
    qh = q.index_select(1, index)
    kh, vh = k.index_select(1, kv_index), v.index_select(1, kv_index)
    if softcap or sinks is not None:
        head_sinks = None if sinks is None else sinks.index_select(0, index)
        out[:, index] = explicit_attention(qh, kh, vh, scale, softcap, keep=mask, sinks=head_sinks)
        return out
    has_key = mask.any(dim=-1, keepdim=True)  # rows with no key give 0, not NaN
    safe_mask = mask | ~has_key
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=safe_mask, scale=scale)
    out[:, index] = torch.where(has_key, o, torch.zeros((), dtype=o.dtype, device=o.device))
    return out


def head_mask(p: Pattern, Sq: int, Sk: int, allowed: torch.Tensor | None, device) -> torch.Tensor:
    """(Sq, Sk) bool: the pairs `p` keeps, and `allowed` (the causal rule) too when given."""
    mask = torch.ones(Sq, Sk, dtype=torch.bool, device=device) if isinstance(p, Dense) else p.mask(Sq, Sk).to(device)
    return mask & allowed if allowed is not None else mask


# One chunk of explicit scores holds at most this many floats (64 MiB in float32).
_EXPLICIT_CHUNK_ELEMENTS = 1 << 24


def explicit_attention(q, k, v, scale: float, softcap: float, *, keep: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention on explicit scores, for what torch's SDPA does not do (soft-capping, sinks):
    q (B, Hq, Sq, D); k, v (B, Hkv, Sk, D[v]), query head h reading kv head h // (Hq // Hkv) (no
    copies of K and V); keep: bool broadcastable to (B, Hq, Sq, Sk), False removes the pair; bias:
    float, the same, added after the capping; sinks: (Hq,) logits each row's softmax also weighs
    (sparsec.attention). In float32 (float64 for float64 inputs), in chunks of query rows whose
    scores hold at most _EXPLICIT_CHUNK_ELEMENTS floats; a row with no key left gives 0. Returned
    in q's dtype."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    dtype = torch.promote_types(q.dtype, torch.float32)
    k_t = k.to(dtype).transpose(-1, -2)[:, :, None]  # (B, Hkv, 1, D, Sk): shared by the kv head's query heads
    v_g = v.to(dtype)[:, :, None]
    out = q.new_empty(B, Hq, Sq, v.shape[-1])
    step = max(1, _EXPLICIT_CHUNK_ELEMENTS // max(1, B * Hq * Sk))
    for r0 in range(0, Sq, step):
        r1 = min(Sq, r0 + step)
        rows = r1 - r0
        s = (q[:, :, r0:r1].to(dtype).reshape(B, Hkv, group, rows, D) @ k_t).reshape(B, Hq, rows, Sk) * scale
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        if bias is not None:
            s = s + _mask_rows(bias, r0, r1).to(dtype)
        if keep is not None:
            s = s.masked_fill(~_mask_rows(keep, r0, r1), float("-inf"))
        p = softmax_with_sinks(s, sinks)[0].nan_to_num(0.0)
        o = p.reshape(B, Hkv, group, rows, Sk) @ v_g
        out[:, :, r0:r1] = o.reshape(B, Hq, rows, -1).to(out.dtype)
    return out


def softmax_with_sinks(scores: torch.Tensor,
                       sinks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax over the last dim of scores (B, Hq, rows, Sk), with sinks (Hq elements) as one more
    score a row of its head that takes weight and has no value: (the keys' weights, the sink's
    (B, Hq, rows)); without sinks, (softmax, None). A row with no finite score gives NaN, as softmax
    does."""
    if sinks is None:
        return torch.softmax(scores, dim=-1), None
    column = sinks.reshape(1, -1, 1, 1).to(scores.dtype).expand(*scores.shape[:3], 1)
    probs = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)
    return probs[..., :-1], probs[..., -1]


def _mask_rows(mask: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows r0..r1 of a mask broadcastable to (..., Sq, Sk) (all of it when it has one row)."""
    return mask if mask.dim() < 2 or mask.shape[-2] == 1 else mask[..., r0:r1, :]
