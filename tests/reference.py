"""Independent float64 reference for attention with per-head patterns, from explicit masks.

Written from DESIGN.md's definition, sharing no code with sparsec's executors: the mask of head h
is patterns[h].mask(Sq, Sk) (and the causal rule j <= i + Sk - Sq); softmax over kept keys; rows
with no kept key are 0; Skip heads are 0 or the mean of V over the causally allowed keys.
`key_mask` (B, Sk) bool, each row's kept keys a prefix j < L_b (a mask that pads keys at the
end): row b attends to its first L_b keys, under each pattern's mask at (Sq, Sk) (or, for a block
layout sized for the prefix, at (Sq, L_b)). `softcap` c > 0 caps each score s to c * tanh(s / c)
before the mask (Gemma 2). `sinks` (Hq,) adds one logit to each row's softmax of head h that takes
weight and has no value (GPT-OSS); Skip heads ignore it.
"""
from __future__ import annotations

import math

import torch

from sparsec.patterns import Skip


def reference_attention(q, k, v, head_patterns, *, causal=False, scale=None, key_mask=None, softcap=0.0,
                        sinks=None):
    if key_mask is None:
        return _reference(q, k, v, head_patterns, causal, scale, softcap=softcap, sinks=sinks)
    lengths = key_mask.sum(-1)
    assert bool((key_mask == (torch.arange(k.shape[2]) < lengths[:, None])).all()), "key_mask must keep a prefix"
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float64)
    for b, n in enumerate(lengths.tolist()):
        out[b:b + 1] = _reference(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], head_patterns, causal, scale,
                                  full_keys=k.shape[2], softcap=softcap, sinks=sinks)
    return out


def _pattern_mask(p, Sq, Sk, full_keys):
    if full_keys is None:
        return p.mask(Sq, Sk)
    try:
        return p.mask(Sq, full_keys)[:, :Sk]
    except ValueError:  # a block layout sized for the kept keys
        return p.mask(Sq, Sk)


def _reference(q, k, v, head_patterns, causal, scale, full_keys=None, softcap=0.0, sinks=None):
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q64, k64, v64 = q.double(), k.double(), v.double()
    i = torch.arange(Sq)[:, None]
    j = torch.arange(Sk)[None, :]
    allowed = (j <= i + (Sk - Sq)) if causal else torch.ones(Sq, Sk, dtype=torch.bool)
    out = torch.zeros(B, Hq, Sq, v.shape[-1], dtype=torch.float64)
    for h, p in enumerate(head_patterns):
        kv = h // (Hq // Hkv)
        if isinstance(p, Skip):
            if p.fill == "mean":
                for row in range(Sq):
                    keys = allowed[row].nonzero().flatten()
                    if len(keys):
                        out[:, h, row] = v64[:, kv, keys].mean(dim=1)
            continue
        keep = _pattern_mask(p, Sq, Sk, full_keys) & allowed
        scores = q64[:, h] @ k64[:, kv].transpose(-1, -2) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~keep, float("-inf"))
        if sinks is not None:  # one more column, dropped after the softmax
            sink = sinks[h].to(torch.float64).expand(*scores.shape[:-1], 1)  # differentiable in the sinks
            scores = torch.cat([scores, sink], dim=-1)
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all -inf rows -> NaN -> 0
        if sinks is not None:
            probs = probs[..., :-1]
        out[:, h] = probs @ v64[:, kv]
    return out


def tolerance(dtype):
    """(atol, rtol) for comparing an executor's output in `dtype` against the float64 reference."""
    return {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}[dtype]
