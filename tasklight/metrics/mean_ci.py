"""Mean and 95 % confidence interval over episodes, as a torchmetrics ``Metric`` that syncs across DDP
ranks in one reduction, and as a plain function (both on :func:`tasklight.metrics.functional.mean_ci95_from_sums`);
:func:`unshare_state` for ddp_spawn."""
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
        # out of place: under ddp_spawn the initial states arrive in shared memory, and an in-place
        # add would add every rank's values into the same storage (counting episodes twice)
        self.total = self.total + v.sum()
        self.total_sq = self.total_sq + (v * v).sum()
        self.count = self.count + v.numel()

    def compute(self) -> dict[str, Tensor]:
        return mean_ci95_from_sums(self.total, self.total_sq, self.count)


def mean_ci95(values: Tensor) -> tuple[float, float]:
    """Plain-tensor version of :class:`MeanCI` (scripts use it)."""
    v = values.double().reshape(-1)
    if v.numel() < 2:
        return float(v.mean()), float("nan")
    res = mean_ci95_from_sums(v.sum(), (v * v).sum(), torch.tensor(float(v.numel()), dtype=torch.float64))
    return float(res["mean"]), float(res["ci95"])


def unshare_state(module: torch.nn.Module) -> int:
    """Give this process private copies of ``module``'s buffers and metric states that live in shared
    memory; returns how many were copied.

    ``ddp_spawn`` pickles the module into each process through ``torch.multiprocessing``, which moves
    tensors to shared memory: every rank's buffers and torchmetrics states are then the same storage,
    and an in-place update on one rank (a counter, a metric sum) changes them on all. Every tasklight
    learner calls this in ``setup``.
    """
    copied = 0
    for mod in module.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.is_shared():
                mod._buffers[name] = buf.clone()
                copied += 1
        if isinstance(mod, Metric):
            for name in mod._defaults:
                value = getattr(mod, name)
                if isinstance(value, Tensor) and value.is_shared():
                    setattr(mod, name, value.clone())
                    copied += 1
                default = mod._defaults[name]
                if isinstance(default, Tensor) and default.is_shared():
                    mod._defaults[name] = default.clone()
    return copied
