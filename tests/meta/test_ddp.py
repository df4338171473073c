"""Real 2-process DDP on CPU (gloo, ddp_spawn): synced meta-gradients equal a single process on the union of tasks."""
import functools
import os

import pytest
import torch
from lightning.pytorch import Trainer

from _recorders import RecordRun
from tasklight.data.batch import MetaBatch
from tasklight.data.sinusoid import SinusoidDataModule
from tasklight.meta.imaml import IMAMLModule
from tasklight.meta.maml import MAMLModule
from tasklight.nn.nets import MLP

pytestmark = pytest.mark.slow  # real 2-process DDP: minutes on 2 cores

OUTER_LR = 0.5


def _module(kind):
    torch.manual_seed(0)
    sgd = functools.partial(torch.optim.SGD, lr=OUTER_LR)
    if kind == "maml":
        return MAMLModule(MLP(1, [16, 16], 1), inner_steps=2, inner_lr=0.05, optimizer=sgd)
    if kind == "maml_chunked":  # chunks of 2 of each rank's 3 tasks: per-chunk meta-gradients, one surrogate backward
        return MAMLModule(MLP(1, [16, 16], 1), inner_steps=2, inner_lr=0.05, optimizer=sgd, strategy="vmap",
                          chunk_size=2)
    return IMAMLModule(MLP(1, [16, 16], 1), inner_steps=5, inner_lr=0.05, lam=1.0, cg_steps=5, optimizer=sgd)


@pytest.mark.parametrize("kind", ["maml", "imaml", "maml_chunked"])
def test_ddp_two_ranks_equal_single_process_on_union(kind, tmp_path):
    module = _module(kind)
    dm = SinusoidDataModule(k_shot=5, q_queries=5, meta_batch_size=3, batches_per_epoch=10, seed=7)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, callbacks=[RecordRun(str(tmp_path))], inference_mode=False)
    trainer.fit(module, datamodule=dm)

    ends = [torch.load(tmp_path / f"end_rank{r}.pt", weights_only=False) for r in range(2)]
    init = torch.load(tmp_path / "init_rank0.pt", weights_only=False)
    # both ranks end with identical parameters
    for k in ends[0]["final"]:
        assert torch.equal(ends[0]["final"][k], ends[1]["final"][k]), k
    # the ranks sampled different tasks
    b0, b1 = ends[0]["batches"][0], ends[1]["batches"][0]
    assert not torch.allclose(b0.support_x, b1.support_x)
    assert ends[0]["consumed"] == ends[1]["consumed"] == 1
    # the synced meta-step equals one process on the union of both ranks' tasks
    ref = _module("maml" if kind == "maml_chunked" else kind)  # the reference: one unchunked process
    ref.load_state_dict(init)
    union = MetaBatch.cat([b0, b1])
    ref.zero_grad()
    ref.meta_objective(union).objective.backward()
    for name, p in ref.named_parameters():
        expected = init[name] - OUTER_LR * p.grad
        assert torch.allclose(ends[0]["final"][name], expected, atol=1e-6), name
        assert not torch.allclose(init[name], expected)  # the step moved the parameters
