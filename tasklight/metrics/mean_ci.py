"""Mean and 95 % confidence interval over episodes, as a torchmetrics ``Metric`` that syncs across DDP
ranks in one reduction, and as a plain function (both on :func:`tasklight.metrics.functional.mean_ci95_from_sums`)."""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from tasklight.metrics.functional import mean_ci95_from_sums


class MeanCI(Metric):
    """Mean and 95 % confidence interval (normal approximation) of per-episode values.

    States are sums, so the DDP sync is one all-reduce of three scalars. ``compute()`` returns
    ``{"mean", "ci95", "std", "count"}``; ``ci95 = 1.96 * std / sqrt(n)`` with the sample std.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        v = values.detach().reshape(-1).to(torch.float64)
        self.total += v.sum()
        self.total_sq += (v * v).sum()
        self.count += v.numel()

    def compute(self) -> dict[str, Tensor]:
        return mean_ci95_from_sums(self.total, self.total_sq, self.count)


def mean_ci95(values: Tensor) -> tuple[float, float]:
    """Plain-tensor version of :class:`MeanCI` (scripts use it)."""
    v = values.double().reshape(-1)
    if v.numel() < 2:
        return float(v.mean()), float("nan")
    res = mean_ci95_from_sums(v.sum(), (v * v).sum(), torch.tensor(float(v.numel()), dtype=torch.float64))
    return float(res["mean"]), float(res["ci95"])
