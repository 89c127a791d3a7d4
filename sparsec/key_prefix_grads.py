"""The gradients of a call whose mask runs its patterns on key prefixes (sparsec/key_padding.py),
from a backward that takes one pattern call at a time (the Triton kernels).

The forward (key_padding.run_key_prefix) splits the batch into runs of rows whose mask keeps the
same keys and attends each run's queries to its kept keys; so does this, on the same slices of
q, k, v, the saved output and its gradient:
  - a run that keeps its first L keys for every query (padded keys; a static cache's causal
    prefix): its rows' queries against keys 0..L-1, under the run's patterns and causal rule;
  - a left-padded run (first > 0): queries and keys first.. (position 0 there), causal; the padding
    queries before it gave 0 and take no gradient;
  - a right-padded causal run: its first rows (those the causal rule cuts) as the first kind,
    under the patterns cut to them; its padding queries, which the forward ran on explicit scores
    against all its keys (_padding_rows), through `padding` (attention_grads on those rows only).
Keys a run drops get zero gradients; sinks' gradients add up over the runs.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from sparsec.key_padding import KeyRun, patterns_at, run_rows

__all__ = ["key_prefix_grads"]

# backward(grad_out, q, k, v, out, patterns, causal) -> (dq, dk, dv, dsinks or None), or None when it cannot
PatternBackward = Callable[..., tuple]
# padding(grad_out, q, k, v, patterns, first) -> (dq, dk, dv, dsinks or None): query rows first.. of
# q against every key of k, v, each head under its pattern at (Sq, Sk), no causal rule
PaddingBackward = Callable[..., tuple]


def key_prefix_grads(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     runs: list[KeyRun], backward: PatternBackward, padding: PaddingBackward):
    """(dq, dk, dv, dsinks) of run_key_prefix(q, k, v, runs, ...) = out, or None where `backward`
    cannot run a run. dsinks is None when neither gives any."""
    Sq = q.shape[2]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dsinks = None
    for run in runs:
        rows = run_rows(run, q.device)
        first, length = run.prefix.first, run.prefix.length
        cut = Sq if first else run.prefix.causal_queries(Sq)  # right padding: queries cut.. are padding
        queries, keys = slice(first, cut), slice(first, length)
        if first:
            patterns, causal = run.patterns, True
        elif cut < Sq:
            patterns, causal = patterns_at(run.patterns, cut, length), True
        else:
            patterns, causal = run.patterns, run.prefix.causal
        part = backward(*(_take(t, rows, queries) for t in (grad_out, q)), *(_take(t, rows, keys) for t in (k, v)),
                        _take(out, rows, queries), patterns, causal)
        if part is None:  # the backward cannot run this run
            return None
        grad_q, grad_k, grad_v, grad_sinks = part
        if cut < Sq:
            everything = slice(0, Sq)
            pad = padding(*(_take(t, rows, everything) for t in (grad_out, q)), *(_take(t, rows, keys) for t in (k, v)),
                          run.patterns, cut)
            grad_q = torch.cat([grad_q.to(pad[0].dtype), pad[0][:, :, cut:]], dim=2)
            grad_k, grad_v, queries = grad_k + pad[1], grad_v + pad[2], everything
            grad_sinks = _add(grad_sinks, pad[3])
        for total, grad, span in ((dq, grad_q, queries), (dk, grad_k, keys), (dv, grad_v, keys)):
            _put(total, rows, span, grad)
        dsinks = _add(dsinks, grad_sinks)
    return dq, dk, dv, dsinks


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


def _take(t: torch.Tensor, rows: slice | torch.Tensor, span: slice) -> torch.Tensor:
    """t's batch rows `rows` and positions `span` (dim 2): views, or a copy of the span only."""
    return t[rows, :, span] if isinstance(rows, slice) else t[:, :, span].index_select(0, rows)


def _put(total: torch.Tensor, rows: slice | torch.Tensor, span: slice, grad: torch.Tensor) -> None:
    """total's batch rows `rows`, positions `span` = grad (the runs' rows are disjoint)."""
    if isinstance(rows, slice):
        total[rows, :, span] = grad
    else:
        total[:, :, span].index_copy_(0, rows, grad.to(total.dtype))
