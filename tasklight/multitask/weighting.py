"""Task weighting for multi-task learning: small pluggable classes with one interface.

Every method turns the per-task losses of a training step (and, where it needs them, the per-task
gradients on the shared parameters or the shared representation) into one weight per task:

==========================  ===========  ==============  =============================================
class                       needs grads  weights sum to  reference
==========================  ===========  ==============  =============================================
``StaticWeighting``         no           user's choice   linear scalarisation (default: all ones)
``EqualWeighting``          no           T               all ones
``UncertaintyWeighting``    no           --              Kendall, Gal & Cipolla (2018)
``DWA``                     no           T               Liu, Johns & Davison (2019), dynamic weight avg.
``DROWeighting``            no           1               worst-case task weights by exponentiated
                                                         gradient (Sagawa et al. 2020, group DRO)
``GradNorm``                yes          T               Chen et al. (2018)
``MGDA``                    yes          1               Sener & Koltun (2018), MGDA-UB
``PCGrad``                  yes          ~T              Yu et al. (2020)
==========================  ===========  ==============  =============================================

The interface (see :class:`Weighting`):

* ``setup(num_tasks)`` allocates per-task state (called by the MultiTaskModule);
* ``compute_weights(stats) -> Tensor [T]`` is called once per training step with a
  :class:`TaskStats` of *global* quantities (already synchronised over DDP ranks by the module, so
  every rank computes the same weights);
* ``loss(losses, weights) -> scalar`` combines the live per-task losses (default ``sum w_t L_t``;
  uncertainty weighting adds its ``log sigma`` terms).

Gradient-based methods only ever use the Gram matrix ``G = g g^T`` of the per-task gradients (MGDA's
min-norm problem, PCGrad's projections and GradNorm's norms are functions of inner products), and
express their update as task weights. PCGrad's projected sum is a linear combination of the original
task gradients, so it is one weighted loss too. Methods with ``direction_only = True`` (MGDA, PCGrad)
change only the direction of the shared parameters: with hard sharing the task heads still receive
their own task's gradient, as in the papers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tasklight.config import RecordsInit

from tasklight.core.seeding import seeded_generator
from tasklight.core.checks import check_int, check_real

GradSource = Literal["representation", "parameters"]
GRAD_SOURCES = ("representation", "parameters")


@dataclass
class TaskStats:
    """What a weighting method sees at one training step (global over DDP ranks).

    Attributes:
        losses: ``[T]`` the mean loss of each task over the union of all ranks' examples this step
            (0 for tasks not sampled this step), detached.
        active: ``[T]`` bool, the tasks that are part of this step.
        grads: ``[T, P]`` per-task gradients on the shared quantity (the shared representation pooled
            over examples, or the shared parameters), or None when the method does not need them.
        step: the global training step (the same on every rank).
        epoch: the current epoch.
    """

    losses: Tensor
    active: Tensor
    grads: Optional[Tensor] = None
    step: int = 0
    epoch: int = 0

    @property
    def num_tasks(self) -> int:
        return int(self.losses.shape[0])


class Weighting(RecordsInit, nn.Module):
    """Base class of the loss-weighting methods.

    Class attributes:
        needs_grads: the method needs per-task gradients (``stats.grads``).
        needs_bounded_losses: the method uses ``L_t - lower_bound_t >= 0`` (loss ratios, logs).
        direction_only: the weights only steer the shared parameters; task-specific heads get the
            plain gradient of their own loss (MGDA, PCGrad).

    Args:
        grad_source: where per-task gradients are taken (only for methods that need them):
            ``"representation"`` -- the gradient of each task's loss with respect to the output of
            the shared trunk, summed over the task's examples (the gradient on a bias shared by all
            examples). It costs one backward pass through the heads for all tasks together (the
            MGDA-UB trick of Sener & Koltun, 2018).
            ``"parameters"`` -- the gradient on all shared parameters, one backward pass per task.
    """

    needs_grads: bool = False
    direction_only: bool = False
    needs_bounded_losses: bool = False
    gives_direction: bool = False  # the update of the shared parameters comes from shared_direction

    def __init__(self, grad_source: GradSource = "representation") -> None:
        super().__init__()
        if grad_source not in GRAD_SOURCES:
            raise ValueError(f"{type(self).__name__}: grad_source must be one of {GRAD_SOURCES}, got {grad_source!r}")
        self.grad_source = grad_source
        self.num_tasks = 0
        self.lower_bounds = torch.zeros(0, dtype=torch.float64)

    def setup(self, num_tasks: int, lower_bounds: Optional[Sequence[float]] = None) -> None:
        """Allocate per-task state. Called once the number of tasks is known.

        ``lower_bounds`` are known lower bounds of the task losses (default 0: cross-entropy, MSE).
        Methods built on loss ratios or ``log`` terms (uncertainty weighting, DWA, GradNorm) use
        ``L_t - lower_bound_t``, which must not be negative.
        """
        if num_tasks < 1:
            raise ValueError(f"{type(self).__name__}: need at least one task, got {num_tasks}")
        self.num_tasks = int(num_tasks)
        bounds = [0.0] * num_tasks if lower_bounds is None else [float(b) for b in lower_bounds]
        if len(bounds) != num_tasks:
            raise ValueError(f"{type(self).__name__}: got {len(bounds)} loss lower bounds for {num_tasks} tasks")
        self.lower_bounds = torch.tensor(bounds, dtype=torch.float64)

    def _check(self, stats: TaskStats) -> None:
        if self.num_tasks == 0:
            self.setup(stats.num_tasks)
        if stats.num_tasks != self.num_tasks:
            raise ValueError(f"{type(self).__name__} was set up for {self.num_tasks} tasks but got losses for "
                             f"{stats.num_tasks}")
        if self.needs_grads and stats.grads is None:
            raise ValueError(f"{type(self).__name__} needs per-task gradients (stats.grads) but none were given")
        if self.needs_bounded_losses:
            below = stats.active.cpu() & (stats.losses.detach().double().cpu() < self.lower_bounds - 1e-6)
            if bool(below.any()):
                t = int(below.nonzero()[0])
                raise ValueError(
                    f"{type(self).__name__} needs every task loss to be at least its lower bound (0 unless the "
                    f"task says otherwise), but task {t} has loss {float(stats.losses[t]):.4g} < "
                    f"{float(self.lower_bounds[t]):.4g}. Give the task's known lower bound "
                    f"(TaskSpec(lower_bound=...)) or use a method without loss ratios (EqualWeighting, "
                    f"DROWeighting, MGDA, PCGrad).")

    def shifted_losses(self, stats: TaskStats) -> Tensor:
        """``L_t - lower_bound_t`` (float64, on the CPU)."""
        return stats.losses.detach().double().cpu() - self.lower_bounds

    def compute_weights(self, stats: TaskStats) -> Tensor:  # pragma: no cover - abstract
        """The weight of each task for this step, ``[T]`` (0 for inactive tasks), detached."""
        raise NotImplementedError

    def loss(self, losses: Tensor, weights: Tensor) -> Tensor:
        """The scalar objective from the live per-task losses ``[T]`` and this step's weights."""
        return (weights.to(losses) * losses).sum()

    def shared_direction(self, stats: TaskStats, weights: Tensor) -> Optional[Tensor]:
        """For methods whose update of the shared parameters is not a weighted sum of this step's task
        gradients (GradDrop's sign masks, MoCo's and DB-MTL's tracked gradients, a torchjd
        aggregator): the gradient ``[P]`` to give the shared parameters, in the order of
        ``MultiTaskModule.shared_parameters()``, computed from ``stats.grads`` (``grad_source =
        "parameters"``). Called when ``gives_direction`` is True; the module then sets the shared
        parameters' gradient to it and trains the heads on ``loss(losses, task_weights(weights))``.
        Default None: the weights say it all."""
        return None

    def task_weights(self, weights: Tensor) -> Tensor:
        """For ``direction_only`` methods: the weight of each task's loss on its own task-specific
        parameters (the heads) given this step's ``weights`` on the shared ones; the module then
        minimises ``loss(losses, task_weights(weights))`` and corrects the shared parameters'
        gradient to ``sum_t weights_t grad L_t``. Default: all ones (the heads get the plain gradient
        of their own loss)."""
        return torch.ones_like(weights)


# ------------------------------------------------------------------------------- loss based
class StaticWeighting(Weighting):
    """Fixed weights ``w``: the objective is ``sum_t w_t L_t``. ``weights=None`` gives all ones."""

    def __init__(self, weights: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        self.fixed = None if weights is None else [float(w) for w in weights]
        if self.fixed is not None and any(not math.isfinite(w) or w < 0 for w in self.fixed):
            raise ValueError(f"StaticWeighting weights must be finite and >= 0, got {self.fixed}")
        if self.fixed is not None and self.fixed and not any(w > 0 for w in self.fixed):
            raise ValueError(f"StaticWeighting weights are all 0 ({self.fixed}): every task loss would be ignored and "
                             f"nothing would train; give at least one weight > 0 (None for equal weights)")
        self.register_buffer("w", torch.ones(0))

    def setup(self, num_tasks: int, lower_bounds: Optional[Sequence[float]] = None) -> None:
        super().setup(num_tasks, lower_bounds)
        if self.fixed is not None and len(self.fixed) != num_tasks:
            raise ValueError(f"StaticWeighting got {len(self.fixed)} weights but there are {num_tasks} tasks; give "
                             f"one weight per task, or none for equal weights.")
        self.w = torch.tensor(self.fixed if self.fixed is not None else [1.0] * num_tasks)

    def compute_weights(self, stats: TaskStats) -> Tensor:
        self._check(stats)
        return self.w.to(stats.losses) * stats.active.to(stats.losses)


class EqualWeighting(StaticWeighting):
    """All weights 1: the objective is the sum of the task losses."""

    def __init__(self) -> None:
        super().__init__(None)


class UncertaintyWeighting(Weighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, 2018).

    Learns ``s_t = log sigma_t^2`` per task; the objective is
    ``sum_t 0.5 * exp(-s_t) * (L_t - b_t) + 0.5 * s_t``, minimised at ``s_t = log (L_t - b_t)``, with
    ``b_t`` the task loss's lower bound (0 for cross-entropy and MSE; the objective is unbounded
    below for losses under it). The reported weights are ``0.5 * exp(-s_t)``. The ``s_t`` are
    parameters of the module, trained by its optimiser (and averaged across DDP ranks like every
    other gradient).
    """

    needs_bounded_losses = True

    def __init__(self, init_log_var: float = 0.0) -> None:
        super().__init__()
        self.init_log_var = check_real("UncertaintyWeighting", "init_log_var", init_log_var,
                                       what="the initial log variance s_t; 0 gives weights 0.5")
        self.log_vars = nn.Parameter(torch.zeros(0))

    def setup(self, num_tasks: int, lower_bounds: Optional[Sequence[float]] = None) -> None:
        super().setup(num_tasks, lower_bounds)
        if self.log_vars.numel() != num_tasks:
            self.log_vars = nn.Parameter(torch.full((num_tasks,), self.init_log_var))

    def compute_weights(self, stats: TaskStats) -> Tensor:
        self._check(stats)
        return (0.5 * torch.exp(-self.log_vars.detach())).to(stats.losses) * stats.active.to(stats.losses)

    def loss(self, losses: Tensor, weights: Tensor) -> Tensor:
        active = (weights > 0).to(losses)
        s = self.log_vars.to(losses)
        b = self.lower_bounds.to(losses) if self.lower_bounds.numel() else torch.zeros_like(losses)
        return (active * (0.5 * torch.exp(-s) * (losses - b) + 0.5 * s)).sum()


class DWA(Weighting):
    """Dynamic Weight Average (Liu, Johns & Davison, 2019).

    ``w_t = T * softmax_t(r_t / temperature)`` with ``r_t = L_t(e-1) / L_t(e-2)``, the ratio of the
    task's average training loss over the two previous epochs (measured from the loss's lower bound);
    all ones during the first two epochs.
    """

    needs_bounded_losses = True

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        check_real("DWA", "temperature", temperature, 0.0, strict=True)
        self.temperature = float(temperature)
        for name in ("prev", "acc_sum", "acc_count"):
            self.register_buffer(name, torch.zeros(0, dtype=torch.float64))
        self.register_buffer("state", torch.tensor([-1, 0], dtype=torch.long))  # current epoch, finished epochs

    def setup(self, num_tasks: int, lower_bounds: Optional[Sequence[float]] = None) -> None:
        super().setup(num_tasks, lower_bounds)
        self.prev = torch.full((2, num_tasks), float("nan"), dtype=torch.float64)
        self.acc_sum = torch.zeros(num_tasks, dtype=torch.float64)
        self.acc_count = torch.zeros(num_tasks, dtype=torch.float64)

    def _roll(self, epoch: int) -> None:
        if int(self.state[0]) >= 0:
            mean = torch.where(self.acc_count > 0, self.acc_sum / self.acc_count.clamp_min(1), self.prev[1])
            self.prev = torch.stack([self.prev[1], mean])
            self.state[1] += 1
        self.acc_sum.zero_()
        self.acc_count.zero_()
        self.state[0] = epoch

    def compute_weights(self, stats: TaskStats) -> Tensor:
        self._check(stats)
        if stats.epoch != int(self.state[0]):
            self._roll(stats.epoch)
        active = stats.active.to(self.acc_sum.device)
        self.acc_sum += torch.where(active, self.shifted_losses(stats).to(self.acc_sum.device), 0.0)
        self.acc_count += active.double()
        if int(self.state[1]) < 2:
            w = torch.ones(self.num_tasks, dtype=torch.float64)
        else:
            ratio = self.prev[1] / self.prev[0]
            ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
            w = self.num_tasks * torch.softmax(ratio / self.temperature, dim=0)
        return w.to(stats.losses) * stats.active.to(stats.losses)


class DROWeighting(Weighting):
    """Worst-case (distributionally robust) task weights by exponentiated gradient ascent.

    Keeps weights ``q`` on the simplex and, at every step, ``q_t <- q_t * exp(step_size * L_t)``
    followed by normalisation (the online group-DRO update of Sagawa et al., 2020); the objective
    ``sum_t q_t L_t`` then tracks the worst task. Only the tasks of the current step are updated.
    """

    def __init__(self, step_size: float = 0.01) -> None:
        super().__init__()
        check_real("DROWeighting", "step_size", step_size, 0.0, strict=True, what="the exponentiated-gradient step")
        self.step_size = float(step_size)
        self.register_buffer("log_q", torch.zeros(0, dtype=torch.float64))

    def setup(self, num_tasks: int, lower_bounds: Optional[Sequence[float]] = None) -> None:
        super().setup(num_tasks, lower_bounds)
        self.log_q = torch.full((num_tasks,), -math.log(num_tasks), dtype=torch.float64)

    def compute_weights(self, stats: TaskStats) -> Tensor:
        self._check(stats)
        active = stats.active.to(self.log_q.device)
        losses = stats.losses.detach().double().to(self.log_q.device)
        log_q = torch.where(active, self.log_q + self.step_size * losses, self.log_q)
        self.log_q = log_q - torch.logsumexp(log_q, 0)
        q = torch.exp(self.log_q)
        q = torch.where(active, q, 0.0)
        return (q / q.sum()).to(stats.losses)


# ------------------------------------------------------------------------------- gradient based
def _scatter(values: Tensor, idx: Tensor, stats: TaskStats) -> Tensor:
    """Weights of the active tasks ``idx`` placed into a ``[T]`` vector (0 elsewhere)."""
    w = torch.zeros(stats.num_tasks, dtype=torch.float64, device=values.device)
    w[idx.to(values.device)] = values
    return w.to(stats.losses)


def _simplex_face_minimizer(G: np.ndarray, free: list[int]) -> np.ndarray:
    """argmin ``a^T G a`` over ``sum a = 1`` with ``a`` zero outside ``free`` (its KKT system; the
    least-squares solution where ``G`` is singular on that face)."""
    k = len(free)
    K = np.zeros((k + 1, k + 1))
    K[:k, :k] = G[np.ix_(free, free)]
    K[:k, k] = K[k, :k] = 1.0
    rhs = np.zeros(k + 1)
    rhs[k] = 1.0
    sol = np.linalg.lstsq(K, rhs, rcond=None)[0]
    a = np.zeros(G.shape[0])
    a[free] = sol[:k]
    return a


def min_norm_weights(gram: Tensor, max_iter: int = 250, tol: float = 1e-12) -> Tensor:
    """The convex combination ``alpha`` (``alpha >= 0``, ``sum alpha = 1``) that minimises
    ``|| sum_t alpha_t g_t ||^2 = alpha^T G alpha``, given only the Gram matrix ``G``.

    Solved exactly (to rounding) by a primal active-set method: the minimiser on the current face of
    the simplex comes from its KKT system; a step that would leave the simplex stops at its boundary
    and drops the blocking task; at a face's minimiser, the task whose multiplier
    ``(G alpha)_t - alpha^T G alpha`` is most negative (beyond ``tol`` relative to ``max |G|``) joins.
    It stops when every multiplier is ``>= 0``: the KKT conditions of the problem. Sener & Koltun's
    Frank-Wolfe solver (and LibMTL's) stops ``1e-5`` to ``1e-4`` (relative) from this point.
    ``max_iter`` bounds the face changes (at most a few per task in practice).
    """
    G = gram.detach().double().cpu().numpy()  # small T x T problem: numpy is much faster per operation
    T = G.shape[0]
    if T == 1:
        return torch.ones(1, dtype=torch.float64)
    G = 0.5 * (G + G.T)
    scale = max(float(np.abs(G).max()), 1e-300)
    k = int(np.argmin(np.diag(G)))  # the best vertex
    alpha = np.zeros(T)
    alpha[k] = 1.0
    free = [k]
    for _ in range(max_iter):
        target = _simplex_face_minimizer(G, free)
        if target[free].min() >= 0:
            alpha = target
            grad = G @ alpha
            mult = grad - alpha @ grad
            out = [t for t in range(T) if t not in free]
            if not out:
                break
            j = min(out, key=lambda t: mult[t])
            if mult[j] >= -tol * scale:
                break
            free.append(j)
            continue
        # move towards the face's minimiser until a weight reaches 0; that task leaves the face
        step = target - alpha
        shrinking = [t for t in free if step[t] < 0]
        t_max, block = min(((-alpha[t] / step[t], t) for t in shrinking), key=lambda x: x[0])
        alpha = alpha + min(max(t_max, 0.0), 1.0) * step
        alpha[block] = 0.0
        free.remove(block)
    alpha = np.clip(alpha, 0.0, None)
    return torch.from_numpy(alpha / alpha.sum())


def gradient_normalizers(grads: Tensor, losses: Tensor, kind: str) -> Tensor:
    """Sener & Koltun's gradient normalisation: ``none`` (1), ``l2`` (||g||), ``loss`` (L),
    ``loss+`` (L * ||g||)."""
    norms = grads.double().norm(dim=1)
    if kind == "none":
        return torch.ones_like(norms)
    if kind == "l2":
        return norms
    if kind == "loss":
        return losses.double().abs()
    if kind == "loss+":
        return losses.double().abs() * norms
    raise ValueError(f"MGDA normalization must be one of ('none', 'l2', 'loss', 'loss+'), got {kind!r}")


class MGDA(Weighting):
    """MGDA-UB (Sener & Koltun, 2018): the min-norm convex combination of the task gradients.

    The weights ``alpha`` (summing to 1) solve ``min || sum_t alpha_t g_t / n_t ||`` over the
    simplex, with ``g_t`` the per-task gradients on the shared representation (default, the
    "upper bound" variant) or on the shared parameters, and ``n_t`` the ``normalization``
    (``none``, ``l2``, ``loss``, ``loss+``). The objective is ``sum_t alpha_t L_t``; task-specific
    heads get the plain gradients of their own losses.
    """

    needs_grads = True
    direction_only = True

    def __init__(self, normalization: Literal["none", "l2", "loss", "loss+"] = "none",
                 grad_source: GradSource = "representation", max_iter: int = 250) -> None:
        super().__init__(grad_source)
        gradient_normalizers(torch.zeros(1, 1), torch.zeros(1), normalization)  # validates the name
        self.normalization = normalization
        self.max_iter = check_int("MGDA", "max_iter", max_iter, 1, "active-set iterations")

    def compute_weights(self, stats: TaskStats) -> Tensor:
        self._check(stats)
        idx = stats.active.nonzero().flatten()
        g = stats.grads[idx].double()
        n = gradient_normalizers(g, stats.losses[idx], self.normalization).clamp_min(1e-12)
        g = g / n[:, None]
        return _scatter(min_norm_weights(g @ g.T, self.max_iter), idx, stats)


def pcgrad_coefficients(gram: Tensor, orders: Sequence[Sequence[int]]) -> Tensor:
    """PCGrad's projected gradient sum as coefficients on the original task gradients.

    For each task ``i``, ``g_i^PC`` starts at ``g_i`` and, for ``j`` in ``orders[i]``, if
    ``g_i^PC . g_j < 0`` it is replaced by ``g_i^PC - (g_i^PC . g_j / ||g_j||^2) g_j`` (Yu et al.,
    2020). Every ``g_i^PC`` is a combination ``sum_k C_ik g_k`` whose inner products follow from the
    Gram matrix alone; the update ``sum_i g_i^PC = sum_k (sum_i C_ik) g_k`` is returned as
    ``sum_i C_i``.
    """
    G = gram.detach().double()
    T = G.shape[0]
    C = torch.eye(T, dtype=torch.float64, device=G.device)
    for i in range(T):
        for j in orders[i]:
            gjj = G[j, j]
            if gjj <= 0:
                continue
            dot = C[i] @ G[:, j]
            if dot < 0:
                C[i, j] -= dot / gjj
    return C.sum(0)


class PCGrad(Weighting):
    """PCGrad (Yu et al., 2020): project each task gradient off the others it conflicts with.

    For each task, the other tasks (itself included, as in the reference code) are visited in a
    random order drawn from a generator seeded by ``(seed, step)``, so every DDP rank draws the same
    order. The update is the sum of the projected gradients.
    """

    needs_grads = True
    direction_only = True

    def __init__(self, grad_source: GradSource = "representation", seed: int = 0) -> None:
        super().__init__(grad_source)
        self.seed = int(seed)

    def orders(self, step: int, tasks: Sequence[int]) -> list[list[int]]:
        """The visiting order of ``tasks`` for each task at ``step`` (positions into ``tasks``)."""
        gen = seeded_generator(self.seed, int(step))
        return [torch.randperm(len(tasks), generator=gen).tolist() for _ in tasks]

    def compute_weights(self, stats: TaskStats) -> Tensor:
        self._check(stats)
        idx = stats.active.nonzero().flatten()
        g = stats.grads[idx].double()
        return _scatter(pcgrad_coefficients(g @ g.T, self.orders(stats.step, idx.tolist())), idx, stats)


class GradNorm(Weighting):
    """GradNorm (Chen et al., 2018): balance the tasks' gradient norms by learning the weights.

    With ``G_t = w_t ||g_t||`` (``g_t`` the task gradient on the shared representation or
    parameters), ``G_bar`` its mean, ``r_t = (L_t / L_t(0)) / mean_s (L_s / L_s(0))`` the relative
    inverse training rate and the constant target ``G_bar * r_t^alpha``, the weights take an Adam
    step of size ``lr`` on ``sum_t |G_t - target_t|`` and are renormalised to sum to ``T``.
    ``L_t(0)`` is the task's first observed loss; losses are measured from their lower bound. The
    model uses the weights of the current step.
    """

    needs_grads = True
    needs_bounded_losses = True

    def __init__(self, alpha: float = 1.5, lr: float = 0.025, grad_source: GradSource = "representation") -> None:
        super().__init__(grad_source)
        check_real("GradNorm", "alpha", alpha, 0.0, what="the restoring force")
        check_real("GradNorm", "lr", lr, 0.0, strict=True, what="the weights' learning rate")
        self.alpha, self.lr = float(alpha), float(lr)
        for name in ("w", "initial", "m", "v"):
            self.register_buffer(name, torch.zeros(0, dtype=torch.float64))
        self.register_buffer("t", torch.zeros((), dtype=torch.long))

    def setup(self, num_tasks: int, lower_bounds: Optional[Sequence[float]] = None) -> None:
        super().setup(num_tasks, lower_bounds)
        self.w = torch.ones(num_tasks, dtype=torch.float64)
        self.initial = torch.full((num_tasks,), float("nan"), dtype=torch.float64)
        self.m = torch.zeros(num_tasks, dtype=torch.float64)
        self.v = torch.zeros(num_tasks, dtype=torch.float64)

    def targets(self, norms: Tensor, losses: Tensor, initial: Tensor, weights: Tensor) -> Tensor:
        """``G_bar * r_t^alpha`` for the given gradient norms, losses and initial losses (one entry per
        task of the step)."""
        G = weights * norms
        ratio = losses / initial
        r = ratio / ratio.mean()
        return G.mean() * r.pow(self.alpha)

    @staticmethod
    def weight_gradient(norms: Tensor, target: Tensor, weights: Tensor) -> Tensor:
        """``d/dw_t sum_s |w_s ||g_s|| - target_s|`` with the targets held constant."""
        return torch.sign(weights * norms - target) * norms

    def compute_weights(self, stats: TaskStats) -> Tensor:
        self._check(stats)
        dev = self.w.device
        active = stats.active.to(dev)
        idx = active.nonzero().flatten()
        losses = self.shifted_losses(stats).to(dev)
        self.initial = torch.where(active & torch.isnan(self.initial), losses, self.initial)
        current = (self.w * active.double()).clone()  # the weights the model uses this step
        norms = stats.grads.detach().double().to(dev)[idx].norm(dim=1)
        w = self.w[idx]
        target = self.targets(norms, losses[idx], self.initial[idx].clamp_min(1e-12), w)
        grad = self.weight_gradient(norms, target, w)
        self.t += 1
        b1, b2, eps, t = 0.9, 0.999, 1e-8, int(self.t)
        self.m[idx] = b1 * self.m[idx] + (1 - b1) * grad
        self.v[idx] = b2 * self.v[idx] + (1 - b2) * grad * grad
        step = self.lr * (self.m[idx] / (1 - b1 ** t)) / ((self.v[idx] / (1 - b2 ** t)).sqrt() + eps)
        new = self.w.clone()
        new[idx] = (w - step).clamp_min(1e-6)
        self.w = new * (self.num_tasks / new.sum())
        return current.to(stats.losses)


# ------------------------------------------------------------------------------- newer methods
class RLW(Weighting):
    """Random loss weighting (Lin et al., 2022): ``w = softmax(z)`` with a fresh ``z ~ N(0, I)`` every
    step, over the tasks of the step; the weights sum to 1. ``z`` is drawn from a generator seeded by
    ``(seed, step)``, so every DDP rank draws the same weights.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)

    def logits(self, step: int, num: int) -> Tensor:
        """The normal draws ``z`` of ``step`` for ``num`` active tasks (float64)."""
        return torch.randn(num, generator=seeded_generator(self.seed, int(step)), dtype=torch.float64)

    def compute_weights(self, stats: TaskStats) -> Tensor:
        self._check(stats)
        idx = stats.active.nonzero().flatten()
        return _scatter(torch.softmax(self.logits(stats.step, len(idx)), 0), idx, stats)


class FAMO(Weighting):
    """FAMO, fast adaptive multitask optimisation (Liu et al., 2023).

    Keeps logits ``xi`` with ``z = softmax(xi)`` and minimises ``sum_t z_t log(L_t - b_t + eps)``
    rescaled by ``c = sum_t z_t / (L_t - b_t + eps)``: the weight of task ``t`` is
    ``z_t / ((L_t - b_t + eps) c)`` (they sum to 1), so the update decreases every log loss at the
    rate set by ``z``. ``xi`` then follows the observed decrease of the log losses: with
    ``delta_t = log(L_t(k-1) - b_t + eps) - log(L_t(k) - b_t + eps)`` it takes an Adam step (``lr``,
    L2 weight decay ``gamma``) along ``J_softmax(xi)^T delta``. ``L(k)`` is the loss of the next
    training step (the paper recomputes it on the same batch after the update, at the cost of one
    more forward pass). Losses are measured from their lower bound ``b_t``.
    """

    needs_bounded_losses = True

    def __init__(self, lr: float = 0.025, gamma: float = 1e-3, eps: float = 1e-8) -> None:
        super().__init__()
        check_real("FAMO", "lr", lr, 0.0, strict=True, what="the logits' learning rate")
        check_real("FAMO", "gamma", gamma, 0.0, what="the logits' weight decay")
        check_real("FAMO", "eps", eps, 0.0, strict=True)
        self.lr, self.gamma, self.eps = float(lr), float(gamma), float(eps)
        for name in ("xi", "m", "v", "prev"):
            self.register_buffer(name, torch.zeros(0, dtype=torch.float64))
        self.register_buffer("t", torch.zeros((), dtype=torch.long))

    def setup(self, num_tasks: int, lower_bounds: Optional[Sequence[float]] = None) -> None:
        super().setup(num_tasks, lower_bounds)
        self.xi = torch.zeros(num_tasks, dtype=torch.float64)
        self.m = torch.zeros(num_tasks, dtype=torch.float64)
        self.v = torch.zeros(num_tasks, dtype=torch.float64)
        self.prev = torch.full((num_tasks,), float("nan"), dtype=torch.float64)

    def _update_logits(self, log_d: Tensor, active: Tensor) -> None:
        seen = active & ~torch.isnan(self.prev)
        if not bool(seen.any()):
            return
        delta = torch.where(seen, self.prev - log_d, 0.0)
        z = torch.softmax(self.xi, 0)
        grad = z * (delta - (z * delta).sum()) + self.gamma * self.xi  # J_softmax^T delta + L2 decay
        self.t += 1
        b1, b2, eps, t = 0.9, 0.999, 1e-8, int(self.t)
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad * grad
        self.xi = self.xi - self.lr * (self.m / (1 - b1 ** t)) / ((self.v / (1 - b2 ** t)).sqrt() + eps)

    def compute_weights(self, stats: TaskStats) -> Tensor:
        self._check(stats)
        dev = self.xi.device
        active = stats.active.to(dev)
        d = self.shifted_losses(stats).to(dev) + self.eps
        log_d = torch.where(active, d.clamp_min(self.eps).log(), float("nan"))
        self._update_logits(log_d, active)
        self.prev = torch.where(active, log_d, self.prev)
        z = torch.softmax(self.xi, 0)
        c = torch.where(active, z / d, 0.0)
        return (c / c.sum()).to(stats.losses)


def _active_gram(stats: TaskStats) -> tuple[Tensor, Tensor, Tensor]:
    """The active task indices, their gradients (float64) and Gram matrix."""
    idx = stats.active.nonzero().flatten()
    g = stats.grads[idx].double()
    return idx, g, g @ g.T


class CAGrad(Weighting):
    """Conflict-averse gradient descent (Liu et al., 2021).

    With ``g_0`` the average task gradient and ``g_w = sum_t w_t g_t``, the weights
    ``w`` on the simplex minimise ``g_w . g_0 + c ||g_0|| ||g_w||`` and the update is
    ``d = g_0 + (c ||g_0|| / ||g_w||) g_w`` (``c`` = ``c``; 0 gives the average gradient), divided by
    ``1`` (``rescale=0``), ``1 + c^2`` (``rescale=1``, the paper's choice) or ``1 + c`` (``rescale=2``).
    The returned weights are the coefficients of ``d`` on the task gradients,
    ``(1 / T + lambda w_t) / rescale``. The small problem is solved from the Gram matrix by SLSQP
    (scipy). Only the shared parameters are steered; heads get their own loss's gradient.
    """

    needs_grads = True
    direction_only = True

    def __init__(self, c: float = 0.4, rescale: Literal[0, 1, 2] = 1,
                 grad_source: GradSource = "representation") -> None:
        super().__init__(grad_source)
        if not (c >= 0 and math.isfinite(c)):
            raise ValueError(f"CAGrad c must be a finite number >= 0, got {c}")
        if rescale not in (0, 1, 2):
            raise ValueError(f"CAGrad rescale must be 0, 1 or 2, got {rescale!r}")
        self.c, self.rescale = float(c), int(rescale)

    def inner_weights(self, gram: Tensor) -> np.ndarray:
        """``argmin_{w in simplex} w^T G 1/T + c ||g_0|| sqrt(w^T G w)``."""
        from scipy.optimize import minimize

        G = gram.detach().double().cpu().numpy()
        T = G.shape[0]
        b = np.full(T, 1.0 / T)
        radius = self.c * math.sqrt(max(float(b @ G @ b), 0.0) + 1e-8)
        Gb = G @ b

        def objective(w):
            quad = float(w @ G @ w) + 1e-8
            return float(w @ Gb) + radius * math.sqrt(quad), Gb + radius * (G @ w) / math.sqrt(quad)

        res = minimize(objective, b.copy(), jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * T,
                       constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(T)}])
        w = np.clip(res.x, 0.0, None)
        return w / w.sum()

    def compute_weights(self, stats: TaskStats) -> Tensor:
        self._check(stats)
        idx, g, G = _active_gram(stats)
        T = len(idx)
        w = torch.from_numpy(self.inner_weights(G))
        b = torch.full((T,), 1.0 / T, dtype=torch.float64)
        radius = self.c * math.sqrt(max(float(b @ G @ b), 0.0) + 1e-8)
        gw_norm = math.sqrt(max(float(w @ G @ w), 0.0))
        coef = b + radius / (gw_norm + 1e-8) * w
        coef = coef / (1.0, 1.0 + self.c ** 2, 1.0 + self.c)[self.rescale]
        return _scatter(coef, idx, stats)


def fair_weights(gram: Tensor, alpha: float, max_iter: int = 100, tol: float = 1e-10) -> Tensor:
    """The ``w > 0`` with ``G w = w^(-1/alpha)`` (the alpha-fair step of FairGrad, Ban & Ji 2024; Nash-MTL at ``alpha = 1``).

    It is the unique minimiser of the strictly convex ``0.5 w^T G w - sum_t h(w_t)``, ``h' = w^(-1/alpha)``
    (``h = log`` for ``alpha = 1``), found by damped Newton steps that keep ``w > 0``, to a relative
    residual ``tol``. A ridge ``1e-12 tr(G) / T`` keeps the problem bounded for opposed gradients.
    """
    G = gram.detach().double().cpu().numpy()
    T = G.shape[0]
    G = G + 1e-12 * max(np.trace(G) / T, 1e-30) * np.eye(T)
    p = 1.0 / alpha
    w = np.maximum(np.diag(G), 1e-30) ** (-alpha / (alpha + 1.0))  # the solution for orthogonal gradients

    def h(x):
        return np.log(x).sum() if alpha == 1.0 else (x ** (1.0 - p)).sum() / (1.0 - p)

    def f(x):
        return 0.5 * x @ G @ x - h(x)

    for _ in range(max_iter):
        grad = G @ w - w ** (-p)
        if float(np.abs(grad * w ** p).max()) <= tol:  # relative residual of (G w)_t w_t^(1/alpha) = 1
            break
        step = np.linalg.solve(G + np.diag(p * w ** (-p - 1.0)), grad)
        decrement = float(grad @ step)
        s = 1.0
        while np.any(w - s * step <= 0):
            s *= 0.5
        if decrement > 1e-12:  # damped phase; closer in, full Newton steps converge quadratically
            f0 = f(w)
            while f(w - s * step) > f0 - 0.25 * s * decrement and s > 1e-12:
                s *= 0.5
        w = w - s * step
    return torch.from_numpy(w)


def nash_bargaining_weights(gram: Tensor, max_iter: int = 100, tol: float = 1e-10) -> Tensor:
    """The Nash bargaining solution of Navon et al. (2022): ``alpha > 0`` with ``G alpha = 1 / alpha``,
    the unique minimiser of the strictly convex ``0.5 alpha^T G alpha - sum_t log alpha_t``: the
    alpha-fair weights of :func:`fair_weights` at ``alpha = 1``. Opposed gradients (a singular ``G``
    whose null space meets the positive orthant) admit no solution; a ridge ``1e-12 * tr(G) / T``
    keeps the problem bounded (the weights are then very large)."""
    return fair_weights(gram, 1.0, max_iter, tol)


class NashMTL(Weighting):
    """Nash-MTL (Navon et al., 2022): the Nash bargaining solution over the task gradients.

    The weights ``alpha > 0`` solve ``alpha_t (G alpha)_t = 1`` (``G`` the Gram matrix of the task
    gradients), i.e. every task's gradient has the same inner product ``1`` with the update scaled by
    its weight: ``g_t . d = 1 / alpha_t``. The equation is solved exactly (Newton's method on its
    convex potential; the paper's code approximates it by a few convex-concave iterations with
    cvxpy). The paper's code (and LibMTL's) divides ``G`` by ``c = ||G||_F`` for conditioning, but its
    constraint ``-log(alpha_t c) - log((G / c alpha)_t) <= 0`` multiplies the factor back in: it
    solves the equation with ``G`` itself, so the update has norm ``sqrt(T)`` whatever the scale of
    the gradients. ``normalize=True`` does the same (solves with ``G / c`` and rescales the weights
    by ``1 / sqrt(c)``); ``False`` solves with ``G`` directly: both give the same weights.

    As in the paper's code, the objective is ``sum_t alpha_t L_t``: the shared parameters get
    ``sum_t alpha_t g_t`` and each task's head ``alpha_t`` times its own loss's gradient. The weights
    are recomputed every ``update_every`` steps and reused in between.
    """

    needs_grads = True

    def __init__(self, normalize: bool = True, update_every: int = 1, max_iter: int = 100,
                 grad_source: GradSource = "representation") -> None:
        super().__init__(grad_source)
        if isinstance(update_every, bool) or int(update_every) != update_every or update_every < 1:
            raise ValueError(f"NashMTL update_every must be >= 1 (an integer), got {update_every!r}")
        if isinstance(max_iter, bool) or int(max_iter) != max_iter or max_iter < 1:
            raise ValueError(f"NashMTL max_iter must be >= 1 (an integer: Newton iterations), got {max_iter!r}")
        self.normalize, self.update_every, self.max_iter = bool(normalize), int(update_every), int(max_iter)
        self.register_buffer("alpha", torch.zeros(0, dtype=torch.float64))

    def setup(self, num_tasks: int, lower_bounds: Optional[Sequence[float]] = None) -> None:
        super().setup(num_tasks, lower_bounds)
        self.alpha = torch.zeros(num_tasks, dtype=torch.float64)

    def compute_weights(self, stats: TaskStats) -> Tensor:
        self._check(stats)
        idx, g, G = _active_gram(stats)
        if stats.step % self.update_every == 0 or bool((self.alpha[idx.to(self.alpha.device)] == 0).any()):
            c = max(float(G.norm()), 1e-30) if self.normalize else 1.0
            a = nash_bargaining_weights(G / c, self.max_iter) / math.sqrt(c)
            alpha = torch.zeros_like(self.alpha)
            alpha[idx.to(alpha.device)] = a.to(alpha)
            self.alpha = alpha
        return torch.where(stats.active.to(self.alpha.device), self.alpha, 0.0).to(stats.losses)


class IMTL(Weighting):
    """Impartial multi-task learning (Liu et al., 2021), the hybrid IMTL of loss and gradient balance.

    * IMTL-L: each task loss is scaled, ``exp(s_t) L_t - s_t``, with learned ``s_t`` (trained by the
      module's optimiser, like uncertainty weighting's log variances); ``scale_losses=False`` keeps
      ``s_t = 0``.
    * IMTL-G: the shared parameters move along ``d = sum_t alpha_t g'_t`` with ``g'_t = exp(s_t) g_t``
      the scaled losses' gradients and ``alpha`` (summing to 1) the unique combination whose
      projection on every unit gradient ``u_t`` is the same: ``d . u_t = d . u_1``, i.e.
      ``alpha_{2:} = g'_1 U^T (D U^T)^{-1}``, ``D = g'_1 - g'_{2:}``, ``U = u_1 - u_{2:}``. For
      linearly independent gradients this is ``alpha = G'^{-1} n / sum(G'^{-1} n)`` with ``n_t =
      ||g'_t||``; torchjd's ``IMTLGWeighting`` computes it from the Gram matrix (with a
      pseudo-inverse, which also covers dependent gradients).

    The weights on the shared parameters are ``alpha_t exp(s_t)``; the heads get the gradient of
    their own scaled loss (``task_weights = exp(s_t)``). The scales see ``L_t - b_t`` (``b_t`` the
    loss's lower bound, 0 for cross-entropy and MSE): ``exp(s) L - s`` is unbounded below for a
    negative loss.
    """

    needs_grads = True
    direction_only = True
    needs_bounded_losses = True

    def __init__(self, scale_losses: bool = True, grad_source: GradSource = "representation") -> None:
        super().__init__(grad_source)
        self.scale_losses = bool(scale_losses)
        self._solver = _torchjd_weighting("IMTLGWeighting")()
        self.log_scales = nn.Parameter(torch.zeros(0), requires_grad=self.scale_losses)
        self.register_buffer("_active", torch.zeros(0, dtype=torch.bool))

    def setup(self, num_tasks: int, lower_bounds: Optional[Sequence[float]] = None) -> None:
        super().setup(num_tasks, lower_bounds)
        if self.log_scales.numel() != num_tasks:
            self.log_scales = nn.Parameter(torch.zeros(num_tasks), requires_grad=self.scale_losses)
        self._active = torch.ones(num_tasks, dtype=torch.bool)

    def compute_weights(self, stats: TaskStats) -> Tensor:
        self._check(stats)
        idx, g, G = _active_gram(stats)
        self._active = stats.active.detach().to(self._active.device).clone()
        scale = torch.exp(self.log_scales.detach().double()).to(G.device)[idx]
        alpha = self._solver(scale[:, None] * G * scale[None, :]).double()  # the Gram matrix of the g'_t
        return _scatter(alpha * scale, idx, stats)

    def task_weights(self, weights: Tensor) -> Tensor:
        return torch.exp(self.log_scales.detach()).to(weights) * self._active.to(weights)

    def loss(self, losses: Tensor, weights: Tensor) -> Tensor:
        active = self._active.to(losses)
        s = self.log_scales.to(losses)
        b = self.lower_bounds.to(losses) if self.lower_bounds.numel() else torch.zeros_like(losses)
        # the losses weighted by ``weights``; the scales' own gradient exp(s_t) (L_t - b_t) - 1
        return (weights.to(losses) * losses).sum() + (active * (torch.exp(s) * (losses.detach() - b) - s)).sum()


def _torchjd_weighting(name: str):
    try:
        import torchjd.aggregation as jd
    except ImportError as e:  # pragma: no cover - torchjd is a dependency
        raise ImportError(f"{name} needs the torchjd package (pip install torchjd)") from e
    return getattr(jd, name)


class DualConeWeighting(Weighting):
    """Base of the methods whose weights are one of torchjd's dual-cone projections of the Gram matrix
    (``torchjd_name``, solved by quadprog with the safeguards ``norm_eps`` and ``reg_eps``): UPGrad
    and DualProj. Only the shared parameters are steered; heads get their own loss's gradient."""

    needs_grads = True
    direction_only = True
    torchjd_name = ""

    def __init__(self, norm_eps: float = 1e-4, reg_eps: float = 1e-4,
                 grad_source: GradSource = "representation") -> None:
        check_real(type(self).__name__, "norm_eps", norm_eps, 0.0)
        check_real(type(self).__name__, "reg_eps", reg_eps, 0.0)
        super().__init__(grad_source)
        self.norm_eps, self.reg_eps = float(norm_eps), float(reg_eps)
        from torchjd.linalg import QuadprogProjector

        self._solver = _torchjd_weighting(self.torchjd_name)(
            projector=QuadprogProjector(norm_eps=self.norm_eps, reg_eps=self.reg_eps))

    def compute_weights(self, stats: TaskStats) -> Tensor:
        self._check(stats)
        idx, _, G = _active_gram(stats)
        return _scatter(self._solver(G).double(), idx, stats)


class UPGrad(DualConeWeighting):
    """UPGrad, the unconflicting projection of gradients of Jacobian descent (Quinton & Rey, 2024).

    Each task gradient is projected onto the dual cone of all task gradients (the vectors with a
    non-negative inner product with every task gradient) and the projections are averaged; the
    update never conflicts with any task. The weights come from torchjd's ``UPGradWeighting`` on the
    Gram matrix (one small quadratic program per task, solved by quadprog); ``norm_eps`` and
    ``reg_eps`` are its numerical safeguards. Only the shared parameters are steered; heads get
    their own loss's gradient.
    """

    torchjd_name = "UPGradWeighting"

WEIGHTINGS = {cls.__name__: cls for cls in (StaticWeighting, EqualWeighting, UncertaintyWeighting, DWA,
                                             DROWeighting, GradNorm, MGDA, PCGrad, RLW, FAMO, CAGrad, NashMTL,
                                             IMTL, UPGrad)}
