"""Metric-based baselines: Prototypical Networks (Snell et al. 2017) and ProtoMAML (Triantafillou et al. 2020).

* Prototypical Networks embed the support images, average each class into a prototype ``c_k``
  and classify a query ``x`` by ``softmax(-||f(x) - c_k||^2)``. There is no inner loop; the
  embedding is trained by the query cross-entropy.
* ProtoMAML is MAML whose linear head is initialised, per task, from the prototypes:
  ``-||f(x) - c_k||^2 = 2 c_k . f(x) - ||c_k||^2 - ||f(x)||^2``, the last term the same for every
  class, so ``W_k = 2 c_k`` and ``b_k = -||c_k||^2`` start the head exactly at the ProtoNet
  classifier. The embedding and that head are then adapted by the core's inner loop; the head's
  dependence on the embedding stays in the graph, so the meta-gradient flows through the
  prototypes too. ``first_order`` drops the second-order terms of the inner steps as FOMAML does;
  the path through the prototype initialisation (first derivatives only) is kept.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.func import vmap

from tasklight.core.functional import (FunctionalLearner, _batched_buffers, match_names, merge_task_buffers,
                                       split_state)
from tasklight.data.batch import MetaBatch
from tasklight.core.outer import DEFAULT_MAX_CONSECUTIVE_SKIPS, default_optimizer
from tasklight.meta.base import MetaLearner, MetaOutput


def prototypes(embeddings: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """Class means ``[n_way, D]`` of ``embeddings [S, D]`` with integer ``labels [S]`` in ``0..n_way-1``."""
    onehot = F.one_hot(labels, n_way).to(embeddings.dtype)  # [S, N]
    return onehot.t() @ embeddings / onehot.sum(0)[:, None]


def squared_distance_logits(queries: Tensor, protos: Tensor) -> Tensor:
    """``-||q - c_k||^2`` for ``queries [Q, D]`` and ``protos [N, D]``: logits ``[Q, N]``."""
    return -((queries[:, None, :] - protos[None, :, :]) ** 2).sum(-1)


def episode_ways(support_y: Tensor) -> int:
    """The number of classes of a batch of classification episodes, checking each task has every class."""
    if support_y.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError("prototype learners classify: support_y must hold integer class labels 0..n_way-1")
    n_way = int(support_y.max()) + 1
    counts = F.one_hot(support_y.reshape(support_y.shape[0], -1), n_way).sum(1)  # [T, N]
    if (counts == 0).any():
        t, k = (counts == 0).nonzero()[0].tolist()
        raise ValueError(f"task {t} has no support example of class {k} (labels must be 0..n_way-1, each class "
                         f"present in the support set) so its prototype is undefined")
    return n_way


def flat(z: Tensor) -> Tensor:
    """A network's output as one embedding vector per example ``[B, D]``."""
    return z.reshape(z.shape[0], -1)


def embed_tasks(learner: MetaLearner, support_x: Tensor, query_x: Tensor) -> tuple[Tensor, Tensor]:
    """Flattened embeddings ``[T, S, D]`` and ``[T, Q, D]`` of ``learner.net`` on each task's support and
    query examples, one vmapped forward per task (BatchNorm batch statistics per task; in training the
    task-average of the running statistics is written back)."""
    params, buffers = split_state(learner.net)
    core = learner.core

    def one_task(bufs, sx, qx):
        return flat(core.forward(params, bufs, sx)), flat(core.forward(params, bufs, qx)), bufs

    support, query, new_bufs = vmap(one_task, randomness="different")(
        _batched_buffers(buffers, support_x.shape[0]), support_x, query_x)
    if learner.net.training and new_bufs:
        merge_task_buffers(learner.net, new_bufs)
    return support, query


class ProtoNetModule(MetaLearner):
    """Prototypical Networks.

    Args:
        net: the embedding network (e.g. ``Conv4`` with ``out_features: 0``, the 64-dim feature of
            the 4-block net); its output is flattened per example.
        optimizer, lr_scheduler, clip_grad_norm, nonfinite: as for :class:`MetaLearner`.

    There is no inner loop, so ``predict_episode``'s ``steps`` is ignored and metrics are logged
    as ``@0``.
    """

    net_is_classifier = False  # ``net`` is an embedding: any number of classes per episode
    engine_strategies = ("auto", "vmap")  # embeddings of every task in one vmapped forward
    engine_chunks = False

    def __init__(self, net: nn.Module, optimizer: OptimizerCallable = default_optimizer,
                 lr_scheduler: Optional[LRSchedulerCallable] = None, clip_grad_norm: Optional[float] = None,
                 nonfinite: Literal["raise", "skip"] = "raise",
                 max_consecutive_skips: int = DEFAULT_MAX_CONSECUTIVE_SKIPS,
                 strategy: Literal["auto", "vmap", "stacked", "loop", "compiled"] = "auto",
                 chunk_size: Optional[int] = None, compile_cache_dir: Optional[str] = None) -> None:
        super().__init__(net, "cross_entropy", 0, 0.0, 0, (0,), optimizer, lr_scheduler, clip_grad_norm, nonfinite,
                         max_consecutive_skips,
                         strategy=strategy, chunk_size=chunk_size, compile_cache_dir=compile_cache_dir)

    def logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Query logits ``[T, Q, N]`` of episodes with the task dimension first."""
        n_way = episode_ways(support_y)
        support, query = embed_tasks(self, support_x, query_x)
        return vmap(lambda s, sy, q: squared_distance_logits(q, prototypes(s, sy, n_way)))(support, support_y, query)

    def meta_objective(self, batch: MetaBatch) -> MetaOutput:
        logits = self.logits(batch.support_x, batch.support_y, batch.query_x)
        qloss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten(), reduction="none")
        qloss = qloss.view(batch.query_y.shape).mean(1)
        return MetaOutput(qloss.mean(), qloss.detach(), qloss.new_zeros(batch.num_tasks, 0))

    def adapt_and_predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                          steps: int) -> tuple[Tensor, Tensor]:
        return self.logits(support_x, support_y, query_x), support_x.new_zeros(support_x.shape[0], 0)


class _ProtoHead(nn.Module):
    """``body`` followed by a linear head whose weights are given per call (``functional_call``)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.register_buffer("head_weight", torch.empty(0), persistent=False)
        self.register_buffer("head_bias", torch.empty(0), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(flat(self.body(x)), self.head_weight, self.head_bias)


class ProtoMAMLModule(MetaLearner):
    """ProtoMAML: MAML with the linear head initialised from the support prototypes in every task.

    Args (besides :class:`MetaLearner`'s):
        net: the embedding network (e.g. ``Conv4`` with ``out_features: 0``).
        first_order: drop second-order terms (fo-ProtoMAML).
        adapt: which parameters the inner loop adapts: names of ``net``'s parameters (module
            prefixes or globs) and/or ``"head"`` (the prototype head); ``None`` adapts all,
            ``["head"]`` the head alone.
    """

    net_is_classifier = False  # ``net`` is an embedding; the head is built from the prototypes
    engine_strategies = ("auto", "vmap")  # body + prototype head: vmapped inner loop
    engine_chunks = False

    def __init__(self, net: nn.Module, inner_steps: int = 1, inner_lr: float = 0.1, first_order: bool = False,
                 eval_inner_steps: Optional[int] = None, extra_eval_steps: Sequence[int] = (0,),
                 optimizer: OptimizerCallable = default_optimizer, lr_scheduler: Optional[LRSchedulerCallable] = None,
                 clip_grad_norm: Optional[float] = None, nonfinite: Literal["raise", "skip"] = "raise",
                 max_consecutive_skips: int = DEFAULT_MAX_CONSECUTIVE_SKIPS,
                 adapt: Optional[Sequence[str]] = None,
                 strategy: Literal["auto", "vmap", "stacked", "loop", "compiled"] = "auto",
                 chunk_size: Optional[int] = None, compile_cache_dir: Optional[str] = None) -> None:
        super().__init__(net, "cross_entropy", inner_steps, inner_lr, eval_inner_steps, extra_eval_steps,
                         optimizer, lr_scheduler, clip_grad_norm, nonfinite, max_consecutive_skips,
                         strategy=strategy, chunk_size=chunk_size, compile_cache_dir=compile_cache_dir)
        self.first_order = first_order
        # the core runs on body + prototype head; it is kept off the module tree (the body is self.net)
        self.head_core = FunctionalLearner(_ProtoHead(self.net), self.checked_loss)
        if adapt is not None:
            if isinstance(adapt, str):
                adapt = [adapt]
            body = match_names((n for n, p in self.net.named_parameters() if p.requires_grad),
                               [a for a in adapt if a != "head"], setting="adapt") if set(adapt) - {"head"} else set()
            head = {"head_weight", "head_bias"} if "head" in adapt else set()
            self.head_core.adapted = frozenset({f"body.{n}" for n in body} | head)

    def _tasks(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Optional[Tensor], steps: int, first_order: bool,
               outer_graph: bool):
        n_way = episode_ways(sy)
        params, buffers = split_state(self.net)
        if not outer_graph:
            params = {k: v.detach() for k, v in params.items()}
        core = self.head_core
        body = {f"body.{k}": v for k, v in params.items()}

        with_loss = qy is not None

        def one_task(bufs, sx, sy, qx, qy):
            bbufs = {f"body.{k}": v for k, v in bufs.items()}
            protos = prototypes(flat(self.core.forward(params, bufs, sx)), sy, n_way)
            start = {**body, "head_weight": 2 * protos, "head_bias": -(protos ** 2).sum(-1)}
            res = core.adapt(start, bbufs, sx, sy, steps=steps, lr=self.inner_lr, first_order=first_order)
            out = core.forward(res.params, res.buffers, qx)
            loss = self.checked_loss(out, qy) if with_loss else out.new_zeros(())
            return out, loss, res.inner_losses, {k[len("body."):]: v for k, v in res.buffers.items()}

        out, loss, inner, new_bufs = vmap(one_task, randomness="different")(
            _batched_buffers(buffers, sx.shape[0]), sx, sy, qx, qy if with_loss else sy[:, :0])
        if self.net.training and new_bufs:
            merge_task_buffers(self.net, new_bufs)
        return out, loss, inner

    def meta_objective(self, batch: MetaBatch) -> MetaOutput:
        _, qloss, inner = self._tasks(batch.support_x, batch.support_y, batch.query_x, batch.query_y,
                                      self.inner_steps, self.first_order, outer_graph=True)
        return MetaOutput(qloss.mean(), qloss.detach(), inner)

    def adapt_and_predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                          steps: int) -> tuple[Tensor, Tensor]:
        out, _, inner = self._tasks(support_x, support_y, query_x, None, steps, True, outer_graph=False)
        return out, inner
