"""An LRU cache bounded by the bytes of the tensors it holds, for what compiled layers build once
and reuse on every call: the CPU executor's plans, the Triton launches' block tables and
parameter tables.

functools.lru_cache bounds the number of entries. A model's forward visits its layers in a cycle,
so once the layers need more entries than the bound, an LRU misses on every call: with 64 entries,
a 30-layer model with a pattern per head re-planned every head on every forward (13-120 ms a plan
on the CPU). Entries here are cheap to count and the tensors are what costs memory, so the bound
is in bytes (and a generous entry count for values without tensors).

    @bytes_bounded_cache(max_bytes=1 << 30)
    def _plan(pattern, Sq, Sk, causal, block_m) -> _Plan: ...
    _plan.cache_clear(); _plan.cache_info() -> BoundedCacheInfo(hits, misses, entries, bytes)
"""
from __future__ import annotations

import dataclasses
import functools
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

__all__ = ["BoundedCacheInfo", "bytes_bounded_cache", "tensor_bytes"]


class BoundedCacheInfo(NamedTuple):
    hits: int
    misses: int
    entries: int
    bytes: int


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in `value` (tensors, numpy arrays, and dataclasses, tuples, lists and
    dicts of them; anything else counts 0)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if hasattr(value, "nbytes") and hasattr(value, "dtype"):  # numpy
        return int(value.nbytes)
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(tensor_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 0


def bytes_bounded_cache(max_bytes: int, max_entries: int = 1 << 16) -> Callable[[Callable], Callable]:
    """Memoize a function of hashable positional and keyword arguments; evict least recently used
    entries while the cached tensors exceed max_bytes or the entries max_entries (a value larger
    than max_bytes on its own is returned but not kept)."""
    def decorate(function: Callable) -> Callable:
        entries: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        lock = threading.Lock()
        stats = {"hits": 0, "misses": 0, "bytes": 0}

        @functools.wraps(function)
        def cached(*args, **kwargs):
            key = (args, tuple(sorted(kwargs.items())))
            with lock:
                found = entries.get(key)
                if found is not None:
                    entries.move_to_end(key)
                    stats["hits"] += 1
                    return found[0]
                stats["misses"] += 1
            value = function(*args, **kwargs)
            size = tensor_bytes(value)
            if size > max_bytes:
                return value
            with lock:
                if key not in entries:
                    entries[key] = (value, size)
                    stats["bytes"] += size
                while entries and (stats["bytes"] > max_bytes or len(entries) > max_entries):
                    _, (_, evicted) = entries.popitem(last=False)
                    stats["bytes"] -= evicted
            return value

        def cache_clear() -> None:
            with lock:
                entries.clear()
                stats.update(hits=0, misses=0, bytes=0)

        def cache_info() -> BoundedCacheInfo:
            with lock:
                return BoundedCacheInfo(stats["hits"], stats["misses"], len(entries), stats["bytes"])

        cached.cache_clear = cache_clear  # type: ignore[attr-defined]
        cached.cache_info = cache_info  # type: ignore[attr-defined]
        return cached

    return decorate
