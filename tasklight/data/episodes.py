"""Episodes: N-way K-shot sampling and deterministic, resumable streams of meta-batches.

Every episode is a pure function of ``(seed, stream, rank, index)``: the training stream yields
meta-batch number ``start, start+1, ...`` (split round-robin across DataLoader workers, so the order
is the same with any number of workers), a different stream on each DDP rank, and resumes from the
number of meta-batches already consumed. Validation/test episodes are a fixed, indexable set
that Lightning's distributed sampler splits across ranks.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from tasklight.config import RecordsInit
from tasklight.core.seeding import seeded_generator
from tasklight.data.batch import MetaBatch, collate_tasks
from tasklight.core.checks import check_int

Task = tuple[Tensor, Tensor, Tensor, Tensor]
TaskFn = Callable[[torch.Generator], Task]

STREAMS = {"train": 0, "val": 1, "test": 2, "predict": 3}


def episode_generator(seed: int, stream: int, rank: int, index: int) -> torch.Generator:
    """A torch generator seeded from the tuple (seed, stream, rank, index)."""
    return seeded_generator(seed, stream, rank, index)


class NWayKShot:
    """N-way K-shot episodes from any dataset indexed by class.

    Args:
        class_indices: for each class, the dataset indices of its examples.
        fetch: ``fetch(indices LongTensor, transform LongTensor) -> Tensor [len, *example]``, e.g. images;
            ``transform`` is the class's augmentation id (0 when ``class_transforms == 1``).
        n_way, k_shot, q_queries: classes per episode, support and query examples per class.
        class_transforms: each class appears this many times, transformed (e.g. 4 rotations), as
            distinct classes.

    Labels are remapped per episode to ``0..n_way-1`` in a random order. The support set holds
    ``n_way * k_shot`` examples and the query set ``n_way * q_queries``, both shuffled.
    """

    def __init__(self, class_indices: Sequence[Tensor], fetch: Callable[[Tensor, Tensor], Tensor], n_way: int,
                 k_shot: int, q_queries: int, class_transforms: int = 1, split: str = "") -> None:
        where = f" in the {split!r} split" if split else ""
        if n_way < 2 or k_shot < 1 or q_queries < 1:
            raise ValueError(f"need n_way >= 2, k_shot >= 1, q_queries >= 1; got n_way={n_way}, k_shot={k_shot}, "
                             f"q_queries={q_queries}")
        self.class_indices = [torch.as_tensor(c, dtype=torch.long) for c in class_indices]
        num_classes = len(self.class_indices) * class_transforms
        if n_way > num_classes:
            raise ValueError(f"n_way={n_way} but there are only {num_classes} classes{where}"
                             f"{' (rotations included)' if class_transforms > 1 else ''}; lower n_way or give this "
                             f"split more classes (split fractions / alphabets, or split by character).")
        sizes = torch.tensor([len(c) for c in self.class_indices])
        need = k_shot + q_queries
        if len(sizes) and int(sizes.min()) < need:
            small = int(sizes.argmin())
            raise ValueError(f"k_shot + q_queries = {k_shot} + {q_queries} = {need} but class {small}{where} has only "
                             f"{int(sizes[small])} examples; lower k_shot or q_queries to at most {int(sizes.min())} "
                             f"in total.")
        self.fetch, self.n_way, self.k_shot, self.q_queries = fetch, n_way, k_shot, q_queries
        self.class_transforms = class_transforms

    @property
    def num_classes(self) -> int:
        return len(self.class_indices) * self.class_transforms

    def __call__(self, gen: torch.Generator) -> Task:
        n, k, q = self.n_way, self.k_shot, self.q_queries
        classes = torch.randperm(self.num_classes, generator=gen)[:n]
        xs, ys = [], []
        for label, c in enumerate(classes.tolist()):
            base, transform = c % len(self.class_indices), c // len(self.class_indices)
            members = self.class_indices[base]
            pick = members[torch.randperm(len(members), generator=gen)[: k + q]]
            xs.append(self.fetch(pick, torch.full((k + q,), transform, dtype=torch.long)))
            ys.append(torch.full((k + q,), label, dtype=torch.long))
        x, y = torch.stack(xs), torch.stack(ys)  # [n, k+q, ...]
        sx, sy = x[:, :k].flatten(0, 1), y[:, :k].flatten(0, 1)
        qx, qy = x[:, k:].flatten(0, 1), y[:, k:].flatten(0, 1)
        ps, pq = torch.randperm(n * k, generator=gen), torch.randperm(n * q, generator=gen)
        return sx[ps], sy[ps], qx[pq], qy[pq]


class EpisodeStream(IterableDataset):
    """The training stream: meta-batches ``start, start+1, ...`` up to the end of the current epoch.

    Meta-batch ``i`` on DDP rank ``r`` is built from ``episode_generator(seed, 0, r, i)``. With
    ``W`` DataLoader workers, worker ``w`` builds ``start+w, start+w+W, ...``; the DataLoader's
    round-robin then yields them in order, so the stream is identical for any ``W``.
    """

    def __init__(self, task_fn: TaskFn, meta_batch_size: int, batches_per_epoch: int, seed: int = 0, rank: int = 0,
                 start: int = 0) -> None:
        if meta_batch_size < 1 or batches_per_epoch < 1:
            raise ValueError(f"meta_batch_size and batches_per_epoch must be >= 1, got {meta_batch_size}, "
                             f"{batches_per_epoch}")
        self.task_fn, self.meta_batch_size, self.batches_per_epoch = task_fn, meta_batch_size, batches_per_epoch
        self.seed, self.rank, self.start = seed, rank, start

    def __len__(self) -> int:
        return self.batches_per_epoch

    def meta_batch(self, index: int) -> MetaBatch:
        gen = episode_generator(self.seed, STREAMS["train"], self.rank, index)
        batch = collate_tasks([self.task_fn(gen) for _ in range(self.meta_batch_size)])
        batch.index = torch.full((self.meta_batch_size,), index, dtype=torch.long)
        return batch

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        end = (self.start // self.batches_per_epoch + 1) * self.batches_per_epoch
        for i in range(self.start + wid, end, nw):
            yield self.meta_batch(i)


class EpisodeSet(Dataset):
    """A fixed set of ``num_episodes`` tasks (validation/test); item ``i`` is one task."""

    def __init__(self, task_fn: TaskFn, num_episodes: int, seed: int = 0, stream: str = "test") -> None:
        if num_episodes < 1:
            raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
        self.task_fn, self.num_episodes, self.seed, self.stream = task_fn, num_episodes, seed, STREAMS[stream]

    def __len__(self) -> int:
        return self.num_episodes

    def __getitem__(self, i: int) -> Task:
        if not 0 <= i < self.num_episodes:
            raise IndexError(i)
        return self.task_fn(episode_generator(self.seed, self.stream, 0, i))


class EpisodicDataModule(RecordsInit, LightningDataModule):
    """Base DataModule for few-shot episodes; subclasses provide ``task_fn(split)``.

    Args:
        meta_batch_size: tasks per meta-batch (T).
        batches_per_epoch: training meta-batches per epoch (per rank).
        val_episodes, test_episodes: fixed evaluation episodes (split across DDP ranks).
        eval_batch_size: tasks per evaluation batch (default: ``meta_batch_size``).
        seed: the root of every episode's randomness.
        num_workers: DataLoader workers (the episode stream is identical for any number).
    """

    def __init__(self, meta_batch_size: int = 4, batches_per_epoch: int = 100, val_episodes: int = 100,
                 test_episodes: int = 600, eval_batch_size: Optional[int] = None, seed: int = 0,
                 num_workers: int = 0) -> None:
        super().__init__()
        for name, value, low in (("meta_batch_size", meta_batch_size, 1), ("batches_per_epoch", batches_per_epoch, 1),
                                 ("val_episodes", val_episodes, 1), ("test_episodes", test_episodes, 1),
                                 ("eval_batch_size", 1 if eval_batch_size is None else eval_batch_size, 1),
                                 ("num_workers", num_workers, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be >= {low} (an integer), got {value!r}")
        check_int(type(self).__name__, "seed", seed, 0, "the root of every episode's randomness")
        self.meta_batch_size, self.batches_per_epoch = meta_batch_size, batches_per_epoch
        self.val_episodes, self.test_episodes = val_episodes, test_episodes
        self.eval_batch_size = eval_batch_size or meta_batch_size
        self.seed, self.num_workers = seed, num_workers
        self.consumed = 0  # training meta-batches consumed on this rank
        self._train_stream: Optional[EpisodeStream] = None

    # subclasses --------------------------------------------------------------------------
    def task_fn(self, split: str) -> TaskFn:  # pragma: no cover - abstract
        raise NotImplementedError

    # loaders -----------------------------------------------------------------------------
    def _rank(self) -> int:
        return int(self.trainer.global_rank) if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        self._train_stream = EpisodeStream(self.task_fn("train"), self.meta_batch_size, self.batches_per_epoch,
                                           self.seed, self._rank(), start=self.consumed)
        return DataLoader(self._train_stream, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=False)

    def _eval_loader(self, split: str, episodes: int) -> DataLoader:
        ds = EpisodeSet(self.task_fn(split), episodes, self.seed, stream=split)
        return DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False, collate_fn=collate_tasks,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val", self.val_episodes)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test", self.test_episodes)

    def predict_dataloader(self) -> DataLoader:
        """The predict split is the test episodes (``tasklight predict``)."""
        return self._eval_loader("test", self.test_episodes)

    def train_targets(self, episodes: int = 1000) -> Tensor:
        """The targets (support and query) of the first ``episodes`` training tasks, flattened.

        Regression learners fit a loss's support to them (``HistogramLoss(support="auto")``). They
        are the tasks of rank 0's training stream, so every DDP rank gets the same values.
        """
        if episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {episodes}")
        stream = EpisodeStream(self.task_fn("train"), self.meta_batch_size, 1, self.seed, rank=0)
        ys, n, index = [], 0, 0
        while n < episodes:
            batch = stream.meta_batch(index)
            take = min(episodes - n, batch.num_tasks)
            ys += [batch.support_y[:take].flatten(), batch.query_y[:take].flatten()]
            n, index = n + take, index + 1
        return torch.cat(ys)

    # resumption --------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        trainer = self.trainer
        if trainer is not None and trainer.training and isinstance(batch, MetaBatch) and batch.index is not None:
            self.consumed = int(batch.index[0]) + 1
            if self._train_stream is not None:
                self._train_stream.start = self.consumed  # the next epoch's iterator starts here
        return batch

    def episode_settings(self) -> dict:
        """The settings that give the learner's state its meaning (``n_way``, ``k_shot``, ...)."""
        return episode_settings(self)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "settings": episode_settings(self)}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("settings")
        trainer = getattr(self, "trainer", None)
        evaluating = trainer is not None and getattr(trainer.state, "fn", None) not in (None, "fit")
        if saved is not None and not evaluating:  # test / predict may evaluate on other episodes
            mine = episode_settings(self)
            # settings the checkpoint recorded (one written before a setting was recorded is not refused for it)
            diff = {k: (saved[k], mine.get(k)) for k in sorted(saved) if saved[k] != mine.get(k)}
            if diff:
                text = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
                raise ValueError(f"the checkpoint was trained on other episodes ({text}): resume with the checkpoint's "
                                 f"data settings, or start a new run (load the weights only) for the new ones.")
        self.consumed = int(state_dict.get("consumed", 0))
        if int(state_dict.get("seed", self.seed)) != self.seed:
            raise ValueError(f"the checkpoint's episode seed {state_dict['seed']} differs from the DataModule's "
                             f"seed {self.seed}; resume with the same `seed` to continue the same task stream.")


# settings that do not change what a checkpoint's state means (a resumed run may change them)
RESUMABLE_SETTINGS = frozenset({"root", "cache_dir", "num_workers", "batches_per_epoch", "steps_per_epoch",
                                "val_episodes", "test_episodes", "eval_batch_size", "seed", "download"})


def episode_settings(dm) -> dict:
    """A DataModule's settings that change what a learner's state means (all plain-valued constructor
    arguments and saved hyperparameters but :data:`RESUMABLE_SETTINGS`), plus ``meta_batch_size``.

    The constructor arguments are recorded for every subclass (``RecordsInit``), so a DataModule that
    does not call ``save_hyperparameters`` (as the guide's does not) is checked on resume too."""
    hp = {**(getattr(dm, "init_args", None) or {}), **dict(getattr(dm, "hparams", {}) or {})}
    if hasattr(dm, "meta_batch_size"):
        hp.setdefault("meta_batch_size", dm.meta_batch_size)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(hp.items())
            if k not in RESUMABLE_SETTINGS and not k.startswith("_") and _plain(v)}


def _plain(v) -> bool:
    """A value a checkpoint can store and compare: numbers, strings, None, and lists of them."""
    if isinstance(v, (tuple, list)):
        return all(_plain(x) for x in v)
    return isinstance(v, (int, float, str, bool, type(None)))
