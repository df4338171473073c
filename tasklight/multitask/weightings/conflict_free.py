"""ConFIG, conflict-free training (Liu et al., 2025)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from tasklight.multitask.registry import register_weighting
from tasklight.multitask.weighting import GradSource, TaskStats, Weighting, _active_gram, _scatter


def config_weights(gram: Tensor, pref: Tensor) -> Tensor:
    """The ConFIG update as coefficients on the task gradients, from their Gram matrix.

    With unit gradients ``u_t = g_t / ||g_t||`` (``U = D^{-1} J``), the conflict-free direction is
    ``U^+ pref = U^T (U U^T)^+ pref = J^T D^{-1} c`` with ``c = G_u^+ pref``, ``G_u = D^{-1} G D^{-1}``; it
    is normalised and scaled by the sum of the task gradients' projections on it."""
    norms = torch.diag(gram).clamp_min(0).sqrt()
    inv = torch.where(norms > 0, 1.0 / norms, 0.0)
    Gu = inv[:, None] * gram * inv[None, :]
    c = torch.linalg.pinv(Gu, hermitian=True) @ pref
    coef = inv * c  # best direction = J^T coef
    norm = torch.sqrt((coef @ gram @ coef).clamp_min(0))
    if float(norm) == 0.0:
        return torch.zeros_like(pref)
    length = (gram @ coef).sum() / norm
    return length * coef / norm


@register_weighting("config", paper="Liu et al. (2025), ConFIG: Towards Conflict-free Training of Physics "
                    "Informed Neural Networks", reference="torchjd `ConFIG` (the authors' conflictfree package)",
                    parity="tests/multitask/test_torchjd_parity.py::test_config")
class ConFIG(Weighting):
    """ConFIG: the direction ``v`` with equal cosine to every task gradient (``v = U^+ 1``, ``U`` the
    unit task gradients, ``pref`` giving unequal targets), scaled by the sum of the task gradients'
    projections on it: ``d = (sum_t g_t . v_hat) v_hat``. It is a linear combination of the task
    gradients, computed from their Gram matrix. Only the shared parameters are steered.
    """

    needs_grads = True
    direction_only = True

    def __init__(self, pref: Optional[Sequence[float]] = None, grad_source: GradSource = "representation") -> None:
        super().__init__(grad_source)
        self.pref = None if pref is None else [float(p) for p in pref]

    def setup(self, num_tasks, lower_bounds=None) -> None:
        super().setup(num_tasks, lower_bounds)
        if self.pref is not None and len(self.pref) != num_tasks:
            raise ValueError(f"ConFIG: pref has {len(self.pref)} entries for {num_tasks} tasks")

    def compute_weights(self, stats: TaskStats) -> Tensor:
        self._check(stats)
        idx, _, G = _active_gram(stats)
        pref = (torch.ones(len(idx), dtype=torch.float64) if self.pref is None
                else torch.tensor(self.pref, dtype=torch.float64)[idx.cpu()])
        return _scatter(config_weights(G.cpu(), pref), idx, stats)
