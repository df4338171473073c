"""Per-task curves on step under real 2-process DDP (gloo, ddp_spawn): each logged point is the mean
over both ranks' examples of the steps since the previous point."""
import csv

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger

from _recorders import RecordTaskOutputs
from tasklight.data.mtl_regression import SinusoidTasksDataModule
from tasklight.multitask import MultiTaskModule
from tasklight.nn.nets import MLP

pytestmark = pytest.mark.slow  # real 2-process DDP


def test_per_task_step_curves_are_means_over_both_ranks(tmp_path):
    seed_everything(0)
    dm = SinusoidTasksDataModule(num_tasks=2, n_train=32, n_val=4, n_test=4, batch_size_per_task=4,
                                 steps_per_epoch=4)
    model = MultiTaskModule(MLP(1, [8], 8))
    dm.setup()
    model.build(dm.task_specs)  # built here too: ddp_spawn loads the trained weights back into this copy
    logger = CSVLogger(str(tmp_path), name="ddp", version=0)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=4, log_every_n_steps=2,
                      logger=logger, callbacks=[RecordTaskOutputs(str(tmp_path))], enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0)
    trainer.fit(model, dm)
    ranks = [torch.load(tmp_path / f"task_outputs_rank{r}.pt") for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4
    with open(tmp_path / "ddp" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/tasks/sin0/loss_step")]
    assert [int(r["step"]) for r in rows] == [1, 3]
    for j, row in enumerate(rows):
        window = range(2 * j, 2 * j + 2)
        for t in range(2):
            both = sum(ranks[r][k]["task_loss_sum"][t] for r in range(2) for k in window)
            count = sum(ranks[r][k]["task_count"][t] for r in range(2) for k in window)
            rank0 = sum(ranks[0][k]["task_loss_sum"][t] for k in window) / sum(ranks[0][k]["task_count"][t]
                                                                              for k in window)
            logged = float(row[f"train/tasks/sin{t}/loss_step"])
            assert logged == pytest.approx(float(both / count), rel=1e-5)
            assert abs(logged - float(rank0)) > 1e-4  # the ranks saw different examples: rank 0 alone differs
