"""Reptile (Nichol, Achiam & Schulman 2018): a first-order meta-learner without second derivatives.

Each task of a meta-batch is adapted from the shared initialisation ``theta`` by ``inner_steps``
SGD steps of the core (all tasks in one ``vmap``-ed call, no graph kept); the meta-gradient is
``theta - mean_i(phi_i)``, so an outer SGD step of learning rate ``eps`` moves ``theta`` towards
the adapted weights: ``theta <- theta + eps * (mean_i phi_i - theta)`` (the paper's batched
update). Any outer optimiser may be used; the paper's is this plain step with ``eps`` annealed
linearly to 0 (``lr_scheduler``). It is written as a surrogate objective whose gradient is that
difference, so one backward (one all-reduce under DDP) carries it like any other meta-gradient.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from tasklight.core.engine import surrogate_objective
from tasklight.core.functional import merge_task_buffers, split_state
from tasklight.data.batch import MetaBatch
from tasklight.core.outer import DEFAULT_MAX_CONSECUTIVE_SKIPS
from tasklight.meta.base import MetaLearner, MetaOutput


def reptile_sgd(params) -> torch.optim.Optimizer:
    """The paper's outer step: plain SGD with the meta step size 1.0 (``theta += eps (phi - theta)``)."""
    return torch.optim.SGD(params, lr=1.0)


class ReptileModule(MetaLearner):
    """Reptile.

    Args (besides :class:`MetaLearner`'s):
        train_on_query: adapt on the support and query examples of a training task together (the
            paper trains on all of a task's examples; the query set is only needed for
            evaluation). ``False`` adapts on the support set alone. Evaluation always adapts on
            the support set and predicts the query set.
        optimizer: default plain SGD with lr 1.0 (the meta step size ``eps``).
    """

    def __init__(self, net: nn.Module, loss: Union[str, nn.Module] = "mse", inner_steps: int = 5,
                 inner_lr: float = 0.01, train_on_query: bool = True, eval_inner_steps: Optional[int] = None,
                 extra_eval_steps: Sequence[int] = (0,), optimizer: OptimizerCallable = reptile_sgd,
                 lr_scheduler: Optional[LRSchedulerCallable] = None, clip_grad_norm: Optional[float] = None,
                 nonfinite: Literal["raise", "skip"] = "raise",
                 max_consecutive_skips: int = DEFAULT_MAX_CONSECUTIVE_SKIPS,
                 adapt: Optional[Sequence[str]] = None,
                 strategy: Literal["auto", "vmap", "stacked", "loop", "compiled"] = "auto",
                 chunk_size: Optional[int] = None, compile_cache_dir: Optional[str] = None,
                 inner_loss: Union[None, str, nn.Module] = None) -> None:
        super().__init__(net, loss, inner_steps, inner_lr, eval_inner_steps, extra_eval_steps, optimizer,
                         lr_scheduler, clip_grad_norm, nonfinite, max_consecutive_skips, adapt=adapt,
                         strategy=strategy, chunk_size=chunk_size, compile_cache_dir=compile_cache_dir,
                         inner_loss=inner_loss)
        if inner_steps < 1:
            raise ValueError(f"Reptile needs inner_steps >= 1 (its meta-gradient is theta - phi), got {inner_steps}")
        self.train_on_query = train_on_query

    def _adapt(self, sx: Tensor, sy: Tensor, qx: Optional[Tensor], qy: Optional[Tensor], steps: int):
        params, buffers = split_state(self.net)
        theta = {k: v.detach() for k, v in params.items()}
        res, out, qloss = self.core.adapt_tasks(theta, buffers, sx, sy, qx, qy, steps=steps, lr=self.inner_lr,
                                                first_order=True)
        if self.net.training and res.buffers:
            merge_task_buffers(self.net, res.buffers)
        return res, out, qloss

    def meta_objective(self, batch: MetaBatch) -> MetaOutput:
        sx, sy = batch.support_x, batch.support_y
        if self.train_on_query:
            sx, sy = torch.cat([sx, batch.query_x], 1), torch.cat([sy, batch.query_y], 1)
        res, _, qloss = self._adapt(sx, sy, batch.query_x, batch.query_y, self.inner_steps)
        params, _ = split_state(self.net)
        # d objective / d theta = theta - mean_i phi_i
        objective = surrogate_objective(list(params.values()),
                                        [p.detach() - res.params[k].detach().mean(0) for k, p in params.items()])
        return MetaOutput(objective, qloss.detach(), res.inner_losses)

    def adapt_and_predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                          steps: int) -> tuple[Tensor, Tensor]:
        res, out, _ = self._adapt(support_x, support_y, query_x, None, steps)
        return out, res.inner_losses
