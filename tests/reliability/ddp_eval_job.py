"""Test metrics of every learner family on one process and on 2 ``ddp_spawn`` ranks (run as its own process
by test_distributed.py; ``ddp_spawn`` needs a file with a main guard).

    python ddp_eval_job.py <single|ddp_spawn> <out.json> <family>:<size> [<family>:<size> ...]

Each case tests an untrained learner of the family (fixed seed) on ``size`` evaluation episodes
(examples for the multi-task learner, instances for TaskMet), in batches of 2, and writes
``{"<family>:<size>": {metric: value}}``.
"""
import json
import sys

import torch
from lightning.pytorch import Trainer

from tasklight import MAMLModule, MLP, SinusoidDataModule
from tasklight.data.episodes import EpisodicDataModule
from tasklight.data.mtl_regression import SinusoidTasksDataModule
from tasklight.meta.proto import ProtoNetModule
from tasklight.multitask import MultiTaskModule
from tasklight.taskmet.module import MetricNet, TaskMetModule
from tasklight.taskmet.problems import CubicTopK, DecisionDataModule


class GaussianEpisodes:
    """3-way 2-shot episodes of 4-d Gaussian blobs (a DataModule written as the guide shows)."""

    def __call__(self, gen: torch.Generator):
        means = 3 * torch.randn(3, 4, generator=gen)
        sy, qy = torch.arange(3).repeat(2), torch.arange(3).repeat(2)
        return (means[sy] + torch.randn(6, 4, generator=gen), sy, means[qy] + torch.randn(6, 4, generator=gen), qy)


class GaussianDataModule(EpisodicDataModule):
    n_way = 3

    def task_fn(self, split: str):
        return GaussianEpisodes()


def case(family: str, size: int):
    torch.manual_seed(0)
    if family == "maml":
        return (MAMLModule(MLP(1, [8], 1), inner_steps=1, inner_lr=0.01),
                SinusoidDataModule(k_shot=5, q_queries=5, meta_batch_size=2, test_episodes=size, eval_batch_size=2,
                                   seed=3))
    if family == "protonet":
        return ProtoNetModule(MLP(4, [8], 8)), GaussianDataModule(meta_batch_size=2, test_episodes=size, seed=3)
    if family == "multitask":
        dm = SinusoidTasksDataModule(num_tasks=1, n_train=8, n_val=2, n_test=size, eval_batch_size=2)
        dm.setup()
        model = MultiTaskModule(MLP(1, [8], 8))
        model.build(dm.task_specs)
        return model, dm
    if family == "taskmet":
        return (TaskMetModule(MLP(1, [], 1), MetricNet(1, 1, hidden=(4,))),
                DecisionDataModule(CubicTopK(num_items=10), num_train=4, num_val=2, num_test=size, eval_batch_size=2))
    raise ValueError(family)


def main():
    torch.set_num_threads(1)
    strategy, out, cases = sys.argv[1], sys.argv[2], sys.argv[3:]
    kw = dict(devices=1) if strategy == "single" else dict(devices=2, strategy=strategy)
    results = {}
    for c in cases:
        family, size = c.split(":")
        module, dm = case(family, int(size))
        trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                          enable_checkpointing=False, inference_mode=False, **kw)
        results[c] = {k: float(v) for k, v in trainer.test(module, dm, verbose=False)[0].items()}
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
