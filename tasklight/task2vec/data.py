"""A task's data for Task2Vec: ``(x, y)`` tensors from tensors, Datasets, DataLoaders or DataModules."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

TaskData = Union[tuple[Tensor, Tensor], Dataset, DataLoader]


def task_tensors(data: TaskData, name: str = "") -> tuple[Tensor, Tensor]:
    """A task's examples as ``(x [N, ...] float, y [N] long)``.

    ``data`` is an ``(x, y)`` pair of tensors, a ``Dataset`` of ``(x, y)`` items, or a ``DataLoader``
    yielding ``(x, y)`` batches. Raises one clear error for empty data, mismatched lengths,
    non-floating inputs or non-integer labels.
    """
    what = f"task {name!r}" if name else "the task"
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
    elif isinstance(data, DataLoader):
        xs, ys = [], []
        for batch in data:
            bx, by = _pair(batch, what)
            xs.append(bx)
            ys.append(torch.as_tensor(by))
        if not xs:
            raise ValueError(f"{what} is empty: its DataLoader yielded no batches; give it at least two "
                             f"examples of two classes.")
        x, y = torch.cat(xs), torch.cat(ys)
    elif isinstance(data, Dataset) and callable(getattr(data, "fetch", None)):  # indexed in one call
        x, y = data.fetch(torch.arange(len(data)))  # type: ignore[arg-type]
    elif isinstance(data, TensorDataset) and len(data.tensors) >= 2:
        x, y = data.tensors[0], data.tensors[1]
    elif isinstance(data, Dataset):
        try:
            n = len(data)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"{what}: an iterable Dataset has no length; wrap it in a DataLoader") from None
        if n == 0:
            raise ValueError(f"{what} is empty: its Dataset has no examples; give it at least two examples of two "
                             f"classes.")
        items = [_pair(data[i], what) for i in range(n)]
        x = torch.stack([torch.as_tensor(a) for a, _ in items])
        y = torch.stack([torch.as_tensor(b) for _, b in items])
    else:
        raise TypeError(f"{what}: expected an (x, y) pair of tensors, a Dataset or a DataLoader of (x, y), got "
                        f"{type(data).__name__}")
    if x.shape[0] == 0:
        raise ValueError(f"{what} is empty (x has shape {tuple(x.shape)}); give it at least two examples of two "
                         f"classes.")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{what}: labels must have shape [N] matching x's first dim {x.shape[0]}, got "
                         f"{tuple(y.shape)}; Task2Vec embeds classification tasks with one integer label per example.")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{what}: labels must be integer class ids, got dtype {y.dtype}; Task2Vec embeds "
                         f"classification tasks (convert labels with .long()).")
    if not x.is_floating_point():
        raise ValueError(f"{what}: inputs must be floating point, got dtype {x.dtype}; convert them as the probe "
                         f"expects (e.g. images.float() / 255).")
    return x, y.long()


def _pair(item: Any, what: str) -> tuple[Tensor, Tensor]:
    if isinstance(item, Mapping) and "x" in item and "y" in item:
        return item["x"], item["y"]
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return item[0], item[1]
    raise TypeError(f"{what}: every item must be an (x, y) pair, got {type(item).__name__}")


def _batches(n: int, size: int):
    for lo in range(0, n, size):
        yield slice(lo, min(n, lo + size))


def datamodule_tasks(datamodule: Any, split: str = "val", max_tasks: Optional[int] = None) -> dict[str, TaskData]:
    """The tasks of a DataModule as ``name -> data``, for the callback and ``tasklight embed``.

    Looked up in this order:

    1. ``datamodule.task2vec_tasks(split)``: any DataModule can define it and return a mapping
       ``name -> (x, y) | Dataset | DataLoader``;
    2. a multi-task DataModule (``MultiTaskDataModule`` and subclasses: ``tasks`` and
       ``train_sets``/``val_sets``/``test_sets``): each task's dataset of ``split``, in task order,
       so that row ``i`` of the embeddings is task ``i`` (what its ``task_descriptors`` expects);
    3. an episodic (meta-learning) DataModule (one with ``task_fn(split)``, e.g.
       ``OmniglotDataModule``): its fixed evaluation episodes ``0, 1, ...`` of ``split``, each
       episode's support and query sets together as one task.
    """
    if datamodule is None:
        raise ValueError("no DataModule to take tasks from: pass one to the Trainer (datamodule=...) or to the script")
    if max_tasks is not None and max_tasks < 1:
        raise ValueError(f"max_tasks must be >= 1 (or None for all), got {max_tasks}")
    kind = type(datamodule).__name__
    hook = getattr(datamodule, "task2vec_tasks", None)
    if callable(hook):
        tasks = dict(hook(split))
    elif hasattr(datamodule, "train_sets") and hasattr(datamodule, "tasks"):
        datamodule.setup()
        sets = getattr(datamodule, f"{split}_sets", None)
        if sets is None:
            raise ValueError(f"{kind} has no {split!r} split; use split 'train', 'val' or 'test'")
        tasks = {}
        for t, (spec, ds) in enumerate(zip(datamodule.tasks, sets)):
            name = str(getattr(spec, "name", f"task{t}"))
            if getattr(spec, "kind", "classification") != "classification":
                raise ValueError(f"task {name!r} of {kind} is a {spec.kind} task; Task2Vec embeds classification "
                                 f"tasks (the Fisher of a softmax classifier)")
            if ds is None:
                raise ValueError(f"task {name!r} of {kind} has no {split} set; embed another split (e.g. 'train')")
            tasks[name] = ds
    elif callable(getattr(datamodule, "task_fn", None)):
        from tasklight.data.episodes import EpisodeSet

        count = {"val": getattr(datamodule, "val_episodes", None), "test": getattr(datamodule, "test_episodes", None)}
        n = max_tasks or count.get(split) or 16
        episodes = EpisodeSet(datamodule.task_fn(split), n, getattr(datamodule, "seed", 0), stream=split)
        tasks = {}
        for i in range(n):
            sx, sy, qx, qy = episodes[i]
            tasks[f"episode{i}"] = (torch.cat([sx, qx]), torch.cat([sy, qy]))
    else:
        raise TypeError(f"{kind} does not expose its tasks: give it a method `task2vec_tasks(split) -> "
                        f"dict[name, (x, y)]` (or use a multi-task or episodic DataModule)")
    if not tasks:
        raise ValueError(f"{kind} has no tasks in the {split!r} split")
    names = list(tasks)[:max_tasks] if max_tasks is not None else list(tasks)
    return {str(k): tasks[k] for k in names}
