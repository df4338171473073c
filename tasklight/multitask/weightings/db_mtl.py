"""DB-MTL, dual-balancing multi-task learning (Lin et al., 2023)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tasklight.multitask.registry import register_weighting
from tasklight.multitask.weighting import GradSource, TaskStats, Weighting, _scatter
from tasklight.multitask.weightings._common import GradientSizedState, require_parameter_grads


@register_weighting("dbmtl", paper="Lin et al. (2023), Dual-Balancing for Multi-Task Learning",
                    reference="LibMTL `DB_MTL` (the authors' code; not in LibMTL 1.1.5 or torchjd); checked "
                    "against the recursion written out",
                    parity="tests/multitask/test_new_weightings.py::test_db_mtl_balances_log_loss_gradients")
class DBMTL(GradientSizedState, Weighting):
    """DB-MTL: balance the loss scales with logarithms and the gradient magnitudes with their norms.

    Each task's loss is replaced by ``log(L_t - b_t + eps)`` (loss-scale balancing); the shared
    parameters track the exponential moving average ``h_t <- g'_t + beta_k (h_t - g'_t)`` of its
    gradient ``g'_t = g_t / (L_t - b_t + eps)`` (``beta_k = beta / k^beta_sigma``, step ``k`` from 1,
    ``h`` starting at 0) and move along ``sum_t (max_s ||h_s|| / ||h_t||) h_t``, every task's tracked
    gradient scaled to the largest norm (gradient-magnitude balancing). Defaults ``beta = 0.9``,
    ``beta_sigma = 0`` (the authors'). The heads are trained on the log losses (weights ``1 / (L_t -
    b_t + eps)``), as in the authors' code. The update is given directly
    (:meth:`Weighting.shared_direction`, ``grad_source = "parameters"``); the reported weights are the
    scale factors ``max_s ||h_s|| / ||h_t||``.
    """

    needs_grads = True
    _gradient_sized = ("h",)
    direction_only = True
    gives_direction = True
    needs_bounded_losses = True

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0, eps: float = 1e-8,
                 grad_source: GradSource = "parameters") -> None:
        super().__init__(grad_source)
        require_parameter_grads(self, grad_source)
        if not 0 <= beta <= 1 or beta_sigma < 0 or not eps > 0:
            raise ValueError(f"DBMTL needs 0 <= beta <= 1, beta_sigma >= 0 and eps > 0, got beta={beta}, "
                             f"beta_sigma={beta_sigma}, eps={eps}")
        self.beta, self.beta_sigma, self.eps = float(beta), float(beta_sigma), float(eps)
        self.register_buffer("h", torch.zeros(0, 0, dtype=torch.float64))
        self.register_buffer("k", torch.zeros((), dtype=torch.long))
        self.register_buffer("_head_w", torch.zeros(0, dtype=torch.float64))

    def setup(self, num_tasks, lower_bounds=None) -> None:
        super().setup(num_tasks, lower_bounds)
        self.h = torch.zeros(num_tasks, 0, dtype=torch.float64)
        self._head_w = torch.ones(num_tasks, dtype=torch.float64)

    def compute_weights(self, stats: TaskStats) -> Tensor:
        self._check(stats)
        g = stats.grads.detach().double()
        if self.h.shape[1] != g.shape[1]:
            self.h = torch.zeros(self.num_tasks, g.shape[1], dtype=torch.float64, device=g.device)
        self.k += 1
        active = stats.active.to(g.device)
        inv = torch.where(stats.active.cpu(), 1.0 / (self.shifted_losses(stats) + self.eps), 0.0)
        self._head_w = inv.to(self._head_w.device)
        g = g * inv.to(g.device)[:, None]
        beta = self.beta / int(self.k) ** self.beta_sigma
        self.h = torch.where(active[:, None], g + beta * (self.h - g), self.h)
        idx = active.nonzero().flatten()
        norms = self.h[idx].norm(dim=1)
        return _scatter((norms.max() / (norms + 1e-8)).cpu(), idx.cpu(), stats)

    def task_weights(self, weights: Tensor) -> Tensor:
        return self._head_w.to(weights)

    def shared_direction(self, stats: TaskStats, weights: Tensor) -> Optional[Tensor]:
        return self.h.T @ weights.to(self.h)
