"""The batch contracts: ``MetaBatch`` (every meta-learner) and ``MultiTaskBatch`` / ``TaskSpec``
(the multi-task learner)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, Optional

import torch
from torch import Tensor, nn


class _TensorFields:
    """A dataclass of tensors (``None`` allowed): one way to apply a function to every field."""

    def _map(self, fn, skip: tuple[str, ...] = ()):
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return type(self)(**{k: v if v is None or k in skip else fn(v) for k, v in values.items()})

    def to(self, *args, **kwargs):
        return self._map(lambda t: t.to(*args, **kwargs))


@dataclass
class MetaBatch(_TensorFields):
    """A batch of T tasks, task dimension first.

    ``support_x [T, S, ...]``, ``support_y [T, S, ...]``, ``query_x [T, Q, ...]``,
    ``query_y [T, Q, ...]``. ``index`` optionally records which meta-batch of the sampler's
    stream this is (used to check determinism and resumption).
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    index: Optional[Tensor] = None

    def __post_init__(self) -> None:
        check_episode_shapes(self.support_x, self.support_y, self.query_x, self.query_y, batched=True)

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def float_(self, dtype: torch.dtype) -> "MetaBatch":
        """Cast the floating inputs (and floating targets) to ``dtype``."""
        return self._map(lambda t: t.to(dtype) if t.is_floating_point() else t, skip=("index",))

    __iter__ = None  # not iterable: indexing selects tasks, iteration would silently split the batch

    def __getitem__(self, item) -> "MetaBatch":
        """Select tasks, e.g. ``batch[:2]``."""
        return self._map(lambda t: t[item])

    @staticmethod
    def cat(batches: list["MetaBatch"]) -> "MetaBatch":
        """Concatenate meta-batches along the task dimension."""
        idx = None if any(b.index is None for b in batches) else torch.cat([b.index for b in batches])
        return MetaBatch(*(torch.cat([getattr(b, n) for b in batches]) for n in
                           ("support_x", "support_y", "query_x", "query_y")), index=idx)


def collate_tasks(tasks: list[tuple[Tensor, Tensor, Tensor, Tensor]]) -> MetaBatch:
    """Stack per-task ``(support_x, support_y, query_x, query_y)`` tuples into a MetaBatch."""
    return MetaBatch(*(torch.stack([t[i] for t in tasks]) for i in range(4)))


def _same_leading(name: str, t: Tensor, other_name: str, other: Tensor, lead: int, dims: str, layout: str) -> None:
    if t.shape[:lead] != other.shape[:lead]:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {other_name} has {tuple(other.shape)}: "
                         f"their leading ({dims}) dims must agree; {layout}.")


def check_episode_shapes(support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Optional[Tensor] = None,
                         *, batched: Optional[bool] = None) -> bool:
    """Validate an episode's tensors; return True if they carry a task dimension.

    Raises one ``ValueError`` that names the mismatch and the expected layout.
    """
    layout = ("expected support_x [T, S, *features] (or [S, *features]), support_y [T, S, *targets], "
              "query_x [T, Q, *features]")
    for name, t in (("support_x", support_x), ("support_y", support_y), ("query_x", query_x)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}; {layout}.")
    if support_x.dim() != query_x.dim():
        raise ValueError(f"support_x has {support_x.dim()} dims {tuple(support_x.shape)} but query_x has "
                         f"{query_x.dim()} dims {tuple(query_x.shape)}: give both with or both without the task "
                         f"dimension; {layout}.")
    if batched is None:
        batched = support_x.dim() >= 3 and support_y.dim() >= 2
    lead = 2 if batched else 1
    if support_x.dim() < lead:
        raise ValueError(f"support_x has shape {tuple(support_x.shape)}; {layout}.")
    _same_leading("support_y", support_y, "support_x", support_x, lead, "task, shot", layout)
    if support_x.shape[lead:] != query_x.shape[lead:]:
        raise ValueError(f"support_x features {tuple(support_x.shape[lead:])} differ from query_x features "
                         f"{tuple(query_x.shape[lead:])}; {layout}.")
    if batched and support_x.shape[0] != query_x.shape[0]:
        raise ValueError(f"support_x has {support_x.shape[0]} tasks but query_x has {query_x.shape[0]}; {layout}.")
    if query_y is not None:
        _same_leading("query_y", query_y, "query_x", query_x, lead, "task, query", layout)
        if query_y.shape[lead:] != support_y.shape[lead:]:
            raise ValueError(f"query_y target shape {tuple(query_y.shape[lead:])} differs from support_y's "
                             f"{tuple(support_y.shape[lead:])}; {layout}.")
    return batched


# ----------------------------------------------------------------------------- multi-task contracts
TaskKind = Literal["classification", "regression", "objective"]
TASK_KINDS = ("classification", "regression", "objective")


# ----------------------------------------------------------------------------- contracts
@dataclass
class MultiTaskBatch(_TensorFields):
    """Examples of several tasks: ``x [N, ...]``, ``y [N, ...]``, ``task [N]`` (long), ``z [N, d]``.

    ``index`` optionally records which training step of the stream this batch is.
    """

    x: Tensor
    y: Tensor
    task: Tensor
    z: Tensor
    index: Optional[Tensor] = None

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        if self.y.shape[0] != n or self.task.shape != (n,) or self.z.dim() != 2 or self.z.shape[0] != n:
            raise ValueError(f"MultiTaskBatch needs x [N, ...], y [N, ...], task [N], z [N, d] with one N; got x "
                             f"{tuple(self.x.shape)}, y {tuple(self.y.shape)}, task {tuple(self.task.shape)}, z "
                             f"{tuple(self.z.shape)}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def select(self, mask: Tensor) -> "MultiTaskBatch":
        """The examples where ``mask`` is True (a bool ``[N]`` tensor)."""
        return self._map(lambda t: t[mask], skip=("index",))  # the step index is not per example


@dataclass
class TaskSpec:
    """One task as the model sees it.

    Attributes:
        name: shown in logs.
        out_features: the size of the task's head output (classes, 1 for scalar regression, bins...).
        kind: ``classification`` (cross-entropy, accuracy), ``regression`` (MSE, MSE metric) or
            ``objective`` (the loss is the objective itself, no separate metric; ``loss`` required).
        loss: the task loss ``loss(output, y) -> scalar mean`` (default by ``kind``).
        size: number of training examples (used by proportional task sampling).
        lower_bound: a known lower bound of the loss (0 for cross-entropy and MSE), used by the
            weighting methods built on loss ratios or logs (uncertainty, DWA, GradNorm).
    """

    name: str
    out_features: int
    kind: TaskKind = "classification"
    loss: Optional[nn.Module] = None
    size: int = 0
    lower_bound: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if self.out_features < 1:
            raise ValueError(f"task {self.name!r}: out_features must be >= 1, got {self.out_features}")
        if self.kind == "objective" and self.loss is None:
            raise ValueError(f"task {self.name!r} has kind 'objective' but no loss; give TaskSpec(loss=...)")


def default_loss(kind: str) -> nn.Module:
    return nn.CrossEntropyLoss() if kind == "classification" else nn.MSELoss()
