"""Figures of a run that are read better than numbers, logged by :func:`tasklight.plots.log_figure`
(W&B images, else PNGs in the run folder).

* :class:`ParetoTrajectoryPlot`: the two-objective toy (:mod:`tasklight.multitask.toy`): the path of
  the point in objective space, from its start to where training left it, with the Pareto front.
* :class:`LearnedMetricPlot`: TaskMet's learned metric ``Lambda(x)`` on the first validation batch
  (the mean matrix and, for 1-D features, its diagonal against ``x``).

The other figures come with the objects they show: meta-learners plot the metric vs adaptation
steps and the fitted functions at the end of a test, :class:`~tasklight.callbacks.TaskLossLogger`
the per-task bars, :class:`~tasklight.callbacks.GradientConflictMonitor` the cosine heatmap,
:class:`~tasklight.callbacks.Task2VecCallback` the task distances.
"""
from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from tasklight.plots import learned_metric, log_figure, pareto_trajectories, wants_figures

__all__ = ["ParetoTrajectoryPlot", "LearnedMetricPlot"]


class ParetoTrajectoryPlot(Callback):
    """Record the toy point of a :class:`~tasklight.multitask.module.MultiTaskModule` (trunk
    :class:`~tasklight.multitask.toy.ToyPoint`, data
    :class:`~tasklight.multitask.toy.TwoObjectiveToyDataModule`) after every training step and log
    its trajectory in objective space with the Pareto front (``toy/pareto_trajectory``) at the end
    of training and every ``every_n_epochs`` epochs (0: only at the end).

    ``trajectory`` holds the objective values ``[steps + 1, 2]`` (the start first).
    """

    def __init__(self, every_n_epochs: int = 0, key: str = "toy/pareto_trajectory") -> None:
        super().__init__()
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0 (0: only at the end of training), got {every_n_epochs}")
        self.every_n_epochs, self.key = every_n_epochs, key
        self.points: list[Tensor] = []
        self.scales: Optional[tuple[float, float]] = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from tasklight.multitask.toy import ToyPoint

        trunk = getattr(pl_module, "trunk", None)
        if not isinstance(trunk, ToyPoint):
            raise TypeError(f"ParetoTrajectoryPlot needs a MultiTaskModule whose trunk is a ToyPoint, got "
                            f"{type(pl_module).__name__} with trunk {type(trunk).__name__}")
        scales = getattr(trainer.datamodule, "scales", None)
        if scales is None:
            raise TypeError(f"ParetoTrajectoryPlot needs the TwoObjectiveToyDataModule (its loss scales), got "
                            f"{type(trainer.datamodule).__name__}")
        self.scales = tuple(float(s) for s in scales)
        self.points = [trunk.point.detach().cpu().double().clone()]

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        self.points.append(pl_module.trunk.point.detach().cpu().double().clone())

    @property
    def trajectory(self) -> Tensor:
        from tasklight.multitask.toy import toy_objectives

        return toy_objectives(torch.stack(self.points), self.scales or (1.0, 1.0))

    def _log(self, trainer: Trainer) -> None:
        from tasklight.multitask.toy import toy_pareto_front

        if len(self.points) < 2 or not wants_figures(trainer):
            return
        start = [round(float(v), 2) for v in self.points[0]]
        log_figure(trainer, self.key, pareto_trajectories(
            [self.trajectory], toy_pareto_front(self.scales, n=201), labels=[f"start {tuple(start)}"],
            objectives=("f1", "f2"), title=f"toy trajectory, {len(self.points) - 1} steps"))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._log(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer)


class LearnedMetricPlot(Callback):
    """Log TaskMet's learned metric at the end of each validation (``taskmet/learned_metric``): the
    module's ``metric`` evaluated on the features of the first validation batch (at most
    ``max_points`` inputs). ``last`` holds the matrices ``[N, m, m]`` of the latest plot. A learner
    without a metric (the MSE and DFL baselines, which share TaskMet's configs) gets no figure; a
    ``metric`` without ``matrix(x)`` is an error."""

    def __init__(self, max_points: int = 1000, key: str = "taskmet/learned_metric") -> None:
        super().__init__()
        if max_points < 1:
            raise ValueError(f"max_points must be >= 1, got {max_points}")
        self.max_points, self.key = max_points, key
        self._x: Optional[Tensor] = None
        self.last: Optional[Tensor] = None
        self.enabled = True

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metric = getattr(pl_module, "metric", None)
        self.enabled = metric is not None  # the MSE and DFL baselines learn no metric: nothing to draw
        if self.enabled and not callable(getattr(metric, "matrix", None)):
            raise TypeError(f"LearnedMetricPlot needs a TaskMetModule whose metric has matrix(x) (a MetricNet), got "
                            f"{type(pl_module).__name__} with metric {type(metric).__name__}")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        if batch_idx == 0 and dataloader_idx == 0:
            self._x = batch[0].detach()

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        x, self._x = self._x, None
        if x is None or not self.enabled or trainer.sanity_checking or not wants_figures(trainer):
            return
        metric = pl_module.metric
        feats = x.reshape(-1, x.shape[-1])[: self.max_points]
        with torch.no_grad():
            lam = metric.matrix(feats).detach().cpu()
        self.last = lam
        log_figure(trainer, self.key, learned_metric(lam, feats.cpu() if feats.shape[-1] == 1 else None,
                                                     title=f"learned metric, epoch {trainer.current_epoch}"))
