"""Decision problems: solvers, differentiable surrogates, reference qualities, the DataModule, errors."""
import itertools
import math

import pytest
import torch
from torch.func import vmap

from tasklight.taskmet.problems import (BudgetAllocation, CubicTopK, DecisionDataModule, DecisionProblem,
                                            PortfolioOptimization, normalize_dq, project_simplex, soft_topk)

D = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- building blocks
def test_soft_topk_is_a_relaxed_indicator_and_tends_to_the_hard_topk():
    s = torch.randn(4, 12, generator=gen(), dtype=D)
    for k in (1, 3):
        z = soft_topk(s, k, temperature=0.5)
        torch.testing.assert_close(z.sum(-1), torch.full((4,), float(k), dtype=D))
        assert ((z > 0) & (z < 1)).all()
        hard = torch.zeros_like(s).scatter(-1, s.topk(k, -1).indices, 1.0)
        torch.testing.assert_close(soft_topk(s, k, temperature=1e-4), hard, atol=1e-6, rtol=0)
    # vmappable: the same values per row
    torch.testing.assert_close(vmap(lambda r: soft_topk(r, 2, 0.3))(s), soft_topk(s, 2, 0.3))


def test_soft_topk_gradient_matches_finite_differences():
    s = torch.randn(3, 8, generator=gen(1), dtype=D, requires_grad=True)
    w = torch.randn(3, 8, generator=gen(2), dtype=D)
    f = lambda t: (soft_topk(t, 2, 0.4) * w).sum()  # noqa: E731
    g, = torch.autograd.grad(f(s), s)
    d = torch.randn(3, 8, generator=gen(3), dtype=D)
    h = 1e-6
    fd = (f(s.detach() + h * d) - f(s.detach() - h * d)) / (2 * h)
    assert math.isclose(float((g * d).sum()), float(fd), rel_tol=1e-5)


def test_project_simplex_satisfies_the_projection_inequality():
    v = 2 * torch.randn(5, 9, generator=gen(4), dtype=D)
    z = project_simplex(v)
    assert (z >= 0).all()
    torch.testing.assert_close(z.sum(-1), torch.ones(5, dtype=D))
    for _ in range(20):  # <v - z, w - z> <= 0 for every w on the simplex
        w = torch.distributions.Dirichlet(torch.ones(9, dtype=D)).sample((5,))
        assert (((v - z) * (w - z)).sum(-1) <= 1e-12).all()


# ---------------------------------------------------------------- problems
def test_cubic_topk_data_solver_and_normalised_quality():
    p = CubicTopK(num_items=50, k=1)
    x, y = p.generate(64, gen())
    assert x.shape == (64, 50, 1) and y.shape == (64, 50, 1)
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(y, 10 * (x ** 3 - 0.65 * x))
    z = p.decide(y, x)
    assert (z.sum(-1) == 1).all() and (z.argmax(-1) == y[..., 0].argmax(-1)).all()
    torch.testing.assert_close(p.normalized_dq(y, y, x), torch.tensor(1.0))
    # random predictions score ~0, the least-squares line (negative slope) scores far below 0
    assert abs(float(p.normalized_dq(torch.randn(y.shape, generator=gen(5)), y, x))) < 0.25
    assert float(p.normalized_dq(-0.5 * x, y, x)) < -0.5


def test_budget_allocation_exact_solver_matches_brute_force_and_greedy_is_close():
    p = BudgetAllocation(num_websites=6, num_users=4, budget=2, feature_dim=3)
    x, y = p.generate(5, gen())
    assert x.shape == (5, 6, 3) and y.shape == (5, 6, 4) and ((y > 0) & (y < 1)).all()
    z = p.decide(y, x)
    assert (z.sum(-1) == 2).all()
    for i in range(5):
        best = max(sum(1 - math.prod(1 - float(y[i, w, u]) for w in s) for u in range(4))
                   for s in itertools.combinations(range(6), 2))
        assert math.isclose(float(p.objective(z[i:i + 1], y[i:i + 1], x[i:i + 1])), best, rel_tol=1e-6)
    greedy = BudgetAllocation(num_websites=6, num_users=4, budget=2, feature_dim=3, max_enumerate=1)
    assert not greedy.exact
    ratio = greedy.decision_quality(y, y, x) / p.decision_quality(y, y, x)
    assert (ratio >= 1 - 1 / math.e).all() and (ratio <= 1 + 1e-6).all()
    relaxed = p.relaxed_decide(y, x)
    torch.testing.assert_close(relaxed.sum(-1), torch.full((5,), 2.0))


def test_budget_relaxation_is_differentiable_and_close_to_the_solver():
    p = BudgetAllocation()
    x, y = p.generate(32, gen(2))
    y_hat = y.clone().requires_grad_()
    loss = p.task_loss(y_hat, y, x)
    g, = torch.autograd.grad(loss, y_hat)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert -float(loss.detach()) > 0.9 * float(p.decision_quality(y, y, x).mean())


def test_portfolio_solver_satisfies_the_kkt_conditions():
    p = PortfolioOptimization(num_assets=12, solver_steps=2000)
    x, y = p.generate(4, gen(3))
    x, y = x.double(), y.double()
    z = p.decide(y, x)
    assert (z >= 0).all()
    torch.testing.assert_close(z.sum(-1), torch.ones(4, dtype=D))
    g = y[..., 0] - 2 * p.risk_aversion * (p.covariance(x) @ z.unsqueeze(-1))[..., 0]
    for gi, zi in zip(g, z):  # active assets share the multiplier, inactive ones have no better gradient
        nu = gi[zi > 1e-8].mean()
        torch.testing.assert_close(gi[zi > 1e-8], nu.expand(int((zi > 1e-8).sum())), atol=1e-6, rtol=0)
        assert (gi[zi <= 1e-8] <= nu + 1e-6).all()
    # the risk term uses the factor structure: z^T Sigma z two ways
    risk = (z * p.risk_matvec(x, z)).sum(-1)
    torch.testing.assert_close(risk, (z.unsqueeze(-2) @ p.covariance(x) @ z.unsqueeze(-1))[..., 0, 0])
    y_hat = y.clone().requires_grad_()
    g, = torch.autograd.grad(p.task_loss(y_hat, y, x), y_hat)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


# ---------------------------------------------------------------- DataModule
def test_datamodule_batches_and_reference_qualities():
    dm = DecisionDataModule(CubicTopK(num_items=20), num_train=30, num_val=16, num_test=24, batch_size=10,
                            steps_per_epoch=4, seed=3)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 4
    x, y, best, rand = batches[0]
    assert x.shape == (10, 20, 1) and y.shape == (10, 20, 1) and best.shape == (10,) and rand.shape == (10,)
    x, y, best, rand = next(iter(dm.test_dataloader()))
    assert x.shape[0] == 24 and (best > rand).all()
    torch.testing.assert_close(best, dm.problem.decision_quality(y, y, x))
    torch.testing.assert_close(normalize_dq(best, best, rand), torch.tensor(1.0))
    # deterministic per seed, different across splits
    again = DecisionDataModule(CubicTopK(num_items=20), num_train=30, num_val=16, num_test=24, seed=3)
    again.setup("test")
    torch.testing.assert_close(again.splits["test"].tensors[0], x)
    assert not torch.equal(dm.splits["val"].tensors[0][:16], x[:16])


# ---------------------------------------------------------------- errors
class NaNSolver(CubicTopK):
    def solve(self, y_hat, x):
        return torch.full_like(y_hat[..., 0], float("nan"))

    def relaxed_solve(self, y_hat, x):
        return y_hat[..., 0] * float("inf")


def test_a_solver_returning_non_finite_values_raises():
    p = NaNSolver(num_items=10)
    x, y = p.generate(3, gen())
    with pytest.raises(ValueError, match=r"NaNSolver.solve returned non-finite decisions \(30 of 30"):
        p.decision_quality(y, y, x)
    with pytest.raises(ValueError, match=r"NaNSolver.relaxed_solve returned non-finite decisions"):
        p.task_loss(y, y, x)


def test_bad_predictions_and_arguments_raise():
    p = CubicTopK(num_items=10)
    x, y = p.generate(3, gen())
    with pytest.raises(ValueError, match=r"set the predictor's out_features to 1"):
        p.decide(torch.zeros(3, 10, 2), x)
    with pytest.raises(ValueError, match="contain NaN or inf"):
        p.decide(torch.full_like(y, float("nan")), x)
    with pytest.raises(ValueError, match="0 < k < num_items"):
        CubicTopK(num_items=5, k=5)
    with pytest.raises(ValueError, match="budget must be an integer >= 1"):
        BudgetAllocation(num_websites=4, budget=0)
    with pytest.raises(ValueError, match="risk_aversion must be a finite number > 0"):
        PortfolioOptimization(risk_aversion=0.0)
    with pytest.raises(TypeError, match="subclass DecisionProblem"):
        DecisionDataModule(problem="cubic")
    with pytest.raises(ValueError, match="0 < k < n"):
        soft_topk(torch.zeros(4), 4, 0.1)
    assert issubclass(CubicTopK, DecisionProblem)
