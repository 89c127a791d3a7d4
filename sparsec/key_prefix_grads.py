"""The gradients of a call whose mask runs its patterns on key prefixes (sparsec/key_padding.py),
from a backward that takes one pattern call at a time (the Triton kernels).

The forward (key_padding.run_key_prefix) splits the batch into runs of rows whose mask keeps the
same keys and attends each run's queries to its kept keys; so does this, on the same slices of
q, k, v, the saved output and its gradient:
  - a run that keeps its first L keys for every query (padded keys; a static cache's causal
    prefix): its rows' queries against keys 0..L-1, under the run's patterns and causal rule;
  - a left-padded run (first > 0): queries and keys first.. (position 0 there), causal; the padding
    queries before it gave 0 and take no gradient;
  - a right-padded causal run, whose padding queries attend on explicit scores (_padding_rows):
    not taken (None: the caller computes the call's gradients in torch, sparsec/attention_grads.py).
Keys a run drops get zero gradients; sinks' gradients add up over the runs.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from sparsec.key_padding import KeyRun

__all__ = ["key_prefix_grads"]

# backward(grad_out, q, k, v, out, patterns, causal) -> (dq, dk, dv, dsinks or None), or None when it cannot
PatternBackward = Callable[..., tuple]


def key_prefix_grads(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     runs: list[KeyRun], backward: PatternBackward):
    """(dq, dk, dv, dsinks) of run_key_prefix(q, k, v, runs, ...) = out, or None where a run has
    padding queries on explicit scores. dsinks is None when `backward` gives none."""
    Sq = q.shape[2]
    if any(not run.prefix.first and run.prefix.causal_queries(Sq) < Sq for run in runs):
        return None
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dsinks = None
    for run in runs:
        rows = _rows(run, q.device)
        first, length = run.prefix.first, run.prefix.length
        queries, keys = slice(first, Sq), slice(first, length)
        causal = True if first else run.prefix.causal
        part = backward(*(_take(t, rows, queries) for t in (grad_out, q)), *(_take(t, rows, keys) for t in (k, v)),
                        _take(out, rows, queries), run.patterns, causal)
        if part is None:  # the backward cannot run this run
            return None
        for total, grad, span in ((dq, part[0], queries), (dk, part[1], keys), (dv, part[2], keys)):
            _put(total, rows, span, grad)
        if part[3] is not None:
            dsinks = part[3] if dsinks is None else dsinks + part[3]
    return dq, dk, dv, dsinks


def _rows(run: KeyRun, device: torch.device) -> slice | torch.Tensor:
    """The run's batch rows: a slice where they are consecutive (views), else their indices."""
    b = run.rows[0]
    if run.rows == tuple(range(b, b + len(run.rows))):
        return slice(b, b + len(run.rows))
    return torch.tensor(run.rows, device=device)


def _take(t: torch.Tensor, rows: slice | torch.Tensor, span: slice) -> torch.Tensor:
    """t's batch rows `rows` and positions `span` (dim 2)."""
    picked = t[rows] if isinstance(rows, slice) else t.index_select(0, rows)
    return picked[:, :, span]


def _put(total: torch.Tensor, rows: slice | torch.Tensor, span: slice, grad: torch.Tensor) -> None:
    """total's batch rows `rows`, positions `span` = grad (the runs' rows are disjoint)."""
    if isinstance(rows, slice):
        total[rows, :, span] = grad
    else:
        total[:, :, span].index_copy_(0, rows, grad.to(total.dtype))
