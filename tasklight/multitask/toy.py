"""The two-objective toy of CAGrad (Liu et al., 2021) and Nash-MTL (Navon et al., 2022).

Two conflicting losses of a 2-D point: :class:`ToyPoint` (the point as a "network"),
:class:`ToyObjective` (the task losses), :class:`TwoObjectiveToyDataModule` (the tasks for
:class:`~tasklight.multitask.module.MultiTaskModule`), the Pareto front and :func:`toy_descent`
(a weighting method on the toy without the Trainer).
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from tasklight.data.batch import TaskSpec
from tasklight.data.multitask import MultiTaskDataModule
from tasklight.config import RecordsInit

LOWER = 5e-6
TOY_STARTS = {
    # Liu et al. (2021), CAGrad toy.py
    "cagrad": [(-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0)],
    # Navon et al. (2022), Nash-MTL experiments/toy/trainer.py
    "nashmtl": [(-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0)],
}
TOY_SCALES = {"cagrad": (1.0, 1.0), "nashmtl": (0.1, 1.0)}
TOY_LOWER_BOUND = -20.0  # every toy loss is at least -20 (times its scale)


def _gate(t: Tensor) -> Tensor:
    """``max(t, 0)`` whose gradient at ``t = 0`` is 1 on every torch version.

    The published toy code writes ``torch.clamp(t, 0)``; up to torch 2.13 autograd passed the
    gradient through at ``t == 0``, from torch 2.14 it gives 0 there. At ``x2 = 0`` both gates of
    both losses sit exactly on that kink, so with the newer rule the start ``(0, 0)`` has zero
    gradient for both tasks and no method moves from it. Here the kink keeps the convention the
    published results were computed with.
    """
    return torch.where(t >= 0, t, torch.zeros_like(t))


def toy_objectives(x: Tensor, scales: Sequence[float] = (1.0, 1.0)) -> Tensor:
    """The two losses ``[..., 2]`` of points ``x [..., 2]`` (CAGrad's toy; Nash-MTL scales the first by 0.1).

    Above ``x2 = 0`` each loss has a logarithmic valley; below, a quadratic bowl with minima at
    ``x1 = 7`` (loss 1) and ``x1 = -7`` (loss 2). The Pareto set is ``x1 in [-7, 7]``,
    ``x2 ~ -8.36``. On the line ``x2 = 0`` (a kink of both losses) the gradient is the one of the
    published code under torch <= 2.13 (see :func:`_gate`), on every torch version.
    """
    x1, x2 = x[..., 0], x[..., 1]
    f1 = torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), LOWER).log() + 6
    f2 = torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), LOWER).log() + 6
    c1 = _gate(torch.tanh(x2 * 0.5))
    f1_sq = ((-x1 + 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    f2_sq = ((-x1 - 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    c2 = _gate(torch.tanh(-x2 * 0.5))
    return torch.stack([(f1 * c1 + f1_sq * c2) * scales[0], (f2 * c1 + f2_sq * c2) * scales[1]], -1)


def toy_pareto_front(scales: Sequence[float] = (1.0, 1.0), n: int = 1401) -> Tensor:
    """Objective values ``[m, 2]`` of a dense sample of the toy's Pareto-optimal region."""
    x1 = torch.linspace(-7, 7, n, dtype=torch.float64)
    x2 = torch.linspace(-9, -7.5, 151, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(x1, x2, indexing="ij"), -1).reshape(-1, 2)
    return toy_objectives(grid, scales)


def pareto_gap(values: Tensor, front: Tensor) -> Tensor:
    """The additive epsilon indicator: the smallest ``eps >= 0`` such that some front point is at
    most ``eps`` better than ``values`` in every objective (0 on the front). ``values [k, 2]`` -> ``[k]``."""
    diff = values.double()[:, None, :] - front.double()[None]
    return diff.max(-1).values.min(1).values.clamp_min(0)


class ToyPoint(RecordsInit, nn.Module):
    """The toy's "network": a learnable 2-D point, returned for every example of the batch."""

    def __init__(self, start: Sequence[float] = (9.0, 9.0)) -> None:
        super().__init__()
        if len(start) != 2:
            raise ValueError(f"ToyPoint start must be two numbers (x1, x2), got {list(start)}")
        self.point = nn.Parameter(torch.tensor([float(s) for s in start]))
        self.out_features = 2

    def forward(self, x: Tensor) -> Tensor:
        return self.point.expand(x.shape[0], 2)


class ToyObjective(RecordsInit, nn.Module):
    """Loss ``index`` (0 or 1) of the toy, times ``scale``, averaged over the rows of ``pred [n, 2]``."""

    def __init__(self, index: int, scale: float = 1.0) -> None:
        super().__init__()
        if index not in (0, 1):
            raise ValueError(f"ToyObjective index must be 0 or 1, got {index}")
        self.index, self.scale = int(index), float(scale)

    def forward(self, pred: Tensor, y: Optional[Tensor] = None) -> Tensor:
        scales = (self.scale, 1.0) if self.index == 0 else (1.0, self.scale)
        return toy_objectives(pred, scales)[..., self.index].mean()


class TwoObjectiveToyDataModule(MultiTaskDataModule):
    """The two-objective toy: task ``f1`` and task ``f2`` are the two losses of a 2-D point.

    Use it with ``MultiTaskModule(trunk=ToyPoint(start), head_type="identity")``. Every batch holds one
    dummy example per task (the losses do not depend on data). ``variant="cagrad"`` is the original
    problem; ``"nashmtl"`` scales the first loss by 0.1 (Navon et al., 2022).
    """

    def __init__(self, variant: Literal["cagrad", "nashmtl"] = "nashmtl", steps_per_epoch: int = 100,
                 task_descriptors: Optional[Union[Tensor, str]] = None) -> None:
        if variant not in TOY_SCALES:
            raise ValueError(f"variant must be one of {sorted(TOY_SCALES)}, got {variant!r}")
        super().__init__(batch_size_per_task=1, steps_per_epoch=steps_per_epoch, eval_batch_size=2,
                         task_descriptors=task_descriptors)
        self.variant = variant
        self.scales = TOY_SCALES[variant]

    def build(self):
        tasks = [TaskSpec(f"f{i + 1}", 2, "objective", ToyObjective(i, self.scales[i]),
                          lower_bound=TOY_LOWER_BOUND * self.scales[i]) for i in range(2)]
        sets = [TensorDataset(torch.zeros(1, 1), torch.zeros(1)) for _ in range(2)]
        return tasks, sets, sets, sets

    @property
    def starts(self) -> list[tuple[float, float]]:
        return TOY_STARTS[self.variant]




def toy_descent(make_weighting, starts: Sequence[Sequence[float]], scales: Sequence[float] = (0.1, 1.0),
                steps: int = 2000, lr: float = 0.05, epoch_length: int = 100,
                trajectory: Optional[list] = None) -> tuple[Tensor, Tensor]:
    """Run a weighting method on the toy from several starting points at once.

    Each start is an independent problem (Adam is elementwise, so one Adam over the stacked points
    is exactly one Adam per point), with its own weighting instance from ``make_weighting()``, exact
    per-task gradients on the point, and the learning rate annealed from ``lr`` to 0 (cosine) over
    ``steps``. This is the update :class:`~tasklight.multitask.module.MultiTaskModule`
    makes with ``ToyPoint`` and identity heads, without the Trainer around it. Returns the final
    points ``[K, 2]`` and their losses ``[K, 2]``; a list given as ``trajectory`` receives the losses
    ``[K, 2]`` before every step and after the last (``steps + 1`` entries).
    """
    from tasklight.multitask.weighting import TaskStats

    x = torch.tensor([[float(a), float(b)] for a, b in starts], dtype=torch.float64, requires_grad=True)
    methods = [make_weighting() for _ in starts]
    for m in methods:
        m.setup(2, [TOY_LOWER_BOUND * s for s in scales])
        m.double()
    # the methods' own parameters (uncertainty weighting's log variances) train with the point, as in the module
    opt = torch.optim.Adam([x] + [p for m in methods for p in m.parameters()], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    active = torch.ones(2, dtype=torch.bool)
    for step in range(steps):
        f = toy_objectives(x, scales)
        if trajectory is not None:
            trajectory.append(f.detach().clone())
        g = torch.stack([torch.autograd.grad(f[:, i].sum(), x, retain_graph=True)[0] for i in range(2)], 1)
        stats = [TaskStats(f[k].detach(), active, g[k].detach(), step, step // epoch_length) for k in range(len(x))]
        w = torch.stack([m.compute_weights(stats[k]).to(f) for k, m in enumerate(methods)])
        directions = [m.shared_direction(stats[k], w[k]) if m.gives_direction else None for k, m in enumerate(methods)]
        opt.zero_grad()
        torch.stack([m.loss(f[k], m.task_weights(w[k]) if directions[k] is not None else w[k])
                     for k, m in enumerate(methods)]).sum().backward()
        for k, d in enumerate(directions):  # a method that gives the point's update itself
            if d is not None:
                x.grad[k] = d.to(x)
        opt.step()
        sched.step()
    x = x.detach()
    if trajectory is not None:
        trajectory.append(toy_objectives(x, scales))
    return x, toy_objectives(x, scales)


__all__ = ["TwoObjectiveToyDataModule", "ToyPoint", "ToyObjective", "toy_objectives", "toy_pareto_front",
           "pareto_gap", "TOY_STARTS", "TOY_SCALES", "TOY_LOWER_BOUND", "toy_descent"]
