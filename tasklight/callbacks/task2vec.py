"""``Task2VecCallback``: embed the tasks of a run with Task2Vec at chosen epochs and log their distances.

The probe is the model being trained (a copy of it; training is not disturbed and the global RNG is
not touched). The tasks come from the DataModule (see
:func:`tasklight.task2vec.data.datamodule_tasks`): a ``task2vec_tasks(split)`` hook,
the per-task data of a multi-task DataModule, or the fixed evaluation episodes of an episodic
(meta-learning) DataModule.

Logged at each chosen epoch: the symmetric distance matrix as a heatmap (``<key>/distance_heatmap``:
a W&B image, or a PNG in the run folder, see :func:`tasklight.plots.log_figure`), with a
``WandbLogger`` also as a table (``<key>/distances``); with any logger, scalars
(``<key>/mean_distance``, the mean off-diagonal distance, and ``<key>/embedding_norm/<task>``).
``save_dir`` also writes ``task2vec_epoch<E>.pt`` (embeddings, distance matrices, descriptors).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from tasklight.plots import heatmap, log_figure, wants_figures
from tasklight.task2vec import (DEFAULT_ALPHA, Task2Vec, TaskEmbedding, datamodule_tasks, distance_matrix,
                                save_embeddings)


def heatmap_image(matrix: Tensor, names: Sequence[str], title: str = "Task2Vec distance") -> np.ndarray:
    """An RGB ``uint8 [H, W, 3]`` heatmap of a square matrix with task names on both axes."""
    from tasklight.plots import figure_array, heatmap

    return figure_array(heatmap(matrix, names, title, cmap="viridis_r", annotate=False))


class Task2VecCallback(Callback):
    """Embed every task of the run at chosen epochs and log the task distance matrix.

    Args:
        epochs: 0-based epochs after which to embed (default: every ``every_n_epochs``).
        every_n_epochs: used when ``epochs`` is not given.
        split: which tasks of the DataModule (``"train"``, ``"val"``, ``"test"``).
        max_tasks: embed at most this many tasks (the first ones).
        network, head, layers, mc_samples, exact, max_examples, batch_size, head_steps,
        head_weight_decay, bn_stats, seed: Task2Vec options (see ``Task2Vec``).
        alpha: weight of the trivial-embedding term of the asymmetric distance (saved files).
        save_dir: if set, write ``task2vec_epoch<E>.pt`` there (see ``save_embeddings``).
        log_key: prefix of the logged keys.

    Embedding runs on global rank 0 only (it needs no communication); the results are kept in
    ``self.history`` as ``(epoch, embeddings, distance_matrix)``.
    """

    def __init__(self, epochs: Optional[list[int]] = None, every_n_epochs: int = 1,
                 split: Literal["train", "val", "test"] = "val", max_tasks: Optional[int] = 16,
                 network: Optional[str] = None, head: Optional[str] = "auto", layers: Optional[list[str]] = None,
                 mc_samples: int = 1, exact: bool = False, max_examples: Optional[int] = 256, batch_size: int = 64,
                 head_steps: int = 100, head_weight_decay: float = 1e-2, bn_stats: Literal["task", "probe"] = "task",
                 seed: int = 0, alpha: float = DEFAULT_ALPHA, save_dir: Optional[str] = None,
                 log_key: str = "task2vec") -> None:
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if epochs is not None and any(e < 0 for e in epochs):
            raise ValueError(f"epochs are 0-based epoch indices >= 0, got {epochs}")
        if max_tasks is not None and max_tasks < 1:
            raise ValueError(f"max_tasks must be >= 1 (or None for all), got {max_tasks}")
        self.epochs = None if epochs is None else sorted(set(epochs))
        self.every_n_epochs, self.split, self.max_tasks = every_n_epochs, split, max_tasks
        self.options = dict(network=network, head=head, layers=layers, mc_samples=mc_samples, exact=exact,
                            max_examples=max_examples, batch_size=batch_size, head_steps=head_steps,
                            head_weight_decay=head_weight_decay, bn_stats=bn_stats, seed=seed)
        self.alpha, self.save_dir, self.log_key = alpha, save_dir, log_key
        self.history: list[tuple[int, list[TaskEmbedding], Tensor]] = []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # bad layer / network / head names fail now, not after the first epoch (modules that build
        # their network in `setup`, like MultiTaskModule, are complete by now)
        Task2Vec(pl_module, **self.options)

    def due(self, epoch: int) -> bool:
        if self.epochs is not None:
            return epoch in self.epochs
        return (epoch + 1) % self.every_n_epochs == 0

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if trainer.sanity_checking or not self.due(epoch) or trainer.global_rank != 0:
            return
        self.embed_and_log(trainer, pl_module, epoch)

    def embed_and_log(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> Tensor:
        """Embed the DataModule's tasks with the current model as probe; log and return the matrix."""
        tasks = datamodule_tasks(trainer.datamodule, self.split, self.max_tasks)
        with torch.inference_mode(False), torch.enable_grad():
            embeddings = Task2Vec(pl_module, **self.options).embed_tasks(tasks)
        matrix = distance_matrix(embeddings)
        self.history.append((epoch, embeddings, matrix))
        self._log(trainer, embeddings, matrix, epoch)
        if self.save_dir is not None:
            save_embeddings(Path(self.save_dir) / f"task2vec_epoch{epoch}.pt", embeddings, self.alpha)
        return matrix

    def _log(self, trainer: Trainer, embeddings: list[TaskEmbedding], matrix: Tensor, epoch: int) -> None:
        from lightning.pytorch.loggers import WandbLogger

        names = [e.name for e in embeddings]
        n = len(names)
        off = ~torch.eye(n, dtype=torch.bool)
        scalars = {f"{self.log_key}/mean_distance": float(matrix[off].mean()) if n > 1 else 0.0}
        scalars.update({f"{self.log_key}/embedding_norm/{e.name}": e.norm for e in embeddings})
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            if isinstance(logger, WandbLogger):
                rows = [[epoch, names[i], names[j], float(matrix[i, j])] for i in range(n) for j in range(n)]
                logger.log_table(f"{self.log_key}/distances", ["epoch", "task_a", "task_b", "d_sym"], rows, step=step)
        if wants_figures(trainer):
            log_figure(trainer, f"{self.log_key}/distance_heatmap",
                       heatmap(matrix, names, f"Task2Vec d_sym, epoch {epoch}", cmap="viridis_r", annotate=False),
                       step=step)
