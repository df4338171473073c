"""The manual outer step shared by every learner (MetaLearner, DecisionLearner, MultiTaskModule).

Every tasklight learner uses manual optimisation: it computes one scalar objective whose gradient is
the outer gradient (a meta-gradient, a hypergradient, a weighted multi-task gradient) and hands it
to :func:`outer_step`, which does the rest in one place:

1. zero the gradients (``set_to_none``) and make ONE ``manual_backward`` (under DDP: one gradient
   all-reduce; every rank takes part, even one whose loss is non-finite, so that all ranks see the
   same non-finite gradient and take the same decision);
2. the non-finite policy: a non-finite loss reported by the learner, a non-finite gradient, or a
   finite gradient whose square overflows its dtype (Adam's second moment would become ``inf`` and
   freeze those parameters for good) either raises ``FloatingPointError`` (``nonfinite="raise"``) or
   skips the step (``nonfinite="skip"``: parameters, optimiser and scheduler untouched, counted in
   ``train/skipped_steps``). More than ``max_consecutive_skips`` skips in a row raise: a run whose
   every step is non-finite stops instead of looping forever (a skipped step does not advance
   ``global_step``);
3. gradient clipping of the global norm (``clip_grad_norm``);
4. the optimiser step, then a check that parameters and optimiser state are finite (an optimiser
   step cannot be undone, so a non-finite state always raises);
5. the scheduler step: schedulers are stepped once per optimiser step (never per epoch), the one
   interval of every learner.

The shared settings have one name and one default in every learner: ``optimizer`` (default
:func:`default_optimizer`, Adam with lr 1e-3), ``lr_scheduler`` (default none), ``clip_grad_norm``
(default none), ``nonfinite`` (default ``"raise"``) and ``max_consecutive_skips`` (default 10).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Literal, Mapping, Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from tasklight.core.checks import check_learning_rates

NonFinite = Literal["raise", "skip"]
NONFINITE_POLICIES = ("raise", "skip")
DEFAULT_MAX_CONSECUTIVE_SKIPS = 10


def default_optimizer(params) -> torch.optim.Optimizer:
    """The default outer optimiser of every learner: Adam with lr 1e-3."""
    return torch.optim.Adam(params, lr=1e-3)


def check_outer_settings(clip_grad_norm: Optional[float], nonfinite: str, max_consecutive_skips: int) -> None:
    """One clear error per bad shared setting."""
    if clip_grad_norm is not None and not (isinstance(clip_grad_norm, (int, float)) and clip_grad_norm > 0
                                           and math.isfinite(clip_grad_norm)):
        raise ValueError(f"clip_grad_norm must be a finite number > 0 (the largest allowed gradient norm) or "
                         f"None for no clipping, got {clip_grad_norm!r}")
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {list(NONFINITE_POLICIES)}, got {nonfinite!r}")
    if not isinstance(max_consecutive_skips, int) or isinstance(max_consecutive_skips, bool) \
            or max_consecutive_skips < 0:
        raise ValueError(f"max_consecutive_skips must be an integer >= 0 (how many non-finite steps in a row "
                         f"nonfinite='skip' tolerates before raising), got {max_consecutive_skips!r}")


def setup_outer_step(module, clip_grad_norm: Optional[float] = None, nonfinite: NonFinite = "raise",
                     max_consecutive_skips: int = DEFAULT_MAX_CONSECUTIVE_SKIPS) -> None:
    """Validate and store the shared settings on ``module`` and register its skip counters (buffers, so
    they are checkpointed and resumed)."""
    check_outer_settings(clip_grad_norm, nonfinite, max_consecutive_skips)
    module.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
    module.nonfinite = nonfinite
    module.max_consecutive_skips = int(max_consecutive_skips)
    module.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
    module.register_buffer("consecutive_skips", torch.zeros((), dtype=torch.long))


def configure_outer_optimizers(optimizer_factory: Callable, scheduler_factory: Optional[Callable],
                               params: Iterable) -> object:
    """``configure_optimizers`` of every learner: one optimiser, an optional scheduler stepped per step."""
    try:
        opt = optimizer_factory(params)
    except ValueError as err:  # torch's "Invalid learning rate: -0.1" from inside fit
        if "learning rate" not in str(err):
            raise
        raise ValueError(f"the outer optimiser refused its settings ({err}): the outer learning rate must be a finite "
                         f"number > 0; set the optimizer's lr, e.g. --model.init_args.optimizer.init_args.lr 0.001"
                         ) from None
    check_learning_rates(opt)
    if scheduler_factory is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler_factory(opt), "interval": "step"}}


def _grads_overflow(params: list[Tensor]) -> bool:
    """True if any gradient is non-finite or its elementwise square overflows its dtype."""
    checks = [torch.isfinite(p.grad.square()).all() for p in params if p.grad is not None]
    return bool(checks) and not bool(torch.stack(checks).all())


def _float_leaves(tree, prefix: str, out: list) -> list:
    if isinstance(tree, Tensor):
        if tree.is_floating_point():
            out.append((prefix or "tensor", tree))
    elif isinstance(tree, Mapping):
        for k, v in tree.items():
            _float_leaves(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            _float_leaves(v, f"{prefix}[{i}]", out)
    return out


def first_nonfinite(named: list[tuple[str, Tensor]]) -> Optional[str]:
    """The name of the first tensor with a non-finite entry (one device sync when all are finite)."""
    if not named:
        return None
    flags = torch.stack([torch.isfinite(t).all().to(named[0][1].device) for _, t in named])
    if bool(flags.all()):
        return None
    return next(name for (name, _), ok in zip(named, flags.tolist()) if not ok)


def nonfinite_optimizer_state(optimizer: torch.optim.Optimizer) -> Optional[str]:
    """The name of the first non-finite entry of the optimiser's state (e.g. ``state[3].exp_avg_sq``)."""
    opt = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch one
    named: list = []
    for i, state in enumerate(opt.state.values()):
        _float_leaves(state, f"state[{i}]", named)
    return first_nonfinite(named)


def outer_step(module, objective: Tensor, problem: Optional[str] = None,
               params: Optional[list[Tensor]] = None,
               after_backward: Optional[Callable[[], None]] = None, what: str = "outer gradient") -> bool:
    """One manual outer step of ``module`` on ``objective`` (see the module docstring).

    Args:
        module: a LightningModule with ``automatic_optimization = False`` set up by
            :func:`setup_outer_step`.
        objective: the scalar whose gradient is the outer gradient.
        problem: a description of a non-finite loss the learner found before the backward
            (e.g. ``"non-finite inner loss at task 2, inner step 0"``), or None.
        params: the parameters to check (default: all of the module's).
        after_backward: called right after the backward (e.g. to drop gradients of idle parameters).
        what: how errors name the gradient (``"meta-gradient"``, ``"metric gradient"``...).

    Returns True if the optimiser stepped, False if the step was skipped.
    """
    opt = module.optimizers()
    if isinstance(opt, list):
        raise RuntimeError(f"{type(module).__name__} must configure exactly one optimiser, got {len(opt)}")
    params = list(module.parameters()) if params is None else list(params)
    step = int(module.global_step)
    opt.zero_grad(set_to_none=True)
    module.manual_backward(objective)
    if after_backward is not None:
        after_backward()
    bad_grad = _grads_overflow(params)
    bad = bool(problem) or bad_grad
    trainer = getattr(module, "_trainer", None)
    if trainer is not None and trainer.world_size > 1:
        # the decision is the same on every rank (a rank with a non-finite loss makes all skip or raise)
        flag = torch.tensor(float(bad), device=objective.device)
        bad = float(trainer.strategy.reduce(flag, reduce_op="sum")) > 0
    if bad:
        if problem:
            reason = problem
        elif bad_grad:
            reason = f"non-finite {what} (a gradient entry is inf/nan, or so large that its square overflows)"
        else:
            reason = f"non-finite loss or {what} on another process"
        if module.nonfinite == "raise":
            raise FloatingPointError(
                f"{reason} at step {step}: lower the learning rates (inner_lr, the optimizer's lr), set "
                f"clip_grad_norm, or pass nonfinite='skip' to skip such steps.")
        opt.zero_grad(set_to_none=True)
        module.skipped_steps = module.skipped_steps + 1  # out of place (see tasklight.metrics.unshare_state)
        module.consecutive_skips = module.consecutive_skips + 1
        n = int(module.consecutive_skips)
        if n > module.max_consecutive_skips:
            raise FloatingPointError(
                f"{n} steps in a row were non-finite and skipped (max_consecutive_skips="
                f"{module.max_consecutive_skips}); the last: {reason} at step {step}. Training is not making "
                f"progress: lower the learning rates (inner_lr, the optimizer's lr) or set clip_grad_norm.")
        rank_zero_warn(f"nonfinite='skip': skipped step {step} ({reason}); {n} in a row, "
                       f"{int(module.skipped_steps)} in all.", category=RuntimeWarning)
        module.log("train/skipped_steps", module.skipped_steps.float(), prog_bar=True)
        return False
    module.consecutive_skips = torch.zeros_like(module.consecutive_skips)
    if module.clip_grad_norm is not None:
        module.clip_gradients(opt, gradient_clip_val=module.clip_grad_norm, gradient_clip_algorithm="norm")
    opt.step()
    bad_state = nonfinite_optimizer_state(opt)
    bad_state = f"the optimiser's {bad_state}" if bad_state else None
    if bad_state is None:
        bad_state = first_nonfinite([(f"parameter {i}", p.detach()) for i, p in enumerate(params)])
    if bad_state is not None:
        raise FloatingPointError(
            f"the optimiser step at step {step} left non-finite values in {bad_state}: the "
            f"affected parameters would stop training while the run continues. Lower the optimizer's lr or "
            f"set clip_grad_norm.")
    sch = module.lr_schedulers()
    if sch is not None:
        if isinstance(sch, list):
            raise RuntimeError(f"{type(module).__name__} must configure at most one scheduler, got {len(sch)}")
        sch.step()
    return True


def check_finite_metrics(metrics: Mapping[str, object], where: str = "evaluation") -> None:
    """Raise ``FloatingPointError`` naming every non-finite metric (a NaN test metric is an error)."""
    bad = []
    for name, value in metrics.items():
        v = float(value.detach().float().mean()) if isinstance(value, Tensor) and value.numel() else value
        if isinstance(v, (int, float)) and not math.isfinite(v):
            bad.append(f"{name}={v}")
    if bad:
        raise FloatingPointError(
            f"{where} produced non-finite metrics: {', '.join(bad)}. The model's outputs are not finite on "
            f"these inputs (diverged parameters, or non-finite data): check train/skipped_steps, lower the "
            f"learning rates or set clip_grad_norm.")
