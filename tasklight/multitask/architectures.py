"""Multi-task architectures: how T tasks share one network.

An :class:`Architecture` is built by :class:`~tasklight.multitask.module.MultiTaskModule` from the
trunk (a template network), the task specs and a :class:`HeadFactory`, and then maps a batch to one
output per task and the shared representation. It declares which parameters all tasks share (what
gradient-based weighting methods steer), which belong to one task, and an optional penalty added to
the objective. Weighting is an independent axis: any architecture with shared parameters works with
any weighting method.

* :class:`HardSharing` -- one trunk, one head per task;
* :class:`SoftSharing` -- one tower (copy of the trunk) per task, tied by an L2 penalty;
* :class:`Concat`, :class:`Multiplicative`, :class:`FiLM` -- one network that takes the task
  descriptor ``z`` of each example at one layer; :class:`MultiHead` -- one network whose output layer
  is chosen by ``z``;
* :class:`CrossStitch` -- one tower per task, mixed after every stage by learned ``T x T`` units
  (Misra et al. 2016);
* :class:`MMoE` -- experts (copies of the trunk) mixed per task by input-dependent softmax gates
  (Ma et al. 2018);
* :class:`MTAN` -- a shared trunk with per-task soft attention masks on the features of every stage
  (Liu et al. 2019).

The stage-wise architectures (cross-stitch, MTAN) split the trunk into stages with :func:`trunk_stages`.
"""
from __future__ import annotations

import copy
import math
from typing import Literal, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasklight.config import RecordsInit
from tasklight.data.batch import TaskSpec

Rows = Sequence[Optional[Tensor]]
_CONDITIONABLE = (nn.Linear, nn.Conv2d)


# ----------------------------------------------------------------------------- heads
def mlp_head(in_features: int, hidden: Sequence[int], out_features: int) -> nn.Module:
    """A linear layer, or an MLP with ReLU between ``hidden`` layers."""
    layers: list[nn.Module] = []
    d = in_features
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, out_features))
    return nn.Sequential(*layers) if len(layers) > 1 else layers[0]


class HeadFactory:
    """Builds the task heads the architectures put on their features.

    ``kind="linear"``: an MLP head (``hidden`` layer sizes, none = one linear layer); ``"identity"``:
    the features are the prediction. ``given``: explicit head modules, one per task.
    """

    def __init__(self, kind: str = "linear", hidden: Sequence[int] = (),
                 given: Optional[Sequence[nn.Module]] = None) -> None:
        self.kind, self.hidden, self.given = kind, list(hidden), given

    def per_task(self, in_features: int, outs: Sequence[int]) -> nn.ModuleList:
        if self.given is not None:
            if len(self.given) != len(outs):
                raise ValueError(f"got {len(self.given)} heads but there are {len(outs)} tasks; give one head per task")
            return nn.ModuleList(self.given)
        if self.kind == "identity":
            if any(o != in_features for o in outs):
                raise ValueError(f"head_type='identity' needs the trunk's output size ({in_features}) to equal every "
                                 f"task's output size, got {list(outs)}")
            return nn.ModuleList([nn.Identity() for _ in outs])
        return nn.ModuleList([mlp_head(in_features, self.hidden, o) for o in outs])

    def shared(self, in_features: int, out_features: int) -> nn.Module:
        if self.given is not None:
            raise ValueError("explicit `heads` are one per task; this architecture has one shared output layer (use "
                             "MultiHead for one head per task, or HardSharing with your heads)")
        if self.kind == "identity":
            if out_features != in_features:
                raise ValueError(f"head_type='identity' needs the trunk's output size ({in_features}) to equal the "
                                 f"output size {out_features}")
            return nn.Identity()
        return mlp_head(in_features, self.hidden, out_features)


# ----------------------------------------------------------------------------- the base class
class Architecture(RecordsInit, nn.Module):
    """How the tasks share a network (the base class; subclasses implement :meth:`build` and
    :meth:`forward`).

    ``build`` creates the modules from ``trunk`` (the template network; an architecture may use it
    as is or copy it), ``tasks``, the descriptor size, the output size of the trunk ``features``, a
    :class:`HeadFactory` and, when known, one ``example`` input batch. ``forward(x, z, rows)``
    returns ``(outputs, rep)``: ``outputs[t]`` is task t's output on the examples ``rows[t]``
    (``None`` where the task has no examples) and ``rep`` the shared representation ``[N, ...]``
    (the input of each example's head), or ``None`` when there is none.
    """

    #: per-task gradients on shared parameters exist (False for soft sharing)
    has_shared_parameters = True
    #: the task parameters are only the heads, applied to ``rep``: direction-only weightings (MGDA,
    #: PCGrad) may then steer the shared parameters while every head gets its own loss's gradient
    heads_on_representation = False

    def __init__(self) -> None:
        super().__init__()
        self.num_tasks = 0
        self.built = False

    def build(self, trunk: nn.Module, tasks: Sequence[TaskSpec], descriptor_dim: int, features: int,
              heads: HeadFactory, example: Optional[Tensor] = None) -> None:
        raise NotImplementedError

    def forward(self, x: Tensor, z: Tensor, rows: Rows) -> tuple[list[Optional[Tensor]], Optional[Tensor]]:
        raise NotImplementedError

    def shared_parameters(self) -> list[nn.Parameter]:
        """The parameters every task's loss depends on (what gradient-based weightings steer)."""
        raise NotImplementedError

    def task_parameters(self, t: int) -> list[nn.Parameter]:
        """The parameters only task ``t``'s loss depends on (left untouched when t is not trained)."""
        raise NotImplementedError

    def penalty(self) -> Optional[Tensor]:
        """A term added to the objective (already weighted), or None."""
        return None

    def check_descriptors(self, descriptor_dim: int) -> None:
        """Raise when the architecture was built for another descriptor size (conditioned ones)."""

    def extra_repr(self) -> str:
        return f"tasks={self.num_tasks}" if self.built else "not built"


def fresh_copies(module: nn.Module, n: int) -> nn.ModuleList:
    """``n`` copies of ``module``: the first with its initial values, the others re-initialised
    (independent experts)."""
    copies = nn.ModuleList([copy.deepcopy(module) for _ in range(n)])
    for e in list(copies)[1:]:
        for m in e.modules():
            if hasattr(m, "reset_parameters") and m is not e:
                m.reset_parameters()
    return copies


def uniform_gates(in_dim: int, sizes) -> nn.ModuleList:
    """One linear softmax gate per entry of ``sizes`` (its number of experts), zero-initialised so that
    every gate starts from the uniform mixture."""
    gates = nn.ModuleList([nn.Linear(in_dim, k) for k in sizes])
    for g in gates:
        nn.init.zeros_(g.weight)
        nn.init.zeros_(g.bias)
    return gates


def _params(*modules: nn.Module) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def _row_tasks(rows: Rows, n: int, device) -> Tensor:
    """The task id of every row of the batch."""
    task = torch.zeros(n, dtype=torch.long, device=device)
    for t, r in enumerate(rows):
        if r is not None:
            task[r] = t
    return task


# ----------------------------------------------------------------------------- hard and soft sharing
class HardSharing(Architecture):
    """One shared trunk, one head per task (Caruana 1997)."""

    heads_on_representation = True

    def build(self, trunk, tasks, descriptor_dim, features, heads, example=None) -> None:
        self.trunk = trunk
        self.heads = heads.per_task(features, [s.out_features for s in tasks])
        self.num_tasks, self.built = len(tasks), True

    def forward(self, x, z, rows):
        rep = self.trunk(x)
        return [self.heads[t](rep[r]) if r is not None else None for t, r in enumerate(rows)], rep

    def shared_parameters(self):
        return _params(self.trunk)

    def task_parameters(self, t):
        return list(self.heads[t].parameters())


class SoftSharing(Architecture):
    """One tower (a copy of the trunk, all starting from the same weights) and head per task, tied
    by ``penalty * P``: ``penalty_type="mean"``: ``P = sum_t ||theta_t - mean_s theta_s||^2``;
    ``"pairwise"``: ``P = sum_{s<t} ||theta_s - theta_t||^2`` (``= T`` times the mean form).

    ``penalty=0`` is exactly independent single-task networks; a large penalty approaches hard sharing.
    """

    has_shared_parameters = False

    def __init__(self, penalty: float = 1e-3, penalty_type: Literal["mean", "pairwise"] = "mean") -> None:
        super().__init__()
        if not (penalty >= 0 and math.isfinite(penalty)):
            raise ValueError(f"SoftSharing penalty must be a finite number >= 0, got {penalty}")
        if penalty_type not in ("mean", "pairwise"):
            raise ValueError(f"SoftSharing penalty_type must be 'mean' or 'pairwise', got {penalty_type!r}")
        self.penalty_weight, self.penalty_type = float(penalty), penalty_type

    def build(self, trunk, tasks, descriptor_dim, features, heads, example=None) -> None:
        self.towers = nn.ModuleList([copy.deepcopy(trunk) for _ in tasks])
        self.heads = heads.per_task(features, [s.out_features for s in tasks])
        self.num_tasks, self.built = len(tasks), True

    def forward(self, x, z, rows):
        return [self.heads[t](self.towers[t](x[r])) if r is not None else None for t, r in enumerate(rows)], None

    def shared_parameters(self):
        raise ValueError("soft sharing has no shared parameters (each tower belongs to one task); use HardSharing or "
                         "another architecture with shared parameters for methods that need shared gradients")

    def task_parameters(self, t):
        return list(self.heads[t].parameters()) + list(self.towers[t].parameters())

    def penalty_value(self) -> Tensor:
        """The unweighted penalty ``P``."""
        total = None
        for ps in zip(*[list(t.parameters()) for t in self.towers]):
            P = torch.stack(ps)
            term = ((P - P.mean(0, keepdim=True)) ** 2).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        if self.penalty_type == "pairwise":
            total = total * self.num_tasks  # sum_{s<t} ||a_s - a_t||^2 = T sum_t ||a_t - mean||^2
        return total

    def penalty(self):
        return self.penalty_weight * self.penalty_value() if self.penalty_weight > 0 else None


# ----------------------------------------------------------------------------- task conditioning
class _ZContext:
    """Holds the task descriptors of the current batch for the conditioned layers (not a module)."""

    def __init__(self) -> None:
        self.z: Optional[Tensor] = None


class ConditionedLayer(nn.Module):
    """A ``Linear`` or ``Conv2d`` layer whose input is conditioned on the batch's task descriptors.

    * ``concat``: as if ``z`` were concatenated to the layer's input (constant feature maps for a
      convolution): the layer gets extra input weights ``W_z`` and adds ``W_z z`` (for a convolution,
      the convolution of the constant z maps, zero padding included), which is exactly the
      concatenated layer.
    * ``multiplicative``: the input ``h`` becomes ``h * (1 + W z)``.
    * ``film``: the input becomes ``h * (1 + W_g z + b_g) + W_b z + b_b``.

    The modulations start at zero, so a fresh conditioned layer computes what the plain layer does.
    """

    def __init__(self, layer: nn.Module, mode: str, z_dim: int, context: _ZContext) -> None:
        super().__init__()
        if not isinstance(layer, _CONDITIONABLE):
            raise ValueError(f"conditioning needs a Linear or Conv2d layer, got {type(layer).__name__}")
        self.layer, self.mode, self.context = layer, mode, context
        is_conv = isinstance(layer, nn.Conv2d)
        in_ch = layer.in_channels if is_conv else layer.in_features
        if mode == "concat":
            if is_conv and layer.groups != 1:
                raise ValueError("concat conditioning needs a Conv2d with groups=1")
            kernel = tuple(layer.kernel_size) if is_conv else ()
            out_ch = layer.out_channels if is_conv else layer.out_features
            self.z_weight = nn.Parameter(torch.empty(out_ch, z_dim, *kernel))
            fan_in = (in_ch + z_dim) * int(np.prod(kernel)) if kernel else in_ch + z_dim
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.z_weight, -bound, bound)
        elif mode in ("multiplicative", "film"):
            self.gamma = nn.Linear(z_dim, in_ch, bias=(mode == "film"))
            nn.init.zeros_(self.gamma.weight)
            if self.gamma.bias is not None:
                nn.init.zeros_(self.gamma.bias)
            if mode == "film":
                self.beta = nn.Linear(z_dim, in_ch)
                nn.init.zeros_(self.beta.weight)
                nn.init.zeros_(self.beta.bias)
        else:
            raise ValueError(f"unknown conditioning mode {mode!r}")

    def forward(self, h: Tensor) -> Tensor:
        z = self.context.z
        if z is None or z.shape[0] != h.shape[0]:
            raise RuntimeError("a conditioned layer ran without the batch's task descriptors; call the "
                               "MultiTaskModule (not its trunk) so that z is set")
        z = z.to(h)
        spatial = (1,) * (h.dim() - 2)
        if self.mode == "concat":
            out = self.layer(h)
            if isinstance(self.layer, nn.Conv2d):
                zmap = z[:, :, None, None].expand(z.shape[0], z.shape[1], h.shape[-2], h.shape[-1])
                return out + F.conv2d(zmap, self.z_weight, None, self.layer.stride, self.layer.padding,
                                      self.layer.dilation)
            return out + z @ self.z_weight.T
        scale = 1 + self.gamma(z).view(z.shape[0], -1, *spatial)
        h = h * scale
        if self.mode == "film":
            h = h + self.beta(z).view(z.shape[0], -1, *spatial)
        return self.layer(h)


class BilinearHead(nn.Module):
    """The multi-head output layer as a function of z: ``out = sum_k z_k (W_k h + b_k)``.

    With one-hot z this is exactly one linear head per task; with any other descriptor it mixes them.
    """

    def __init__(self, in_features: int, out_features: int, z_dim: int, context: _ZContext) -> None:
        super().__init__()
        self.context = context
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(z_dim, out_features, in_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(z_dim, out_features).uniform_(-bound, bound))

    def forward(self, h: Tensor) -> Tensor:
        z = self.context.z.to(h)
        return torch.einsum("nk,kof,nf->no", z, self.weight, h) + z @ self.bias


def conditionable_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``Linear``/``Conv2d`` layers of ``module`` in registration order (the order of a
    sequential forward pass for the usual backbones)."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, _CONDITIONABLE)]


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


class _Conditioned(Architecture):
    """One network for all tasks that sees each example's task descriptor z.

    ``outputs="shared"``: one output layer of ``max_t out_features_t`` units; task t reads the first
    ``out_features_t`` (the network is one function ``f(x, z)``, usable for descriptors of new tasks;
    but tasks whose labels mean different things, such as the characters of different alphabets,
    then share output units: the label ids collide and z must undo the collision through the
    features). ``"disjoint"``: the output layer has ``sum_t out_features_t`` units and task t reads
    its own block (no collision; for the tasks seen in training).
    """

    mode = ""

    def __init__(self, condition_layer: Optional[Union[int, str]] = None,
                 outputs: Literal["shared", "disjoint"] = "shared") -> None:
        super().__init__()
        if outputs not in ("shared", "disjoint"):
            raise ValueError(f"{type(self).__name__} outputs must be 'shared' or 'disjoint', got {outputs!r}")
        self.condition_layer, self.outputs = condition_layer, outputs
        self._ctx = _ZContext()
        self.descriptor_dim = 0

    def _output_slices(self, tasks: Sequence[TaskSpec]) -> tuple[int, list[tuple[int, int]]]:
        outs = [s.out_features for s in tasks]
        if self.outputs == "shared":
            return max(outs), [(0, o) for o in outs]
        starts = np.cumsum([0] + outs).tolist()
        return int(starts[-1]), [(int(a), int(a) + o) for a, o in zip(starts[:-1], outs)]

    def build(self, trunk, tasks, descriptor_dim, features, heads, example=None) -> None:
        if heads.kind == "identity" and self.outputs == "disjoint" and len(tasks) > 1:
            raise ValueError("outputs='disjoint' needs head_type='linear' (an output layer to split per task)")
        self.trunk = trunk
        width, self.slices = self._output_slices(tasks)
        self.descriptor_dim = int(descriptor_dim)
        self.head = self._make_head(features, width, heads)
        self.num_tasks, self.built = len(tasks), True

    def _make_head(self, features: int, width: int, heads: HeadFactory) -> nn.Module:
        head = heads.shared(features, width)
        self.head = head
        trunk_layers = conditionable_layers(self.trunk)
        head_layers = [(f"head.{n}" if n else "head", m) for n, m in conditionable_layers(head)]
        layers = [(f"trunk.{n}", m) for n, m in trunk_layers] + head_layers
        k = self.condition_layer
        if k is None:
            k = 0 if self.mode == "concat" else len(trunk_layers)
        if isinstance(k, str):
            names = [n for n, _ in layers]
            cands = [i for i, n in enumerate(names) if n in (k, f"trunk.{k}")]
            if not cands:
                raise ValueError(f"condition_layer {k!r} is not a Linear/Conv2d layer of the network; choose one of "
                                 f"{[n.removeprefix('trunk.') for n in names]} or an index 0..{len(names) - 1}")
            k = cands[0]
        if not -len(layers) <= k < len(layers):
            raise ValueError(f"condition_layer={k} is out of range: the network has {len(layers)} Linear/Conv2d layers "
                             f"({len(trunk_layers)} in the trunk, {len(head_layers)} in the output layer); choose "
                             f"0..{len(layers) - 1}")
        name, layer = layers[k]
        wrapped = ConditionedLayer(layer, self.mode, self.descriptor_dim, self._ctx)
        self.condition_at = name
        if name == "head":
            return wrapped
        _replace(self, name, wrapped)
        return self.head

    def forward(self, x, z, rows):
        self._ctx.z = z
        try:
            rep = self.trunk(x)
            out = self.head(rep)
        finally:
            self._ctx.z = None
        return [out[r, a:b] if r is not None else None for r, (a, b) in zip(rows, self.slices)], rep

    def shared_parameters(self):
        return _params(self.trunk, self.head)

    def task_parameters(self, t):
        return []

    def check_descriptors(self, descriptor_dim: int) -> None:
        if descriptor_dim != self.descriptor_dim:
            raise ValueError(f"the model conditions on descriptors of size {self.descriptor_dim} but got descriptors "
                             f"of size {descriptor_dim}")


class Concat(_Conditioned):
    """z concatenated to the input of a layer (``condition_layer``; default the network input),
    implemented exactly as the concatenated layer (see :class:`ConditionedLayer`)."""

    mode = "concat"


class Multiplicative(_Conditioned):
    """The input ``h`` of a layer becomes ``h * (1 + W z)`` (default: the trunk's output)."""

    mode = "multiplicative"


class FiLM(_Conditioned):
    """The input of a layer becomes ``h * (1 + W_g z + b_g) + W_b z + b_b`` (Perez et al. 2018;
    default: the trunk's output)."""

    mode = "film"


class MultiHead(_Conditioned):
    """The output layer is ``sum_k z_k (W_k h + b_k)``: one linear head per task for one-hot z, a
    mixture of heads for other descriptors (z conditions the output layer only)."""

    mode = "multihead"

    def __init__(self) -> None:
        super().__init__(None, "shared")

    def _make_head(self, features, width, heads):
        if heads.kind == "identity":
            raise ValueError("MultiHead needs head_type='linear'")
        body = heads.shared(features, width)
        if isinstance(body, nn.Sequential):
            last = len(body) - 1
            body[last] = BilinearHead(body[last].in_features, width, self.descriptor_dim, self._ctx)
            return body
        return BilinearHead(features, width, self.descriptor_dim, self._ctx)


# ----------------------------------------------------------------------------- stage-wise architectures
def trunk_stages(trunk: nn.Module) -> list[nn.Module]:
    """The trunk as a list of stages whose composition, flattened, is the trunk's output.

    An ``nn.Sequential``, or a network with a ``features`` or ``net`` ``nn.Sequential`` (``Conv4``,
    ``MLP``) whose output is that sequence's output flattened. Every stage starts at a child with
    parameters; parameter-free children (activations, pooling) join the stage before them.
    """
    seq = trunk if isinstance(trunk, nn.Sequential) else None
    for attr in ("features", "net"):
        if seq is None and isinstance(getattr(trunk, attr, None), nn.Sequential):
            if getattr(trunk, "head", None) is not None:
                raise ValueError(f"the trunk {type(trunk).__name__} has an output layer (`head`); build it without "
                                 f"one (e.g. Conv4(out_features=0)) so that it ends with its features")
            seq = getattr(trunk, attr)
    if seq is None:
        raise ValueError(f"cannot split the trunk {type(trunk).__name__} into stages: give an nn.Sequential, or a "
                         f"network whose `features` (or `net`) nn.Sequential gives its output (Conv4, MLP)")
    stages: list[list[nn.Module]] = []
    for child in seq.children():
        if any(True for _ in child.parameters()) or not stages:
            stages.append([child])
        else:
            stages[-1].append(child)
    return [s[0] if len(s) == 1 else nn.Sequential(*s) for s in stages]


def _example_input(trunk: nn.Module, example: Optional[Tensor], who: str) -> Tensor:
    if example is not None:
        return example
    shape = getattr(trunk, "input_shape", None)
    if shape is None:
        raise ValueError(f"{who} needs the input shape: fit with a DataModule (one example is passed through), or "
                         f"give the trunk an `input_shape` attribute")
    return torch.zeros(2, *shape)


@torch.no_grad()
def _stage_shapes(stages: Sequence[nn.Module], x: Tensor) -> list[tuple[int, ...]]:
    shapes, h = [], x
    modes = [m.training for m in stages]
    for s in stages:
        s.eval()
    try:
        for s in stages:
            h = s(h)
            shapes.append(tuple(h.shape[1:]))
    finally:
        for s, m in zip(stages, modes):
            s.train(m)
    return shapes


class CrossStitch(Architecture):
    """One tower per task (copies of the trunk's stages), whose features are mixed after every stage
    but the last by a learned ``T x T`` cross-stitch unit: ``h_t <- sum_s alpha_ts h_s`` (Misra et
    al. 2016). ``alpha`` starts at ``self_weight`` on the diagonal and ``(1 - self_weight) / (T - 1)``
    elsewhere. Every tower runs on the whole batch (each example's features are mixed across
    towers), so a step costs T times hard sharing. Shared: the towers and the units; per task: heads.
    """

    heads_on_representation = True

    def __init__(self, self_weight: float = 0.9) -> None:
        super().__init__()
        if not 0 <= self_weight <= 1:
            raise ValueError(f"CrossStitch self_weight must be in [0, 1], got {self_weight}")
        self.self_weight = float(self_weight)

    def build(self, trunk, tasks, descriptor_dim, features, heads, example=None) -> None:
        T = len(tasks)
        stages = trunk_stages(trunk)
        self.towers = nn.ModuleList([nn.ModuleList(copy.deepcopy(stages)) for _ in range(T)])
        off = (1 - self.self_weight) / (T - 1) if T > 1 else 0.0
        init = torch.full((T, T), off) + torch.eye(T) * (self.self_weight - off)
        self.alpha = nn.Parameter(init.repeat(max(len(stages) - 1, 0), 1, 1))
        self.heads = heads.per_task(features, [s.out_features for s in tasks])
        self.num_tasks, self.built = T, True

    def forward(self, x, z, rows):
        T = self.num_tasks
        hs = [x] * T
        n_stages = len(self.towers[0])
        for j in range(n_stages):
            hs = [self.towers[t][j](hs[t]) for t in range(T)]
            if j < n_stages - 1:
                H = torch.stack(hs)  # [T, N, ...]
                hs = list(torch.einsum("ts,s...->t...", self.alpha[j], H).unbind(0))
        feats = torch.stack([h.flatten(1) for h in hs])  # [T, N, d]
        rep = feats[_row_tasks(rows, x.shape[0], x.device), torch.arange(x.shape[0], device=x.device)]
        return [self.heads[t](rep[r]) if r is not None else None for t, r in enumerate(rows)], rep

    def shared_parameters(self):
        return _params(self.towers) + [self.alpha]

    def task_parameters(self, t):
        return list(self.heads[t].parameters())


class MMoE(Architecture):
    """Multi-gate mixture of experts (Ma et al. 2018): ``num_experts`` copies of the trunk, and per
    task a softmax gate on the flattened input, ``rep_t(x) = sum_e softmax(W_t x + b_t)_e E_e(x)``,
    fed to task t's head. Shared: the experts; per task: its gate and head."""

    def __init__(self, num_experts: int = 4) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"MMoE num_experts must be >= 1, got {num_experts}")
        self.num_experts = int(num_experts)

    def build(self, trunk, tasks, descriptor_dim, features, heads, example=None) -> None:
        x = _example_input(trunk, example, "MMoE")
        in_dim = int(np.prod(x.shape[1:]))
        self.experts = fresh_copies(trunk, self.num_experts)
        self.gates = uniform_gates(in_dim, [self.num_experts] * len(tasks))
        self.heads = heads.per_task(features, [s.out_features for s in tasks])
        self.num_tasks, self.built = len(tasks), True

    def forward(self, x, z, rows):
        E = torch.stack([e(x).flatten(1) for e in self.experts], 1)  # [N, E, d]
        flat = x.flatten(1)
        rep = E.new_zeros(E.shape[0], E.shape[2])
        for t, r in enumerate(rows):
            if r is not None:
                g = torch.softmax(self.gates[t](flat[r]), -1)  # [n, E]
                rep = rep.index_put((r,), torch.einsum("ne,ned->nd", g, E[r]))
        return [self.heads[t](rep[r]) if r is not None else None for t, r in enumerate(rows)], rep

    def shared_parameters(self):
        return _params(self.experts)

    def task_parameters(self, t):
        return list(self.gates[t].parameters()) + list(self.heads[t].parameters())


class _Attention(nn.Module):
    """One task's attention module at one stage of MTAN: ``mask = sigmoid(g([s_j, f(a_{j-1})]))``,
    output ``mask * s_j``; ``f`` maps the previous attended features to this stage's shape."""

    def __init__(self, shape: tuple[int, ...], prev: Optional[tuple[int, ...]], hidden: int) -> None:
        super().__init__()
        conv = len(shape) == 3
        c = shape[0]
        layer = (lambda i, o: nn.Conv2d(i, o, 1)) if conv else nn.Linear
        self.shape, self.conv = shape, conv
        self.bridge = layer(prev[0], c) if prev is not None else None
        inp = 2 * c if prev is not None else c
        self.gate = nn.Sequential(layer(inp, hidden), nn.ReLU(), layer(hidden, c))

    def forward(self, s: Tensor, prev: Optional[Tensor]) -> Tensor:
        if self.bridge is not None:
            p = self.bridge(prev)
            if self.conv and p.shape[-2:] != s.shape[-2:]:
                p = F.adaptive_avg_pool2d(p, s.shape[-2:])
            s_in = torch.cat([s, p], 1)
        else:
            s_in = s
        return torch.sigmoid(self.gate(s_in)) * s


class MTAN(Architecture):
    """Multi-task attention network (Liu et al. 2019): the shared trunk's stages, and per task one
    soft attention module per stage whose mask (from the shared features and the task's previous
    attended features) selects the task's features; the last one feeds the task's head. Shared:
    the trunk; per task: its attention modules and head. ``hidden``: width of the attention
    modules (default: the stage's channels)."""

    def __init__(self, hidden: Optional[int] = None) -> None:
        super().__init__()
        if hidden is not None and hidden < 1:
            raise ValueError(f"MTAN hidden must be >= 1, got {hidden}")
        self.hidden = hidden

    def build(self, trunk, tasks, descriptor_dim, features, heads, example=None) -> None:
        stages = trunk_stages(trunk)
        shapes = _stage_shapes(stages, _example_input(trunk, example, "MTAN"))
        for s in shapes:
            if len(s) not in (1, 3):
                raise ValueError(f"MTAN needs stage outputs [N, C] or [N, C, H, W], got a stage of shape {s}")
        self.trunk = trunk
        self.stages = stages  # a plain list: the trunk's own modules, registered through self.trunk
        self.attention = nn.ModuleList([
            nn.ModuleList([_Attention(shapes[j], shapes[j - 1] if j else None, self.hidden or shapes[j][0])
                           for j in range(len(stages))]) for _ in tasks])
        self.heads = heads.per_task(features, [s.out_features for s in tasks])
        self.num_tasks, self.built = len(tasks), True

    def forward(self, x, z, rows):
        shared, h = [], x
        for s in self.stages:
            h = s(h)
            shared.append(h)
        rep = None
        for t, r in enumerate(rows):
            if r is not None:
                a = None
                for j, att in enumerate(self.attention[t]):
                    a = att(shared[j][r], a)
                a = a.flatten(1)
                rep = (a.new_zeros(x.shape[0], a.shape[1]) if rep is None else rep).index_put((r,), a)
        return [self.heads[t](rep[r]) if r is not None else None for t, r in enumerate(rows)], rep

    def shared_parameters(self):
        return _params(self.trunk)

    def task_parameters(self, t):
        return list(self.attention[t].parameters()) + list(self.heads[t].parameters())


ARCHITECTURES = {"hard": HardSharing, "soft": SoftSharing, "concat": Concat, "multiplicative": Multiplicative,
                 "film": FiLM, "multihead": MultiHead, "cross_stitch": CrossStitch, "mmoe": MMoE, "mtan": MTAN}
# the expert and branching architectures (tasklight.multitask.arch_experts) add themselves on import

__all__ = ["Architecture", "HeadFactory", "HardSharing", "SoftSharing", "Concat", "Multiplicative", "FiLM",
           "MultiHead", "CrossStitch", "MMoE", "MTAN", "ConditionedLayer", "BilinearHead", "trunk_stages",
           "conditionable_layers", "mlp_head", "ARCHITECTURES"]
