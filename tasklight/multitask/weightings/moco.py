"""MoCo, stochastic multi-objective gradient correction (Fernando et al., 2023)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tasklight.multitask.registry import register_weighting
from tasklight.multitask.weighting import GradSource, TaskStats, Weighting, _scatter
from tasklight.multitask.weightings._common import (GradientSizedState, check_positive, project_onto_simplex,
                                                    require_parameter_grads)


@register_weighting("moco", paper="Fernando et al. (2023), Mitigating Gradient Bias in Multi-objective Learning: "
                    "A Provably Convergent Approach", reference="LibMTL `MoCo` (the authors' code; not in LibMTL "
                    "1.1.5 or torchjd); checked against the recursion written out",
                    parity="tests/multitask/test_new_weightings.py::test_moco_tracks_gradients_and_projects_lambda")
class MoCo(GradientSizedState, Weighting):
    """MoCo: track each task's gradient and steer with the min-norm combination of the tracked ones.

    With step ``k`` (from 1) and the task gradients rescaled to ``g_t (L_t - b_t) / ||g_t||`` (the
    authors' code, with ``b_t`` the loss's lower bound, 0 by default: a negative loss would turn the
    gradient around), ``y_t <- y_t - beta_k (y_t - g_t)`` (``y`` starts at 0), ``lambda <- Proj_simplex(lambda -
    gamma_k (Y Y^T + rho I) lambda)`` (start ``1/T``) and the shared parameters move along ``Y^T
    lambda``; ``beta_k = beta / k^beta_sigma``, ``gamma_k = gamma / k^gamma_sigma``. Defaults: ``beta =
    0.5``, ``beta_sigma = 0.5``, ``gamma = 0.1``, ``gamma_sigma = 0.5``, ``rho = 0`` (the authors' code
    and LibMTL). The paper projects ``lambda`` onto the simplex; LibMTL's code takes a softmax instead.
    The tracked gradients live on the shared parameters (``grad_source = "parameters"``) and the
    update is not a weighted sum of this step's gradients, so the method gives it directly
    (:meth:`Weighting.shared_direction`). Heads get their own loss's gradient; the reported weights
    are ``lambda``.
    """

    needs_grads = True
    _gradient_sized = ("y",)
    direction_only = True
    gives_direction = True
    needs_bounded_losses = True

    def __init__(self, beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1, gamma_sigma: float = 0.5,
                 rho: float = 0.0, grad_source: GradSource = "parameters") -> None:
        super().__init__(grad_source)
        require_parameter_grads(self, grad_source)
        check_positive("MoCo", beta=beta, gamma=gamma)
        if beta_sigma < 0 or gamma_sigma < 0 or rho < 0:
            raise ValueError(f"MoCo: beta_sigma, gamma_sigma and rho must be >= 0, got {beta_sigma}, {gamma_sigma}, "
                             f"{rho}")
        self.beta, self.beta_sigma, self.gamma, self.gamma_sigma, self.rho = (
            float(beta), float(beta_sigma), float(gamma), float(gamma_sigma), float(rho))
        self.register_buffer("y", torch.zeros(0, 0, dtype=torch.float64))
        self.register_buffer("lam", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("k", torch.zeros((), dtype=torch.long))

    def setup(self, num_tasks, lower_bounds=None) -> None:
        super().setup(num_tasks, lower_bounds)
        self.y = torch.zeros(num_tasks, 0, dtype=torch.float64)
        self.lam = torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)

    def compute_weights(self, stats: TaskStats) -> Tensor:
        self._check(stats)
        g = stats.grads.detach().double()
        if self.y.shape[1] != g.shape[1]:
            self.y = torch.zeros(self.num_tasks, g.shape[1], dtype=torch.float64, device=g.device)
        self.k += 1
        k = int(self.k)
        active = stats.active.to(g.device)
        idx = active.nonzero().flatten()
        losses = self.shifted_losses(stats).to(g.device)
        g = g / (g.norm(dim=1, keepdim=True) + 1e-8) * losses[:, None]
        beta = self.beta / k ** self.beta_sigma
        self.y = torch.where(active[:, None], self.y - beta * (self.y - g), self.y)
        Y = self.y[idx]
        lam = project_onto_simplex(self.lam.to(g.device)[idx])
        gamma = self.gamma / k ** self.gamma_sigma
        lam = project_onto_simplex(lam - gamma * (Y @ Y.T @ lam + self.rho * lam))
        full = self.lam.clone()
        full[idx.to(full.device)] = lam.to(full)
        self.lam = full
        return _scatter(lam.cpu(), idx.cpu(), stats)

    def shared_direction(self, stats: TaskStats, weights: Tensor) -> Optional[Tensor]:
        lam = torch.where(stats.active.to(self.lam.device), self.lam, 0.0)
        return self.y.T @ lam.to(self.y)
