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

import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from tasklight.data.batch import MetaBatch, check_episode_shapes
from tasklight.metrics import MeanCI, eval_valid_mask, unshare_state
from tasklight.core.checkpoint import stamp_checkpoint, verify_checkpoint
from tasklight.core.engine import check_engine_settings
from tasklight.core.functional import FunctionalLearner, check_finite_inner
from tasklight.core.outer import (DEFAULT_MAX_CONSECUTIVE_SKIPS, check_finite_metrics, configure_outer_optimizers,
                                  default_optimizer, outer_step, setup_outer_step)
from tasklight.nn.losses import PredictionMSE, TargetChecked, align_target, fit_auto_support
from tasklight.nn.nets import make_vmap_safe
from tasklight.callbacks.task_logging import log_step_means
from tasklight.config import SelfDescribing
from tasklight.core.checks import check_input_dtype, check_int, check_real


@dataclass
class MetaOutput:
    objective: Tensor  # scalar to backward (its gradient is the meta-gradient)
    query_losses: Tensor  # [T]
    inner_losses: Tensor  # [T, steps]


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


def resolve_inner_loss(inner_loss: Union[None, str, nn.Module], loss_fn: nn.Module, task_type: str):
    """The inner loop's loss: None (the outer loss), ``"mse_of_prediction"`` (:class:`PredictionMSE` of
    ``loss_fn``) or the same forms as ``loss``; it must be of the outer loss's task type."""
    if inner_loss is None:
        return None
    if isinstance(inner_loss, str) and inner_loss == "mse_of_prediction":
        return PredictionMSE(loss_fn)
    try:
        fn, kind = resolve_loss(inner_loss)
    except (ValueError, TypeError) as err:
        raise ValueError(f"inner_loss={inner_loss!r} is not a loss: use None (the outer loss), 'mse_of_prediction' "
                         f"(MSE of loss.predict(output), for a HistogramLoss), 'mse', 'cross_entropy' or an "
                         f"nn.Module by class_path") from err
    if kind != task_type:
        raise ValueError(f"inner_loss={inner_loss!r} is a {kind} loss but the outer loss "
                         f"{type(loss_fn).__name__} is a {task_type} loss: give an inner loss of the same kind")
    return fn


class MetaLearner(SelfDescribing, LightningModule):
    """Base class of the meta-learners (see the module docstring).

    Args:
        net: the network adapted in the inner loop (any nn.Module; BatchNorm layers are swapped for
            an elementary-op version that is exact under vmap).
        loss: ``"mse"``, ``"cross_entropy"`` or a loss module. A module with a ``predict(output)``
            method (e.g. ``HistogramLoss``) turns outputs into values for metrics and predictions.
            It is the query (outer) loss, and the inner loss unless ``inner_loss`` is given.
        inner_loss: the loss the inner loop descends on the support set, in training and evaluation
            alike: None (default: ``loss``), the same forms as ``loss``, or ``"mse_of_prediction"``: the
            mean squared error between ``loss.predict(output)`` and the targets (a histogram head adapted
            by the squared error of its mean, meta-trained by its histogram loss).
        inner_steps, inner_lr: the inner loop used for meta-training.
        eval_inner_steps: inner steps for validation/test (default: ``inner_steps``).
        extra_eval_steps: more step counts evaluated at validation/test, logged as ``@k``.
        optimizer, lr_scheduler: the outer optimiser (default Adam, lr 1e-3) and an optional
            scheduler, stepped every meta-step.
        clip_grad_norm: clip the meta-gradient's global norm (None: no clipping).
        nonfinite: ``"raise"`` stops on a non-finite inner/query loss or meta-gradient; ``"skip"``
            skips that meta-step (parameters and optimiser state untouched) and counts it.
        max_consecutive_skips: with ``nonfinite="skip"``, raise after this many skipped steps in a row.
        adapt: which parameters of ``net`` the inner loop adapts: names, module prefixes or globs
            (``["head"]``: ANIL, ``["features"]``: BOIL, for ``Conv4``); ``None`` adapts all. The
            others are held fixed in the inner loop and trained by the outer step only.
        strategy: how the inner loops of a meta-batch run (:mod:`tasklight.core.engine`):
            ``"auto"`` (default: ``"stacked"`` when the net is made of supported layers, else
            ``"vmap"``; the choice is logged), ``"vmap"`` (any module), ``"stacked"`` (task-stacked
            grouped convolutions / bmm, native BatchNorm), ``"loop"`` (per-task or chunked) or
            ``"compiled"`` (the meta-gradient under ``torch.compile``). All give the same meta-gradient.
        chunk_size: tasks per chunk (1: a per-task loop; None: all tasks at once). Each chunk's
            meta-gradient is taken and its graph freed before the next: memory is bounded by one chunk.
        compile_cache_dir: where ``strategy="compiled"`` keeps torch.compile's cache
            (``TORCHINDUCTOR_CACHE_DIR``; None: torch's default).

    BatchNorm layers of ``net`` are swapped for the elementary-op BatchNorm (same parameters and
    state-dict keys) because the ``vmap`` and ``compiled`` strategies need it for exact
    second-order gradients; the ``stacked`` strategy runs the native ``F.batch_norm`` itself.

    The outer step itself is :func:`tasklight.core.outer.outer_step`, shared by every learner.
    """

    #: whether ``net``'s outputs are one logit per class (checked against ``n_way`` and the labels);
    #: learners whose ``net`` is an embedding (prototype learners) set it to False
    net_is_classifier: bool = True
    #: the engine strategies this learner runs on (``compiled`` compiles MAML's meta-gradient only)
    engine_strategies: tuple = ("auto", "vmap", "stacked", "loop")
    #: whether ``chunk_size`` applies to this learner
    engine_chunks: bool = True

    def __init__(self, net: nn.Module, loss: Union[str, nn.Module] = "mse", inner_steps: int = 1,
                 inner_lr: float = 0.01, eval_inner_steps: Optional[int] = None,
                 extra_eval_steps: Sequence[int] = (0,), optimizer: OptimizerCallable = default_optimizer,
                 lr_scheduler: Optional[LRSchedulerCallable] = None, clip_grad_norm: Optional[float] = None,
                 nonfinite: Literal["raise", "skip"] = "raise",
                 max_consecutive_skips: int = DEFAULT_MAX_CONSECUTIVE_SKIPS,
                 adapt: Optional[Sequence[str]] = None,
                 strategy: Literal["auto", "vmap", "stacked", "loop", "compiled"] = "auto",
                 chunk_size: Optional[int] = None, compile_cache_dir: Optional[str] = None,
                 inner_loss: Union[None, str, nn.Module] = None) -> None:
        super().__init__()
        check_engine_settings(strategy, chunk_size, compile_cache_dir)
        if strategy not in type(self).engine_strategies:
            raise ValueError(f"{type(self).__name__} runs on the strategies {list(type(self).engine_strategies)}, not "
                             f"strategy={strategy!r} ('compiled' compiles MAML's second-order meta-gradient): use "
                             f"strategy='auto'")
        if chunk_size is not None and not type(self).engine_chunks:
            raise ValueError(f"{type(self).__name__} does not run in chunks: set chunk_size=None (lower "
                             f"meta_batch_size to bound memory)")
        self.automatic_optimization = False
        owner = type(self).__name__
        check_int(owner, "inner_steps", inner_steps, 0, "inner-loop gradient steps")
        if eval_inner_steps is not None:
            check_int(owner, "eval_inner_steps", eval_inner_steps, 0, "inner steps at evaluation")
        if isinstance(extra_eval_steps, (str, bytes)) or any(isinstance(k, bool) or not isinstance(k, (int, float))
                                                            for k in extra_eval_steps):
            raise ValueError(f"{owner}: extra_eval_steps must be a list of inner step counts >= 0, got "
                             f"{extra_eval_steps!r}")
        if not isinstance(inner_lr, Tensor):
            check_real(owner, "inner_lr", inner_lr, 0.0, what="the inner loop's step size")
        if inner_steps < 0 or (eval_inner_steps is not None and eval_inner_steps < 0):
            raise ValueError(f"inner steps must be >= 0, got inner_steps={inner_steps}, "
                             f"eval_inner_steps={eval_inner_steps}")
        if any(int(k) != k or k < 0 for k in extra_eval_steps):
            raise ValueError(f"extra_eval_steps must be inner step counts >= 0, got {list(extra_eval_steps)}")
        if isinstance(inner_lr, (int, float)) and not (inner_lr >= 0 and math.isfinite(inner_lr)):
            raise ValueError(f"inner_lr must be a finite number >= 0 (the inner loop's step size), got {inner_lr}")
        setup_outer_step(self, clip_grad_norm, nonfinite, max_consecutive_skips)
        self.net = net
        make_vmap_safe(self.net)
        self.loss_fn, self.task_type = resolve_loss(loss)
        # the loss the learner trains with: targets checked against outputs (no silent broadcasting)
        self.checked_loss = TargetChecked(self.loss_fn, f"the network {type(net).__name__}")
        # the inner loop's loss (None: the outer loss); a module given here is a submodule (state_dict)
        self.inner_loss_fn = resolve_inner_loss(inner_loss, self.loss_fn, self.task_type)
        self.checked_inner_loss = self.checked_loss if self.inner_loss_fn is None else \
            TargetChecked(self.inner_loss_fn, f"the network {type(net).__name__}")
        self.core = FunctionalLearner(self.net, self.checked_loss, adapt=adapt, strategy=strategy,
                                      chunk_size=chunk_size, compile_cache_dir=compile_cache_dir,
                                      inner_loss_fn=self.checked_inner_loss)
        self.strategy, self.chunk_size, self.compile_cache_dir = strategy, chunk_size, compile_cache_dir
        self.inner_steps, self.inner_lr = inner_steps, inner_lr
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.eval_steps = sorted({self.eval_inner_steps, *extra_eval_steps})
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.metric_name = "acc" if self.task_type == "classification" else "mse"
        self.eval_metrics = nn.ModuleDict({f"{stage}_{k}": MeanCI() for stage in ("val", "test")
                                           for k in self.eval_steps})
        self.input_ndim: Optional[int] = len(net.input_shape) if hasattr(net, "input_shape") else None

    # ----------------------------------------------------------------- to implement
    def meta_objective(self, batch: MetaBatch) -> MetaOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def adapt_and_predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                          steps: int) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        return configure_outer_optimizers(self.optimizer_factory, self.scheduler_factory, self.parameters())

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        stamp_checkpoint(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        verify_checkpoint(self, checkpoint)

    # ----------------------------------------------------------------- checks
    def setup(self, stage: Optional[str] = None) -> None:
        """Per-process state (ddp_spawn), a ``HistogramLoss(support="auto")`` fitted to the DataModule's
        training targets (once), and the head checked against the episodes."""
        unshare_state(self)
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        fit_auto_support(self.loss_fn, getattr(dm, "train_targets", None), f"the DataModule {type(dm).__name__}")
        if isinstance(self.inner_loss_fn, nn.Module):
            fit_auto_support(self.inner_loss_fn, getattr(dm, "train_targets", None),
                             f"the DataModule {type(dm).__name__}")
        n_way = getattr(dm, "n_way", None)
        out = getattr(self.net, "out_features", None)
        if (self.task_type == "classification" and self.net_is_classifier and isinstance(n_way, int)
                and isinstance(out, int) and out != n_way):
            raise ValueError(f"the network's head has out_features={out} but the episodes are n_way={n_way}-way: "
                             f"set the net's out_features to {n_way} (one logit per class of an episode).")
        bins = getattr(self.loss_fn, "num_bins", None)
        if isinstance(bins, int) and isinstance(out, int) and out != bins:
            raise ValueError(f"the network's head has out_features={out} but the loss "
                             f"{type(self.loss_fn).__name__} has num_bins={bins}: set out_features to {bins}.")

    def check_inputs(self, support_x: Tensor, support_y: Tensor, query_x: Optional[Tensor] = None,
                     query_y: Optional[Tensor] = None) -> None:
        """Examples against the net's ``input_shape`` and dtype, empty sets, and class labels (support
        and query) against its outputs; one ``ValueError`` naming the problem and the fix."""
        owner = type(self).__name__
        for name, x in (("support", support_x), ("query", query_x)):
            if x is not None and x.dim() >= 2 and x.shape[1] == 0:
                raise ValueError(f"{owner}: the episodes have an empty {name} set ({name}_x of shape "
                                 f"{tuple(x.shape)}): give every task at least one {name} example "
                                 f"({'k_shot' if name == 'support' else 'q_queries'} >= 1).")
        check_input_dtype(owner, support_x, self.net, "episodes' inputs")
        if query_x is not None and query_x.dtype != support_x.dtype:
            raise ValueError(f"{owner}: support_x is {support_x.dtype} but query_x is {query_x.dtype}: give the "
                             f"support and query sets one dtype.")
        shape = getattr(self.net, "input_shape", None)
        if shape is not None and tuple(support_x.shape[2:]) != tuple(shape):
            raise ValueError(f"the episodes have examples of shape {tuple(support_x.shape[2:])} but the network "
                             f"{type(self.net).__name__} was built for input_shape {tuple(shape)}: make the data's "
                             f"image_size (or feature size) and the net's agree.")
        if self.task_type != "classification":
            for name, y in (("support_y", support_y), ("query_y", query_y)):
                if y is not None and y.is_floating_point() and y.dtype != support_x.dtype:
                    raise ValueError(f"{owner}: {name} is {y.dtype} but the inputs are {support_x.dtype}: give the "
                                     f"regression targets the inputs' dtype.")
            return
        for name, y in (("support_y", support_y), ("query_y", query_y)):
            if y is not None and (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool):
                raise ValueError(f"{owner}: {name} has dtype {y.dtype}, but class labels are integers 0..n_way-1 "
                                 f"(torch.long): convert them with .long().")
        out = getattr(self.net, "out_features", None)
        if self.net_is_classifier and isinstance(out, int) and support_y.numel():
            top = int(support_y.max())
            if top >= out or int(support_y.min()) < 0:
                raise ValueError(f"the episodes have class label {top} but the network's head has {out} outputs: "
                                 f"labels must be 0..{out - 1}; set the net's out_features to the episodes' n_way.")
        if query_y is not None and query_y.numel() and support_y.numel():
            # query labels a support set does not have: accuracy 0 at test time, an IndexError in training
            ways = out if self.net_is_classifier and isinstance(out, int) else int(support_y.max()) + 1
            top, low = int(query_y.max()), int(query_y.min())
            if top >= ways or low < 0:
                bad = top if top >= ways else low
                raise ValueError(f"{owner}: the episodes have query label {bad} but only classes 0..{ways - 1} "
                                 f"({'the head' if self.net_is_classifier else 'the support set'}): query labels must "
                                 f"be among the episode's n_way={ways} classes; check the DataModule's labels.")

    def _memory_error(self, err: BaseException, batch: MetaBatch, stage: str) -> MemoryError:
        T, S, Q = batch.support_x.shape[0], batch.support_x.shape[1], batch.query_x.shape[1]
        return MemoryError(
            f"the {stage} meta-batch does not fit in memory ({T} tasks x {S} support + {Q} query examples, "
            f"inner_steps={self.inner_steps}, chunk_size={self.chunk_size}): set chunk_size (tasks per chunk; each "
            f"chunk's graph is freed before the next, 1 = a per-task loop) to a value below {T}, lower "
            f"meta_batch_size (or eval_batch_size), inner_steps or the shots, use first_order=True, or IMAMLModule, whose memory does not grow with inner_steps. "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")

    def training_step(self, batch: MetaBatch, batch_idx: int) -> Tensor:
        if self.input_ndim is None:
            self.input_ndim = batch.support_x.dim() - 2
        self.check_inputs(batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        try:
            out = self.meta_objective(batch)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_oom(err):
                raise
            raise self._memory_error(err, batch, "training") from err
        problem = check_finite_inner(out.inner_losses, out.query_losses)
        # one backward = one gradient all-reduce under DDP; the shared outer step applies the
        # non-finite policy, clipping, the optimiser and the scheduler
        if not outer_step(self, out.objective, problem=problem, what="meta-gradient"):
            return out.objective.detach()
        qloss = out.query_losses.detach().mean()
        values = {"train/query_loss": qloss}
        if out.inner_losses.numel():
            values["train/support_loss_pre"] = out.inner_losses[:, 0].detach().mean()
        log_step_means(self, values, prog_bar=["train/query_loss"])  # logged steps: means over DDP ranks
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
            acc = (outputs.argmax(-1) == query_y).float().mean(-1)
            # argmax of non-finite logits still "predicts" a class: a task whose outputs are not finite
            # gets a NaN accuracy, so the epoch's metric is NaN on every rank and the evaluation raises
            finite = torch.isfinite(outputs).flatten(1).all(-1)
            return torch.where(finite, acc, torch.full_like(acc, math.nan))
        pred = self.predictions(outputs)
        target = align_target(pred, query_y, None, "the predictions")
        return F.mse_loss(pred, target, reduction="none").flatten(1).mean(-1)

    def _eval_step(self, batch: MetaBatch, stage: str, batch_idx: int = 0) -> None:
        self._check_grad_mode()
        self.check_inputs(batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        # episodes the distributed sampler repeated to even out the ranks are evaluated but not counted
        valid = eval_valid_mask(self, stage, batch_idx, batch.num_tasks, device=batch.support_x.device)
        with torch.enable_grad():
            for k in self.eval_steps:
                try:
                    outputs, _ = self.adapt_and_predict(batch.support_x, batch.support_y, batch.query_x, k)
                except (torch.OutOfMemoryError, RuntimeError) as err:
                    if not _is_oom(err):
                        raise
                    raise self._memory_error(err, batch, stage) from err
                values = self.episode_metric(outputs.detach(), batch.query_y)
                self.eval_metrics[f"{stage}_{k}"].update(values if valid is None else values[valid])
        if stage == "test" and getattr(self, "_plot_batch", None) is None:
            self._plot_batch = batch  # the first test batch: the fitted curves of a few tasks

    def _plot_test(self, curve: list[tuple[int, float, float]]) -> None:
        """Figures at the end of a test (W&B images, else PNGs in the run folder): the metric vs
        adaptation steps and, for 1-D regression, the fitted functions of three test tasks after each
        evaluated number of steps."""
        from tasklight.plots import fitted_curves, log_figure, metric_vs_steps, wants_figures

        batch, self._plot_batch = getattr(self, "_plot_batch", None), None
        if not wants_figures(self):
            return
        if curve:
            steps, means, cis = zip(*curve)
            log_figure(self, f"test/{self.metric_name}_vs_steps",
                       metric_vs_steps(steps, means, cis, self.metric_name))
        if batch is not None and self.task_type == "regression" and batch.support_x.dim() == 3 \
                and batch.support_x.shape[-1] == 1:
            n = min(3, batch.num_tasks)
            lo, hi = float(batch.query_x[:n].min()), float(batch.query_x[:n].max())
            grid = torch.linspace(lo, hi, 100, device=batch.support_x.device)[:, None]
            curves = {k: self.predict_episode(batch.support_x[:n], batch.support_y[:n],
                                              grid.expand(n, -1, -1), steps=k).cpu() for k in self.eval_steps}
            truth = getattr(getattr(self.trainer, "datamodule", None), "true_function", None)
            true_curve = None
            if callable(truth):  # the data's own task functions, from each task's support and query points
                true_curve = truth(torch.cat([batch.support_x[:n], batch.query_x[:n]], 1).cpu(),
                                   torch.cat([batch.support_y[:n], batch.query_y[:n]], 1).cpu(), grid.cpu())
            log_figure(self, "test/fitted_functions", fitted_curves(
                batch.support_x[:n].cpu(), batch.support_y[:n].cpu(), grid.cpu(), curves, batch.query_x[:n].cpu(),
                batch.query_y[:n].cpu(), true_curve=true_curve))

    def _eval_epoch_end(self, stage: str) -> None:
        curve, means = [], {}
        name = f"{stage}/{self.metric_name}"
        for k in self.eval_steps:
            m = self.eval_metrics[f"{stage}_{k}"]
            if m._update_count == 0:
                continue
            res = m.compute()
            count = int(res["count"])
            curve.append((k, float(res["mean"]), float(res["ci95"])))
            checked = {f"{name}@{k}": res["mean"]}
            if count >= 2:  # the interval of one episode is undefined (NaN), not an error
                checked[f"{name}@{k}_ci95"] = res["ci95"]
            check_finite_metrics(checked, where=f"{stage} (episodes: {count})")
            self.log(f"{name}@{k}", res["mean"].float(), sync_dist=False)
            self.log(f"{name}@{k}_ci95", res["ci95"].float(), sync_dist=False)
            if k == self.eval_inner_steps:
                self.log(name, res["mean"].float(), prog_bar=True, sync_dist=False)
            means[k] = float(res["mean"])
            m.reset()
        if curve and int(res["count"]) < 2 and stage == "test":
            rank_zero_warn(f"{stage} ran on {int(res['count'])} episode: its 95 % intervals ({name}@k_ci95) are "
                           f"undefined and reported as nan; set test_episodes >= 2 for an interval.")
        self._flag_adaptation(stage, means)
        if stage == "test":
            self._plot_test(curve)

    def _flag_adaptation(self, stage: str, means: dict[int, float]) -> None:
        """Log ``{stage}/adaptation_hurts`` (1.0 or 0.0) and warn when adapting on the support set makes the
        query metric worse than before adapting (step 0): the inner loop is not doing its job."""
        k = self.eval_inner_steps
        if k == 0 or 0 not in means or k not in means or self.trainer.sanity_checking:
            return
        worse = means[k] < means[0] if self.task_type == "classification" else means[k] > means[0]
        self.log(f"{stage}/adaptation_hurts", float(worse), sync_dist=False)
        if worse:
            name = f"{stage}/{self.metric_name}"
            rank_zero_warn(f"{type(self).__name__}: adaptation makes the {stage} metric worse than before adapting "
                           f"({name}@0={means[0]:.4g}, {name}@{k}={means[k]:.4g}): lower inner_lr, change "
                           f"inner_steps or train longer ({stage}/adaptation_hurts=1).")

    def validation_step(self, batch: MetaBatch, batch_idx: int) -> None:
        self._eval_step(batch, "val", batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: MetaBatch, batch_idx: int) -> None:
        self._eval_step(batch, "test", batch_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: MetaBatch, batch_idx: int) -> dict[str, Tensor]:
        """``tasklight predict``: adapt on each episode's support set and predict its queries.

        Returns ``predictions`` ``[T, Q, ...]`` (logits for classification, values for regression)
        after ``eval_inner_steps`` steps, and ``query_y`` for reference.
        """
        return {"predictions": self.predict_episode(batch.support_x, batch.support_y, batch.query_x),
                "query_y": batch.query_y}

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
        self.check_inputs(support_x, support_y, query_x)
        dev = next(self.parameters()).device
        with torch.enable_grad():
            out, _ = self.adapt_and_predict(support_x.to(dev), support_y.to(dev), query_x.to(dev), steps)
        out = out.detach()
        if self.task_type == "regression":
            out = self.predictions(out)
        return out if batched else out[0]


def _is_oom(err: BaseException) -> bool:
    """True for an allocator failure (CUDA's OutOfMemoryError, the CPU allocator's RuntimeError)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return "can't allocate memory" in text or "out of memory" in text.lower()
