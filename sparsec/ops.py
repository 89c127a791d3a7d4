"""The torch custom ops that rewritten graphs call: the sockets sparse kernels plug into.

    sparsec::attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale,
                       bool is_causal, str patterns, int block_m=0, int block_n=0,
                       str site="", str mask_rule="", float softcap=0.0, Tensor? mask_layout=None,
                       Tensor? sinks=None) -> Tensor
        q (B, Hq, S_q, D); k, v (B, Hkv, S_k, D[v]) before any GQA expansion (Hq % Hkv == 0).
        patterns == "": exact dense attention (torch SDPA). Otherwise a JSON list of Hq pattern
        dicts (Pattern.to_dict), computed by sparsec.attention. `is_causal` follows sparsec's
        rule j <= i + (S_k - S_q) (equal to SDPA's is_causal when S_q == S_k). attn_mask is a bool
        mask or an additive float bias broadcastable to (B, Hq, S_q, S_k). With patterns, a mask
        that only cuts the keys to a prefix (padded keys, or the causal rule over a prefix: a
        static KV cache's) or pads rows on the left runs the patterns on each row's kept keys
        (a left-padded row's own tokens, from position 0) where `mask_rule` admits it
        (sparsec/key_padding.py); any other mask runs the dense path with it (a log line). Block
        layouts with more blocks than a call needs run their top-left corner; under a plan's rule
        ("keys", "causal:D", with or without a mask) one with fewer keeps the blocks past it, and
        under the option attention_patterns' ("") a call without a mask that needs more runs dense
        (a log line). Under
        the rule "band" (Dense heads), a sliding window's mask runs as its band, a left-padded
        batch each row on its own tokens, and padded keys each row on its kept keys when at least
        PADDING_MIN_SHARE of them are padding; calls with fewer than BAND_MIN_KEYS keys (decoding
        steps, one query: BAND_MIN_DECODE_KEYS) keep the dense path (the sparse path's fixed cost
        is more than it saves).
        mask_layout: the mask read once for several layers (sparsec::mask_layout below).
        softcap > 0: each score s = scale * q.k becomes softcap * tanh(s / softcap) before the mask
        and the softmax (Gemma 2); torch's SDPA has no such step, so the dense path computes
        explicit scores (sparsec.attention_dispatch.explicit_attention).
        sinks: one logit a query head (GPT-OSS; any shape of Hq elements) that joins each row's
        softmax with no value (sparsec.attention); the dense path computes explicit scores too.
        block_m / block_n: the sparse kernels' tiles (0: their default).
        `site` names the attention layer (its module path): `recording_attention` hands every
        call's operands to a callback under that name (how sparsec.tune collects samples).
    sparsec::mask_layout(Tensor attn_mask, Tensor q, Tensor k) -> Tensor
        What key_padding reads from a mask for calls with q's and k's shapes, as a small int64
        tensor (key_padding.encode_prefixes): the rewrite inserts one for the layers of a graph
        that take the same mask node, so the mask is read once a forward, not once a layer.
    sparsec::linear(Tensor x, Tensor weight, Tensor? bias, str choice="dense", int min_tokens=0,
                    int? max_tokens=None, str site="") -> Tensor
        x @ weight.T + bias, exactly. choice "dense": F.linear. Otherwise the sparse kernel the IR
        chose ("bsr64x64", "nm2:4", "semi2:4"), run by sparsec/linear_dispatch.py when the token
        count is in [min_tokens, max_tokens], on the weight packed once for `site` (one compiled
        layer) and re-packed, or run dense, when the weight changes in place.

Both have fake implementations (Inductor and aot_autograd trace through them) and a backward,
so graphs that need autograd can call them too: attention's (sparsec::attention_backward) runs
the Triton backward kernels where the forward's backend is Triton (codegen/
attention_triton_backward.py; under a mask, on each run of key prefixes: sparsec/
key_prefix_grads.py), else sparsec/attention_grads.py, which recomputes the weights a block of
query rows at a time over the keys each block keeps (memory a block's, not Sq x Sk a head);
linear's is two matmuls. Outputs are
always contiguous; the rewrite restores the layout the replaced nodes had.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from sparsec.attention_dispatch import backward_runs_triton, causal_allowed, explicit_attention, triton_backward
from sparsec.attention_grads import attention_grads
from sparsec.key_padding import (encode_prefixes, is_plan_rule, key_prefix_runs, mask_prefixes,
                                 patterns_at, run_key_prefix)
from sparsec.key_prefix_grads import key_prefix_grads
from sparsec.patterns import Pattern, from_dict

log = logging.getLogger(__name__)

__all__ = ["attention", "attention_backward", "linear", "patterns_to_json", "patterns_from_json",
           "recording_attention", "AttentionRecorder"]

# (site, q, k, v, attn_mask, scale, is_causal, softcap, sinks) -> None
AttentionRecorder = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", float, bool, float,
                              "torch.Tensor | None"], None]
_RECORDERS: list[AttentionRecorder] = []
# Below this many keys a band's saving does not pay for the sparse path's fixed cost (~0.6 ms a
# call) and reading the mask (measured on the 2-core CPU, 8 heads, D = 64, a window of a quarter
# of the keys, the mask read on every call: 0.42x at 128 keys, 0.91x at 256, 1.48x at 384, 1.78x
# at 512).
BAND_MIN_KEYS = 320
# A decoding step (one query) saves only the keys it skips, and with a (B, 1, 1, S) mask torch's
# SDPA is slow on it: measured on the 2-core CPU, 8 heads (4 kv), D 64, the sparse path against SDPA
# with the mask: B 1, 1024 keys 533 vs 185 us, 2048 keys 478-632 vs 335-547, 4096 keys 555-788 vs
# 1067-1756, 16384 keys 598-3227 vs 23808-26753; B 2, 2048 keys 519-1208 vs 1517-1584.
BAND_MIN_DECODE_KEYS = 2048
# Under the rule "band", a call whose mask only pads keys runs each batch row on its kept keys when
# at least this share of the batch's keys is padding; below it the dense path with the mask is as
# fast (measured on the 2-core CPU, 12 heads, D 64, S 512-2048: 0.85-1.05x at 6-8% padding,
# 1.03-1.17x at 12.5%, 1.23-1.37x at 25-33%).
PADDING_MIN_SHARE = 0.15


@contextlib.contextmanager
def recording_attention(recorder: AttentionRecorder) -> Iterator[None]:
    """Call `recorder` with the operands of every sparsec::attention call made inside the block."""
    _RECORDERS.append(recorder)
    try:
        yield
    finally:
        _RECORDERS.remove(recorder)


def patterns_to_json(head_patterns: tuple[Pattern, ...]) -> str:
    """The `patterns` argument of sparsec::attention for one Pattern per query head."""
    return json.dumps([p.to_dict() for p in head_patterns], separators=(",", ":"), sort_keys=True)


@functools.lru_cache(maxsize=4096)  # one entry a layer
def patterns_from_json(text: str) -> tuple[Pattern, ...]:
    """Inverse of patterns_to_json; cached because every call of the op parses its argument."""
    decoded = json.loads(text)
    if not isinstance(decoded, list) or not decoded:
        raise ValueError(f"sparsec::attention patterns must be a non-empty JSON list, got {text[:80]!r}")
    return tuple(from_dict(d) for d in decoded)


def _mask_with_causal(attn_mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Fold the causal rule into a bool mask or an additive bias, the bias in its own dtype (as SDPA
    takes it without the causal rule: a float32 bias's lowest value cast to bf16 would become -inf,
    dropping rows the bias only weighs, and the backward would not)."""
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return attn_mask.masked_fill(~keep, float("-inf"))


def dense_attention(q, k, v, attn_mask, scale: float, is_causal: bool, softcap: float = 0.0,
                    sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Exact dense attention with sparsec's causal rule; differentiable. With softcap or sinks, on
    explicit scores (SDPA has neither)."""
    Sq, Sk = q.shape[2], k.shape[2]
    if softcap or sinks is not None:
        keep = causal_allowed(Sq, Sk, q.device) if is_causal else None
        bias = None
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            keep = attn_mask if keep is None else attn_mask & keep
        elif attn_mask is not None:
            bias = attn_mask
        return explicit_attention(q, k, v, scale, softcap, keep=keep, bias=bias,
                                  sinks=None if sinks is None else sinks.reshape(-1))
    if q.shape[1] != k.shape[1]:  # GQA: query head h reads kv head h // (Hq // Hkv)
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if is_causal and (attn_mask is not None or Sq != Sk):
        keep = causal_allowed(Sq, Sk, q.device)
        attn_mask = keep if attn_mask is None else _mask_with_causal(attn_mask, keep)
        is_causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)


def _sparse_attention(q, k, v, attn_mask, scale: float, is_causal: bool, patterns: str, tiles,
                      site: str, mask_rule: str, softcap: float, layout: torch.Tensor | None,
                      sinks: torch.Tensor | None) -> torch.Tensor:
    import sparsec  # lazy: sparsec imports this module's users, and the executors import a lot

    if mask_rule == "band" and (attn_mask is None or k.shape[2] < (BAND_MIN_KEYS if q.shape[2] > 1 else
                                                                   BAND_MIN_DECODE_KEYS)):
        return dense_attention(q, k, v, attn_mask, scale, is_causal, softcap, sinks)
    head_patterns = patterns_from_json(patterns)
    if attn_mask is None:  # a plan's layouts (its rule) keep the blocks past them in longer calls
        head_patterns = patterns_at(head_patterns, q.shape[2], k.shape[2], widen=is_plan_rule(mask_rule))
        if head_patterns is None:
            _log_short_layout(site, q.shape[2], k.shape[2])
            return dense_attention(q, k, v, attn_mask, scale, is_causal, softcap, sinks)
        return sparsec.attention(q, k, v, head_patterns, causal=is_causal, scale=scale, tiles=tiles, softcap=softcap,
                                 sinks=sinks)
    runs = key_prefix_runs(q, k, attn_mask, is_causal, head_patterns, mask_rule, layout)
    if runs is None:
        _log_dense_mask(site, tuple(attn_mask.shape), is_causal, mask_rule)
        return dense_attention(q, k, v, attn_mask, scale, is_causal, softcap, sinks)
    if mask_rule == "band" and _little_padding(runs, q.shape[0], k.shape[2]):
        return dense_attention(q, k, v, attn_mask, scale, is_causal, softcap, sinks)
    return run_key_prefix(q, k, v, runs, lambda q, k, v, patterns, causal: sparsec.attention(
        q, k, v, patterns, causal=causal, scale=scale, tiles=tiles, softcap=softcap, sinks=sinks), scale, softcap,
        None if sinks is None else sinks.reshape(-1))


def _little_padding(runs, batch: int, Sk: int) -> bool:
    """Whether `runs` only pad keys (no causal rule, band or left padding) and drop less than
    PADDING_MIN_SHARE of the batch's keys: the dense path is as fast then."""
    if any(run.prefix.causal or run.prefix.window is not None or run.prefix.first for run in runs):
        return False
    kept = sum(run.prefix.length * len(run.rows) for run in runs)
    return 1 - kept / (batch * Sk) < PADDING_MIN_SHARE


@functools.lru_cache(maxsize=1024)  # once a layer and length
def _log_short_layout(site: str, Sq: int, Sk: int) -> None:
    log.info("attention %s: a block layout of its patterns has fewer blocks than Sq=%d, Sk=%d need (made for "
             "shorter calls); dense for this call", site or "?", Sq, Sk)


@functools.lru_cache(maxsize=1024)  # once a layer and mask shape
def _log_dense_mask(site: str, shape: tuple[int, ...], is_causal: bool, mask_rule: str) -> None:
    if mask_rule == "band":
        log.info("attention %s: its mask (shape %s) is not a sliding window's band nor a key prefix "
                 "(sparsec/key_padding.py); dense, with the mask", site or "?", shape)
        return
    log.info("attention %s: its mask (shape %s%s) does not cut the keys to a prefix as its patterns need (rule %r: "
             "sparsec/key_padding.py); its patterns are not applied to this call (dense, with the mask)",
             site or "?", shape, ", causal" if is_causal else "", mask_rule or "any prefix")


@torch.library.custom_op("sparsec::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
    patterns: str,
    block_m: int = 0,
    block_n: int = 0,
    site: str = "",
    mask_rule: str = "",
    softcap: float = 0.0,
    mask_layout: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    for recorder in tuple(_RECORDERS):
        recorder(site, q, k, v, attn_mask, scale, is_causal, softcap, sinks)
    if patterns:
        tiles = (block_m, block_n) if block_m and block_n else None
        out = _sparse_attention(q, k, v, attn_mask, scale, is_causal, patterns, tiles, site, mask_rule, softcap,
                                mask_layout, sinks)
    else:
        out = dense_attention(q, k, v, attn_mask, scale, is_causal, softcap, sinks)
    return out.contiguous()


@attention.register_fake
def _(q, k, v, attn_mask, scale, is_causal, patterns, block_m=0, block_n=0, site="", mask_rule="", softcap=0.0,
      mask_layout=None, sinks=None):
    B, Hq, Sq, _ = q.shape
    return q.new_empty((B, Hq, Sq, v.shape[-1]))


@torch.library.custom_op("sparsec::mask_layout", mutates_args=())
def mask_layout(attn_mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    B, Sq, Sk = q.shape[0], q.shape[2], k.shape[2]
    return encode_prefixes(mask_prefixes(attn_mask, B, Sq, Sk), B, Sq, Sk)


@mask_layout.register_fake
def _(attn_mask, q, k):
    return torch.empty((q.shape[0] + 1, 4), dtype=torch.int64)


def _attention_setup_context(ctx, inputs, output) -> None:
    q, k, v, attn_mask, scale, is_causal, patterns = inputs[:7]
    # The Triton backward (calls on its device without a mask, or whose patterns a mask runs on key
    # prefixes) reads the output; the blocked one does not.
    out = output if backward_runs_triton(q) and (attn_mask is None or patterns) else None
    layout = inputs[12] if len(inputs) > 12 else None  # the mask as the forward read it: not read again
    ctx.save_for_backward(q, k, v, attn_mask, inputs[13] if len(inputs) > 13 else None, out, layout)
    ctx.attrs = (scale, is_causal, patterns, inputs[10] if len(inputs) > 10 else "",
                 inputs[11] if len(inputs) > 11 else 0.0)


@torch.library.custom_op("sparsec::attention_backward", mutates_args=())
def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
    patterns: str,
    mask_rule: str = "",
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    mask_grad: bool = True,
    mask_layout: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dmask, dsinks) of sparsec::attention; dmask is empty when there is no float
    mask or `mask_grad` is False (nothing needs it), dsinks when there are no sinks. With the
    forward's output `out` (saved where the backward runs Triton: on CUDA, or with
    SPARSEC_ATTENTION_BACKEND=triton), the Triton backward kernels, on the call's key runs where a
    mask runs its patterns on key prefixes (sparsec/key_prefix_grads.py) unless the float mask's
    own gradient is wanted; otherwise, or where they cannot run the call, attention_grads.
    mask_layout: the forward's (sparsec::mask_layout), so the mask is not read again.

    A custom op of its own so that the recomputation runs on concrete tensors even when the
    backward is traced with symbolic shapes (pattern masks need int lengths)."""
    head_patterns = patterns_from_json(patterns) if patterns else None
    float_mask = attn_mask is not None and attn_mask.is_floating_point()
    grads = None
    if out is not None and not (float_mask and mask_grad):
        grads = _triton_grads(grad_out, q, k, v, out, attn_mask, scale, is_causal, head_patterns, mask_rule, softcap,
                              None if sinks is None else sinks.detach().reshape(-1).float().contiguous(), mask_layout)
    if grads is not None:
        dq, dk, dv, dsinks = grads
        dmask = None
    else:
        dq, dk, dv, dmask, dsinks = attention_grads(grad_out, q, k, v, attn_mask, scale, is_causal, head_patterns,
                                                    mask_rule, softcap, sinks, mask_grad=mask_grad,
                                                    mask_layout=mask_layout)
    grads = (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
             q.new_empty(0) if dmask is None else dmask.reshape(attn_mask.shape).to(attn_mask.dtype),
             q.new_empty(0) if dsinks is None else dsinks.reshape(sinks.shape).to(sinks.dtype))
    return tuple(g.contiguous() for g in grads)


def _triton_grads(grad_out, q, k, v, out, attn_mask, scale: float, is_causal: bool, head_patterns, mask_rule: str,
                  softcap: float, sinks, mask_layout):
    """(dq, dk, dv, dsinks) from the Triton backward, the patterns resolved as the forward resolved
    them, or None where it cannot run the call (a mask that does not run the patterns on key prefixes)."""
    if attn_mask is None:
        if head_patterns:  # a plan's layouts at the call's lengths (None: the forward ran dense)
            head_patterns = patterns_at(head_patterns, q.shape[2], k.shape[2], widen=is_plan_rule(mask_rule))
        return triton_backward(grad_out, q, k, v, out, head_patterns, is_causal, scale, softcap, sinks)
    runs = key_prefix_runs(q, k, attn_mask, is_causal, head_patterns, mask_rule, mask_layout) if head_patterns else None
    if runs is None:
        return None

    def backward(g, q, k, v, o, run_patterns, causal):
        return triton_backward(g, q, k, v, o, run_patterns, causal, scale, softcap, sinks)

    def padding(g, q, k, v, run_patterns, first):  # a right-padded run's padding queries: few, in torch
        dq, dk, dv, _, dsinks = attention_grads(g, q, k, v, None, scale, False, run_patterns, "", softcap, sinks,
                                                rows=(first, q.shape[2]))
        return dq, dk, dv, dsinks

    return key_prefix_grads(grad_out, q, k, v, out, runs, backward, padding)


@attention_backward.register_fake
def _(grad_out, q, k, v, attn_mask, scale, is_causal, patterns, mask_rule="", softcap=0.0, sinks=None, out=None,
      mask_grad=True, mask_layout=None):
    grad_mask = attn_mask is not None and attn_mask.is_floating_point() and mask_grad
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
            torch.empty_like(attn_mask, memory_format=torch.contiguous_format) if grad_mask else q.new_empty(0),
            torch.empty_like(sinks, memory_format=torch.contiguous_format) if sinks is not None else q.new_empty(0))


def _attention_backward(ctx, grad_out):
    q, k, v, attn_mask, sinks, out, layout = ctx.saved_tensors
    mask_grad = bool(ctx.needs_input_grad[3])
    dq, dk, dv, dmask, dsinks = attention_backward(grad_out, q, k, v, attn_mask, *ctx.attrs, sinks, out, mask_grad,
                                                   layout)
    has_dmask = attn_mask is not None and attn_mask.is_floating_point() and mask_grad
    return (dq, dk, dv, (dmask if has_dmask else None), None, None, None, None, None, None, None, None, None,
            dsinks if sinks is not None else None)


attention.register_autograd(_attention_backward, setup_context=_attention_setup_context)


@torch.library.custom_op("sparsec::linear", mutates_args=())
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, choice: str = "dense",
           min_tokens: int = 0, max_tokens: int | None = None, site: str = "") -> torch.Tensor:
    # `choice`, not `kernel`: Inductor's FallbackKernel.create(kernel, ...) (torch 2.11) would
    # receive an argument named `kernel` twice.
    if choice == "dense":
        return F.linear(x, weight, bias).contiguous()
    from sparsec import linear_dispatch  # lazy: it imports the kernels

    return linear_dispatch.linear(x, weight, bias, choice, min_tokens, max_tokens, site).contiguous()


@linear.register_fake
def _(x, weight, bias, choice="dense", min_tokens=0, max_tokens=None, site=""):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_setup_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs[:3]
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad_out):
    """Dense, whatever kernel ran the forward (the same function: only exact zeros are skipped)."""
    x, weight = ctx.saved_tensors
    grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
    flat_grad, flat_x = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
    grad_w = flat_grad.T @ flat_x if ctx.needs_input_grad[1] else None
    grad_b = flat_grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_b, None, None, None, None


linear.register_autograd(_linear_backward, setup_context=_linear_setup_context)
