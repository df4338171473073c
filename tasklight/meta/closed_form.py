"""Closed-form heads: R2D2 (Bertinetto et al. 2019) and MetaOptNet-style logistic regression (Lee et al. 2019).

An embedding network ``f`` maps every support and query example to a vector; per task, a linear head
``W`` (a bias absorbed as a constant feature) is *solved for* on the support set instead of being
adapted by gradient steps, and the queries are classified by ``scale * [f(x), 1] W``:

* ridge regression (R2D2) on one-hot targets ``Y``:
  ``W* = argmin_W 1/2 ||X W - Y||^2 + lam/2 ||W||^2 = X^T (X X^T + lam I)^-1 Y``
  (the ``S x S`` system when there are fewer support examples than features, else the
  ``(X^T X + lam I) W = X^T Y`` one);
* multinomial logistic regression: ``W* = argmin_W sum_i CE(x_i W, y_i) + lam/2 ||W||^2``, solved by
  Newton's method with conjugate-gradient Newton directions on Hessian-vector products and a
  monotone step-length choice (no data-dependent Python control flow; all tasks at once).

The meta-gradient reaches the embedding through the head. For ridge it is taken through the
closed-form solve (``differentiation="closed_form"``) or, like logistic regression, by the implicit
function theorem (``"implicit"``): ``dW*/dphi = -H^-1 d^2 inner / dW dphi`` solved by conjugate
gradient (:func:`tasklight.core.implicit.implicit_gradient`), with ``phi`` the support embeddings
and the regulariser ``lam``. ``lam`` (``learn_lambda``) and the logit ``scale`` (``learn_scale``)
are meta-learned, as in R2D2. A constant offset of the logits does not change a softmax, so R2D2's
second calibration scalar is left out. Both heads regularise the bias column too.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.func import vmap

from tasklight.core.implicit import conjugate_gradient, implicit_gradient
from tasklight.core.outer import DEFAULT_MAX_CONSECUTIVE_SKIPS, default_optimizer
from tasklight.data.batch import MetaBatch
from tasklight.meta.base import MetaLearner, MetaOutput
from tasklight.meta.proto import embed_tasks, episode_ways

#: step lengths tried along each Newton direction (the one with the lowest objective is taken; 0 keeps
#: the iterate, so the objective never increases)
NEWTON_STEP_LENGTHS = (1.0, 0.5, 0.25, 0.125, 0.0)


def with_bias_feature(x: Tensor) -> Tensor:
    """``[..., D] -> [..., D + 1]``: a constant 1 appended (the head's bias is its last row)."""
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1)


def one_hot(y: Tensor, n_way: int, dtype: torch.dtype) -> Tensor:
    """``F.one_hot`` as a comparison (vmap-able: ``F.one_hot`` checks its values in Python)."""
    return (y[..., None] == torch.arange(n_way, device=y.device)).to(dtype)


def ridge_loss(w: Tensor, x: Tensor, y: Tensor, lam: Tensor, n_way: int) -> Tensor:
    """``1/2 ||x w - onehot(y)||^2 + lam/2 ||w||^2`` for ``x [S, D]``, ``w [D, N]``."""
    return 0.5 * ((x @ w - one_hot(y, n_way, x.dtype)) ** 2).sum() + 0.5 * lam * (w ** 2).sum()


def logistic_loss(w: Tensor, x: Tensor, y: Tensor, lam: Tensor, n_way: int) -> Tensor:
    """``sum_i CE(x_i w, y_i) + lam/2 ||w||^2`` for ``x [S, D]``, ``w [D, N]``; for a batch of tasks
    (``x [T, S, D]``, ``w [.., T, D, N]``, ``lam [T]``) one value per task."""
    ce = -(one_hot(y, n_way, x.dtype) * torch.log_softmax(x @ w, -1)).sum((-2, -1))
    return ce + 0.5 * lam * (w ** 2).sum((-2, -1))


def logistic_hvp(x: Tensor, probs: Tensor, lam: Tensor, v: Tensor) -> Tensor:
    """Hessian-vector product of :func:`logistic_loss` in ``w`` at softmax outputs ``probs [S, N]``:
    ``x^T (P * (x v) - P * rowsum(P * (x v))) + lam v``."""
    u = probs * (x @ v)
    return x.transpose(-1, -2) @ (u - probs * u.sum(-1, keepdim=True)) + lam * v


def ridge_solve(x: Tensor, y: Tensor, lam: Tensor, n_way: int) -> Tensor:
    """The ridge head ``W* [.., D, N]`` of ``x [.., S, D]``, labels ``y [.., S]`` and ``lam`` (a scalar or
    ``[..]``): the smaller of the two equivalent linear systems (Woodbury)."""
    S, D = x.shape[-2], x.shape[-1]
    target = one_hot(y, n_way, x.dtype)
    lam = torch.as_tensor(lam, dtype=x.dtype, device=x.device)[..., None, None]
    xt = x.transpose(-1, -2)
    if S <= D:
        gram = x @ xt + lam * torch.eye(S, dtype=x.dtype, device=x.device)
        return xt @ torch.linalg.solve(gram, target)
    return torch.linalg.solve(xt @ x + lam * torch.eye(D, dtype=x.dtype, device=x.device), xt @ target)


def _task_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-task inner products ``[T, 1, 1]`` of ``[T, D, N]`` tensors (batched conjugate gradient)."""
    return (a * b).sum((-2, -1), keepdim=True)


def logistic_solve(x: Tensor, y: Tensor, lam: Tensor, n_way: int, newton_steps: int,
                   cg_steps: int) -> tuple[Tensor, Tensor]:
    """The logistic heads ``W* [T, D, N]`` of a batch of tasks (``x [T, S, D]``, ``y [T, S]``,
    ``lam [T]``) by Newton-CG from 0: every task's Newton system solved by its own conjugate
    gradient on the exact Hessian-vector product, all tasks at once.

    Returns ``(W*, losses [T, newton_steps + 1])``: each task's objective before each step and at the end.
    """
    target = one_hot(y, n_way, x.dtype)
    lam3 = lam[:, None, None]
    xt = x.transpose(-1, -2)
    w = x.new_zeros(x.shape[0], x.shape[-1], n_way)
    steps = x.new_tensor(NEWTON_STEP_LENGTHS)
    losses = [logistic_loss(w, x, y, lam, n_way)]
    for _ in range(newton_steps):
        p = torch.softmax(x @ w, -1)
        g = xt @ (p - target) + lam3 * w
        d = conjugate_gradient(lambda v: logistic_hvp(x, p, lam3, v), g, steps=cg_steps, dot=_task_dot)
        cand = w[None] - steps[:, None, None, None] * d[None]  # [C, T, D, N]
        vals = logistic_loss(cand, x, y, lam, n_way)  # [C, T]
        pick = one_hot(vals.argmin(0), len(NEWTON_STEP_LENGTHS), x.dtype)  # [T, C]
        w = torch.einsum("tc,ctdn->tdn", pick, cand)
        losses.append(logistic_loss(w, x, y, lam, n_way))
    return w, torch.stack(losses, -1)


class _ImplicitHead(torch.autograd.Function):
    """``W* = argmin_W inner(W, x, lam)`` per task, backward by the implicit function theorem."""

    @staticmethod
    def forward(ctx, x: Tensor, lam: Tensor, y: Tensor, solve: Callable, inner: Callable, cg_steps: int):
        w, extra = solve(x.detach(), y, lam.detach())
        ctx.save_for_backward(x, lam, y, w)
        ctx.inner, ctx.cg_steps = inner, cg_steps
        ctx.mark_non_differentiable(extra)
        return w, extra

    @staticmethod
    def backward(ctx, grad_w: Tensor, _grad_extra: Tensor):
        x, lam, y, w = ctx.saved_tensors
        inner, cg_steps = ctx.inner, ctx.cg_steps

        def one(w, x, y, lam, g):
            return implicit_gradient(lambda th, ph: inner(th, ph["x"], y, ph["lam"]), w, {"x": x, "lam": lam}, g,
                                     cg_steps=cg_steps)

        with torch.enable_grad():
            out = vmap(one)(w.detach(), x.detach(), y, lam.detach(), grad_w.detach())
        return out["x"], out["lam"], None, None, None, None


class ClosedFormHeadModule(MetaLearner):
    """A meta-learner whose per-task linear head is solved on the support set (see the module docstring).

    Args:
        net: the embedding network (e.g. ``Conv4`` with ``out_features: 0``); its output is flattened.
        head: ``"ridge"`` (R2D2) or ``"logistic"`` (MetaOptNet-style logistic regression).
        lam: the regulariser ``lam > 0`` (initial value when ``learn_lambda``).
        learn_lambda: meta-learn ``log lam``.
        scale: the logits' scale (initial value when ``learn_scale``).
        learn_scale: meta-learn the scale.
        differentiation: ``"closed_form"`` (ridge only: autograd through the linear solve) or
            ``"implicit"`` (the implicit function theorem, conjugate gradient).
        cg_steps: conjugate-gradient iterations of the implicit backward and of each Newton direction
            (exact for a head with ``cg_steps >= support examples x n_way + 1`` in exact arithmetic).
        newton_steps: Newton iterations of the logistic head.
        optimizer, lr_scheduler, clip_grad_norm, nonfinite, max_consecutive_skips: as for
            :class:`MetaLearner`.

    There is no inner loop of gradient steps, so ``predict_episode``'s ``steps`` is ignored and
    metrics are logged as ``@0``. The logistic head's objective along its Newton iterations is
    reported as the inner losses.
    """

    net_is_classifier = False
    engine_strategies = ("auto", "vmap")
    engine_chunks = False

    def __init__(self, net: nn.Module, head: Literal["ridge", "logistic"] = "ridge", lam: float = 1.0,
                 learn_lambda: bool = True, scale: float = 1.0, learn_scale: bool = True,
                 differentiation: Literal["closed_form", "implicit"] = "closed_form", cg_steps: int = 30,
                 newton_steps: int = 10, optimizer: OptimizerCallable = default_optimizer,
                 lr_scheduler: Optional[LRSchedulerCallable] = None, clip_grad_norm: Optional[float] = None,
                 nonfinite: Literal["raise", "skip"] = "raise",
                 max_consecutive_skips: int = DEFAULT_MAX_CONSECUTIVE_SKIPS,
                 strategy: Literal["auto", "vmap"] = "auto") -> None:
        super().__init__(net, "cross_entropy", 0, 0.0, 0, (0,), optimizer, lr_scheduler, clip_grad_norm, nonfinite,
                         max_consecutive_skips, strategy=strategy)
        if head not in ("ridge", "logistic"):
            raise ValueError(f"head must be 'ridge' (R2D2) or 'logistic' (MetaOptNet-style), got {head!r}")
        if differentiation not in ("closed_form", "implicit"):
            raise ValueError(f"differentiation must be 'closed_form' or 'implicit', got {differentiation!r}")
        if head == "logistic" and differentiation == "closed_form":
            raise ValueError("the logistic head has no closed form: set differentiation='implicit'")
        if not (lam > 0 and math.isfinite(lam)):
            raise ValueError(f"lam (the head's L2 regulariser) must be a finite number > 0, got {lam}")
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale (the logits' scale) must be a finite number > 0, got {scale}")
        if cg_steps < 1 or newton_steps < 1:
            raise ValueError(f"cg_steps and newton_steps must be >= 1, got cg_steps={cg_steps}, "
                             f"newton_steps={newton_steps}")
        self.head, self.differentiation = head, differentiation
        self.cg_steps, self.newton_steps = cg_steps, newton_steps
        self.log_lam = nn.Parameter(torch.tensor(math.log(lam)), requires_grad=learn_lambda)
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)), requires_grad=learn_scale)

    def head_weights(self, support: Tensor, support_y: Tensor, n_way: int) -> tuple[Tensor, Tensor]:
        """Per-task heads ``[T, D + 1, N]`` of support embeddings ``[T, S, D]`` and the head objective
        along the solver's iterations ``[T, k]`` (empty for ridge)."""
        x = with_bias_feature(support)
        lam = self.log_lam.to(x.dtype).exp().expand(x.shape[0])
        if self.head == "ridge" and self.differentiation == "closed_form":
            return ridge_solve(x, support_y, lam, n_way), x.new_zeros(x.shape[0], 0)
        if self.head == "ridge":
            solve = lambda x, y, lam: (ridge_solve(x, y, lam, n_way), x.new_zeros(x.shape[0], 0))  # noqa: E731
            inner = lambda w, x, y, lam: ridge_loss(w, x, y, lam, n_way)  # noqa: E731
        else:
            newton, cg = self.newton_steps, self.cg_steps
            solve = lambda x, y, lam: logistic_solve(x, y, lam, n_way, newton, cg)  # noqa: E731
            inner = lambda w, x, y, lam: logistic_loss(w, x, y, lam, n_way)  # noqa: E731
        return _ImplicitHead.apply(x, lam, support_y, solve, inner, self.cg_steps)

    def logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> tuple[Tensor, Tensor]:
        """Query logits ``[T, Q, N]`` and the head objective along the solver's iterations ``[T, k]``."""
        n_way = episode_ways(support_y)
        support, query = embed_tasks(self, support_x, query_x)
        w, trace = self.head_weights(support, support_y, n_way)
        return self.log_scale.exp() * (with_bias_feature(query) @ w), trace

    def meta_objective(self, batch: MetaBatch) -> MetaOutput:
        logits, trace = self.logits(batch.support_x, batch.support_y, batch.query_x)
        qloss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten(), reduction="none")
        qloss = qloss.view(batch.query_y.shape).mean(1)
        return MetaOutput(qloss.mean(), qloss.detach(), trace.detach())

    def adapt_and_predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                          steps: int) -> tuple[Tensor, Tensor]:
        logits, trace = self.logits(support_x, support_y, query_x)
        return logits, trace.detach()


class R2D2Module(ClosedFormHeadModule):
    """R2D2 (Bertinetto et al. 2019): :class:`ClosedFormHeadModule` with the ridge-regression head."""

    def __init__(self, net: nn.Module, lam: float = 1.0, learn_lambda: bool = True, scale: float = 1.0,
                 learn_scale: bool = True, differentiation: Literal["closed_form", "implicit"] = "closed_form",
                 cg_steps: int = 30, optimizer: OptimizerCallable = default_optimizer,
                 lr_scheduler: Optional[LRSchedulerCallable] = None, clip_grad_norm: Optional[float] = None,
                 nonfinite: Literal["raise", "skip"] = "raise",
                 max_consecutive_skips: int = DEFAULT_MAX_CONSECUTIVE_SKIPS,
                 strategy: Literal["auto", "vmap"] = "auto") -> None:
        super().__init__(net, "ridge", lam, learn_lambda, scale, learn_scale, differentiation, cg_steps, 1,
                         optimizer, lr_scheduler, clip_grad_norm, nonfinite, max_consecutive_skips, strategy)


class LogisticHeadModule(ClosedFormHeadModule):
    """MetaOptNet-style logistic regression (Lee et al. 2019): :class:`ClosedFormHeadModule` with the
    multinomial logistic-regression head, differentiated implicitly."""

    def __init__(self, net: nn.Module, lam: float = 1.0, learn_lambda: bool = True, scale: float = 1.0,
                 learn_scale: bool = True, cg_steps: int = 30, newton_steps: int = 10,
                 optimizer: OptimizerCallable = default_optimizer, lr_scheduler: Optional[LRSchedulerCallable] = None,
                 clip_grad_norm: Optional[float] = None, nonfinite: Literal["raise", "skip"] = "raise",
                 max_consecutive_skips: int = DEFAULT_MAX_CONSECUTIVE_SKIPS,
                 strategy: Literal["auto", "vmap"] = "auto") -> None:
        super().__init__(net, "logistic", lam, learn_lambda, scale, learn_scale, "implicit", cg_steps, newton_steps,
                         optimizer, lr_scheduler, clip_grad_norm, nonfinite, max_consecutive_skips, strategy)
