"""Multi-task data: one dataset per task, combined into batches that carry the task id and z_i.

* :class:`MultiTaskBatch` (in :mod:`tasklight.data.batch`) -- the batch contract of :class:`~tasklight.multitask.module.MultiTaskModule`:
  ``x [N, ...]``, ``y [N, ...]``, ``task [N]`` (task id of each example) and ``z [N, d]`` (the task
  descriptor of each example's task).
* :class:`TaskSpec` (in :mod:`tasklight.data.batch`) -- what the model needs to know about a task (name, output size, kind, loss).
* :class:`MultiTaskDataModule` -- combines one dataset per task. Training batches hold
  ``batch_size_per_task`` examples of every task (tasks contiguous, in task order); every task is
  walked through a seeded permutation, pass after pass, and DDP ranks take disjoint slices of it.
  Validation/test batches are the concatenated held-out sets.
* :class:`OmniglotAlphabetsDataModule` -- every alphabet of Omniglot is a task (classification over its
  characters); held-out drawers give validation and test sets.
* :class:`OverlaidOmniglotDataModule` -- two tasks on the same images (MultiMNIST-style): each image is a
  canvas with two overlapping Omniglot characters; task "left" names the up-left one, task "right" the
  down-right one.

Task descriptors ``z_i`` are one-hot by default; ``task_descriptors`` takes any ``[T, d]`` tensor
(or the path of a ``.pt`` file holding one), e.g. Task2Vec embeddings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from tasklight.config import RecordsInit
from tasklight.data.episodes import EpisodeStream, EpisodicDataModule, episode_generator
from tasklight.data.batch import TASK_KINDS, MultiTaskBatch, TaskKind, TaskSpec, default_loss  # noqa: F401
from tasklight.core.checks import check_int


def load_descriptors(descriptors: Union[Tensor, str, Path, None], num_tasks: int,
                     task_names: Sequence[str] = ()) -> Tensor:
    """The ``[T, d]`` float task descriptors: one-hot when None, a tensor, or a ``.pt`` file holding one."""
    if descriptors is None:
        return torch.eye(num_tasks)
    if isinstance(descriptors, (str, Path)):
        path = Path(descriptors)
        if not path.exists():
            raise FileNotFoundError(f"task_descriptors file {path} does not exist; give a .pt file holding a [T, d] "
                                    f"tensor (torch.save(tensor, path)) or a tensor")
        descriptors = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(descriptors, Tensor):
        descriptors = torch.as_tensor(np.asarray(descriptors))
    z = descriptors.detach().float()
    if z.dim() == 1:
        z = z[:, None]
    names = f" (tasks in order: {list(task_names)})" if task_names else ""
    if z.dim() != 2 or z.shape[0] != num_tasks:
        raise ValueError(f"task_descriptors has shape {tuple(z.shape)} but there are {num_tasks} tasks; give one "
                         f"row per task, shape [{num_tasks}, d]{names}")
    if not torch.isfinite(z).all():
        raise ValueError("task_descriptors contain NaN or inf values; give finite descriptors")
    return z


def _fetch(ds: Dataset, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Examples ``idx`` of a task dataset as ``(x [n, ...], y [n, ...])``."""
    if hasattr(ds, "fetch"):
        return ds.fetch(idx)
    if isinstance(ds, TensorDataset):
        return ds.tensors[0][idx], ds.tensors[1][idx]
    items = [ds[int(i)] for i in idx]
    return (torch.stack([torch.as_tensor(it[0]) for it in items]),
            torch.stack([torch.as_tensor(it[1]) for it in items]))


class ImageTask(Dataset):
    """A classification task over uint8 images ``[n, H, W]`` (returned as float ``[1, H, W]`` in [0, 1])."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def fetch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        return self.images[idx].float().div_(255.0).unsqueeze(1), self.labels[idx]

    def __getitem__(self, i: int):
        x, y = self.fetch(torch.tensor([i]))
        return x[0], y[0]


# ----------------------------------------------------------------------------- the training stream
class MultiTaskStream(EpisodeStream):
    """Training batches ``start, start+1, ...`` up to the end of the current epoch.

    Batch ``i`` on rank ``r`` of ``R`` holds, for every task, the examples at positions
    ``(i*R + r)*b ... (i*R + r + 1)*b - 1`` of the task's endless stream of seeded permutations
    (one permutation per pass over the task's data). Ranks therefore see disjoint examples, every
    example is seen once per pass, and a batch is a pure function of ``(seed, i, r, R)``: the stream
    is the same for any number of DataLoader workers and resumes exactly.
    """

    def __init__(self, datasets: Sequence[Dataset], descriptors: Tensor, batch_size_per_task: int,
                 steps_per_epoch: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        # the episode stream's epoch/worker logic, with multi-task batches for meta-batches
        super().__init__(self._unused, 1, steps_per_epoch, seed, rank, start)
        self.datasets, self.descriptors = list(datasets), descriptors
        self.b, self.steps_per_epoch, self.world_size = batch_size_per_task, steps_per_epoch, world_size
        self.sizes = [len(d) for d in self.datasets]
        self._perm_cache: dict[tuple[int, int], Tensor] = {}

    @staticmethod
    def _unused(gen):  # pragma: no cover - batches come from batch(), not from a task function
        raise NotImplementedError

    def _perm(self, task: int, epoch_pass: int) -> Tensor:
        key = (task, epoch_pass)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 4 * len(self.datasets):
                self._perm_cache.clear()
            gen = episode_generator(self.seed, 10 + task, 0, epoch_pass)
            self._perm_cache[key] = torch.randperm(self.sizes[task], generator=gen)
        return self._perm_cache[key]

    def task_indices(self, task: int, step: int) -> Tensor:
        n, b = self.sizes[task], self.b
        pos = torch.arange((step * self.world_size + self.rank) * b, (step * self.world_size + self.rank + 1) * b)
        passes = pos // n
        out = torch.empty(b, dtype=torch.long)
        for p in passes.unique().tolist():
            sel = passes == p
            out[sel] = self._perm(task, p)[pos[sel] % n]
        return out

    def batch(self, step: int) -> MultiTaskBatch:
        xs, ys, ts = [], [], []
        for t, ds in enumerate(self.datasets):
            x, y = _fetch(ds, self.task_indices(t, step))
            xs.append(x)
            ys.append(y)
            ts.append(torch.full((self.b,), t, dtype=torch.long))
        task = torch.cat(ts)
        return MultiTaskBatch(torch.cat(xs), torch.cat(ys), task, self.descriptors[task],
                              index=torch.tensor([step], dtype=torch.long))

    def meta_batch(self, index: int) -> MultiTaskBatch:
        return self.batch(index)


class _EvalSet(Dataset):
    """The held-out sets of all tasks, concatenated; item ``i`` is ``(x, y, task)``."""

    def __init__(self, datasets: Sequence[Optional[Dataset]]) -> None:
        self.datasets = datasets
        self.offsets = np.cumsum([0] + [len(d) if d is not None else 0 for d in datasets])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int):
        t = int(np.searchsorted(self.offsets, i, side="right") - 1)
        x, y = _fetch(self.datasets[t], torch.tensor([i - int(self.offsets[t])]))
        return x[0], y[0], t


class _Collate:
    def __init__(self, descriptors: Tensor) -> None:
        self.descriptors = descriptors

    def __call__(self, items) -> MultiTaskBatch:
        task = torch.tensor([it[2] for it in items], dtype=torch.long)
        return MultiTaskBatch(torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items]), task,
                              self.descriptors[task])


# ----------------------------------------------------------------------------- the DataModule
class MultiTaskDataModule(RecordsInit, LightningDataModule):
    """Combines one dataset per task into multi-task batches.

    Give the datasets in Python (``train_sets``, ``val_sets``, ``test_sets``, ``tasks``), or subclass
    and implement :meth:`build`. A task dataset is any map-style dataset of ``(x, y)`` pairs (a
    ``TensorDataset`` or anything with ``fetch(indices) -> (x, y)`` is indexed in one call).

    Args:
        tasks: one :class:`TaskSpec` per task (default: classification with ``max(y) + 1`` classes).
        train_sets, val_sets, test_sets: one dataset per task (val/test entries may be None).
        batch_size_per_task: training examples of every task in each batch (per DDP rank).
        steps_per_epoch: training batches per epoch (per rank).
        eval_batch_size: examples per validation/test batch.
        task_descriptors: ``[T, d]`` tensor, or the path of a ``.pt`` file holding one, giving each
            task's descriptor z_i (default: one-hot). Task2Vec embeddings fit here.
        seed: root of the training stream's randomness.
        num_workers: DataLoader workers (the stream is identical for any number).
    """

    def __init__(self, tasks: Optional[list[TaskSpec]] = None, train_sets: Optional[list[Dataset]] = None,
                 val_sets: Optional[list[Optional[Dataset]]] = None,
                 test_sets: Optional[list[Optional[Dataset]]] = None, batch_size_per_task: int = 16,
                 steps_per_epoch: int = 100, eval_batch_size: int = 256,
                 task_descriptors: Optional[Union[Tensor, str]] = None, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        for name, value in (("batch_size_per_task", batch_size_per_task), ("steps_per_epoch", steps_per_epoch),
                            ("eval_batch_size", eval_batch_size)):
            check_int(type(self).__name__, name, value, 1)
        check_int(type(self).__name__, "seed", seed, 0)
        if batch_size_per_task < 1 or steps_per_epoch < 1 or eval_batch_size < 1:
            raise ValueError(f"batch_size_per_task, steps_per_epoch and eval_batch_size must be >= 1, got "
                             f"{batch_size_per_task}, {steps_per_epoch}, {eval_batch_size}")
        self._given = (tasks, train_sets, val_sets, test_sets)
        self.batch_size_per_task, self.steps_per_epoch = batch_size_per_task, steps_per_epoch
        self.eval_batch_size, self.seed, self.num_workers = eval_batch_size, seed, num_workers
        self._descriptor_source = task_descriptors
        self.tasks: list[TaskSpec] = []
        self.train_sets: list[Dataset] = []
        self.val_sets: list[Optional[Dataset]] = []
        self.test_sets: list[Optional[Dataset]] = []
        self.descriptors: Optional[Tensor] = None
        self.consumed = 0
        self._train_stream: Optional[MultiTaskStream] = None

    # ------------------------------------------------------------------ building
    def build(self) -> tuple[Optional[list[TaskSpec]], list[Dataset], list[Optional[Dataset]],
                             list[Optional[Dataset]]]:
        """``(tasks, train_sets, val_sets, test_sets)``; subclasses override this."""
        tasks, train, val, test = self._given
        if train is None:
            raise ValueError("MultiTaskDataModule needs train_sets (one dataset per task), or a subclass that "
                             "implements build()")
        return tasks, list(train), list(val) if val is not None else [], list(test) if test is not None else []

    def setup(self, stage: Optional[str] = None) -> None:
        if self.descriptors is not None:
            return
        tasks, train, val, test = self.build()
        num = len(train)
        if num == 0:
            raise ValueError("MultiTaskDataModule got no tasks (train_sets is empty)")
        for name, sets in (("val_sets", val), ("test_sets", test)):
            if sets and len(sets) != num:
                raise ValueError(f"{name} has {len(sets)} entries but there are {num} training sets; give one per "
                                 f"task (None for a task without one)")
        if tasks is None:
            tasks = [TaskSpec(f"task{t}", int(_fetch(ds, torch.arange(len(ds)))[1].max()) + 1 if len(ds) else 1)
                     for t, ds in enumerate(train)]
        if len(tasks) != num:
            raise ValueError(f"got {len(tasks)} task specs but {num} training sets; give one TaskSpec per task")
        for spec, ds in zip(tasks, train):
            if len(ds) == 0:
                raise ValueError(f"task {spec.name!r} has no training data (an empty dataset); remove the task or "
                                 f"give it examples")
            spec.size = len(ds)
        self.tasks, self.train_sets = list(tasks), train
        self.val_sets = val or [None] * num
        self.test_sets = test or [None] * num
        self.descriptors = load_descriptors(self._descriptor_source, num, [t.name for t in tasks])

    def train_targets(self, task: int) -> Tensor:
        """All training targets of task ``task`` (e.g. to fit a ``HistogramLoss(support="auto")``)."""
        self.setup()
        if not 0 <= task < len(self.train_sets):
            raise IndexError(f"task {task} out of range: there are {len(self.train_sets)} tasks")
        ds = self.train_sets[task]
        return _fetch(ds, torch.arange(len(ds)))[1]

    @property
    def num_tasks(self) -> int:
        self.setup()
        return len(self.tasks)

    @property
    def task_specs(self) -> list[TaskSpec]:
        self.setup()
        return self.tasks

    @property
    def task_descriptors(self) -> Tensor:
        self.setup()
        return self.descriptors

    # ------------------------------------------------------------------ loaders
    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (int(t.global_rank), int(t.world_size)) if t is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        rank, world = self._rank_world()
        self._train_stream = MultiTaskStream(self.train_sets, self.descriptors, self.batch_size_per_task,
                                             self.steps_per_epoch, self.seed, rank, world, start=self.consumed)
        return DataLoader(self._train_stream, batch_size=None, num_workers=self.num_workers)

    def eval_dataloader(self, split: Literal["val", "test"], tasks: Optional[Sequence[int]] = None) -> DataLoader:
        """The ``split`` (``"val"`` or ``"test"``) sets of the tasks ``tasks`` only (default: every task),
        e.g. to evaluate each task at its own checkpoint."""
        self.setup()
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        sets = self.val_sets if split == "val" else self.test_sets
        if tasks is None:
            return self._eval_loader(sets, split)
        keep = {int(t) for t in tasks}
        bad = sorted(t for t in keep if not 0 <= t < len(sets))
        if bad:
            raise IndexError(f"tasks {bad} out of range: there are {len(sets)} tasks")
        return self._eval_loader([s if t in keep else None for t, s in enumerate(sets)], split)

    def _eval_loader(self, sets: list[Optional[Dataset]], split: str) -> DataLoader:
        self.setup()
        if all(s is None or len(s) == 0 for s in sets):
            raise ValueError(f"no task has a {split} set; give {split}_sets (or use a subclass that builds them)")
        return DataLoader(_EvalSet(sets), batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=_Collate(self.descriptors), num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        """The predict split is every task's test set (``tasklight predict``)."""
        return self.eval_dataloader("test")

    # ------------------------------------------------------------------ resumption
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        trainer = self.trainer
        if (trainer is not None and trainer.training and isinstance(batch, MultiTaskBatch)
                and batch.index is not None):
            self.consumed = int(batch.index[0]) + 1
            if self._train_stream is not None:
                self._train_stream.start = self.consumed
        return batch

    # the same resumption state as the episodic DataModules: batches consumed and the stream's seed
    state_dict = EpisodicDataModule.state_dict
    load_state_dict = EpisodicDataModule.load_state_dict


def drawer_ranks(data, split_seed: Optional[int]) -> Tensor:
    """Each image's position in its character's drawer order: the drawer number when ``split_seed`` is None,
    else its rank in the character's own seeded permutation of the drawers
    (:func:`~tasklight.core.seeding.seeded_generator` ``(split_seed, character)``)."""
    if split_seed is None:
        return data.image_drawer
    from tasklight.core.seeding import seeded_generator

    drawers = data.image_drawer
    top = int(drawers.max()) + 1
    ranks = torch.empty_like(drawers)
    for c in range(data.num_characters):
        idx = (data.image_character == c).nonzero().flatten()
        order = torch.randperm(top, generator=seeded_generator(int(split_seed), c))
        rank_of = torch.empty(top, dtype=torch.long)
        rank_of[order] = torch.arange(top)
        ranks[idx] = rank_of[drawers[idx].long()].to(ranks.dtype)
    return ranks


# ----------------------------------------------------------------------------- Omniglot alphabets
class OmniglotAlphabetsDataModule(MultiTaskDataModule):
    """Omniglot alphabets as tasks: each alphabet is a classification task over its characters.

    Drawers (20 per character) are split: drawers ``0 .. 19-val_drawers-test_drawers`` train (at most
    ``train_drawers`` of them when given, for a low-data regime), the next ``val_drawers`` validate,
    the last ``test_drawers`` test. With ``split_seed`` the drawers of every character are first put in
    a seeded random order of their own (one permutation per character), so that the split itself is a
    random draw that the seeds of a benchmark average over; the same ``split_seed`` gives the same
    split to every model (paired comparisons). Labels are the character's index within its alphabet.

    Args:
        root: Omniglot folder or zips (default: the small sets shipped with tasklight, see
            :func:`~tasklight.data.omniglot.default_omniglot_root`).
        alphabets: restrict to these alphabets (default: all, in sorted order).
        image_size: square image size (28 as in the literature).
        val_drawers, test_drawers: held-out drawers per character.
        train_drawers: use only this many training drawers (default: all the rest).
        split_seed: when given, assign the drawers of each character to train / val / test in a seeded
            random order (:func:`~tasklight.core.seeding.seeded_generator` ``(split_seed, character)``)
            instead of by drawer number.
        characters_per_task: split every alphabet into tasks of this many consecutive characters (its
            last task takes the remainder when that has at least 2 characters, else the remainder joins
            the task before): many small related tasks, named ``"<alphabet> <k>"``, labels the
            character's index within its task. Default: one task per alphabet.
        Other arguments: see :class:`MultiTaskDataModule`.
    """

    def __init__(self, root: Optional[str] = None, alphabets: Optional[list[str]] = None, image_size: int = 28,
                 val_drawers: int = 3, test_drawers: int = 3, train_drawers: Optional[int] = None,
                 batch_size_per_task: int = 16, steps_per_epoch: int = 100, eval_batch_size: int = 256,
                 task_descriptors: Optional[Union[Tensor, str]] = None, seed: int = 0, num_workers: int = 0,
                 cache_dir: Optional[str] = None, split_seed: Optional[int] = None,
                 characters_per_task: Optional[int] = None) -> None:
        super().__init__(batch_size_per_task=batch_size_per_task, steps_per_epoch=steps_per_epoch,
                         eval_batch_size=eval_batch_size, task_descriptors=task_descriptors, seed=seed,
                         num_workers=num_workers)
        if val_drawers < 0 or test_drawers < 0 or val_drawers + test_drawers > 19:
            raise ValueError(f"val_drawers + test_drawers must leave at least one of the 20 drawers for training; "
                             f"got val_drawers={val_drawers}, test_drawers={test_drawers}")
        available = 20 - val_drawers - test_drawers
        if train_drawers is not None and not 1 <= train_drawers <= available:
            raise ValueError(f"train_drawers must be between 1 and {available} (20 - val_drawers - test_drawers), "
                             f"got {train_drawers}")
        self.root, self.alphabets, self.image_size, self.cache_dir = root, alphabets, image_size, cache_dir
        if split_seed is not None and int(split_seed) < 0:
            raise ValueError(f"split_seed must be a non-negative integer (or None for the split by drawer number), "
                             f"got {split_seed}")
        self.split_seed = split_seed
        self.val_drawers, self.test_drawers = val_drawers, test_drawers
        self.train_drawers = train_drawers if train_drawers is not None else available
        if characters_per_task is not None and (isinstance(characters_per_task, bool)
                                                or not isinstance(characters_per_task, int) or characters_per_task < 2):
            raise ValueError(f"characters_per_task must be an integer >= 2 (the classes of each task) or None (one "
                             f"task per alphabet), got {characters_per_task!r}")
        self.characters_per_task = characters_per_task

    def _groups(self, chars: Tensor) -> list[Tensor]:
        """An alphabet's characters as the classes of its tasks."""
        k = self.characters_per_task
        if k is None or len(chars) <= k:
            return [chars]
        groups = list(chars.split(k))
        if len(groups[-1]) < 2:
            last = groups.pop()
            groups[-1] = torch.cat([groups[-1], last])
        return groups

    def prepare_data(self) -> None:
        from tasklight.data.omniglot import load_omniglot

        load_omniglot(self.root, self.image_size, self.cache_dir, alphabets=self.alphabets)

    def build(self):
        from tasklight.data.omniglot import load_omniglot

        data = load_omniglot(self.root, self.image_size, self.cache_dir, alphabets=self.alphabets)
        first_val = 20 - self.val_drawers - self.test_drawers
        first_test = 20 - self.test_drawers
        tasks, train, val, test = [], [], [], []
        d = drawer_ranks(data, self.split_seed)
        for a, name in enumerate(data.alphabets):
            groups = self._groups((data.character_alphabet == a).nonzero().flatten())
            for g, chars in enumerate(groups):
                local = torch.full((data.num_characters,), -1, dtype=torch.long)
                local[chars] = torch.arange(len(chars))
                in_t = local[data.image_character] >= 0

                def part(mask: Tensor) -> ImageTask:
                    idx = (in_t & mask).nonzero().flatten()
                    return ImageTask(data.images[idx], local[data.image_character[idx]])

                train.append(part((d >= 0) & (d < self.train_drawers)))
                val.append(part((d >= first_val) & (d < first_test)) if self.val_drawers else None)
                test.append(part(d >= first_test) if self.test_drawers else None)
                tasks.append(TaskSpec(name if len(groups) == 1 else f"{name} {g + 1}", int(len(chars)),
                                      "classification"))
        return tasks, train, val, test

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (1, self.image_size, self.image_size)


# ----------------------------------------------------------------------------- overlaid Omniglot characters
class OverlaidOmniglotDataModule(MultiTaskDataModule):
    """Two tasks on the same images, MultiMNIST-style: each image is a canvas holding two Omniglot characters.

    A fixed set of ``num_characters`` characters is drawn once (seeded by ``character_seed``) from the
    alphabets in ``root``; they are the classes of both tasks (label = the character's position in that
    set). Each ``image_size`` x ``image_size`` character image is placed on a square canvas of side
    ``image_size + shift``: the first one in the top-left corner (shifted up-left), the second
    ``shift`` pixels lower and further right (shifted down-right); they overlap, and the canvas is their
    pixel-wise maximum (strokes are white on black, so both stay visible where they cross). Task
    ``"left"`` classifies the first character, task ``"right"`` the second; both tasks have the same
    canvases (the same tensor), only the labels differ.

    The 20 drawers of every chosen character are put in a seeded random order of their own
    (``split_seed``, as ``OmniglotAlphabetsDataModule(split_seed=...)`` does) and split: the first
    ``train_drawers`` train (the low-data knob), the last ``test_drawers`` test, the ``val_drawers``
    before them validate. A split's canvases are ordered pairs (first, second) of that split's images,
    so no image of one split appears in another: all ``n * n`` pairs of its ``n`` images (a character may
    be paired with itself, as digits are in MultiMNIST), or, when ``<split>_canvases`` is given, that
    many distinct pairs drawn at random (seeded by ``split_seed`` and the split). The same
    ``split_seed`` gives every model the same canvases (paired comparisons).

    Args:
        root: Omniglot folder or zips (default: the small sets shipped with tasklight, see
            :func:`~tasklight.data.omniglot.default_omniglot_root`).
        alphabets: draw the characters from these alphabets only (default: all).
        num_characters: classes per task (at least 2).
        character_seed: seed of the draw of the characters.
        image_size: side of one character image (Omniglot resized to it).
        shift: offset in pixels, down and right, of the second character (1 .. image_size - 1, so
            that the characters overlap); the canvas side is ``image_size + shift``.
        train_drawers, val_drawers: drawers per character for training and validation.
        test_drawers: drawers per character for testing (default: all the rest of the 20).
        train_canvases, val_canvases, test_canvases: number of canvases of each split (default: all
            ordered pairs of the split's images). After setup, ``pairs[split]`` holds each canvas's two
            image indices in :func:`~tasklight.data.omniglot.load_omniglot`'s arrays.
        split_seed: seed of the drawer split and of the pairing.
        Other arguments: see :class:`MultiTaskDataModule`.
    """

    TASKS = ("left", "right")

    def __init__(self, root: Optional[str] = None, alphabets: Optional[list[str]] = None, num_characters: int = 20,
                 character_seed: int = 0, image_size: int = 16, shift: int = 4, train_drawers: int = 1,
                 val_drawers: int = 2, test_drawers: Optional[int] = None, train_canvases: Optional[int] = None,
                 val_canvases: Optional[int] = None, test_canvases: Optional[int] = None, split_seed: int = 0,
                 batch_size_per_task: int = 16, steps_per_epoch: int = 100, eval_batch_size: int = 256,
                 task_descriptors: Optional[Union[Tensor, str]] = None, seed: int = 0, num_workers: int = 0,
                 cache_dir: Optional[str] = None) -> None:
        super().__init__(batch_size_per_task=batch_size_per_task, steps_per_epoch=steps_per_epoch,
                         eval_batch_size=eval_batch_size, task_descriptors=task_descriptors, seed=seed,
                         num_workers=num_workers)
        if num_characters < 2:
            raise ValueError(f"num_characters must be at least 2 (the classes of each task), got {num_characters}")
        if image_size < 1 or not 1 <= shift < image_size:
            raise ValueError(f"shift must be between 1 and image_size - 1 ({image_size - 1}) so that the two "
                             f"characters are offset and overlap; got shift={shift}, image_size={image_size}")
        for name, v in (("character_seed", character_seed), ("split_seed", split_seed)):
            if int(v) < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v}")
        if train_drawers < 1 or val_drawers < 0:
            raise ValueError(f"train_drawers must be >= 1 and val_drawers >= 0, got train_drawers={train_drawers}, "
                             f"val_drawers={val_drawers}")
        if test_drawers is None:
            test_drawers = 20 - train_drawers - val_drawers
        if test_drawers < 0 or train_drawers + val_drawers + test_drawers > 20:
            raise ValueError(f"train_drawers + val_drawers + test_drawers must be at most the 20 drawers of a "
                             f"character, got {train_drawers} + {val_drawers} + {test_drawers}; lower one of them")
        for name, v in (("train_canvases", train_canvases), ("val_canvases", val_canvases),
                        ("test_canvases", test_canvases)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 (or None for all pairs of the split's images), got {v}")
        self.root, self.alphabets, self.cache_dir = root, alphabets, cache_dir
        self.num_characters, self.character_seed = num_characters, int(character_seed)
        self.image_size, self.shift, self.split_seed = image_size, shift, int(split_seed)
        self.train_drawers, self.val_drawers, self.test_drawers = train_drawers, val_drawers, test_drawers
        self.canvases = {"train": train_canvases, "val": val_canvases, "test": test_canvases}
        self.characters: list[str] = []  # names of the chosen characters, in label order (after setup)
        # per split, [n, 2]: the indices (in load_omniglot's arrays) of each canvas's first and second image
        self.pairs: dict[str, Tensor] = {}

    @property
    def canvas_size(self) -> int:
        return self.image_size + self.shift

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (1, self.canvas_size, self.canvas_size)

    def prepare_data(self) -> None:
        from tasklight.data.omniglot import load_omniglot

        load_omniglot(self.root, self.image_size, self.cache_dir, alphabets=self.alphabets)

    def overlay(self, first: Tensor, second: Tensor) -> Tensor:
        """Canvases ``[n, S, S]`` (``S = image_size + shift``) of the images ``first`` and ``second``
        (``[n, image_size, image_size]``): ``first`` at the top left, ``second`` shifted by ``shift``
        down and right, pixel-wise maximum."""
        s, k = self.image_size, self.shift
        if first.shape != second.shape or first.shape[-2:] != (s, s):
            raise ValueError(f"overlay needs two batches of {s}x{s} images of the same shape, got "
                             f"{tuple(first.shape)} and {tuple(second.shape)}")
        canvas = first.new_zeros((*first.shape[:-2], s + k, s + k))
        canvas[..., :s, :s] = first
        canvas[..., k:, k:] = torch.maximum(canvas[..., k:, k:], second)
        return canvas

    def build(self):
        from tasklight.core.seeding import seeded_generator
        from tasklight.data.omniglot import load_omniglot

        data = load_omniglot(self.root, self.image_size, self.cache_dir, alphabets=self.alphabets)
        if self.num_characters > data.num_characters:
            raise ValueError(f"num_characters={self.num_characters} but the Omniglot images in "
                             f"{self.root or 'the default root'} have only {data.num_characters} characters; "
                             f"lower num_characters or add alphabets")
        chosen = torch.randperm(data.num_characters, generator=seeded_generator(self.character_seed))
        chosen = chosen[:self.num_characters]
        label = torch.full((data.num_characters,), -1, dtype=torch.long)
        label[chosen] = torch.arange(self.num_characters)
        self.characters = [data.characters[int(c)] for c in chosen]
        per_character = torch.bincount(data.image_character, minlength=data.num_characters)[chosen]
        if (per_character != 20).any():
            bad = [self.characters[i] for i in (per_character != 20).nonzero().flatten().tolist()]
            raise ValueError(f"characters {bad} do not have exactly 20 drawers (images); the drawer split needs "
                             f"the 20 drawers of every Omniglot character, so give a complete Omniglot root")
        rank = drawer_ranks(data, self.split_seed)
        first_test = 20 - self.test_drawers
        first_val = first_test - self.val_drawers
        ranges = {"train": (0, self.train_drawers), "val": (first_val, first_test), "test": (first_test, 20)}
        sets: dict[str, Optional[ImageTask]] = {}
        labels: dict[str, tuple[Tensor, Tensor]] = {}
        for split_id, (split, (lo, hi)) in enumerate(ranges.items()):
            idx = ((label[data.image_character] >= 0) & (rank >= lo) & (rank < hi)).nonzero().flatten()
            n = len(idx)
            if n == 0:
                sets[split] = None
                continue
            want = self.canvases[split]
            if want is not None and want > n * n:
                raise ValueError(f"{split}_canvases={want} but the {split} split has only {n * n} distinct pairs "
                                 f"of its {n} images ({hi - lo} drawers x {self.num_characters} characters); "
                                 f"lower {split}_canvases, give it more drawers, or use None for all pairs")
            pairs = torch.arange(n * n)
            if want is not None:
                gen = seeded_generator(self.split_seed, self.character_seed, split_id)
                pairs = torch.randperm(n * n, generator=gen)[:want].sort().values
            a, b = idx[pairs // n], idx[pairs % n]
            canvas = self.overlay(data.images[a], data.images[b])
            labels[split] = (label[data.image_character[a]], label[data.image_character[b]])
            self.pairs[split] = torch.stack([a, b], 1)
            sets[split] = canvas
        tasks, train, val, test = [], [], [], []
        for t, name in enumerate(self.TASKS):
            tasks.append(TaskSpec(name, self.num_characters, "classification"))
            for split, out in (("train", train), ("val", val), ("test", test)):
                out.append(ImageTask(sets[split], labels[split][t]) if sets[split] is not None else None)
        return tasks, train, val, test


__all__ = ["MultiTaskBatch", "TaskSpec", "MultiTaskDataModule", "OmniglotAlphabetsDataModule",
           "OverlaidOmniglotDataModule", "load_descriptors", "ImageTask", "MultiTaskStream", "drawer_ranks"]
