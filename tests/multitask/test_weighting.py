"""Each weighting method against its formula, on hand-made losses and gradients."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from tasklight.core.seeding import seeded_generator
from tasklight.multitask.weighting import (
    CAGrad, DROWeighting, DWA, EqualWeighting, FAMO, GradNorm, IMTL, MGDA, NashMTL, PCGrad, RLW, StaticWeighting,
    TaskStats, UncertaintyWeighting, UPGrad, min_norm_weights, nash_bargaining_weights, pcgrad_coefficients,
)


def stats(losses, grads=None, active=None, step=0, epoch=0):
    losses = torch.as_tensor(losses, dtype=torch.float32)
    active = torch.ones(len(losses), dtype=torch.bool) if active is None else torch.as_tensor(active)
    g = None if grads is None else torch.as_tensor(grads, dtype=torch.float32)
    return TaskStats(losses, active, g, step, epoch)


def ready(method, T):
    method.setup(T)
    return method


def test_static_weights_and_equal_weighting():
    w = ready(StaticWeighting([1.0, 2.0, 0.5]), 3).compute_weights(stats([1.0, 1.0, 1.0], active=[True, False, True]))
    assert w.tolist() == [1.0, 0.0, 0.5]
    e = ready(EqualWeighting(), 3)
    losses = torch.tensor([0.3, 2.0, 1.0])
    assert float(e.loss(losses, e.compute_weights(stats(losses)))) == pytest.approx(3.3)
    with pytest.raises(ValueError, match="got 2 weights but there are 3 tasks"):
        StaticWeighting([1.0, 2.0]).setup(3)
    with pytest.raises(ValueError, match="finite and >= 0"):
        StaticWeighting([1.0, -1.0])


def test_uncertainty_weighting_loss_formula_and_optimum():
    u = ready(UncertaintyWeighting(), 3)
    with torch.no_grad():
        u.log_vars.copy_(torch.tensor([0.0, 1.0, -0.5]))
    losses = torch.tensor([0.7, 2.0, 0.1])
    w = u.compute_weights(stats(losses))
    s = u.log_vars.detach()
    torch.testing.assert_close(w, 0.5 * torch.exp(-s))
    expected = (0.5 * torch.exp(-s) * losses + 0.5 * s).sum()
    torch.testing.assert_close(u.loss(losses, w), expected)
    # d/ds_t [0.5 exp(-s_t) L_t + 0.5 s_t] = 0 at s_t = log L_t (Kendall et al. 2018)
    with torch.no_grad():
        u.log_vars.copy_(losses.log())
    total = u.loss(losses, u.compute_weights(stats(losses)))
    (g,) = torch.autograd.grad(total, u.log_vars)
    torch.testing.assert_close(g, torch.zeros(3), atol=1e-6, rtol=0)


def test_dwa_uses_the_ratio_of_the_two_previous_epoch_means():
    d = ready(DWA(temperature=2.0), 2)
    history = {0: [[1.0, 4.0], [3.0, 4.0]], 1: [[1.0, 2.0], [1.0, 2.0]], 2: [[5.0, 5.0]]}
    out = {}
    for epoch, steps in history.items():
        for losses in steps:
            out[epoch] = d.compute_weights(stats(losses, epoch=epoch))
    assert out[0].tolist() == [1.0, 1.0] and out[1].tolist() == [1.0, 1.0]  # first two epochs
    mean0, mean1 = torch.tensor([2.0, 4.0]), torch.tensor([1.0, 2.0])
    r = mean1 / mean0
    torch.testing.assert_close(out[2], 2 * torch.softmax(r / 2.0, 0))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        DWA(temperature=0.0)


def test_dro_weights_are_exponentiated_gradient_on_the_simplex():
    d = ready(DROWeighting(step_size=0.5), 3)
    seq = [[1.0, 2.0, 0.5], [0.5, 3.0, 1.0], [2.0, 1.0, 1.0]]
    for losses in seq:
        q = d.compute_weights(stats(losses))
    total = torch.tensor(seq).sum(0)
    torch.testing.assert_close(q, torch.softmax(0.5 * total, 0))  # q_t ∝ exp(eta * sum of past losses)
    # a task left out of a step keeps its log-weight; the reported weights cover the active tasks only
    q2 = d.compute_weights(stats([4.0, 0.0, 0.0], active=[True, False, False]))
    assert q2.tolist() == [1.0, 0.0, 0.0]
    new = torch.softmax(0.5 * (total + torch.tensor([4.0, 0.0, 0.0])), 0)
    torch.testing.assert_close(torch.exp(d.log_q).float(), new)
    with pytest.raises(ValueError, match="step_size must be a finite number > 0"):
        DROWeighting(step_size=0.0)


@pytest.mark.parametrize("seed", range(6))
def test_min_norm_two_tasks_closed_form(seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    if seed % 3 == 1:
        g[1] = 3 * g[0] + 0.01 * g[1]  # nearly parallel: one endpoint is optimal
    gamma = float(((g[1] - g[0]) @ g[1]) / (g[0] - g[1]).pow(2).sum())
    gamma = min(max(gamma, 0.0), 1.0)
    alpha = min_norm_weights(g @ g.T)
    assert alpha.tolist() == pytest.approx([gamma, 1 - gamma], abs=1e-9)
    d = alpha @ g
    if 0 < gamma < 1:  # interior optimum: the min-norm vector is orthogonal to g1 - g2
        assert float(d @ (g[0] - g[1])) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("T,P,seed", [(3, 2, 0), (4, 10, 1), (6, 3, 2), (5, 50, 3)])
def test_min_norm_many_tasks_matches_a_qp_solver(T, P, seed):
    from scipy.optimize import minimize

    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(T, P, generator=gen, dtype=torch.float64) + 0.5
    G = (g @ g.T).numpy()
    alpha = min_norm_weights(g @ g.T, max_iter=2000).numpy()
    assert alpha.min() >= -1e-12 and alpha.sum() == pytest.approx(1.0)
    ref = minimize(lambda a: a @ G @ a, np.full(T, 1.0 / T), jac=lambda a: 2 * G @ a, method="SLSQP",
                   bounds=[(0, 1)] * T, constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1}],
                   options={"ftol": 1e-14, "maxiter": 1000})
    best = float(ref.fun)
    assert float(alpha @ G @ alpha) <= best + 1e-12 * max(1.0, abs(best))
    # KKT on the simplex: (G alpha)_t >= alpha^T G alpha for every t, with equality on the support
    grad = G @ alpha
    assert grad.min() >= alpha @ grad - 1e-10 * np.abs(G).max()
    assert np.abs(grad[alpha > 1e-9] - alpha @ grad).max() <= 1e-10 * np.abs(G).max()


def _brute_force_min_norm(G):
    """The exact min-norm point: every face of the simplex, the KKT solution on it, the best feasible one."""
    T, best = G.shape[0], (np.inf, None)
    for r in range(1, T + 1):
        for face in itertools.combinations(range(T), r):
            face = list(face)
            K = np.ones((r + 1, r + 1))
            K[:r, :r], K[r, r] = G[np.ix_(face, face)], 0.0
            try:
                sol = np.linalg.solve(K, np.r_[np.zeros(r), 1.0])
            except np.linalg.LinAlgError:
                continue
            if sol[:r].min() >= -1e-14:
                a = np.zeros(T)
                a[face] = sol[:r]
                if a @ G @ a < best[0]:
                    best = (a @ G @ a, a)
    return best


@pytest.mark.parametrize("T", [2, 3, 4, 5])
def test_min_norm_is_exact_against_brute_force(T):
    """Issue 21: Frank-Wolfe stopped 2.8e-4 (relative) from the min-norm point at T=5; the solver is exact."""
    for seed in range(12):
        rng = np.random.default_rng(seed + 100 * T)
        g = rng.normal(size=(T, [T, T + 3, 40][seed % 3])) + [0.0, 0.5, 2.0][seed % 3]
        G = g @ g.T
        value, exact = _brute_force_min_norm(G)
        alpha = min_norm_weights(torch.from_numpy(G)).numpy()
        assert alpha @ G @ alpha == pytest.approx(value, rel=1e-10, abs=1e-14), seed
        np.testing.assert_allclose(alpha, exact, atol=1e-9)  # G is positive definite: one minimiser


def test_mgda_weights_normalization_and_inactive_tasks():
    g = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    losses = torch.tensor([1.0, 2.0, 0.5])
    m = ready(MGDA(normalization="l2"), 3)
    w = m.compute_weights(stats(losses, g, active=[True, True, False]))
    gn = g[:2] / g[:2].norm(dim=1, keepdim=True)
    ref = min_norm_weights(gn @ gn.T)
    torch.testing.assert_close(w, torch.tensor([ref[0], ref[1], 0.0]).float())
    assert w.tolist() == pytest.approx([0.5, 0.5, 0.0])  # unit vectors at 90 degrees
    plain = ready(MGDA(), 3).compute_weights(stats(losses, g, active=[True, True, False]))
    assert plain.tolist() == pytest.approx([0.1, 0.9, 0.0])  # |3a e1 + (1-a) e2|^2 min at a = 1/10
    lossn = ready(MGDA(normalization="loss+"), 3).compute_weights(stats(losses, g))
    gl = g / (losses * g.norm(dim=1))[:, None]
    torch.testing.assert_close(lossn, min_norm_weights((gl @ gl.T).double()).float())
    with pytest.raises(ValueError, match="normalization must be one of"):
        MGDA(normalization="max")
    with pytest.raises(ValueError, match="grad_source must be one of"):
        MGDA(grad_source="weights")
    with pytest.raises(ValueError, match="needs per-task gradients"):
        ready(MGDA(), 3).compute_weights(stats(losses))


def _pcgrad_on_vectors(g: torch.Tensor, orders) -> torch.Tensor:
    """PCGrad written directly on the gradient vectors (Yu et al. 2020, Alg. 1)."""
    out = []
    for i in range(g.shape[0]):
        gi = g[i].clone()
        for j in orders[i]:
            dot = gi @ g[j]
            if dot < 0:
                gi = gi - dot / (g[j] @ g[j]) * g[j]
        out.append(gi)
    return torch.stack(out).sum(0)


def test_pcgrad_two_task_projection_formula():
    g1, g2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([-1.0, 1.0], dtype=torch.float64)
    g = torch.stack([g1, g2])
    c = pcgrad_coefficients(g @ g.T, [[1, 0], [0, 1]])
    dot = g1 @ g2
    expected = (g1 - dot / (g2 @ g2) * g2) + (g2 - dot / (g1 @ g1) * g1)
    torch.testing.assert_close(c @ g, expected)
    # no conflict: plain sum
    h = torch.tensor([[1.0, 0.2], [0.5, 1.0]], dtype=torch.float64)
    assert pcgrad_coefficients(h @ h.T, [[0, 1], [1, 0]]).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("seed", range(3))
def test_pcgrad_matches_the_vector_algorithm_with_its_random_orders(seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    p = ready(PCGrad(seed=seed), 5)
    w = p.compute_weights(stats(torch.ones(5), g.float(), step=11)).double()
    orders = p.orders(11, list(range(5)))
    assert orders == p.orders(11, list(range(5))) and orders != p.orders(12, list(range(5)))  # seeded by step
    torch.testing.assert_close(w @ g, _pcgrad_on_vectors(g, orders), atol=1e-5, rtol=1e-5)
    # inactive tasks: the projection runs among the active ones only
    act = torch.tensor([True, False, True, True, False])
    w2 = p.compute_weights(stats(torch.ones(5), g.float(), active=act, step=3)).double()
    sub = g[act]
    assert w2[~act].abs().max() == 0
    torch.testing.assert_close(w2 @ g, _pcgrad_on_vectors(sub, p.orders(3, [0, 2, 3])), atol=1e-5, rtol=1e-5)


def test_gradnorm_target_and_first_update():
    gn = ready(GradNorm(alpha=1.5, lr=0.1), 3)
    norms = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    losses = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    initial = torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64)
    w = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    target = gn.targets(norms, losses, initial, w)
    ratio = losses / initial
    r = ratio / ratio.mean()
    torch.testing.assert_close(target, (w * norms).mean() * r ** 1.5)  # G_bar * r_t^alpha
    # first step: L_t(0) = L_t so r_t = 1 and the target is the mean norm; Adam's first step is lr * sign
    g = torch.diag(norms).float()  # gradient vectors with those norms
    used = gn.compute_weights(stats(losses.float(), g))
    assert used.tolist() == [1.0, 1.0, 1.0]  # the model uses the weights before the update
    gbar = float(norms.mean())
    raw = torch.tensor([1.0 - 0.1 * math.copysign(1, n - gbar) for n in norms.tolist()], dtype=torch.float64)
    torch.testing.assert_close(gn.w, raw * 3 / raw.sum())
    assert float(gn.w.sum()) == pytest.approx(3.0)
    assert gn.w[0] > gn.w[2]  # the task with the small gradient gains weight
    with pytest.raises(ValueError, match="GradNorm: alpha must be a finite number >= 0"):
        GradNorm(alpha=-1.0)


def test_weightings_reject_a_different_number_of_tasks():
    m = ready(DROWeighting(), 3)
    with pytest.raises(ValueError, match="set up for 3 tasks but got losses for 2"):
        m.compute_weights(stats([1.0, 2.0]))


def test_loss_ratio_methods_measure_from_the_lower_bound_and_reject_losses_below_it():
    u = UncertaintyWeighting()
    u.setup(2, lower_bounds=[-20.0, 0.0])
    losses = torch.tensor([-19.0, 0.5])
    w = u.compute_weights(stats(losses))
    s = u.log_vars.detach()
    torch.testing.assert_close(u.loss(losses, w), (0.5 * torch.exp(-s) * (losses - torch.tensor([-20.0, 0.0]))
                                                   + 0.5 * s).sum())
    d = DWA(temperature=1.0)
    d.setup(2, lower_bounds=[-2.0, 0.0])
    for epoch, losses in enumerate([[-1.0, 2.0], [-1.5, 1.0], [-1.5, 1.0]]):
        out = d.compute_weights(stats(losses, epoch=epoch))
    r = torch.tensor([0.5 / 1.0, 1.0 / 2.0])  # (L - b) ratios of epochs 1 and 0
    torch.testing.assert_close(out, 2 * torch.softmax(r, 0))
    for method in (UncertaintyWeighting(), DWA(), GradNorm()):
        method.setup(2)
        with pytest.raises(ValueError, match=r"task 1 has loss -0.3 < 0.*TaskSpec\(lower_bound=...\)"):
            method.compute_weights(stats([0.2, -0.3], torch.ones(2, 3)))


# ----------------------------------------------------------------------------- the newer methods
def test_rlw_is_a_softmax_of_seeded_normal_draws_per_step():
    r = ready(RLW(seed=3), 4)
    w = r.compute_weights(stats(torch.ones(4), step=5))
    gen = seeded_generator(3, 5)
    torch.testing.assert_close(w, torch.softmax(torch.randn(4, generator=gen, dtype=torch.float64), 0).float())
    assert float(w.sum()) == pytest.approx(1.0) and w.min() > 0
    assert torch.equal(w, r.compute_weights(stats(torch.ones(4), step=5)))  # every rank draws the same
    assert not torch.allclose(w, r.compute_weights(stats(torch.ones(4), step=6)))
    act = torch.tensor([True, False, True, True])
    w2 = r.compute_weights(stats(torch.ones(4), active=act, step=5))
    assert w2[1] == 0 and float(w2.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(w2[act], torch.softmax(r.logits(5, 3), 0).float())


def test_famo_weights_and_logit_updates_against_autograd_and_torch_adam():
    """FAMO written with autograd and torch.optim.Adam as in the paper's code; the next step's losses
    play the role of the losses after the update."""
    lr, gamma = 0.1, 1e-2
    seq = torch.tensor([[2.0, 1.0, 0.5], [1.5, 0.9, 0.6], [1.0, 0.8, 0.55], [0.7, 0.7, 0.5], [0.6, 0.4, 0.5]],
                       dtype=torch.float64)
    f = ready(FAMO(lr=lr, gamma=gamma), 3)
    xi = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([xi], lr=lr, weight_decay=gamma)
    prev = None
    for k, losses in enumerate(seq):
        if prev is not None:
            delta = (prev + 1e-8).log() - (losses + 1e-8).log()
            opt.zero_grad()
            xi.grad = torch.autograd.grad(torch.softmax(xi, -1), xi, grad_outputs=delta)[0]
            opt.step()
        prev = losses
        L = losses.clone().requires_grad_()
        z = torch.softmax(xi.detach(), -1)
        D = L + 1e-8
        c = (z / D).sum().detach()
        expected = torch.autograd.grad((D.log() * z / c).sum(), L)[0]  # d objective / d L_t
        w = f.compute_weights(stats(losses.float(), step=k))
        torch.testing.assert_close(w.double(), expected, atol=1e-6, rtol=1e-5)
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(f.xi, xi.detach(), atol=1e-6, rtol=1e-5)
    assert f.xi.argmax() == 2 and f.xi.argmin() == 0  # the slowest-improving task (in log space) gains weight
    with pytest.raises(ValueError, match="FAMO: lr must be a finite number > 0"):
        FAMO(lr=0.0)


def _cagrad_grid(g: torch.Tensor, c: float, n: int = 20001):
    """CAGrad's inner problem for two tasks by a dense grid over w = (a, 1 - a)."""
    a = torch.linspace(0, 1, n, dtype=torch.float64)
    W = torch.stack([a, 1 - a], 1)
    g0 = g.mean(0)
    gw = W @ g
    obj = gw @ g0 + c * g0.norm() * gw.norm(dim=1)
    return W[obj.argmin()]


@pytest.mark.parametrize("seed", range(4))
def test_cagrad_solves_its_inner_problem_and_builds_the_update(seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    c = 0.5
    m = ready(CAGrad(c=c, rescale=0), 2)
    w = torch.from_numpy(m.inner_weights(g @ g.T))
    assert float((w - _cagrad_grid(g, c)).abs().max()) < 2e-3
    coef = m.compute_weights(stats(torch.ones(2), g.float())).double()
    g0, gw = g.mean(0), w @ g
    torch.testing.assert_close(coef @ g, g0 + c * g0.norm() / gw.norm() * gw, atol=1e-5, rtol=1e-5)
    # the update lies on the ball around g0 of radius c ||g0||, and improves the worst task over g0 alone
    d = coef @ g
    assert float((d - g0).norm()) == pytest.approx(c * float(g0.norm()), rel=1e-4)
    assert float((g @ d).min()) >= float((g @ g0).min()) - 1e-9
    r1 = ready(CAGrad(c=c, rescale=1), 2).compute_weights(stats(torch.ones(2), g.float())).double()
    torch.testing.assert_close(r1, coef / (1 + c * c), atol=1e-6, rtol=1e-6)
    zero = ready(CAGrad(c=0.0), 2).compute_weights(stats(torch.ones(2), g.float())).double()
    torch.testing.assert_close(zero, torch.full((2,), 0.5, dtype=torch.float64), atol=1e-6, rtol=0)  # the mean
    with pytest.raises(ValueError, match="rescale must be 0, 1 or 2"):
        CAGrad(rescale=3)


@pytest.mark.parametrize("T,seed", [(2, 0), (3, 1), (5, 2)])
def test_nash_mtl_solves_the_bargaining_equation(T, seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(T, 8, generator=gen, dtype=torch.float64) + 0.3
    G = g @ g.T
    raw = ready(NashMTL(normalize=False), T).compute_weights(stats(torch.ones(T), g.float())).double()
    a = nash_bargaining_weights(G)
    torch.testing.assert_close(G @ a, 1 / a, atol=1e-6, rtol=1e-6)  # G alpha = 1 / alpha
    assert a.min() > 0
    torch.testing.assert_close(raw, a, atol=1e-5, rtol=1e-5)
    d = a @ g
    torch.testing.assert_close(g @ d, 1 / a, atol=1e-6, rtol=1e-6)  # g_t . d = 1 / alpha_t
    norm = ready(NashMTL(), T).compute_weights(stats(torch.ones(T), g.float())).double()
    # the default (normalize=True, conditioning only) solves the same equation with the raw G: the
    # paper's code and LibMTL's constraint -log(alpha_t c) - log((G / c alpha)_t) <= 0 is
    # alpha_t (G alpha)_t >= 1 with the raw G (issue 21: it used to be sqrt(||G||_F) times larger)
    torch.testing.assert_close(norm, raw, atol=1e-6, rtol=1e-6)
    ones = torch.ones(T, dtype=torch.float64)
    exact = ready(NashMTL(), T).compute_weights(TaskStats(ones, ones > 0, g))
    torch.testing.assert_close(exact * (G @ exact), ones, atol=1e-9, rtol=0)
    scaled = ready(NashMTL(), T).compute_weights(TaskStats(ones, ones > 0, 10 * g))
    torch.testing.assert_close(scaled, exact / 10, atol=1e-12, rtol=1e-9)  # d = sum alpha_t g_t keeps its norm


def test_nash_mtl_reuses_its_weights_between_updates():
    m = ready(NashMTL(update_every=3), 2)
    g1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    g2 = torch.tensor([[3.0, 1.0], [0.5, 2.0]])
    w0 = m.compute_weights(stats(torch.ones(2), g1, step=0))
    assert torch.equal(m.compute_weights(stats(torch.ones(2), g2, step=2)), w0)
    assert not torch.allclose(m.compute_weights(stats(torch.ones(2), g2, step=3)), w0)
    with pytest.raises(ValueError, match="update_every must be >= 1"):
        NashMTL(update_every=0)


@pytest.mark.parametrize("T,seed", [(2, 0), (3, 1), (4, 2)])
def test_imtl_gives_equal_projections_on_every_unit_gradient(T, seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(T, 7, generator=gen, dtype=torch.float64)
    m = ready(IMTL(), T)
    with torch.no_grad():
        m.log_scales.copy_(torch.linspace(-0.5, 0.5, T))
    w = m.compute_weights(stats(torch.ones(T), g.float())).double()
    scale = torch.exp(m.log_scales.detach().double())
    alpha = w / scale
    assert float(alpha.sum()) == pytest.approx(1.0, abs=1e-5)
    d = w @ g  # = sum alpha_t g'_t with g'_t = exp(s_t) g_t
    proj = d @ (g / g.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(proj, proj[:1].expand(T), atol=1e-5, rtol=1e-5)
    # heads: the scaled losses; the scales: d/ds [exp(s) L - s] = exp(s) L - 1
    losses = torch.linspace(0.5, 2.0, T)
    torch.testing.assert_close(m.task_weights(w.float()), scale.float())
    total = m.loss(losses, m.task_weights(w.float()))
    (gs,) = torch.autograd.grad(total, m.log_scales)
    torch.testing.assert_close(gs, torch.exp(m.log_scales.detach()) * losses - 1)
    # the paper's closed form on the scaled gradients: alpha_{2:} = g'_1 U^T (D U^T)^{-1}
    gs = scale[:, None] * g
    us = gs / gs.norm(dim=1, keepdim=True)
    D, U = gs[:1] - gs[1:], us[:1] - us[1:]
    rest = gs[0] @ U.T @ torch.linalg.inv(D @ U.T)
    torch.testing.assert_close(alpha, torch.cat([1 - rest.sum().reshape(1), rest]), atol=1e-5, rtol=1e-5)
    fixed = ready(IMTL(scale_losses=False), T)
    assert not fixed.log_scales.requires_grad


@pytest.mark.parametrize("seed", range(3))
def test_upgrad_never_conflicts_and_matches_torchjd_on_the_jacobian(seed):
    from torchjd.aggregation import UPGrad as JDUPGrad

    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    w = ready(UPGrad(), 4).compute_weights(stats(torch.ones(4), g.float())).double()
    d = w @ g
    assert float((g @ d).min()) >= -1e-6  # no task gradient conflicts with the update
    torch.testing.assert_close(d, JDUPGrad()(g), atol=1e-5, rtol=1e-4)
    h = torch.tensor([[1.0, 0.2], [0.4, 1.0], [0.8, 0.7]], dtype=torch.float64)  # no conflict: the mean
    wh = ready(UPGrad(), 3).compute_weights(stats(torch.ones(3), h.float())).double()
    torch.testing.assert_close(wh, torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-4, rtol=0)
