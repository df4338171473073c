"""The functional core: inner loops on parameter dictionaries, vmapped over the tasks of a meta-batch.

Every learner in tasklight is a bilevel problem. This module runs the inner problem: a few gradient
steps of a task loss on parameter dictionaries with ``torch.func`` (``functional_call``, ``grad``),
and ``vmap`` over the task dimension so that T tasks cost one batched call, not a Python loop.

* second order: the inner gradients stay in the autograd graph, so ``loss.backward()`` on the query
  loss gives the exact MAML meta-gradient;
* first order: inner gradients are detached (FOMAML);
* learnable inner learning rates (Meta-SGD): ``lr`` may be a dict of tensors, one per parameter,
  which receive gradients through the inner updates;
* proximal inner problems (iMAML): ``proximal=lam`` adds ``lam/2 ||phi - theta||^2`` to the inner loss;
* buffers (BatchNorm running statistics) are given one copy per task, updated during adaptation,
  and their task average is returned so a learner can write it back into the module;
* which parameters adapt: ``adapt`` (a list of parameter names or module prefixes, e.g. ``["head"]``
  for ANIL, ``["features"]`` for BOIL) restricts the inner loop to those parameters; the others are
  held fixed during adaptation and still receive outer (meta-)gradients through the task losses.
"""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from tasklight.core.update_rules import SGD

ParamDict = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
LearningRate = Union[float, Tensor, Mapping[str, Tensor]]


def split_state(model: nn.Module) -> tuple[ParamDict, ParamDict]:
    """The module's trainable parameters and its floating-point buffers, as name -> tensor dicts."""
    params = {k: v for k, v in model.named_parameters() if v.requires_grad}
    buffers = dict(model.named_buffers())
    return params, buffers


def _batched_buffers(buffers: ParamDict, num_tasks: int) -> ParamDict:
    """One private copy of each buffer per task (task dimension first)."""
    return {k: v.detach().unsqueeze(0).expand(num_tasks, *v.shape).clone() for k, v in buffers.items()}


def merge_task_buffers(model: nn.Module, task_buffers: ParamDict) -> None:
    """Write the task-average of per-task buffers back into ``model`` (BatchNorm running statistics).

    Floating buffers are averaged over tasks; integer counters (``num_batches_tracked``) take the
    per-task value (they are equal across tasks).
    """
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name not in task_buffers:
                continue
            new = task_buffers[name]
            buf.copy_(new.float().mean(0).to(buf.dtype) if buf.is_floating_point() else new[0])


def match_names(names: Iterable[str], patterns: Sequence[str], setting: str = "adapt") -> frozenset[str]:
    """The names selected by ``patterns``: a pattern selects a name equal to it, the parameters of
    a module it names (``"head"`` selects ``head.weight`` and ``head.bias``), or names matching it
    as a glob (``"*.bias"``). A pattern that selects nothing is an error naming ``setting``.
    """
    names = list(names)
    if isinstance(patterns, str):
        patterns = [patterns]
    chosen: set[str] = set()
    for pat in patterns:
        hit = {n for n in names if n == pat or n.startswith(pat + ".") or fnmatchcase(n, pat)}
        if not hit:
            raise ValueError(f"{setting}={list(patterns)!r}: {pat!r} matches no parameter of the network; "
                             f"its parameters are {names}")
        chosen |= hit
    return frozenset(chosen)


@dataclass
class AdaptResult:
    """What an inner loop returns (all with the task dimension first when vmapped)."""

    params: ParamDict  # adapted parameters
    buffers: ParamDict  # buffers after adaptation
    inner_losses: Tensor  # [steps] (or [T, steps]): the inner loss before each step


class FunctionalLearner:
    """Inner loops of one model and one loss, on parameter dicts.

    Args:
        model: the network; it is only used as a stateless template by ``functional_call``.
        loss_fn: ``loss_fn(prediction, target) -> scalar`` (mean over examples): the query (outer) loss,
            and the inner loss unless ``inner_loss_fn`` is given.
        inner_loss_fn: the loss the inner loop descends on the support set (default: ``loss_fn``).
        adapt: the parameters the inner loop adapts (names, module prefixes or globs, see
            :func:`match_names`); ``None`` adapts all. The others keep their value during
            adaptation and stay in the graph, so they receive outer gradients.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, adapt: Optional[Sequence[str]] = None,
                 strategy: str = "auto", chunk_size: Optional[int] = None,
                 compile_cache_dir: Optional[str] = None, inner_loss_fn: Optional[LossFn] = None) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.inner_loss_fn = loss_fn if inner_loss_fn is None else inner_loss_fn
        self.adapted: Optional[frozenset[str]] = None
        if adapt is not None:
            self.adapted = match_names((n for n, p in model.named_parameters() if p.requires_grad), adapt)
        self.configure_engine(strategy, chunk_size, compile_cache_dir)

    def configure_engine(self, strategy: str = "auto", chunk_size: Optional[int] = None,
                         compile_cache_dir: Optional[str] = None) -> "Engine":
        """How meta-batches run (see :mod:`tasklight.core.engine`): ``strategy``, ``chunk_size``
        (tasks per chunk) and ``compile_cache_dir``."""
        from tasklight.core.engine import Engine

        self.engine = Engine(self, strategy, chunk_size, compile_cache_dir)
        return self.engine

    def is_adapted(self, name: str) -> bool:
        """Whether the inner loop adapts the parameter ``name``."""
        return self.adapted is None or name in self.adapted

    # ----------------------------------------------------------------- single task
    def forward(self, params: ParamDict, buffers: ParamDict, x: Tensor) -> Tensor:
        return functional_call(self.model, (params, buffers), (x,), strict=False)

    def task_loss(self, params: ParamDict, buffers: ParamDict, x: Tensor, y: Tensor) -> Tensor:
        """The query (outer) loss."""
        return self.loss_fn(self.forward(params, buffers, x), y)

    def inner_task_loss(self, params: ParamDict, buffers: ParamDict, x: Tensor, y: Tensor) -> Tensor:
        """The loss the inner loop descends (``inner_loss_fn``)."""
        return self.inner_loss_fn(self.forward(params, buffers, x), y)

    def adapt(
        self,
        params: ParamDict,
        buffers: ParamDict,
        x: Tensor,
        y: Tensor,
        *,
        steps: int,
        lr: LearningRate,
        first_order: bool = False,
        proximal: float = 0.0,
        anchor: Optional[ParamDict] = None,
        update=None,
    ) -> AdaptResult:
        """``steps`` gradient steps on the inner loss of one task (vmappable).

        With ``proximal > 0`` the inner loss is ``inner_task_loss + proximal/2 * ||p - anchor||^2`` with
        ``anchor`` (default: the starting ``params``) treated as a constant. ``update`` is an
        update rule of :mod:`tasklight.core.update_rules` (default: ``SGD(lr)``).
        """
        rule = update if update is not None else SGD(lr)
        if proximal and anchor is None:
            anchor = {k: v.detach() for k, v in params.items()}
        names = [k for k in params if self.is_adapted(k)]
        fixed = {k: v for k, v in params.items() if k not in set(names)}

        def inner_loss(p: ParamDict, bufs: ParamDict) -> tuple[Tensor, Tensor]:
            task = self.inner_task_loss({**fixed, **p}, bufs, x, y)
            total = task
            if proximal:
                total = total + 0.5 * proximal * sum(((p[k] - anchor[k]) ** 2).sum() for k in p)
            return total, task

        losses = []
        state = rule.init({k: params[k] for k in names})
        for _ in range(steps):
            grads, task = grad(inner_loss, has_aux=True)({k: params[k] for k in names}, buffers)
            losses.append(task.detach())
            if first_order:
                grads = {k: g.detach() for k, g in grads.items()}
            new, state = rule.step({k: params[k] for k in names}, grads, state)
            params = {**params, **new}
        inner = torch.stack(losses) if losses else torch.zeros(0, device=x.device)
        return AdaptResult(params, buffers, inner)

    # ----------------------------------------------------------------- a meta-batch, by the engine
    def adapt_tasks(self, params: ParamDict, buffers: ParamDict, support_x: Tensor, support_y: Tensor,
                    query_x: Optional[Tensor] = None, query_y: Optional[Tensor] = None,
                    **adapt_kwargs) -> tuple[AdaptResult, Optional[Tensor], Optional[Tensor]]:
        """Adapt to every task of a meta-batch, by the engine's strategy (see :mod:`tasklight.core.engine`).

        ``params`` are shared by all tasks (unbatched) and stay in the autograd graph: a backward
        pass through the returned query losses gives the meta-gradient. Returns the per-task
        adaptation result (leading dim T), the query predictions ``[T, Q, ...]`` (or None) and the
        per-task query losses ``[T]`` (or None).
        """
        return self.engine.adapt_tasks(params, buffers, support_x, support_y, query_x, query_y, **adapt_kwargs)

    def meta_objective_tasks(self, params: ParamDict, buffers: ParamDict, support_x: Tensor, support_y: Tensor,
                             query_x: Tensor, query_y: Tensor, outer: Optional[Sequence[Tensor]] = None,
                             **adapt_kwargs) -> tuple[Tensor, Tensor, Tensor, ParamDict]:
        """The mean query loss of a meta-batch as an objective for one backward (chunked: a surrogate of
        the accumulated meta-gradient). Returns ``(objective, query_losses, inner_losses, task_buffers)``."""
        return self.engine.meta_objective(params, buffers, support_x, support_y, query_x, query_y, outer=outer,
                                          **adapt_kwargs)

    def _vmap_adapt_tasks(
        self,
        params: ParamDict,
        buffers: ParamDict,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Optional[Tensor] = None,
        query_y: Optional[Tensor] = None,
        **adapt_kwargs,
    ) -> tuple[AdaptResult, Optional[Tensor], Optional[Tensor]]:
        """Adapt to every task of a meta-batch in one vmapped call.

        ``params`` are shared by all tasks (unbatched) and stay in the autograd graph: a backward
        pass through the returned query losses gives the meta-gradient. ``task_params`` (a keyword)
        holds parameters that already have a task dimension (a previous step's adapted ones) and
        override ``params``; ``buffers_per_task=True`` says ``buffers`` have one too. Returns the
        per-task adaptation result (leading dim T), the query predictions ``[T, Q, ...]`` (or None)
        and the per-task query losses ``[T]`` (or None).
        """
        num_tasks = support_x.shape[0]
        task_params = adapt_kwargs.pop("task_params", None) or {}
        if adapt_kwargs.pop("buffers_per_task", False):
            task_buffers = {k: v.clone() for k, v in buffers.items()}
        else:
            task_buffers = _batched_buffers(buffers, num_tasks)
        with_query = query_x is not None
        with_loss = query_y is not None

        def one_task(tp, bufs, sx, sy, qx, qy):
            res = self.adapt({**params, **tp}, bufs, sx, sy, **adapt_kwargs)
            out = self.forward(res.params, res.buffers, qx) if with_query else qx.new_zeros(())
            loss = self.loss_fn(out, qy) if with_loss else qx.new_zeros(())
            return res.params, res.buffers, res.inner_losses, out, loss

        qx = query_x if with_query else support_x[:, :0]
        qy = query_y if with_loss else support_y[:, :0]
        p, b, inner, out, loss = vmap(one_task, randomness="different")(task_params, task_buffers, support_x,
                                                                        support_y, qx, qy)
        return AdaptResult(p, b, inner), (out if with_query else None), (loss if with_loss else None)


def check_finite_inner(inner_losses: Tensor, query_losses: Optional[Tensor] = None) -> Optional[str]:
    """Return a description of the first non-finite inner/query loss, or None if all are finite."""
    if not torch.isfinite(inner_losses).all():
        bad = (~torch.isfinite(inner_losses)).nonzero()[0].tolist()
        where = f"task {bad[0]}, inner step {bad[1]}" if len(bad) == 2 else f"inner step {bad[0]}"
        return f"non-finite inner loss at {where}"
    if query_losses is not None and not torch.isfinite(query_losses).all():
        bad = int((~torch.isfinite(query_losses)).nonzero()[0, 0])
        return f"non-finite query loss for task {bad}"
    return None
