"""Implicit differentiation: conjugate gradient on Hessian-vector products.

Shared by iMAML (Rajeswaran et al. 2019) and TaskMet (Bansal et al. 2023). All functions work on
pytrees of tensors (a tensor, or a dict of tensors), run a fixed number of CG iterations with no
data-dependent Python control flow, and are therefore safe to ``vmap`` over tasks.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.func import grad
from torch.utils._pytree import tree_leaves, tree_map

Tree = Any


def tree_dot(a: Tree, b: Tree) -> Tensor:
    return sum((x * y).sum() for x, y in zip(tree_leaves(a), tree_leaves(b)))


def tree_axpy(alpha: Tensor, x: Tree, y: Tree) -> Tree:
    """``alpha * x + y``."""
    return tree_map(lambda u, v: alpha * u + v, x, y)


def conjugate_gradient(matvec: Callable[[Tree], Tree], b: Tree, steps: int = 10, damping: float = 0.0,
                       x0: Tree | None = None) -> Tree:
    """Solve ``(A + damping I) x = b`` for symmetric positive-definite ``A`` given by ``matvec``.

    A fixed number of iterations (``steps``); divisions are guarded so that a system that has
    converged early (zero residual) stays put instead of producing NaNs.
    """
    if steps < 0:
        raise ValueError(f"conjugate_gradient needs steps >= 0, got {steps}")

    def A(v: Tree) -> Tree:
        av = matvec(v)
        return tree_axpy(damping, v, av) if damping else av

    x = tree_map(torch.zeros_like, b) if x0 is None else x0
    r = b if x0 is None else tree_map(lambda u, v: u - v, b, A(x0))
    p = r
    rs = tree_dot(r, r)
    for _ in range(steps):
        ap = A(p)
        pap = tree_dot(p, ap)
        alpha = torch.where(pap > 0, rs / torch.where(pap > 0, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        x = tree_axpy(alpha, p, x)
        r = tree_axpy(-alpha, ap, r)
        rs_new = tree_dot(r, r)
        beta = torch.where(rs > 0, rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)), torch.zeros_like(rs))
        p = tree_axpy(beta, p, r)
        rs = rs_new
    return x


def hvp(f: Callable[[Tree], Tensor], primal: Tree, tangent: Tree) -> Tree:
    """Hessian-vector product of scalar ``f`` at ``primal`` (reverse-over-reverse).

    Forward-over-reverse (``jvp(grad(f))``) fails on some backward formulas in torch 2.13
    ("ZeroTensors are immutable", e.g. through tanh + MSE); the double backward works everywhere.
    """
    return grad(lambda p: tree_dot(grad(f)(p), tangent))(primal)


def proximal_meta_gradient(task_loss: Callable[[Tree], Tensor], phi: Tree, g: Tree, lam: float,
                           cg_steps: int = 5, damping: float = 0.0) -> Tree:
    """iMAML's implicit meta-gradient ``(I + H/lam)^-1 g``.

    ``phi`` is the solution of the proximal inner problem ``task_loss(phi) + lam/2 ||phi - theta||^2``,
    ``H`` the Hessian of ``task_loss`` at ``phi``, ``g`` the query-loss gradient at ``phi``.
    ``damping`` adds ``damping * I`` to the system for stability.
    """
    if lam <= 0:
        raise ValueError(f"the proximal weight lam must be > 0, got {lam}")
    phi = tree_map(lambda t: t.detach(), phi)
    matvec = lambda v: tree_axpy(1.0 / lam, hvp(task_loss, phi, v), v)  # noqa: E731
    return conjugate_gradient(matvec, g, steps=cg_steps, damping=damping)


def implicit_gradient(inner_loss: Callable[[Tree, Tree], Tensor], theta_star: Tree, phi: Tree, outer_grad: Tree,
                      cg_steps: int = 10, damping: float = 0.0) -> Tree:
    """Gradient of an outer loss w.r.t. ``phi`` through ``theta*(phi) = argmin_theta inner_loss(theta, phi)``.

    By the implicit function theorem,
    ``dL/dphi = - (d^2 inner / dphi dtheta) H^-1 dL/dtheta`` with ``H = d^2 inner / dtheta^2`` at
    ``theta_star``. ``outer_grad`` is ``dL/dtheta`` at ``theta_star``. The direct term ``dL/dphi``
    (if the outer loss depends on ``phi`` directly) is the caller's to add.
    """
    theta_star = tree_map(lambda t: t.detach(), theta_star)
    v = conjugate_gradient(lambda u: hvp(lambda th: inner_loss(th, phi), theta_star, u), outer_grad,
                           steps=cg_steps, damping=damping)
    v = tree_map(lambda t: t.detach(), v)
    mixed = grad(lambda ph: tree_dot(grad(inner_loss, argnums=0)(theta_star, ph), v))(phi)
    return tree_map(lambda t: -t, mixed)
