"""GradVac, gradient vaccine (Wang et al., 2021)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from tasklight.core.seeding import seeded_generator
from tasklight.multitask.registry import register_weighting
from tasklight.multitask.weighting import GradSource, TaskStats, Weighting, _active_gram, _scatter


@register_weighting("gradvac", paper="Wang et al. (2021), Gradient Vaccine",
                    reference="torchjd `GradVacWeighting`; LibMTL 1.1.5 `GradVac`",
                    parity="tests/multitask/test_libmtl_parity.py::test_gradvac")
class GradVac(Weighting):
    """Gradient vaccine: each task gradient is pulled towards the others until their cosine reaches an
    adaptive target.

    For every task ``i`` and every other task ``j`` (in an order drawn from a generator seeded by
    ``(seed, step)``, the same on every DDP rank), with ``phi_ij`` the cosine of the modified
    ``g_i'`` and the original ``g_j`` and ``hat phi_ij`` its exponential moving average (rate
    ``beta``, start 0): if ``phi_ij < hat phi_ij``, ``g_i' += g_j ||g_i'|| (hat phi sqrt(1 - phi^2) -
    phi sqrt(1 - hat phi^2)) / (||g_j|| sqrt(1 - hat phi^2))``; then ``hat phi_ij <- (1 - beta) hat
    phi_ij + beta phi_ij``. The update is ``sum_i g_i'``, a linear combination of the task gradients,
    so everything is computed from their Gram matrix and returned as weights (as torchjd's
    ``GradVacWeighting``). Default ``beta = 0.5`` (LibMTL's). Deviations of the references: LibMTL
    1.1.5 updates ``hat phi_ij`` only when it corrects (the paper's Algorithm 1, and torchjd, update it
    at every pair); the paper applies the vaccine per layer group, LibMTL and torchjd (and we) to the
    whole shared gradient. Only the shared parameters are steered; heads get their own loss's gradient.
    """

    needs_grads = True
    direction_only = True

    def __init__(self, beta: float = 0.5, eps: float = 1e-8, seed: int = 0,
                 grad_source: GradSource = "representation") -> None:
        super().__init__(grad_source)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"GradVac: beta must be in [0, 1], got {beta}")
        if eps < 0:
            raise ValueError(f"GradVac: eps must be >= 0, got {eps}")
        self.beta, self.eps, self.seed = float(beta), float(eps), int(seed)
        self.register_buffer("phi_hat", torch.zeros(0, 0, dtype=torch.float64))

    def setup(self, num_tasks, lower_bounds=None) -> None:
        super().setup(num_tasks, lower_bounds)
        self.phi_hat = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)

    def orders(self, step: int, tasks: Sequence[int]) -> list[list[int]]:
        """For each task of ``tasks`` in turn, the order in which the other tasks are visited."""
        gen = seeded_generator(self.seed, int(step))
        out = []
        for i in tasks:
            others = [j for j in tasks if j != i]
            out.append([others[k] for k in torch.randperm(len(others), generator=gen).tolist()])
        return out

    def compute_weights(self, stats: TaskStats) -> Tensor:
        self._check(stats)
        idx, _, G = _active_gram(stats)
        G = G.cpu()
        tasks = idx.tolist()
        pos = {t: k for k, t in enumerate(tasks)}
        phi_hat = self.phi_hat.cpu().clone()
        C = torch.eye(len(tasks), dtype=torch.float64)
        for a, (i, order) in enumerate(zip(tasks, self.orders(stats.step, tasks))):
            for j in order:
                b = pos[j]
                cG = C[a] @ G
                norm_i = math.sqrt(max(float(cG @ C[a]), 0.0))
                norm_j = math.sqrt(max(float(G[b, b]), 0.0))
                phi = float(cG[b]) / (norm_i * norm_j + self.eps)
                target = float(phi_hat[i, j])
                if phi < target:
                    C[a, b] += norm_i * (target * math.sqrt(max(1 - phi * phi, 0.0))
                                         - phi * math.sqrt(max(1 - target * target, 0.0))) / (
                        norm_j * math.sqrt(max(1 - target * target, 0.0)) + self.eps)
                phi_hat[i, j] = (1 - self.beta) * target + self.beta * phi
        self.phi_hat = phi_hat.to(self.phi_hat.device)
        return _scatter(C.sum(0), idx, stats)
