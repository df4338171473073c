"""Parity with torchjd: our weighting methods and torchjd's weightings/aggregators get the same task
gradients (a random Jacobian with conflicting rows, float64) and must give the same update; stateful
methods are run for several steps on different gradients. Where torchjd or the reference departs from
the paper, the method's docstring (and docs/multitask.md) says so."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import torchjd.aggregation as jd
from tasklight.multitask import UPGrad
from tasklight.multitask.weighting import TaskStats
from tasklight.multitask.weightings import (AlignedMTL, ConFIG, DualProj, ExcessMTL, FairGrad, GradDrop, GradVac,
                                            MoDo, SDMGrad, TorchJD)
from tasklight.multitask.weightings.graddrop import graddrop_direction


def jacobian(T=3, P=7, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(T, P, generator=gen, dtype=torch.float64)
    J[1] = -0.7 * J[0] + 0.5 * J[1]  # a conflict
    return J * torch.tensor([1.0, 3.0, 0.5, 2.0, 1.5][:T], dtype=torch.float64)[:, None]


def stats(J, step=0, losses=None) -> TaskStats:
    T = J.shape[0]
    losses = torch.linspace(0.5, 1.5, T, dtype=torch.float64) if losses is None else losses
    return TaskStats(losses, torch.ones(T, dtype=torch.bool), J, step, 0)


def close(a, b, tol=1e-8):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               atol=tol, rtol=tol)


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_aligned_mtl(scale_mode):
    for seed in range(3):
        J = jacobian(4, 9, seed)
        ours = AlignedMTL(scale_mode=scale_mode)
        w = ours.compute_weights(stats(J))
        close(w, jd.AlignedMTLWeighting(scale_mode=scale_mode)(J @ J.T))
        close(J.T @ w, jd.AlignedMTL(scale_mode=scale_mode)(J))
    # rank-deficient gradients: the components beyond the rank are dropped
    J = torch.cat([J[:2], J[:1] + J[1:2]])
    close(AlignedMTL().compute_weights(stats(J)) @ J, jd.AlignedMTL()(J), 1e-6)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_fairgrad(alpha):
    for T, P, seed in [(3, 8, 1), (5, 6, 2), (2, 4, 3)]:
        J = jacobian(T, P, seed)
        G = J @ J.T
        w = FairGrad(alpha=alpha).compute_weights(stats(J))
        close(G @ w, w ** (-1.0 / alpha), 1e-9)  # the alpha-fair equation, solved to our tolerance
        close(w, jd.FairGradWeighting(alpha=alpha)(G), 1e-5)  # torchjd: scipy's least squares, default tolerance


def test_sdmgrad():
    ours, theirs = SDMGrad(), jd.SDMGradWeighting()  # the same defaults: lambda 0.3, lr 10, momentum 0.5, 20 iters
    for step in range(4):
        J = jacobian(3, 6, 10 + step)
        close(ours.compute_weights(stats(J, step)), theirs(J @ J.T))


@pytest.mark.parametrize("gamma", [1e-3, 0.05])
def test_modo(gamma):
    ours, theirs = MoDo(gamma=gamma, rho=0.1), jd.MoDoWeighting(gamma=gamma, rho=0.1)
    for step in range(4):
        J = jacobian(3, 6, 20 + step)
        w = ours.compute_weights(stats(J, step))
        close(w, theirs(J @ J.T))
    assert abs(float(w.sum()) - 1) < 1e-12 and float(w.min()) >= 0


def test_excess_mtl():
    ours, theirs = ExcessMTL(robust_step_size=0.5), jd.ExcessMTLWeighting(robust_step_size=0.5)
    for step in range(4):
        J = jacobian(3, 6, 30 + step)
        close(ours.compute_weights(stats(J, step)), theirs(J), 1e-7)


def test_gradvac(monkeypatch):
    """Several steps (the targets ``hat phi`` carry over) with the same visiting orders."""
    ours, theirs = GradVac(beta=0.5, seed=5), jd.GradVacWeighting(beta=0.5)
    for step in range(4):
        J = jacobian(3, 6, 40 + step)
        perms = iter([[[j for j in range(3) if j != i].index(k) for k in order]
                      for i, order in enumerate(ours.orders(step, [0, 1, 2]))])
        w = ours.compute_weights(stats(J, step))
        with monkeypatch.context() as m:
            m.setattr(torch, "randperm", lambda n, **kw: torch.tensor(next(perms)))
            close(w, theirs(J @ J.T))
    assert (ours.phi_hat != 0).any()


@pytest.mark.parametrize("leak", [0.0, [0.1, 0.5, 0.0]])
def test_graddrop(monkeypatch, leak):
    J = jacobian(3, 50, 3)
    ours = GradDrop(leak=leak, seed=2)
    ours.setup(3)
    U = ours.uniform(7, 50)
    d = ours.shared_direction(stats(J, 7), ours.compute_weights(stats(J, 7)))
    leak_t = None if leak == 0.0 else torch.tensor(leak, dtype=torch.float64)
    with monkeypatch.context() as m:
        m.setattr(torch, "rand", lambda *a, **kw: U)
        close(d, jd.GradDrop(leak=leak_t)(J))
    # entries where all gradients agree in sign are kept whole; the draws differ from step to step
    agree = (J > 0).all(0) | (J < 0).all(0)
    close(d[agree], J.sum(0)[agree])
    assert not torch.equal(ours.uniform(7, 50), ours.uniform(8, 50))


def test_config():
    for seed in range(3):
        J = jacobian(3, 8, 50 + seed)
        w = ConFIG().compute_weights(stats(J))
        close(J.T @ w, jd.ConFIG()(J))
        u = J / J.norm(dim=1, keepdim=True)
        cos = u @ (J.T @ w) / (J.T @ w).norm()
        close(cos, cos.mean().expand(3))  # equal angle to every task gradient
    pref = [1.0, 2.0, 0.5]
    close(J.T @ ConFIG(pref=pref).compute_weights(stats(J)), jd.ConFIG(pref_vector=torch.tensor(pref).double())(J))


def test_dualproj():
    from scipy.optimize import minimize

    for seed in range(3):
        J = jacobian(3, 5, 60 + seed)
        w = DualProj().compute_weights(stats(J))
        d = J.T @ w
        close(d, jd.DualProj()(J))
        # independent: the projection of the mean gradient onto {v : J v >= 0}, by SLSQP
        mean = J.mean(0).numpy()
        A = J.numpy()
        res = minimize(lambda v: 0.5 * float((v - mean) @ (v - mean)), mean, jac=lambda v: v - mean,
                       constraints=[{"type": "ineq", "fun": lambda v: A @ v, "jac": lambda v: A}], method="SLSQP",
                       options={"ftol": 1e-14, "maxiter": 500})
        exact = J.T @ DualProj(norm_eps=1e-12, reg_eps=1e-12).compute_weights(stats(J))  # safeguards off
        close(exact, res.x, 1e-5)
        assert float((J @ exact).min()) > -1e-9  # conflicts with no task


def test_adapter():
    J = jacobian(3, 8, 70)
    s = stats(J)
    close(TorchJD("UPGrad").compute_weights(s), UPGrad().compute_weights(s), 1e-7)  # <method>Weighting by name
    close(TorchJD("MeanWeighting").compute_weights(s), torch.full((3,), 1 / 3))
    close(TorchJD("MoDo", {"gamma": 0.05, "rho": 0.1}).compute_weights(s), jd.MoDoWeighting(0.05, 0.1)(J @ J.T))
    close(TorchJD("ExcessMTL").compute_weights(s), jd.ExcessMTLWeighting()(J))  # a matrix weighting: gets J
    agg = TorchJD("ConFIG", {"pref_vector": [1.0, 2.0, 1.0]}, grad_source="parameters")
    w = agg.compute_weights(s)
    close(w, torch.ones(3))
    close(agg.shared_direction(s, w), jd.ConFIG(pref_vector=torch.tensor([1.0, 2.0, 1.0]).double())(J))
    assert TorchJD("UPGrad").shared_direction(s, w) is None
    with pytest.raises(ValueError, match="grad_source='parameters'"):
        TorchJD("ConFIG")
    with pytest.raises(ValueError, match="not a torchjd.aggregation Weighting or Aggregator.*UPGrad"):
        TorchJD("NoSuchMethod")
    with pytest.raises(ValueError, match="does not take options"):
        TorchJD("UPGrad", {"nonsense": 1})


def test_inactive_tasks_get_zero_weight_and_the_rest_match_the_reduced_problem():
    J = jacobian(4, 8, 80)
    active = torch.tensor([True, False, True, True])
    sub = J[active]
    for make in (AlignedMTL, ConFIG, FairGrad, DualProj):
        w = make().compute_weights(TaskStats(torch.ones(4, dtype=torch.float64), active, J, 0, 0))
        assert float(w[1]) == 0.0, make
        close(w[active], make().compute_weights(stats(sub)), 1e-7)
    assert np.isfinite(w.numpy()).all()


# ------------------------------------------------------------------ methods of tasklight.multitask.weighting
def test_the_earlier_methods_that_torchjd_also_has(monkeypatch):
    """Equal, static, MGDA, PCGrad (the same visiting orders), RLW (the same normal draws), IMTL-G and
    UPGrad against torchjd's aggregators on the Jacobian (CAGrad and Nash-MTL, which torchjd solves
    with cvxpy: the next test)."""
    from tasklight.multitask.weighting import IMTL, MGDA, PCGrad, RLW, EqualWeighting, StaticWeighting

    J = jacobian(3, 8, 90)
    s = stats(J)

    def update(method):
        method.setup(3)
        return J.T @ method.compute_weights(s).double()

    close(update(EqualWeighting()), jd.Sum()(J))
    close(update(StaticWeighting([0.5, 2.0, 1.0])), jd.Constant(torch.tensor([0.5, 2.0, 1.0]).double())(J))
    close(update(MGDA()), jd.MGDA(epsilon=1e-12, max_iters=100_000)(J), 1e-5)  # torchjd: Frank-Wolfe to a gap
    close(update(IMTL(scale_losses=False)), jd.IMTLG()(J))
    close(update(UPGrad()), jd.UPGrad()(J), 1e-7)
    pc = PCGrad(seed=3)
    orders = iter(pc.orders(s.step, [0, 1, 2]))
    with monkeypatch.context() as m:
        m.setattr(torch, "randperm", lambda n, **kw: torch.tensor(next(orders)))
        expected = jd.PCGrad()(J)
    assert (J @ J.T).min() < 0  # there is a conflict to project
    close(update(pc), expected)
    rlw = RLW(seed=4)
    z = rlw.logits(s.step, 3)
    with monkeypatch.context() as m:
        m.setattr(torch, "randn", lambda *a, **kw: z)
        expected = jd.Random()(J)
    close(update(rlw), expected)


@pytest.mark.filterwarnings("ignore:You are solving a parameterized problem that is not DPP")
@pytest.mark.parametrize("T", [2, 3, 4])
def test_nash_mtl_and_cagrad_against_torchjd(T):
    """torchjd's Nash-MTL (the paper's cvxpy iterations) and CAGrad (its cvxpy dual) on the same
    Jacobian. Nash-MTL: the same update (torchjd's norm cap lifted). CAGrad: the same direction;
    ours is scaled by 1 / (1 + c^2) as the paper's code and LibMTL do (``rescale=1``), torchjd's is not."""
    pytest.importorskip("cvxpy", reason="torchjd's Nash-MTL and CAGrad solve with cvxpy (the test extra installs it)")
    pytest.importorskip("ecos", reason="torchjd's Nash-MTL solves with ECOS (the test extra installs it)")
    from tasklight.multitask.weighting import CAGrad, NashMTL

    J = jacobian(T, 8, 90 + T)
    s = stats(J)

    def update(method):
        method.setup(T)
        return J.T @ method.compute_weights(s).double()

    close(update(NashMTL()), jd.NashMTL(n_tasks=T, max_norm=1e9, optim_niter=100)(J), 1e-5)
    for c in (0.4, 0.5):
        close(update(CAGrad(c=c, rescale=0)), jd.CAGrad(c=c)(J), 5e-4)  # two solvers' tolerances
        close(update(CAGrad(c=c)) * (1 + c * c), update(CAGrad(c=c, rescale=0)), 1e-9)
