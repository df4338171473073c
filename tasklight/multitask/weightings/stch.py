"""STCH, smooth Tchebycheff scalarisation (Lin et al., 2024)."""
from __future__ import annotations

import torch
from torch import Tensor

from tasklight.multitask.registry import register_weighting
from tasklight.multitask.weighting import TaskStats, Weighting
from tasklight.multitask.weightings._common import check_positive


@register_weighting("stch", paper="Lin et al. (2024), Smooth Tchebycheff Scalarization for Multi-Objective "
                    "Optimization", reference="the authors' STCH_MTL code (as in LibMTL's `STCH`); checked against "
                    "autograd of the objective",
                    parity="tests/multitask/test_new_weightings.py::"
                           "test_stch_weights_are_the_gradient_of_its_objective")
class STCH(Weighting):
    """Smooth Tchebycheff scalarisation, in the form of the authors' multi-task code.

    Up to and including epoch ``warmup_epochs`` the objective is ``sum_t log(L_t)``; the mean losses of
    epoch ``warmup_epochs`` become the nadir point ``z_t``; from the next epoch on the objective is
    ``T mu log sum_t exp(log(L_t / z_t) / mu)``, a smooth maximum (temperature ``mu``) of the log
    loss ratios. Both are expressed as weights on the losses (their gradients with respect to
    ``L_t``): ``1 / L_t`` during warm-up, then ``T softmax_t(log(L_t / z_t) / mu) / L_t``. Losses are
    measured from their lower bound. Defaults: ``mu = 1``, ``warmup_epochs = 4`` (the authors' and
    LibMTL's ``STCH_mu`` and ``STCH_warmup_epoch``: log losses in epochs 0-4, the nadir from epoch 4,
    the smooth Tchebycheff objective from epoch 5).
    """

    needs_bounded_losses = True

    def __init__(self, mu: float = 1.0, warmup_epochs: int = 4) -> None:
        super().__init__()
        check_positive("STCH", mu=mu)
        if int(warmup_epochs) < 0:
            raise ValueError(f"STCH: warmup_epochs must be >= 0, got {warmup_epochs}")
        self.mu, self.warmup_epochs = float(mu), int(warmup_epochs)
        for name in ("nadir_sum", "nadir_count"):
            self.register_buffer(name, torch.zeros(0, dtype=torch.float64))

    def setup(self, num_tasks, lower_bounds=None) -> None:
        super().setup(num_tasks, lower_bounds)
        self.nadir_sum = torch.zeros(num_tasks, dtype=torch.float64)
        self.nadir_count = torch.zeros(num_tasks, dtype=torch.float64)

    def compute_weights(self, stats: TaskStats) -> Tensor:
        self._check(stats)
        active = stats.active.cpu()
        d = self.shifted_losses(stats).clamp_min(1e-20)
        if stats.epoch <= self.warmup_epochs:
            if stats.epoch == self.warmup_epochs:  # the nadir point: the mean losses of this epoch
                self.nadir_sum = self.nadir_sum + torch.where(active, d, 0.0).to(self.nadir_sum)
                self.nadir_count = self.nadir_count + active.double().to(self.nadir_count)
            w = torch.where(active, 1.0 / d, 0.0)
            return w.to(stats.losses)
        nadir = (self.nadir_sum / self.nadir_count.clamp_min(1)).cpu()
        if bool((self.nadir_count.cpu()[active] == 0).any()):
            raise ValueError(f"STCH has no nadir loss for a task that never trained in warm-up epoch "
                             f"{self.warmup_epochs}; sample every task in that epoch")
        ratio = torch.log(d / nadir)
        n = int(active.sum())
        soft = torch.softmax(torch.where(active, ratio / self.mu, float("-inf")), 0)
        w = torch.where(active, n * soft / d, 0.0)
        return w.to(stats.losses)
