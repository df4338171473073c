"""MoDo, multi-objective gradient with double sampling (Chen et al., 2024)."""
from __future__ import annotations

import torch
from torch import Tensor

from tasklight.multitask.registry import register_weighting
from tasklight.multitask.weighting import GradSource, TaskStats, Weighting, _active_gram, _scatter
from tasklight.multitask.weightings._common import check_positive, project_onto_simplex


@register_weighting("modo", paper="Chen et al. (2024), Three-Way Trade-Off in Multi-Objective Learning",
                    reference="torchjd `MoDoWeighting` (the authors' code)",
                    parity="tests/multitask/test_torchjd_parity.py::test_modo")
class MoDo(Weighting):
    """MoDo: the task weights ``lambda`` follow projected gradient descent on ``0.5 ||g_lambda||^2``
    with L2 regularisation: ``lambda <- Proj_simplex(lambda - gamma (G lambda + rho lambda))`` (start
    ``1/T``), and the update is ``g_lambda = sum_t lambda_t g_t``. Defaults ``gamma = 1e-3``, ``rho =
    0.1`` (the authors' code and LibMTL). The paper computes ``G = J_1 J_2^T`` from two independent
    mini-batches (for an unbiased estimate); we use the Gram matrix of the step's batch, as
    LibMTL's single-batch mode does. Only the shared parameters are steered.
    """

    needs_grads = True
    direction_only = True

    def __init__(self, gamma: float = 1e-3, rho: float = 0.1, grad_source: GradSource = "representation") -> None:
        super().__init__(grad_source)
        check_positive("MoDo", gamma=gamma)
        if rho < 0:
            raise ValueError(f"MoDo: rho must be >= 0, got {rho}")
        self.gamma, self.rho = float(gamma), float(rho)
        self.register_buffer("lam", torch.zeros(0, dtype=torch.float64))

    def setup(self, num_tasks, lower_bounds=None) -> None:
        super().setup(num_tasks, lower_bounds)
        self.lam = torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)

    def compute_weights(self, stats: TaskStats) -> Tensor:
        self._check(stats)
        idx, _, G = _active_gram(stats)
        lam = project_onto_simplex(self.lam.cpu()[idx.cpu()])
        lam = project_onto_simplex(lam - self.gamma * (G.cpu() @ lam + self.rho * lam))
        full = self.lam.cpu().clone()
        full[idx.cpu()] = lam
        self.lam = full.to(self.lam.device)
        return _scatter(lam, idx, stats)
