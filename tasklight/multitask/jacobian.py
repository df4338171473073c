"""Per-task gradients of a multi-task step: the Jacobian ``[T, P]`` of T task losses w.r.t. P shared
parameters, computed by one of two engines on the graph of one forward pass.

* ``"loop"``: one ``torch.autograd.grad`` call per task (T reverse passes, each with one cotangent);
* ``"batched"``: ``torch.autograd.grad(..., is_grads_batched=True)`` with the rows of the identity as
  cotangents, ``chunk_size`` tasks per call (``None``: all in one call). This is ``torch.func.vmap``
  over the backward pass: one call, a leading task dimension on every cotangent, and memory for
  ``chunk_size`` cotangents at once.

Both give the same Jacobian (up to float rounding); they differ in speed and memory only. With a trunk
whose rows interact (BatchNorm on batch statistics couples every example to every task's loss) each
task's cotangent is dense in every layer below the heads, so both engines do T times the arithmetic of
one backward pass through the trunk; ``docs/bench_multitask.md`` has the measured time and peak memory
of each engine (``scripts/bench_mtl_overhead.py``). ``"auto"`` picks the engine measured fastest for
the device (:data:`AUTO_ENGINE`).

The weightings use the per-task gradients only through their Gram matrix ``J J^T``, but the module
needs ``J`` itself: the DDP guarantee (the same update as one process on the union of the ranks'
examples) takes the Gram of the all-reduced per-task gradients, and Gram matrices of local gradients
do not add up to it. ``J`` is small beside the activations (8 tasks x 28,320 trunk weights = 0.9 MB
on the Omniglot trunk); the peak memory of each engine is in ``docs/bench_multitask.md``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

ENGINES = ("auto", "loop", "batched")
#: the engine ``"auto"`` uses per device type, from ``scripts/bench_mtl_overhead.py`` (CPU: the loop is
#: faster than the batched call, whose vmapped convolution backward costs more than T plain ones) and
#: ``scripts/gpu_check.py`` (CUDA: the loop until a GPU run measures otherwise).
AUTO_ENGINE = {"cpu": "loop", "cuda": "loop"}


def resolve_engine(engine: str, device: torch.device) -> str:
    """The concrete engine (``loop`` or ``batched``) for ``engine`` on ``device``."""
    if engine not in ENGINES:
        raise ValueError(f"task gradient engine must be one of {list(ENGINES)}, got {engine!r}")
    if engine == "auto":
        return AUTO_ENGINE.get(torch.device(device).type, "loop")
    return engine


def task_jacobian(losses: Tensor, params: Sequence[Tensor], engine: str = "auto",
                  chunk_size: Optional[int] = None) -> Tensor:
    """The gradients ``[len(losses), P]`` of each entry of ``losses`` (a 1-d tensor) w.r.t. ``params``
    (flattened and concatenated in order; zeros for a parameter a loss does not reach). The graph is
    kept (``retain_graph=True``) for the step's own backward pass."""
    if losses.dim() != 1:
        raise ValueError(f"losses must be a 1-d tensor of task losses, got shape {tuple(losses.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None (all tasks in one call), got {chunk_size}")
    params = list(params)
    T = losses.shape[0]
    size = sum(p.numel() for p in params)
    dev = losses.device
    out = torch.zeros(T, size, device=dev, dtype=losses.dtype)
    if T == 0 or not losses.requires_grad:
        return out
    engine = resolve_engine(engine, dev)
    if engine == "loop":
        for t in range(T):
            g = torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)
            out[t] = _flat(g, params, None)
        return out
    step = T if chunk_size is None else min(int(chunk_size), T)
    eye = torch.eye(T, device=dev, dtype=losses.dtype)
    for start in range(0, T, step):
        cot = eye[start:start + step]
        g = torch.autograd.grad(losses, params, grad_outputs=cot, retain_graph=True, allow_unused=True,
                                is_grads_batched=True)
        out[start:start + step] = _flat(g, params, cot.shape[0])
    return out


def _flat(grads, params, batch: Optional[int]) -> Tensor:
    parts = []
    for g, p in zip(grads, params):
        if g is None:
            g = torch.zeros((batch,) + tuple(p.shape) if batch else p.shape, device=p.device, dtype=p.dtype)
        parts.append(g.reshape(batch, -1) if batch else g.reshape(-1))
    return torch.cat(parts, -1)
