"""ExcessMTL, robust multi-task learning with excess risks (He et al., 2024)."""
from __future__ import annotations

import torch
from torch import Tensor

from tasklight.multitask.registry import register_weighting
from tasklight.multitask.weighting import GradSource, TaskStats, Weighting, _scatter
from tasklight.multitask.weightings._common import GradientSizedState, check_positive


@register_weighting("excessmtl", paper="He et al. (2024), Robust Multi-Task Learning with Excess Risks",
                    reference="torchjd `ExcessMTLWeighting` (the authors' code, LibMTL)",
                    parity="tests/multitask/test_torchjd_parity.py::test_excess_mtl")
class ExcessMTL(GradientSizedState, Weighting):
    """ExcessMTL: weights on the simplex that grow with each task's estimated excess risk.

    The excess risk of task ``t`` is estimated by a second-order Taylor expansion with a diagonal
    (AdaGrad) curvature: ``e_t = sum_k g_tk^2 / sqrt(S_tk)`` with ``S_t`` the running sum of the
    task's squared gradients; from the second step on it is divided by the first step's ``e_t``
    (the paper's scale processing), and the weights take an exponentiated-gradient step
    ``w <- softmax(log w + robust_step_size e)`` from ``w = 1/T`` (the paper; the authors' code and
    LibMTL start at 1). ``robust_step_size`` defaults to LibMTL's ``1e-2``. The state ``S`` is as large
    as ``T`` gradients. Only the shared parameters are steered.
    """

    needs_grads = True
    _gradient_sized = ("sq_sum",)
    direction_only = True

    def __init__(self, robust_step_size: float = 1e-2, grad_source: GradSource = "representation") -> None:
        super().__init__(grad_source)
        check_positive("ExcessMTL", robust_step_size=robust_step_size)
        self.robust_step_size = float(robust_step_size)
        for name in ("w", "sq_sum", "initial"):
            self.register_buffer(name, torch.zeros(0, dtype=torch.float64))

    def setup(self, num_tasks, lower_bounds=None) -> None:
        super().setup(num_tasks, lower_bounds)
        self.w = torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)
        self.sq_sum = torch.zeros(num_tasks, 0, dtype=torch.float64)
        self.initial = torch.full((num_tasks,), float("nan"), dtype=torch.float64)

    def compute_weights(self, stats: TaskStats) -> Tensor:
        self._check(stats)
        g = stats.grads.detach().double()
        if self.sq_sum.shape[1] != g.shape[1]:
            if self.sq_sum.shape[1]:
                raise ValueError(f"ExcessMTL: the per-task gradients changed size from {self.sq_sum.shape[1]} to "
                                 f"{g.shape[1]}")
            self.sq_sum = torch.zeros(self.num_tasks, g.shape[1], dtype=torch.float64, device=g.device)
        active = stats.active.to(g.device)
        sq = g * g
        self.sq_sum = self.sq_sum + torch.where(active[:, None], sq, 0.0)
        e = (sq / torch.sqrt(self.sq_sum + 1e-7)).sum(1).cpu()
        active = active.cpu()
        first = active & torch.isnan(self.initial.cpu())
        initial = torch.where(first, e, self.initial.cpu())
        e = torch.where(first, e, e / (initial + 1e-7))
        self.initial = initial.to(self.initial.device)
        idx = active.nonzero().flatten()
        w = self.w.cpu()
        sub = torch.softmax(torch.log(w[idx]) + self.robust_step_size * e[idx], 0) * w[idx].sum()
        w = w.clone()
        w[idx] = sub
        self.w = w.to(self.w.device)
        return _scatter(sub / sub.sum(), idx, stats)
