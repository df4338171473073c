"""Multi-task learning: hard and soft parameter sharing, task conditioning, loss weighting.

:class:`MultiTaskModule` trains one network for T tasks, each with its own loss, from
:class:`~tasklight.data.multitask.MultiTaskBatch` batches (``x``, ``y``, ``task``, ``z``):

* ``architecture="hard"``: one shared ``trunk``, one head per task;
* ``architecture="soft"``: one copy of ``trunk`` per task (a tower), tied by
  ``soft_penalty * sum_t ||theta_t - mean_s theta_s||^2`` (``soft_penalty_type="mean"``) or
  ``soft_penalty * sum_{s<t} ||theta_s - theta_t||^2`` (``"pairwise"``); 0 gives independent
  networks, a large weight approaches hard sharing;
* ``architecture="conditioned"``: one network that takes the task descriptor ``z_i`` of each example:
  ``concat`` (z concatenated to the input of a chosen layer), ``multiplicative``
  (``h * (1 + W z)``), ``film`` (``h * (1 + W_g z) + W_b z``) or ``multihead`` (the output layer is
  chosen by z: ``sum_k z_k (W_k h + b_k)``, exactly one head per task for one-hot z).

Each training step: optionally sample a subset of the tasks, compute every task's mean loss, get
the per-task gradients if the weighting method (or a GradientConflictMonitor) needs them, synchronise
the per-task statistics across DDP ranks in ONE all-reduce, let the weighting method turn them into
task weights (identical on every rank), and make ONE ``manual_backward`` of the weighted loss. The
per-rank loss is scaled so that the DDP gradient average equals the gradient of the same objective
on the union of all ranks' examples.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from tasklight.data.multitask import MultiTaskBatch, TaskSpec, default_loss
from tasklight.multitask.weighting import EqualWeighting, GRAD_SOURCES, TaskStats, Weighting
from tasklight.config import NotConfigurable, SelfDescribing, from_config, to_config

Architecture = Literal["hard", "soft", "conditioned"]
Conditioning = Literal["concat", "multiplicative", "film", "multihead"]
ARCHITECTURES = ("hard", "soft", "conditioned")
CONDITIONINGS = ("concat", "multiplicative", "film", "multihead")
SAMPLINGS = ("all", "uniform", "proportional")
_CONDITIONABLE = (nn.Linear, nn.Conv2d)


# ----------------------------------------------------------------------------- conditioning layers
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


def _mlp_head(in_features: int, hidden: Sequence[int], out_features: int) -> nn.Module:
    layers: list[nn.Module] = []
    d = in_features
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, out_features))
    return nn.Sequential(*layers) if len(layers) > 1 else layers[0]


def conditionable_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``Linear``/``Conv2d`` layers of ``module`` in registration order (the order of a
    sequential forward pass for the usual backbones)."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, _CONDITIONABLE)]


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


# ----------------------------------------------------------------------------- the module
@dataclass
class _Forward:
    outputs: list[Optional[Tensor]]  # per task: head outputs of its examples
    rows: list[Optional[Tensor]]  # per task: row indices into the batch
    losses: Tensor  # [T] live mean loss per task (0 where the task has no examples)
    counts: Tensor  # [T] examples per task
    metric_sums: Tensor  # [T] sum over examples of the task metric (accuracy / squared error)
    rep: Optional[Tensor]  # [N, d] the shared representation (hard / conditioned)


class MultiTaskModule(SelfDescribing, LightningModule):
    """Multi-task learning with hard/soft sharing or task conditioning and pluggable loss weighting.

    Args:
        trunk: the shared network (hard), the template of each task's tower (soft), or the network
            conditioned on z (conditioned). Its output size is read from ``out_features`` (``MLP``,
            ``Conv4(out_features=0)``, ``ToyPoint``) or found by one forward pass.
        architecture: ``hard``, ``soft`` or ``conditioned``.
        head_type: ``linear`` (a linear/MLP head per task, or one shared output layer when
            conditioned) or ``identity`` (the trunk's output is the prediction, e.g. the toy problem).
        head_hidden: hidden layer sizes of each head (an MLP head).
        heads: explicit head modules, one per task (hard/soft sharing), instead of building them.
        soft_penalty: weight of the soft-sharing penalty (>= 0).
        soft_penalty_type: ``mean`` (L2 to the towers' mean) or ``pairwise``.
        conditioning: ``concat``, ``multiplicative``, ``film`` or ``multihead`` (conditioned only).
        condition_layer: where z enters (concat/multiplicative/film): an index into the network's
            Linear/Conv2d layers -- the trunk's, then the output layer's -- or a module name
            (``"features.2.0"`` in the trunk, ``"head.0"`` in the output layer). 0 is the network
            input; the number of trunk layers is the trunk's output. Default: 0 for concat, the
            trunk's output for multiplicative and film.
        weighting: a :class:`~tasklight.multitask.weighting.Weighting` (default: equal weights 1).
        task_sampling: ``all`` tasks every step, or a subset of ``tasks_per_step`` tasks drawn
            ``uniform``-ly or ``proportional`` to ``size_t ** (1 / sampling_temperature)``.
        tasks_per_step, sampling_temperature, sampling_seed: see ``task_sampling``.
        task_losses: one loss module per task, overriding the DataModule's (e.g. a HistogramLoss for
            a regression task; a loss with ``num_bins``/``out_features`` sets the head's size).
        tasks: the task specs when no DataModule supplies them (building the network right away).
        descriptor_dim: the size of z when building without a DataModule (default: one-hot, T).
        optimizer, lr_scheduler: optimiser and scheduler factories (``lr_scheduler_interval``: step the
            scheduler every ``epoch`` or every ``step``).
        gradient_clip_val: clip the global gradient norm (``self.clip_gradients``).
    """

    def __init__(
        self,
        trunk: nn.Module,
        architecture: Architecture = "hard",
        head_type: Literal["linear", "identity"] = "linear",
        head_hidden: Sequence[int] = (),
        heads: Optional[list[nn.Module]] = None,
        soft_penalty: float = 0.0,
        soft_penalty_type: Literal["mean", "pairwise"] = "mean",
        conditioning: Conditioning = "film",
        condition_layer: Optional[Union[int, str]] = None,
        weighting: Optional[Weighting] = None,
        task_sampling: Literal["all", "uniform", "proportional"] = "all",
        tasks_per_step: Optional[int] = None,
        sampling_temperature: float = 1.0,
        sampling_seed: int = 0,
        task_losses: Optional[list[nn.Module]] = None,
        tasks: Optional[list[TaskSpec]] = None,
        descriptor_dim: Optional[int] = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        gradient_clip_val: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        _check_choice("architecture", architecture, ARCHITECTURES)
        _check_choice("conditioning", conditioning, CONDITIONINGS)
        _check_choice("task_sampling", task_sampling, SAMPLINGS)
        _check_choice("head_type", head_type, ("linear", "identity"))
        _check_choice("soft_penalty_type", soft_penalty_type, ("mean", "pairwise"))
        _check_choice("lr_scheduler_interval", lr_scheduler_interval, ("epoch", "step"))
        if not (soft_penalty >= 0 and math.isfinite(soft_penalty)):
            raise ValueError(f"soft_penalty must be a finite number >= 0, got {soft_penalty}")
        if soft_penalty and architecture != "soft":
            raise ValueError(f"soft_penalty={soft_penalty} only applies to architecture='soft' (got "
                             f"{architecture!r}); remove it or switch to soft sharing")
        if task_sampling != "all" and (tasks_per_step is None or tasks_per_step < 1):
            raise ValueError(f"task_sampling={task_sampling!r} needs tasks_per_step >= 1 (how many tasks each step "
                             f"trains on), got {tasks_per_step}")
        if task_sampling == "all" and tasks_per_step is not None:
            raise ValueError("tasks_per_step is only used with task_sampling='uniform' or 'proportional'; remove it "
                             "or choose a sampling mode")
        if not sampling_temperature > 0:
            raise ValueError(f"sampling_temperature must be > 0, got {sampling_temperature}")
        if architecture != "conditioned" and condition_layer is not None:
            raise ValueError(f"condition_layer only applies to architecture='conditioned' (got {architecture!r})")
        if architecture == "conditioned" and conditioning == "multihead" and condition_layer is not None:
            raise ValueError("conditioning='multihead' conditions the output layer only; remove condition_layer or "
                             "use concat/multiplicative/film")
        if heads is not None and architecture == "conditioned":
            raise ValueError("explicit `heads` are for hard or soft sharing; a conditioned network has one output "
                             "layer (use conditioning='multihead' for one head per task)")
        if head_type == "identity" and (head_hidden or heads is not None):
            raise ValueError("head_type='identity' takes no head_hidden or heads")
        self.weighting = weighting if weighting is not None else EqualWeighting()
        if not isinstance(self.weighting, Weighting):
            raise TypeError(f"weighting must be a tasklight Weighting, got {type(self.weighting).__name__}")
        if architecture == "soft" and self.weighting.needs_grads:
            raise ValueError(f"{type(self.weighting).__name__} needs per-task gradients on shared parameters, but soft "
                             f"sharing has none (each tower belongs to one task). Use architecture='hard' or "
                             f"'conditioned', or a weighting that needs no gradients (StaticWeighting, "
                             f"UncertaintyWeighting, DWA, DROWeighting).")
        self.architecture, self.conditioning = architecture, conditioning
        self.head_type, self.head_hidden = head_type, list(head_hidden)
        self.soft_penalty, self.soft_penalty_type = float(soft_penalty), soft_penalty_type
        self.condition_layer = condition_layer
        self.task_sampling, self.tasks_per_step = task_sampling, tasks_per_step
        self.sampling_temperature, self.sampling_seed = float(sampling_temperature), int(sampling_seed)
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.lr_scheduler_interval, self.gradient_clip_val = lr_scheduler_interval, gradient_clip_val
        self.__dict__["_trunk_template"] = trunk  # not registered: soft sharing copies it
        self._given_heads = heads
        self._given_losses = task_losses
        self._ctx = _ZContext()
        self._grad_request: Optional[str] = None
        self.last_task_gradients: Optional[tuple[Tensor, Tensor]] = None
        self.built = False
        self.task_specs: list[TaskSpec] = []
        # a network built later (in setup) is initialised from the random state at construction
        self._build_seed = int(torch.randint(0, 2**31 - 1, ()))
        if tasks is not None:
            self.build(tasks, descriptor_dim)

    # ------------------------------------------------------------------ building
    @property
    def num_tasks(self) -> int:
        return len(self.task_specs)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.task_specs]

    @property
    def task_kinds(self) -> list[str]:
        return [t.kind for t in self.task_specs]

    def setup(self, stage: Optional[str] = None) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        specs = getattr(dm, "task_specs", None) if dm is not None else None
        z = getattr(dm, "task_descriptors", None) if dm is not None else None
        if not self.built:
            if specs is None:
                raise ValueError("MultiTaskModule needs its tasks: use a MultiTaskDataModule (which supplies "
                                 "task_specs and task_descriptors) or pass `tasks=[TaskSpec(...), ...]`")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self._build_seed)
                self.build(specs, z.shape[1] if z is not None else None, example=_first_input(dm))
        elif specs is not None:
            self._check_against(specs, z)

    def _check_against(self, specs: list[TaskSpec], z: Optional[Tensor]) -> None:
        if len(specs) != self.num_tasks:
            raise ValueError(f"the model was built for {self.num_tasks} tasks ({self.num_tasks} heads) but the "
                             f"datamodule provides {len(specs)}; build the model for the datamodule's tasks")
        for t, (a, b) in enumerate(zip(self.task_specs, specs)):
            if a.out_features != b.out_features and self._given_losses is None:
                raise ValueError(f"task {t} ({b.name!r}): the model's head has {a.out_features} outputs but the "
                                 f"datamodule's task needs {b.out_features}")
        if z is not None and self.architecture == "conditioned" and z.shape[1] != self.descriptor_dim:
            raise ValueError(f"the model conditions on descriptors of size {self.descriptor_dim} but the datamodule "
                             f"supplies size {z.shape[1]}")

    def build(self, tasks: Sequence[TaskSpec], descriptor_dim: Optional[int] = None,
              example: Optional[Tensor] = None) -> None:
        """Build heads / towers / conditioning for ``tasks`` (called by ``setup`` from the DataModule)."""
        specs = [copy.copy(t) for t in tasks]
        T = len(specs)
        if T == 0:
            raise ValueError("MultiTaskModule needs at least one task")
        if self._given_losses is not None:
            if len(self._given_losses) != T:
                raise ValueError(f"task_losses has {len(self._given_losses)} entries but there are {T} tasks; give "
                                 f"one loss per task")
            for spec, loss in zip(specs, self._given_losses):
                spec.loss = loss
                size = getattr(loss, "out_features", None) or getattr(loss, "num_bins", None)
                if size:
                    spec.out_features = int(size)
        if self.task_sampling != "all" and self.tasks_per_step > T:
            raise ValueError(f"tasks_per_step={self.tasks_per_step} but there are only {T} tasks")
        if self._given_heads is not None and len(self._given_heads) != T:
            raise ValueError(f"got {len(self._given_heads)} heads but there are {T} tasks; give one head per task")
        self.task_specs = specs
        self.task_losses = nn.ModuleList([s.loss if s.loss is not None else default_loss(s.kind) for s in specs])
        self.register_buffer("task_sizes", torch.tensor([float(max(s.size, 1)) for s in specs]), persistent=False)
        self.descriptor_dim = int(descriptor_dim) if descriptor_dim is not None else T
        template = self.__dict__["_trunk_template"]
        feat = _output_size(template, example)
        outs = [s.out_features for s in specs]
        if self.head_type == "identity" and any(o != feat for o in outs):
            raise ValueError(f"head_type='identity' needs the trunk's output size ({feat}) to equal every task's "
                             f"output size, got {outs}")
        if self.architecture in ("hard", "soft"):
            if self._given_heads is not None:
                self.heads = nn.ModuleList(self._given_heads)
            elif self.head_type == "identity":
                self.heads = nn.ModuleList([nn.Identity() for _ in specs])
            else:
                self.heads = nn.ModuleList([_mlp_head(feat, self.head_hidden, o) for o in outs])
            if self.architecture == "hard":
                self.trunk = template
            else:
                self.towers = nn.ModuleList([copy.deepcopy(template) for _ in specs])
        else:
            self.trunk = template
            max_out = max(outs)
            if self.conditioning == "multihead":
                if self.head_type == "identity":
                    raise ValueError("conditioning='multihead' needs head_type='linear'")
                body = _mlp_head(feat, self.head_hidden, max_out)
                if isinstance(body, nn.Sequential):
                    last = len(body) - 1
                    body[last] = BilinearHead(body[last].in_features, max_out, self.descriptor_dim, self._ctx)
                else:
                    body = BilinearHead(feat, max_out, self.descriptor_dim, self._ctx)
                self.head = body
            else:
                self.head = nn.Identity() if self.head_type == "identity" else _mlp_head(feat, self.head_hidden,
                                                                                          max_out)
                self._insert_conditioning()
        self.weighting.setup(T, [s.lower_bound for s in specs])
        self.built = True

    def _insert_conditioning(self) -> None:
        trunk_layers = conditionable_layers(self.trunk)
        head_layers = [(f"head.{n}" if n else "head", m) for n, m in conditionable_layers(self.head)]
        layers = [(f"trunk.{n}", m) for n, m in trunk_layers] + head_layers
        k = self.condition_layer
        if k is None:
            k = 0 if self.conditioning == "concat" else len(trunk_layers)
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
        wrapped = ConditionedLayer(layer, self.conditioning, self.descriptor_dim, self._ctx)
        if name == "head":
            self.head = wrapped
        else:
            _replace(self, name, wrapped)
        self.condition_at = name

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, task: Union[int, Tensor], z: Optional[Tensor] = None) -> Tensor:
        """Outputs of task ``task`` (an int) for inputs ``x``: ``[N, out_features of the task]``.

        ``z`` (``[d]`` or ``[N, d]``) is the task descriptor for conditioned networks (default: one-hot).
        """
        t = int(task)
        if z is None:
            z = torch.zeros(self.descriptor_dim, device=x.device)
            z[t] = 1.0
        z = z.expand(x.shape[0], -1) if z.dim() == 1 else z
        batch = MultiTaskBatch(x, torch.zeros(x.shape[0], device=x.device), torch.full((x.shape[0],), t,
                               dtype=torch.long, device=x.device), z)
        return self._forward(batch, with_losses=False).outputs[t]

    def _forward(self, batch: MultiTaskBatch, with_losses: bool = True) -> _Forward:
        if not self.built:
            raise RuntimeError("the MultiTaskModule is not built yet: fit it with a MultiTaskDataModule or pass `tasks`")
        T = self.num_tasks
        if batch.z.shape[1] != self.descriptor_dim and self.architecture == "conditioned":
            raise ValueError(f"the batch's task descriptors have size {batch.z.shape[1]} but the model was built "
                             f"for {self.descriptor_dim}")
        if len(batch) and (int(batch.task.min()) < 0 or int(batch.task.max()) >= T):
            raise ValueError(f"the batch has task ids outside 0..{T - 1}; the model was built for {T} tasks")
        rows = [(batch.task == t).nonzero().flatten() for t in range(T)]
        rows = [r if r.numel() else None for r in rows]
        rep = None
        outputs: list[Optional[Tensor]] = [None] * T
        if self.architecture == "hard":
            rep = self.trunk(batch.x)
            for t, r in enumerate(rows):
                if r is not None:
                    outputs[t] = self.heads[t](rep[r])
        elif self.architecture == "soft":
            for t, r in enumerate(rows):
                if r is not None:
                    outputs[t] = self.heads[t](self.towers[t](batch.x[r]))
        else:
            self._ctx.z = batch.z
            try:
                rep = self.trunk(batch.x)
                out = self.head(rep)
            finally:
                self._ctx.z = None
            for t, r in enumerate(rows):
                if r is not None:
                    outputs[t] = out[r, : self.task_specs[t].out_features]
        dev = batch.x.device
        losses = torch.zeros(T, device=dev)
        counts = torch.zeros(T, device=dev)
        metric_sums = torch.zeros(T, device=dev)
        if with_losses:
            per = []
            for t, r in enumerate(rows):
                if r is None:
                    per.append(torch.zeros((), device=dev))
                    continue
                y = batch.y[r]
                per.append(self.task_losses[t](outputs[t], y).reshape(()).float())
                counts[t] = r.numel()
                metric_sums[t] = self._metric_sum(t, outputs[t].detach(), y)
            losses = torch.stack(per)
        return _Forward(outputs, rows, losses, counts, metric_sums, rep)

    def _metric_sum(self, t: int, out: Tensor, y: Tensor) -> Tensor:
        kind = self.task_specs[t].kind
        if kind == "classification":
            return (out.argmax(-1) == y).float().sum()
        if kind == "regression":
            loss = self.task_losses[t]
            pred = loss.predict(out) if hasattr(loss, "predict") else out
            return ((pred.reshape(y.shape).float() - y.float()) ** 2).sum()
        return torch.zeros((), device=out.device)

    # ------------------------------------------------------------------ pieces of a training step
    def sample_tasks(self, step: int) -> Tensor:
        """The bool mask ``[T]`` of tasks trained at ``step`` (the same on every DDP rank)."""
        T = self.num_tasks
        if self.task_sampling == "all":
            return torch.ones(T, dtype=torch.bool)
        k = self.tasks_per_step
        if k > T:
            raise ValueError(f"tasks_per_step={k} but there are only {T} tasks")
        state = np.random.SeedSequence([self.sampling_seed, int(step)]).generate_state(2, dtype=np.uint32)
        gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        if self.task_sampling == "uniform":
            p = torch.ones(T)
        else:
            p = self.task_sizes.detach().cpu().double() ** (1.0 / self.sampling_temperature)
        chosen = torch.multinomial(p / p.sum(), k, replacement=False, generator=gen)
        mask = torch.zeros(T, dtype=torch.bool)
        mask[chosen] = True
        return mask

    def shared_parameters(self) -> list[nn.Parameter]:
        """The parameters shared by all tasks (the trunk; the whole network when conditioned)."""
        if self.architecture == "soft":
            raise ValueError("soft sharing has no shared parameters (each tower belongs to one task); use "
                             "architecture='hard' or 'conditioned' for methods that need shared gradients")
        mods = [self.trunk] if self.architecture == "hard" else [self.trunk, self.head]
        return [p for m in mods for p in m.parameters() if p.requires_grad]

    def _task_specific_parameters(self, t: int) -> list[nn.Parameter]:
        if self.architecture == "hard":
            return list(self.heads[t].parameters())
        if self.architecture == "soft":
            return list(self.heads[t].parameters()) + list(self.towers[t].parameters())
        return []

    def _row_grads(self, fw: _Forward) -> Tensor:
        """``d L_{task(n)} / d rep_n`` for every row: one backward pass through the heads."""
        if fw.rep is None:
            raise ValueError("representation gradients need a shared representation (hard or conditioned)")
        return torch.autograd.grad(fw.losses.sum(), fw.rep, retain_graph=True)[0]

    def _local_task_gradients(self, fw: _Forward, source: str, row_grads: Optional[Tensor]) -> Tensor:
        """Per-task gradients ``[T, P]`` of the local mean losses (zeros for absent tasks)."""
        T = self.num_tasks
        if source == "representation":
            R = row_grads if row_grads is not None else self._row_grads(fw)
            R = R.reshape(R.shape[0], -1)
            out = torch.zeros(T, R.shape[1], device=R.device, dtype=R.dtype)
            for t, r in enumerate(fw.rows):
                if r is not None:
                    out[t] = R[r].sum(0)
            return out
        params = self.shared_parameters()
        size = sum(p.numel() for p in params)
        out = torch.zeros(T, size, device=fw.losses.device)
        for t, r in enumerate(fw.rows):
            if r is None:
                continue
            g = torch.autograd.grad(fw.losses[t], params, retain_graph=True, allow_unused=True)
            out[t] = torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1)
                                for gi, p in zip(g, params)])
        return out

    def _sync(self, counts: Tensor, losses: Tensor, grads: Optional[Tensor]):
        """One all-reduce of ``[n_t, n_t * L_t, n_t * g_t]``: global counts, mean losses and gradients."""
        T = self.num_tasks
        parts = [counts[:, None], (counts * losses)[:, None]]
        if grads is not None:
            parts.append(counts[:, None] * grads.to(counts))
        packed = torch.cat(parts, 1)
        if self._trainer is not None and self.trainer.world_size > 1:
            packed = self.trainer.strategy.reduce(packed.clone(), reduce_op="sum")
        n = packed[:, 0]
        denom = n.clamp_min(1.0)
        g_losses = packed[:, 1] / denom
        g_grads = packed[:, 2:] / denom[:, None] if grads is not None else None
        assert packed.shape[0] == T
        return n, g_losses, g_grads

    def _soft_penalty_value(self) -> Tensor:
        total = torch.zeros((), device=self.device)
        stacks = zip(*[list(t.parameters()) for t in self.towers])
        for ps in stacks:
            P = torch.stack(ps)
            total = total + ((P - P.mean(0, keepdim=True)) ** 2).sum()
        if self.soft_penalty_type == "pairwise":
            total = total * self.num_tasks  # sum_{s<t} ||a_s - a_t||^2 = T sum_t ||a_t - mean||^2
        return total

    def request_task_gradients(self, source: str) -> None:
        """Ask the next training step to compute (and sync) the per-task gradients from ``source``;
        they are left in ``last_task_gradients`` as ``(grads [T, P], active [T])``."""
        if source not in GRAD_SOURCES:
            raise ValueError(f"grad source must be one of {GRAD_SOURCES}, got {source!r}")
        self.shared_parameters()  # raises the clear error for soft sharing
        self._grad_request = source

    # ------------------------------------------------------------------ Lightning hooks
    def configure_optimizers(self):
        opt = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return opt
        return [opt], [self.scheduler_factory(opt)]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        losses = []
        for t in self.task_specs:
            try:
                losses.append(to_config(t.loss))
            except NotConfigurable:
                losses.append(None)
        checkpoint["multitask"] = {"tasks": [(t.name, t.out_features, t.kind, t.size, t.lower_bound)
                                             for t in self.task_specs],
                                   "losses": losses, "descriptor_dim": self.descriptor_dim}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Build the network from the checkpoint's task list when it is not built yet (e.g. in
        ``MultiTaskModule.load_from_checkpoint(path, trunk=...)``). Task losses default by kind; give
        ``task_losses`` for custom ones."""
        saved = checkpoint.get("multitask")
        if saved is None or self.built:
            return
        tasks = []
        for i, (name, out, kind, size, bound) in enumerate(saved["tasks"]):
            loss = self._given_losses[i] if self._given_losses else None
            stored = (saved.get("losses") or [None] * len(saved["tasks"]))[i]
            if loss is None and stored is not None:
                loss = from_config(stored)  # the task's own loss, rebuilt from its config
            if kind == "objective" and loss is None:
                raise ValueError(f"task {name!r} of the checkpoint is an 'objective' task whose loss is not stored; "
                                 f"pass task_losses=[...] to load_from_checkpoint")
            tasks.append(TaskSpec(name, out, kind, loss, size, bound))
        self.build(tasks, saved["descriptor_dim"])

    def configure_callbacks(self):
        from tasklight.callbacks.task_logging import TaskLossLogger

        if any(isinstance(c, TaskLossLogger) for c in self.trainer.callbacks):
            return []
        return [TaskLossLogger()]

    def training_step(self, batch: MultiTaskBatch, batch_idx: int):
        opt = self.optimizers()
        step = int(self.global_step)
        active = self.sample_tasks(step).to(batch.task.device)
        if not bool(active.all()):
            batch = batch.select(active[batch.task])
        fw = self._forward(batch)
        weighting = self.weighting
        direction = weighting.direction_only and self.architecture == "hard" and any(
            p.requires_grad for h in self.heads for p in h.parameters())
        sources = set()
        if weighting.needs_grads:
            sources.add(weighting.grad_source)
        if self._grad_request is not None:
            sources.add(self._grad_request)
        row_grads = self._row_grads(fw) if (direction or "representation" in sources) else None
        local = {s: self._local_task_gradients(fw, s, row_grads) for s in sorted(sources)}
        # one all-reduce for counts, losses and every requested gradient
        cat = torch.cat([local[s] for s in sorted(sources)], 1) if sources else None
        n, g_losses, g_cat = self._sync(fw.counts, fw.losses.detach(), cat)
        grads, offset = {}, 0
        for s in sorted(sources):
            grads[s] = g_cat[:, offset: offset + local[s].shape[1]]
            offset += local[s].shape[1]
        present = (n > 0) & active
        world = self.trainer.world_size if self._trainer is not None else 1
        scale = torch.where(n > 0, world * fw.counts / n.clamp_min(1.0), torch.zeros_like(n))
        stats = TaskStats(g_losses, present, grads.get(weighting.grad_source) if weighting.needs_grads else None,
                          step=step, epoch=int(self.current_epoch))
        weights = weighting.compute_weights(stats).to(fw.losses)
        scaled = scale * fw.losses
        if direction:
            # heads: the plain gradient of their own loss; trunk: sum_t w_t grad L_t (via d L / d rep)
            total = scaled.sum()
            row_coef = torch.zeros(len(batch), device=fw.losses.device)
            for t, r in enumerate(fw.rows):
                if r is not None:
                    row_coef[r] = scale[t] * (weights[t] - 1.0)
            rep = fw.rep.reshape(fw.rep.shape[0], -1)
            total = total + (row_coef[:, None] * row_grads.reshape(rep.shape).detach() * rep).sum()
        else:
            total = weighting.loss(scaled, weights)
        if self.architecture == "soft" and self.soft_penalty > 0:
            total = total + self.soft_penalty * self._soft_penalty_value()
        idle = [p for t in range(self.num_tasks) if not bool(present[t]) for p in self._task_specific_parameters(t)]
        if idle:  # keep every parameter in the graph (DDP), then drop their zero gradients below
            total = total + 0.0 * sum(p.sum() for p in idle)
        opt.zero_grad()
        self.manual_backward(total)
        for p in idle:
            p.grad = None
        if self.gradient_clip_val:
            self.clip_gradients(opt, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
        opt.step()
        if self.scheduler_factory is not None and self.lr_scheduler_interval == "step":
            self.lr_schedulers().step()
        if self._grad_request is not None:
            self.last_task_gradients = (grads[self._grad_request].detach(), present.detach())
            self._grad_request = None
        self.log("train/objective", total.detach(), prog_bar=True, batch_size=len(batch))
        return {"loss": total.detach(), "task_loss_sum": (fw.counts * fw.losses).detach(), "task_count": fw.counts,
                "task_metric_sum": fw.metric_sums, "weights": weights.detach(), "active": present}

    def on_train_epoch_end(self) -> None:
        if self.scheduler_factory is not None and self.lr_scheduler_interval == "epoch":
            self.lr_schedulers().step()

    def _eval_step(self, batch: MultiTaskBatch) -> dict:
        fw = self._forward(batch)
        return {"task_loss_sum": (fw.counts * fw.losses).detach(), "task_count": fw.counts,
                "task_metric_sum": fw.metric_sums}

    def validation_step(self, batch: MultiTaskBatch, batch_idx: int) -> dict:
        return self._eval_step(batch)

    def test_step(self, batch: MultiTaskBatch, batch_idx: int) -> dict:
        return self._eval_step(batch)

    def predict_step(self, batch: MultiTaskBatch, batch_idx: int) -> dict:
        """``tasklight predict``: each example's output from its own task's head.

        Returns ``predictions`` (a list with one ``[n_t, ...]`` tensor per task present, values through
        the task loss's ``predict`` where it has one), ``task`` (the task id of each entry) and ``rows``
        (each entry's rows in the batch).
        """
        fw = self._forward(batch, with_losses=False)
        preds, tasks, rows = [], [], []
        for t, out in enumerate(fw.outputs):
            if out is None:
                continue
            predict = getattr(self.task_losses[t], "predict", None) if self.task_losses is not None else None
            preds.append((predict(out) if predict is not None else out).detach())
            tasks.append(t)
            rows.append((batch.task == t).nonzero().flatten())
        return {"predictions": preds, "task": tasks, "rows": rows}


# ----------------------------------------------------------------------------- helpers
def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _first_input(dm) -> Optional[Tensor]:
    sets = getattr(dm, "train_sets", None)
    if not sets:
        return None
    from tasklight.data.multitask import _fetch

    return _fetch(sets[0], torch.tensor([0, 0]))[0]


def _output_size(trunk: nn.Module, example: Optional[Tensor]) -> int:
    for attr in ("out_features", "feature_dim"):
        size = getattr(trunk, attr, None)
        if isinstance(size, int) and size > 0:
            return size
    if example is None:
        raise ValueError(f"cannot tell the output size of the trunk {type(trunk).__name__}: give it an integer "
                         f"`out_features` attribute, or fit with a DataModule so one example can be passed through")
    was_training = trunk.training
    trunk.eval()
    with torch.no_grad():
        out = trunk(example)
    trunk.train(was_training)
    return int(out.reshape(out.shape[0], -1).shape[1])
