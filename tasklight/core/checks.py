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


def check_input_dtype(owner: str, x: torch.Tensor, module: torch.nn.Module, what: str = "inputs") -> None:
    """8-bit or bool inputs (images, masks), and floating inputs of another dtype than ``module``'s
    parameters, are one error naming the fix (integer token ids pass)."""
    if x.dtype in (torch.uint8, torch.int8, torch.bool):
        raise ValueError(f"{owner}: the {what} have dtype {x.dtype} but the network computes in floating point: "
                         f"convert them in the DataModule (e.g. x.float() / 255 for 8-bit images).")
    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    if param is not None and x.is_floating_point() and x.dtype != param.dtype:
        raise ValueError(f"{owner}: the {what} are {x.dtype} but the network's parameters are {param.dtype}: cast the "
                         f"data to {param.dtype} in the DataModule, or the learner to {x.dtype} "
                         f"(module.to({x.dtype})).")


__all__ = ["check_input_dtype", "check_int", "check_learning_rates", "check_real"]
