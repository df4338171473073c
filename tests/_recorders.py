"""Callbacks that record what each rank saw (importable, so spawned DDP processes can unpickle them)."""
import os

import torch
from lightning.pytorch import Callback


class RecordRun(Callback):
    """Saves the initial parameters, every training batch and the final parameters of each rank."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.batches = []

    def _state(self, pl_module):
        return {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}

    def on_train_start(self, trainer, pl_module):
        torch.save(self._state(pl_module), os.path.join(self.out_dir, f"init_rank{trainer.global_rank}.pt"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch.to("cpu"))

    def on_train_end(self, trainer, pl_module):
        torch.save({"final": self._state(pl_module), "batches": self.batches,
                    "consumed": trainer.datamodule.consumed if trainer.datamodule is not None else None},
                   os.path.join(self.out_dir, f"end_rank{trainer.global_rank}.pt"))


class RecordTaskOutputs(Callback):
    """Saves each rank's per-task training sums of every step (``task_loss_sum``, ``task_count``)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: outputs[k].detach().cpu().double() for k in ("task_loss_sum", "task_count")})

    def on_train_end(self, trainer, pl_module):
        torch.save(self.rows, os.path.join(self.out_dir, f"task_outputs_rank{trainer.global_rank}.pt"))
