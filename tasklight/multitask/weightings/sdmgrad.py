"""SDMGrad, stochastic direction-oriented multi-objective gradient descent (Xiao et al., 2023)."""
from __future__ import annotations

import torch
from torch import Tensor

from tasklight.multitask.registry import register_weighting
from tasklight.multitask.weighting import GradSource, TaskStats, Weighting, _active_gram, _scatter
from tasklight.multitask.weightings._common import check_positive, project_onto_simplex


@register_weighting("sdmgrad", paper="Xiao et al. (2023), Direction-oriented Multi-objective Learning",
                    reference="torchjd `SDMGradWeighting` (the paper's code)",
                    parity="tests/multitask/test_torchjd_parity.py::test_sdmgrad")
class SDMGrad(Weighting):
    """SDMGrad: keep the update close to the average gradient ``g_0`` while improving every task.

    Keeps weights ``w`` on the simplex; each step, ``n_iter`` projected momentum-SGD steps (``lr``,
    ``momentum``) on ``0.5 ||g_w + lambda g_0||^2`` from the previous ``w``, with the Gram matrix
    scaled by the squared mean gradient norm; the update is ``(g_w + lambda g_0) / (1 + lambda)``.
    Defaults: ``lambda = 0.3``, ``lr = 10``, ``momentum = 0.5``, ``n_iter = 20`` (the paper's
    experiments; the code's class default for ``lambda`` is 0.6). The paper estimates the Gram matrix
    from two (and the update from a third) independent mini-batches; like LibMTL we use the Gram
    matrix of the step's batch. Only the shared parameters are steered.
    """

    needs_grads = True
    direction_only = True

    def __init__(self, lambda_: float = 0.3, lr: float = 10.0, momentum: float = 0.5, n_iter: int = 20,
                 grad_source: GradSource = "representation") -> None:
        super().__init__(grad_source)
        check_positive("SDMGrad", lr=lr)
        if lambda_ < 0 or not 0 <= momentum < 1 or int(n_iter) < 1:
            raise ValueError(f"SDMGrad needs lambda_ >= 0, 0 <= momentum < 1 and n_iter >= 1, got lambda_={lambda_}, "
                             f"momentum={momentum}, n_iter={n_iter}")
        self.lambda_, self.lr, self.momentum, self.n_iter = float(lambda_), float(lr), float(momentum), int(n_iter)
        self.register_buffer("w", torch.zeros(0, dtype=torch.float64))

    def setup(self, num_tasks, lower_bounds=None) -> None:
        super().setup(num_tasks, lower_bounds)
        self.w = torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)

    def compute_weights(self, stats: TaskStats) -> Tensor:
        self._check(stats)
        idx, _, G = _active_gram(stats)
        G = G.cpu()
        n = len(idx)
        w = project_onto_simplex(self.w.cpu()[idx.cpu()])
        w0 = torch.full((n,), 1.0 / n, dtype=torch.float64)
        A = G / (torch.diag(G).clamp_min(0).sqrt().mean() ** 2 + 1e-8)
        velocity = None
        for _ in range(self.n_iter):
            grad = A @ (w + self.lambda_ * w0)
            velocity = grad if velocity is None else self.momentum * velocity + grad
            w = project_onto_simplex(w - self.lr * velocity)
        full = self.w.cpu().clone()
        full[idx.cpu()] = w
        self.w = full.to(self.w.device)
        return _scatter((w + self.lambda_ * w0) / (1 + self.lambda_), idx, stats)
