"""FairGrad (Ban & Ji, 2024)."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from tasklight.multitask.registry import register_weighting
from tasklight.multitask.weighting import GradSource, TaskStats, Weighting, _active_gram, _scatter
from tasklight.multitask.weightings._common import check_positive


def fairgrad_weights(gram: Tensor, alpha: float, max_iter: int = 100, tol: float = 1e-10) -> Tensor:
    """The ``w > 0`` with ``G w = w^(-1/alpha)`` (the alpha-fair step of FairGrad).

    It is the unique minimiser of the strictly convex ``0.5 w^T G w - sum_t h(w_t)``, ``h' = w^(-1/alpha)``
    (``h = log`` for ``alpha = 1``), found by damped Newton steps that keep ``w > 0``, to a relative
    residual ``tol``. A ridge ``1e-12 tr(G) / T`` keeps the problem bounded for opposed gradients.
    """
    G = gram.detach().double().cpu().numpy()
    T = G.shape[0]
    G = G + 1e-12 * max(np.trace(G) / T, 1e-30) * np.eye(T)
    p = 1.0 / alpha
    w = np.maximum(np.diag(G), 1e-30) ** (-alpha / (alpha + 1.0))  # the solution for orthogonal gradients

    def h(x):
        return np.log(x).sum() if alpha == 1.0 else (x ** (1.0 - p)).sum() / (1.0 - p)

    def f(x):
        return 0.5 * x @ G @ x - h(x)

    for _ in range(max_iter):
        grad = G @ w - w ** (-p)
        if float(np.abs(grad * w ** p).max()) <= tol:  # relative residual of (G w)_t w_t^(1/alpha) = 1
            break
        step = np.linalg.solve(G + np.diag(p * w ** (-p - 1.0)), grad)
        decrement = float(grad @ step)
        s = 1.0
        while np.any(w - s * step <= 0):
            s *= 0.5
        if decrement > 1e-12:  # damped phase; closer in, full Newton steps converge quadratically
            f0 = f(w)
            while f(w - s * step) > f0 - 0.25 * s * decrement and s > 1e-12:
                s *= 0.5
        w = w - s * step
    return torch.from_numpy(w)


@register_weighting("fairgrad", paper="Ban & Ji (2024), Fair Resource Allocation in Multi-Task Learning",
                    reference="torchjd `FairGradWeighting` (the paper's code)",
                    parity="tests/multitask/test_torchjd_parity.py::test_fairgrad")
class FairGrad(Weighting):
    """FairGrad: the update ``d = sum_t w_t g_t`` whose per-task gains ``g_t . d`` are alpha-fair, i.e.
    ``w > 0`` solves ``G w = w^(-1/alpha)`` (``G`` the Gram matrix of the task gradients); ``alpha =
    1`` (the default, the paper's and LibMTL's) is proportional fairness (Nash-MTL's equation),
    larger ``alpha`` approaches max-min fairness. The paper's code (and torchjd) solve the equation by
    scipy's nonlinear least squares; we solve it exactly, by Newton's method on its convex potential
    (relative residual ``1e-10``). Only the shared parameters are steered.
    """

    needs_grads = True
    direction_only = True

    def __init__(self, alpha: float = 1.0, grad_source: GradSource = "representation") -> None:
        super().__init__(grad_source)
        check_positive("FairGrad", alpha=alpha)
        self.alpha = float(alpha)

    def compute_weights(self, stats: TaskStats) -> Tensor:
        self._check(stats)
        idx, _, G = _active_gram(stats)
        return _scatter(fairgrad_weights(G, self.alpha), idx, stats)
