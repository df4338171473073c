"""Each weighting method against its formula, on hand-made losses and gradients."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tasklight.multitask.weighting import (
    DROWeighting, DWA, EqualWeighting, GradNorm, MGDA, PCGrad, StaticWeighting, TaskStats, UncertaintyWeighting,
    min_norm_weights, pcgrad_coefficients,
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
    with pytest.raises(ValueError, match="temperature must be > 0"):
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
    with pytest.raises(ValueError, match="step_size must be > 0"):
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
    assert float(alpha @ G @ alpha) <= best + 1e-4 * max(1.0, abs(best))
    # KKT on the simplex: (G alpha)_t >= alpha^T G alpha for every t
    assert (G @ alpha).min() >= alpha @ G @ alpha - 1e-3 * max(1.0, np.abs(G).max())


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
    with pytest.raises(ValueError, match="alpha >= 0 and lr > 0"):
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
