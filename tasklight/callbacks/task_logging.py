"""Per-task losses and metrics, synchronised across DDP ranks with one gather per epoch.

:class:`TaskMeans` is a torchmetrics ``Metric`` whose single state is a ``[fields, T]`` matrix of sums
(``dist_reduce_fx="sum"``), so all tasks and all fields are synchronised in one gather when it is
computed. :class:`TaskLossLogger` keeps one per stage (train / val / test), fills it from the
per-task sums that :class:`~tasklight.multitask.module.MultiTaskModule` returns from its
steps, and at the end of each epoch logs, to whatever Lightning logger is attached:

* ``{stage}/tasks/{name}/loss`` and ``{stage}/tasks/{name}/{metric}`` for every task
  (``acc`` for classification, ``mse`` for regression), and ``train/tasks/{name}/weight`` (the mean
  weight the weighting method gave the task);
* ``{stage}/loss`` (mean over tasks of the per-task mean loss) and ``{stage}/{metric}`` (mean over the
  tasks that have that metric);
* every ``log_every_n_steps`` training steps, ``train/tasks/{name}/{loss,acc|mse,weight}_step``: the
  means since the last logged step over all DDP ranks (one all-reduce per logged step);
* a bar chart of the per-task validation / test metric (``{stage}/tasks_bars``; a W&B image, else a
  PNG in the run folder, :func:`tasklight.plots.log_figure`);
* with a :class:`~lightning.pytorch.loggers.WandbLogger`: a ``wandb.Table`` of all tasks
  (``{stage}/tasks_table``) and a line plot of every task's validation metric over epochs
  (``val/tasks_plot``).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torchmetrics import Metric

from tasklight.core.outer import check_finite_metrics

FIELDS = ("loss_sum", "count", "metric_sum", "weight_sum", "steps")
METRIC_NAMES = {"classification": "acc", "regression": "mse"}


def step_log_due(trainer: Trainer) -> bool:
    """Whether Lightning writes this training step's on-step logs to the loggers (every
    ``log_every_n_steps`` steps, and on the last); the same on every DDP rank."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is not None and hasattr(connector, "should_update_logs"):
        return bool(connector.should_update_logs)
    n = trainer.log_every_n_steps
    return bool(n) and (trainer.global_step + 1) % n == 0


def log_step_means(module: LightningModule, values: dict[str, Tensor], prog_bar: Sequence[str] = ()) -> None:
    """``module.log`` each scalar of ``values`` on step; on the steps the loggers receive
    (:func:`step_log_due`) the values are first averaged over the DDP ranks in one all-reduce for all
    keys (``sync_dist=True`` would all-reduce every key on every step). The other steps' values
    (the progress bar, ``callback_metrics``) are this rank's."""
    if not values:
        return
    names = list(values)
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in names])
    trainer = module.trainer
    if trainer.world_size > 1 and step_log_due(trainer):
        stacked = trainer.strategy.reduce(stacked, reduce_op="mean")
    for k, v in zip(names, stacked):
        module.log(k, v, on_step=True, on_epoch=False, sync_dist=False, prog_bar=k in prog_bar)


class TaskMeans(Metric):
    """Sums ``[fields, T]`` accumulated over an epoch; one state, so one gather under DDP."""

    full_state_update = False

    def __init__(self, num_tasks: int, num_fields: int = len(FIELDS)) -> None:
        super().__init__()
        self.num_tasks, self.num_fields = num_tasks, num_fields
        self.add_state("totals", torch.zeros(num_fields, num_tasks, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        if values.shape != (self.num_fields, self.num_tasks):
            raise ValueError(f"TaskMeans expects values of shape {(self.num_fields, self.num_tasks)}, got "
                             f"{tuple(values.shape)}")
        self.totals = self.totals + values.detach().to(self.totals)  # out of place (ddp_spawn shares states)

    def compute(self) -> Tensor:
        return self.totals


class TaskLossLogger(Callback):
    """Log per-task losses, metrics and weights for train/val/test, synced across DDP ranks.

    Args:
        log_train: also log the training per-task statistics (epoch means).
        wandb_table: with a WandbLogger, also log a table of all tasks and a line plot of the
            validation metric of every task over epochs.
        on_step: also log the training per-task losses, metrics and weights every
            ``log_every_n_steps`` steps (``train/tasks/{name}/loss_step``, ...: the means over the
            steps since the last logged one, over all DDP ranks, one all-reduce per logged step).
        plot: log a bar chart of the per-task validation (and test) metric at each epoch end
            (``{stage}/tasks_bars``): a W&B image, else a PNG in the run folder.
    """

    def __init__(self, log_train: bool = True, wandb_table: bool = True, on_step: bool = True,
                 plot: bool = True) -> None:
        super().__init__()
        self.log_train, self.wandb_table, self.on_step, self.plot = log_train, wandb_table, on_step, plot
        self._window: Optional[Tensor] = None  # training sums since the last logged step
        self.metrics: dict[str, TaskMeans] = {}
        self.history: list[dict[str, Any]] = []  # validation results per epoch (rank-independent)
        self.last: dict[str, dict[str, Any]] = {}  # the last computed results per stage

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        import warnings

        # the epoch values logged here are already summed over the ranks (TaskMeans' gather):
        # Lightning's advice to add sync_dist=True for them does not apply (it would reduce them twice)
        warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(train|val|test)/"
                                                  r"(tasks/[^']*|loss|acc|mse)', \.\.\., sync_dist=True\)`")

    # ------------------------------------------------------------------ accumulation
    def _metric(self, stage: str, pl_module: LightningModule) -> TaskMeans:
        T = pl_module.num_tasks
        m = self.metrics.get(stage)
        if m is None or m.num_tasks != T:
            m = TaskMeans(T)
            self.metrics[stage] = m
        return m.to(pl_module.device)

    def _update(self, stage: str, pl_module: LightningModule, outputs: Any) -> Optional[Tensor]:
        if not isinstance(outputs, dict) or "task_count" not in outputs:
            return None
        count = outputs["task_count"].double()
        rows = torch.zeros(len(FIELDS), count.shape[0], dtype=torch.float64, device=count.device)
        rows[0] = outputs["task_loss_sum"].double()
        rows[1] = count
        rows[2] = outputs["task_metric_sum"].double()
        if "weights" in outputs:
            active = outputs.get("active", count > 0).to(count.device)
            rows[3] = outputs["weights"].double().to(count.device) * active
            rows[4] = active.double()
        self._metric(stage, pl_module).update(rows)
        return rows

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if not self.log_train:
            return
        rows = self._update("train", pl_module, outputs)
        if not self.on_step:
            return
        if rows is not None:
            self._window = rows if self._window is None else self._window + rows
        if step_log_due(trainer):
            if self._window is None:
                if trainer.world_size == 1:
                    return
                # every rank joins the all-reduce, also one without results since the last logged step
                self._window = torch.zeros(len(FIELDS), pl_module.num_tasks, dtype=torch.float64,
                                           device=pl_module.device)
            self._log_window(trainer, pl_module)

    def _log_window(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The per-task means over the steps since the last logged one, summed over the DDP ranks in
        one all-reduce, logged on step as ``train/tasks/{name}/{loss,metric,weight}_step``."""
        window, self._window = self._window, None
        if trainer.world_size > 1:
            window = trainer.strategy.reduce(window, reduce_op="sum")
        loss_sum, count, metric_sum, weight_sum, steps = window.cpu()
        logs: dict[str, float] = {}
        for t, (name, kind) in enumerate(zip(pl_module.task_names, pl_module.task_kinds)):
            if count[t] > 0:
                logs[f"train/tasks/{name}/loss_step"] = float(loss_sum[t] / count[t])
                mname = METRIC_NAMES.get(kind)
                if mname:
                    logs[f"train/tasks/{name}/{mname}_step"] = float(metric_sum[t] / count[t])
            if steps[t] > 0:
                logs[f"train/tasks/{name}/weight_step"] = float(weight_sum[t] / steps[t])
        if logs:
            pl_module.log_dict(logs, on_step=True, on_epoch=False, sync_dist=False, rank_zero_only=False)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        self._update("val", pl_module, outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        self._update("test", pl_module, outputs)

    # ------------------------------------------------------------------ epoch ends
    def summarize(self, stage: str, pl_module: LightningModule) -> Optional[dict[str, Any]]:
        """Compute (one gather under DDP) and reset the stage's sums; returns the per-task results."""
        m = self.metrics.get(stage)
        if m is None:
            return None
        totals = m.compute().cpu()
        m.reset()
        loss_sum, count, metric_sum, weight_sum, steps = totals
        has = count > 0
        loss = torch.where(has, loss_sum / count.clamp_min(1), torch.nan)
        metric = torch.where(has, metric_sum / count.clamp_min(1), torch.nan)
        weight = torch.where(steps > 0, weight_sum / steps.clamp_min(1), torch.nan)
        names, kinds = pl_module.task_names, pl_module.task_kinds
        result = {"names": names, "kinds": kinds, "loss": loss, "metric": metric, "count": count,
                  "weight": weight if bool((steps > 0).any()) else None}
        self.last[stage] = result
        return result

    def _log(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        res = self.summarize(stage, pl_module)
        if res is None or trainer.sanity_checking:
            return
        logs: dict[str, float] = {}
        names, kinds = res["names"], res["kinds"]
        for t, name in enumerate(names):
            if res["count"][t] == 0:
                continue
            logs[f"{stage}/tasks/{name}/loss"] = float(res["loss"][t])
            mname = METRIC_NAMES.get(kinds[t])
            if mname:
                logs[f"{stage}/tasks/{name}/{mname}"] = float(res["metric"][t])
            if res["weight"] is not None and torch.isfinite(res["weight"][t]):
                logs[f"{stage}/tasks/{name}/weight"] = float(res["weight"][t])
        has = res["count"] > 0
        if bool(has.any()):
            logs[f"{stage}/loss"] = float(res["loss"][has].mean())
        for kind, mname in METRIC_NAMES.items():
            sel = torch.tensor([k == kind for k in kinds]) & has
            if bool(sel.any()):
                logs[f"{stage}/{mname}"] = float(res["metric"][sel].mean())
        if stage in ("val", "test"):
            check_finite_metrics(logs, where=stage)  # a NaN evaluation loss is an error, not a logged number
        if logs:
            pl_module.log_dict(logs, sync_dist=False, rank_zero_only=False)
        if stage == "val":
            self.history.append({"epoch": int(trainer.current_epoch), **{k: v for k, v in logs.items()}})
        if self.wandb_table and trainer.is_global_zero:
            self._log_wandb(stage, trainer, res)
        if self.plot and stage in ("val", "test"):
            self._plot(stage, trainer, res)

    def _plot(self, stage: str, trainer: Trainer, res: dict[str, Any]) -> None:
        from tasklight.plots import log_figure, task_bars, wants_figures

        if not wants_figures(trainer):
            return
        kinds = set(res["kinds"])
        metric_name = METRIC_NAMES.get(next(iter(kinds))) if len(kinds) == 1 else None
        values = res["metric"] if metric_name else res["loss"]  # mixed task kinds: the losses compare
        label = metric_name or "loss"
        log_figure(trainer, f"{stage}/tasks_bars",
                   task_bars(res["names"], values, label, f"{stage} {label} per task, epoch {trainer.current_epoch}"))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.log_train:
            self._log("train", trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log("val", trainer, pl_module)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log("test", trainer, pl_module)

    # ------------------------------------------------------------------ W&B
    def _log_wandb(self, stage: str, trainer: Trainer, res: dict[str, Any]) -> None:
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        import wandb

        names, kinds = res["names"], res["kinds"]
        rows = []
        for t, name in enumerate(names):
            w = res["weight"][t] if res["weight"] is not None else float("nan")
            rows.append([int(trainer.current_epoch), name, float(res["loss"][t]), METRIC_NAMES.get(kinds[t], ""),
                         float(res["metric"][t]), float(w), int(res["count"][t])])
        payload: dict[str, Any] = {f"{stage}/tasks_table": wandb.Table(
            columns=["epoch", "task", "loss", "metric_name", "metric", "weight", "examples"], data=rows)}
        if stage == "val" and self.history:
            xs = [h["epoch"] for h in self.history]
            ys, keys = [], []
            for t, name in enumerate(names):
                mname = METRIC_NAMES.get(kinds[t])
                key = f"val/tasks/{name}/{mname}" if mname else f"val/tasks/{name}/loss"
                ys.append([h.get(key, float("nan")) for h in self.history])
                keys.append(name)
            payload["val/tasks_plot"] = wandb.plot.line_series(xs=xs, ys=ys, keys=keys, title="validation metric per task",
                                                               xname="epoch")
        for lg in loggers:
            lg.experiment.log(payload)
