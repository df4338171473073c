"""The architecture objects: each against an explicit computation, their parameter split, and training."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything
from torch import nn
from torch.utils.data import TensorDataset

from tasklight.data.multitask import MultiTaskDataModule, MultiTaskStream, TaskSpec
from tasklight.multitask import (MMoE, MTAN, Concat, CrossStitch, FiLM, HardSharing, MultiHead, Multiplicative,
                                 SoftSharing, trunk_stages)
from tasklight.multitask.arch_experts import CGC, LTB, PLE, DSelectK
from tasklight.multitask.module import MultiTaskModule
from tasklight.multitask.weighting import MGDA, PCGrad
from tasklight.nn.nets import MLP, Conv4


def specs(T=3, out=3):
    return [TaskSpec(f"task{t}", out) for t in range(T)]


def task_sets(T=3, n=24, d=4, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sets = []
    for _ in range(T):
        x = torch.randn(n, d, generator=gen)
        w = torch.randn(d, classes, generator=gen)
        sets.append(TensorDataset(x, (x @ w).argmax(1)))
    return sets


def tiny_dm(T=3, b=4, steps=4):
    return MultiTaskDataModule(train_sets=task_sets(T), batch_size_per_task=b, steps_per_epoch=steps)


def fit(model, dm, steps):
    trainer = Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, dm)
    return trainer


def rows_of(task: torch.Tensor, T: int):
    return [(task == t).nonzero().flatten() for t in range(T)]


ALL = {
    "hard": HardSharing, "soft": lambda: SoftSharing(penalty=0.01), "concat": lambda: Concat(condition_layer=1),
    "film": lambda: FiLM(condition_layer=1, outputs="disjoint"), "multiplicative": Multiplicative,
    "multihead": MultiHead, "cross_stitch": CrossStitch, "mmoe": lambda: MMoE(num_experts=3), "mtan": MTAN,
    "cgc": CGC, "ple": PLE, "dselect_k": lambda: DSelectK(num_experts=3), "ltb": LTB,
}


def test_trunk_stages_compose_to_the_trunk():
    torch.manual_seed(0)
    for trunk, x in ((MLP(4, [8, 8], 6), torch.randn(5, 4)),
                     (Conv4(out_features=0, hidden=4, image_size=16), torch.rand(5, 1, 16, 16))):
        trunk.eval()
        h = x
        for s in trunk_stages(trunk):
            h = s(h)
        torch.testing.assert_close(h.flatten(1), trunk(x))
    assert len(trunk_stages(MLP(4, [8, 8], 6))) == 3  # each Linear starts a stage, activations join it
    with pytest.raises(ValueError, match="cannot split the trunk"):
        trunk_stages(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="has an output layer"):
        trunk_stages(Conv4(out_features=5, hidden=4, image_size=16))


def test_cross_stitch_against_an_explicit_computation():
    torch.manual_seed(1)
    model = MultiTaskModule(MLP(4, [8], 6), architecture=CrossStitch(self_weight=0.7), tasks=specs(3))
    arch = model.architecture
    torch.testing.assert_close(arch.alpha[0], torch.full((3, 3), 0.15) + 0.55 * torch.eye(3))
    with torch.no_grad():
        arch.alpha.normal_()
    x, task = torch.randn(7, 4), torch.tensor([0, 1, 2, 0, 1, 2, 2])
    # by hand: tower t's first stage (Linear + ReLU), the cross-stitch mix, each tower's second stage
    h1 = [F.relu(arch.towers[t][0][0](x)) for t in range(3)]
    mixed = [sum(arch.alpha[0, t, s] * h1[s] for s in range(3)) for t in range(3)]
    h2 = [arch.towers[t][1](mixed[t]) for t in range(3)]
    outs, rep = arch(x, None, rows_of(task, 3))
    for t in range(3):
        r = task == t
        torch.testing.assert_close(outs[t], arch.heads[t](h2[t][r]))
        torch.testing.assert_close(rep[r], h2[t][r])
    # identity units: independent towers, as soft sharing with no penalty
    with torch.no_grad():
        arch.alpha.copy_(torch.eye(3).expand_as(arch.alpha))
    outs, _ = arch(x, None, rows_of(task, 3))
    for t in range(3):
        r = task == t
        torch.testing.assert_close(outs[t], arch.heads[t](arch.towers[t][1](F.relu(arch.towers[t][0][0](x[r])))))


def test_mmoe_against_an_explicit_computation_and_one_expert_is_hard_sharing():
    torch.manual_seed(2)
    model = MultiTaskModule(MLP(4, [8], 6), architecture=MMoE(num_experts=3), tasks=specs(3))
    arch = model.architecture
    experts = [torch.cat([p.reshape(-1) for p in e.parameters()]) for e in arch.experts]
    assert not torch.equal(experts[0], experts[1])  # the experts start apart
    with torch.no_grad():
        for g in arch.gates:
            g.weight.normal_()
            g.bias.normal_()
    x, task = torch.randn(6, 4), torch.tensor([2, 0, 1, 1, 0, 2])
    outs, rep = arch(x, None, rows_of(task, 3))
    for t in range(3):
        r = task == t
        g = torch.softmax(x[r] @ arch.gates[t].weight.T + arch.gates[t].bias, -1)
        h = sum(g[:, e:e + 1] * arch.experts[e](x[r]) for e in range(3))
        torch.testing.assert_close(rep[r], h)
        torch.testing.assert_close(outs[t], arch.heads[t](h))
    one = MultiTaskModule(MLP(4, [8], 6), architecture=MMoE(num_experts=1), tasks=specs(3))
    a1 = one.architecture
    for t in range(3):
        r = task == t
        torch.testing.assert_close(a1(x, None, rows_of(task, 3))[0][t], a1.heads[t](a1.experts[0](x[r])))


def test_mtan_against_an_explicit_computation():
    torch.manual_seed(3)
    model = MultiTaskModule(MLP(4, [8], 6), architecture=MTAN(hidden=5), tasks=specs(2))
    arch = model.architecture
    x, task = torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 1])
    trunk = model.trunk
    s1 = F.relu(trunk.net[0](x))
    s2 = trunk.net[2](s1)
    outs, rep = arch(x, None, rows_of(task, 2))
    for t in range(2):
        r = task == t
        a0, a1 = arch.attention[t]
        m1 = torch.sigmoid(a0.gate[2](F.relu(a0.gate[0](s1[r]))))
        f1 = m1 * s1[r]
        m2 = torch.sigmoid(a1.gate[2](F.relu(a1.gate[0](torch.cat([s2[r], a1.bridge(f1)], 1)))))
        torch.testing.assert_close(rep[r], m2 * s2[r])
        torch.testing.assert_close(outs[t], arch.heads[t](m2 * s2[r]))
    # on images: masks on every conv block, the previous block's attended features pooled to the next size
    conv = MultiTaskModule(Conv4(out_features=0, hidden=4, image_size=16), architecture=MTAN(), tasks=specs(2))
    xi = torch.rand(4, 1, 16, 16)
    out = conv(xi, 1)
    assert out.shape == (4, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("outputs", ["shared", "disjoint"])
def test_conditioned_outputs_shared_or_disjoint_label_spaces(outputs):
    torch.manual_seed(4)
    tasks = [TaskSpec("a", 3), TaskSpec("b", 5)]
    model = MultiTaskModule(MLP(4, [8], 6), architecture=FiLM(outputs=outputs), tasks=tasks)
    arch = model.architecture
    x = torch.randn(4, 4)
    z = torch.eye(2)[1].expand(4, 2)
    arch._ctx.z = z
    full = arch.head(model.trunk(x))
    arch._ctx.z = None
    assert full.shape[1] == (5 if outputs == "shared" else 8)
    lo = 0 if outputs == "shared" else 3
    torch.testing.assert_close(model(x, 1), full[:, lo:lo + 5])


@pytest.mark.slow
def test_every_architecture_splits_its_parameters_and_learns():
    for name, make in ALL.items():
        seed_everything(5)
        dm = tiny_dm(T=3, b=8, steps=100)
        model = MultiTaskModule(MLP(4, [16], 8), architecture=make(),
                                optimizer=lambda p: torch.optim.Adam(p, lr=0.02))
        dm.setup()
        model.build(dm.task_specs, dm.task_descriptors.shape[1], example=dm.train_sets[0].tensors[0][:2])
        arch = model.architecture
        every = {id(p) for p in arch.parameters()}
        task = [{id(p) for p in arch.task_parameters(t)} for t in range(3)]
        shared = set() if name == "soft" else {id(p) for p in arch.shared_parameters()}
        assert set.union(shared, *task) == every, name  # every parameter is shared or one task's
        assert all(not (a & b) for i, a in enumerate(task) for b in task[i + 1:] + [shared]), name
        batch = MultiTaskStream(dm.train_sets, dm.descriptors, 24, 1).batch(0)
        with torch.no_grad():
            before = float(model._forward(batch).losses.mean())
        fit(model, dm, 40)
        with torch.no_grad():
            after = float(model._forward(batch).losses.mean())
        assert after < 0.6 * before, (name, before, after)


@pytest.mark.parametrize("name", ["cross_stitch", "mmoe", "mtan"])
def test_a_sampled_task_leaves_the_other_tasks_parameters_untouched(name):
    seed_everything(6)
    dm = tiny_dm(T=3)
    model = MultiTaskModule(MLP(4, [8], 6), architecture=ALL[name](), task_sampling="uniform", tasks_per_step=1,
                            weighting=PCGrad(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    dm.setup()
    model.build(dm.task_specs, example=dm.train_sets[0].tensors[0][:2])
    chosen = int(model.sample_tasks(0).nonzero())
    before = copy.deepcopy(model.architecture)
    fit(model, dm, 1)
    for t in range(3):
        moved = any(not torch.equal(a, b) for a, b in zip(before.task_parameters(t),
                                                          model.architecture.task_parameters(t)))
        assert moved == (t == chosen), (name, t)
    assert any(not torch.equal(a, b) for a, b in zip(before.shared_parameters(),
                                                     model.architecture.shared_parameters()))


def test_direction_only_weighting_on_cross_stitch_heads_get_their_own_gradient():
    seed_everything(7)
    dm = tiny_dm(T=3)
    model = MultiTaskModule(MLP(4, [8], 6), architecture=CrossStitch(), weighting=MGDA(),
                            optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    dm.setup()
    model.build(dm.task_specs)
    before = copy.deepcopy(model)
    batch = MultiTaskStream(dm.train_sets, dm.descriptors, 4, 1).batch(0)
    fw = before._forward(batch)
    expected = [torch.autograd.grad(fw.losses[t], list(before.heads[t].parameters()), retain_graph=True)
                for t in range(3)]
    fit(model, dm, 1)
    for t in range(3):
        for p0, p1, g in zip(before.heads[t].parameters(), model.heads[t].parameters(), expected[t]):
            torch.testing.assert_close(p1, p0 - 0.1 * g)


def test_architecture_errors_name_the_fix():
    with pytest.raises(TypeError, match="now an object such as tasklight.multitask.HardSharing"):
        MultiTaskModule(MLP(4, [8], 6), architecture="hard")
    used = HardSharing()
    MultiTaskModule(MLP(4, [8], 6), architecture=used, tasks=specs(2))
    with pytest.raises(ValueError, match="already built"):
        MultiTaskModule(MLP(4, [8], 6), architecture=used, tasks=specs(2))
    with pytest.raises(ValueError, match="SoftSharing penalty must be a finite number >= 0"):
        SoftSharing(penalty=-1.0)
    with pytest.raises(ValueError, match="outputs must be 'shared' or 'disjoint'"):
        FiLM(outputs="split")
    with pytest.raises(ValueError, match="CrossStitch self_weight must be in"):
        CrossStitch(self_weight=1.5)
    with pytest.raises(ValueError, match="MMoE num_experts must be >= 1"):
        MMoE(num_experts=0)
    with pytest.raises(ValueError, match="explicit `heads` are one per task"):
        MultiTaskModule(MLP(4, [8], 6), architecture=FiLM(), heads=[nn.Linear(6, 3)] * 2, tasks=specs(2))
    with pytest.raises(ValueError, match="cannot split the trunk"):
        MultiTaskModule(nn.Linear(4, 6), architecture=MTAN(), tasks=specs(2))
    model = MultiTaskModule(MLP(4, [8], 6), architecture=FiLM(), tasks=specs(2), descriptor_dim=2)
    with pytest.raises(ValueError, match="conditions on descriptors of size 2 but got descriptors of size 3"):
        model(torch.randn(2, 4), 0, z=torch.ones(3))


def test_a_checkpoint_rebuilds_a_non_default_architecture(tmp_path):
    seed_everything(8)
    dm = tiny_dm(T=2)
    model = MultiTaskModule(MLP(4, [8], 6), architecture=MTAN(hidden=4))
    trainer = fit(model, dm, 2)
    trainer.save_checkpoint(tmp_path / "mtan.ckpt")
    loaded = MultiTaskModule.load_from_checkpoint(tmp_path / "mtan.ckpt", trunk=MLP(4, [8], 6),
                                                  architecture=MTAN(hidden=4))
    x = torch.randn(5, 4)
    torch.testing.assert_close(loaded(x, 1), model(x, 1))
    rebuilt = MultiTaskModule.load_from_checkpoint(tmp_path / "mtan.ckpt")  # the checkpoint alone describes it
    assert type(rebuilt.architecture).__name__ == "MTAN"
    torch.testing.assert_close(rebuilt(x, 1), model(x, 1))
    with pytest.raises(ValueError, match="MTAN"):  # an explicit, different architecture is an error
        MultiTaskModule.load_from_checkpoint(tmp_path / "mtan.ckpt", trunk=MLP(4, [8], 6), architecture=HardSharing())
