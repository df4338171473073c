"""Parity with LibMTL 1.1.5: both implementations get the same losses and gradients of one small
hard-sharing network, and must choose the same task weights and produce the same gradients on the
shared parameters, the heads and the methods' own parameters.

LibMTL 1.1.5 is an optional oracle (``pip install --no-deps LibMTL==1.1.5``; see docs/multitask.md):
its package ``__init__`` imports ``torchvision.models.utils``, which current torchvision no longer
has, so the weighting modules are loaded here without the package's ``__init__``. Where LibMTL
deviates from the paper we follow the paper, and the test states the difference (also in the docs).
"""
from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
from torch import nn

from _libmtl import libmtl_submodule

from tasklight.multitask.weighting import (
    CAGrad, DWA, EqualWeighting, GradNorm, IMTL, MGDA, PCGrad, RLW, TaskStats, UncertaintyWeighting,
    gradient_normalizers,
)

T = 3


@pytest.fixture(scope="module")
def libmtl():
    yield from libmtl_submodule("weighting")


class Net(nn.Module):
    """A shared trunk and one head per task; three regression losses."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(6, 2) for _ in range(T)])
        gen = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(T, 5, 4, generator=gen)
        self.y = torch.randn(T, 5, 2, generator=gen) * torch.tensor([1.0, 3.0, 0.3])[:, None, None]

    def losses(self) -> torch.Tensor:
        return torch.stack([((self.heads[t](self.trunk(self.x[t])) - self.y[t]) ** 2).mean() for t in range(T)])


def _flat(params) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in params])


def run_libmtl(cls, net: Net, setup=None, **kwargs):
    """One LibMTL ``backward`` on the net's losses: (returned weights, shared grad, head grads, method)."""
    method = cls()
    method.task_num, method.device, method.rep_grad = T, "cpu", False
    method.get_share_params = net.trunk.parameters
    method.zero_grad_share_params = lambda: net.trunk.zero_grad(set_to_none=False)
    method.init_param()
    if setup is not None:
        setup(method)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    weights = method.backward(net.losses(), **kwargs)
    return (np.asarray(weights, dtype=np.float64), _flat(net.trunk.parameters()),
            [_flat(h.parameters()) for h in net.heads], method)


def run_ours(method, net: Net, step=0, epoch=0, losses_override=None, before=None):
    """Our weights on the same losses and per-task shared gradients, and the gradients of the module's
    objective: ``loss(L, w)`` (``loss(L, task_weights(w))`` on the heads for direction-only methods,
    with ``sum_t w_t g_t`` on the trunk)."""
    method.setup(T)
    if before is not None:
        before(method)
    losses = net.losses()
    shared = list(net.trunk.parameters())
    G = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], shared, retain_graph=True)])
                     for t in range(T)])
    seen = losses.detach() if losses_override is None else losses_override
    w = method.compute_weights(TaskStats(seen, torch.ones(T, dtype=torch.bool), G, step, epoch))
    for p in list(net.parameters()) + list(method.parameters()):
        p.grad = None
    head_w = method.task_weights(w) if method.direction_only else w
    method.loss(losses, head_w).backward()
    shared_grad = (w.double()[:, None] * G.double()).sum(0).float() if method.direction_only else _flat(shared)
    return w.double().numpy(), shared_grad, [_flat(h.parameters()) for h in net.heads], G


def close(a, b, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               atol=tol, rtol=tol)


def test_equal_and_uncertainty_weighting(libmtl):
    net = Net()
    wl, sl, hl, _ = run_libmtl(libmtl.EW, copy.deepcopy(net))
    wo, so, ho, _ = run_ours(EqualWeighting(), copy.deepcopy(net))
    close(wl, wo), close(sl, so), [close(a, b) for a, b in zip(hl, ho)]
    # LibMTL starts log sigma^2 at -0.5 (ours: init_log_var, default 0)
    u = UncertaintyWeighting(init_log_var=-0.5)
    wl, sl, hl, ml = run_libmtl(libmtl.UW, copy.deepcopy(net))
    wo, so, ho, _ = run_ours(u, copy.deepcopy(net))
    close(wl, wo), close(sl, so), [close(a, b) for a, b in zip(hl, ho)]
    close(ml.loss_scale.grad, u.log_vars.grad)


@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_mgda(libmtl, normalization):
    net = Net(1)
    wl, sl, hl, _ = run_libmtl(libmtl.MGDA, copy.deepcopy(net), mgda_gn=normalization)
    wo, so, ho, G = run_ours(MGDA(normalization=normalization, grad_source="parameters"), copy.deepcopy(net))
    close(wl, wo, 1e-4)  # the same min-norm weights on the normalised gradients
    [close(a, b) for a, b in zip(hl, ho)]  # heads: their own loss's gradient
    # The paper's code (Sener & Koltun) applies the weights to the task losses: d = sum_t w_t g_t. LibMTL
    # applies them to the normalised gradients, d = sum_t w_t g_t / n_t; the two agree for "none".
    n = gradient_normalizers(G.double(), net.losses().detach().double(), normalization)
    close(sl, ((torch.as_tensor(wo) / n)[:, None] * G.double()).sum(0), 1e-4)
    if normalization == "none":
        close(sl, so, 1e-4)


def test_pcgrad_with_the_same_visiting_orders(libmtl, monkeypatch):
    net = Net(2)
    ours = PCGrad(grad_source="parameters", seed=7)
    orders = iter(ours.orders(3, list(range(T))))
    pc = sys.modules["LibMTL.weighting.PCGrad"]
    monkeypatch.setattr(pc.random, "shuffle", lambda x: x.__setitem__(slice(None), next(orders)))
    wl, sl, hl, _ = run_libmtl(libmtl.PCGrad, copy.deepcopy(net))
    wo, so, ho, G = run_ours(ours, copy.deepcopy(net), step=3)
    assert (G @ G.T).min() < 0  # the case has a conflict to project
    close(wl, wo, 1e-4), close(sl, so, 1e-4), [close(a, b) for a, b in zip(hl, ho)]


def test_dwa_from_the_same_epoch_means(libmtl):
    net = Net(3)
    means = np.array([[2.0, 1.0, 4.0], [1.5, 0.9, 2.0]]).T  # [task, epoch]: epochs 0 and 1
    setup = lambda m: (setattr(m, "epoch", 2), setattr(m, "train_loss_buffer", means))  # noqa: E731
    wl, sl, hl, _ = run_libmtl(libmtl.DWA, copy.deepcopy(net), setup=setup, T=2.0)
    d = DWA(temperature=2.0)

    def feed(method):
        for epoch in (0, 1):
            method.compute_weights(TaskStats(torch.tensor(means[:, epoch]).float(), torch.ones(T, dtype=torch.bool),
                                             None, epoch, epoch))

    wo, so, ho, _ = run_ours(d, copy.deepcopy(net), epoch=2, before=feed)
    close(wl, wo), close(sl, so), [close(a, b) for a, b in zip(hl, ho)]


def test_gradnorm_weights_update_direction(libmtl):
    """LibMTL parametrises w = T softmax(theta) (trained by the model's optimiser) and takes L_t(0)
    from the first epoch's mean; the paper (and we) update w directly and renormalise, with L_t(0) the
    first loss. Same state in: the same weights, the same shared gradient, and the same gradient of
    the GradNorm loss with respect to w (LibMTL's theta-gradient is its softmax chain rule)."""
    net = Net(4)
    losses0 = net.losses().detach().double() * torch.tensor([1.5, 1.2, 2.0], dtype=torch.float64)  # "L(0)"
    theta = torch.tensor([0.3, -0.2, 0.1])
    w = T * torch.softmax(theta, 0)

    def setup(m):
        m.epoch = 1
        m.train_loss_buffer = losses0.numpy()[:, None]
        with torch.no_grad():
            m.loss_scale.copy_(theta)

    wl, sl, hl, ml = run_libmtl(libmtl.GradNorm, copy.deepcopy(net), setup=setup, alpha=1.5)
    ours = GradNorm(alpha=1.5, grad_source="parameters")

    def before(m):
        m.w = w.double().clone()
        m.initial = losses0.clone()

    wo, so, ho, G = run_ours(ours, copy.deepcopy(net), before=before)
    close(wl, wo), close(sl, so)
    # the paper minimises sum_t w_t L_t over the whole network, so the heads get w_t grad L_t; LibMTL
    # backpropagates the unweighted losses into the heads and reweights the shared gradients only
    [close(a, b / wt) for a, b, wt in zip(hl, ho, wo)]
    norms = G.double().norm(dim=1)
    target = ours.targets(norms, net.losses().detach().double(), losses0, w.double())
    dw = GradNorm.weight_gradient(norms, target, w.double())
    z = torch.softmax(theta.double(), 0)
    close(ml.loss_scale.grad, T * z * (dw - (z * dw).sum()), 1e-4)


def test_imtl_hybrid(libmtl):
    net = Net(5)
    s = torch.tensor([0.2, -0.3, 0.5])
    ours = IMTL(grad_source="parameters")

    def setup(m):
        with torch.no_grad():
            m.loss_scale.copy_(s)

    def before(m):
        with torch.no_grad():
            m.log_scales.copy_(s)

    wl, sl, hl, ml = run_libmtl(libmtl.IMTL, copy.deepcopy(net), setup=setup)
    wo, so, ho, _ = run_ours(ours, copy.deepcopy(net), before=before)
    close(wl * np.exp(s.double().numpy()), wo, 1e-4)  # LibMTL returns alpha on the scaled losses' gradients
    close(sl, so, 1e-4), [close(a, b) for a, b in zip(hl, ho)]  # heads: exp(s_t) grad L_t
    close(ml.loss_scale.grad, ours.log_scales.grad)  # exp(s_t) L_t - 1


@pytest.mark.parametrize("rescale", [0, 1, 2])
def test_cagrad(libmtl, rescale):
    """LibMTL 1.1.5's CAGrad objective is written for exactly three tasks (``reshape(1, 3)``)."""
    net = Net(6)
    wl, sl, hl, _ = run_libmtl(libmtl.CAGrad, copy.deepcopy(net), calpha=0.5, rescale=rescale)
    ours = CAGrad(c=0.5, rescale=rescale, grad_source="parameters")
    wo, so, ho, G = run_ours(ours, copy.deepcopy(net))
    close(ours.inner_weights(G.double() @ G.double().T), wl, 2e-3)  # the inner simplex problem (SLSQP, two tols)
    close(sl, so, 2e-3 * float(so.norm())), [close(a, b) for a, b in zip(hl, ho)]


def test_rlw_from_the_same_normal_draws(libmtl):
    net = Net(7)
    ours = RLW(seed=2)
    z = ours.logits(5, T).float()

    class Draws:
        def sample(self):
            return z

    wl, sl, hl, _ = run_libmtl(libmtl.RLW, copy.deepcopy(net), setup=lambda m: setattr(m, "distribution", Draws()),
                               dist="Normal")
    wo, so, ho, _ = run_ours(ours, copy.deepcopy(net), step=5)
    close(wl, wo), close(sl, so), [close(a, b) for a, b in zip(hl, ho)]


# ------------------------------------------------------------------ methods of tasklight.multitask.weightings
def test_gls(libmtl):
    """Same objective (the geometric mean of the losses), so the same gradients everywhere. LibMTL 1.1.5
    reports ``L_t / (T prod_s L_s)`` as its weights; ours are the coefficients of its gradient,
    ``GM / (T L_t)``."""
    from tasklight.multitask.weightings import GLS

    net = Net(8)
    wl, sl, hl, _ = run_libmtl(libmtl.GLS, copy.deepcopy(net))
    wo, so, ho, _ = run_ours(GLS(), copy.deepcopy(net))
    close(sl, so), [close(a, b) for a, b in zip(hl, ho)]
    L = net.losses().detach().double()
    close(wo, L.prod() ** (1 / T) / (T * L))
    close(wl, L / (T * L.prod()))


def test_gradvac(libmtl, monkeypatch):
    """One step from the same targets ``hat phi`` and the same visiting orders: the same coefficients on
    the task gradients, shared gradient and head gradients. (LibMTL then updates ``hat phi_ij`` only for
    corrected pairs, the paper at every pair: the torchjd test checks several steps.)"""
    from tasklight.multitask.weightings import GradVac

    net = Net(2)
    ours = GradVac(beta=0.5, grad_source="parameters", seed=3)
    orders = iter(ours.orders(4, list(range(T))))
    gv = sys.modules["LibMTL.weighting.GradVac"]
    monkeypatch.setattr(gv.random, "shuffle", lambda x: x.__setitem__(slice(None), next(orders)))
    target = torch.full((T, T), 0.3)
    wl, sl, hl, _ = run_libmtl(libmtl.GradVac, copy.deepcopy(net), setup=lambda m: setattr(m, "rho_T", target.clone()),
                               beta=0.5)
    wo, so, ho, G = run_ours(ours, copy.deepcopy(net), step=4,
                             before=lambda m: m.phi_hat.copy_(target.double()))
    assert not np.allclose(wl, 1.0)  # some pairs were corrected
    close(wl, wo, 1e-4), close(sl, so, 1e-4), [close(a, b) for a, b in zip(hl, ho)]


def test_graddrop(libmtl, monkeypatch):
    """LibMTL 1.1.5's GradDrop works on the per-example gradients of a shared representation (times the
    sign of the representation: a sigmoid output here, so +1) and sums them over the batch to get the
    sign purity; the gradient it sends into the representation, summed over examples and tasks, is
    our GradDrop combination of the pooled per-task representation gradients (same uniform draws)."""
    from tasklight.multitask.weightings.graddrop import graddrop_direction

    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid())
    heads = [nn.Linear(6, 2) for _ in range(T)]
    x, y = torch.randn(T, 5, 4), torch.randn(T, 5, 2) * 2
    U = torch.rand(6)
    gd = sys.modules["LibMTL.weighting.GradDrop"]
    monkeypatch.setattr(gd.torch, "rand_like", lambda p: U.to(p))
    method = libmtl.GradDrop()
    method.task_num, method.device, method.rep_grad, method.task_name = T, "cpu", True, [f"t{t}" for t in range(T)]
    method.rep = {f"t{t}": trunk(x[t]) for t in range(T)}
    method.rep_tasks = {k: v.detach().clone().requires_grad_() for k, v in method.rep.items()}
    sent = []
    for v in method.rep.values():
        v.register_hook(lambda g: sent.append(g.sum(0)))
    losses = torch.stack([((heads[t](method.rep_tasks[f"t{t}"]) - y[t]) ** 2).mean() for t in range(T)])
    method.backward(losses, leak=0.2)
    pooled = torch.stack([method.rep_tasks[f"t{t}"].grad.sum(0) for t in range(T)]).double()
    expected = graddrop_direction(pooled, U.double(), torch.full((T,), 0.2, dtype=torch.float64))
    close(torch.stack(sent).sum(0), expected, 1e-5)
