"""Multi-task learning: one network for T tasks, an architecture object and a loss weighting.

:class:`MultiTaskModule` trains one network for T tasks, each with its own loss, from
:class:`~tasklight.data.multitask.MultiTaskBatch` batches (``x``, ``y``, ``task``, ``z``). Two
independent choices, both objects given in the config:

* ``architecture``: how the tasks share the network, a
  :class:`~tasklight.multitask.architectures.Architecture` (hard or soft sharing, task conditioning,
  cross-stitch, MMoE, MTAN), built from ``trunk`` and the heads;
* ``weighting``: how the task losses are combined, a :class:`~tasklight.multitask.weighting.Weighting`.

Each training step: optionally sample a subset of the tasks, compute every task's mean loss, get
the per-task gradients if the weighting method (or a GradientConflictMonitor) needs them, synchronise
the per-task statistics across DDP ranks in ONE all-reduce, let the weighting method turn them into
task weights (identical on every rank), and make ONE ``manual_backward`` of the weighted loss plus the
architecture's penalty. The per-rank loss is scaled so that the DDP gradient average equals the
gradient of the same objective on the union of all ranks' examples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

import copy
import math

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from tasklight.core.checkpoint import stamp_checkpoint, verify_checkpoint
from tasklight.core.outer import (DEFAULT_MAX_CONSECUTIVE_SKIPS, configure_outer_optimizers, default_optimizer,
                                  outer_step, setup_outer_step)
from tasklight.core.checks import check_input_dtype
from tasklight.core.seeding import seeded_generator
from tasklight.data.multitask import MultiTaskBatch, TaskSpec, default_loss
from tasklight.metrics import eval_valid_mask, unshare_state
from tasklight.multitask.architectures import Architecture, HardSharing, HeadFactory
from tasklight.multitask.jacobian import task_jacobian
from tasklight.multitask.weighting import EqualWeighting, GRAD_SOURCES, TaskStats, Weighting
from tasklight.config import NotConfigurable, SelfDescribing, from_config, to_config
from tasklight.nn.losses import align_target, fit_auto_support

SAMPLINGS = ("all", "uniform", "proportional")


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
    """Multi-task learning with an architecture object and pluggable loss weighting.

    Args:
        trunk: the network the architecture is built from: the shared network (hard sharing,
            conditioning, MTAN), the template of each task's tower (soft sharing, cross-stitch) or of
            each expert (MMoE). Its output size is read from ``out_features`` (``MLP``,
            ``Conv4(out_features=0)``, ``ToyPoint``) or found by one forward pass.
        architecture: an :class:`~tasklight.multitask.architectures.Architecture` (default
            :class:`~tasklight.multitask.architectures.HardSharing`), e.g. ``SoftSharing(penalty=1e-3)``,
            ``FiLM(condition_layer=2)``, ``MultiHead()``, ``CrossStitch()``, ``MMoE(num_experts=4)``,
            ``MTAN()``; in a config, ``class_path: tasklight.multitask.SoftSharing``.
        head_type: ``linear`` (a linear/MLP head per task, or one output layer for a conditioned
            network) or ``identity`` (the trunk's output is the prediction, e.g. the toy problem).
        head_hidden: hidden layer sizes of each head (an MLP head).
        heads: explicit head modules, one per task, instead of building them.
        weighting: a :class:`~tasklight.multitask.weighting.Weighting` (default: equal weights 1).
        task_sampling: ``all`` tasks every step, or a subset of ``tasks_per_step`` tasks drawn
            ``uniform``-ly or ``proportional`` to ``size_t ** (1 / sampling_temperature)``.
        tasks_per_step, sampling_temperature, sampling_seed: see ``task_sampling``.
        task_losses: one loss module per task, overriding the DataModule's (e.g. a HistogramLoss for
            a regression task; a loss with ``num_bins``/``out_features`` sets the head's size).
        tasks: the task specs when no DataModule supplies them (building the network right away).
        descriptor_dim: the size of z when building without a DataModule (default: one-hot, T).
        optimizer, lr_scheduler: optimiser (default Adam, lr 1e-3) and scheduler factories; the
            scheduler is stepped after every optimiser step.
        clip_grad_norm: clip the global gradient norm (``self.clip_gradients``).
        nonfinite, max_consecutive_skips: the non-finite policy of the shared outer step
            (:mod:`tasklight.core.outer`): ``"raise"`` or ``"skip"`` a step whose loss or gradient is
            not finite, raising after ``max_consecutive_skips`` skips in a row.
    """

    #: how the per-task gradients on the shared parameters (``grad_source="parameters"``) are computed:
    #: an engine of :mod:`tasklight.multitask.jacobian` (``"auto"``, ``"loop"``, ``"batched"``) and, for
    #: ``"batched"``, the tasks per call (``None``: all at once; fewer bound the memory). Set them on the
    #: instance (``model.task_gradient_engine = "batched"``); the gradients are the same either way.
    task_gradient_engine: str = "auto"
    task_gradient_chunk: Optional[int] = None

    def __init__(
        self,
        trunk: nn.Module,
        architecture: Optional[Architecture] = None,
        head_type: Literal["linear", "identity"] = "linear",
        head_hidden: Sequence[int] = (),
        heads: Optional[list[nn.Module]] = None,
        weighting: Optional[Weighting] = None,
        task_sampling: Literal["all", "uniform", "proportional"] = "all",
        tasks_per_step: Optional[int] = None,
        sampling_temperature: float = 1.0,
        sampling_seed: int = 0,
        task_losses: Optional[list[nn.Module]] = None,
        tasks: Optional[list[TaskSpec]] = None,
        descriptor_dim: Optional[int] = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        clip_grad_norm: Optional[float] = None,
        nonfinite: Literal["raise", "skip"] = "raise",
        max_consecutive_skips: int = DEFAULT_MAX_CONSECUTIVE_SKIPS,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        if architecture is None:
            architecture = HardSharing()
        if not isinstance(architecture, Architecture):
            hint = (f" (architecture={architecture!r} was a string option; it is now an object such as "
                    f"tasklight.multitask.HardSharing(), SoftSharing(penalty=...), FiLM(condition_layer=...))"
                    if isinstance(architecture, str) else "")
            raise TypeError(f"architecture must be a tasklight.multitask.Architecture, got "
                            f"{type(architecture).__name__}{hint}")
        if architecture.built:
            raise ValueError("this architecture object is already built for another model; give each "
                             "MultiTaskModule its own (a fresh HardSharing(), ...)")
        _check_choice("task_sampling", task_sampling, SAMPLINGS)
        _check_choice("head_type", head_type, ("linear", "identity"))
        setup_outer_step(self, clip_grad_norm, nonfinite, max_consecutive_skips)
        if task_sampling != "all" and (tasks_per_step is None or tasks_per_step < 1):
            raise ValueError(f"task_sampling={task_sampling!r} needs tasks_per_step >= 1 (how many tasks each step "
                             f"trains on), got {tasks_per_step}")
        if task_sampling == "all" and tasks_per_step is not None:
            raise ValueError("tasks_per_step is only used with task_sampling='uniform' or 'proportional'; remove it "
                             "or choose a sampling mode")
        if not sampling_temperature > 0:
            raise ValueError(f"sampling_temperature must be > 0, got {sampling_temperature}")
        if head_type == "identity" and (head_hidden or heads is not None):
            raise ValueError("head_type='identity' takes no head_hidden or heads")
        self.weighting = weighting if weighting is not None else EqualWeighting()
        if not isinstance(self.weighting, Weighting):
            raise TypeError(f"weighting must be a tasklight Weighting, got {type(self.weighting).__name__}")
        if not architecture.has_shared_parameters and self.weighting.needs_grads:
            raise ValueError(f"{type(self.weighting).__name__} needs per-task gradients on shared parameters, but "
                             f"{type(architecture).__name__} has none (each tower belongs to one task). Use an "
                             f"architecture with shared parameters (HardSharing, a conditioned network, CrossStitch, "
                             f"MMoE, MTAN), or a weighting that needs no gradients (StaticWeighting, "
                             f"UncertaintyWeighting, DWA, DROWeighting).")
        self.architecture = architecture
        self.head_factory = HeadFactory(head_type, head_hidden, heads)
        self.task_sampling, self.tasks_per_step = task_sampling, tasks_per_step
        self.sampling_temperature, self.sampling_seed = float(sampling_temperature), int(sampling_seed)
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.__dict__["_trunk_template"] = trunk  # not registered here: the architecture uses or copies it
        self._given_heads = heads
        self._given_losses = task_losses
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
    def trunk(self) -> nn.Module:
        """The architecture's shared trunk (hard sharing, conditioned networks, MTAN)."""
        arch = self.__dict__["_modules"]["architecture"]
        if "trunk" not in arch._modules:
            raise AttributeError(f"{type(arch).__name__} has no single shared trunk (or is not built yet)")
        return arch.trunk

    @property
    def heads(self) -> nn.ModuleList:
        """The architecture's per-task heads."""
        arch = self.__dict__["_modules"]["architecture"]
        if "heads" not in arch._modules:
            raise AttributeError(f"{type(arch).__name__} has no per-task heads (or is not built yet)")
        return arch.heads

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.task_specs]

    @property
    def task_kinds(self) -> list[str]:
        return [t.kind for t in self.task_specs]

    def setup(self, stage: Optional[str] = None) -> None:
        unshare_state(self)
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
        self._fit_auto_supports(dm)

    def _fit_auto_supports(self, dm) -> None:
        """Fit each ``HistogramLoss(support="auto")`` to the training targets of the tasks that use it."""
        users: dict[int, list[int]] = {}
        for t, loss in enumerate(self.task_losses):
            if getattr(loss, "needs_support", False):
                users.setdefault(id(loss), []).append(t)
        get = getattr(dm, "train_targets", None)
        for tasks in users.values():
            targets = None if get is None else (lambda ts=tuple(tasks): torch.cat([get(t).flatten() for t in ts]))
            fit_auto_support(self.task_losses[tasks[0]], targets, f"the DataModule {type(dm).__name__}")

    def _check_against(self, specs: list[TaskSpec], z: Optional[Tensor]) -> None:
        if len(specs) != self.num_tasks:
            raise ValueError(f"the model was built for {self.num_tasks} tasks ({self.num_tasks} heads) but the "
                             f"datamodule provides {len(specs)}; build the model for the datamodule's tasks")
        for t, (a, b) in enumerate(zip(self.task_specs, specs)):
            if a.out_features != b.out_features and self._given_losses is None:
                raise ValueError(f"task {t} ({b.name!r}): the model's head has {a.out_features} outputs but the "
                                 f"datamodule's task needs {b.out_features}")
        if z is not None:
            self.architecture.check_descriptors(int(z.shape[1]))

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
        self.task_specs = specs
        self.task_losses = nn.ModuleList([s.loss if s.loss is not None else default_loss(s.kind) for s in specs])
        self.register_buffer("task_sizes", torch.tensor([float(max(s.size, 1)) for s in specs]), persistent=False)
        self.descriptor_dim = int(descriptor_dim) if descriptor_dim is not None else T
        template = self.__dict__["_trunk_template"]
        feat = _output_size(template, example)
        self.architecture.build(template, specs, self.descriptor_dim, feat, self.head_factory, example)
        self.weighting.setup(T, [s.lower_bound for s in specs])
        self.built = True

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
        check_input_dtype("MultiTaskModule", batch.x, self, "batch's inputs")
        self.architecture.check_descriptors(int(batch.z.shape[1]))
        if len(batch) and (int(batch.task.min()) < 0 or int(batch.task.max()) >= T):
            raise ValueError(f"the batch has task ids outside 0..{T - 1}; the model was built for {T} tasks")
        rows = [(batch.task == t).nonzero().flatten() for t in range(T)]
        rows = [r if r.numel() else None for r in rows]
        outputs, rep = self.architecture(batch.x, batch.z, rows)
        dev = batch.x.device
        # losses, counts and metrics in the outputs' precision (float64 stays float64; half -> float32)
        dt = torch.promote_types(next((o.dtype for o in outputs if o is not None), torch.float32), torch.float32)
        losses = torch.zeros(T, device=dev, dtype=dt)
        counts = torch.zeros(T, device=dev, dtype=dt)
        metric_sums = torch.zeros(T, device=dev, dtype=dt)
        if with_losses:
            per = []
            for t, r in enumerate(rows):
                if r is None:
                    per.append(torch.zeros((), device=dev, dtype=dt))
                    continue
                y = batch.y[r]
                if self.task_specs[t].kind != "objective":
                    y = align_target(outputs[t], y, self.task_losses[t], f"the head of task {t} "
                                     f"({self.task_specs[t].name!r})")
                per.append(self.task_losses[t](outputs[t], y).reshape(()).to(dt))
                counts[t] = r.numel()
                metric_sums[t] = self._metric_sum(t, outputs[t].detach(), y).to(dt)
            losses = torch.stack(per)
        return _Forward(outputs, rows, losses, counts, metric_sums, rep)

    def _metric_sum(self, t: int, out: Tensor, y: Tensor) -> Tensor:
        kind = self.task_specs[t].kind
        if kind == "classification":
            return (out.argmax(-1) == y).float().sum()
        if kind == "regression":
            loss = self.task_losses[t]
            pred = loss.predict(out) if hasattr(loss, "predict") else out
            dt = torch.promote_types(pred.dtype, torch.float32)
            return ((pred.reshape(y.shape).to(dt) - y.to(dt)) ** 2).sum()
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
        gen = seeded_generator(self.sampling_seed, int(step))
        if self.task_sampling == "uniform":
            p = torch.ones(T)
        else:
            p = self.task_sizes.detach().cpu().double() ** (1.0 / self.sampling_temperature)
        chosen = torch.multinomial(p / p.sum(), k, replacement=False, generator=gen)
        mask = torch.zeros(T, dtype=torch.bool)
        mask[chosen] = True
        return mask

    def shared_parameters(self) -> list[nn.Parameter]:
        """The parameters shared by all tasks (see the architecture's ``shared_parameters``)."""
        return self.architecture.shared_parameters()

    def _task_specific_parameters(self, t: int) -> list[nn.Parameter]:
        return self.architecture.task_parameters(t)

    def _row_grads(self, fw: _Forward) -> Tensor:
        """``d L_{task(n)} / d rep_n`` for every row: one backward pass through the heads."""
        if fw.rep is None:
            raise ValueError(f"representation gradients need a shared representation, which "
                             f"{type(self.architecture).__name__} does not have; use grad_source='parameters'")
        return torch.autograd.grad(fw.losses.sum(), fw.rep, retain_graph=True)[0]

    def _local_task_gradients(self, fw: _Forward, source: str, row_grads: Optional[Tensor]) -> Tensor:
        """Per-task gradients ``[T, P]`` of the local mean losses (zeros for absent tasks)."""
        T = self.num_tasks
        present = [t for t, r in enumerate(fw.rows) if r is not None]
        if source == "representation":
            R = row_grads if row_grads is not None else self._row_grads(fw)
            R = R.reshape(R.shape[0], -1)
            out = torch.zeros(T, R.shape[1], device=R.device, dtype=R.dtype)
            if present:  # one scatter-add of every row's gradient into its task's row
                rows = torch.cat([fw.rows[t] for t in present])
                task = torch.cat([torch.full((fw.rows[t].numel(),), t, device=R.device) for t in present])
                out.index_add_(0, task, R[rows])
            return out
        params = self.shared_parameters()
        out = torch.zeros(T, sum(p.numel() for p in params), device=fw.losses.device, dtype=fw.losses.dtype)
        if present:
            idx = torch.tensor(present, device=fw.losses.device)
            out[idx] = task_jacobian(fw.losses[idx], params, self.task_gradient_engine,
                                     self.task_gradient_chunk).to(out)
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

    def request_task_gradients(self, source: str) -> None:
        """Ask the next training step to compute (and sync) the per-task gradients from ``source``;
        they are left in ``last_task_gradients`` as ``(grads [T, P], active [T])``."""
        if source not in GRAD_SOURCES:
            raise ValueError(f"grad source must be one of {GRAD_SOURCES}, got {source!r}")
        self.shared_parameters()  # raises the clear error for an architecture without shared parameters
        self._grad_request = source

    # ------------------------------------------------------------------ Lightning hooks
    def configure_optimizers(self):
        return configure_outer_optimizers(self.optimizer_factory, self.scheduler_factory, self.parameters())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        losses = []
        for t in self.task_specs:
            try:
                losses.append(to_config(t.loss))
            except NotConfigurable:
                losses.append(None)
        checkpoint["multitask"] = {"tasks": [(t.name, t.out_features, t.kind, t.size, t.lower_bound)
                                             for t in self.task_specs],
                                   "losses": losses, "descriptor_dim": self.descriptor_dim,
                                   "architecture": type(self.architecture).__name__}
        stamp_checkpoint(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Build the network from the checkpoint's task list when it is not built yet (e.g. in
        ``MultiTaskModule.load_from_checkpoint(path, trunk=..., architecture=...)``; the architecture is
        the default HardSharing when not given). Task losses default by kind; give
        ``task_losses`` for custom ones."""
        verify_checkpoint(self, checkpoint)
        saved = checkpoint.get("multitask")
        if saved is None:
            return
        arch = saved.get("architecture")
        if arch is not None and arch != type(self.architecture).__name__:
            raise ValueError(f"the checkpoint was saved with architecture {arch} but this model has "
                             f"{type(self.architecture).__name__}; pass the same architecture, e.g. "
                             f"load_from_checkpoint(path, trunk=..., architecture={arch}(...))")
        if self.built:
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
        step = int(self.global_step)
        active = self.sample_tasks(step).to(batch.task.device)
        if not bool(active.all()):
            batch = batch.select(active[batch.task])
        fw = self._forward(batch)
        weighting = self.weighting
        direction = weighting.direction_only and self.architecture.heads_on_representation and any(
            p.requires_grad for t in range(self.num_tasks) for p in self._task_specific_parameters(t))
        direction = direction and not weighting.gives_direction  # such a method sets the shared update itself
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
        shared_dir = weighting.shared_direction(stats, weights) if weighting.gives_direction else None
        if shared_dir is not None:  # heads: their own (task-weighted) loss; shared: the method's direction
            total = weighting.loss(scaled, weighting.task_weights(weights).to(fw.losses))
        elif direction:
            # heads: their own loss (weighted by task_weights); trunk: sum_t w_t grad L_t (via d L / d rep)
            head_w = weighting.task_weights(weights).to(fw.losses)
            total = weighting.loss(scaled, head_w)
            row_coef = torch.zeros(len(batch), device=fw.losses.device, dtype=fw.losses.dtype)
            for t, r in enumerate(fw.rows):
                if r is not None:
                    row_coef[r] = scale[t] * (weights[t] - head_w[t])
            rep = fw.rep.reshape(fw.rep.shape[0], -1)
            total = total + (row_coef[:, None] * row_grads.reshape(rep.shape).detach() * rep).sum()
        else:
            total = weighting.loss(scaled, weights)
        penalty = self.architecture.penalty()
        if penalty is not None:
            total = total + penalty
        idle = [p for t in range(self.num_tasks) if not bool(present[t]) for p in self._task_specific_parameters(t)]
        if idle:  # keep every parameter in the graph (DDP), then drop their zero gradients below
            total = total + 0.0 * sum(p.sum() for p in idle)
        problem = None
        finite = torch.isfinite(fw.losses.detach())
        if not bool(finite.all()):
            t = int((~finite).nonzero()[0, 0])
            problem = f"non-finite loss of task {t} ({self.task_specs[t].name!r})"

        def drop_idle_grads() -> None:
            for p in idle:
                p.grad = None
            if shared_dir is not None:
                _set_shared_grads(self.shared_parameters(), shared_dir)

        outer_step(self, total, problem=problem, after_backward=drop_idle_grads)
        if self._grad_request is not None:
            self.last_task_gradients = (grads[self._grad_request].detach(), present.detach())
            self._grad_request = None
        self.log("train/objective", total.detach(), prog_bar=True, batch_size=len(batch))
        return {"loss": total.detach(), "task_loss_sum": (fw.counts * fw.losses).detach(), "task_count": fw.counts,
                "task_metric_sum": fw.metric_sums, "weights": weights.detach(), "active": present}

    def _eval_step(self, batch: MultiTaskBatch, stage: str = "test", batch_idx: int = 0) -> dict:
        # examples the distributed sampler repeated to even out the ranks are not counted
        valid = eval_valid_mask(self, stage, batch_idx, len(batch), device=batch.x.device)
        if valid is not None:
            if not bool(valid.any()):
                zeros = torch.zeros(self.num_tasks, device=batch.x.device)
                return {"task_loss_sum": zeros, "task_count": zeros, "task_metric_sum": zeros}
            batch = batch.select(valid)
        fw = self._forward(batch)
        return {"task_loss_sum": (fw.counts * fw.losses).detach(), "task_count": fw.counts,
                "task_metric_sum": fw.metric_sums}

    def validation_step(self, batch: MultiTaskBatch, batch_idx: int) -> dict:
        return self._eval_step(batch, "val", batch_idx)

    def test_step(self, batch: MultiTaskBatch, batch_idx: int) -> dict:
        return self._eval_step(batch, "test", batch_idx)

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


def _set_shared_grads(params: list[nn.Parameter], direction: Tensor) -> None:
    """Give the shared parameters the gradient ``direction`` ``[P]`` (identical on every DDP rank)."""
    size = sum(p.numel() for p in params)
    if direction.shape != (size,):
        raise ValueError(f"the weighting's shared direction has shape {tuple(direction.shape)} but the shared "
                         f"parameters have {size} entries; compute it from grad_source='parameters' gradients")
    offset = 0
    for p in params:
        p.grad = direction[offset: offset + p.numel()].detach().reshape(p.shape).to(p).clone()
        offset += p.numel()


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
