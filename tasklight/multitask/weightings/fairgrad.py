"""FairGrad (Ban & Ji, 2024)."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from tasklight.multitask.registry import register_weighting
from tasklight.multitask.weighting import GradSource, TaskStats, Weighting, _active_gram, _scatter
from tasklight.multitask.weightings._common import check_positive


def fairgrad_weights(gram: Tensor, alpha: float, tol: float = 1e-12) -> Tensor:
    """The ``w > 0`` with ``G w = w^(-1/alpha)`` (the alpha-fair step of FairGrad), by bounded nonlinear
    least squares (scipy's ``least_squares``, as the paper's code) with the exact Jacobian."""
    from scipy.optimize import least_squares

    G = gram.detach().double().cpu().numpy()
    T = G.shape[0]
    p = -1.0 / alpha

    def fun(w):
        return G @ w - np.power(w, p)

    def jac(w):
        return G - np.diag(p * np.power(w, p - 1.0))

    res = least_squares(fun, np.full(T, 1.0 / T), jac=jac, bounds=(0, np.inf), xtol=tol, ftol=tol, gtol=tol)
    return torch.from_numpy(res.x)


@register_weighting("fairgrad", paper="Ban & Ji (2024), Fair Resource Allocation in Multi-Task Learning",
                    reference="torchjd `FairGradWeighting` (the paper's code)",
                    parity="tests/multitask/test_torchjd_parity.py::test_fairgrad")
class FairGrad(Weighting):
    """FairGrad: the update ``d = sum_t w_t g_t`` whose per-task gains ``g_t . d`` are alpha-fair, i.e.
    ``w > 0`` solves ``G w = w^(-1/alpha)`` (``G`` the Gram matrix of the task gradients); ``alpha =
    1`` (the default, the paper's and LibMTL's) is proportional fairness (Nash-MTL's equation),
    larger ``alpha`` approaches max-min fairness. Solved as the paper's code does (nonlinear least
    squares with ``w >= 0``), to a tolerance of ``1e-12``. Only the shared parameters are steered.
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
