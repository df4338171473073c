"""DualProj: the mean gradient projected onto the dual cone of the task gradients (torchjd)."""
from __future__ import annotations

import torch
from torch import Tensor

from tasklight.multitask.registry import register_weighting
from tasklight.multitask.weighting import GradSource, TaskStats, Weighting, _active_gram, _scatter, _torchjd_weighting


@register_weighting("dualproj", paper="Quinton & Rey (2024), Jacobian Descent for Multi-Objective Optimization "
                    "(the projection of Lopez-Paz & Ranzato 2017, GEM)",
                    reference="torchjd `DualProjWeighting`; an independent QP (scipy SLSQP)",
                    parity="tests/multitask/test_torchjd_parity.py::test_dualproj")
class DualProj(Weighting):
    """DualProj: the average task gradient projected onto the dual cone of the task gradients (the
    vectors with a non-negative inner product with every one), the closest update to the mean that
    conflicts with no task. The weights come from torchjd's ``DualProjWeighting`` (a small quadratic
    program on the Gram matrix, quadprog) with its safeguards ``norm_eps`` and ``reg_eps``. Only the
    shared parameters are steered.
    """

    needs_grads = True
    direction_only = True

    def __init__(self, norm_eps: float = 1e-4, reg_eps: float = 1e-4,
                 grad_source: GradSource = "representation") -> None:
        super().__init__(grad_source)
        self.norm_eps, self.reg_eps = float(norm_eps), float(reg_eps)
        from torchjd.linalg import QuadprogProjector

        self._solver = _torchjd_weighting("DualProjWeighting")(
            projector=QuadprogProjector(norm_eps=self.norm_eps, reg_eps=self.reg_eps))

    def compute_weights(self, stats: TaskStats) -> Tensor:
        self._check(stats)
        idx, _, G = _active_gram(stats)
        return _scatter(self._solver(G).double(), idx, stats)
