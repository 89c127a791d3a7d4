"""Packed weights that notice when their weight changes (Dynamo does not guard weight values).

    packed = PackedWeight(lambda w: pack_bsr(w, (64, 64)))
    ...
    bsr = packed.get(weight)        # on every call: packs on the first call and after any change
    y = bsr_linear_triton(x, bsr, bias) if bsr is not None else F.linear(x, weight, bias)

`get` compares the weight's key (data_ptr, _version, shape, stride, dtype, device) with the key
the pack was built from. Any in-place write through autograd-visible paths (`w.mul_()`,
`w.copy_()` under no_grad, an optimizer step) bumps `_version`; assigning a new tensor
(`layer.weight = ...`, `w.data = ...`) changes data_ptr: either way the next `get` re-packs, so a
kernel never computes with a stale pack. When the changed weight no longer fits the format (the
pack function raises ValueError, e.g. pack_nm on a weight that is not N:M any more), `get`
returns None and the caller runs the dense path until the weight changes again.

A PackedWeight holds the weight's key and its pack, never the weight tensor itself, so a cache
can keep it keyed weakly by the tensor and free it with the tensor (sparsec/linear_dispatch.py).

Not detected (the price of an O(1) check): writes through `w.data` (a fresh version counter that
is not the parameter's), and a new tensor that lands at the same address with the same version,
shape and dtype as the old one. Use `invalidate()` after such changes.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Generic, TypeVar

import torch

__all__ = ["PackedWeight", "weight_key"]

log = logging.getLogger(__name__)

Packed = TypeVar("Packed")
WeightKey = tuple


def weight_key(weight: torch.Tensor) -> WeightKey:
    """What identifies a weight's current values without reading them."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight_key: weight must be a torch.Tensor, got {type(weight).__name__}")
    return (weight.data_ptr(), weight._version, tuple(weight.shape), tuple(weight.stride()),
            weight.dtype, weight.device)


class PackedWeight(Generic[Packed]):
    """`pack(weight)`, cached for the weight's current key and rebuilt whenever the key changes."""

    __slots__ = ("_pack", "_name", "_key", "_packed", "packs", "__weakref__")

    def __init__(self, pack: Callable[[torch.Tensor], Packed], name: str = "weight") -> None:
        if not callable(pack):
            raise TypeError(f"PackedWeight: pack must be callable, got {type(pack).__name__}")
        self._pack = pack
        self._name = name
        self._key: WeightKey | None = None
        self._packed: Packed | None = None
        self.packs = 0  # how many times pack ran (tests and logs read it)

    def get(self, weight: torch.Tensor) -> Packed | None:
        """The pack of `weight`'s current values, or None when they no longer fit the format (or
        cannot be guarded: inference tensors have no version counter)."""
        if weight.is_inference():
            log.info("sparsec: %s is an inference tensor, whose changes cannot be seen; using the dense path", self._name)
            return None
        key = weight_key(weight)
        if key != self._key:
            self._repack(weight, key)
        return self._packed

    def _repack(self, weight: torch.Tensor, key: WeightKey) -> None:
        if self._key is not None:
            log.info("sparsec: %s changed (data_ptr/_version %s -> %s); re-packing",
                     self._name, self._key[:2], key[:2])
        self._key, self._packed = None, None  # a failing pack must not leave the old pack behind
        self.packs += 1
        try:
            with torch.no_grad():
                packed = self._pack(weight.detach())
        except ValueError as e:
            log.info("sparsec: %s no longer fits its sparse format (%s); using the dense path", self._name, e)
            packed = None
        self._key, self._packed = key, packed

    def invalidate(self) -> None:
        """Forget the pack: the next `get` re-packs (after changes the key cannot see)."""
        self._key, self._packed = None, None
