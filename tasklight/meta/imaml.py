"""iMAML (Rajeswaran et al. 2019): implicit meta-gradients of a proximally regularised inner problem.

The inner problem of task i is ``min_phi L_train(phi) + lam/2 ||phi - theta||^2``, solved
approximately by ``inner_steps`` gradient steps from ``theta`` with no graph kept. The meta-gradient
is ``(I + H/lam)^-1 grad L_query(phi)``, ``H`` the Hessian of ``L_train`` at ``phi``, computed by
conjugate gradient on Hessian-vector products. Memory does not grow with the number of inner steps.
The inner problems of a meta-batch run on the core's engine (``strategy``); the CG solves are vmapped.
"""
from __future__ import annotations

import math

from typing import Literal, Optional, Sequence, Union

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.func import grad, vmap

from tasklight.data.batch import MetaBatch
from tasklight.core.engine import surrogate_objective
from tasklight.core.functional import merge_task_buffers, split_state
from tasklight.core.implicit import gauss_newton_vp, proximal_meta_gradient
from tasklight.core.outer import DEFAULT_MAX_CONSECUTIVE_SKIPS, default_optimizer
from tasklight.meta.base import MetaLearner, MetaOutput
from tasklight.core.checks import check_int, check_real


class IMAMLModule(MetaLearner):
    """Implicit MAML.

    Args (besides :class:`MetaLearner`'s):
        lam: weight of the proximal term (the paper's lambda); larger keeps phi closer to theta.
        cg_steps: conjugate-gradient iterations for the implicit meta-gradient.
        cg_damping: added to the CG system as ``damping * I`` for stability.
        cg_tol: the largest acceptable relative residual ``||r|| / ||g||`` of CG (logged as
            ``train/cg_rel_residual``, the worst task of the meta-batch).
        cg_check: what a meta-step whose CG did not reach ``cg_tol``, or met an indefinite system,
            does: ``"warn"`` (once per kind of problem) or ``"raise"``.
        curvature: the matrix ``H`` of the system ``(1 + cg_damping) I + H / lam``: ``"gauss_newton"``
            (default; the generalised Gauss-Newton matrix, positive semi-definite for MSE,
            cross-entropy and histogram losses, so the system is positive definite for every
            ``lam > 0``) or ``"hessian"`` (the paper's exact Hessian, which for a non-convex network
            has negative eigenvalues: the system is then indefinite wherever
            ``lambda_min(H) < -lam * (1 + cg_damping)``; on the sinusoid MLP the Hessian reaches
            -5.45 and most tasks of a meta-batch are indefinite at ``lam=0.5, cg_damping=0.5``).
    """

    def __init__(self, net: nn.Module, loss: Union[str, nn.Module] = "mse", inner_steps: int = 10,
                 inner_lr: float = 0.01, lam: float = 1.0, cg_steps: int = 5, cg_damping: float = 0.0,
                 cg_tol: float = 0.1, cg_check: Literal["warn", "raise"] = "warn",
                 curvature: Literal["gauss_newton", "hessian"] = "gauss_newton",
                 eval_inner_steps: Optional[int] = None, extra_eval_steps: Sequence[int] = (0,),
                 optimizer: OptimizerCallable = default_optimizer, lr_scheduler: Optional[LRSchedulerCallable] = None,
                 clip_grad_norm: Optional[float] = None, nonfinite: Literal["raise", "skip"] = "raise",
                 max_consecutive_skips: int = DEFAULT_MAX_CONSECUTIVE_SKIPS,
                 strategy: Literal["auto", "vmap", "stacked", "loop", "compiled"] = "auto",
                 chunk_size: Optional[int] = None, compile_cache_dir: Optional[str] = None,
                 inner_loss: Union[None, str, nn.Module] = None) -> None:
        super().__init__(net, loss, inner_steps, inner_lr, eval_inner_steps, extra_eval_steps, optimizer,
                         lr_scheduler, clip_grad_norm, nonfinite, max_consecutive_skips,
                         strategy=strategy, chunk_size=chunk_size, compile_cache_dir=compile_cache_dir,
                         inner_loss=inner_loss)
        if not (isinstance(lam, (int, float)) and lam > 0 and math.isfinite(lam)):
            raise ValueError(f"lam (the proximal weight) must be a finite number > 0, got {lam}")
        check_int("IMAMLModule", "cg_steps", cg_steps, 1, "conjugate-gradient iterations")
        check_real("IMAMLModule", "cg_damping", cg_damping, 0.0)
        check_real("IMAMLModule", "cg_tol", cg_tol, 0.0, strict=True, what="the largest accepted CG residual")
        if cg_steps < 1 or not (cg_damping >= 0 and math.isfinite(cg_damping)):
            raise ValueError(f"need cg_steps >= 1 and cg_damping >= 0, got {cg_steps}, {cg_damping}")
        if not cg_tol > 0 or cg_check not in ("warn", "raise"):
            raise ValueError(f"need cg_tol > 0 and cg_check 'warn' or 'raise', got cg_tol={cg_tol}, "
                             f"cg_check={cg_check!r}")
        self.lam, self.cg_steps, self.cg_damping = lam, cg_steps, cg_damping
        self.cg_tol, self.cg_check = cg_tol, cg_check
        if curvature not in ("gauss_newton", "hessian"):
            raise ValueError(f"curvature must be 'gauss_newton' or 'hessian', got {curvature!r}")
        self.curvature = curvature
        self.last_cg: Optional[dict] = None
        self._cg_warned: set = set()

    def _proximal_adapt(self, theta, buffers, sx, sy, qx, steps):
        """The proximal inner problem of every task, by the core's engine (no graph kept)."""
        return self.core.adapt_tasks(theta, buffers, sx, sy, qx, None, steps=steps, lr=self.inner_lr,
                                     first_order=True, proximal=self.lam, anchor=theta)

    def task_meta_gradients(self, batch: MetaBatch):
        """Per-task implicit meta-gradients ``[T, ...]``, query losses ``[T]``, inner losses, buffers.

        The inner problems run on the engine (``strategy``); the conjugate-gradient solves on
        Hessian- (or Gauss-Newton-) vector products at each task's ``phi`` are vmapped over tasks."""
        params, buffers = split_state(self.net)
        theta = {k: v.detach() for k, v in params.items()}
        core = self.core
        res, _, _ = self._proximal_adapt(theta, buffers, batch.support_x, batch.support_y, None, self.inner_steps)
        phis = {k: v.detach() for k, v in res.params.items()}

        def one_task(phi, bufs, sx, sy, qx, qy):
            # losses at phi that do not touch the running statistics (buffers cloned inside)
            train_loss = lambda p: core.inner_task_loss(p, _clone(bufs), sx, sy)  # noqa: E731
            g, qloss = grad(lambda p: _with_value(core.task_loss(p, _clone(bufs), qx, qy)), has_aux=True)(phi)
            curvature = None
            if self.curvature == "gauss_newton":
                frozen = {k: t.detach() for k, t in phi.items()}
                curvature = lambda v: gauss_newton_vp(  # noqa: E731
                    lambda p: core.forward(p, _clone(bufs), sx), lambda o: core.inner_loss_fn(o, sy), frozen, v)
            v, info = proximal_meta_gradient(train_loss, phi, g, self.lam, self.cg_steps, self.cg_damping,
                                             return_info=True, curvature_vp=curvature)
            return v, qloss, info

        v, qloss, info = vmap(one_task, randomness="different")(
            phis, res.buffers, batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        self.last_cg = info
        return v, qloss, res.inner_losses, res.buffers

    def check_cg(self, info: dict) -> None:
        """Log CG's worst relative residual; warn or raise if it did not converge (see ``cg_check``)."""
        rel, indefinite = info["rel_residual"], info["indefinite"]
        worst = rel.max()
        if self._trainer is not None:
            self.log("train/cg_rel_residual", worst.float())
        problems = []
        if bool(indefinite.any()):
            problems.append(f"the system (1 + cg_damping) I + H / lam is not positive definite for "
                            f"{int(indefinite.sum())} of {indefinite.numel()} tasks (a Hessian eigenvalue below "
                            f"-lam * (1 + cg_damping) = {-self.lam * (1 + self.cg_damping):g}), so CG's answer is "
                            f"not the implicit meta-gradient: raise lam or cg_damping")
        if bool(torch.isfinite(worst)) and float(worst) > self.cg_tol:
            problems.append(f"conjugate gradient stopped at a relative residual {float(worst):.3g} > cg_tol="
                            f"{self.cg_tol:g} after cg_steps={self.cg_steps}: raise cg_steps, lam or cg_damping")
        if not problems:
            return
        msg = f"iMAML at step {self.global_step}: " + "; ".join(problems) + "."
        if self.cg_check == "raise":
            raise FloatingPointError(msg + " (cg_check='warn' only warns)")
        from lightning.pytorch.utilities import rank_zero_warn

        # one warning per kind of problem (the message without the numbers), not one per step
        key = tuple(p.split(" ")[1] for p in problems)
        if key not in self._cg_warned:
            self._cg_warned.add(key)
            rank_zero_warn(msg + " Further such warnings are not shown; see train/cg_rel_residual.",
                           category=RuntimeWarning)

    def meta_objective(self, batch: MetaBatch) -> MetaOutput:
        v, qloss, inner, new_bufs = self.task_meta_gradients(batch)
        self.check_cg(self.last_cg)
        if self.net.training and new_bufs:
            merge_task_buffers(self.net, new_bufs)
        params, _ = split_state(self.net)
        # a surrogate whose gradient is the task-mean implicit meta-gradient: one backward, so
        # DDP all-reduces it like any other gradient
        objective = surrogate_objective(list(params.values()), [v[k].mean(0) for k in params])
        return MetaOutput(objective, qloss, inner)

    def adapt_and_predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                          steps: int) -> tuple[Tensor, Tensor]:
        params, buffers = split_state(self.net)
        theta = {k: v.detach() for k, v in params.items()}
        res, out, _ = self._proximal_adapt(theta, buffers, support_x, support_y, query_x, steps)
        return out, res.inner_losses


def _clone(bufs):
    return {k: v.clone() for k, v in bufs.items()}


def _with_value(loss: Tensor):
    return loss, loss.detach()
