"""TaskMet (Bansal et al., NeurIPS 2023) and its baselines on decision-focused problems.

TaskMet learns a metric ``Lambda_phi(x)`` such that the predictor fitted under the Mahalanobis
prediction loss ``(y_hat - y)^T Lambda_phi(x) (y_hat - y)`` takes good downstream decisions:

* inner problem: ``theta*(phi) = argmin_theta mean_x (f_theta(x) - y)^T Lambda_phi(x) (f_theta(x) - y)``,
  solved by ``inner_steps`` gradient steps with ``torch.func`` (functional Adam or SGD), warm-started
  from the previous outer step (``first_inner_steps`` on the first one). It never sees the task loss;
* outer problem: ``min_phi L_task(f_theta*(phi))``, with ``dL/dphi`` from the implicit function theorem
  at ``theta*`` (``implicit.implicit_gradient``: conjugate gradient on Hessian-vector products) or,
  for comparison, by differentiating through the unrolled inner steps (``hypergradient="unrolled"``).

Baselines in the same family: :class:`MSEModule` (two-stage: fit the predictor by MSE, then decide)
and :class:`DFLModule` (decision-focused learning: ``L_task + alpha * MSE`` end to end).

All learners read the decision problem from the :class:`~tasklight.taskmet.problems.DecisionDataModule`
(or take one as ``problem``), and report the normalised decision quality ``ndq`` (1 optimal, 0 random)
and the prediction MSE on validation and test.
"""
from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.func import functional_call, grad
from torchmetrics import MeanMetric, Metric

from tasklight.taskmet.problems import DecisionProblem, normalize_dq
from tasklight.core.checkpoint import stamp_checkpoint, verify_checkpoint
from tasklight.core.engine import surrogate_objective
from tasklight.core.implicit import implicit_gradient
from tasklight.core.update_rules import make_update_rule
from tasklight.core.outer import (DEFAULT_MAX_CONSECUTIVE_SKIPS, check_finite_metrics, configure_outer_optimizers,
                                  default_optimizer, first_nonfinite, outer_step, setup_outer_step)
from tasklight.metrics import eval_valid_mask, unshare_state
from tasklight.nn.losses import align_target, mahalanobis_loss
from tasklight.nn.nets import MLP
from tasklight.config import RecordsInit, SelfDescribing
from tasklight.core.checks import check_input_dtype, check_int, check_real

ParamDict = dict[str, Tensor]


# ====================================================================== the metric
class MetricNet(RecordsInit, nn.Module):
    """A positive-definite metric ``Lambda(x) = L(x) L(x)^T + eps I`` of dimension ``dim``.

    Args:
        in_features: size of the input features ``x [..., in_features]``.
        dim: the prediction dimension ``m`` (the metric is ``m x m``).
        hidden: hidden sizes of the network ``x -> L(x)``.
        diagonal: learn only a diagonal ``L`` (``Lambda = diag(l^2) + eps``); ``forward`` then returns
            the diagonal ``[..., m]`` instead of the matrix ``[..., m, m]``.
        input_dependent: ``False`` learns one global metric (a parameter, no network).
        eps: the floor ``eps`` (0 < eps < 1) that keeps ``Lambda`` positive definite for any input.
        learn_eps: make ``eps`` a parameter (kept positive through its logarithm).
        init_scale: std of the last layer's initial weights; at ``init_scale=0`` ``Lambda(x) = I``.
        activation_name: activation of the network.

    ``L(x) = sqrt(1 - eps0) I + tril(net(x))``, so the metric starts at (near) the identity.
    """

    def __init__(self, in_features: int = 1, dim: int = 1, hidden: Sequence[int] = (32, 32), diagonal: bool = False,
                 input_dependent: bool = True, eps: float = 1e-3, learn_eps: bool = False, init_scale: float = 1e-2,
                 activation_name: str = "relu") -> None:
        super().__init__()
        check_int("MetricNet", "dim", dim, 1)
        check_int("MetricNet", "in_features", in_features, 1)
        check_real("MetricNet", "init_scale", init_scale, 0.0)
        if dim < 1 or in_features < 1:
            raise ValueError(f"MetricNet needs dim >= 1 and in_features >= 1, got dim={dim}, in_features={in_features}.")
        if not 0 < eps < 1:
            raise ValueError(f"MetricNet needs 0 < eps < 1 (the positive-definite floor), got eps={eps}.")
        self.in_features, self.dim, self.diagonal, self.input_dependent = in_features, dim, diagonal, input_dependent
        self.base = math.sqrt(1 - eps)
        n_out = dim if diagonal else dim * (dim + 1) // 2
        if input_dependent:
            self.net = MLP(in_features, hidden, n_out, activation_name=activation_name)
            last = self.net.net[-1]
            nn.init.normal_(last.weight, std=init_scale)
            nn.init.zeros_(last.bias)
        else:
            self.raw = nn.Parameter(init_scale * torch.randn(n_out))
        if learn_eps:
            self.log_eps = nn.Parameter(torch.tensor(math.log(eps)))
        else:
            self.register_buffer("log_eps", torch.tensor(math.log(eps)))
        rows, cols = torch.tril_indices(dim, dim)
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)

    @property
    def eps(self) -> Tensor:
        return self.log_eps.exp()

    def factor_entries(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"MetricNet expects features [..., {self.in_features}], got {tuple(x.shape)}; set "
                             f"in_features to the feature size.")
        if self.input_dependent:
            return self.net(x)
        return self.raw.expand(*x.shape[:-1], self.raw.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        """``Lambda(x)``: ``[..., m, m]``, or its diagonal ``[..., m]`` when ``diagonal``."""
        out = self.factor_entries(x)
        eps = self.eps.to(out.dtype)
        if self.diagonal:
            return (self.base + out) ** 2 + eps
        lower = _fill_tril(out.new_zeros(*out.shape[:-1], self.dim, self.dim), out, self._rows, self._cols)
        factor = lower + self.base * torch.eye(self.dim, dtype=out.dtype, device=out.device)
        return factor @ factor.transpose(-1, -2) + eps * torch.eye(self.dim, dtype=out.dtype, device=out.device)

    def matrix(self, x: Tensor) -> Tensor:
        """``Lambda(x)`` as a matrix ``[..., m, m]`` in both modes."""
        lam = self(x)
        return torch.diag_embed(lam) if self.diagonal else lam


def _grads(out: Tensor, inputs: ParamDict) -> ParamDict:
    """``d out / d inputs`` as a dict; zeros where ``out`` does not depend on an input."""
    if not out.requires_grad:
        return {k: torch.zeros_like(v) for k, v in inputs.items()}
    grads = torch.autograd.grad(out, list(inputs.values()), allow_unused=True, materialize_grads=True)
    return dict(zip(inputs, grads))


def _fill_tril(lower: Tensor, values: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    flat = lower.flatten(-2)
    index = (rows * lower.shape[-1] + cols).expand(*values.shape[:-1], rows.shape[0])
    return flat.scatter(-1, index, values).view_as(lower)


# ====================================================================== evaluation metric
class NormalizedDecisionQuality(Metric):
    """``(sum DQ - sum DQ_random) / (sum DQ_optimal - sum DQ_random)`` accumulated over batches (and
    processes)."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("dq", "optimal", "random"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, dq: Tensor, dq_optimal: Tensor, dq_random: Tensor) -> None:
        self.dq += dq.double().sum()
        self.optimal += dq_optimal.double().sum()
        self.random += dq_random.double().sum()

    def compute(self) -> Tensor:
        return normalize_dq(self.dq, self.optimal, self.random).float()


# ====================================================================== the learners
class DecisionLearner(SelfDescribing, LightningModule):
    """Shared by TaskMet and the baselines: the predictor, the problem, evaluation and logging.

    Batches are ``(x [n, U, F], y [n, U, m], dq_optimal [n], dq_random [n])`` from a
    ``DecisionDataModule``. Validation and test log ``{stage}/ndq`` (normalised decision quality),
    ``{stage}/dq`` (mean decision quality) and ``{stage}/mse`` (prediction MSE).

    The shared outer-step settings (``optimizer`` default Adam lr 1e-3, ``lr_scheduler`` stepped every
    step, ``clip_grad_norm``, ``nonfinite``, ``max_consecutive_skips``) mean what they mean in every
    tasklight learner (:mod:`tasklight.core.outer`).
    """

    def __init__(self, predictor: nn.Module, problem: Optional[DecisionProblem] = None,
                 optimizer: OptimizerCallable = default_optimizer, lr_scheduler: Optional[LRSchedulerCallable] = None,
                 clip_grad_norm: Optional[float] = None, nonfinite: Literal["raise", "skip"] = "raise",
                 max_consecutive_skips: int = DEFAULT_MAX_CONSECUTIVE_SKIPS) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.predictor = predictor
        self._problem = problem
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        setup_outer_step(self, clip_grad_norm, nonfinite, max_consecutive_skips)
        self.eval_ndq = nn.ModuleDict({s: NormalizedDecisionQuality() for s in ("val", "test")})
        # means over instances (sums, one all-reduce under DDP): exact with unequal shares per rank
        self.eval_dq = nn.ModuleDict({s: MeanMetric() for s in ("val", "test")})
        self.eval_mse = nn.ModuleDict({s: MeanMetric() for s in ("val", "test")})

    # ----- the problem
    @property
    def problem(self) -> DecisionProblem:
        if self._problem is None:
            raise ValueError(f"{type(self).__name__} has no decision problem: pass problem=... or train it with a "
                             f"tasklight.taskmet.problems.DecisionDataModule (its problem is used).")
        return self._problem

    def setup(self, stage: str) -> None:
        unshare_state(self)
        trainer = getattr(self, "_trainer", None)
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        dm_problem = getattr(dm, "problem", None)
        if dm_problem is not None:
            if self._problem is not None and self._problem is not dm_problem:
                raise ValueError(f"{type(self).__name__} was given a problem and the datamodule has another one: "
                                 f"give the problem in one place only (the datamodule's is enough).")
            self._problem = dm_problem
        self.check_problem(self.problem)

    def check_problem(self, problem: DecisionProblem) -> None:
        """Hook for subclasses: validate the learner against the problem's dimensions."""

    # ----- prediction and evaluation
    def forward(self, x: Tensor) -> Tensor:
        check_input_dtype(type(self).__name__, x, self.predictor, "instances' features")
        return self.predictor(x)

    def _eval_step(self, batch, stage: str, batch_idx: int = 0) -> None:
        x, y, best, rand = batch
        # instances the distributed sampler repeated to even out the ranks are not counted
        valid = eval_valid_mask(self, stage, batch_idx, x.shape[0], device=x.device)
        if valid is not None:
            x, y, best, rand = x[valid], y[valid], best[valid], rand[valid]
        n = x.shape[0]
        if n:
            y_hat = self(x)
            y = self._checked_target(y_hat, y)
            dq = self.problem.decision_quality(y_hat, y, x)
            self.eval_ndq[stage].update(dq, best, rand)
            self.eval_dq[stage].update(dq)
            self.eval_mse[stage].update(F.mse_loss(y_hat, y, reduction="none").flatten(1).mean(1))
        self.log(f"{stage}/ndq", self.eval_ndq[stage], on_epoch=True)
        self.log(f"{stage}/dq", self.eval_dq[stage], on_epoch=True)
        self.log(f"{stage}/mse", self.eval_mse[stage], on_epoch=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val", batch_idx)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test", batch_idx)

    def _check_eval_metrics(self, stage: str) -> None:
        if self.trainer.sanity_checking:
            return
        m = self.trainer.callback_metrics
        check_finite_metrics({k: v for k, v in m.items() if k.startswith(f"{stage}/")}, where=stage)

    def on_validation_end(self) -> None:
        self._check_eval_metrics("val")

    def on_test_end(self) -> None:
        self._check_eval_metrics("test")

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        return self(batch[0] if isinstance(batch, (tuple, list)) else batch)

    # ----- checkpoints: learner class and state checksum checked on load
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        stamp_checkpoint(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        verify_checkpoint(self, checkpoint)

    # ----- the optimisation step shared by all learners
    def _step(self, objective: Tensor, problem: Optional[str] = None) -> bool:
        return outer_step(self, objective, problem=problem, what=self._gradient_name)

    _gradient_name = "gradient"

    def _checked_target(self, y_hat: Tensor, y: Tensor) -> Tensor:
        return align_target(y_hat, y, None, f"the predictor {type(self.predictor).__name__}")


class MSEModule(DecisionLearner):
    """Two-stage baseline: fit the predictor by MSE, decide with the fitted predictions."""

    def training_loss(self, x: Tensor, y: Tensor, y_hat: Tensor) -> Tensor:
        return F.mse_loss(y_hat, y)

    def configure_optimizers(self):
        return configure_outer_optimizers(self.optimizer_factory, self.scheduler_factory, self.predictor.parameters())

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        y_hat = self(x)
        y = self._checked_target(y_hat, y)
        loss = self.training_loss(x, y, y_hat)
        problem = None if bool(torch.isfinite(loss.detach())) else f"non-finite training loss ({float(loss)})"
        self._step(loss, problem)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=x.shape[0])
        self.log("train/mse", F.mse_loss(y_hat.detach(), y), batch_size=x.shape[0])
        return loss.detach()


class DFLModule(MSEModule):
    """Decision-focused learning: the predictor minimises ``L_task + alpha * MSE`` end to end,
    differentiating through the problem's relaxed solver."""

    def __init__(self, predictor: nn.Module, alpha: float = 0.0, problem: Optional[DecisionProblem] = None,
                 optimizer: OptimizerCallable = default_optimizer, lr_scheduler: Optional[LRSchedulerCallable] = None,
                 clip_grad_norm: Optional[float] = None, nonfinite: Literal["raise", "skip"] = "raise",
                 max_consecutive_skips: int = DEFAULT_MAX_CONSECUTIVE_SKIPS) -> None:
        super().__init__(predictor, problem, optimizer, lr_scheduler, clip_grad_norm, nonfinite, max_consecutive_skips)
        check_real("DFLModule", "alpha", alpha, 0.0, what="the weight of the MSE term")
        if alpha < 0:
            raise ValueError(f"DFLModule needs alpha >= 0 (the weight of the MSE term), got {alpha}.")
        self.alpha = alpha

    def training_loss(self, x: Tensor, y: Tensor, y_hat: Tensor) -> Tensor:
        task = self.problem.task_loss(y_hat, y, x)
        self.log("train/task_loss", task.detach(), batch_size=x.shape[0])
        return task + self.alpha * F.mse_loss(y_hat, y) if self.alpha else task


class TaskMetModule(DecisionLearner):
    """TaskMet: learn the metric of the predictor's loss for the downstream task (see module docstring).

    Args:
        predictor: ``f_theta``: features ``[..., F]`` -> predictions ``[..., m]`` (``theta`` is fitted by
            the inner loop, never by the outer optimiser).
        metric: ``Lambda_phi``: features -> ``[..., m, m]`` (or the diagonal ``[..., m]`` if the module
            has ``diagonal=True``), e.g. :class:`MetricNet`.
        optimizer: the metric's optimiser (default Adam, lr 1e-3; the shipped configs use 1e-2).
        inner_steps: inner steps per outer step (warm-started from the previous solution).
        first_inner_steps: inner steps on the first outer step (from the initial predictor).
        inner_lr, inner_optimizer: the functional inner optimiser, ``"adam"`` or ``"sgd"``.
        inner_weight_decay: ``wd/2 ||theta||^2`` added to the inner loss (a better-conditioned Hessian).
        cg_steps, cg_damping: conjugate gradient of the implicit gradient (at most as many steps as the
            predictor has parameters, where CG is exact).
        hypergradient: ``"implicit"`` (implicit function theorem at ``theta*``) or ``"unrolled"``
            (differentiate through this outer step's ``inner_steps`` inner steps).
        clip_grad_norm, nonfinite, max_consecutive_skips, lr_scheduler: the shared outer-step
            settings (:mod:`tasklight.core.outer`), applied to the metric gradient.
    """

    def __init__(self, predictor: nn.Module, metric: nn.Module, problem: Optional[DecisionProblem] = None,
                 optimizer: OptimizerCallable = default_optimizer, inner_steps: int = 10, first_inner_steps: int = 200,
                 inner_lr: float = 1e-2, inner_optimizer: Literal["adam", "sgd"] = "adam",
                 inner_weight_decay: float = 0.0, cg_steps: int = 10, cg_damping: float = 1e-4,
                 hypergradient: Literal["implicit", "unrolled"] = "implicit",
                 lr_scheduler: Optional[LRSchedulerCallable] = None, clip_grad_norm: Optional[float] = None,
                 nonfinite: Literal["raise", "skip"] = "raise",
                 max_consecutive_skips: int = DEFAULT_MAX_CONSECUTIVE_SKIPS) -> None:
        super().__init__(predictor, problem, optimizer, lr_scheduler, clip_grad_norm, nonfinite, max_consecutive_skips)
        if not (inner_lr > 0 and math.isfinite(inner_lr)):
            raise ValueError(f"inner_lr must be a finite number > 0, got {inner_lr}.")
        if inner_optimizer not in ("adam", "sgd"):
            raise ValueError(f"inner_optimizer must be 'adam' or 'sgd', got {inner_optimizer!r}.")
        if hypergradient not in ("implicit", "unrolled"):
            raise ValueError(f"hypergradient must be 'implicit' or 'unrolled', got {hypergradient!r}.")
        check_int("TaskMetModule", "inner_steps", inner_steps, 1, "inner steps per outer step")
        check_int("TaskMetModule", "first_inner_steps", first_inner_steps, 1, "inner steps on the first outer step")
        check_int("TaskMetModule", "cg_steps", cg_steps, 1, "conjugate-gradient iterations")
        check_real("TaskMetModule", "cg_damping", cg_damping, 0.0)
        check_real("TaskMetModule", "inner_weight_decay", inner_weight_decay, 0.0)
        if inner_steps < 1 or first_inner_steps < inner_steps:
            raise ValueError(f"TaskMet needs 1 <= inner_steps <= first_inner_steps, got inner_steps={inner_steps}, "
                             f"first_inner_steps={first_inner_steps}.")
        if cg_steps < 1 or cg_damping < 0:
            raise ValueError(f"TaskMet needs cg_steps >= 1 and cg_damping >= 0, got {cg_steps}, {cg_damping}.")
        self.metric = metric
        self.inner_steps, self.first_inner_steps = inner_steps, first_inner_steps
        self.inner_lr, self.inner_optimizer, self.inner_weight_decay = inner_lr, inner_optimizer, inner_weight_decay
        self.cg_steps, self.cg_damping, self.hypergradient = cg_steps, cg_damping, hypergradient
        self._inner_state: Optional[dict] = None  # functional optimiser state, carried across outer steps

    def check_problem(self, problem: DecisionProblem) -> None:
        dim = getattr(self.metric, "dim", None)
        if dim is not None and dim != problem.out_dim:
            raise ValueError(f"the metric has dimension {dim} but {problem.name} predicts {problem.out_dim} values "
                             f"per unit: set the metric's dim to {problem.out_dim}.")

    @property
    def diagonal(self) -> bool:
        return bool(getattr(self.metric, "diagonal", False))

    _gradient_name = "metric gradient"

    def configure_optimizers(self):
        return configure_outer_optimizers(self.optimizer_factory, self.scheduler_factory, self.metric.parameters())

    # ----- the inner problem (functional)
    def prediction_loss(self, theta: ParamDict, lam: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """The inner loss under a given metric value ``lam = Lambda(x)``."""
        loss = mahalanobis_loss(functional_call(self.predictor, theta, (x,), strict=False), y, lam, self.diagonal)
        if self.inner_weight_decay:
            loss = loss + 0.5 * self.inner_weight_decay * sum((t * t).sum() for t in theta.values())
        return loss

    def inner_loss(self, theta: ParamDict, phi: ParamDict, x: Tensor, y: Tensor) -> Tensor:
        """``L_inner(theta, phi)``: the Mahalanobis prediction loss under ``Lambda_phi``."""
        return self.prediction_loss(theta, functional_call(self.metric, phi, (x,), strict=False), x, y)

    def run_inner(self, theta: ParamDict, lam: Tensor, x: Tensor, y: Tensor, steps: int,
                  state: Optional[dict] = None) -> tuple[ParamDict, dict]:
        """``steps`` functional optimiser steps on the inner loss under ``lam``. Differentiable in
        ``lam`` (and hence in the metric's parameters) when ``lam`` carries a graph."""
        g_fn = grad(lambda th: self.prediction_loss(th, lam, x, y))
        # the core's functional update rules (tasklight.core.update_rules), state carried across calls
        rule = make_update_rule(self.inner_optimizer, self.inner_lr)
        if state is None:
            state = {"t": 0, "m": {k: torch.zeros_like(v) for k, v in theta.items()},
                     "v": {k: torch.zeros_like(v) for k, v in theta.items()}}
        t, m, v = state["t"], dict(state["m"]), dict(state["v"])
        for _ in range(steps):
            g = g_fn(theta)
            if self.inner_optimizer == "sgd":
                theta, _ = rule.step(theta, g, ())
                t += 1
            else:
                theta, (t, m, v) = rule.step(theta, g, (t, m, v))
        return theta, {"t": t, "m": m, "v": v}

    def metric_gradient(self, x: Tensor, y: Tensor) -> tuple[ParamDict, dict]:
        """One outer step's inner fit and ``d L_task / d phi``; writes ``theta*`` into the predictor.

        Returns the metric gradient (a dict like the metric's parameters) and logging values, or
        ``(None, {"problem": ...})`` when the inner solution is not finite (nothing is written then).
        """
        steps = self.first_inner_steps if self._inner_state is None else self.inner_steps
        theta0 = {k: p.detach() for k, p in self.predictor.named_parameters()}
        phi = {k: p.detach() for k, p in self.metric.named_parameters()}
        if self.hypergradient == "implicit":
            with torch.no_grad():
                lam = self.metric(x)
            theta, state = self.run_inner(theta0, lam, x, y, steps, self._inner_state)
            diverged = self._diverged(theta, steps)
            if diverged:
                return None, {"problem": diverged}
            theta = {k: t.detach().requires_grad_() for k, t in theta.items()}
            with torch.enable_grad():
                task = self.problem.task_loss(functional_call(self.predictor, theta, (x,), strict=False), y, x)
                outer = _grads(task, theta)
            # CG on an n-dimensional system is exact after n steps: more would only cost time
            cg_steps = min(self.cg_steps, sum(t.numel() for t in theta.values()))
            hyper, cg = implicit_gradient(lambda th, ph: self.inner_loss(th, ph, x, y), theta, phi, outer,
                                          cg_steps=cg_steps, damping=self.cg_damping, return_info=True)
            self.log("train/cg_rel_residual", cg["rel_residual"].float(), batch_size=x.shape[0])
        else:
            with torch.no_grad():
                warm, state = self.run_inner(theta0, self.metric(x), x, y, steps - self.inner_steps,
                                             self._inner_state)
            phi = {k: p.requires_grad_() for k, p in phi.items()}
            with torch.enable_grad():
                lam = functional_call(self.metric, phi, (x,), strict=False)
                theta, state = self.run_inner(warm, lam, x, y, self.inner_steps, state)
                diverged = self._diverged(theta, steps)
                if diverged:
                    return None, {"problem": diverged}
                task = self.problem.task_loss(functional_call(self.predictor, theta, (x,), strict=False), y, x)
                hyper = _grads(task, phi)
        self._inner_state = {key: ({k: t.detach() for k, t in val.items()} if isinstance(val, dict) else val)
                             for key, val in state.items()}
        with torch.no_grad():
            for k, p in self.predictor.named_parameters():
                p.copy_(theta[k])
            inner = self.inner_loss(theta, phi, x, y)
        return {k: h.detach() for k, h in hyper.items()}, {"task_loss": task.detach(), "inner_loss": inner.detach()}

    def _diverged(self, theta: ParamDict, steps: int) -> Optional[str]:
        """A description of a non-finite inner solution, or None (checked before the task loss, whose
        decision would refuse NaN predictions without the non-finite policy)."""
        bad = first_nonfinite([(k, t.detach()) for k, t in theta.items()])
        if bad is None:
            return None
        return (f"non-finite inner solution (predictor parameter {bad}) after {steps} inner steps "
                f"(inner_optimizer={self.inner_optimizer!r}, inner_lr={self.inner_lr})")

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        with torch.no_grad():
            y = self._checked_target(self(x), y)
        hyper, logs = self.metric_gradient(x, y)
        if hyper is None:
            # the inner loop diverged: predictor and inner state are left as they were; the shared
            # policy raises (nonfinite='raise') or skips the step (parameters and optimiser untouched)
            zero = surrogate_objective(list(self.metric.parameters()),
                                       [torch.zeros_like(p) for p in self.metric.parameters()])
            self._step(zero, logs["problem"])
            return zero.detach()
        # one backward of <phi, hypergradient> puts the hypergradient in .grad (and syncs it under DDP)
        named = list(self.metric.named_parameters())
        surrogate = surrogate_objective([p for _, p in named], [hyper[k] for k, _ in named])
        task = logs["task_loss"]
        problem = None if bool(torch.isfinite(task)) else f"non-finite task loss ({float(task)})"
        self._step(surrogate, problem)
        n = x.shape[0]
        self.log("train/task_loss", logs["task_loss"], prog_bar=True, batch_size=n)
        self.log("train/inner_loss", logs["inner_loss"], batch_size=n)
        with torch.no_grad():
            self.log("train/mse", F.mse_loss(self(x), y), batch_size=n)
        return logs["task_loss"]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["taskmet_inner_state"] = self._inner_state
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._inner_state = checkpoint.get("taskmet_inner_state")
