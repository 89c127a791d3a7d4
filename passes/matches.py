"""What the matchers found in an ATen graph: attention regions and linear layers.

A match names FX nodes of the graph it was found in; `nodes` is exactly the part of the graph
that becomes dead when `output`'s uses are replaced by the op the match describes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import fx

__all__ = ["AttentionMatch", "LinearMatch", "MaskKind"]

MaskKind = Literal["bool", "additive"]


@dataclass(frozen=True, slots=True, kw_only=True)
class AttentionMatch:
    """output = softmax(cap(q k^T * scale) + mask) v, per query head h using kv head h // (Hq // Hkv);
    cap(s) = softcap * tanh(s / softcap) when softcap > 0 (Gemma 2), else s. sinks: None or a node
    of Hq logits (GPT-OSS), each one more score of its head's softmax, with no value.

    q: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D) / (B, Hkv, Sk, Dv), before any GQA expansion.
    mask: None, a bool tensor (True = keep) or an additive float bias, broadcastable to
    (B, Hq, Sq, Sk); mask_kind says which. causal removes key j > i + (Sk - Sq).
    """

    output: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: fx.Node | None
    mask_kind: MaskKind | None
    scale: float
    causal: bool
    num_heads: int
    num_kv_heads: int
    nodes: tuple[fx.Node, ...]
    module_path: str
    softcap: float = 0.0
    sinks: fx.Node | None = None

    def __post_init__(self) -> None:
        if (self.mask is None) != (self.mask_kind is None):
            raise ValueError(f"mask and mask_kind must both be set or both be None, got {self.mask_kind!r}")
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")


@dataclass(frozen=True, slots=True, kw_only=True)
class LinearMatch:
    """output = x @ weight.T + bias; x of any rank >= 1, weight a (N, K) parameter placeholder
    whose parameter path is weight_target; bias None or a (N,) tensor node."""

    output: fx.Node
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    nodes: tuple[fx.Node, ...]
    module_path: str
    weight_target: str
