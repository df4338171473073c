"""Sinusoid regression tasks (Finn et al. 2017).

A task is ``y = A sin(x - phase)`` with ``A ~ U[0.1, 5]``, ``phase ~ U[0, pi]``, ``x ~ U[-5, 5]``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from tasklight.data.episodes import EpisodicDataModule, Task, TaskFn
from tasklight.core.checks import check_int


def sinusoid_task(gen: torch.Generator, k_shot: int, q_queries: int, amplitude=(0.1, 5.0), phase=(0.0, math.pi),
                  x_range=(-5.0, 5.0)) -> Task:
    u = torch.rand(2, generator=gen)
    a = amplitude[0] + (amplitude[1] - amplitude[0]) * u[0]
    p = phase[0] + (phase[1] - phase[0]) * u[1]
    x = x_range[0] + (x_range[1] - x_range[0]) * torch.rand(k_shot + q_queries, 1, generator=gen)
    y = a * torch.sin(x - p)
    return x[:k_shot], y[:k_shot], x[k_shot:], y[k_shot:]


class SinusoidDataModule(EpisodicDataModule):
    """Few-shot sinusoid regression: ``k_shot`` support and ``q_queries`` query points per task.

    Shapes: ``support_x [T, k_shot, 1]``, ``support_y [T, k_shot, 1]``.
    """

    def __init__(self, k_shot: int = 5, q_queries: int = 10, meta_batch_size: int = 25,
                 batches_per_epoch: int = 500, val_episodes: int = 100, test_episodes: int = 600,
                 eval_batch_size: Optional[int] = None, amplitude: tuple[float, float] = (0.1, 5.0),
                 phase: tuple[float, float] = (0.0, math.pi), x_range: tuple[float, float] = (-5.0, 5.0),
                 seed: int = 0, num_workers: int = 0) -> None:
        super().__init__(meta_batch_size, batches_per_epoch, val_episodes, test_episodes, eval_batch_size, seed,
                         num_workers)
        check_int("SinusoidDataModule", "k_shot", k_shot, 1, "support points per task")
        check_int("SinusoidDataModule", "q_queries", q_queries, 1, "query points per task")
        if k_shot < 1 or q_queries < 1:
            raise ValueError(f"k_shot and q_queries must be >= 1, got {k_shot}, {q_queries}")
        for name, (lo, hi) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not lo <= hi:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(lo, hi)}")
        self.save_hyperparameters()
        self.k_shot, self.q_queries = k_shot, q_queries
        self.amplitude, self.phase, self.x_range = tuple(amplitude), tuple(phase), tuple(x_range)

    def task_fn(self, split: str) -> TaskFn:
        return _SinusoidTasks(self.k_shot, self.q_queries, self.amplitude, self.phase, self.x_range)

    @staticmethod
    def true_function(x: Tensor, y: Tensor, grid: Tensor) -> Tensor:
        """Each task's true function on ``grid`` (``[G, 1]`` -> ``[T, G]``), from its noise-free points
        ``x, y`` (``[T, N, 1]``, N >= 2): ``A sin(x - phase) = a sin x + b cos x``, solved for ``(a, b)``
        by least squares (exact for the task's own points). Figures draw it beside the fitted curves."""
        basis = torch.stack([torch.sin(x.reshape(x.shape[0], -1)), torch.cos(x.reshape(x.shape[0], -1))], -1)
        coef = torch.linalg.lstsq(basis.double(), y.reshape(y.shape[0], -1, 1).double()).solution  # [T, 2, 1]
        g = grid.reshape(-1).double()
        return (torch.stack([torch.sin(g), torch.cos(g)], -1) @ coef).squeeze(-1).to(y.dtype)


class _SinusoidTasks:
    """A picklable task function (DataLoader workers and ddp_spawn pickle it)."""

    def __init__(self, k_shot, q_queries, amplitude, phase, x_range):
        self.args = (k_shot, q_queries, amplitude, phase, x_range)

    def __call__(self, gen: torch.Generator) -> Task:
        return sinusoid_task(gen, *self.args)
