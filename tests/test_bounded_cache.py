"""codegen.bounded_cache: an LRU bounded by the bytes of its tensors, and the run-time caches
that use it keeping a whole model's entries (a forward cycles through every layer)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sparsec import patterns as P
from sparsec.codegen import attention_cpu_plan
from sparsec.codegen.bounded_cache import bytes_bounded_cache, tensor_bytes


@dataclass(frozen=True)
class _Holder:
    a: torch.Tensor
    rest: tuple


def test_tensor_bytes_counts_nested_tensors_and_arrays():
    value = _Holder(torch.zeros(10, dtype=torch.int32), (torch.zeros(3, dtype=torch.float64), {"x": np.zeros(5)}, 7))
    assert tensor_bytes(value) == 40 + 24 + 40
    assert tensor_bytes("text") == tensor_bytes(None) == 0


def test_evicts_least_recently_used_by_bytes():
    built = []

    @bytes_bounded_cache(max_bytes=3 * 400)
    def block(n: int, *, scale: int = 1) -> torch.Tensor:
        built.append((n, scale))
        return torch.full((100,), n * scale, dtype=torch.float32)  # 400 bytes

    for n in (1, 2, 3):
        block(n)
    assert block(1)[0] == 1 and len(built) == 3  # a hit; 1 is now the most recent
    block(4)  # over 1200 bytes: the least recently used (2) goes
    assert block.cache_info().entries == 3 and block.cache_info().bytes == 1200
    block(1), block(3), block(4)
    assert len(built) == 4
    block(2)
    assert built[-1] == (2, 1) and len(built) == 5
    assert block(2, scale=3)[0] == 6 and built[-1] == (2, 3)  # keyword arguments are part of the key
    block.cache_clear()
    assert block.cache_info() == (0, 0, 0, 0)


def test_a_value_larger_than_the_bound_is_returned_not_kept():
    @bytes_bounded_cache(max_bytes=100)
    def big(n: int) -> torch.Tensor:
        return torch.zeros(n)

    assert big(1000).shape == (1000,)
    assert big.cache_info().entries == 0 and big(10).shape == (10,) and big.cache_info().entries == 1


def test_cpu_plans_of_a_large_model_stay_cached_across_forwards():
    """More distinct patterns than the old 64-entry bound: the second pass plans nothing."""
    attention_cpu_plan._plan.cache_clear()
    patterns = [P.Window(w, w) for w in range(1, 101)]
    for _ in range(2):
        for p in patterns:
            attention_cpu_plan._plan(p, 256, 256, False, 64)
    info = attention_cpu_plan._plan.cache_info()
    assert info.misses == 100 and info.hits == 100 and info.entries == 100
