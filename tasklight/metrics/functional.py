"""The arithmetic of tasklight's metrics on plain tensors; the ``Metric`` classes keep sums as states
(one all-reduce under DDP) and call these on ``compute()``."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def mean_ci95_from_sums(total: Tensor, total_sq: Tensor, count: Tensor) -> dict[str, Tensor]:
    """Mean, sample std and 95 % confidence interval (normal approximation, ``1.96 * std / sqrt(n)``)
    of ``count`` values whose sum is ``total`` and sum of squares ``total_sq``.

    The sample std and the interval of fewer than two values are undefined: NaN, not 0 (one
    episode says nothing about the spread); the mean of no values is NaN too.
    """
    n = count
    mean = torch.where(n > 0, total / n.clamp_min(1), torch.full_like(total, math.nan))
    var = (total_sq - n * mean * mean) / (n - 1).clamp_min(1)
    std = torch.where(n > 1, var.clamp_min(0).sqrt(), torch.full_like(var, math.nan))
    return {"mean": mean, "ci95": 1.96 * std / n.clamp_min(1).sqrt(), "std": std, "count": n}


__all__ = ["mean_ci95_from_sums"]
