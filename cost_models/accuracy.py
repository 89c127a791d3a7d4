"""How well a cost model orders kernels: rank correlation and the regret of its top pick.

    spearman(predicted, measured) -> float
        Pearson correlation of the ranks (ties get their average rank), in [-1, 1].
    top1_regret(predicted, measured) -> float
        measured time of the candidate the model ranks fastest, over the fastest measured, minus 1:
        0 when the model picks the true best, 0.25 when its pick is 25% slower.
    model_accuracy(predicted, measured, groups) -> Accuracy
        Spearman over every candidate, and the top-1 regret of each decision group (candidates
        that answer the same question, e.g. "which kernel for this layer shape"), mean and worst.

Times are positive and finite, in any unit, as long as both sides use the same one for regret
(ranks ignore units).
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Accuracy", "rank", "spearman", "top1_regret", "model_accuracy"]


def _as_times(name: str, values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of times, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds a non-finite time: {array[~np.isfinite(array)][:3].tolist()}")
    if np.any(array <= 0):
        # A kernel takes time: a zero or negative time is a broken timer or model, not a fast kernel.
        raise ValueError(f"{name} holds a non-positive time: {array[array <= 0][:3].tolist()}")
    return array


def _paired(predicted: Sequence[float], measured: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    p, m = _as_times("predicted", predicted), _as_times("measured", measured)
    if p.shape != m.shape:
        raise ValueError(f"predicted has {p.size} times but measured has {m.size}")
    if p.size == 0:
        raise ValueError("no candidates: predicted and measured are empty")
    return p, m


def rank(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties sharing the average of the ranks they span (as Spearman needs)."""
    array = np.asarray(values, dtype=np.float64)
    order = np.argsort(array, kind="stable")
    ranks = np.empty(array.size, dtype=np.float64)
    sorted_values = array[order]
    start = 0
    while start < array.size:
        end = start
        while end + 1 < array.size and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """Spearman rank correlation. NaN when either side has a single distinct value (no order)."""
    p, m = _paired(predicted, measured)
    rp, rm = rank(p) - (p.size + 1) / 2, rank(m) - (m.size + 1) / 2
    denominator = math.sqrt(float(rp @ rp) * float(rm @ rm))
    return float(rp @ rm) / denominator if denominator > 0 else math.nan


def top1_regret(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """Measured time of the predicted-fastest candidate over the measured-fastest, minus 1. A tie in
    the prediction counts against the model: the slowest of the tied picks is charged."""
    p, m = _paired(predicted, measured)
    picks = np.flatnonzero(p == p.min())
    return float(m[picks].max() / m.min() - 1.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Accuracy:
    spearman: float
    mean_regret: float
    max_regret: float
    group_regrets: dict[str, float]   # decision group name -> top-1 regret
    candidates: int

    def as_dict(self) -> dict:
        return {"spearman": self.spearman, "mean_regret": self.mean_regret, "max_regret": self.max_regret,
                "group_regrets": dict(self.group_regrets), "candidates": self.candidates}


def model_accuracy(predicted: Sequence[float], measured: Sequence[float], groups: Sequence[Hashable]) -> Accuracy:
    """Spearman over all candidates and the top-1 regret within each decision group."""
    p, m = _paired(predicted, measured)
    if len(groups) != p.size:
        raise ValueError(f"got {len(groups)} group labels for {p.size} candidates")
    members: dict[str, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[str(group)].append(index)
    regrets = {name: top1_regret(p[idx], m[idx]) for name, idx in members.items()}
    values = list(regrets.values())
    return Accuracy(spearman=spearman(p, m), mean_regret=float(np.mean(values)), max_regret=float(np.max(values)),
                    group_regrets=regrets, candidates=int(p.size))
