"""iMAML (Rajeswaran et al. 2019): implicit meta-gradients of a proximally regularised inner problem.

The inner problem of task i is ``min_phi L_train(phi) + lam/2 ||phi - theta||^2``, solved
approximately by ``inner_steps`` gradient steps from ``theta`` with no graph kept. The meta-gradient
is ``(I + H/lam)^-1 grad L_query(phi)``, ``H`` the Hessian of ``L_train`` at ``phi``, computed by
conjugate gradient on Hessian-vector products. Memory does not grow with the number of inner steps.
All tasks of a meta-batch are solved in one ``vmap``-ed call.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.func import grad, vmap

from tasklight.data.batch import MetaBatch
from tasklight.core.functional import _batched_buffers, merge_task_buffers, split_state
from tasklight.core.implicit import proximal_meta_gradient
from tasklight.meta.base import MetaLearner, MetaOutput, adam
from tasklight.config import RecordsInit


class IMAMLModule(MetaLearner):
    """Implicit MAML.

    Args (besides :class:`MetaLearner`'s):
        lam: weight of the proximal term (the paper's lambda); larger keeps phi closer to theta.
        cg_steps: conjugate-gradient iterations for the implicit meta-gradient.
        cg_damping: added to the CG system as ``damping * I`` for stability.
    """

    def __init__(self, net: nn.Module, loss: Union[str, nn.Module] = "mse", inner_steps: int = 10,
                 inner_lr: float = 0.01, lam: float = 1.0, cg_steps: int = 5, cg_damping: float = 0.0,
                 eval_inner_steps: Optional[int] = None, extra_eval_steps: Sequence[int] = (0,),
                 optimizer: OptimizerCallable = adam, lr_scheduler: Optional[LRSchedulerCallable] = None,
                 clip_grad_norm: Optional[float] = None, nonfinite: Literal["raise", "skip"] = "raise") -> None:
        super().__init__(net, loss, inner_steps, inner_lr, eval_inner_steps, extra_eval_steps, optimizer,
                         lr_scheduler, clip_grad_norm, nonfinite)
        if lam <= 0:
            raise ValueError(f"lam (the proximal weight) must be > 0, got {lam}")
        if cg_steps < 1 or cg_damping < 0:
            raise ValueError(f"need cg_steps >= 1 and cg_damping >= 0, got {cg_steps}, {cg_damping}")
        self.lam, self.cg_steps, self.cg_damping = lam, cg_steps, cg_damping

    def _proximal_adapt(self, theta, bufs, sx, sy, steps):
        return self.core.adapt(theta, bufs, sx, sy, steps=steps, lr=self.inner_lr, first_order=True,
                               proximal=self.lam, anchor=theta)

    def task_meta_gradients(self, batch: MetaBatch):
        """Per-task implicit meta-gradients ``[T, ...]``, query losses ``[T]``, inner losses, buffers."""
        params, buffers = split_state(self.net)
        theta = {k: v.detach() for k, v in params.items()}
        core = self.core

        def one_task(bufs, sx, sy, qx, qy):
            res = self._proximal_adapt(theta, bufs, sx, sy, self.inner_steps)
            phi = res.params
            # losses at phi that do not touch the running statistics (buffers cloned inside)
            train_loss = lambda p: core.task_loss(p, _clone(bufs), sx, sy)  # noqa: E731
            g, qloss = grad(lambda p: _with_value(core.task_loss(p, _clone(bufs), qx, qy)), has_aux=True)(phi)
            v = proximal_meta_gradient(train_loss, phi, g, self.lam, self.cg_steps, self.cg_damping)
            return v, qloss, res.inner_losses, res.buffers

        task_bufs = _batched_buffers(buffers, batch.num_tasks)
        v, qloss, inner, new_bufs = vmap(one_task, randomness="different")(
            task_bufs, batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        return v, qloss, inner, new_bufs

    def meta_objective(self, batch: MetaBatch) -> MetaOutput:
        v, qloss, inner, new_bufs = self.task_meta_gradients(batch)
        if self.net.training and new_bufs:
            merge_task_buffers(self.net, new_bufs)
        params, _ = split_state(self.net)
        # a surrogate whose gradient is the task-mean implicit meta-gradient: one backward, so
        # DDP all-reduces it like any other gradient
        objective = sum((p * v[k].mean(0).detach()).sum() for k, p in params.items())
        return MetaOutput(objective, qloss, inner)

    def adapt_and_predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                          steps: int) -> tuple[Tensor, Tensor]:
        params, buffers = split_state(self.net)
        theta = {k: v.detach() for k, v in params.items()}

        def one_task(bufs, sx, sy, qx):
            res = self._proximal_adapt(theta, bufs, sx, sy, steps)
            return self.core.forward(res.params, res.buffers, qx), res.inner_losses

        return vmap(one_task, randomness="different")(_batched_buffers(buffers, support_x.shape[0]), support_x,
                                                      support_y, query_x)


def _clone(bufs):
    return {k: v.clone() for k, v in bufs.items()}


def _with_value(loss: Tensor):
    return loss, loss.detach()
