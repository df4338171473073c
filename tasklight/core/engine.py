"""The execution engine of the core: how the inner loops of a meta-batch are run.

Every learner asks the core for the same thing -- adapt each task of a meta-batch from shared
parameters and return query outputs/losses, or the meta-objective whose gradient is the
meta-gradient -- and the engine decides *how*. The strategies all compute the same numbers (to
float64 precision; ``tests/core/test_engine.py`` checks each against an explicit per-task
autograd loop with native ``nn.BatchNorm2d``):

``"vmap"``
    ``torch.func.vmap`` of a ``torch.func.grad`` inner loop over the tasks (any module, any loss).
    ``vmap`` over ``torch.func.grad`` of the native ``batch_norm`` gives wrong second-order
    gradients, so on this path the learners' networks use the elementary-op BatchNorm of
    :mod:`tasklight.nn.nets` (``make_vmap_safe``); this is the only place that needs it.
``"stacked"``
    A task-stacked forward for networks made of supported layers (:func:`stack_plan`: Linear,
    Conv2d, BatchNorm1d/2d, LayerNorm, elementwise activations, MaxPool2d, Flatten, Sequential,
    ``MLP``, ``Conv4``). Parameters carry a leading task dimension; images keep the grouped layout
    ``[N, T*C, H, W]`` end to end: one ``conv2d(groups=T)`` with weights ``[T*Cout, Cin, k, k]``,
    the **native** ``F.batch_norm`` over the ``T*C`` channels (in training mode that is exactly the
    per-task, per-channel batch statistic), native ReLU / max-pool on contiguous tensors, and a
    ``baddbmm`` head. Inner gradients are plain ``torch.autograd.grad`` of the *sum* of the task
    losses with respect to the stacked parameters: task t's loss depends on slice t only, so that
    is every task's own gradient, exactly; with ``create_graph`` the meta-gradient is exact second
    order, native BatchNorm's double backward included (no vmap involved).
``"loop"``
    Tasks in chunks of ``chunk_size`` (default 1: a per-task loop), each chunk run by ``stacked``
    when the net supports it, else by ``vmap``.
``"compiled"``
    The explicit meta-gradient (``torch.func.grad`` of the mean query loss of the vmapped inner
    loop) under ``torch.compile``; it is handed to the learner as a surrogate objective
    (:func:`surrogate_objective`) so ``manual_backward`` runs once (DDP all-reduces once). The
    compile cache goes to ``compile_cache_dir`` (``TORCHINDUCTOR_CACHE_DIR``); compile time is
    logged. For nets without running statistics.
``"auto"``
    ``stacked`` when the net supports it, else ``vmap`` -- except a convolutional net on the CPU,
    which gets ``loop``: there per-task convolutions are as fast as grouped ones, and the stacked
    layout's large tensors cost page faults (glibc hands them back to the system on every free;
    ``BENCHMARKS.md``). Never ``compiled`` (a compile costs from half a minute to minutes per batch
    shape, which only long runs of a fixed shape repay: ask for it). The choice and its reason are
    logged once, at INFO level, on the ``tasklight`` logger.

For MLPs (Linear, ReLU / Tanh / Identity) under an MSE loss with (Meta-)SGD inner steps,
``stacked`` and ``compiled`` compute the meta-gradient written out, with no autograd graph
(:mod:`tasklight.core.mlp_explicit`); ``compiled`` then compiles that function (about 40 s for
the sinusoid setting) instead of autograd's.

``chunk_size`` (tasks per chunk) works with every strategy but ``compiled``: with a meta-gradient
to take, each chunk's meta-gradient is computed and its graph freed before the next chunk, the
gradients are accumulated, and the learner receives a surrogate whose gradient is their sum --
memory is bounded by one chunk's graph, and there is still one backward.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasklight.core.update_rules import SGD

log = logging.getLogger("tasklight")

Strategy = Literal["auto", "vmap", "stacked", "loop", "compiled"]
STRATEGIES = ("auto", "vmap", "stacked", "loop", "compiled")


def check_engine_settings(strategy: str, chunk_size: Optional[int], compile_cache_dir: Optional[str] = None) -> None:
    """One clear error per bad engine setting."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an integer >= 1 (tasks per chunk; 1 is a per-task loop) or None "
                         f"(all tasks at once), got {chunk_size!r}")
    if chunk_size is not None and strategy == "compiled":
        raise ValueError("chunk_size does not apply to strategy='compiled' (it compiles the whole meta-batch): "
                         "set chunk_size=None, or use strategy='stacked'/'vmap'/'loop' with chunk_size")
    if compile_cache_dir is not None and not isinstance(compile_cache_dir, (str, os.PathLike)):
        raise ValueError(f"compile_cache_dir must be a directory path or None, got {compile_cache_dir!r}")


def surrogate_objective(tensors: Sequence[Tensor], grads: Sequence[Optional[Tensor]]) -> Tensor:
    """A scalar whose gradient with respect to each of ``tensors`` is the matching entry of ``grads``.

    ``sum_i <p_i, g_i.detach()>``: a learner that computed its (meta-/hyper-)gradient some other way
    (implicitly, chunk by chunk, compiled) hands it to ``manual_backward`` through this, so the
    gradient goes through one backward, i.e. one all-reduce under DDP. ``None`` entries are skipped.
    """
    terms = [(p * g.detach()).sum() for p, g in zip(tensors, grads) if g is not None]
    if not terms:
        ref = next(iter(tensors), None)
        return ref.new_zeros(()) * ref.sum() if ref is not None else torch.zeros(())
    return torch.stack(terms).sum()


# ===================================================================== the stacked layout
_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.Softplus, nn.Identity,
                nn.Hardtanh, nn.Mish)


class UnsupportedForStacking(ValueError):
    """The network has a layer the stacked strategy does not implement."""


@dataclass
class _Op:
    kind: str  # linear | conv | bn | ln | act | pool | flatten
    prefix: str  # parameter-name prefix ("features.0.0.")
    module: nn.Module


@dataclass
class StackPlan:
    """The layers of a network in order, as the stacked forward runs them."""

    ops: list[_Op] = field(default_factory=list)


def stack_plan(model: nn.Module) -> StackPlan:
    """The stacked forward's plan of ``model``, or :class:`UnsupportedForStacking` naming the layer.

    Supported: ``nn.Sequential`` of Linear, Conv2d (``groups=1``, zero padding), BatchNorm1d/2d,
    LayerNorm (over the last dim), elementwise activations, MaxPool2d, Flatten (``start_dim=1``,
    ``end_dim=-1``), nested Sequentials, and tasklight's ``MLP`` and ``Conv4``.
    """
    from tasklight.nn.nets import MLP, Conv4

    plan = StackPlan()

    def walk(m: nn.Module, prefix: str) -> None:
        if type(m) is nn.Sequential:
            for name, child in m.named_children():
                walk(child, f"{prefix}{name}.")
        elif isinstance(m, MLP) and type(m).forward is MLP.forward:
            walk(m.net, f"{prefix}net.")
        elif isinstance(m, Conv4) and type(m).forward is Conv4.forward and type(m).embed is Conv4.embed:
            walk(m.features, f"{prefix}features.")
            plan.ops.append(_Op("flatten", prefix, nn.Flatten()))
            if m.head is not None:
                walk(m.head, f"{prefix}head.")
        elif type(m) is nn.Linear:
            plan.ops.append(_Op("linear", prefix, m))
        elif type(m) is nn.Conv2d:
            if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise UnsupportedForStacking(f"layer {prefix[:-1] or type(m).__name__}: Conv2d with groups="
                                             f"{m.groups}, padding={m.padding!r}, padding_mode={m.padding_mode!r} "
                                             f"(the stacked strategy needs groups=1, numeric zero padding)")
            plan.ops.append(_Op("conv", prefix, m))
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            plan.ops.append(_Op("bn", prefix, m))
        elif type(m) is nn.LayerNorm:
            if len(m.normalized_shape) != 1:
                raise UnsupportedForStacking(f"layer {prefix[:-1]}: LayerNorm over {tuple(m.normalized_shape)} "
                                             f"(the stacked strategy normalises the last dim only)")
            plan.ops.append(_Op("ln", prefix, m))
        elif type(m) in _ELEMENTWISE:
            plan.ops.append(_Op("act", prefix, m))
        elif type(m) is nn.MaxPool2d:
            plan.ops.append(_Op("pool", prefix, m))
        elif type(m) is nn.Flatten:
            if m.start_dim != 1 or m.end_dim != -1:
                raise UnsupportedForStacking(f"layer {prefix[:-1]}: Flatten({m.start_dim}, {m.end_dim}) (the stacked "
                                             f"strategy supports Flatten(1, -1))")
            plan.ops.append(_Op("flatten", prefix, m))
        else:
            where = prefix[:-1] or "the network"
            raise UnsupportedForStacking(
                f"{where} is a {type(m).__name__}, which the stacked strategy does not implement (it runs "
                f"Sequential stacks of Linear, Conv2d, BatchNorm1d/2d, LayerNorm, elementwise activations, "
                f"MaxPool2d and Flatten, and tasklight's MLP and Conv4): use strategy='vmap' (any module) or "
                f"'auto' (picks vmap for this net)")

    walk(model, "")
    if SWAP_RELU_POOL:
        ops = plan.ops
        for i in range(len(ops) - 1):
            if ops[i].kind == "act" and type(ops[i].module) is nn.ReLU and ops[i + 1].kind == "pool":
                ops[i], ops[i + 1] = ops[i + 1], ops[i]
    return plan


#: run ReLU after (not before) a following max-pool, on a tensor k^2 times smaller: max-pool commutes
#: with a non-decreasing function, and the gradients agree (a window whose maximum is <= 0 gets zero
#: gradient either way; a positive maximum routes it to the same element)
SWAP_RELU_POOL = True


def _to_grouped(x: Tensor) -> Tensor:
    """``[T, N, C, H, W]`` -> ``[N, T*C, H, W]`` (contiguous)."""
    T, N = x.shape[:2]
    return x.transpose(0, 1).reshape(N, T * x.shape[2], *x.shape[3:])


def _to_batched(x: Tensor, T: int) -> Tensor:
    """``[N, T*C, ...]`` -> ``[T, N, C, ...]``."""
    N = x.shape[0]
    return x.reshape(N, T, x.shape[1] // T, *x.shape[2:]).transpose(0, 1)


def stacked_forward(plan: StackPlan, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor,
                    num_tasks: int) -> Tensor:
    """The network applied to ``x [T, N, ...]`` with per-task parameters ``params[name] [T, ...]``.

    ``buffers`` (per task, ``[T, ...]``) are updated in place as each module's own forward would
    (BatchNorm running statistics in training mode). Returns ``[T, N, ...]``.
    """
    T = num_tasks
    grouped = False  # layout of x: False: [T, N, ...]; True: [N, T*C, H, W]
    for op in plan.ops:
        m, pre = op.module, op.prefix
        if op.kind == "linear":
            if grouped:
                x, grouped = _to_batched(x, T), False
            shape = x.shape
            w = params[pre + "weight"]
            xf = x.reshape(T, -1, shape[-1])
            b = params.get(pre + "bias") if m.bias is not None else None
            y = torch.baddbmm(b.unsqueeze(1), xf, w.transpose(1, 2)) if b is not None else torch.bmm(xf, w.transpose(1, 2))
            x = y.reshape(*shape[:-1], w.shape[1])
        elif op.kind == "conv":
            if not grouped:
                x, grouped = _to_grouped(x), True
            w = params[pre + "weight"]
            b = params.get(pre + "bias") if m.bias is not None else None
            x = F.conv2d(x, w.reshape(T * w.shape[1], *w.shape[2:]), None if b is None else b.reshape(-1),
                         m.stride, m.padding, m.dilation, groups=T)
        elif op.kind == "bn":
            to_back = False
            if not grouped:
                if x.dim() != 3:
                    raise UnsupportedForStacking(f"layer {pre[:-1]}: BatchNorm on examples of shape "
                                                 f"{tuple(x.shape[2:])} in the stacked layout")
                x, to_back = x.transpose(0, 1).reshape(x.shape[1], -1), True
            x = _stacked_batch_norm(m, pre, params, buffers, x, T)
            if to_back:
                x = x.reshape(x.shape[0], T, -1).transpose(0, 1)
        elif op.kind == "ln":
            if grouped:
                raise UnsupportedForStacking(f"layer {pre[:-1]}: LayerNorm on image features in the stacked layout")
            x = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
            if m.elementwise_affine:
                bshape = (T,) + (1,) * (x.dim() - 2) + (x.shape[-1],)
                x = x * params[pre + "weight"].reshape(bshape)
                if m.bias is not None:
                    x = x + params[pre + "bias"].reshape(bshape)
        elif op.kind == "act":
            x = m(x)
        elif op.kind == "pool":
            if not grouped:
                x, grouped = _to_grouped(x), True
            x = _max_pool(x, m)
        elif op.kind == "flatten":
            if grouped:
                N = x.shape[0]
                x, grouped = x.reshape(N, T, -1).transpose(0, 1), False
            else:
                x = x.reshape(T, x.shape[1], -1)
    if grouped:
        x = _to_batched(x, T)
    return x


#: a 2x2 stride-2 max-pool as a reshape + amax (see :func:`_max_pool`)
AMAX_POOL = False  # measured slower than F.max_pool2d (forward and double backward) on CPU


def _max_pool(x: Tensor, m: nn.MaxPool2d) -> Tensor:
    """``m``'s max-pool on ``x [N, C, H, W]``.

    A non-overlapping k x k pool (stride k, no padding/dilation, floor mode) is the ``amax`` of a
    reshaped view. Its value is max-pool's; its gradient differs only at exact ties inside a
    window, where max-pool sends the gradient to the first maximum and ``amax`` splits it evenly
    (both are subgradients); after a ReLU the ties are zeros, whose gradient the ReLU discards.
    """
    k = m.kernel_size if isinstance(m.kernel_size, int) else None
    s = m.stride if isinstance(m.stride, int) else None
    if (AMAX_POOL and k is not None and s == k and m.padding in (0, (0, 0)) and m.dilation in (1, (1, 1))
            and not m.ceil_mode and not m.return_indices):
        N, C, H, W = x.shape
        h, w = H // k, W // k
        if H != h * k or W != w * k:
            x = x[:, :, :h * k, :w * k]
        return x.reshape(N, C, h, k, w, k).amax(dim=(3, 5))
    return F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)


def _stacked_batch_norm(m: nn.Module, pre: str, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
                        x: Tensor, T: int) -> Tensor:
    """Native ``F.batch_norm`` on ``x [N, T*C, ...]``: per task, per channel statistics."""
    rm, rv = buffers.get(pre + "running_mean"), buffers.get(pre + "running_var")
    tracking = m.running_mean is not None and rm is not None
    use_batch = m.training or not tracking
    momentum = 0.0
    if m.training and tracking:
        nbt = buffers.get(pre + "num_batches_tracked")
        if nbt is not None:
            nbt.add_(1)
        momentum = m.momentum if m.momentum is not None else 1.0 / float(nbt.reshape(-1)[0])
    w = params.get(pre + "weight") if m.affine else None
    b = params.get(pre + "bias") if m.affine else None
    # views of the per-task buffers: F.batch_norm's in-place running-statistics update lands in them
    rm_flat = rm.view(-1) if tracking else None
    rv_flat = rv.view(-1) if tracking else None
    return F.batch_norm(x, rm_flat, rv_flat, None if w is None else w.reshape(-1), None if b is None else b.reshape(-1),
                        training=use_batch, momentum=momentum, eps=m.eps)


def per_task_loss(loss_fn: Callable[[Tensor, Tensor], Tensor], out: Tensor, y: Tensor) -> Tensor:
    """``[loss_fn(out[t], y[t]) for t]`` as one ``[T]`` tensor (fast paths for mean MSE / cross-entropy)."""
    from tasklight.nn.losses import TargetChecked, align_target

    base = loss_fn.loss if isinstance(loss_fn, TargetChecked) else loss_fn
    T = out.shape[0]
    if type(base) is nn.MSELoss and base.reduction == "mean":
        y = align_target(out, y, base, getattr(loss_fn, "what", "the network"))
        return (out - y).pow(2).reshape(T, -1).mean(1)
    if (type(base) is nn.CrossEntropyLoss and base.reduction == "mean" and base.weight is None
            and out.dim() == 3 and y.dim() == 2 and not y.is_floating_point()):
        if tuple(y.shape) != tuple(out.shape[:2]):
            align_target(out[0], y[0], base, getattr(loss_fn, "what", "the network"))  # raises the clear error
        if bool((y == base.ignore_index).any()):
            return torch.vmap(loss_fn)(out, y)
        ce = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none",
                             label_smoothing=base.label_smoothing)
        return ce.view(T, -1).mean(1)
    return torch.vmap(loss_fn)(out, y)


#: write the inner gradient of MSE MLPs out by hand in the stacked strategy (False: torch.autograd.grad)
MANUAL_MLP_GRADS = True
#: and, for (Meta-)SGD inner loops, the whole second-order meta-gradient (:mod:`tasklight.core.mlp_explicit`)
EXPLICIT_MLP_META_GRAD = True


def manual_mlp_ok(plan: StackPlan, loss_fn) -> bool:
    """Whether the gradient can be written out by hand: Linear layers and ReLU / Tanh / Identity
    under a mean-squared-error loss (:mod:`tasklight.core.mlp_explicit`)."""
    from tasklight.core.mlp_explicit import is_mlp
    from tasklight.nn.losses import TargetChecked

    base = loss_fn.loss if isinstance(loss_fn, TargetChecked) else loss_fn
    return type(base) is nn.MSELoss and base.reduction == "mean" and is_mlp(plan)


def stacked_adapt_tasks(core, plan: StackPlan, params, buffers, support_x, support_y, query_x=None, query_y=None, *,
                        steps: int, lr=None, first_order: bool = False, proximal: float = 0.0, anchor=None,
                        update=None, task_params=None, buffers_per_task: bool = False):
    """The stacked strategy's ``adapt_tasks`` (same contract as ``FunctionalLearner.adapt_tasks``)."""
    from tasklight.core.functional import AdaptResult

    T = support_x.shape[0]
    rule = update if update is not None else SGD(lr)
    if proximal and anchor is None:
        anchor = {k: v.detach() for k, v in params.items()}
    P = {}
    task_params = task_params or {}
    names = [k for k in {**params, **task_params} if core.is_adapted(k)]
    for k, v in {**params, **task_params}.items():
        p = task_params[k] if k in task_params else v.unsqueeze(0).expand(T, *v.shape)
        if k in names and not p.requires_grad:
            p = p.detach().requires_grad_()  # evaluation: the inner gradient still needs a graph to it
        P[k] = p
    if buffers_per_task:
        bufs = {k: v.detach().clone() for k, v in buffers.items()}
    else:
        bufs = {k: v.detach().unsqueeze(0).expand(T, *v.shape).clone() for k, v in buffers.items()}
    state = rule.init({k: P[k] for k in names})
    losses = []
    manual = MANUAL_MLP_GRADS and manual_mlp_ok(plan, core.inner_loss_fn)
    if manual:
        from tasklight.core.mlp_explicit import mlp_loss_and_grads
    for _ in range(steps):
        if manual:
            task, grads = mlp_loss_and_grads(plan.ops, P, support_x, support_y, core.inner_loss_fn, set(names))
            if proximal:
                grads = {k: g + proximal * (P[k] - anchor[k]) for k, g in grads.items()}
            if first_order:
                grads = {k: g.detach() for k, g in grads.items()}
            losses.append(task.detach())
            new, state = rule.step({k: P[k] for k in names}, grads, state)
            P = {**P, **new}
            continue
        out = stacked_forward(plan, P, bufs, support_x, T)
        task = per_task_loss(core.inner_loss_fn, out, support_y)
        total = task.sum()
        if proximal:
            total = total + 0.5 * proximal * sum(((P[k] - anchor[k]) ** 2).sum() for k in names)
        g = torch.autograd.grad(total, [P[k] for k in names], create_graph=not first_order)
        losses.append(task.detach())
        grads = dict(zip(names, g))
        new, state = rule.step({k: P[k] for k in names}, grads, state)
        P = {**P, **new}
    inner = torch.stack(losses, 1) if losses else support_x.new_zeros(T, 0)
    out = loss = None
    if query_x is not None:
        out = stacked_forward(plan, P, bufs, query_x, T)
        if query_y is not None:
            loss = per_task_loss(core.loss_fn, out, query_y)
    return AdaptResult(P, bufs, inner), out, loss


# ===================================================================== the engine
class Engine:
    """Runs ``adapt_tasks`` / the meta-objective of one :class:`FunctionalLearner` by a strategy."""

    def __init__(self, core, strategy: str = "auto", chunk_size: Optional[int] = None,
                 compile_cache_dir: Optional[str] = None) -> None:
        check_engine_settings(strategy, chunk_size, compile_cache_dir)
        self.core, self.strategy, self.chunk_size = core, strategy, chunk_size
        self.compile_cache_dir = None if compile_cache_dir is None else str(compile_cache_dir)
        self.compile_backend = "inductor"
        self._plan: Optional[StackPlan] = None
        self._plan_error: Optional[str] = None
        self._resolved: Optional[str] = None
        self._compiled: dict = {}
        self.compile_seconds: dict = {}
        self._check_plan()

    # ----------------------------------------------------------------- choice
    def _check_plan(self) -> None:
        try:
            self._plan = stack_plan(self.core.model)
        except UnsupportedForStacking as err:
            self._plan, self._plan_error = None, str(err)
        if self.strategy == "stacked" and self._plan is None:
            raise ValueError(f"strategy='stacked': {self._plan_error}")

    @property
    def resolved(self) -> str:
        """The strategy that runs (``auto`` resolved), logged once with its reason."""
        if self._resolved is None:
            if self.strategy == "auto":
                device = next((p.device for p in self.core.model.parameters()), torch.device("cpu"))
                convs = self._plan is not None and any(op.kind == "conv" for op in self._plan.ops)
                if convs and device.type == "cpu":
                    why = ("a convolutional network on the CPU: per-task convolutions are as fast as grouped ones "
                           "there, and the per-task tensors stay small (the task-stacked ones are large enough that "
                           "the allocator returns them to the system and page-faults them back on every step; "
                           "BENCHMARKS.md, meta-step time)")
                    self._resolved = "loop"
                elif self._plan is not None:
                    from tasklight.core.mlp_explicit import is_mlp

                    why = ("the network is made of layers the task-stacked layout implements (grouped convolutions, "
                           "native BatchNorm, bmm heads)")
                    if is_mlp(self._plan):
                        why += ("; an MLP: under an MSE loss and (Meta-)SGD inner steps its meta-gradient is written "
                                "out, with no autograd graph")
                    self._resolved = "stacked"
                else:
                    why = f"the task-stacked layout does not apply ({self._plan_error.split(':')[0]})"
                    self._resolved = "vmap"
                if self.chunk_size is not None:
                    why += f"; chunks of {self.chunk_size} tasks"
                log.info("tasklight engine: strategy auto -> %s: %s; 'compiled' is opt-in (a compile costs minutes "
                         "per batch shape).", self._resolved, why)
            else:
                self._resolved = self.strategy
        return self._resolved

    def _executor(self) -> str:
        s = self.resolved
        if s == "loop":
            return "stacked" if self._plan is not None else "vmap"
        return s

    def _chunk(self, T: int) -> int:
        if self.chunk_size is not None:
            return min(self.chunk_size, T)
        return 1 if self.resolved == "loop" else T

    # ----------------------------------------------------------------- running
    def _run(self, executor: str, params, buffers, sx, sy, qx, qy, **kw):
        if executor == "stacked":
            return stacked_adapt_tasks(self.core, self._plan, params, buffers, sx, sy, qx, qy, **kw)
        return self.core._vmap_adapt_tasks(params, buffers, sx, sy, qx, qy, **kw)

    @staticmethod
    def _chunk_args(buffers, kw, sl):
        """The per-task inputs of tasks ``sl``: buffers (when per task) and ``task_params``."""
        if kw.get("buffers_per_task"):
            buffers = {k: v[sl] for k, v in buffers.items()}
        if kw.get("task_params"):
            kw = {**kw, "task_params": {k: v[sl] for k, v in kw["task_params"].items()}}
        return buffers, kw

    def adapt_tasks(self, params, buffers, sx, sy, qx=None, qy=None, **kw):
        """``FunctionalLearner.adapt_tasks`` by the strategy; chunks are concatenated (graphs kept)."""
        from tasklight.core.functional import AdaptResult

        executor = self._executor()
        if executor == "compiled":
            executor = "vmap"  # the compiled path is the meta-gradient; plain adaptation runs uncompiled
        T = sx.shape[0]
        c = self._chunk(T)
        if c >= T:
            return self._run(executor, params, buffers, sx, sy, qx, qy, **kw)
        parts = []
        for s in range(0, T, c):
            sl = slice(s, s + c)
            cur, ckw = self._chunk_args(buffers, kw, sl)
            parts.append(self._run(executor, params, cur, sx[sl], sy[sl], None if qx is None else qx[sl],
                                   None if qy is None else qy[sl], **ckw))
        res = AdaptResult({k: torch.cat([p[0].params[k] for p in parts]) for k in parts[0][0].params},
                          {k: torch.cat([p[0].buffers[k] for p in parts]) for k in parts[0][0].buffers},
                          torch.cat([p[0].inner_losses for p in parts]))
        out = None if qx is None else torch.cat([p[1] for p in parts])
        loss = None if qy is None else torch.cat([p[2] for p in parts])
        return res, out, loss

    def meta_objective(self, params, buffers, sx, sy, qx, qy, *, outer: Optional[Sequence[Tensor]] = None, **kw):
        """The mean query loss over tasks as an objective whose gradient is the meta-gradient.

        Returns ``(objective, query_losses [T], inner_losses [T, steps], task_buffers)``. Unchunked
        (and not compiled), the objective is the mean query loss itself; chunked or compiled it is
        a :func:`surrogate_objective` of the meta-gradient with respect to ``outer`` (default: the
        tensors of ``params`` and of a learnable ``lr`` that require grad).
        """
        T = sx.shape[0]
        explicit_default = outer is None
        if outer is None:
            outer = [v for v in params.values() if v.requires_grad]
            lr = kw.get("lr")
            lrs = lr.values() if isinstance(lr, Mapping) else [lr]
            outer += [v for v in lrs if isinstance(v, Tensor) and v.requires_grad]
        executor = self._executor()
        explicit = False
        if executor in ("stacked", "compiled") and explicit_default and EXPLICIT_MLP_META_GRAD:
            from tasklight.core.mlp_explicit import explicit_ok

            explicit = explicit_ok(self._plan, self.core, buffers, kw)
        if explicit:
            return self._explicit_objective(params, sx, sy, qx, qy, compiled=executor == "compiled", **kw)
        if executor == "compiled":
            return self._compiled_objective(params, buffers, sx, sy, qx, qy, outer, **kw)

        def chunk(sl: slice):
            cur, ckw = self._chunk_args(buffers, kw, sl)
            res, _, ql = self._run(executor, params, cur, sx[sl], sy[sl], qx[sl], qy[sl], **ckw)
            return ql.sum(), (ql, res.inner_losses, res.buffers)

        objective, parts = self.chunked_objective(T, chunk, outer)
        qls, inners, bufs = zip(*parts)
        buffers_out = {k: torch.cat([b[k] for b in bufs]) for k in bufs[0]}
        return objective, torch.cat(qls), torch.cat(inners), buffers_out

    def chunked_objective(self, num_tasks: int, chunk_fn: Callable[[slice], tuple[Tensor, Any]],
                          outer: Sequence[Tensor]) -> tuple[Tensor, list]:
        """``sum_chunks chunk_fn(tasks)[0] / num_tasks`` as an objective for one backward.

        ``chunk_fn(slice)`` returns the *sum over those tasks* of their objectives and anything
        else (``aux``). With one chunk, the objective is returned as is; with several, each chunk's
        gradient with respect to ``outer`` is taken and its graph freed before the next chunk, and
        the result is :func:`surrogate_objective` of the accumulated gradient. Returns the
        objective and the list of the chunks' ``aux`` (detached when chunked).
        """
        T = num_tasks
        c = self._chunk(T)
        if c >= T or not outer or not torch.is_grad_enabled():
            part, aux = chunk_fn(slice(0, T))
            return part / T, [aux]
        acc: list[Optional[Tensor]] = [None] * len(outer)
        auxes = []
        for s in range(0, T, c):
            part, aux = chunk_fn(slice(s, s + c))
            grads = torch.autograd.grad(part / T, outer, allow_unused=True)
            acc = [a if g is None else (g if a is None else a + g) for a, g in zip(acc, grads)]
            auxes.append(torch.utils._pytree.tree_map(lambda v: v.detach() if isinstance(v, Tensor) else v, aux))
            del part, aux, grads  # this chunk's graph is freed before the next chunk runs
        return surrogate_objective(outer, acc), auxes

    # ----------------------------------------------------------------- explicit (MLPs)
    def _explicit_objective(self, params, sx, sy, qx, qy, compiled: bool = False, **kw):
        """The stacked MLP's written-out meta-gradient (:mod:`tasklight.core.mlp_explicit`), chunk by
        chunk (or, ``compiled``, the whole meta-batch under ``torch.compile``), as a
        :func:`surrogate_objective`."""
        from tasklight.core.mlp_explicit import explicit_meta_gradient

        update, lr = kw.pop("update", None), kw.pop("lr", None)
        if update is not None:
            lr = update.lr
        T = sx.shape[0]
        if compiled:
            key, fn = self._compiled_explicit(params, lr, kw)
            rates = {k: v.detach() for k, v in lr.items()} if isinstance(lr, Mapping) else \
                (lr.detach() if isinstance(lr, Tensor) else None)
            t0 = time.perf_counter()
            acc, lr_acc, ql, inner = fn({k: v.detach() for k, v in params.items()}, rates, sx, sy, qx, qy)
            self._log_compile(t0, sx, qx, key)
            qls, inners = [ql], [inner]
        else:
            c = self._chunk(T)
            acc, lr_acc = {}, {}
            qls, inners = [], []
            for s in range(0, T, c):
                sl = slice(s, s + c)
                g, lg, ql, inner = explicit_meta_gradient(self._plan, self.core, params, sx[sl], sy[sl], qx[sl],
                                                          qy[sl], lr=lr, num_tasks=T, **kw)
                for store, part in ((acc, g), (lr_acc, lg)):
                    for k, v in part.items():
                        store[k] = v if k not in store else store[k] + v
                qls.append(ql)
                inners.append(inner)
        pairs = [(params[k], acc[k]) for k in params if params[k].requires_grad]
        for k, g in lr_acc.items():
            rate = lr[k] if isinstance(lr, Mapping) else lr
            if rate.requires_grad:
                pairs.append((rate, g))  # one shared rate tensor: the sum of every parameter's share
        obj = surrogate_objective([t for t, _ in pairs], [g for _, g in pairs])
        return obj, torch.cat(qls), torch.cat(inners), {}

    def _compiled_explicit(self, params, lr, kw):
        """``explicit_meta_gradient`` under ``torch.compile``, one compiled function per setting."""
        from tasklight.core.mlp_explicit import explicit_meta_gradient

        form = ("dict", tuple(lr)) if isinstance(lr, Mapping) else ("tensor",) if isinstance(lr, Tensor) else \
            ("number", float(lr))
        steps, first_order = int(kw["steps"]), bool(kw.get("first_order", False))
        key = ("explicit", tuple(params), form, steps, first_order, self.compile_backend)
        fn = self._compiled.get(key)
        if fn is None:
            plan, core = self._plan, self.core
            fixed = None if form[0] != "number" else form[1]

            def meta_grad(p, rates, x1, y1, x2, y2):
                return explicit_meta_gradient(plan, core, p, x1, y1, x2, y2, steps=steps,
                                              lr=fixed if rates is None else rates, first_order=first_order)

            self._set_compile_cache()
            fn = torch.compile(meta_grad, backend=self.compile_backend, dynamic=False) \
                if self.compile_backend != "eager" else meta_grad
            self._compiled[key] = fn
        return key, fn

    def _set_compile_cache(self) -> None:
        if self.compile_cache_dir is not None:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = self.compile_cache_dir

    def _log_compile(self, t0: float, sx: Tensor, qx: Tensor, key=None) -> None:
        """Record and log the first call's time for each shape: the compile time."""
        shape_key = (key, tuple(sx.shape), tuple(qx.shape), sx.dtype)
        if shape_key not in self.compile_seconds:
            self.compile_seconds[shape_key] = time.perf_counter() - t0
            log.info("tasklight engine: compiled the meta-gradient (backend %s) for support %s / query %s in %.1f s "
                     "(cache: %s)", self.compile_backend, tuple(sx.shape), tuple(qx.shape),
                     self.compile_seconds[shape_key], os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's default"))

    # ----------------------------------------------------------------- compiled
    def _compiled_objective(self, params, buffers, sx, sy, qx, qy, outer, **kw):
        if buffers:
            raise ValueError("strategy='compiled' needs a network without buffers (BatchNorm running statistics: "
                             "build it with track_running_stats=False), or use strategy='stacked'/'auto'")
        lr = kw.pop("lr", None)
        upd = kw.pop("update", None)
        if upd is not None and type(upd) is not SGD:
            raise ValueError(f"strategy='compiled' runs SGD / Meta-SGD inner steps, not {type(upd).__name__}: use "
                             f"strategy='stacked' or 'vmap' for another inner update rule")
        if upd is not None:
            lr = upd.lr
        names = list(params)
        lr_names = list(lr) if isinstance(lr, Mapping) else []
        lr_tensor = isinstance(lr, Tensor)
        key = (tuple(names), tuple(lr_names), lr_tensor, None if (lr_names or lr_tensor) else float(lr),
               tuple(sorted(kw.items())), self.compile_backend)
        fn = self._compiled.get(key)
        if fn is None:
            core = self.core
            kwargs = dict(kw)
            fixed_lr = lr

            def meta_loss(p: dict, rates, x1, y1, x2, y2):
                rate = rates if (lr_names or lr_tensor) else fixed_lr
                res, _, ql = core._vmap_adapt_tasks(p, {}, x1, y1, x2, y2, lr=rate, **kwargs)
                return ql.mean(), (ql.detach(), res.inner_losses.detach())

            argnums = (0, 1) if (lr_names or lr_tensor) else (0,)
            g = torch.func.grad(meta_loss, argnums=argnums, has_aux=True)
            self._set_compile_cache()
            fn = torch.compile(g, backend=self.compile_backend, fullgraph=False) \
                if self.compile_backend != "eager" else g
            self._compiled[key] = fn
        rates = ({k: lr[k] for k in lr_names} if lr_names else lr) if (lr_names or lr_tensor) else None
        t0 = time.perf_counter()
        grads, (ql, inner) = fn({k: v.detach() for k, v in params.items()},
                                None if rates is None else (
                                    {k: v.detach() for k, v in rates.items()} if lr_names else rates.detach()),
                                sx, sy, qx, qy)
        self._log_compile(t0, sx, qx, key)
        gp = grads[0]
        pairs_t, pairs_g = [params[k] for k in names], [gp[k] for k in names]
        if lr_names:
            pairs_t += [lr[k] for k in lr_names]
            pairs_g += [grads[1][k] for k in lr_names]
        elif lr_tensor:
            pairs_t.append(lr)
            pairs_g.append(grads[1])
        keep = [(t, g) for t, g in zip(pairs_t, pairs_g) if t.requires_grad]
        obj = surrogate_objective([t for t, _ in keep], [g for _, g in keep])
        return obj, ql, inner, {}
