"""MAML (Finn et al. 2017): second order, first order (FOMAML) and Meta-SGD inner learning rates.

The default backend is tasklight's functional core and its engine (``strategy``: all tasks of a
meta-batch in one stacked or vmapped call, or in chunks). ``backend="higher"`` runs the same
algorithm with the optional ``higher`` library (a loop over tasks), kept as a checked alternative.
Both take differentiable inner steps of SGD, SGD with (Nesterov) momentum, Adam, AdamW, RMSprop or Adagrad
(``inner_optimizer``; AdamW on the functorch backend only: ``higher`` has no differentiable AdamW).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Literal, Optional, Sequence, Union

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from tasklight.data.batch import MetaBatch
from tasklight.core.engine import surrogate_objective
from tasklight.core.functional import merge_task_buffers, split_state
from tasklight.core.update_rules import UPDATE_RULES, make_update_rule
from tasklight.core.outer import DEFAULT_MAX_CONSECUTIVE_SKIPS, default_optimizer
from tasklight.meta.base import MetaLearner, MetaOutput


class MAMLModule(MetaLearner):
    """Model-Agnostic Meta-Learning.

    Every ``strategy`` of the engine applies, ``compiled`` included (functorch backend).

    Args (besides :class:`MetaLearner`'s):
        first_order: drop second-order terms (FOMAML).
        learn_inner_lr: Meta-SGD: learn one inner learning rate per parameter element
            (``inner_lr_granularity="element"``) or per parameter tensor (``"tensor"``), initialised
            to ``inner_lr`` and trained by the outer optimiser.
        backend: ``"functorch"`` (vmapped core) or ``"higher"``.
        inner_optimizer: the differentiable inner optimiser (:mod:`tasklight.core.update_rules`, each
            ``torch.optim``'s arithmetic, second order through its steps): ``"sgd"`` (with
            ``learn_inner_lr``: Meta-SGD), ``"momentum"`` (SGD with momentum, ``nesterov``), ``"adam"``,
            ``"adamw"``, ``"rmsprop"`` or ``"adagrad"``; the ``higher`` backend uses higher's versions.
        inner_optimizer_args: the inner optimiser's options (its ``torch.optim`` keyword arguments
            other than ``lr``), e.g. ``{momentum: 0.9, nesterov: true}``.
        adapt: the parameters the inner loop adapts (see :class:`MetaLearner`): ``["head"]`` gives
            ANIL (Raghu et al. 2020), ``["features"]`` BOIL (Oh et al. 2021) on ``Conv4``. With
            ``learn_inner_lr`` only the adapted parameters get inner learning rates.
    """

    engine_strategies = ("auto", "vmap", "stacked", "loop", "compiled")

    def __init__(self, net: nn.Module, loss: Union[str, nn.Module] = "mse", inner_steps: int = 1,
                 inner_lr: float = 0.01, first_order: bool = False, learn_inner_lr: bool = False,
                 inner_lr_granularity: Literal["element", "tensor"] = "element",
                 backend: Literal["functorch", "higher"] = "functorch",
                 inner_optimizer: Literal["sgd", "momentum", "adam", "adamw", "rmsprop", "adagrad"] = "sgd",
                 inner_optimizer_args: Optional[dict[str, Any]] = None, eval_inner_steps: Optional[int] = None,
                 extra_eval_steps: Sequence[int] = (0,), optimizer: OptimizerCallable = default_optimizer,
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
        if backend not in ("functorch", "higher"):
            raise ValueError(f"backend must be 'functorch' or 'higher', got {backend!r}")
        if backend == "higher" and (strategy != "auto" or chunk_size is not None):
            raise ValueError(f"strategy={strategy!r} / chunk_size={chunk_size!r} are settings of the core's engine; "
                             f"backend='higher' loops over tasks itself: leave them at their defaults")
        if inner_optimizer not in UPDATE_RULES:
            raise ValueError(f"inner_optimizer must be one of {sorted(UPDATE_RULES)}, got {inner_optimizer!r}")
        self.inner_optimizer_args = dict(inner_optimizer_args or {})
        make_update_rule(inner_optimizer, inner_lr, **self.inner_optimizer_args)  # bad options fail here
        if backend == "higher" and inner_optimizer == "adamw":
            raise ValueError("higher has no differentiable AdamW: use backend='functorch' for inner_optimizer='adamw'")
        if adapt is not None and backend == "higher":
            raise ValueError("adapt (a subset of adapted parameters) needs backend='functorch'")
        if learn_inner_lr and first_order and backend == "higher":
            raise ValueError("learn_inner_lr with first_order needs backend='functorch' (higher's first-order "
                             "mode cuts the graph to the inner learning rates)")
        self.first_order, self.backend, self.inner_optimizer = first_order, backend, inner_optimizer
        self.inner_lrs: Optional[nn.ParameterDict] = None
        if learn_inner_lr:
            if inner_lr_granularity not in ("element", "tensor"):
                raise ValueError(f"inner_lr_granularity must be 'element' or 'tensor', got {inner_lr_granularity!r}")
            self.inner_lrs = nn.ParameterDict({
                _key(n): nn.Parameter(torch.full_like(p, inner_lr) if inner_lr_granularity == "element"
                                      else torch.tensor(float(inner_lr)))
                for n, p in self.net.named_parameters() if self.core.is_adapted(n)})

    # ----------------------------------------------------------------- inner learning rates
    def lr_for_core(self, detach: bool = False):
        if self.inner_lrs is None:
            return self.inner_lr
        return {n: (self.inner_lrs[_key(n)].detach() if detach else self.inner_lrs[_key(n)])
                for n, _ in self.net.named_parameters() if self.core.is_adapted(n)}

    def update_rule(self, detach: bool = False):
        """The inner update rule of the core backend (:mod:`tasklight.core.update_rules`)."""
        lr = self.lr_for_core(detach=detach)
        return make_update_rule(self.inner_optimizer, lr, **self.inner_optimizer_args)

    # ----------------------------------------------------------------- core backend
    def _adapt(self, sx, sy, qx, qy, steps: int, first_order: bool, outer_graph: bool = True):
        params, buffers = split_state(self.net)
        if not outer_graph:  # evaluation: no meta-gradient needed
            params = {k: v.detach() for k, v in params.items()}
        res, out, qloss = self.core.adapt_tasks(params, buffers, sx, sy, qx, qy, steps=steps,
                                                lr=self.lr_for_core(detach=not outer_graph),
                                                first_order=first_order, update=self.update_rule(not outer_graph))
        if self.net.training and res.buffers:
            merge_task_buffers(self.net, res.buffers)
        return out, qloss, res.inner_losses

    def meta_objective(self, batch: MetaBatch) -> MetaOutput:
        if self.backend == "higher":
            return self._higher_objective(batch)
        params, buffers = split_state(self.net)
        objective, qloss, inner, task_buffers = self.core.meta_objective_tasks(
            params, buffers, batch.support_x, batch.support_y, batch.query_x, batch.query_y,
            steps=self.inner_steps, lr=self.lr_for_core(), first_order=self.first_order,
            update=self.update_rule())
        if self.net.training and task_buffers:
            merge_task_buffers(self.net, task_buffers)
        return MetaOutput(objective, qloss.detach(), inner)

    def adapt_and_predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                          steps: int) -> tuple[Tensor, Tensor]:
        if self.backend == "higher":
            out, _, inner = self._higher_tasks(support_x, support_y, query_x, None, steps, track=False)
            return out, inner
        out, _, inner = self._adapt(support_x, support_y, query_x, None, steps, first_order=True, outer_graph=False)
        return out, inner

    # ----------------------------------------------------------------- higher backend
    def _higher_tasks(self, sx, sy, qx, qy, steps: int, track: bool):
        """Adapt each task with ``higher`` (a Python loop over tasks); ``track`` keeps the graph."""
        import higher

        outs, qlosses, inners = [], [], []
        params = list(self.net.parameters())
        override = None
        if self.inner_lrs is not None:
            override = {"lr": [self.inner_lrs[_key(n)] for n, _ in self.net.named_parameters()]}
        for t in range(sx.shape[0]):
            groups = [{"params": [p]} for p in params]  # one group per tensor: per-tensor lr overrides
            inner_opt = _TORCH_OPTIMIZERS[self.inner_optimizer](groups, lr=self.inner_lr, **self.inner_optimizer_args)
            with higher.innerloop_ctx(self.net, inner_opt, copy_initial_weights=False,
                                      track_higher_grads=track) as (fmodel, diffopt):
                task_inner = []
                for _ in range(steps):
                    loss = self.checked_inner_loss(fmodel(sx[t]), sy[t])
                    task_inner.append(loss.detach())
                    diffopt.step(loss, override=override)
                out = fmodel(qx[t])
                outs.append(out if track else out.detach())
                if qy is not None:
                    ql = self.checked_loss(out, qy[t])
                    if not track:  # first order: the query gradient at the adapted weights
                        fast = list(fmodel.parameters())
                        ql_grads = torch.autograd.grad(ql, fast, allow_unused=True)
                        qlosses.append((ql.detach(), ql_grads))
                    else:
                        qlosses.append(ql)
                inners.append(torch.stack(task_inner) if task_inner else torch.zeros(0, device=sx.device))
        return torch.stack(outs), qlosses, torch.stack(inners)

    def _higher_objective(self, batch: MetaBatch) -> MetaOutput:
        T = batch.num_tasks
        out, qlosses, inner = self._higher_tasks(batch.support_x, batch.support_y, batch.query_x, batch.query_y,
                                                 self.inner_steps, track=not self.first_order)
        if not self.first_order:
            ql = torch.stack(qlosses)
            return MetaOutput(ql.mean(), ql.detach(), inner)
        # first order: apply the mean query gradient at the adapted weights to the initial weights
        params = list(self.net.parameters())
        mean_grads = [sum(g[i] if g[i] is not None else torch.zeros_like(p) for _, g in qlosses) / T
                      for i, p in enumerate(params)]
        surrogate = surrogate_objective(params, mean_grads)
        return MetaOutput(surrogate, torch.stack([q for q, _ in qlosses]), inner)


#: the torch.optim class higher makes differentiable for each inner optimiser (AdamW: none in higher)
_TORCH_OPTIMIZERS = {"sgd": torch.optim.SGD, "momentum": partial(torch.optim.SGD, momentum=0.9),
                     "adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop, "adagrad": torch.optim.Adagrad}


def _key(name: str) -> str:
    return name.replace(".", "__")
