"""Multi-task regression data: several fixed sinusoid tasks sharing one input space.

Task ``t`` is ``y = A_t sin(x - phase_t)`` with ``A_t ~ U[0.1, 5]`` and ``phase_t ~ U[0, pi]`` drawn once
from ``task_seed``; ``x ~ U[-5, 5]``. Each task has its own training, validation and test points.
Any regression loss works per task, e.g. ``HistogramLoss`` (HL-Gauss heads).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from tasklight.data.multitask import MultiTaskDataModule, TaskSpec
from tasklight.core.checks import check_int, check_real


class SinusoidTasksDataModule(MultiTaskDataModule):
    """``num_tasks`` sinusoid regression tasks for :class:`MultiTaskModule`.

    Args:
        num_tasks: number of tasks.
        n_train, n_val, n_test: points per task in each split.
        noise: std of Gaussian noise added to the training targets.
        loss: the loss of every task (default MSE); a module with ``num_bins`` (``HistogramLoss``)
            sets the size of the task heads.
        task_seed: seed of the tasks' amplitudes, phases and points.
        Other arguments as in :class:`MultiTaskDataModule`.
    """

    def __init__(self, num_tasks: int = 4, n_train: int = 100, n_val: int = 100, n_test: int = 500,
                 noise: float = 0.0, loss: Optional[nn.Module] = None, task_seed: int = 0,
                 batch_size_per_task: int = 16, steps_per_epoch: int = 100, eval_batch_size: int = 512,
                 task_descriptors: Optional[Union[Tensor, str]] = None, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__(batch_size_per_task=batch_size_per_task, steps_per_epoch=steps_per_epoch,
                         eval_batch_size=eval_batch_size, task_descriptors=task_descriptors, seed=seed,
                         num_workers=num_workers)
        for name, value in (("num_tasks", num_tasks), ("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            check_int("SinusoidTasksDataModule", name, value, 1)
        check_real("SinusoidTasksDataModule", "noise", noise, 0.0, what="the std of the training targets' noise")
        if num_tasks < 1 or min(n_train, n_val, n_test) < 1:
            raise ValueError(f"need num_tasks >= 1 and n_train, n_val, n_test >= 1; got {num_tasks}, "
                             f"{n_train}, {n_val}, {n_test}")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.n_tasks, self.sizes, self.noise = num_tasks, (n_train, n_val, n_test), noise
        self.loss, self.task_seed = loss, task_seed
        g = torch.Generator().manual_seed(task_seed)
        self.amplitudes = 0.1 + 4.9 * torch.rand(num_tasks, generator=g)
        self.phases = math.pi * torch.rand(num_tasks, generator=g)

    def build(self):
        g = torch.Generator().manual_seed(self.task_seed + 1)
        splits: list[list[TensorDataset]] = [[], [], []]
        for t in range(self.n_tasks):
            for s, n in enumerate(self.sizes):
                x = -5 + 10 * torch.rand(n, 1, generator=g)
                y = self.amplitudes[t] * torch.sin(x - self.phases[t])
                if s == 0 and self.noise:
                    y = y + self.noise * torch.randn(n, 1, generator=g)
                splits[s].append(TensorDataset(x, y))
        width = int(getattr(self.loss, "num_bins", 1))
        tasks = [TaskSpec(f"sin{t}", out_features=width, kind="regression", loss=self.loss, size=self.sizes[0])
                 for t in range(self.n_tasks)]
        return tasks, splits[0], splits[1], splits[2]
