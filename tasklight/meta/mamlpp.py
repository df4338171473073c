"""MAML++ (Antoniou, Edwards & Storkey 2019, "How to train your MAML").

MAML with the paper's five changes, each a switch here:

* **multi-step loss** (MSL): the meta-objective is ``sum_i w_i L_query(phi_i)`` over the inner
  steps ``i``; the weights start uniform and are annealed over ``msl_epochs`` epochs towards the
  last step (non-final weights decay linearly to ``0.03 / steps``), after which only the final
  step's loss counts;
* **per-step BatchNorm** (BNWB + BNRS): every BatchNorm layer gets one weight/bias pair and one set
  of running statistics per inner step (used at evaluation when the network tracks running
  statistics); BatchNorm parameters are trained by the outer loop only, as in the paper;
* **learned per-layer per-step inner learning rates** (LSLR): one learning rate per parameter
  tensor and inner step, initialised to ``inner_lr`` and trained by the outer optimiser;
* **derivative-order annealing** (DA): first-order meta-gradients for the first
  ``first_order_epochs`` epochs, second order afterwards;
* **cosine-annealed outer learning rate** (CA): from the optimiser's lr down to ``min_outer_lr``
  over the run's meta-steps (unless an ``lr_scheduler`` is given).

Each inner step is one call of the core's engine (``steps=1``, every ``strategy``) with that
step's BatchNorm parameters and learning rates on the previous step's per-task parameters; the
multi-step objective goes through the engine's chunking (``chunk_size``) like MAML's. Steps past the trained count (``eval_inner_steps > inner_steps``)
reuse the last step's BatchNorm parameters and learning rates.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from tasklight.core.functional import _batched_buffers, match_names, merge_task_buffers, split_state
from tasklight.data.batch import MetaBatch
from tasklight.core.outer import DEFAULT_MAX_CONSECUTIVE_SKIPS, default_optimizer
from tasklight.meta.base import MetaLearner, MetaOutput
from tasklight.core.checks import check_int, check_real


def msl_weights(steps: int, epoch: int, msl_epochs: int) -> Tensor:
    """The paper's per-step loss weights at ``epoch``: uniform at epoch 0, annealed linearly towards
    the last step over ``msl_epochs`` epochs (non-final weights floor at ``0.03 / steps``); from
    ``msl_epochs`` on, only the last step counts. The weights sum to 1."""
    if steps < 1:
        raise ValueError(f"the multi-step loss needs inner_steps >= 1, got {steps}")
    w = torch.zeros(steps, dtype=torch.float64)
    if msl_epochs <= 0 or epoch >= msl_epochs:
        w[-1] = 1.0
        return w
    decay = 1.0 / steps / msl_epochs
    floor = 0.03 / steps
    w[:-1] = max(1.0 / steps - epoch * decay, floor)
    w[-1] = min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return w / w.sum()


def _is_batchnorm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def _key(name: str) -> str:
    return name.replace(".", "__")


class MAMLPlusPlusModule(MetaLearner):
    """MAML++.

    Args (besides :class:`MetaLearner`'s):
        inner_steps, inner_lr: the paper uses 5 steps and an initial inner learning rate of 0.1.
        multi_step_loss, msl_epochs: the multi-step loss and the epochs over which its weights are
            annealed (an epoch is the DataModule's ``batches_per_epoch`` meta-steps).
        per_step_bn: per-step BatchNorm weights, biases and running statistics.
        learn_inner_lr: learned per-layer (per parameter tensor) per-step inner learning rates.
        first_order_epochs: epochs of first-order meta-gradients before switching to second order
            (0: second order throughout).
        cosine_lr, min_outer_lr: cosine-anneal the outer learning rate over the run's meta-steps
            (``trainer.max_steps`` or the estimated total) down to ``min_outer_lr``; ignored when an
            ``lr_scheduler`` is given.
        adapt: which parameters the inner loop adapts (see :class:`MetaLearner`); BatchNorm
            parameters never are when ``per_step_bn`` is on.
    """

    def __init__(self, net: nn.Module, loss: Union[str, nn.Module] = "cross_entropy", inner_steps: int = 5,
                 inner_lr: float = 0.1, multi_step_loss: bool = True, msl_epochs: int = 10,
                 per_step_bn: bool = True, learn_inner_lr: bool = True, first_order_epochs: int = 0,
                 cosine_lr: bool = True, min_outer_lr: float = 1e-5, eval_inner_steps: Optional[int] = None,
                 extra_eval_steps: Sequence[int] = (0,), optimizer: OptimizerCallable = default_optimizer,
                 lr_scheduler: Optional[LRSchedulerCallable] = None, clip_grad_norm: Optional[float] = None,
                 nonfinite: Literal["raise", "skip"] = "raise",
                 max_consecutive_skips: int = DEFAULT_MAX_CONSECUTIVE_SKIPS,
                 adapt: Optional[Sequence[str]] = None,
                 strategy: Literal["auto", "vmap", "stacked", "loop", "compiled"] = "auto",
                 chunk_size: Optional[int] = None, compile_cache_dir: Optional[str] = None,
                 inner_loss: Union[None, str, nn.Module] = None) -> None:
        super().__init__(net, loss, inner_steps, inner_lr, eval_inner_steps, extra_eval_steps, optimizer,
                         lr_scheduler, clip_grad_norm, nonfinite, max_consecutive_skips,
                         strategy=strategy, chunk_size=chunk_size, compile_cache_dir=compile_cache_dir,
                         inner_loss=inner_loss)
        if inner_steps < 1:
            raise ValueError(f"MAML++ needs inner_steps >= 1 (per-step parameters), got {inner_steps}")
        check_int("MAMLPlusPlusModule", "msl_epochs", msl_epochs, 0, "epochs of multi-step-loss annealing")
        check_int("MAMLPlusPlusModule", "first_order_epochs", first_order_epochs, 0)
        check_real("MAMLPlusPlusModule", "min_outer_lr", min_outer_lr, 0.0, what="the cosine schedule's floor")
        if msl_epochs < 0 or first_order_epochs < 0 or min_outer_lr < 0:
            raise ValueError(f"msl_epochs, first_order_epochs and min_outer_lr must be >= 0, got {msl_epochs}, "
                             f"{first_order_epochs}, {min_outer_lr}")
        self.multi_step_loss, self.msl_epochs = multi_step_loss, msl_epochs
        self.first_order_epochs, self.cosine_lr, self.min_outer_lr = first_order_epochs, cosine_lr, min_outer_lr
        self.per_step_bn = per_step_bn

        # per-step BatchNorm: the net's own affine parameters are replaced by [steps, C] copies
        self.bn_params = nn.ParameterDict()
        self.bn_stats = nn.Module()  # per-step running statistics, [steps, C] buffers
        self._bn_param_names: list[str] = []
        self._bn_stat_names: list[str] = []
        if per_step_bn:
            for mname, m in self.net.named_modules():
                if not _is_batchnorm(m):
                    continue
                for pname in ("weight", "bias"):
                    p = getattr(m, pname, None)
                    if p is not None:
                        full = f"{mname}.{pname}"
                        self.bn_params[_key(full)] = nn.Parameter(p.detach().unsqueeze(0).repeat(inner_steps, 1))
                        p.requires_grad_(False)  # trained through its per-step copies
                        self._bn_param_names.append(full)
                for bname in ("running_mean", "running_var"):
                    b = getattr(m, bname, None)
                    if b is not None:
                        full = f"{mname}.{bname}"
                        self.bn_stats.register_buffer(_key(full), b.detach().unsqueeze(0).repeat(inner_steps, 1))
                        self._bn_stat_names.append(full)
        trainable = [n for n, p in self.net.named_parameters() if p.requires_grad]
        self.core.adapted = match_names(trainable, adapt) if adapt is not None else frozenset(trainable)

        self.inner_lrs: Optional[nn.ParameterDict] = None
        if learn_inner_lr:
            self.inner_lrs = nn.ParameterDict({_key(n): nn.Parameter(torch.full((inner_steps,), float(inner_lr)))
                                               for n in trainable if n in self.core.adapted})

    # ----------------------------------------------------------------- per-step pieces
    def _step(self, i: int) -> int:
        return min(i, self.inner_steps - 1)

    def _lr(self, j: int, detach: bool):
        if self.inner_lrs is None:
            return self.inner_lr
        return {n: (v[j].detach() if detach else v[j]) for n, v in
                ((n, self.inner_lrs[_key(n)]) for n in self.core.adapted)}

    def _bn(self, j: int, detach: bool) -> dict[str, Tensor]:
        return {n: (self.bn_params[_key(n)][j].detach() if detach else self.bn_params[_key(n)][j])
                for n in self._bn_param_names}

    def first_order_now(self) -> bool:
        """Derivative-order annealing: first order during the first ``first_order_epochs`` epochs."""
        return self.current_epoch < self.first_order_epochs

    def loss_weights(self) -> Tensor:
        """The multi-step loss weights of the current epoch (one-hot on the last step without MSL)."""
        return msl_weights(self.inner_steps, self.current_epoch if self.multi_step_loss else 0,
                           self.msl_epochs if self.multi_step_loss else 0)

    # ----------------------------------------------------------------- the inner loop
    def _tasks(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Optional[Tensor], steps: int, first_order: bool,
               outer_graph: bool, all_steps: bool):
        """Adapt every task; returns query outputs [T, Q, ...] after ``steps`` steps, the query loss
        after each step [T, steps] (``all_steps``) or after the last [T, 1], inner losses, and the
        per-task buffers and per-step statistics (for :meth:`_merge`).

        Each inner step is one engine call (``steps=1``) with that step's BatchNorm parameters,
        statistics and learning rates, on the previous step's per-task parameters."""
        params, buffers = split_state(self.net)
        if not outer_graph:
            params = {k: v.detach() for k, v in params.items()}
        step_stats = {n: getattr(self.bn_stats, _key(n)) for n in self._bn_stat_names}
        buffers = {k: v for k, v in buffers.items() if k not in step_stats}
        T, core, with_loss = sx.shape[0], self.core, qy is not None
        bufs = _batched_buffers(buffers, T)
        stats = _batched_buffers(step_stats, T)  # [T, steps, C]
        task_params: dict[str, Tensor] = {}
        inner, qlosses, out = [], [], None
        for i in range(max(steps, 1)):
            j = self._step(i)
            query = steps == 0 or all_steps or i == steps - 1
            st = {n: stats[n][:, j] for n in stats}
            res, o, ql = core.adapt_tasks({**params, **self._bn(j, not outer_graph)}, {**bufs, **st}, sx, sy,
                                          qx if query else None, qy if (query and with_loss) else None,
                                          steps=min(steps, 1), lr=self._lr(j, not outer_graph),
                                          first_order=first_order, task_params=task_params, buffers_per_task=True)
            task_params = {k: res.params[k] for k in params}
            bufs = {k: res.buffers[k] for k in bufs}
            if stats:
                stats = {n: v.clone() for n, v in stats.items()}
                for n in stats:
                    stats[n][:, j] = res.buffers[n]
            if steps:
                inner.append(res.inner_losses[:, 0])
            if query:
                out = o
                if with_loss:
                    qlosses.append(ql)
        inner_t = torch.stack(inner, 1) if inner else sx.new_zeros(T, 0)
        q = torch.stack(qlosses, 1) if qlosses else sx.new_zeros(T, 0)
        return out, q, inner_t, bufs, stats

    def _merge(self, new_bufs: dict, new_stats: dict) -> None:
        """Per-task buffers and per-step statistics written back as their task average (training)."""
        if self.net.training:
            if new_bufs:
                merge_task_buffers(self.net, new_bufs)
            if new_stats:
                merge_task_buffers(self.bn_stats, {_key(n): v for n, v in new_stats.items()})

    def meta_objective(self, batch: MetaBatch) -> MetaOutput:
        w = self.loss_weights()
        use_all = bool((w[:-1] > 0).any())
        first_order = self.first_order_now()

        def chunk(sl: slice):
            _, q, inner, bufs, stats = self._tasks(batch.support_x[sl], batch.support_y[sl], batch.query_x[sl],
                                                   batch.query_y[sl], self.inner_steps, first_order,
                                                   outer_graph=True, all_steps=use_all)
            part = (q.sum(0) * w.to(q)).sum() if use_all else q[:, -1].sum()
            return part, (q[:, -1], inner, bufs, stats)

        outer = [p for p in self.parameters() if p.requires_grad]
        objective, parts = self.core.engine.chunked_objective(batch.num_tasks, chunk, outer)
        qlast, inner, bufs, stats = zip(*parts)
        self._merge({k: torch.cat([b[k] for b in bufs]) for k in bufs[0]},
                    {k: torch.cat([s[k] for s in stats]) for k in stats[0]})
        return MetaOutput(objective, torch.cat(qlast).detach(), torch.cat(inner))

    def adapt_and_predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                          steps: int) -> tuple[Tensor, Tensor]:
        out, _, inner, bufs, stats = self._tasks(support_x, support_y, query_x, None, steps, True, outer_graph=False,
                                                 all_steps=False)
        self._merge(bufs, stats)
        return out, inner

    # ----------------------------------------------------------------- outer learning rate
    def configure_optimizers(self):
        if self.scheduler_factory is not None or not self.cosine_lr:
            return super().configure_optimizers()
        opt = self.optimizer_factory(self.parameters())
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        if total is None:
            est = self.trainer.estimated_stepping_batches
            if est is None or est == float("inf"):
                raise ValueError("cosine_lr needs a finite run: set trainer.max_steps (or max_epochs), or pass "
                                 "cosine_lr=false / an lr_scheduler")
            total = int(est)
        sch = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(int(total), 1), eta_min=self.min_outer_lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sch, "interval": "step"}}
