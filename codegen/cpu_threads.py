"""How many intra-op threads the CPU executor's torch ops run on."""
from __future__ import annotations

import torch

__all__ = ["intra_op_threads"]


class intra_op_threads:
    """Run torch ops inside with `count` intra-op threads. The executor copies (gathers, stores,
    dtype casts) run on one thread and only the attention kernels on all of them: on a busy
    2-core machine every OpenMP region waits for the scheduler to wake its second thread (measured
    7-8 ms for a 1 MB copy with 2 threads against 0.06 ms on one), which on a plan of a dozen calls
    cost more than the copies themselves. A class rather than a contextlib generator: it is
    entered around every SDPA call, and costs a third as much."""

    __slots__ = ("count", "previous")

    def __init__(self, count: int):
        self.count = count

    def __enter__(self) -> None:
        self.previous = torch.get_num_threads()
        if self.count != self.previous:
            torch.set_num_threads(self.count)

    def __exit__(self, *exc) -> None:
        if self.count != self.previous:
            torch.set_num_threads(self.previous)
