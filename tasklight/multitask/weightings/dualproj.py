"""DualProj: the mean gradient projected onto the dual cone of the task gradients (torchjd)."""
from __future__ import annotations

from tasklight.multitask.registry import register_weighting
from tasklight.multitask.weighting import DualConeWeighting


@register_weighting("dualproj", paper="Quinton & Rey (2024), Jacobian Descent for Multi-Objective Optimization "
                    "(the projection of Lopez-Paz & Ranzato 2017, GEM)",
                    reference="torchjd `DualProjWeighting`; an independent QP (scipy SLSQP)",
                    parity="tests/multitask/test_torchjd_parity.py::test_dualproj")
class DualProj(DualConeWeighting):
    """DualProj: the average task gradient projected onto the dual cone of the task gradients (the
    vectors with a non-negative inner product with every one), the closest update to the mean that
    conflicts with no task. The weights come from torchjd's ``DualProjWeighting`` (a small quadratic
    program on the Gram matrix, quadprog) with its safeguards ``norm_eps`` and ``reg_eps``. Only the
    shared parameters are steered.
    """

    torchjd_name = "DualProjWeighting"
