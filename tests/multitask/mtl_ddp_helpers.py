"""Importable helpers for tests/test_multitask_ddp.py: the cases, a recorder callback and the DDP worker.

The worker runs in two processes started once by ``torch.multiprocessing``; each process joins one
gloo process group and then fits every case with ``Trainer(devices=2, strategy="ddp")`` (Lightning
sees ``LOCAL_RANK`` and uses the processes that exist), so one spawn covers all the cases.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from torch.utils.data import TensorDataset

from tasklight.callbacks.gradient_conflict import GradientConflictMonitor
from tasklight.callbacks.task_logging import TaskLossLogger
from tasklight.data.multitask import MultiTaskDataModule, TaskSpec
from tasklight.multitask.architectures import MMoE, MTAN, CrossStitch, FiLM, SoftSharing
from tasklight.multitask.module import MultiTaskModule
from tasklight.nn.nets import MLP
from tasklight.multitask.weighting import (
    CAGrad, DROWeighting, DWA, EqualWeighting, FAMO, GradNorm, IMTL, MGDA, NashMTL, PCGrad, RLW, UncertaintyWeighting,
    UPGrad,
)
from tasklight.multitask.weightings import DBMTL, GradDrop, MoCo

T, B, STEPS, STEPS_PER_EPOCH, LR = 3, 4, 6, 2, 0.1

CASES = {
    # name: (module kwargs, weighting factory)
    "equal": ({}, EqualWeighting),
    "uncertainty": ({}, lambda: UncertaintyWeighting(init_log_var=0.2)),
    "dwa": ({}, lambda: DWA(temperature=0.5)),
    "dro": ({}, lambda: DROWeighting(step_size=0.5)),
    "gradnorm": ({}, lambda: GradNorm(alpha=1.5, lr=0.05)),
    "mgda": ({}, MGDA),
    "pcgrad_params": ({}, lambda: PCGrad(grad_source="parameters", seed=1)),
    "pcgrad_params_batched": ({"task_gradient_engine": "batched"}, lambda: PCGrad(grad_source="parameters", seed=1)),
    "soft_uncertainty": ({"architecture": lambda: SoftSharing(penalty=0.1)}, UncertaintyWeighting),
    "film_mgda": ({"architecture": lambda: FiLM(condition_layer=1)}, lambda: MGDA(normalization="l2")),
    "mtan_mgda_params": ({"architecture": MTAN}, lambda: MGDA(grad_source="parameters")),
    "cross_stitch_pcgrad": ({"architecture": CrossStitch}, PCGrad),
    "mmoe_gradnorm": ({"architecture": lambda: MMoE(num_experts=2)}, lambda: GradNorm(alpha=1.5, lr=0.05)),
    "sampled_pcgrad": ({"task_sampling": "uniform", "tasks_per_step": 2}, PCGrad),
    "rlw": ({}, lambda: RLW(seed=3)),
    "famo": ({}, lambda: FAMO(lr=0.2)),
    "cagrad": ({}, lambda: CAGrad(c=0.5)),
    "nashmtl_params": ({}, lambda: NashMTL(grad_source="parameters", update_every=2)),
    "imtl": ({}, IMTL),
    "upgrad": ({}, UPGrad),
    "sampled_imtl": ({"task_sampling": "uniform", "tasks_per_step": 2}, IMTL),
}
MONITORED = "mgda"
# methods that set the shared parameters' gradient themselves (Weighting.shared_direction)
CASES.update({
    "moco_params": ({}, lambda: MoCo(gamma=0.5)),
    "graddrop_params": ({}, lambda: GradDrop(seed=2)),
    "sampled_dbmtl_params": ({"task_sampling": "uniform", "tasks_per_step": 2}, DBMTL),
})


def datamodule(batch_size_per_task: int) -> MultiTaskDataModule:
    gen = torch.Generator().manual_seed(0)
    train, val = [], []
    for _ in range(T):
        w = torch.randn(4, 3, generator=gen)
        x, xv = torch.randn(32, 4, generator=gen), torch.randn(8, 4, generator=gen)
        train.append(TensorDataset(x, (x @ w).argmax(1)))
        val.append(TensorDataset(xv, (xv @ w).argmax(1)))
    tasks = [TaskSpec(f"t{i}", 3) for i in range(T)]
    return MultiTaskDataModule(tasks, train, val, val, batch_size_per_task=batch_size_per_task,
                               steps_per_epoch=STEPS_PER_EPOCH, eval_batch_size=6, seed=5)


def sgd(params):
    return torch.optim.SGD(params, lr=LR)


def model(case: str) -> MultiTaskModule:
    seed_everything(11)
    kwargs, make = CASES[case]
    kwargs = {k: (v() if k == "architecture" else v) for k, v in kwargs.items()}
    engine = kwargs.pop("task_gradient_engine", None)
    module = MultiTaskModule(MLP(4, [8], 6), weighting=make(), optimizer=sgd, **kwargs)
    if engine is not None:  # the per-task gradients in one batched backward instead of one per task
        module.task_gradient_engine = engine
    return module


class Record(Callback):
    """Saves what one rank saw and did: initial/final parameters, each step's per-task sums and
    weights, the TaskLossLogger's last results and the monitor's matrices."""

    def __init__(self, out_file: str) -> None:
        self.out_file = out_file
        self.steps = []
        self.init = None

    def on_train_start(self, trainer, pl_module):
        self.init = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: outputs[k].detach().cpu().clone() for k in ("task_loss_sum", "task_count", "weights")})

    def on_train_end(self, trainer, pl_module):
        logger = next(c for c in trainer.callbacks if isinstance(c, TaskLossLogger))
        monitor = [c for c in trainer.callbacks if isinstance(c, GradientConflictMonitor)]
        torch.save({"init": self.init, "final": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                    "steps": self.steps, "logged": logger.last,
                    "monitor": monitor[0].history if monitor else None}, self.out_file)


def fit_case(case: str, out_file: str, devices: int, batch_size_per_task: int, strategy) -> None:
    callbacks = [Record(out_file), TaskLossLogger()]
    if case == MONITORED:
        callbacks.append(GradientConflictMonitor(every_n_steps=2, source="parameters"))
    trainer = Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(model(case), datamodule(batch_size_per_task))


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "LOCAL_RANK": str(rank),
                       "NODE_RANK": "0", "WORLD_SIZE": str(world)})
    torch.set_num_threads(1)
    from lightning.pytorch.strategies import DDPStrategy

    for case in CASES:
        fit_case(case, str(Path(out_dir) / f"{case}_rank{rank}.pt"), world, B,
                 DDPStrategy(process_group_backend="gloo"))
