"""Self-describing checkpoints: every learner rebuilds from ``load_from_checkpoint(path)`` alone (net,
loss, trunk, heads, weighting, problem, optimiser stored as config), gives the trained module's outputs,
and an explicit argument that contradicts the checkpoint raises."""
import functools

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from torch import nn

from tasklight import (MLP, Conv4, DFLModule, HistogramLoss, IMAMLModule, MAMLModule, MSEModule, MultiTaskModule,
                       TaskMetModule, TaskSpec)
from tasklight.multitask import MGDA, FiLM
from tasklight.taskmet import MetricNet
from tasklight.taskmet.problems import CubicTopK


def save(module, path):
    trainer = Trainer(max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


def perturb(module):
    """Weights unlike a fresh initialisation, so a load that re-initialises is caught."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module


def episode(shape, n=5):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, *shape, generator=g), torch.arange(n), torch.rand(7, *shape, generator=g)


def test_maml_loads_alone_with_its_loss_and_net_and_predicts_the_same(tmp_path):
    seed_everything(0)
    model = perturb(MAMLModule(Conv4(out_features=5, hidden=8), loss="cross_entropy", inner_lr=0.4,
                               eval_inner_steps=2, optimizer=functools.partial(torch.optim.SGD, lr=0.3)))
    path = save(model, tmp_path / "m.ckpt")
    loaded = MAMLModule.load_from_checkpoint(path)
    assert isinstance(loaded.net, Conv4) and loaded.net.init_args["hidden"] == 8
    assert isinstance(loaded.loss_fn, nn.CrossEntropyLoss) and loaded.task_type == "classification"
    assert loaded.eval_inner_steps == 2
    opt = loaded.optimizer_factory(loaded.parameters())
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.3
    sx, sy, qx = episode((1, 28, 28))
    torch.testing.assert_close(loaded.predict_episode(sx, sy, qx), model.predict_episode(sx, sy, qx))


def test_imaml_with_a_histogram_loss_loads_alone(tmp_path):
    seed_everything(1)
    loss = HistogramLoss(num_bins=16, v_min=-5, v_max=5)
    model = perturb(IMAMLModule(MLP(1, [16], 16), loss=loss, inner_steps=3, lam=2.0))
    loaded = IMAMLModule.load_from_checkpoint(save(model, tmp_path / "i.ckpt"))
    assert isinstance(loaded.loss_fn, HistogramLoss) and loaded.loss_fn.num_bins == 16
    sx, qx = torch.rand(5, 1) * 4, torch.rand(7, 1) * 4
    sy = torch.sin(sx).squeeze(-1)
    torch.testing.assert_close(loaded.predict_episode(sx, sy, qx), model.predict_episode(sx, sy, qx))


def test_an_explicit_argument_that_contradicts_the_checkpoint_raises(tmp_path):
    model = MAMLModule(Conv4(out_features=5, hidden=8), loss="cross_entropy")
    path = save(model, tmp_path / "m.ckpt")
    with pytest.raises(ValueError, match="loss='mse' differs from the checkpoint's loss='cross_entropy'"):
        MAMLModule.load_from_checkpoint(path, loss="mse")
    with pytest.raises(ValueError, match=r"net=Conv4\(.*hidden=16.*differs from the checkpoint's net=Conv4\(.*hidden=8"):
        MAMLModule.load_from_checkpoint(path, net=Conv4(out_features=5, hidden=16))
    # the same objects, or plain settings, are fine
    same = MAMLModule.load_from_checkpoint(path, net=Conv4(out_features=5, hidden=8), loss="cross_entropy",
                                           eval_inner_steps=4)
    assert same.eval_inner_steps == 4
    torch.testing.assert_close(same.net.state_dict(), model.net.state_dict())


def test_a_net_without_a_config_is_asked_for_by_name(tmp_path):
    net = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
    model = perturb(MAMLModule(net))
    path = save(model, tmp_path / "s.ckpt")
    with pytest.raises(ValueError, match="could not store net as config.*pass net=..."):
        MAMLModule.load_from_checkpoint(path)
    loaded = MAMLModule.load_from_checkpoint(path, net=nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1)))
    torch.testing.assert_close(loaded.net.state_dict(), model.net.state_dict())


def test_multitask_module_loads_alone_with_trunk_heads_and_weighting(tmp_path):
    seed_everything(2)
    tasks = [TaskSpec("a", 3, "classification"), TaskSpec("b", 1, "regression")]
    model = perturb(MultiTaskModule(MLP(4, [8], 6), architecture=FiLM(condition_layer=1), head_hidden=[5],
                                    weighting=MGDA(normalization="l2"), tasks=tasks))
    loaded = MultiTaskModule.load_from_checkpoint(save(model, tmp_path / "mt.ckpt"))
    assert isinstance(loaded.weighting, MGDA) and loaded.weighting.normalization == "l2"
    assert isinstance(loaded.architecture, FiLM)
    x = torch.randn(6, 4)
    for t in range(2):
        torch.testing.assert_close(loaded(x, t), model(x, t))


@pytest.mark.parametrize("kind", ["taskmet", "mse", "dfl"])
def test_decision_learners_load_alone(kind, tmp_path):
    seed_everything(3)
    problem = CubicTopK(num_items=10, k=2)
    if kind == "taskmet":
        model = TaskMetModule(MLP(1, [4], 1), MetricNet(1, dim=1, hidden=[4]), problem=problem, inner_steps=2,
                              first_inner_steps=3)
    elif kind == "mse":
        model = MSEModule(MLP(1, [4], 1), problem=problem)
    else:
        model = DFLModule(MLP(1, [4], 1), alpha=0.5, problem=problem)
    perturb(model)
    loaded = type(model).load_from_checkpoint(save(model, tmp_path / f"{kind}.ckpt"))
    assert isinstance(loaded.problem, CubicTopK) and loaded.problem.k == 2
    x = torch.rand(3, 10, 1)
    torch.testing.assert_close(loaded(x), model(x))
    if kind == "taskmet":
        torch.testing.assert_close(loaded.metric(x), model.metric(x))
