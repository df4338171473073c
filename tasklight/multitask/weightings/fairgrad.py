"""FairGrad (Ban & Ji, 2024)."""
from __future__ import annotations

from torch import Tensor

from tasklight.multitask.registry import register_weighting
from tasklight.multitask.weighting import GradSource, TaskStats, Weighting, _active_gram, _scatter
from tasklight.multitask.weighting import fair_weights as fairgrad_weights  # noqa: F401 (re-exported)
from tasklight.multitask.weightings._common import check_positive


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
