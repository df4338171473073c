"""The weighting methods that neither LibMTL 1.1.5 nor torchjd has (STCH, MoCo, DB-MTL), checked against
their objective or recursion written out here, and the module's ``shared_direction`` mechanism (the
shared parameters move along a method's own direction, the heads along their own loss's gradient)."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import TensorDataset

from tasklight.data.multitask import MultiTaskDataModule, MultiTaskStream
from tasklight.multitask import MultiTaskModule, SoftSharing
from tasklight.multitask.module import _set_shared_grads
from tasklight.multitask.weighting import TaskStats
from tasklight.multitask.weightings import DBMTL, GLS, STCH, ExcessMTL, GradDrop, MoCo, TorchJD
from tasklight.multitask.weightings._common import project_onto_simplex
from tasklight.nn.nets import MLP


def close(a, b, tol=1e-8):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               atol=tol, rtol=tol)


def bisect_simplex(v: torch.Tensor) -> torch.Tensor:
    """Projection onto the simplex by bisection on the threshold of ``max(v - theta, 0)``."""
    lo, hi = float(v.min()) - 1.0, float(v.max())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float((v - mid).clamp_min(0).sum()) > 1 else (lo, mid)
    return (v - 0.5 * (lo + hi)).clamp_min(0)


@pytest.mark.parametrize("seed", range(5))
def test_simplex_projection_against_bisection(seed):
    v = torch.randn(6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
    close(project_onto_simplex(v), bisect_simplex(v), 1e-10)


def grads(T=3, P=10, seed=0):
    return torch.randn(T, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def stats(G, losses, step=0, epoch=0):
    return TaskStats(losses, torch.ones(G.shape[0], dtype=torch.bool), G, step, epoch)


def test_stch_weights_are_the_gradient_of_its_objective():
    T, mu = 3, 0.5
    ours = STCH(mu=mu, warmup_epochs=2)
    ours.setup(T)
    gen = torch.Generator().manual_seed(1)
    nadir_losses = []
    for epoch, n_steps in [(0, 2), (1, 1), (2, 3), (3, 2), (4, 1)]:
        for _ in range(n_steps):
            L = (torch.rand(T, generator=gen, dtype=torch.float64) + 0.2).requires_grad_()
            w = ours.compute_weights(TaskStats(L.detach(), torch.ones(T, dtype=torch.bool), None, 0, epoch))
            if epoch <= 2:
                objective = torch.log(L).sum()  # warm-up: the log losses
                if epoch == 2:
                    nadir_losses.append(L.detach())
            else:
                z = torch.stack(nadir_losses).mean(0)
                objective = T * mu * torch.logsumexp(torch.log(L / z) / mu, 0)
            close(w, torch.autograd.grad(objective, L)[0], 1e-10)
    with pytest.raises(ValueError, match="mu must be a finite number > 0"):
        STCH(mu=0)


def test_gls_rejects_a_loss_at_its_lower_bound():
    g = GLS()
    g.setup(2)
    with pytest.raises(ValueError, match="above its lower bound"):
        g.compute_weights(stats(grads(2), torch.tensor([0.5, 0.0])))


def test_moco_tracks_gradients_and_projects_lambda():
    T, beta, bs, gamma, gs, rho = 3, 0.5, 0.5, 0.1, 0.5, 0.01
    ours = MoCo(beta=beta, beta_sigma=bs, gamma=gamma, gamma_sigma=gs, rho=rho)
    ours.setup(T)
    y, lam = torch.zeros(T, 10, dtype=torch.float64), torch.full((T,), 1 / T, dtype=torch.float64)
    for k in range(1, 5):
        G, L = grads(T, 10, k), torch.rand(T, generator=torch.Generator().manual_seed(k), dtype=torch.float64) + 0.5
        w = ours.compute_weights(stats(G, L, k))
        d = ours.shared_direction(stats(G, L, k), w)
        g = G / (G.norm(dim=1, keepdim=True) + 1e-8) * L[:, None]
        y = y - beta / k ** bs * (y - g)
        lam = bisect_simplex(lam - gamma / k ** gs * (y @ y.T + rho * torch.eye(T, dtype=torch.float64)) @ lam)
        close(w, lam, 1e-9), close(d, y.T @ lam, 1e-9)
    with pytest.raises(ValueError, match="needs grad_source='parameters'"):
        MoCo(grad_source="representation")


def test_db_mtl_balances_log_loss_gradients():
    T, beta, bs, eps = 3, 0.9, 0.5, 1e-8
    ours = DBMTL(beta=beta, beta_sigma=bs)
    ours.setup(T)
    h = torch.zeros(T, 10, dtype=torch.float64)
    for k in range(1, 5):
        G, L = grads(T, 10, 10 + k), torch.tensor([0.5, 2.0, 8.0], dtype=torch.float64) / k
        w = ours.compute_weights(stats(G, L, k))
        d = ours.shared_direction(stats(G, L, k), w)
        g = G / (L[:, None] + eps)  # the gradient of log(L_t + eps)
        h = g + beta / k ** bs * (h - g)
        n = h.norm(dim=1)
        close(w, n.max() / (n + 1e-8)), close(d, (n.max() / (n + 1e-8)) @ h)
        close(ours.task_weights(w), 1 / (L + eps))  # the heads train on the log losses
    close((w[:, None] * h).norm(dim=1), (w[:, None] * h).norm(dim=1).max().expand(T), 1e-6)  # equal magnitudes


def test_direction_methods_need_parameter_gradients():
    for make in (GradDrop, MoCo, DBMTL):
        with pytest.raises(ValueError, match="grad_source='parameters'"):
            make(grad_source="representation")
    with pytest.raises(ValueError, match="shared direction has shape"):
        _set_shared_grads([torch.nn.Parameter(torch.zeros(3))], torch.zeros(4))


# ----------------------------------------------------------------------------- through the module
def _dm(T=3):
    gen = torch.Generator().manual_seed(0)
    sets = []
    for _ in range(T):
        x = torch.randn(24, 4, generator=gen)
        sets.append(TensorDataset(x, (x @ torch.randn(4, 3, generator=gen)).argmax(1)))
    return MultiTaskDataModule(train_sets=sets, val_sets=sets, test_sets=sets, batch_size_per_task=4,
                               steps_per_epoch=4)


def _one_step(weighting):
    seed_everything(2)
    dm = _dm()
    model = MultiTaskModule(MLP(4, [8], 6), weighting=weighting, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    dm.setup()
    model.build(dm.task_specs)
    before = copy.deepcopy(model)
    batch = MultiTaskStream(dm.train_sets, dm.descriptors, dm.batch_size_per_task, 1).batch(0)
    trunk = list(before.trunk.parameters())
    losses, tgrads, hgrads = [], [], []
    for t in range(3):
        m = batch.task == t
        loss = F.cross_entropy(before.heads[t](before.trunk(batch.x[m])), batch.y[m])
        g = torch.autograd.grad(loss, trunk + list(before.heads[t].parameters()))
        losses.append(loss.detach())
        tgrads.append(torch.cat([x.reshape(-1) for x in g[:len(trunk)]]))
        hgrads.append(g[len(trunk):])
    Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0).fit(model, dm)
    moved = torch.cat([p.reshape(-1) for p in model.trunk.parameters()]) - torch.cat([p.reshape(-1) for p in trunk])
    heads = [[p1 - p0 for p0, p1 in zip(before.heads[t].parameters(), model.heads[t].parameters())] for t in range(3)]
    return torch.stack(tgrads).double(), torch.stack(losses).double(), hgrads, moved, heads


def test_a_torchjd_aggregator_moves_the_trunk_along_its_direction_and_heads_along_their_own_gradient():
    G, _, hgrads, moved, heads = _one_step(TorchJD("Mean", grad_source="parameters"))
    close(moved, -0.1 * G.mean(0), 1e-6)
    for t in range(3):
        [close(d, -0.1 * g, 1e-6) for d, g in zip(heads[t], hgrads[t])]


def test_moco_and_db_mtl_steps_through_the_module():
    G, L, hgrads, moved, heads = _one_step(MoCo())
    y = 0.5 * G / (G.norm(dim=1, keepdim=True) + 1e-8) * L[:, None]  # beta_1 = 0.5, from y = 0
    lam = bisect_simplex(torch.full((3,), 1 / 3, dtype=torch.float64) - 0.1 * y @ y.T @ torch.full((3,), 1 / 3,
                                                                                                 dtype=torch.float64))
    close(moved, -0.1 * y.T @ lam, 1e-6)
    [close(d, -0.1 * g, 1e-6) for t in range(3) for d, g in zip(heads[t], hgrads[t])]
    G, L, hgrads, moved, heads = _one_step(DBMTL())
    h = 0.1 * G / L[:, None]  # g' + 0.9 (0 - g') from h = 0
    n = h.norm(dim=1)
    close(moved, -0.1 * (n.max() / n) @ h, 1e-5)
    [close(d, -0.1 * g / L[t], 1e-5) for t in range(3) for d, g in zip(heads[t], hgrads[t])]  # log losses


def test_a_direction_method_needs_shared_parameters():
    with pytest.raises(ValueError, match="needs per-task gradients on shared parameters"):
        MultiTaskModule(MLP(4, [8], 6), architecture=SoftSharing(), weighting=MoCo())


@pytest.mark.parametrize("make", [MoCo, DBMTL, ExcessMTL])
def test_state_the_size_of_the_gradients_round_trips_through_a_state_dict(make):
    a = make()
    a.setup(3)
    for k in range(3):
        a.compute_weights(stats(grads(3, 10, k), torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64), k))
    b = make()
    b.setup(3)
    b.load_state_dict(a.state_dict())  # resumed from a checkpoint: the buffers take the saved size
    s = stats(grads(3, 10, 9), torch.tensor([0.7, 1.1, 1.5], dtype=torch.float64), 3)
    close(a.compute_weights(s), b.compute_weights(s))


@pytest.mark.slow
def test_direction_methods_descend_to_the_pareto_front_of_the_toy():
    """The toy of CAGrad / Nash-MTL (losses below 0: measured from their lower bound) with the
    schedule of configs/mtl_toy_*.yaml: MoCo's and DB-MTL's own directions end on the Pareto front."""
    from tasklight.multitask.toy import TOY_SCALES, TOY_STARTS, pareto_gap, toy_descent, toy_pareto_front

    scales, starts = TOY_SCALES["nashmtl"], TOY_STARTS["nashmtl"][:2]
    front = toy_pareto_front(scales)
    for make in (MoCo, DBMTL):
        x, f = toy_descent(make, starts, scales, steps=600, lr=0.2)
        assert float(pareto_gap(f, front).max()) < 0.05, make.__name__
