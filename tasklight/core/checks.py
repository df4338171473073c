"""One clear error per bad numeric setting: the owner, the setting, the allowed range and the value."""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Optional

import torch


def check_int(owner: str, name: str, value, low: int = 0, what: str = "") -> int:
    """``value`` as an int, or ``ValueError`` unless it is an integer (not a bool) ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise ValueError(f"{owner}: {name} must be an integer >= {low}{f' ({what})' if what else ''}, got {value!r}")
    return int(value)


def check_real(owner: str, name: str, value, low: Optional[float] = None, strict: bool = False,
               high: Optional[float] = None, what: str = "") -> float:
    """``value`` as a float, or ``ValueError`` unless it is a finite number ``>= low`` (``> low`` if
    ``strict``) and ``<= high``."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if strict else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
        bound += "" if high is None else f"{' and' if bound else ''} <= {high:g}"
        raise ValueError(f"{owner}: {name} must be a finite number{bound}{f' ({what})' if what else ''}, "
                         f"got {value!r}")
    return float(value)


def check_learning_rates(optimizer: torch.optim.Optimizer, owner: str = "the outer optimiser") -> None:
    """Every parameter group's ``lr`` finite and > 0: an lr of 0 trains nothing, silently."""
    for i, group in enumerate(optimizer.param_groups):
        lr = group.get("lr")
        if lr is None:
            continue
        v = float(lr)
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{owner} ({type(optimizer).__name__}) has lr={v:g} in parameter group {i}: the outer "
                             f"learning rate must be a finite number > 0 (0 trains nothing); set the optimizer's lr, "
                             f"e.g. --model.init_args.optimizer.init_args.lr 0.001")


__all__ = ["check_int", "check_learning_rates", "check_real"]
