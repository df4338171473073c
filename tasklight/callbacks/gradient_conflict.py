"""Gradient conflict between tasks: pairwise cosine similarity of the task gradients.

Every ``every_n_steps`` training steps, :class:`GradientConflictMonitor` asks the
:class:`~tasklight.multitask.module.MultiTaskModule` for the per-task gradients on the shared
parameters (or the shared representation) of that step -- computed inside the step, synchronised
across DDP ranks together with the losses, so no extra forward pass is made -- and logs the cosine
matrix ``C_ij = g_i . g_j / (|g_i| |g_j|)``. Negative entries are conflicting tasks (negative
transfer). Logged keys: ``grad_conflict/cos/{task_i}~{task_j}`` for every pair, ``grad_conflict/mean_cos``
and ``grad_conflict/min_cos``; the full matrix as a heatmap (``grad_conflict/heatmap``) and, with a
WandbLogger, as a table. The matrices are
kept in ``history`` as ``(step, names, matrix)``.
"""
from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from tasklight.multitask.weighting import GRAD_SOURCES


def cosine_matrix(grads: Tensor) -> Tensor:
    """Pairwise cosine similarities ``[T, T]`` of the rows of ``grads [T, P]`` (0 for zero rows)."""
    g = grads.double()
    norms = g.norm(dim=1)
    gram = g @ g.T
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram))


class GradientConflictMonitor(Callback):
    """Log the pairwise cosine similarity of task gradients every ``every_n_steps`` steps.

    Args:
        every_n_steps: how often (in training steps; step 0 included).
        source: ``parameters`` (gradients on all shared parameters, one backward pass per task on the
            monitored steps) or ``representation`` (gradients on the shared representation, summed
            over each task's examples; one backward pass through the heads).
        keep_history: keep every matrix in ``history``.
        plot: also log each matrix as a heatmap (``grad_conflict/heatmap``, red = conflicting tasks):
            a W&B image, or a PNG in the run folder (:func:`tasklight.plots.log_figure`).
    """

    def __init__(self, every_n_steps: int = 50, source: Literal["parameters", "representation"] = "parameters",
                 keep_history: bool = True, plot: bool = True) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if source not in GRAD_SOURCES:
            raise ValueError(f"source must be one of {GRAD_SOURCES}, got {source!r}")
        self.every_n_steps, self.source, self.keep_history, self.plot = every_n_steps, source, keep_history, plot
        self.history: list[tuple[int, list[str], Tensor]] = []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not hasattr(pl_module, "request_task_gradients"):
            raise TypeError(f"GradientConflictMonitor needs a MultiTaskModule, got {type(pl_module).__name__}")
        pl_module.shared_parameters()  # soft sharing has no shared parameters: one clear error now

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            pl_module.request_task_gradients(self.source)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        got = pl_module.last_task_gradients
        if got is None:
            return
        pl_module.last_task_gradients = None
        grads, active = got
        idx = active.nonzero().flatten().cpu()
        names = [pl_module.task_names[i] for i in idx.tolist()]
        cos = cosine_matrix(grads[active].cpu())
        step = int(trainer.global_step) - 1  # the step that produced the gradients
        if self.keep_history:
            self.history.append((step, names, cos))
        logs = {}
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                logs[f"grad_conflict/cos/{names[a]}~{names[b]}"] = float(cos[a, b])
        if len(names) > 1:
            off = cos[~torch.eye(len(names), dtype=torch.bool)]
            logs["grad_conflict/mean_cos"] = float(off.mean())
            logs["grad_conflict/min_cos"] = float(off.min())
        if logs:
            pl_module.log_dict(logs, on_step=True, on_epoch=False, sync_dist=False)
        if trainer.is_global_zero:
            self._log_wandb(trainer, step, names, cos)
            self._plot(trainer, step, names, cos)

    def _log_wandb(self, trainer: Trainer, step: int, names: list[str], cos: Tensor) -> None:
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        import wandb

        table = wandb.Table(columns=["task"] + names,
                            data=[[n] + [float(v) for v in row] for n, row in zip(names, cos.tolist())])
        for lg in loggers:
            lg.experiment.log({"grad_conflict/matrix": table, "trainer/global_step": step})

    def _plot(self, trainer: Trainer, step: int, names: list[str], cos: Tensor) -> None:
        from tasklight.plots import heatmap, log_figure, wants_figures

        if self.plot and len(names) > 1 and wants_figures(trainer):
            log_figure(trainer, "grad_conflict/heatmap",
                       heatmap(cos, names, f"gradient cosine, step {step}", cmap="RdBu", vmin=-1.0, vmax=1.0), step=step)
