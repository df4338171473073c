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
    """Differentiable Adam (``torch.optim.Adam``'s arithmetic, no weight decay, no amsgrad)."""

    def __init__(self, lr: LearningRate, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1) or not eps > 0:
            raise ValueError(f"Adam needs 0 <= betas < 1 and eps > 0, got betas={betas}, eps={eps}")
        self.lr, self.betas, self.eps = lr, (float(b1), float(b2)), float(eps)

    def init(self, params: ParamDict) -> tuple:
        return (0, {}, {})

    def step(self, params: ParamDict, grads: ParamDict, state: tuple) -> tuple[ParamDict, tuple]:
        t, m, v = state
        t = t + 1
        b1, b2 = self.betas
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


def make_update_rule(name: str, lr: LearningRate, **kwargs):
    """``"sgd"`` -> :class:`SGD`, ``"adam"`` -> :class:`Adam`."""
    if name == "sgd":
        return SGD(lr)
    if name == "adam":
        return Adam(lr, **kwargs)
    raise ValueError(f"unknown inner update rule {name!r}: use 'sgd' or 'adam'")
