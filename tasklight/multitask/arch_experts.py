"""Expert and branching architectures: CGC, PLE, DSelect-k, Learning to Branch.

Each is an :class:`~tasklight.multitask.architectures.Architecture` (the same interface as MMoE);
experts are copies of the trunk (or of its stages, :func:`trunk_stages`), gates read the flattened
input of their level, and every example is routed through its own task's gate.

* :class:`CGC` -- customised gate control (Tang et al. 2020, the one-level PLE): shared experts and
  ``num_task_experts`` experts per task; task t's softmax gate mixes the shared experts and its own.
* :class:`PLE` -- progressive layered extraction (Tang et al. 2020): CGC at every stage of the
  trunk, each task's mixture the input of its next stage. As in LibMTL, the shared experts of a
  stage read each task's own representation, and the paper's shared gate (which mixes every task's
  experts on one example) is left out: here an example belongs to one task and has only that task's
  path.
* :class:`DSelectK` -- DSelect-k (Hazimeh et al. 2021): per task ``num_nonzeros`` differentiable
  selectors, each a product of smooth-step functions of ``ceil(log2 E)`` binary-code logits, mixed
  by softmax weights; the entropy regulariser of the selectors (and, when ``E`` is not a power of 2,
  the penalty on the mass given to codes without an expert) is the architecture's penalty.
* :class:`LTB` -- learning to branch (Guo et al. 2020): one copy of every trunk stage per task (the
  tree's nodes); node t of stage j reads a Gumbel-softmax mixture (temperature ``temperature``) of
  the nodes of stage j-1, with learned branching logits; evaluation takes each node's most likely
  parent (the discrete tree).
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasklight.multitask.architectures import (ARCHITECTURES, Architecture, _example_input, _params, uniform_gates,
                                               _stage_shapes, fresh_copies, trunk_stages)


def _mix(gate: Tensor, experts: Tensor) -> Tensor:
    """``sum_e gate[n, e] * experts[n, e, ...]``."""
    return torch.einsum("ne,ne...->n...", gate, experts)


def _task_outputs(heads: nn.ModuleList, rows, reps: dict[int, Tensor], n: int):
    """The representation ``[n, d]`` of every example (task t's on the rows ``rows[t]``; the rows of
    different tasks are disjoint) and each task's head on it."""
    first = next(iter(reps.values()))
    rep = first.new_zeros(n, first.shape[1])
    for t, r in reps.items():
        rep = rep.index_put((rows[t],), r)
    return [heads[t](rep[r]) if r is not None else None for t, r in enumerate(rows)], rep


def _task_counts(who: str, counts: Union[int, Sequence[int]], T: int) -> list[int]:
    """``num_task_experts`` as one count per task (a number: the same for every task)."""
    if isinstance(counts, int):
        return [counts] * T
    counts = list(counts)
    if len(counts) != T:
        raise ValueError(f"{who} got num_task_experts={counts} for {T} tasks: give one count per task, or one number")
    return counts


def _check_experts(who: str, num_shared: int, num_task: Union[int, Sequence[int]]) -> None:
    _positive(who, num_shared_experts=num_shared)
    for k in [num_task] if isinstance(num_task, int) else list(num_task):
        _positive(who, num_task_experts=k)


def _positive(who: str, **values: int) -> None:
    bad = {k: v for k, v in values.items() if not (isinstance(v, int) and v >= 1)}
    if bad:
        raise ValueError(f"{who} needs {', '.join(bad)} >= 1 (an integer), got {bad}")


class CGC(Architecture):
    """Customised gate control: ``num_shared_experts`` shared copies of the trunk, ``num_task_experts``
    copies per task (a number, or one per task as in LibMTL), and per task a softmax gate on the flattened input over its ``S + K`` experts:
    ``rep_t(x) = sum_e softmax(W_t x + b_t)_e E_e(x)``. Shared: the shared experts; per task: its
    experts, gate and head. Gates start at the uniform mixture."""

    def __init__(self, num_shared_experts: int = 2, num_task_experts: Union[int, Sequence[int]] = 1) -> None:
        super().__init__()
        _check_experts("CGC", num_shared_experts, num_task_experts)
        self.num_shared_experts, self.num_task_experts = num_shared_experts, num_task_experts

    def build(self, trunk, tasks, descriptor_dim, features, heads, example=None) -> None:
        x = _example_input(trunk, example, type(self).__name__)
        in_dim = int(np.prod(x.shape[1:]))
        S, counts = self.num_shared_experts, _task_counts("CGC", self.num_task_experts, len(tasks))
        experts = iter(fresh_copies(trunk, S + sum(counts)))
        self.shared_experts = nn.ModuleList([next(experts) for _ in range(S)])
        self.task_experts = nn.ModuleList([nn.ModuleList([next(experts) for _ in range(k)]) for k in counts])
        self.gates = uniform_gates(in_dim, [S + k for k in counts])
        self.heads = heads.per_task(features, [s.out_features for s in tasks])
        self.num_tasks, self.built = len(tasks), True

    def forward(self, x, z, rows):
        shared = torch.stack([e(x).flatten(1) for e in self.shared_experts], 1)  # [N, S, d]
        reps = {}
        for t, r in enumerate(rows):
            if r is not None:
                xt = x[r]
                own = torch.stack([e(xt).flatten(1) for e in self.task_experts[t]], 1)
                reps[t] = _mix(torch.softmax(self.gates[t](xt.flatten(1)), -1), torch.cat([shared[r], own], 1))
        return _task_outputs(self.heads, rows, reps, x.shape[0])

    def shared_parameters(self):
        return _params(self.shared_experts)

    def task_parameters(self, t):
        return _params(self.task_experts[t], self.gates[t], self.heads[t])


class PLE(Architecture):
    """Progressive layered extraction: a CGC level at every stage of the trunk (:func:`trunk_stages`).

    At stage j, task t's representation ``h_t`` (the input at stage 0) goes through
    ``num_shared_experts`` shared copies and ``num_task_experts`` copies (a number, or one per task) of
    the stage owned by t, and
    ``h_t <- sum_e softmax(gate_{j,t}(flat h_t))_e E_e(h_t)``. Shared: the shared experts of every
    stage; per task: its experts, gates and head. Gates start at the uniform mixture.
    """

    def __init__(self, num_shared_experts: int = 2, num_task_experts: Union[int, Sequence[int]] = 1) -> None:
        super().__init__()
        _check_experts("PLE", num_shared_experts, num_task_experts)
        self.num_shared_experts, self.num_task_experts = num_shared_experts, num_task_experts

    def build(self, trunk, tasks, descriptor_dim, features, heads, example=None) -> None:
        stages = trunk_stages(trunk)
        x = _example_input(trunk, example, "PLE")
        in_dims = [int(np.prod(x.shape[1:]))] + [int(np.prod(s)) for s in _stage_shapes(stages, x)[:-1]]
        S, counts, T = self.num_shared_experts, _task_counts("PLE", self.num_task_experts, len(tasks)), len(tasks)
        self.shared_experts, self.task_experts, self.gates = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for stage, d in zip(stages, in_dims):
            copies = iter(fresh_copies(stage, S + sum(counts)))
            self.shared_experts.append(nn.ModuleList([next(copies) for _ in range(S)]))
            self.task_experts.append(nn.ModuleList([nn.ModuleList([next(copies) for _ in range(k)]) for k in counts]))
            gates = uniform_gates(d, [S + k for k in counts])
            self.gates.append(gates)
        self.heads = heads.per_task(features, [s.out_features for s in tasks])
        self.num_tasks, self.built = T, True

    def task_representation(self, x: Tensor, t: int) -> Tensor:
        """Task t's representation ``[n, features]`` of the examples ``x``."""
        h = x
        for shared, own, gates in zip(self.shared_experts, self.task_experts, self.gates):
            experts = torch.stack([e(h) for e in list(shared) + list(own[t])], 1)
            h = _mix(torch.softmax(gates[t](h.flatten(1)), -1), experts)
        return h.flatten(1)

    def forward(self, x, z, rows):
        reps = {t: self.task_representation(x[r], t) for t, r in enumerate(rows) if r is not None}
        return _task_outputs(self.heads, rows, reps, x.shape[0])

    def shared_parameters(self):
        return _params(self.shared_experts)

    def task_parameters(self, t):
        return _params(*(own[t] for own in self.task_experts), *(g[t] for g in self.gates), self.heads[t])


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """DSelect-k's cubic smooth step: 0 below ``-gamma/2``, 1 above ``gamma/2``,
    ``-2 t^3 / gamma^3 + 3 t / (2 gamma) + 1/2`` between."""
    mid = -2 / gamma ** 3 * t ** 3 + 3 / (2 * gamma) * t + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), mid))


class DSelectK(Architecture):
    """DSelect-k: ``num_experts`` shared copies of the trunk, and per task ``num_nonzeros`` selectors.

    Selector i of task t has ``m = ceil(log2 E)`` logits ``l = Z_t x``; its weight on expert e (binary
    code ``c_e``) is ``prod_b (c_eb ? s(l_b) : 1 - s(l_b))`` with ``s`` the smooth step of width
    ``gamma``; the selectors are mixed by ``softmax(W_t x)``. ``penalty()`` is ``entropy_weight`` times
    the selectors' entropy ``-sum q log(q + 1e-6)`` of the last forward pass (every task's), plus, when
    ``E`` is not a power of 2, ``sum 1 / (sum_e q_e)`` (mass on codes without an expert). Shared: the
    experts; per task: its selector logits and head.
    """

    def __init__(self, num_experts: int = 4, num_nonzeros: int = 2, gamma: float = 1.0,
                 entropy_weight: float = 1e-6) -> None:
        super().__init__()
        _positive("DSelectK", num_experts=num_experts, num_nonzeros=num_nonzeros)
        if not (gamma > 0 and math.isfinite(gamma)) or not entropy_weight >= 0:
            raise ValueError(f"DSelectK needs gamma > 0 and entropy_weight >= 0, got gamma={gamma}, "
                             f"entropy_weight={entropy_weight}")
        self.num_experts, self.num_nonzeros = num_experts, num_nonzeros
        self.gamma, self.entropy_weight = float(gamma), float(entropy_weight)
        self.num_binary = max(1, math.ceil(math.log2(num_experts)))
        self._selectors: list[Tensor] = []

    def build(self, trunk, tasks, descriptor_dim, features, heads, example=None) -> None:
        x = _example_input(trunk, example, "DSelectK")
        in_dim = int(np.prod(x.shape[1:]))
        k, m = self.num_nonzeros, self.num_binary
        self.experts = fresh_copies(trunk, self.num_experts)
        self.z_logits = nn.ModuleList([nn.Linear(in_dim, k * m) for _ in tasks])
        self.w_logits = nn.ModuleList([nn.Linear(in_dim, k) for _ in tasks])
        for layer in self.z_logits:  # the paper's initialisation
            for p in layer.parameters():
                nn.init.uniform_(p, -self.gamma / 100, self.gamma / 100)
        for layer in self.w_logits:
            for p in layer.parameters():
                nn.init.uniform_(p, -0.05, 0.05)
        codes = torch.tensor([[(e >> (m - 1 - b)) & 1 for b in range(m)] for e in range(self.num_experts)],
                             dtype=torch.bool)
        self.register_buffer("codes", codes, persistent=False)  # [E, m], most significant bit first
        self.heads = heads.per_task(features, [s.out_features for s in tasks])
        self.num_tasks, self.built = len(tasks), True

    def selectors(self, flat: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """Task t's selector outputs ``[n, k, E]`` and selector weights ``[n, k]`` on flattened inputs."""
        s = smooth_step(self.z_logits[t](flat).view(-1, self.num_nonzeros, 1, self.num_binary), self.gamma)
        q = torch.where(self.codes, s, 1 - s).prod(-1)
        return q, torch.softmax(self.w_logits[t](flat), -1)

    def forward(self, x, z, rows):
        E = torch.stack([e(x).flatten(1) for e in self.experts], 1)  # [N, E, d]
        flat = x.flatten(1)
        reps, self._selectors = {}, []
        for t, r in enumerate(rows):
            if r is not None:
                q, w = self.selectors(flat[r], t)
                self._selectors.append(q)
                reps[t] = _mix(torch.einsum("nk,nke->ne", w, q), E[r])
        return _task_outputs(self.heads, rows, reps, x.shape[0])

    def penalty(self):
        if not self._selectors:
            return None
        total = sum(-(q * torch.log(q + 1e-6)).sum() for q in self._selectors) * self.entropy_weight
        if self.num_experts != 2 ** self.num_binary:
            total = total + sum((1 / q.sum(-1)).sum() for q in self._selectors)
        return total

    def shared_parameters(self):
        return _params(self.experts)

    def task_parameters(self, t):
        return _params(self.z_logits[t], self.w_logits[t], self.heads[t])


class LTB(Architecture):
    """Learning to branch: a tree of stage copies whose branching is learned.

    Every stage j of the trunk (:func:`trunk_stages`) has one node per task; node p of stage ``j >= 1``
    reads ``sum_q a_{j,p,q} h_{j-1,q}``, with ``a_{j,p}`` a Gumbel-softmax sample (training; ``sample``)
    or the softmax (``sample=False``) of the learned branching logits ``alpha[j-1, p]`` at
    ``temperature``; in evaluation, the one-hot of each node's most likely parent. Task t's
    representation is node t of the last stage. The logits start at 0 (every parent equally likely).
    All nodes and the branching logits are shared (any task may branch from any node); per task: its head.
    """

    def __init__(self, temperature: float = 1.0, sample: bool = True) -> None:
        super().__init__()
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"LTB temperature must be a finite number > 0, got {temperature}")
        self.temperature, self.sample = float(temperature), bool(sample)

    def build(self, trunk, tasks, descriptor_dim, features, heads, example=None) -> None:
        stages = trunk_stages(trunk)
        T = len(tasks)
        self.nodes = nn.ModuleList([fresh_copies(stage, T) for stage in stages])
        self.alpha = nn.Parameter(torch.zeros(len(stages) - 1, T, T))
        self.heads = heads.per_task(features, [s.out_features for s in tasks])
        self.num_tasks, self.built = T, True

    def branching(self) -> Tensor:
        """The parent weights ``[stages - 1, T (child), T (parent)]`` of this forward pass."""
        if not self.training:
            return F.one_hot(self.alpha.argmax(-1), self.num_tasks).to(self.alpha.dtype)
        if self.sample:
            return F.gumbel_softmax(self.alpha, tau=self.temperature, hard=False, dim=-1)
        return torch.softmax(self.alpha / self.temperature, -1)

    def forward(self, x, z, rows):
        a = self.branching()
        h = [node(x) for node in self.nodes[0]]
        for j, stage in enumerate(list(self.nodes)[1:]):
            prev = torch.stack(h, 1)  # [N, T, ...]
            h = [node(torch.einsum("q,nq...->n...", a[j, p], prev)) for p, node in enumerate(stage)]
        return _task_outputs(self.heads, rows, {t: h[t][r].flatten(1) for t, r in enumerate(rows) if r is not None},
                             x.shape[0])

    def shared_parameters(self):
        return _params(self.nodes) + [self.alpha]

    def task_parameters(self, t):
        return _params(self.heads[t])


ARCHITECTURES.update({"cgc": CGC, "ple": PLE, "dselect_k": DSelectK, "ltb": LTB})

__all__ = ["CGC", "PLE", "DSelectK", "LTB", "smooth_step"]
