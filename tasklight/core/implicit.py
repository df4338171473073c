"""Implicit differentiation: conjugate gradient on Hessian-vector products.

Shared by iMAML (Rajeswaran et al. 2019) and TaskMet (Bansal et al. 2023). All functions work on
pytrees of tensors (a tensor, or a dict of tensors), run a fixed number of CG iterations with no
data-dependent Python control flow, and are therefore safe to ``vmap`` over tasks.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp
from torch.utils._pytree import tree_leaves, tree_map

Tree = Any


def tree_dot(a: Tree, b: Tree) -> Tensor:
    return sum((x * y).sum() for x, y in zip(tree_leaves(a), tree_leaves(b)))


def tree_axpy(alpha: Tensor, x: Tree, y: Tree) -> Tree:
    """``alpha * x + y``."""
    return tree_map(lambda u, v: alpha * u + v, x, y)


def conjugate_gradient(matvec: Callable[[Tree], Tree], b: Tree, steps: int = 10, damping: float = 0.0,
                       x0: Tree | None = None, return_info: bool = False,
                       dot: Callable[[Tree, Tree], Tensor] = tree_dot):
    """Solve ``(A + damping I) x = b`` for symmetric positive-definite ``A`` given by ``matvec``.

    A fixed number of iterations (``steps``); divisions are guarded so that a system that has
    converged early (zero residual) stays put instead of producing NaNs.

    With ``return_info=True`` returns ``(x, info)``: ``info["rel_residual"]`` is ``||r|| / ||b||`` of
    CG's residual ``r = b - (A + damping I) x`` after the last iteration, and ``info["indefinite"]``
    is True if a search direction with ``p^T A p <= 0`` was met while the residual was not zero:
    the system is not positive definite, and CG's answer is not its solution. Both are tensors (no
    data-dependent Python control flow), so the function stays ``vmap``-able.

    ``dot`` is the inner product (default :func:`tree_dot`, one scalar). One that returns a tensor
    broadcastable against the leaves, e.g. ``(a * b).sum((-2, -1), keepdim=True)`` on ``[T, m, n]``
    tensors, solves ``T`` independent systems at once (each with its own step lengths), without ``vmap``.
    """
    if steps < 0:
        raise ValueError(f"conjugate_gradient needs steps >= 0, got {steps}")

    def A(v: Tree) -> Tree:
        av = matvec(v)
        return tree_axpy(damping, v, av) if damping else av

    x = tree_map(torch.zeros_like, b) if x0 is None else x0
    r = b if x0 is None else tree_map(lambda u, v: u - v, b, A(x0))
    p = r
    rs = dot(r, r)
    b_norm2 = dot(b, b)
    indefinite = torch.zeros_like(rs, dtype=torch.bool)
    for _ in range(steps):
        ap = A(p)
        pap = dot(p, ap)
        indefinite = indefinite | ((pap <= 0) & (rs > 0))
        alpha = torch.where(pap > 0, rs / torch.where(pap > 0, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        x = tree_axpy(alpha, p, x)
        r = tree_axpy(-alpha, ap, r)
        rs_new = dot(r, r)
        beta = torch.where(rs > 0, rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)), torch.zeros_like(rs))
        p = tree_axpy(beta, p, r)
        rs = rs_new
    if not return_info:
        return x
    rel = torch.sqrt(rs / torch.where(b_norm2 > 0, b_norm2, torch.ones_like(b_norm2)))
    return x, {"rel_residual": rel.detach(), "indefinite": indefinite}


def hvp(f: Callable[[Tree], Tensor], primal: Tree, tangent: Tree) -> Tree:
    """Hessian-vector product of scalar ``f`` at ``primal`` (reverse-over-reverse).

    Forward-over-reverse (``jvp(grad(f))``) fails on some backward formulas in torch 2.13
    ("ZeroTensors are immutable", e.g. through tanh + MSE); the double backward works everywhere.
    """
    return grad(lambda p: tree_dot(grad(f)(p), tangent))(primal)


def gauss_newton_vp(model_fn: Callable[[Tree], Tensor], output_loss: Callable[[Tensor], Tensor], primal: Tree,
                    tangent: Tree) -> Tree:
    """Generalised Gauss-Newton-vector product ``J^T H_out J v`` of ``output_loss(model_fn(primal))``.

    ``J`` is the Jacobian of the outputs in the parameters and ``H_out`` the Hessian of the loss in
    the outputs. For losses convex in the outputs (MSE, cross-entropy, histogram losses) it is
    positive semi-definite, unlike the Hessian of a non-convex network, so ``I + G / lam`` is
    positive definite for every ``lam > 0``. It drops the term of the Hessian that is linear in the
    residuals.
    """
    out, jv = jvp(model_fn, (primal,), (tangent,))
    out = out.detach()
    hjv = grad(lambda o: (grad(output_loss)(o) * jv).sum())(out)
    _, pullback = vjp(model_fn, primal)
    return pullback(hjv)[0]


def proximal_meta_gradient(task_loss: Callable[[Tree], Tensor], phi: Tree, g: Tree, lam: float,
                           cg_steps: int = 5, damping: float = 0.0, return_info: bool = False,
                           curvature_vp: Optional[Callable[[Tree], Tree]] = None):
    """iMAML's implicit meta-gradient ``(I + H/lam)^-1 g``.

    ``phi`` is the solution of the proximal inner problem ``task_loss(phi) + lam/2 ||phi - theta||^2``,
    ``H`` the Hessian of ``task_loss`` at ``phi``, ``g`` the query-loss gradient at ``phi``.
    ``damping`` adds ``damping * I`` to the system for stability. ``curvature_vp`` replaces ``H v``
    (e.g. :func:`gauss_newton_vp`, which keeps the system positive definite). The Hessian system is positive definite
    when ``1 + damping + lambda_min(H) / lam > 0``; ``return_info`` returns CG's report as well
    (:func:`conjugate_gradient`).
    """
    if lam <= 0:
        raise ValueError(f"the proximal weight lam must be > 0, got {lam}")
    phi = tree_map(lambda t: t.detach(), phi)
    if curvature_vp is None:
        curvature_vp = lambda v: hvp(task_loss, phi, v)  # noqa: E731
    matvec = lambda v: tree_axpy(1.0 / lam, curvature_vp(v), v)  # noqa: E731
    return conjugate_gradient(matvec, g, steps=cg_steps, damping=damping, return_info=return_info)


def implicit_gradient(inner_loss: Callable[[Tree, Tree], Tensor], theta_star: Tree, phi: Tree, outer_grad: Tree,
                      cg_steps: int = 10, damping: float = 0.0, return_info: bool = False):
    """Gradient of an outer loss w.r.t. ``phi`` through ``theta*(phi) = argmin_theta inner_loss(theta, phi)``.

    By the implicit function theorem,
    ``dL/dphi = - (d^2 inner / dphi dtheta) H^-1 dL/dtheta`` with ``H = d^2 inner / dtheta^2`` at
    ``theta_star``. ``outer_grad`` is ``dL/dtheta`` at ``theta_star``. The direct term ``dL/dphi``
    (if the outer loss depends on ``phi`` directly) is the caller's to add. ``return_info`` also
    returns CG's report (:func:`conjugate_gradient`).
    """
    theta_star = tree_map(lambda t: t.detach(), theta_star)
    v, info = conjugate_gradient(lambda u: hvp(lambda th: inner_loss(th, phi), theta_star, u), outer_grad,
                                 steps=cg_steps, damping=damping, return_info=True)
    v = tree_map(lambda t: t.detach(), v)
    mixed = grad(lambda ph: tree_dot(grad(inner_loss, argnums=0)(theta_star, ph), v))(phi)
    out = tree_map(lambda t: -t, mixed)
    return (out, info) if return_info else out
