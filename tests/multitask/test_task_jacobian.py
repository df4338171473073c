"""Per-task gradients in one batched backward (tasklight.multitask.jacobian) against the per-task loop."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything

from tasklight.data.multitask import MultiTaskBatch, TaskSpec
from tasklight.multitask import HardSharing, MultiTaskModule, PCGrad
from tasklight.multitask.jacobian import resolve_engine, task_jacobian
from tasklight.nn.nets import Conv4

T, N = 4, 3  # tasks; examples per present task


def _model_and_batch(seed=0):
    """A Conv4 trunk with BatchNorm on batch statistics (every example feeds every task's loss)."""
    torch.manual_seed(seed)
    model = MultiTaskModule(Conv4(out_features=0, hidden=4, image_size=16), architecture=HardSharing(),
                            tasks=[TaskSpec(f"t{t}", 3) for t in range(T)])
    present = [0, 1, 3]  # task 2 has no examples in this batch
    task = torch.tensor([t for t in present for _ in range(N)])
    x = torch.randn(len(task), 1, 16, 16)
    y = torch.randint(0, 3, (len(task),))
    z = torch.eye(T)[task]
    return model, MultiTaskBatch(x=x, y=y, task=task, z=z)


def _loop_oracle(model, batch):
    """Task by task: a fresh forward of the whole batch, one autograd.grad per task (zeros if absent)."""
    params = list(model.trunk.parameters())
    rows = []
    for t in range(T):
        m = batch.task == t
        if not bool(m.any()):
            rows.append(torch.zeros(sum(p.numel() for p in params)))
            continue
        rep = model.trunk(batch.x)
        loss = F.cross_entropy(model.heads[t](rep[m]), batch.y[m])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


@pytest.mark.parametrize("engine,chunk", [("loop", None), ("batched", None), ("batched", 2), ("auto", None)])
def test_parameter_gradients_of_every_engine_equal_the_per_task_loop(engine, chunk):
    model, batch = _model_and_batch()
    expected = _loop_oracle(model, batch)
    model.task_gradient_engine, model.task_gradient_chunk = engine, chunk
    fw = model._forward(batch)
    got = model._local_task_gradients(fw, "parameters", None)
    assert expected[0].abs().sum() > 0 and got[2].abs().sum() == 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_representation_gradients_are_each_tasks_rows_summed():
    model, batch = _model_and_batch(1)
    fw = model._forward(batch)
    got = model._local_task_gradients(fw, "representation", None)
    rep = model.trunk(batch.x).detach().requires_grad_()
    expected = torch.zeros_like(got)
    for t in range(T):
        m = batch.task == t
        if bool(m.any()):
            loss = F.cross_entropy(model.heads[t](rep[m]), batch.y[m])
            expected[t] = torch.autograd.grad(loss, rep)[0].sum(0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_task_jacobian_of_a_closed_form_and_bad_settings():
    w = torch.randn(5, requires_grad=True)
    a = torch.randn(3, 5)
    losses = (a * w).sum(1) + 0.5 * (w ** 2).sum()  # d/dw = a_t + w
    for engine, chunk in [("loop", None), ("batched", None), ("batched", 2)]:
        torch.testing.assert_close(task_jacobian(losses, [w], engine, chunk), a + w.detach())
    with pytest.raises(ValueError, match="engine must be one of"):
        task_jacobian(losses, [w], "vmapp")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        task_jacobian(losses, [w], "batched", 0)
    with pytest.raises(ValueError, match="1-d tensor"):
        task_jacobian(losses.sum(), [w])
    assert resolve_engine("auto", torch.device("cpu")) in ("loop", "batched")


def test_a_training_step_with_the_batched_engine_equals_the_loop():
    from test_multitask import fit, sgd, specs, tiny_dm  # noqa: PLC0415 - the suite's small multi-task data

    from tasklight.nn.nets import MLP

    finals = []
    for engine in ("loop", "batched"):
        seed_everything(3)
        model = MultiTaskModule(MLP(4, [8], 6), weighting=PCGrad(grad_source="parameters", seed=2), optimizer=sgd(0.1),
                                 tasks=specs(3))
        model.task_gradient_engine = engine
        before = copy.deepcopy(model)
        fit(model, tiny_dm(T=3), 2)
        finals.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert not torch.allclose(finals[0], torch.cat([p.reshape(-1) for p in before.parameters()]))
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-5, atol=1e-6)
