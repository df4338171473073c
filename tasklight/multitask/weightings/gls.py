"""GLS, the geometric loss strategy (Chennupati et al., 2019)."""
from __future__ import annotations

import torch
from torch import Tensor

from tasklight.multitask.registry import register_weighting
from tasklight.multitask.weighting import TaskStats, Weighting


@register_weighting("gls", paper="Chennupati et al. (2019), MultiNet++: geometric loss strategy",
                    reference="LibMTL 1.1.5 `GLS`",
                    parity="tests/multitask/test_libmtl_parity.py::test_gls")
class GLS(Weighting):
    """Geometric loss strategy: minimise the geometric mean ``(prod_t (L_t - b_t))^(1/T)`` of the active
    tasks' losses (``b_t`` the loss's lower bound, 0 by default).

    Its gradient is ``sum_t w_t grad L_t`` with ``w_t = GM / (T (L_t - b_t))``, so the method returns
    these weights (computed from the global losses, which keeps the objective exact under DDP) and the
    module minimises ``sum_t w_t L_t``. LibMTL 1.1.5 backpropagates the same objective but reports
    ``L_t / (T prod_s L_s)`` as its weights, which are not the coefficients of its update.
    """

    needs_bounded_losses = True

    def compute_weights(self, stats: TaskStats) -> Tensor:
        self._check(stats)
        active = stats.active.cpu()
        d = self.shifted_losses(stats)
        if bool((d[active] <= 0).any()):
            raise ValueError("GLS needs every active task's loss to be above its lower bound (the geometric mean "
                             "of the losses has no gradient at 0); give TaskSpec(lower_bound=...) below the losses")
        n = int(active.sum())
        logs = torch.where(active, d.clamp_min(1e-300).log(), 0.0)
        gm = torch.exp(logs.sum() / n)
        w = torch.where(active, gm / (n * d.clamp_min(1e-300)), 0.0)
        return w.to(stats.losses)
