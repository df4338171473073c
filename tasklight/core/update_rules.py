"""Differentiable inner update rules: functional pieces shared by every strategy of the engine.

An update rule is ``init(params) -> state`` and ``step(params, grads, state) -> (params, state)``
on name -> tensor dicts. Everything is plain tensor arithmetic, so autograd (and ``torch.func``)
differentiates *through* the updates: the inner learning rates of Meta-SGD receive gradients, and
a second-order meta-gradient through inner Adam steps needs no ``higher``. Parameters may carry a
leading task dimension (the stacked strategy) or not (vmap); per-parameter learning-rate tensors
broadcast against both.

* :class:`SGD`: ``p - lr * g``; ``lr`` a number, a scalar tensor, or a dict of tensors, one per
  adapted parameter (Meta-SGD's learnable rates, per element or per tensor);
* :class:`Adam`: Kingma & Ba's update with bias correction, the same arithmetic as
  ``torch.optim.Adam`` (``p - lr * m_hat / (sqrt(v_hat) + eps)``). Its square root has an infinite
  derivative at 0 (an exactly-zero gradient entry, e.g. behind a dead ReLU, at the first step);
  there the derivative is taken as 0 instead of producing NaN, which leaves every finite
  derivative unchanged.
"""
from __future__ import annotations

from typing import Mapping, Union

import torch
from torch import Tensor

ParamDict = dict[str, Tensor]
LearningRate = Union[float, Tensor, Mapping[str, Tensor]]


def lr_for(lr: LearningRate, name: str):
    """The learning rate of parameter ``name`` (a dict of rates is indexed, a number is shared)."""
    if isinstance(lr, Mapping):
        try:
            return lr[name]
        except KeyError:
            raise KeyError(f"no inner learning rate for the adapted parameter {name!r}; the rates are given for "
                           f"{sorted(lr)}") from None
    return lr


class SGD:
    """Plain (Meta-)SGD: ``p <- p - lr * g``."""

    def __init__(self, lr: LearningRate) -> None:
        self.lr = lr

    def init(self, params: ParamDict) -> tuple:
        return ()

    def step(self, params: ParamDict, grads: ParamDict, state: tuple) -> tuple[ParamDict, tuple]:
        new = {}
        for k, p in params.items():
            if k not in grads:
                new[k] = p
                continue
            lr = lr_for(self.lr, k)
            # a number: one fused op (p + (-lr) * g); a tensor rate stays in the graph
            new[k] = torch.add(p, grads[k], alpha=-lr) if isinstance(lr, (int, float)) else p - lr * grads[k]
        return new, state


def _safe_sqrt(v: Tensor) -> Tensor:
    """``sqrt(v)`` for ``v >= 0`` whose derivative at ``v == 0`` is 0 (not inf, which gives NaN)."""
    pos = v > 0
    return torch.where(pos, torch.where(pos, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


class Adam:
    """Differentiable Adam (``torch.optim.Adam``'s arithmetic, L2 ``weight_decay``, no amsgrad)."""

    #: decoupled weight decay (AdamW) instead of an L2 term added to the gradient (Adam)
    decoupled = False

    def __init__(self, lr: LearningRate, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        b1, b2 = betas
        name = type(self).__name__
        if not (0 <= b1 < 1 and 0 <= b2 < 1) or not eps > 0:
            raise ValueError(f"{name} needs 0 <= betas < 1 and eps > 0, got betas={betas}, eps={eps}")
        self.lr, self.betas, self.eps = lr, (float(b1), float(b2)), float(eps)
        self.weight_decay = _nonnegative(name, weight_decay=weight_decay)["weight_decay"]

    def init(self, params: ParamDict) -> tuple:
        return (0, {}, {})

    def step(self, params: ParamDict, grads: ParamDict, state: tuple) -> tuple[ParamDict, tuple]:
        t, m, v = state
        t = t + 1
        b1, b2 = self.betas
        wd = self.weight_decay
        if wd and self.decoupled:
            params = {k: p * (1 - lr_for(self.lr, k) * wd) if k in grads else p for k, p in params.items()}
        elif wd:
            grads = {k: g + wd * params[k] for k, g in grads.items()}
        m = {k: (b1 * m[k] + (1 - b1) * g) if k in m else (1 - b1) * g for k, g in grads.items()}
        v = {k: (b2 * v[k] + (1 - b2) * g * g) if k in v else (1 - b2) * g * g for k, g in grads.items()}
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        new = {}
        for k, p in params.items():
            if k in grads:
                new[k] = p - lr_for(self.lr, k) * (m[k] / c1) / (_safe_sqrt(v[k] / c2) + self.eps)
            else:
                new[k] = p
        return new, (t, m, v)


class AdamW(Adam):
    """Differentiable AdamW (``torch.optim.AdamW``'s arithmetic: decoupled decay, default 0.01)."""

    decoupled = True

    def __init__(self, lr: LearningRate, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01) -> None:
        super().__init__(lr, betas, eps, weight_decay)


def _nonnegative(rule: str, **values: float) -> dict[str, float]:
    bad = {k: v for k, v in values.items() if not v >= 0}
    if bad:
        raise ValueError(f"{rule} needs {', '.join(bad)} >= 0, got {bad}")
    return {k: float(v) for k, v in values.items()}


def _decayed(grads: ParamDict, params: ParamDict, weight_decay: float) -> ParamDict:
    """``g + wd * p`` (torch.optim's coupled L2 weight decay)."""
    return {k: g + weight_decay * params[k] for k, g in grads.items()} if weight_decay else grads


class MomentumSGD:
    """Differentiable SGD with momentum (``torch.optim.SGD``'s arithmetic): ``b <- mu b + (1 - dampening) g``
    (``b = g`` at the first step), then ``p <- p - lr b``, or ``p <- p - lr (g + mu b)`` with ``nesterov``."""

    def __init__(self, lr: LearningRate, momentum: float = 0.9, dampening: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:
        vals = _nonnegative("MomentumSGD", momentum=momentum, dampening=dampening, weight_decay=weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(f"nesterov momentum needs momentum > 0 and dampening = 0 (as torch.optim.SGD), got "
                             f"momentum={momentum}, dampening={dampening}")
        self.lr, self.nesterov = lr, bool(nesterov)
        self.momentum, self.dampening, self.weight_decay = vals["momentum"], vals["dampening"], vals["weight_decay"]

    def init(self, params: ParamDict) -> tuple:
        return ({},)

    def step(self, params: ParamDict, grads: ParamDict, state: tuple) -> tuple[ParamDict, tuple]:
        (buf,) = state
        grads = _decayed(grads, params, self.weight_decay)
        mu = self.momentum
        buf = {k: (mu * buf[k] + (1 - self.dampening) * g) if k in buf else g for k, g in grads.items()}
        new = {}
        for k, p in params.items():
            if k in grads:
                d = grads[k] + mu * buf[k] if self.nesterov else buf[k]
                new[k] = p - lr_for(self.lr, k) * d
            else:
                new[k] = p
        return new, (buf,)


class RMSprop:
    """Differentiable RMSprop (``torch.optim.RMSprop``'s arithmetic): ``s <- alpha s + (1 - alpha) g^2``,
    ``d = sqrt(s) + eps`` (centered: ``sqrt(s - m^2) + eps`` with ``m`` the mean gradient), then
    ``p <- p - lr g / d`` or, with ``momentum``, ``b <- mu b + g / d``, ``p <- p - lr b``."""

    def __init__(self, lr: LearningRate, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
                 momentum: float = 0.0, centered: bool = False) -> None:
        vals = _nonnegative("RMSprop", weight_decay=weight_decay, momentum=momentum)
        if not (0 <= alpha < 1) or not eps > 0:
            raise ValueError(f"RMSprop needs 0 <= alpha < 1 and eps > 0, got alpha={alpha}, eps={eps}")
        self.lr, self.alpha, self.eps, self.centered = lr, float(alpha), float(eps), bool(centered)
        self.weight_decay, self.momentum = vals["weight_decay"], vals["momentum"]

    def init(self, params: ParamDict) -> tuple:
        return ({}, {}, {})

    def step(self, params: ParamDict, grads: ParamDict, state: tuple) -> tuple[ParamDict, tuple]:
        sq, avg, buf = state
        buf = dict(buf)
        grads = _decayed(grads, params, self.weight_decay)
        a = self.alpha
        sq = {k: (a * sq[k] + (1 - a) * g * g) if k in sq else (1 - a) * g * g for k, g in grads.items()}
        if self.centered:
            avg = {k: (a * avg[k] + (1 - a) * g) if k in avg else (1 - a) * g for k, g in grads.items()}
        new = {}
        for k, p in params.items():
            if k not in grads:
                new[k] = p
                continue
            var = sq[k] - avg[k] * avg[k] if self.centered else sq[k]
            d = grads[k] / (_safe_sqrt(var) + self.eps)
            if self.momentum:
                d = buf[k] = self.momentum * buf[k] + d if k in buf else d
            new[k] = p - lr_for(self.lr, k) * d
        return new, (sq, avg, buf)


class Adagrad:
    """Differentiable Adagrad (``torch.optim.Adagrad``'s arithmetic): ``s <- s + g^2``,
    ``p <- p - lr / (1 + (t - 1) lr_decay) * g / (sqrt(s) + eps)``."""

    def __init__(self, lr: LearningRate, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10) -> None:
        vals = _nonnegative("Adagrad", lr_decay=lr_decay, weight_decay=weight_decay,
                            initial_accumulator_value=initial_accumulator_value)
        if not eps > 0:
            raise ValueError(f"Adagrad needs eps > 0, got eps={eps}")
        self.lr, self.eps = lr, float(eps)
        self.lr_decay, self.weight_decay = vals["lr_decay"], vals["weight_decay"]
        self.initial = vals["initial_accumulator_value"]

    def init(self, params: ParamDict) -> tuple:
        return (0, {})

    def step(self, params: ParamDict, grads: ParamDict, state: tuple) -> tuple[ParamDict, tuple]:
        t, acc = state
        t = t + 1
        grads = _decayed(grads, params, self.weight_decay)
        acc = {k: (acc[k] if k in acc else self.initial) + g * g for k, g in grads.items()}
        scale = 1.0 / (1 + (t - 1) * self.lr_decay)
        new = {}
        for k, p in params.items():
            if k in grads:
                new[k] = p - lr_for(self.lr, k) * scale * grads[k] / (_safe_sqrt(acc[k]) + self.eps)
            else:
                new[k] = p
        return new, (t, acc)


#: the inner update rules by name (``inner_optimizer`` of ``MAMLModule``); the options of each are its
#: constructor's keyword arguments (``inner_optimizer_args``)
UPDATE_RULES = {"sgd": SGD, "momentum": MomentumSGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop,
                "adagrad": Adagrad}


def make_update_rule(name: str, lr: LearningRate, **kwargs):
    """The update rule ``name`` of :data:`UPDATE_RULES` with learning rate ``lr`` and its options ``kwargs``."""
    if name not in UPDATE_RULES:
        raise ValueError(f"unknown inner update rule {name!r}: use one of {sorted(UPDATE_RULES)}")
    cls = UPDATE_RULES[name]
    try:
        return cls(lr, **kwargs)
    except TypeError as err:
        import inspect

        options = [p for p in inspect.signature(cls).parameters if p != "lr"]
        raise ValueError(f"inner update rule {name!r} takes the options {options}, got {sorted(kwargs)}") from err
