"""Decision-focused learning problems: a predict-then-optimise interface, three problems, a DataModule.

A problem instance is a set of ``U`` *units* (items, websites, assets). Each unit has features
``x [U, F]`` and an unknown parameter ``y [U, m]`` that a model predicts; a decision ``z`` is then
taken from the predictions of all units of the instance. Batches carry the instance dimension first:
``x [n, U, F]``, ``y [n, U, m]``.

To add a problem, subclass :class:`DecisionProblem` and implement four methods:

* ``generate(n, generator) -> (x, y)``: ``n`` instances;
* ``solve(y_hat, x) -> z``: the decision solver used in evaluation (exact or the usual heuristic;
  it need not be differentiable);
* ``relaxed_solve(y_hat, x) -> z``: a differentiable surrogate of the solver used in training;
* ``objective(z, y, x) -> [n]``: the true objective of a decision under the true parameters
  (higher is better).

The base class turns these into ``task_loss`` (minus the objective of the relaxed decision, what DFL
and TaskMet train on), ``decision_quality`` and the normalised decision quality
``(DQ - DQ_random) / (DQ_optimal - DQ_random)`` with ``DQ_random`` averaged over random predictions.
It also checks the solver's output: non-finite decisions raise one ``ValueError``.

Problems:

* :class:`CubicTopK`: TaskMet's cubic top-k (Bansal et al. 2023; Shah et al. 2022): ``x ~ U[-1, 1]``,
  ``y = 10 (x^3 - 0.65 x)``, 50 items, pick the top 1; relaxed by an entropic soft top-k;
* :class:`BudgetAllocation`: submodular (probabilistic coverage) budget allocation in the style of
  Wilder et al. (2019): pick ``budget`` websites to maximise the expected number of users who click
  at least once; predict each website's click-through rates from its features;
* :class:`PortfolioOptimization`: long-only Markowitz ``max y^T z - gamma z^T Sigma z`` over the
  simplex with a factor covariance; solved by accelerated projected gradient ascent, unrolled for the
  differentiable surrogate.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from itertools import combinations
from typing import Optional

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.func import grad
from torch.utils.data import DataLoader, RandomSampler, TensorDataset
from tasklight.config import RecordsInit
from tasklight.core.checks import check_int, check_real


# ====================================================================== differentiable building blocks
def soft_topk(scores: Tensor, k: float, temperature: float, rounds: int = 4) -> Tensor:
    """Entropic relaxation of the top-``k`` indicator along the last dimension.

    Solves ``max_z <scores, z> + temperature * H(z)`` over ``0 <= z <= 1, sum z = k`` (``H`` the binary
    entropy), whose solution is ``z = sigmoid((scores - lam) / temperature)`` with ``lam`` set so that
    ``sum z = k``. ``lam`` is bracketed by ``rounds`` rounds of a 16-interval grid search and polished
    by two Newton steps (no gradient), then one more Newton step is taken in the graph, which gives
    the exact implicit derivative ``d lam / d scores`` at the solution. As ``temperature -> 0``, ``z``
    tends to the hard top-``k`` indicator. Vmappable (no data-dependent control flow).
    """
    n = scores.shape[-1]
    if not 0 < k < n:
        raise ValueError(f"soft_topk needs 0 < k < n, got k={k} for n={n} scores.")
    if not temperature > 0:
        raise ValueError(f"soft_topk needs temperature > 0, got {temperature}.")
    tiny = torch.finfo(scores.dtype).tiny

    def newton(lam: Tensor, s: Tensor) -> Tensor:
        z = torch.sigmoid((s - lam) / temperature)
        slope = (z * (1 - z)).sum(-1, keepdim=True) / temperature
        return lam + (z.sum(-1, keepdim=True) - k) / slope.clamp_min(tiny)

    with torch.no_grad():
        s = scores.detach()
        lo = s.amin(-1, keepdim=True) - 30 * temperature  # sum z ~ n > k here ...
        hi = s.amax(-1, keepdim=True) + 30 * temperature  # ... and ~ 0 < k here
        frac = torch.linspace(0, 1, 17, dtype=s.dtype, device=s.device)
        for _ in range(rounds):
            grid = lo + (hi - lo) * frac  # [..., 17]
            count = torch.sigmoid((s.unsqueeze(-2) - grid.unsqueeze(-1)) / temperature).sum(-1)
            idx = (count > k).sum(-1, keepdim=True).clamp(1, 16) - 1
            lo, hi = grid.gather(-1, idx), grid.gather(-1, idx + 1)
        lam = (lo + hi) / 2
        for _ in range(2):
            lam = newton(lam, s).clamp(lo, hi)
    return torch.sigmoid((scores - newton(lam, scores)) / temperature)


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row (last dim) onto the probability simplex (sort-based)."""
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    ind = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = ((u - css / ind) > 0).sum(-1, keepdim=True)  # >= 1 always
    tau = css.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - tau).clamp_min(0)


def topk_indicator(scores: Tensor, k: int) -> Tensor:
    """Hard top-``k`` indicator (0/1) along the last dimension."""
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores).scatter(-1, idx, 1.0)


# ====================================================================== the interface
class DecisionProblem(RecordsInit, ABC):
    """A predict-then-optimise problem. Subclasses set ``num_units``, ``feature_dim``, ``out_dim`` and
    implement ``generate``, ``solve``, ``relaxed_solve`` and ``objective`` (see the module docstring)."""

    num_units: int
    feature_dim: int
    out_dim: int

    # ----- to implement
    @abstractmethod
    def generate(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` instances: features ``x [n, U, F]`` and true parameters ``y [n, U, m]``."""

    @abstractmethod
    def solve(self, y_hat: Tensor, x: Tensor) -> Tensor:
        """Decisions ``[n, ...]`` for predicted parameters ``y_hat [n, U, m]`` (used in evaluation)."""

    @abstractmethod
    def relaxed_solve(self, y_hat: Tensor, x: Tensor) -> Tensor:
        """Differentiable decisions (a relaxation of ``solve``) used by the task loss in training."""

    @abstractmethod
    def objective(self, z: Tensor, y: Tensor, x: Tensor) -> Tensor:
        """True objective ``[n]`` of decisions ``z`` under true parameters ``y`` (higher is better)."""

    def random_predictions(self, y: Tensor, generator: torch.Generator) -> Tensor:
        """Random predictions for ``DQ_random``: Gaussian with the mean and std of ``y``."""
        noise = torch.randn(y.shape, generator=generator, dtype=y.dtype).to(y.device)
        return y.mean() + y.std() * noise

    # ----- provided
    @property
    def name(self) -> str:
        return type(self).__name__

    def check_predictions(self, y_hat: Tensor, x: Tensor) -> None:
        want = x.shape[:-1] + (self.out_dim,)
        if y_hat.shape != want:
            raise ValueError(f"{self.name}: predictions have shape {tuple(y_hat.shape)} but features "
                             f"{tuple(x.shape)} need predictions {tuple(want)} (instances, units, out_dim="
                             f"{self.out_dim}); set the predictor's out_features to {self.out_dim}.")
        if not torch.isfinite(y_hat).all():
            raise ValueError(f"{self.name}: the predictions contain NaN or inf; the decision needs finite "
                             f"predictions (lower the learning rate or check the data).")

    def _checked(self, z: Tensor, what: str) -> Tensor:
        if not torch.isfinite(z).all():
            bad = int((~torch.isfinite(z)).sum())
            raise ValueError(f"{self.name}.{what} returned non-finite decisions ({bad} of {z.numel()} entries); "
                             f"a decision solver must return finite values: check its numerics (step sizes, "
                             f"divisions, logarithms) for these predictions.")
        return z

    def decide(self, y_hat: Tensor, x: Tensor) -> Tensor:
        """``solve`` with checks, without gradients."""
        self.check_predictions(y_hat, x)
        with torch.no_grad():
            return self._checked(self.solve(y_hat.detach(), x), "solve")

    def relaxed_decide(self, y_hat: Tensor, x: Tensor) -> Tensor:
        """``relaxed_solve`` with checks (differentiable in ``y_hat``)."""
        self.check_predictions(y_hat, x)
        return self._checked(self.relaxed_solve(y_hat, x), "relaxed_solve")

    def task_loss(self, y_hat: Tensor, y: Tensor, x: Tensor) -> Tensor:
        """The differentiable task loss: minus the mean objective of the relaxed decisions."""
        return -self.objective(self.relaxed_decide(y_hat, x), y, x).mean()

    def decision_quality(self, y_hat: Tensor, y: Tensor, x: Tensor) -> Tensor:
        """Per-instance true objective ``[n]`` of the decisions taken from ``y_hat``."""
        with torch.no_grad():
            return self.objective(self.decide(y_hat, x), y, x)

    def reference_quality(self, y: Tensor, x: Tensor, num_random: int = 10,
                          generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """``DQ_optimal [n]`` (decisions from the true ``y``) and ``DQ_random [n]`` (mean over
        ``num_random`` random predictions)."""
        if num_random < 1:
            raise ValueError(f"num_random must be >= 1, got {num_random}.")
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        best = self.decision_quality(y, y, x)
        rand = torch.stack([self.decision_quality(self.random_predictions(y, generator), y, x)
                            for _ in range(num_random)]).mean(0)
        return best, rand

    def normalized_dq(self, y_hat: Tensor, y: Tensor, x: Tensor, num_random: int = 10,
                      generator: Optional[torch.Generator] = None) -> Tensor:
        """``(DQ - DQ_random) / (DQ_optimal - DQ_random)`` over the instances given (one number)."""
        best, rand = self.reference_quality(y, x, num_random, generator)
        return normalize_dq(self.decision_quality(y_hat, y, x), best, rand)


def normalize_dq(dq: Tensor, dq_optimal: Tensor, dq_random: Tensor) -> Tensor:
    """Normalised decision quality of a set of instances: 1 is optimal, 0 is as good as random."""
    return (dq.sum() - dq_random.sum()) / (dq_optimal.sum() - dq_random.sum())


def _check_positive(problem: str, **values) -> None:
    for key, v in values.items():
        if not v > 0:
            raise ValueError(f"{problem}: {key} must be > 0, got {v}.")


# ====================================================================== problems
class CubicTopK(DecisionProblem):
    """Pick the ``k`` items with the largest ``y = 10 (x^3 - 0.65 x)``, ``x ~ U[-1, 1]``.

    A linear predictor cannot fit the cubic everywhere; the least-squares fit has a *negative* slope
    and picks the worst items, while a fit that is accurate for large ``x`` picks the best ones.
    ``temperature`` sets the entropic soft top-k of the surrogate (in units of the predictions).
    """

    feature_dim = 1
    out_dim = 1

    def __init__(self, num_items: int = 50, k: int = 1, temperature: float = 0.03, noise: float = 0.0) -> None:
        check_int("CubicTopK", "num_items", num_items, 2)
        check_int("CubicTopK", "k", k, 1, "items picked")
        check_real("CubicTopK", "noise", noise, 0.0, what="the std of the targets' noise")
        check_real("CubicTopK", "temperature", temperature, 0.0, strict=True)
        if not 0 < k < num_items:
            raise ValueError(f"CubicTopK needs 0 < k < num_items, got k={k}, num_items={num_items}.")
        _check_positive("CubicTopK", temperature=temperature)
        self.num_units = num_items
        self.k = k
        self.temperature = temperature
        self.noise = noise

    def generate(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.rand(n, self.num_units, 1, generator=generator) * 2 - 1
        y = 10 * (x ** 3 - 0.65 * x) + self.noise * torch.randn(x.shape, generator=generator)
        return x, y

    def solve(self, y_hat: Tensor, x: Tensor) -> Tensor:
        return topk_indicator(y_hat[..., 0], self.k)

    def relaxed_solve(self, y_hat: Tensor, x: Tensor) -> Tensor:
        return soft_topk(y_hat[..., 0], self.k, self.temperature)

    def objective(self, z: Tensor, y: Tensor, x: Tensor) -> Tensor:
        return (z * y[..., 0]).sum(-1)


class BudgetAllocation(DecisionProblem):
    """Choose ``budget`` of ``num_websites`` websites to maximise the expected number of users
    reached, ``sum_u 1 - prod_w (1 - z_w p_wu)`` (a monotone submodular coverage function).

    Units are websites; ``y [.., num_users]`` are a website's click-through rates for each user and
    the features are a fixed random network of them plus noise (the setting of Wilder et al. 2019
    and Shah et al. 2022). Predictions are clipped to ``[0, 1]`` inside the solvers (straight-through
    in the relaxation, so that out-of-range predictions still receive a gradient).

    * ``solve``: exact, by enumerating all subsets, when there are at most ``max_enumerate`` of them,
      otherwise greedy (a ``1 - 1/e`` approximation);
    * ``relaxed_solve``: the entropy-regularised multilinear relaxation
      ``max_z F(z) + temperature * H(z)`` over ``0 <= z <= 1, sum z = budget``, whose stationary points
      satisfy ``z = soft_topk(grad F(z), budget, temperature)``; ``relax_steps`` damped fixed-point
      steps from the single-website values, unrolled in the graph (a soft greedy).
    """

    def __init__(self, num_websites: int = 10, num_users: int = 5, budget: int = 2, feature_dim: int = 4,
                 feature_noise: float = 0.1, temperature: float = 0.1, relax_steps: int = 5,
                 max_enumerate: int = 5000, seed: int = 0) -> None:
        for name, value in (("num_websites", num_websites), ("num_users", num_users), ("budget", budget),
                            ("feature_dim", feature_dim), ("relax_steps", relax_steps), ("max_enumerate", max_enumerate)):
            check_int("BudgetAllocation", name, value, 1)
        check_real("BudgetAllocation", "feature_noise", feature_noise, 0.0)
        check_real("BudgetAllocation", "temperature", temperature, 0.0, strict=True)
        if not 0 < budget < num_websites:
            raise ValueError(f"BudgetAllocation needs 0 < budget < num_websites, got budget={budget}, "
                             f"num_websites={num_websites}.")
        _check_positive("BudgetAllocation", num_users=num_users, feature_dim=feature_dim, temperature=temperature)
        self.num_units, self.out_dim, self.feature_dim = num_websites, num_users, feature_dim
        self.budget, self.feature_noise = budget, feature_noise
        self.temperature, self.relax_steps = temperature, relax_steps
        self.exact = math.comb(num_websites, budget) <= max_enumerate
        if self.exact:
            self._subsets = torch.tensor(list(combinations(range(num_websites), budget)))
        gen = torch.Generator().manual_seed(seed)
        hidden = 4 * feature_dim
        self._w1 = torch.randn(num_users, hidden, generator=gen) * 2 / math.sqrt(num_users)
        self._b1 = torch.randn(hidden, generator=gen) * 0.5
        self._w2 = torch.randn(hidden, feature_dim, generator=gen) / math.sqrt(hidden)

    def generate(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        logits = torch.randn(n, self.num_units, self.out_dim, generator=generator) * 1.2 - 1.5
        p = torch.sigmoid(logits)
        feats = torch.tanh((p - 0.25) @ self._w1 * 4 + self._b1) @ self._w2
        feats = feats + self.feature_noise * torch.randn(feats.shape, generator=generator)
        return feats, p

    @staticmethod
    def coverage(z: Tensor, p: Tensor) -> Tensor:
        """``sum_u 1 - prod_w (1 - z_w p_wu)`` for ``z [n, W]``, ``p [n, W, U]``."""
        return (1 - torch.prod(1 - z.unsqueeze(-1) * p, dim=-2)).sum(-1)

    def objective(self, z: Tensor, y: Tensor, x: Tensor) -> Tensor:
        return self.coverage(z, y)

    def solve(self, y_hat: Tensor, x: Tensor) -> Tensor:
        p = y_hat.clamp(0, 1)
        n, w = p.shape[0], self.num_units
        if self.exact:
            subsets = self._subsets.to(p.device)  # [C, B]
            picked = p[:, subsets]  # [n, C, B, U]
            values = (1 - torch.prod(1 - picked, dim=-2)).sum(-1)  # [n, C]
            best = subsets[values.argmax(-1)]  # [n, B]
            return torch.zeros(n, w, dtype=p.dtype, device=p.device).scatter(-1, best, 1.0)
        z = torch.zeros(n, w, dtype=p.dtype, device=p.device)
        for _ in range(self.budget):  # greedy on the marginal gains
            base = self.coverage(z, p)
            gains = torch.stack([self.coverage(z.index_fill(1, torch.tensor([j], device=p.device), 1.0), p)
                                 for j in range(w)], -1) - base.unsqueeze(-1)
            z = z.scatter(-1, gains.masked_fill(z > 0, -math.inf).argmax(-1, keepdim=True), 1.0)
        return z

    def relaxed_solve(self, y_hat: Tensor, x: Tensor) -> Tensor:
        # clipped to [0, 1] in value, with the gradient of the identity (straight-through), so that a
        # prediction outside the range is still pulled back by the task loss
        p = y_hat + (y_hat.clamp(0, 1) - y_hat).detach()
        gain = grad(lambda z: self.coverage(z, p).sum())
        z = soft_topk(p.sum(-1), self.budget, self.temperature)
        for _ in range(self.relax_steps):  # damped fixed point of z = soft_topk(grad F(z), budget)
            z = 0.5 * z + 0.5 * soft_topk(gain(z), self.budget, self.temperature)
        return z

    def random_predictions(self, y: Tensor, generator: torch.Generator) -> Tensor:
        """Random click-through rates, uniform on [0, 1]: a uniformly random choice of websites."""
        return torch.rand(y.shape, generator=generator, dtype=y.dtype).to(y.device)


class PortfolioOptimization(DecisionProblem):
    """Long-only Markowitz portfolio: ``max_z y^T z - risk_aversion * z^T Sigma z`` on the simplex.

    Units are assets. An asset's features are its factor loadings ``b [num_factors]`` and signals
    ``s [num_signals]``; its return is a nonlinear function of the signals plus noise, and the
    covariance is ``Sigma = factor_vol^2 B B^T + idio_vol^2 I`` (known to the decision maker, computed
    from the features). Both solvers run FISTA (accelerated projected gradient ascent with the
    sort-based simplex projection): ``solver_steps`` without gradient for ``solve``, ``relax_steps``
    unrolled in the graph for ``relaxed_solve``.
    """

    out_dim = 1

    def __init__(self, num_assets: int = 50, num_factors: int = 4, num_signals: int = 4,
                 risk_aversion: float = 10.0, factor_vol: float = 0.2, idio_vol: float = 0.3,
                 noise: float = 0.1, solver_steps: int = 100, relax_steps: int = 30) -> None:
        for name, value in (("num_assets", num_assets), ("num_factors", num_factors), ("num_signals", num_signals),
                            ("solver_steps", solver_steps), ("relax_steps", relax_steps)):
            check_int("PortfolioOptimization", name, value, 1)
        for name, value in (("risk_aversion", risk_aversion), ("idio_vol", idio_vol)):
            check_real("PortfolioOptimization", name, value, 0.0, strict=True)
        for name, value in (("factor_vol", factor_vol), ("noise", noise)):
            check_real("PortfolioOptimization", name, value, 0.0)
        _check_positive("PortfolioOptimization", num_assets=num_assets, num_factors=num_factors,
                        num_signals=num_signals, risk_aversion=risk_aversion, idio_vol=idio_vol,
                        solver_steps=solver_steps, relax_steps=relax_steps)
        if num_assets < 2:
            raise ValueError(f"PortfolioOptimization needs num_assets >= 2, got {num_assets}.")
        self.num_units, self.num_factors, self.num_signals = num_assets, num_factors, num_signals
        self.feature_dim = num_factors + num_signals
        self.risk_aversion, self.factor_vol, self.idio_vol, self.noise = risk_aversion, factor_vol, idio_vol, noise
        self.solver_steps, self.relax_steps = solver_steps, relax_steps

    def generate(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        b = torch.randn(n, self.num_units, self.num_factors, generator=generator)
        s = torch.randn(n, self.num_units, self.num_signals, generator=generator)
        s1, s2 = s[..., 0], s[..., 1 % self.num_signals]
        mean = 0.5 * torch.relu(s1) ** 2 - 0.25 * s1 + 0.25 * torch.sin(2 * s2) - 0.3
        y = mean + self.noise * torch.randn(mean.shape, generator=generator)
        return torch.cat([b, s], -1), y.unsqueeze(-1)

    def covariance(self, x: Tensor) -> Tensor:
        """``Sigma [n, U, U]`` (the solvers use its factor structure instead, see ``risk_matvec``)."""
        b = x[..., : self.num_factors]
        eye = torch.eye(self.num_units, dtype=x.dtype, device=x.device)
        return self.factor_vol ** 2 * b @ b.transpose(-1, -2) + self.idio_vol ** 2 * eye

    def risk_matvec(self, x: Tensor, z: Tensor) -> Tensor:
        """``Sigma z`` in ``O(U K)``: ``factor_vol^2 B (B^T z) + idio_vol^2 z``."""
        b = x[..., : self.num_factors]
        exposure = torch.einsum("...uk,...u->...k", b, z)
        return self.factor_vol ** 2 * torch.einsum("...uk,...k->...u", b, exposure) + self.idio_vol ** 2 * z

    def objective(self, z: Tensor, y: Tensor, x: Tensor) -> Tensor:
        risk = (z * self.risk_matvec(x, z)).sum(-1)
        return (z * y[..., 0]).sum(-1) - self.risk_aversion * risk

    def _fista(self, mu: Tensor, x: Tensor, steps: int) -> Tensor:
        with torch.no_grad():  # step 1/L, L = 2 gamma lambda_max(Sigma) (exact, from the K x K Gram matrix)
            b = x[..., : self.num_factors]
            top = torch.linalg.eigvalsh(b.transpose(-1, -2) @ b)[..., -1:]
            lmax = self.factor_vol ** 2 * top + self.idio_vol ** 2
            step = 1.0 / (2 * self.risk_aversion * lmax)
        z = torch.full_like(mu, 1.0 / self.num_units)
        prev, t = z, 1.0
        for _ in range(steps):
            nxt = project_simplex(z + step * (mu - 2 * self.risk_aversion * self.risk_matvec(x, z)))
            t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
            z = nxt + ((t - 1) / t_next) * (nxt - prev)
            prev, t = nxt, t_next
        return prev

    def solve(self, y_hat: Tensor, x: Tensor) -> Tensor:
        return self._fista(y_hat[..., 0], x, self.solver_steps)

    def relaxed_solve(self, y_hat: Tensor, x: Tensor) -> Tensor:
        return self._fista(y_hat[..., 0], x, self.relax_steps)


# ====================================================================== the DataModule
class DecisionDataModule(RecordsInit, LightningDataModule):
    """Train / val / test instances of a :class:`DecisionProblem`.

    Batches are tuples ``(x [n, U, F], y [n, U, m], dq_optimal [n], dq_random [n])``; the reference
    qualities are computed once per split (``num_random`` random predictions per instance), so every
    evaluation of the normalised decision quality uses the same baseline.

    Args:
        problem: the decision problem (``class_path`` in YAML).
        num_train, num_val, num_test: instances per split (each split has its own seed).
        batch_size: training instances per step; ``None`` = the whole training set (full batch).
        steps_per_epoch: training batches per epoch (drawn by reshuffling the training set).
        eval_batch_size: instances per validation / test batch; ``None`` = the whole split.
        num_random: random predictions per instance for ``DQ_random``.
        seed: data seed.
    """

    def __init__(self, problem: DecisionProblem, num_train: int = 200, num_val: int = 200, num_test: int = 400,
                 batch_size: Optional[int] = None, steps_per_epoch: int = 25, eval_batch_size: Optional[int] = None,
                 num_random: int = 10, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(problem, DecisionProblem):
            raise TypeError(f"problem must be a tasklight.taskmet.problems.DecisionProblem, got "
                            f"{type(problem).__name__}; subclass DecisionProblem for a new problem.")
        for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test),
                            ("steps_per_epoch", steps_per_epoch), ("num_random", num_random)):
            check_int("DecisionDataModule", name, value, 1)
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None:
                check_int("DecisionDataModule", name, value, 1, "None = the whole split")
        _check_positive("DecisionDataModule", num_train=num_train, num_val=num_val, num_test=num_test,
                        steps_per_epoch=steps_per_epoch, num_random=num_random)
        for key, v in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if v is not None and v < 1:
                raise ValueError(f"DecisionDataModule: {key} must be >= 1 or None (whole split), got {v}.")
        self.problem = problem
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.steps_per_epoch, self.num_random, self.seed = steps_per_epoch, num_random, seed
        self.splits: dict[str, TensorDataset] = {}

    def make_split(self, split: str) -> TensorDataset:
        offset = {"train": 0, "val": 1, "test": 2}[split]
        gen = torch.Generator().manual_seed(self.seed * 1000 + offset)
        x, y = self.problem.generate(self.sizes[split], gen)
        best, rand = self.problem.reference_quality(y, x, self.num_random, gen)
        return TensorDataset(x, y, best, rand)

    def setup(self, stage: Optional[str] = None) -> None:
        for split in ("train", "val", "test"):
            if split not in self.splits:
                self.splits[split] = self.make_split(split)

    def train_dataloader(self) -> DataLoader:
        ds = self.splits["train"]
        bs = self.batch_size or len(ds)
        sampler = RandomSampler(ds, num_samples=bs * self.steps_per_epoch,
                                generator=torch.Generator().manual_seed(self.seed))
        return DataLoader(ds, batch_size=bs, sampler=sampler, drop_last=True)

    def _eval_loader(self, split: str) -> DataLoader:
        ds = self.splits[split]
        return DataLoader(ds, batch_size=self.eval_batch_size or len(ds), shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The predict split is the test instances (``tasklight predict``)."""
        return self._eval_loader("test")
