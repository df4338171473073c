"""``MetaLearner``: the Lightning side shared by every meta-learner.

A subclass implements two things on top of the functional core:

* ``meta_objective(batch) -> MetaOutput``: the scalar whose gradient (one ``manual_backward``) is
  the meta-gradient, plus per-task query losses and inner losses for logging and checks;
* ``adapt_and_predict(support_x, support_y, query_x, steps) -> (query_out, inner_losses)``: adapt on
  each task's support set (task dimension first) and return raw query outputs.

This class does the rest: the manual outer step (one synced backward under DDP, clipping,
schedulers stepped by hand), non-finite handling, evaluation with gradients enabled, metrics with
95 % confidence intervals over episodes, and ``predict_episode``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from tasklight.data.batch import MetaBatch, check_episode_shapes
from tasklight.metrics import MeanCI
from tasklight.core.functional import FunctionalLearner, check_finite_inner
from tasklight.nn.losses import fit_auto_support
from tasklight.nn.nets import make_vmap_safe


@dataclass
class MetaOutput:
    objective: Tensor  # scalar to backward (its gradient is the meta-gradient)
    query_losses: Tensor  # [T]
    inner_losses: Tensor  # [T, steps]


def adam(params) -> torch.optim.Optimizer:
    """The default outer optimiser: Adam with lr 1e-3."""
    return torch.optim.Adam(params, lr=1e-3)


def resolve_loss(loss: Union[str, nn.Module]) -> tuple[nn.Module, str]:
    """A loss module and the task type ('classification' or 'regression') it implies."""
    if isinstance(loss, str):
        if loss in ("cross_entropy", "ce"):
            return nn.CrossEntropyLoss(), "classification"
        if loss in ("mse", "l2"):
            return nn.MSELoss(), "regression"
        raise ValueError(f"unknown loss {loss!r}: use 'mse', 'cross_entropy', or an nn.Module "
                         f"(e.g. tasklight.nn.losses.HistogramLoss) by class_path")
    if not callable(loss):
        raise TypeError(f"loss must be a name or a callable nn.Module, got {type(loss).__name__}")
    kind = "classification" if isinstance(loss, (nn.CrossEntropyLoss, nn.NLLLoss)) else "regression"
    return loss, kind


class MetaLearner(LightningModule):
    """Base class of the meta-learners (see the module docstring).

    Args:
        net: the network adapted in the inner loop (any nn.Module; BatchNorm layers are swapped for
            an elementary-op version that is exact under vmap).
        loss: ``"mse"``, ``"cross_entropy"`` or a loss module. A module with a ``predict(output)``
            method (e.g. ``HistogramLoss``) turns outputs into values for metrics and predictions.
        inner_steps, inner_lr: the inner loop used for meta-training.
        eval_inner_steps: inner steps for validation/test (default: ``inner_steps``).
        extra_eval_steps: more step counts evaluated at validation/test, logged as ``@k``.
        optimizer, lr_scheduler: the outer optimiser (default Adam, lr 1e-3) and an optional
            scheduler, stepped every meta-step.
        clip_grad_norm: clip the meta-gradient's global norm (None: no clipping).
        nonfinite: ``"raise"`` stops on a non-finite inner/query loss or meta-gradient; ``"skip"``
            skips that meta-step (parameters and optimiser state untouched) and counts it.
        adapt: which parameters of ``net`` the inner loop adapts: names, module prefixes or globs
            (``["head"]``: ANIL, ``["features"]``: BOIL, for ``Conv4``); ``None`` adapts all. The
            others are held fixed in the inner loop and trained by the outer step only.
    """

    def __init__(self, net: nn.Module, loss: Union[str, nn.Module] = "mse", inner_steps: int = 1,
                 inner_lr: float = 0.01, eval_inner_steps: Optional[int] = None,
                 extra_eval_steps: Sequence[int] = (0,), optimizer: OptimizerCallable = adam,
                 lr_scheduler: Optional[LRSchedulerCallable] = None, clip_grad_norm: Optional[float] = None,
                 nonfinite: Literal["raise", "skip"] = "raise", adapt: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        if inner_steps < 0 or (eval_inner_steps is not None and eval_inner_steps < 0):
            raise ValueError(f"inner steps must be >= 0, got inner_steps={inner_steps}, "
                             f"eval_inner_steps={eval_inner_steps}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        self.net = net
        make_vmap_safe(self.net)
        self.loss_fn, self.task_type = resolve_loss(loss)
        self.core = FunctionalLearner(self.net, self.loss_fn, adapt=adapt)
        self.inner_steps, self.inner_lr = inner_steps, inner_lr
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.eval_steps = sorted({self.eval_inner_steps, *extra_eval_steps})
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.clip_grad_norm, self.nonfinite = clip_grad_norm, nonfinite
        self.metric_name = "acc" if self.task_type == "classification" else "mse"
        self.eval_metrics = nn.ModuleDict({f"{stage}_{k}": MeanCI() for stage in ("val", "test")
                                           for k in self.eval_steps})
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self.input_ndim: Optional[int] = len(net.input_shape) if hasattr(net, "input_shape") else None

    def setup(self, stage: Optional[str] = None) -> None:
        """Fit a ``HistogramLoss(support="auto")`` to the DataModule's training targets (once)."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        fit_auto_support(self.loss_fn, getattr(dm, "train_targets", None), f"the DataModule {type(dm).__name__}")

    # ----------------------------------------------------------------- to implement
    def meta_objective(self, batch: MetaBatch) -> MetaOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def adapt_and_predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                          steps: int) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        opt = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "step"}}

    def training_step(self, batch: MetaBatch, batch_idx: int) -> Tensor:
        opt = self.optimizers()
        opt.zero_grad(set_to_none=False)
        if self.input_ndim is None:
            self.input_ndim = batch.support_x.dim() - 2
        out = self.meta_objective(batch)
        problem = check_finite_inner(out.inner_losses, out.query_losses)
        if problem and self.nonfinite == "raise":
            raise FloatingPointError(
                f"{problem} at step {self.global_step}: lower inner_lr or the outer learning rate, set "
                f"clip_grad_norm, or pass nonfinite='skip' to skip such meta-steps.")
        # one backward = one gradient all-reduce under DDP (every rank takes part, even a bad one,
        # so that a non-finite gradient reaches all ranks and they all skip together)
        self.manual_backward(out.objective)
        grads_ok = all(torch.isfinite(p.grad).all() for p in self.parameters() if p.grad is not None)
        if not grads_ok or problem:
            if self.nonfinite == "raise":
                raise FloatingPointError(
                    f"non-finite meta-gradient at step {self.global_step}: lower the learning rates, set "
                    f"clip_grad_norm, or pass nonfinite='skip'.")
            opt.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.log("train/skipped_steps", self.skipped_steps.float(), prog_bar=True)
            return out.objective.detach()
        if self.clip_grad_norm:
            self.clip_gradients(opt, gradient_clip_val=self.clip_grad_norm, gradient_clip_algorithm="norm")
        opt.step()
        sch = self.lr_schedulers()
        if sch is not None:
            sch.step()
        qloss = out.query_losses.detach().mean()
        self.log("train/query_loss", qloss, prog_bar=True)
        if out.inner_losses.numel():
            self.log("train/support_loss_pre", out.inner_losses[:, 0].detach().mean())
        return qloss

    # ----------------------------------------------------------------- evaluation
    def _check_grad_mode(self) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError("meta-learners adapt with gradients at evaluation: create the Trainer with "
                               "inference_mode=False (the tasklight CLI does this by default).")

    def predictions(self, outputs: Tensor) -> Tensor:
        """Raw network outputs -> predictions (values through ``loss.predict`` if it exists)."""
        predict = getattr(self.loss_fn, "predict", None)
        return predict(outputs) if predict is not None else outputs

    def episode_metric(self, outputs: Tensor, query_y: Tensor) -> Tensor:
        """Per-task accuracy (classification) or MSE (regression) of query outputs ``[T, Q, ...]``."""
        if self.task_type == "classification":
            return (outputs.argmax(-1) == query_y).float().mean(-1)
        pred = self.predictions(outputs)
        target = query_y.reshape(pred.shape) if query_y.numel() == pred.numel() else query_y
        return F.mse_loss(pred, target, reduction="none").flatten(1).mean(-1)

    def _eval_step(self, batch: MetaBatch, stage: str) -> None:
        self._check_grad_mode()
        with torch.enable_grad():
            for k in self.eval_steps:
                outputs, _ = self.adapt_and_predict(batch.support_x, batch.support_y, batch.query_x, k)
                self.eval_metrics[f"{stage}_{k}"].update(self.episode_metric(outputs.detach(), batch.query_y))

    def _eval_epoch_end(self, stage: str) -> None:
        for k in self.eval_steps:
            m = self.eval_metrics[f"{stage}_{k}"]
            if m._update_count == 0:
                continue
            res = m.compute()
            name = f"{stage}/{self.metric_name}"
            self.log(f"{name}@{k}", res["mean"].float(), sync_dist=False)
            self.log(f"{name}@{k}_ci95", res["ci95"].float(), sync_dist=False)
            if k == self.eval_inner_steps:
                self.log(name, res["mean"].float(), prog_bar=True, sync_dist=False)
            m.reset()

    def validation_step(self, batch: MetaBatch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: MetaBatch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # ----------------------------------------------------------------- public API
    def predict_episode(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                        steps: Optional[int] = None) -> Tensor:
        """Adapt on the support set and return query predictions.

        Accepts one episode (``support_x [S, ...]``, ``support_y [S, ...]``, ``query_x [Q, ...]``) or a
        batch of episodes with the task dimension first (``[T, S, ...]``); returns ``[Q, ...]`` or
        ``[T, Q, ...]`` accordingly: logits for classification, values for regression. ``steps``
        defaults to ``eval_inner_steps``. Works under ``torch.no_grad()`` too.
        """
        batched = None
        if self.input_ndim is not None and isinstance(support_x, Tensor):
            if support_x.dim() not in (self.input_ndim + 1, self.input_ndim + 2):
                raise ValueError(
                    f"support_x has shape {tuple(support_x.shape)} but this learner's examples have "
                    f"{self.input_ndim} dims: give support_x as [S, *example] or [T, S, *example].")
            batched = support_x.dim() == self.input_ndim + 2
        batched = check_episode_shapes(support_x, support_y, query_x, batched=batched)
        if not batched:
            support_x, support_y, query_x = support_x[None], support_y[None], query_x[None]
        steps = self.eval_inner_steps if steps is None else steps
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self._check_grad_mode()
        dev = next(self.parameters()).device
        with torch.enable_grad():
            out, _ = self.adapt_and_predict(support_x.to(dev), support_y.to(dev), query_x.to(dev), steps)
        out = out.detach()
        if self.task_type == "regression":
            out = self.predictions(out)
        return out if batched else out[0]
