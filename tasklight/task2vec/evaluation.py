"""Rank statistics for the paper's qualitative claims: does the distance between tasks follow their
taxonomy, does it predict transfer. Spearman correlations over task pairs with bootstrap intervals
that resample *tasks* (the pairs of one task are not independent)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two 1-d tensors of the same length (``scipy.stats.spearmanr``;
    0 when one of them is constant)."""
    from scipy import stats

    a, b = a.detach().double().reshape(-1).cpu(), b.detach().double().reshape(-1).cpu()
    if a.numel() != b.numel() or a.numel() < 2:
        raise ValueError(f"spearman needs two tensors of the same length >= 2, got {a.numel()} and {b.numel()}")
    if bool((a == a[0]).all()) or bool((b == b[0]).all()):
        return 0.0
    return float(stats.spearmanr(a.numpy(), b.numpy()).statistic)


def bootstrap_interval(stat: Callable[[Tensor], float], n: int, reps: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of ``stat(idx)`` over ``reps`` resamples ``idx`` of ``range(n)`` with replacement."""
    if n < 2 or reps < 10:
        raise ValueError(f"bootstrap_interval needs n >= 2 units and reps >= 10, got {n} and {reps}")
    gen = torch.Generator().manual_seed(seed)
    vals = torch.tensor([stat(torch.randint(n, (n,), generator=gen)) for _ in range(reps)], dtype=torch.float64)
    q = (1.0 - level) / 2
    return float(vals.quantile(q)), float(vals.quantile(1.0 - q))


def pair_spearman(distance: Tensor, target: Tensor, idx: Tensor | None = None) -> float:
    """Spearman correlation between two ``[T, T]`` matrices over the pairs ``i < j`` of the tasks
    ``idx`` (default all); a resample that repeats a task leaves its pairs with itself out."""
    n = distance.shape[0]
    if distance.shape != (n, n) or target.shape != (n, n):
        raise ValueError(f"pair_spearman needs two square matrices of one size, got {tuple(distance.shape)} and "
                         f"{tuple(target.shape)}")
    idx = torch.arange(n) if idx is None else idx
    iu = torch.triu_indices(len(idx), len(idx), 1)
    i, j = idx[iu[0]], idx[iu[1]]
    keep = i != j
    return spearman(distance[i[keep], j[keep]], target[i[keep], j[keep]])


def taxonomy_correlation(distance: Tensor, groups: Sequence, reps: int = 1000, seed: int = 0
                         ) -> tuple[float, float, float]:
    """How well a task distance follows a taxonomy: Spearman correlation between ``distance[i, j]``
    and "``i`` and ``j`` are in different groups" (e.g. alphabets) over all task pairs, with a 95 %
    bootstrap interval over tasks. Positive: tasks of one group are closer to each other.
    Returns ``(rho, low, high)``."""
    n = distance.shape[0]
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} tasks; give one group per task")
    if len(set(groups)) < 2 or len(set(groups)) == n:
        raise ValueError("the taxonomy needs at least two groups and one group with two tasks")
    different = torch.tensor([[float(a != b) for b in groups] for a in groups])
    rho = pair_spearman(distance, different)
    lo, hi = bootstrap_interval(lambda idx: pair_spearman(distance, different, idx), n, reps, seed)
    return rho, lo, hi
