"""Explicit backprop and the explicit second-order meta-gradient of task-stacked MLPs.

For a network of Linear layers and ReLU / Tanh / Identity activations under a mean-squared-error
loss, the engine's ``stacked`` strategy writes the inner gradient out as a few ``bmm`` per layer
(:func:`mlp_forward`, :func:`mlp_backward`), and -- for the meta-gradient of (Meta-)SGD inner
loops -- the whole reverse pass through the inner loop too (:func:`explicit_meta_gradient`):

* forward through the ``K`` inner steps, keeping every step's activations and backprop signals;
* the query loss's gradient at the adapted parameters is the adjoint ``a_K`` (per task);
* backwards over the steps, ``a_k = a_{k+1} - H_k (lr * a_{k+1})`` with ``H_k`` the Hessian of the
  support loss at step ``k``'s parameters, applied to the vector by Pearlmutter's R-operator (a
  forward-mode pass through the forward *and* the backprop of the step: about two backprops);
  Meta-SGD's rates collect ``-sum_k g_k * a_{k+1}``; first order drops the ``H_k`` term;
* the meta-gradient of the shared parameters is the sum of ``a_0`` over the tasks.

No autograd graph is built: a sinusoid meta-step is a few hundred small tensor ops instead of
the autograd engine's double-backward nodes (``BENCHMARKS.md``, meta-step time). It is exact --
the same numbers as autograd's second-order gradient (``tests/core/test_engine.py`` checks it to
1e-10 in float64 against a per-task loop) -- because a ReLU's second derivative is zero almost
everywhere and Tanh's is written out. Parameters are either shared (``[out, in]``: the first inner
step, one matmul for all tasks) or per task (``[T, out, in]``).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasklight.core.update_rules import SGD, lr_for

#: activations with written-out first and second derivatives
ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.Identity)


def _linear(h: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """``h [T, m, in] @ w^T + b`` for a shared ``w [out, in]`` or per-task ``w [T, out, in]``."""
    if w.dim() == 2:
        return F.linear(h, w, b)
    if b is None:
        return torch.bmm(h, w.transpose(1, 2))
    return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))


def _back(d: Tensor, w: Tensor) -> Tensor:
    """``d [T, m, out] @ w``: the signal through a linear layer's input."""
    return d @ w if w.dim() == 2 else torch.bmm(d, w)


def mlp_forward(ops, P: Mapping[str, Tensor], x: Tensor) -> list[Tensor]:
    """``vals``: ``vals[i]`` is op ``i``'s input ``[T, m, features]``, ``vals[-1]`` the output."""
    h = x.reshape(x.shape[0], -1, x.shape[-1])
    vals = [h]
    for op in ops:
        if op.kind == "linear":
            h = _linear(h, P[op.prefix + "weight"], P.get(op.prefix + "bias") if op.module.bias is not None else None)
        elif type(op.module) is nn.ReLU:
            h = torch.relu(h)
        elif type(op.module) is nn.Tanh:
            h = torch.tanh(h)
        vals.append(h)
    return vals


def _act_back(op, d: Tensor, out: Tensor) -> Tensor:
    if type(op.module) is nn.ReLU:
        return torch.ops.aten.threshold_backward(d, out, 0.0)  # relu's backward; differentiable in d
    if type(op.module) is nn.Tanh:
        return d * (1 - out * out)
    return d


def mlp_backward(ops, P: Mapping[str, Tensor], vals: Sequence[Tensor], d_out: Tensor, need: Optional[set] = None
                 ) -> tuple[dict[str, Tensor], list[Optional[Tensor]]]:
    """Backprop of ``d_out`` (the loss's gradient with respect to the output).

    Returns the per-task gradients of the parameters in ``need`` (default: all) and ``ds``:
    ``ds[i]`` the signal at op ``i``'s output.
    """
    grads: dict[str, Tensor] = {}
    ds: list[Optional[Tensor]] = [None] * len(ops)
    d = d_out
    for i in range(len(ops) - 1, -1, -1):
        op = ops[i]
        ds[i] = d
        if op.kind == "linear":
            wn, bn = op.prefix + "weight", op.prefix + "bias"
            if need is None or wn in need:
                grads[wn] = torch.bmm(d.transpose(1, 2), vals[i])
            if op.module.bias is not None and (need is None or bn in need):
                grads[bn] = d.sum(1)
            if i > 0:
                d = _back(d, P[wn])
        else:
            d = _act_back(op, d, vals[i + 1])
    return grads, ds


def _mse_signal(out: Tensor, target: Tensor) -> tuple[Tensor, Tensor, float]:
    """Per-task mean squared errors ``[T]``, their gradient with respect to ``out``, and its scale."""
    T = out.shape[0]
    diff = out - target.reshape(out.shape)
    scale = 2.0 * T / diff.numel()
    return diff.pow(2).reshape(T, -1).mean(1), diff * scale, scale


def mlp_loss_and_grads(ops, P, x, y, loss_fn, need=None):
    """Per-task MSE losses ``[T]`` and gradients of a stacked MLP (differentiable: autograd can
    differentiate through these ops, as the stacked strategy does for non-SGD inner rules)."""
    from tasklight.nn.losses import align_target

    vals = mlp_forward(ops, P, x)
    out = vals[-1].reshape(*x.shape[:-1], vals[-1].shape[-1])
    target = align_target(out, y, getattr(loss_fn, "loss", loss_fn), getattr(loss_fn, "what", "the network"))
    losses, d, _ = _mse_signal(vals[-1], target)
    grads, _ = mlp_backward(ops, P, vals, d, need)
    return losses, grads


def _mlp_hvp(ops, P, vals, ds, scale: float, V: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The support loss's Hessian (at the parameters ``P`` that gave ``vals``/``ds``) times ``V``.

    Pearlmutter's R-operator: ``R{.}`` of every forward value, then of every backprop signal;
    directions missing from ``V`` are zero. Sums of products are fused into ``baddbmm``.
    """
    R: list[Optional[Tensor]] = [None] * (len(ops) + 1)  # R{vals[i]}
    r = None
    for i, op in enumerate(ops):
        if op.kind == "linear":
            w, vw, vb = P[op.prefix + "weight"], V.get(op.prefix + "weight"), V.get(op.prefix + "bias")
            nr = None
            if vw is not None:
                vwt = vw.transpose(1, 2)
                nr = torch.bmm(vals[i], vwt) if vb is None else torch.baddbmm(vb.unsqueeze(1), vals[i], vwt)
            elif vb is not None:
                nr = vb.unsqueeze(1).expand(vals[i + 1].shape)
            if r is not None:
                if nr is None:
                    nr = _linear(r, w, None)
                elif w.dim() == 2:
                    nr = torch.addmm(nr.reshape(-1, nr.shape[-1]), r.reshape(-1, r.shape[-1]), w.t()).view(nr.shape)
                else:
                    nr = torch.baddbmm(nr, r, w.transpose(1, 2))
            r = nr
        elif r is not None:
            r = _act_back(op, r, vals[i + 1])  # the activation's derivative, applied forwards
        R[i + 1] = r
    out: dict[str, Tensor] = {}
    if R[-1] is None:
        return out
    rd = R[-1] * scale  # MSE's Hessian with respect to the output is scale * identity
    for i in range(len(ops) - 1, -1, -1):
        op = ops[i]
        d = ds[i]
        if op.kind == "linear":
            wn, bn = op.prefix + "weight", op.prefix + "bias"
            hw = torch.bmm(rd.transpose(1, 2), vals[i])
            if R[i] is not None:
                hw = torch.baddbmm(hw, d.transpose(1, 2), R[i])
            out[wn] = hw
            if op.module.bias is not None:
                out[bn] = rd.sum(1)
            if i > 0:
                back = _back(rd, P[wn])
                rd = torch.baddbmm(back, d, V[wn]) if wn in V else back
        else:
            o = vals[i + 1]
            nxt = _act_back(op, rd, o)
            if type(op.module) is nn.Tanh and R[i + 1] is not None:
                nxt = nxt - 2 * d * o * R[i + 1]
            rd = nxt
    return out


def _sgd(p: Tensor, rate, g: Tensor) -> Tensor:
    """``p - rate * g`` in one op."""
    return torch.add(p, g, alpha=-rate) if not isinstance(rate, Tensor) else torch.addcmul(p, rate, g, value=-1)


def _reduce_to(g: Tensor, like: Tensor) -> Tensor:
    """Sum the per-task, broadcast gradient ``g`` down to the shape of the rate ``like``."""
    if like.dim() == 0:
        return g.sum()
    return g.sum(0) if g.dim() > like.dim() else g


def is_mlp(plan) -> bool:
    """Whether a stack plan is Linear layers and the activations written out here, ending in a Linear."""
    return bool(plan.ops) and plan.ops[-1].kind == "linear" and all(
        op.kind == "linear" or (op.kind == "act" and type(op.module) in ACTIVATIONS) for op in plan.ops)


def explicit_ok(plan, core, buffers, kw) -> bool:
    """Whether :func:`explicit_meta_gradient` computes this meta-objective's gradient."""
    from tasklight.core.engine import manual_mlp_ok

    update = kw.get("update")
    lr = update.lr if update is not None and type(update) is SGD else kw.get("lr")
    return (plan is not None and not buffers and manual_mlp_ok(plan, core.inner_loss_fn)
            and manual_mlp_ok(plan, core.loss_fn) and (update is None or type(update) is SGD) and lr is not None
            and not kw.get("proximal") and not kw.get("task_params") and torch.is_grad_enabled())


def explicit_meta_gradient(plan, core, params: Mapping[str, Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor,
                           *, steps: int, lr=None, first_order: bool = False, update=None,
                           num_tasks: Optional[int] = None, **_ignored):
    """The gradient of ``sum of the query losses / num_tasks`` (default: the mean over these tasks)
    through ``steps`` (Meta-)SGD inner steps, written out; a chunk of a meta-batch passes the whole
    batch's ``num_tasks``, so the chunks' gradients add up.

    Returns ``(grads, lr_grads, query_losses [T], inner_losses [T, steps])``: ``grads`` for every
    parameter (summed over the tasks), ``lr_grads`` for the rate tensors of ``lr`` (empty for a
    number).
    """
    from tasklight.nn.losses import align_target

    if update is not None:
        lr = update.lr
    ops = plan.ops
    T = sx.shape[0]
    names = [k for k in params if core.is_adapted(k)]
    with torch.no_grad():
        P = {k: v.detach() for k, v in params.items()}
        rates = {k: lr_for(lr, k) for k in names}
        rates = {k: r.detach() if isinstance(r, Tensor) else r for k, r in rates.items()}
        tape, inner = [], []
        target = None
        for _ in range(steps):
            vals = mlp_forward(ops, P, sx)
            if target is None:  # the support targets, aligned once
                out = vals[-1].reshape(*sx.shape[:-1], vals[-1].shape[-1])
                target = align_target(out, sy, getattr(core.inner_loss_fn, "loss", core.inner_loss_fn),
                                      getattr(core.inner_loss_fn, "what", "the network"))
            losses, d, scale = _mse_signal(vals[-1], target)
            grads, ds = mlp_backward(ops, P, vals, d, set(names))
            tape.append((P, vals, ds, scale, grads))
            inner.append(losses)
            P = {**P, **{k: _sgd(P[k], rates[k], grads[k]) for k in names}}
        vals = mlp_forward(ops, P, qx)
        out = vals[-1].reshape(*qx.shape[:-1], vals[-1].shape[-1])
        target = align_target(out, qy, getattr(core.loss_fn, "loss", core.loss_fn),
                              getattr(core.loss_fn, "what", "the network"))
        qloss, d, _ = _mse_signal(vals[-1], target)
        adj, _ = mlp_backward(ops, P, vals, d / (num_tasks or T))
        lr_grads: dict[str, Tensor] = {}
        # a number as the rate: H (lr a) = lr (H a), so the direction is the adjoint itself
        plain = all(not isinstance(rates[k], Tensor) for k in names) and len({rates[k] for k in names}) == 1
        for Pk, vals, ds, scale, grads in reversed(tape):
            for k in names:
                if isinstance(rates[k], Tensor):
                    g = _reduce_to(grads[k] * adj[k], rates[k])
                    lr_grads[k] = -g if k not in lr_grads else lr_grads[k].sub_(g)
            if not first_order:
                if plain:
                    hv = _mlp_hvp(ops, Pk, vals, ds, scale, {k: adj[k] for k in names})
                    alpha = rates[names[0]] if names else 0.0
                else:
                    hv = _mlp_hvp(ops, Pk, vals, ds, scale, {k: rates[k] * adj[k] for k in names})
                    alpha = 1.0
                for k, h in hv.items():
                    adj[k] = adj[k].sub_(h, alpha=alpha)
        meta = {k: adj[k].sum(0) if adj[k].dim() > params[k].dim() else adj[k] for k in params}
        inner_losses = torch.stack(inner, 1) if inner else sx.new_zeros(T, 0)
    return meta, lr_grads, qloss, inner_losses
