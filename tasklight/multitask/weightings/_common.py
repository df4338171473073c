"""Helpers shared by the weighting methods of this package."""
from __future__ import annotations

import torch
from torch import Tensor

from tasklight.multitask.weighting import GRAD_SOURCES, Weighting


def project_onto_simplex(v: Tensor) -> Tensor:
    """The Euclidean projection of ``v`` onto the probability simplex (sort-based, Held et al. 1974)."""
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, 0) - 1.0
    k = torch.arange(1, len(v) + 1, dtype=v.dtype, device=v.device)
    rho = int((u - css / k > 0).nonzero().max())
    theta = css[rho] / (rho + 1)
    return (v - theta).clamp_min(0.0)


def check_positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not (float(value) > 0 and float(value) < float("inf")):
            raise ValueError(f"{owner}: {name} must be a finite number > 0, got {value!r}")


def require_parameter_grads(method: Weighting, grad_source: str) -> None:
    """Methods that give the shared parameters a direction need the gradients on those parameters."""
    if grad_source not in GRAD_SOURCES:
        raise ValueError(f"{type(method).__name__}: grad_source must be one of {GRAD_SOURCES}, got {grad_source!r}")
    if grad_source != "parameters":
        raise ValueError(f"{type(method).__name__} sets the gradient of the shared parameters itself, so it needs "
                         f"grad_source='parameters' (got {grad_source!r})")


class GradientSizedState:
    """Mixin for methods with state the size of the task gradients (allocated at the first step, when
    that size is known): a checkpoint's state brings its own size, so loading resizes the buffers
    named in ``_gradient_sized`` first."""

    _gradient_sized: tuple[str, ...] = ()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self._gradient_sized:
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
