"""MultiTaskModule, MultiTaskDataModule, the callbacks and the configs, single process."""
from __future__ import annotations

import copy
import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything
from torch import nn
from torch.utils.data import TensorDataset

from tasklight.callbacks.gradient_conflict import GradientConflictMonitor, cosine_matrix
from tasklight.callbacks.task_logging import TaskLossLogger
from tasklight.data.multitask import MultiTaskDataModule, MultiTaskStream, OmniglotAlphabetsDataModule, TaskSpec
from tasklight.multitask.toy import (
    TOY_SCALES, TOY_STARTS, ToyPoint, TwoObjectiveToyDataModule, pareto_gap, toy_descent, toy_objectives,
    toy_pareto_front,
)
from tasklight.nn.losses import HistogramLoss
from tasklight.multitask.architectures import (MMoE, MTAN, Concat, ConditionedLayer, CrossStitch, FiLM, HardSharing,
                                               MultiHead, Multiplicative, SoftSharing, _ZContext, trunk_stages)
from tasklight.multitask.arch_experts import CGC, LTB, PLE, DSelectK
from tasklight.multitask.module import MultiTaskModule
from tasklight.nn.nets import MLP
from tasklight.multitask.weighting import (
    FAMO, IMTL, NashMTL, DROWeighting, EqualWeighting, MGDA, PCGrad, UncertaintyWeighting, min_norm_weights,
    nash_bargaining_weights, pcgrad_coefficients,
)

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- helpers
def task_sets(T=3, n=24, d=4, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sets = []
    for _ in range(T):
        x = torch.randn(n, d, generator=gen)
        w = torch.randn(d, classes, generator=gen)
        sets.append(TensorDataset(x, (x @ w).argmax(1)))
    return sets


def tiny_dm(T=3, b=4, steps=4, **kw):
    return MultiTaskDataModule(train_sets=task_sets(T), val_sets=task_sets(T, 12, seed=1),
                               test_sets=task_sets(T, 12, seed=2), batch_size_per_task=b, steps_per_epoch=steps, **kw)


def specs(T=3, out=3, kind="classification"):
    return [TaskSpec(f"task{t}", out, kind) for t in range(T)]


def fit(model, dm, steps, callbacks=(), logger=False, val=False, **kw):
    trainer = Trainer(max_steps=steps, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1.0 if val else 0,
                      callbacks=list(callbacks), **kw)
    trainer.fit(model, dm)
    return trainer


def sgd(lr=0.1):
    return functools.partial(torch.optim.SGD, lr=lr)  # describable: checkpoints store it as config


def params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def first_batch(dm, b=None):
    dm.setup()
    return MultiTaskStream(dm.train_sets, dm.descriptors, b or dm.batch_size_per_task, 1).batch(0)


# ----------------------------------------------------------------------------- data
def test_stream_gives_every_task_disjoint_examples_per_rank_and_pass():
    sets = task_sets(T=2, n=12)
    z = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, 0.0]])
    streams = [MultiTaskStream(sets, z, 2, 100, seed=3, rank=r, world_size=2) for r in range(2)]
    seen = {0: [], 1: []}
    for step in range(3):  # 3 steps x 2 ranks x 2 examples = one pass over 12 examples
        for r, s in enumerate(streams):
            b = s.batch(step)
            assert b.task.tolist() == [0, 0, 1, 1]
            torch.testing.assert_close(b.z, z[b.task])  # z_i of each example's task
            for t in range(2):
                seen[t] += [tuple(x.tolist()) for x in b.x[b.task == t]]
    for t in range(2):
        assert sorted(seen[t]) == sorted(tuple(x.tolist()) for x in sets[t].tensors[0])  # each example once
    # the union of both ranks at step i is the single-process batch with twice the batch size
    single = MultiTaskStream(sets, z, 4, 100, seed=3).batch(1)
    union = torch.cat([streams[0].batch(1).x[:2], streams[1].batch(1).x[:2]])
    torch.testing.assert_close(single.x[:4], union)
    torch.testing.assert_close(streams[0].batch(5).x, MultiTaskStream(sets, z, 2, 100, 3, 0, 2).batch(5).x)


def test_task_descriptors_default_one_hot_or_given_tensor_or_file(tmp_path):
    dm = tiny_dm(T=3)
    torch.testing.assert_close(dm.task_descriptors, torch.eye(3))
    z = torch.randn(3, 5)
    torch.save(z, tmp_path / "z.pt")
    for source in (z, str(tmp_path / "z.pt")):
        dm = tiny_dm(T=3, task_descriptors=source)
        torch.testing.assert_close(dm.task_descriptors, z)
        b = next(iter(dm.val_dataloader()))
        torch.testing.assert_close(b.z, z[b.task])
    with pytest.raises(ValueError, match=r"shape \(2, 5\) but there are 3 tasks"):
        tiny_dm(T=3, task_descriptors=torch.randn(2, 5)).setup()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tiny_dm(T=3, task_descriptors=str(tmp_path / "missing.pt")).setup()


def test_omniglot_alphabets_are_tasks_with_held_out_drawers():
    dm = OmniglotAlphabetsDataModule(alphabets=["Greek", "Tagalog"], val_drawers=3, test_drawers=3,
                                     batch_size_per_task=5)
    dm.setup()
    assert [t.name for t in dm.tasks] == ["Greek", "Tagalog"]
    assert [t.out_features for t in dm.tasks] == [24, 17]  # characters per alphabet
    for t, chars in enumerate([24, 17]):
        assert len(dm.train_sets[t]) == 14 * chars and len(dm.val_sets[t]) == 3 * chars
        assert len(dm.test_sets[t]) == 3 * chars
        assert sorted(dm.train_sets[t].labels.unique().tolist()) == list(range(chars))
        # no image is in two splits
        flat = [s.images.flatten(1) for s in (dm.train_sets[t], dm.val_sets[t], dm.test_sets[t])]
        assert torch.cat(flat).unique(dim=0).shape[0] == sum(f.shape[0] for f in flat)
    b = next(iter(dm.train_dataloader()))
    assert b.x.shape == (10, 1, 28, 28) and 0.0 <= float(b.x.min()) and float(b.x.max()) <= 1.0
    small = OmniglotAlphabetsDataModule(alphabets=["Greek"], train_drawers=2)
    small.setup()
    assert len(small.train_sets[0]) == 2 * 24


# ----------------------------------------------------------------------------- architectures
def test_hard_sharing_shares_exactly_the_trunk_one_step_equals_manual_sgd():
    seed_everything(0)
    dm = tiny_dm(T=3)
    model = MultiTaskModule(MLP(4, [8], 6), architecture=HardSharing(), optimizer=sgd(0.1))
    dm.setup()
    model.build(dm.task_specs)
    names = [n for n, _ in model.named_parameters()]
    assert sorted({n.split(".")[1] for n in names}) == ["heads", "trunk"]
    assert sum(n.startswith("architecture.trunk.") for n in names) == 4  # one trunk, not one per task
    assert len(model.heads) == 3 and all(h.out_features == 3 for h in model.heads)
    before = copy.deepcopy(model)
    batch = first_batch(dm)
    # independent computation: each task alone through the trunk and its own head
    trunk_grad = [torch.zeros_like(p) for p in before.trunk.parameters()]
    head_grads = []
    for t in range(3):
        m = batch.task == t
        loss = F.cross_entropy(before.heads[t](before.trunk(batch.x[m])), batch.y[m])
        g = torch.autograd.grad(loss, list(before.trunk.parameters()) + list(before.heads[t].parameters()))
        trunk_grad = [a + b for a, b in zip(trunk_grad, g[:4])]
        head_grads.append(g[4:])
    fit(model, dm, 1)
    state = dm.state_dict()  # a resumed run continues the stream at batch 1
    assert (state["consumed"], state["seed"]) == (1, 0)
    for p0, p1, g in zip(before.trunk.parameters(), model.trunk.parameters(), trunk_grad):
        torch.testing.assert_close(p1, p0 - 0.1 * g)
    for t in range(3):
        for p0, p1, g in zip(before.heads[t].parameters(), model.heads[t].parameters(), head_grads[t]):
            torch.testing.assert_close(p1, p0 - 0.1 * g)


def _pooled_rep_grads(model, batch):
    """Per-task gradients on the shared representation summed over the task's rows, task by task."""
    out = []
    for t in range(model.num_tasks):
        m = batch.task == t
        h = model.trunk(batch.x[m]).detach().requires_grad_()
        loss = F.cross_entropy(model.heads[t](h), batch.y[m])
        out.append(torch.autograd.grad(loss, h)[0].sum(0))
    return torch.stack(out)


@pytest.mark.parametrize("method", ["equal", "mgda", "nashmtl", "pcgrad_params"])
def test_a_float64_model_keeps_float64_end_to_end(method):
    """Issue 21: losses and per-task gradients were cast to float32 (parity stopped at 1e-8); a float64
    model's step now equals the weightings' float64 arithmetic to 1e-12."""
    seed_everything(3)
    sets = [TensorDataset(ds.tensors[0].double(), ds.tensors[1]) for ds in task_sets(3)]
    dm = MultiTaskDataModule(train_sets=sets, batch_size_per_task=4, steps_per_epoch=4)
    weighting = {"equal": EqualWeighting(), "mgda": MGDA(), "nashmtl": NashMTL(),
                 "pcgrad_params": PCGrad(grad_source="parameters", seed=4)}[method]
    model = MultiTaskModule(MLP(4, [8], 6), weighting=weighting, optimizer=sgd(0.1))
    dm.setup()
    model.build(dm.task_specs)
    model.double()
    before = copy.deepcopy(model)
    batch = first_batch(dm)
    trunk = list(before.trunk.parameters())
    tgrads, hgrads = [], []
    for t in range(3):
        m = batch.task == t
        loss = F.cross_entropy(before.heads[t](before.trunk(batch.x[m])), batch.y[m])
        g = torch.autograd.grad(loss, trunk + list(before.heads[t].parameters()))
        tgrads.append(torch.cat([x.reshape(-1) for x in g[:4]]))
        hgrads.append(g[4:])
    G = torch.stack(tgrads)
    rep = _pooled_rep_grads(before, batch)
    assert rep.dtype == torch.float64
    if method == "equal":
        w = head_w = torch.ones(3, dtype=torch.float64)
    elif method == "mgda":
        w, head_w = min_norm_weights(rep @ rep.T), torch.ones(3, dtype=torch.float64)
    elif method == "nashmtl":
        w = head_w = nash_bargaining_weights(rep @ rep.T)
    else:
        w = pcgrad_coefficients(G @ G.T, weighting.orders(0, [0, 1, 2]))
        head_w = torch.ones(3, dtype=torch.float64)
    fit(model, dm, 1)
    expected = torch.cat([p.reshape(-1) for p in trunk]) - 0.1 * (w[:, None] * G).sum(0)
    got = torch.cat([p.reshape(-1) for p in model.trunk.parameters()])
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    for t in range(3):
        for p0, p1, g in zip(before.heads[t].parameters(), model.heads[t].parameters(), hgrads[t]):
            torch.testing.assert_close(p1, p0 - 0.1 * head_w[t] * g, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ["mgda", "pcgrad_params", "uncertainty", "imtl", "nashmtl"])
def test_weighted_step_matches_an_independent_computation(method):
    seed_everything(1)
    dm = tiny_dm(T=3)
    weighting = {"mgda": MGDA(), "pcgrad_params": PCGrad(grad_source="parameters", seed=4),
                 "uncertainty": UncertaintyWeighting(init_log_var=0.3), "imtl": IMTL(), "nashmtl": NashMTL()}[method]
    s0 = torch.tensor([0.2, -0.1, 0.4])
    if method == "imtl":
        weighting.setup(3)
        with torch.no_grad():
            weighting.log_scales.copy_(s0)
    model = MultiTaskModule(MLP(4, [8], 6), weighting=weighting, optimizer=sgd(0.1))
    dm.setup()
    model.build(dm.task_specs)
    before = copy.deepcopy(model)
    batch = first_batch(dm)
    trunk = list(before.trunk.parameters())
    losses, tgrads, hgrads = [], [], []
    for t in range(3):
        m = batch.task == t
        loss = F.cross_entropy(before.heads[t](before.trunk(batch.x[m])), batch.y[m])
        g = torch.autograd.grad(loss, trunk + list(before.heads[t].parameters()))
        losses.append(loss.detach())
        tgrads.append(torch.cat([x.reshape(-1) for x in g[:4]]))
        hgrads.append(g[4:])
    G = torch.stack(tgrads)
    if method == "mgda":
        rep = _pooled_rep_grads(before, batch).double()
        w = min_norm_weights(rep @ rep.T).float()
        head_w = torch.ones(3)  # MGDA steers the trunk only; heads take their own gradient
    elif method == "pcgrad_params":
        Gd = G.double()
        w = pcgrad_coefficients(Gd @ Gd.T, weighting.orders(0, [0, 1, 2])).float()
        head_w = torch.ones(3)
    elif method == "imtl":  # IMTL-G on the scaled losses' representation gradients, by the paper's closed form
        e = torch.exp(s0).double()
        rep = e[:, None] * _pooled_rep_grads(before, batch).double()
        u = rep / rep.norm(dim=1, keepdim=True)
        D, U = rep[:1] - rep[1:], u[:1] - u[1:]
        rest = rep[0] @ U.T @ torch.linalg.inv(D @ U.T)
        w = (torch.cat([1 - rest.sum().reshape(1), rest]) * e).float()
        head_w = torch.exp(s0)  # heads: the scaled losses exp(s_t) L_t
    elif method == "nashmtl":  # alpha_t (G alpha)_t = 1 with the raw G, by a generic root finder
        from scipy.optimize import root

        rep = _pooled_rep_grads(before, batch).double().numpy()
        Gr = rep @ rep.T
        sol = root(lambda a: a * (Gr @ a) - 1, 1 / np.sqrt(np.diag(Gr)), tol=1e-14)
        assert sol.success and (sol.x > 0).all()
        # the paper's code back-propagates sum_t alpha_t L_t: trunk sum_t alpha_t g_t, heads alpha_t grad L_t
        w = head_w = torch.from_numpy(sol.x).float()
    else:
        w = head_w = 0.5 * torch.exp(-torch.full((3,), 0.3))
    fit(model, dm, 1)
    expected_trunk = torch.cat([p.reshape(-1) for p in trunk]) - 0.1 * (w[:, None] * G).sum(0)
    torch.testing.assert_close(torch.cat([p.reshape(-1) for p in model.trunk.parameters()]), expected_trunk)
    for t in range(3):
        for p0, p1, g in zip(before.heads[t].parameters(), model.heads[t].parameters(), hgrads[t]):
            torch.testing.assert_close(p1, p0 - 0.1 * head_w[t] * g)
    if method == "uncertainty":  # d/ds [0.5 exp(-s) L + 0.5 s] = 0.5 - 0.5 exp(-s) L
        s0 = torch.full((3,), 0.3)
        expected = s0 - 0.1 * (0.5 - 0.5 * torch.exp(-s0) * torch.stack(losses))
        torch.testing.assert_close(model.weighting.log_vars.detach(), expected)
    if method == "imtl":  # d/ds [exp(s) L - s] = exp(s) L - 1
        expected = s0 - 0.1 * (torch.exp(s0) * torch.stack(losses) - 1)
        torch.testing.assert_close(model.weighting.log_scales.detach(), expected)


def test_soft_sharing_penalty_zero_equals_independent_training_and_penalty_formulas():
    seed_everything(2)
    dm = tiny_dm(T=2)
    dm.setup()
    model = MultiTaskModule(MLP(4, [8], 6), architecture=SoftSharing(penalty=0.0),
                            optimizer=lambda p: torch.optim.Adam(p, lr=0.05))
    model.build(dm.task_specs)
    with torch.no_grad():  # towers start from different points
        for p in model.architecture.towers[1].parameters():
            p.add_(0.3 * torch.randn_like(p))
    nets = [nn.Sequential(copy.deepcopy(model.architecture.towers[t]), copy.deepcopy(model.heads[t])) for t in range(2)]
    opts = [torch.optim.Adam(n.parameters(), lr=0.05) for n in nets]
    stream = MultiTaskStream(dm.train_sets, dm.descriptors, dm.batch_size_per_task, 100)
    for step in range(3):
        b = stream.batch(step)
        for t, (net, opt) in enumerate(zip(nets, opts)):
            m = b.task == t
            opt.zero_grad()
            F.cross_entropy(net(b.x[m]), b.y[m]).backward()
            opt.step()
    fit(model, dm, 3)
    for t in range(2):
        for a, b in zip(nets[t].parameters(),
                        list(model.architecture.towers[t].parameters()) + list(model.heads[t].parameters())):
            torch.testing.assert_close(a, b)
    # the penalties against their definitions
    thetas = [torch.cat([p.reshape(-1) for p in tw.parameters()]) for tw in model.architecture.towers]
    mean = torch.stack(thetas).mean(0)
    torch.testing.assert_close(model.architecture.penalty_value(), sum(((t - mean) ** 2).sum() for t in thetas))
    model.architecture.penalty_type = "pairwise"
    torch.testing.assert_close(model.architecture.penalty_value(), ((thetas[0] - thetas[1]) ** 2).sum())


def _tower_spread(model):
    thetas = torch.stack([torch.cat([p.detach().reshape(-1) for p in tw.parameters()]) for tw in model.architecture.towers])
    return float(((thetas - thetas.mean(0)) ** 2).sum())


def test_a_large_soft_penalty_approaches_hard_sharing():
    spreads = {}
    for lam in (0.0, 20.0):
        seed_everything(3)
        dm = tiny_dm(T=3, steps=100)
        model = MultiTaskModule(MLP(4, [8], 6), architecture=SoftSharing(penalty=lam), optimizer=sgd(0.02))
        fit(model, dm, 15)
        spreads[lam] = _tower_spread(model)
    assert spreads[0.0] > 1e-3
    assert spreads[20.0] < 0.05 * spreads[0.0]  # the towers stay (nearly) one network


def test_conditioned_layers_against_explicit_computations():
    ctx = _ZContext()
    z = torch.randn(5, 3)
    ctx.z = z
    # concat on a Linear layer == a Linear layer over [h, z]
    lin = nn.Linear(4, 6)
    cl = ConditionedLayer(lin, "concat", 3, ctx)
    h = torch.randn(5, 4)
    ref = F.linear(torch.cat([h, z], 1), torch.cat([lin.weight, cl.z_weight], 1), lin.bias)
    torch.testing.assert_close(cl(h), ref)
    # concat on a strided, padded Conv2d == the convolution of [h, constant z maps] (zero padding included)
    conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
    cc = ConditionedLayer(conv, "concat", 3, ctx)
    x = torch.randn(5, 2, 7, 7)
    zmap = z[:, :, None, None].expand(5, 3, 7, 7)
    ref = F.conv2d(torch.cat([x, zmap], 1), torch.cat([conv.weight, cc.z_weight], 1), conv.bias, 2, 1)
    torch.testing.assert_close(cc(x), ref)
    # FiLM: identity at initialisation, then h * (1 + W_g z + b_g) + W_b z + b_b
    film = ConditionedLayer(conv, "film", 3, ctx)
    torch.testing.assert_close(film(x), conv(x))
    with torch.no_grad():
        for p in list(film.gamma.parameters()) + list(film.beta.parameters()):
            p.normal_()
    g = (1 + z @ film.gamma.weight.T + film.gamma.bias)[:, :, None, None]
    b = (z @ film.beta.weight.T + film.beta.bias)[:, :, None, None]
    torch.testing.assert_close(film(x), conv(x * g + b))
    mult = ConditionedLayer(lin, "multiplicative", 3, ctx)
    with torch.no_grad():
        mult.gamma.weight.normal_()
    torch.testing.assert_close(mult(h), lin(h * (1 + z @ mult.gamma.weight.T)))


def test_conditioned_network_uses_z_and_multihead_is_one_head_per_task():
    seed_everything(4)
    model = MultiTaskModule(MLP(4, [8], 6), architecture=MultiHead(), tasks=specs(3))
    x = torch.randn(5, 4)
    h = model.trunk(x)
    for t in range(3):  # one-hot z: the output layer is task t's own linear head
        torch.testing.assert_close(model(x, t), h @ model.architecture.head.weight[t].T + model.architecture.head.bias[t])
    zmix = torch.tensor([0.5, 0.5, 0.0])
    torch.testing.assert_close(model(x, 0, z=zmix), 0.5 * (model(x, 0) + model(x, 1)))
    concat = MultiTaskModule(MLP(4, [8], 6), architecture=Concat(condition_layer=1),
                             tasks=specs(3), descriptor_dim=2)
    assert concat.architecture.condition_at == "trunk.net.2"
    za, zb = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert not torch.allclose(concat(x, 0, z=za), concat(x, 0, z=zb))  # the descriptor changes the output
    film = MultiTaskModule(MLP(4, [8], 6), architecture=FiLM(), tasks=specs(3))
    assert film.architecture.condition_at == "head"  # default: the trunk's output
    with pytest.raises(ValueError, match="out of range"):
        MultiTaskModule(MLP(4, [8], 6), architecture=Concat(condition_layer=7),
                        tasks=specs(3))


def test_regression_heads_with_a_histogram_loss():
    gen = torch.Generator().manual_seed(0)
    sets = [TensorDataset(torch.randn(16, 3, generator=gen), torch.randn(16, generator=gen)) for _ in range(2)]
    tasks = [TaskSpec("a", 1, "regression"), TaskSpec("b", 1, "regression")]
    hl = HistogramLoss(num_bins=10, v_min=-4, v_max=4)
    model = MultiTaskModule(MLP(3, [8], 8), task_losses=[hl, nn.MSELoss()], tasks=tasks)
    assert model.heads[0].out_features == 10 and model.heads[1].out_features == 1
    dm = MultiTaskDataModule(tasks, sets, batch_size_per_task=6)
    b = first_batch(dm)
    fw = model._forward(b)
    out0 = model.heads[0](model.trunk(b.x[b.task == 0]))
    torch.testing.assert_close(fw.losses[0], hl(out0, b.y[b.task == 0]))
    torch.testing.assert_close(fw.metric_sums[0], ((hl.predict(out0).squeeze(-1) - b.y[b.task == 0]) ** 2).sum())


# ----------------------------------------------------------------------------- task sampling
@pytest.mark.slow
def test_task_sampling_uniform_and_proportional_with_temperature():
    tasks = [TaskSpec(f"t{i}", 3, size=n) for i, n in enumerate([10, 30, 60])]
    counts = {}
    for temp in (1.0, 2.0):
        m = MultiTaskModule(MLP(4, [8], 6), task_sampling="proportional", tasks_per_step=1,
                            sampling_temperature=temp, tasks=tasks)
        masks = torch.stack([m.sample_tasks(s) for s in range(3000)])
        assert (masks.sum(1) == 1).all()
        counts[temp] = masks.float().mean(0)
        torch.testing.assert_close(m.sample_tasks(17), m.sample_tasks(17))  # the same on every rank
    p1 = torch.tensor([10.0, 30.0, 60.0])
    torch.testing.assert_close(counts[1.0], p1 / p1.sum(), atol=0.03, rtol=0)
    p2 = p1.sqrt()
    torch.testing.assert_close(counts[2.0], p2 / p2.sum(), atol=0.03, rtol=0)
    u = MultiTaskModule(MLP(4, [8], 6), task_sampling="uniform", tasks_per_step=2, tasks=tasks)
    masks = torch.stack([u.sample_tasks(s) for s in range(3000)])
    assert (masks.sum(1) == 2).all()
    torch.testing.assert_close(masks.float().mean(0), torch.full((3,), 2 / 3), atol=0.03, rtol=0)


def test_a_step_with_one_sampled_task_trains_only_that_task():
    seed_everything(5)
    dm = tiny_dm(T=3)
    model = MultiTaskModule(MLP(4, [8], 6), task_sampling="uniform", tasks_per_step=1, optimizer=sgd(0.1))
    dm.setup()
    model.build(dm.task_specs)
    chosen = int(model.sample_tasks(0).nonzero())
    before = params(model)
    fit(model, dm, 1)
    after = params(model)
    for t in range(3):
        changed = not torch.equal(before[f"architecture.heads.{t}.weight"], after[f"architecture.heads.{t}.weight"])
        assert changed == (t == chosen)
    assert not torch.equal(before["architecture.trunk.net.0.weight"], after["architecture.trunk.net.0.weight"])


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_raise_one_clear_error_each():
    empty = TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="task 'b' has no training data"):
        MultiTaskDataModule(specs(2)[:1] + [TaskSpec("b", 3)], task_sets(1) + [empty]).setup()
    with pytest.raises(ValueError, match="got 2 heads but there are 3 tasks"):
        MultiTaskModule(MLP(4, [8], 6), heads=[nn.Linear(6, 3), nn.Linear(6, 3)], tasks=specs(3))
    with pytest.raises(ValueError, match="task_losses has 2 entries but there are 3 tasks"):
        MultiTaskModule(MLP(4, [8], 6), task_losses=[nn.CrossEntropyLoss()] * 2, tasks=specs(3))
    with pytest.raises(ValueError, match="SoftSharing has none"):
        MultiTaskModule(MLP(4, [8], 6), architecture=SoftSharing(), weighting=MGDA())
    soft = MultiTaskModule(MLP(4, [8], 6), architecture=SoftSharing(), tasks=specs(2))
    with pytest.raises(ValueError, match="soft sharing has no shared parameters"):
        GradientConflictMonitor().on_fit_start(None, soft)
    with pytest.raises(ValueError, match="tasks_per_step=4 but there are only 3 tasks"):
        MultiTaskModule(MLP(4, [8], 6), task_sampling="uniform", tasks_per_step=4, tasks=specs(3))
    with pytest.raises(ValueError, match="needs tasks_per_step"):
        MultiTaskModule(MLP(4, [8], 6), task_sampling="uniform")
    with pytest.raises(ValueError, match="head_type='identity' needs the trunk's output size"):
        MultiTaskModule(MLP(4, [8], 6), head_type="identity", tasks=specs(3))
    # a model built for 2 tasks, fitted on a datamodule with 3
    model = MultiTaskModule(MLP(4, [8], 6), tasks=specs(2))
    with pytest.raises(ValueError, match="built for 2 tasks .* datamodule provides 3"):
        fit(model, tiny_dm(T=3), 1)


# ----------------------------------------------------------------------------- callbacks
def _conflicting_dm():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=gen)
    y = (x[:, 0] > 0).long()
    sets = [TensorDataset(x, y), TensorDataset(x, 1 - y)]  # the same inputs, opposite labels
    return MultiTaskDataModule([TaskSpec("pos", 2), TaskSpec("neg", 2)], sets, sets, sets, batch_size_per_task=32,
                               steps_per_epoch=2)  # every step sees the whole set


@pytest.mark.slow
def test_logger_and_gradient_conflict_monitor_with_wandb_offline(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    seed_everything(6)
    dm = _conflicting_dm()
    model = MultiTaskModule(MLP(4, [8], 6), optimizer=sgd(0.05))
    dm.setup()
    model.build(dm.task_specs)
    with torch.no_grad():  # equal heads with near-zero logits: the two tasks' output gradients are opposed
        model.heads[0].weight.mul_(0.01)
        model.heads[0].bias.zero_()
    model.heads[1].load_state_dict(model.heads[0].state_dict())
    before = copy.deepcopy(model)
    monitor = GradientConflictMonitor(every_n_steps=1, source="parameters")
    logger = WandbLogger(project="tasklight", save_dir=str(tmp_path), offline=True, name="mtl-test")
    trainer = fit(model, dm, 2, callbacks=[monitor, TaskLossLogger()], logger=logger, val=True)
    # the step-0 matrix against per-task trunk gradients computed independently
    b = first_batch(dm)
    g = []
    for t in range(2):
        m = b.task == t
        loss = F.cross_entropy(before.heads[t](before.trunk(b.x[m])), b.y[m])
        g.append(torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, list(before.trunk.parameters()))]))
    step, names, cos = monitor.history[0]
    assert step == 0 and names == ["pos", "neg"] and len(monitor.history) == 2
    torch.testing.assert_close(cos.float(), cosine_matrix(torch.stack(g)).float(), atol=1e-5, rtol=1e-5)
    # opposite labels on the same inputs through equal heads: conflicting gradients, a negative cosine
    assert float(cos[0, 1]) < -0.9
    # per-task validation results equal an independent evaluation of the final model
    metrics = trainer.callback_metrics
    per_task = []
    for t, name in enumerate(["pos", "neg"]):
        x, y = dm.val_sets[t].tensors
        out = model.heads[t](model.trunk(x))
        per_task.append(F.cross_entropy(out, y))
        assert float(metrics[f"val/tasks/{name}/loss"]) == pytest.approx(float(per_task[-1]), rel=1e-5)
        acc = (out.argmax(1) == y).float().mean()
        assert float(metrics[f"val/tasks/{name}/acc"]) == pytest.approx(float(acc), abs=1e-6)
    assert float(metrics["val/loss"]) == pytest.approx(float(torch.stack(per_task).mean()), rel=1e-5)
    assert "grad_conflict/cos/pos~neg" in metrics and "train/tasks/pos/weight" in metrics
    # a checkpoint rebuilds the network without the datamodule
    trainer.save_checkpoint(tmp_path / "mtl.ckpt")
    loaded = MultiTaskModule.load_from_checkpoint(tmp_path / "mtl.ckpt", trunk=MLP(4, [8], 6))
    x = dm.val_sets[1].tensors[0]
    assert loaded.task_names == ["pos", "neg"]
    torch.testing.assert_close(loaded(x, 1), model(x, 1))
    logger.experiment.finish()
    media = list((tmp_path / "wandb").glob("offline-run-*/files/media/table"))
    assert media, "no W&B tables were written"
    tables = [json.loads(p.read_text()) for p in media[0].rglob("*.table.json")]
    per_task_table = [t for t in tables if "task" in t["columns"] and "metric" in t["columns"]]
    assert per_task_table and {row[1] for row in per_task_table[0]["data"]} == {"pos", "neg"}
    assert any(t["columns"] == ["task", "pos", "neg"] for t in tables)  # the cosine matrix


# ----------------------------------------------------------------------------- the two-objective toy
@pytest.mark.slow
def test_toy_through_the_module_matches_the_plain_descent():
    start, steps = TOY_STARTS["nashmtl"][2], 30
    model = MultiTaskModule(ToyPoint(start), head_type="identity", weighting=MGDA(),
                            optimizer=lambda p: torch.optim.Adam(p, lr=0.05),
                            lr_scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, steps))
    fit(model, TwoObjectiveToyDataModule("nashmtl"), steps)
    x, f = toy_descent(MGDA, [start], TOY_SCALES["nashmtl"], steps=steps, lr=0.05)
    torch.testing.assert_close(model.trunk.point.detach().double(), x[0], atol=2e-4, rtol=0)
    torch.testing.assert_close(toy_objectives(x, TOY_SCALES["nashmtl"]), f)


def test_toy_gradient_on_the_kink_x2_0_is_the_published_one_on_every_torch_version():
    """At x2 = 0 both losses switch between valley and bowl through max(tanh(+-x2/2), 0). The published
    code (torch <= 2.13) differentiates both gates there (slopes +0.5 and -0.5), so the gradient at
    (0, 0) is (0, (f_log - f_sq) / 2) per loss; torch 2.14's clamp gives 0 at the kink instead."""
    x = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    f = toy_objectives(x, (0.1, 1.0))
    f_log = math.log(3.5) + 6  # both valleys at (0, 0): log|0.5 * (-7)| + 6 and log|0.5 * 3 + 2| + 6
    f_sq = (49 + 0.1 * 64) / 10 - 20  # both bowls at (0, 0)
    for i, scale in enumerate((0.1, 1.0)):
        (g,) = torch.autograd.grad(f[:, i].sum(), x, retain_graph=True)
        torch.testing.assert_close(g[0], torch.tensor([0.0, scale * 0.5 * (f_log - f_sq)], dtype=torch.float64))
    x, f = toy_descent(MGDA, [(0.0, 0.0)], TOY_SCALES["nashmtl"], steps=50, lr=0.2)
    assert float(x[0, 1]) < -1.0  # MGDA leaves the kink into the bowls


@pytest.mark.slow
def test_toy_mgda_pcgrad_and_robust_weighting_reach_the_pareto_front_equal_weighting_is_dragged():
    """Nash-MTL's variant (loss 1 scaled by 0.1), the five published starting points, Adam at 0.2
    annealed to 0 over 600 steps (the schedule of configs/mtl_toy_*.yaml)."""
    scales, starts = TOY_SCALES["nashmtl"], TOY_STARTS["nashmtl"]
    front = toy_pareto_front(scales)
    runs = {name: toy_descent(make, starts, scales, steps=600, lr=0.2)
            for name, make in [("equal", EqualWeighting), ("mgda", MGDA), ("pcgrad", PCGrad),
                               ("dro", lambda: DROWeighting(step_size=0.1))]}
    for name in ("mgda", "pcgrad", "dro"):
        x, f = runs[name]
        assert float(pareto_gap(f, front).max()) < 0.03, name  # every start ends on the Pareto front
    x_ls = (0.7 - 7.0) / 1.1  # argmin over the front of 0.1 f1 + f2: the larger loss f2 decides
    x, f = runs["equal"]
    assert (x[:, 0] - x_ls).abs().max() < 0.5  # equal weighting ends at the same point from every start
    assert float(f[:, 0].min()) > -0.5  # ... where the small-scale loss keeps < 25% of its range (best -2)
    assert float(runs["dro"][1][:, 0].max()) < -1.8  # the robust weighting protects the loss equal weighting drops
    for name in ("mgda", "pcgrad"):  # the gradient methods end at different points of the front
        spread = runs[name][0][:, 0]
        assert float(spread.max() - spread.min()) > 3.0, name


@pytest.mark.slow
def test_toy_nash_mtl_and_famo_reach_the_pareto_front_nash_mtl_at_different_points():
    """The claims of Navon et al. (2022) and Liu et al. (2023) on this toy, with the schedule above."""
    scales, starts = TOY_SCALES["nashmtl"], TOY_STARTS["nashmtl"]
    front = toy_pareto_front(scales)
    for name, make in [("nashmtl", NashMTL), ("famo", FAMO)]:
        x, f = toy_descent(make, starts, scales, steps=600, lr=0.2)
        assert float(pareto_gap(f, front).max()) < 0.03, name  # every start ends on the Pareto front
        if name == "nashmtl":
            assert float(x[:, 0].max() - x[:, 0].min()) > 3.0  # ... spread along it, not one trade-off


# ----------------------------------------------------------------------------- configs
CONFIGS = sorted(ROOT.glob("configs/mtl_omniglot_*.yaml")) + sorted(ROOT.glob("configs/mtl_toy_*.yaml"))


@pytest.mark.slow
def test_every_mtl_config_parses_and_builds_its_classes():
    from lightning.pytorch import LightningDataModule, LightningModule

    from tasklight.cli import TasklightCLI, expand_config

    assert len(CONFIGS) >= 32
    cli = TasklightCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       run=False, args=[*expand_config(str(CONFIGS[0])), "--trainer.logger", "false"],
                       auto_configure_optimizers=False, trainer_defaults={"inference_mode": False})
    weighting_of = {"equal": "EqualWeighting", "uncertainty": "UncertaintyWeighting", "gradnorm": "GradNorm",
                    "dwa": "DWA", "mgda": "MGDA", "pcgrad": "PCGrad", "dro": "DROWeighting", "rlw": "RLW", "famo": "FAMO",
                    "cagrad": "CAGrad", "nashmtl": "NashMTL", "imtl": "IMTL", "upgrad": "UPGrad"}
    stems = {p.stem for p in CONFIGS}
    for key in weighting_of:  # every method has a toy config and a hard-sharing Omniglot config
        assert f"mtl_toy_{key}" in stems and (key == "equal" or f"mtl_omniglot_hard_{key}" in stems), key
    for path in CONFIGS:
        init = cli.parser.instantiate_classes(cli.parser.parse_args(expand_config(str(path))))
        model, name = init.model, path.stem
        assert isinstance(model, MultiTaskModule), name
        key = name.split("_")[-1]
        if key in weighting_of:
            assert type(model.weighting).__name__ == weighting_of[key], name
        arch = name.split("_")[2]
        if name.startswith("mtl_omniglot_"):
            assert isinstance(init.data, OmniglotAlphabetsDataModule)
            expected = {"hard": HardSharing, "soft": SoftSharing, "concat": Concat, "film": FiLM, "multihead": MultiHead,
                        "multiplicative": Multiplicative, "cross": CrossStitch, "mmoe": MMoE, "mtan": MTAN,
                        "cgc": CGC, "ple": PLE, "dselect": DSelectK, "ltb": LTB}[arch]
            assert type(model.architecture) is expected, name
        else:
            assert isinstance(init.data, TwoObjectiveToyDataModule) and model.head_factory.kind == "identity"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mtl_toy_mgda", "mtl_omniglot_hard_pcgrad", "mtl_omniglot_film"])
def test_configs_run_end_to_end_through_the_cli(name, tmp_path, monkeypatch):
    from tasklight.cli import run_cli

    monkeypatch.chdir(tmp_path)  # the configs write runs/ into the working directory
    args = ["fit", "--config", str(ROOT / "configs" / f"{name}.yaml"), "--trainer.max_steps", "3",
            "--trainer.logger", "false", "--test_after_fit", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.num_sanity_val_steps", "0"]
    if "omniglot" in name:
        args += ["--data.init_args.batch_size_per_task", "2", "--data.init_args.eval_batch_size", "64",
                 "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "3",
                 "--model.init_args.trunk.init_args.hidden", "8"]
    cli = run_cli(args)
    assert cli.trainer.global_step == 3
    metrics = cli.trainer.callback_metrics
    if "omniglot" in name:
        assert "val/acc" in metrics and "val/tasks/Greek/acc" in metrics and cli.model.num_tasks == 8
    else:
        assert "train/tasks/f1/loss" in metrics and "grad_conflict/cos/f1~f2" in metrics
