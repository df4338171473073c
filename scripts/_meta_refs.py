"""The second-order MAML meta-step of the benchmarks, written by each peer library and by hand.

Used by ``bench_meta_step.py``, ``bench_race.py`` and ``tests/core/test_bench_references.py``.
Every method computes the same thing on the same inputs: the gradient of the task-mean query loss
after ``steps`` inner SGD steps (lr ``lr``) from the shared weights, second order, into the
``.grad`` of the parameters of its own copy of the network. ``make_method(name, net, setting)``
returns a :class:`Method` whose ``step()`` does that and whose ``grads()`` returns the gradients
under the reference network's parameter names.

Methods:

* ``loop``: the plain per-task autograd loop (the reference): clone the parameters (the clones
  stay in the graph), take the inner steps with ``torch.autograd.grad(create_graph=True)``,
  backward the task's query loss / T, next task. Native ``nn.BatchNorm2d``.
* ``learn2learn``: ``learn2learn.algorithms.MAML`` as its examples write the loop
  (``maml.clone()``, ``learner.adapt(loss)``, ``(query_loss / T).backward()`` per task). Native BN.
  Loaded without the package ``__init__`` (it imports gym, torchvision and pytorch_lightning).
* ``higher``: ``higher.innerloop_ctx`` per task with a differentiable SGD. Native BN.
* ``pml``: parallel-metalearn (import name ``metalearn``): its ``MAML`` meta-optimiser with a
  ``MAML_Model`` wrapper, ``InnerSGD`` (fixed lr) and its ``vmap`` backend, stepped with an outer
  SGD of lr 0 so that ``step()`` leaves the meta-gradient in ``.grad`` and the weights unchanged.
  Its tasks run under ``torch.func.vmap`` over ``torch.func.grad``, where the native batch norm's
  second-order gradient is wrong, so it gets the network with tasklight's elementary-op BatchNorm.
* ``tasklight:<strategy>[:<chunk_size>]``: ``MAMLModule(net, strategy=..., chunk_size=...)``,
  one ``meta_objective(batch).objective.backward()``.

Settings (``make_setting``): ``sin`` (sinusoid, MLP 1-40-40-1, MSE), ``conv`` (Omniglot 5-way
1-shot, Conv4, cross-entropy) and ``conv20`` (20-way), with real Omniglot images from the small
sets shipped in ``tasklight/data/assets/omniglot`` (training characters, via ``OmniglotDataModule``).
"""
from __future__ import annotations

import copy
import importlib
import importlib.machinery
import importlib.util
import sys
import types
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from tasklight.data.batch import MetaBatch, collate_tasks
from tasklight.data.sinusoid import sinusoid_task
from tasklight.nn.nets import MLP, Conv4, make_vmap_safe

PEERS = ("learn2learn", "higher", "pml")
LABEL = {"loop": "loop ref (per-task autograd)", "learn2learn": "learn2learn 0.2.0", "higher": "higher 0.2.1",
         "pml": "parallel-metalearn 0.5.6"}


# ============================================================================ settings
@dataclass
class Setting:
    name: str
    batch: MetaBatch
    steps: int
    lr: float
    loss: str  # "mse" | "ce"
    make_net: Callable[[], nn.Module]  # native nn.BatchNorm2d layers
    describe: str

    def loss_fn(self) -> Callable[[Tensor, Tensor], Tensor]:
        return F.mse_loss if self.loss == "mse" else F.cross_entropy


def native_batchnorm(net: nn.Module) -> nn.Module:
    """``net`` with tasklight's elementary-op BatchNorm layers replaced by ``nn.BatchNorm*d`` (same state), in place."""
    from tasklight.nn.nets import BatchNorm1d, BatchNorm2d, BatchNorm3d

    back = {BatchNorm1d: nn.BatchNorm1d, BatchNorm2d: nn.BatchNorm2d, BatchNorm3d: nn.BatchNorm3d}
    for name, child in list(net.named_children()):
        if type(child) in back:
            new = back[type(child)](child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(net, name, new)
        else:
            native_batchnorm(child)
    return net


_OMNIGLOT = {}


def omniglot_batch(n_way: int, tasks: int, queries: int, seed: int) -> MetaBatch:
    """``tasks`` training episodes, ``n_way``-way 1-shot, ``queries`` query images per class (real images)."""
    from tasklight.data.omniglot import OmniglotDataModule

    key = (n_way, queries)
    if key not in _OMNIGLOT:
        _OMNIGLOT[key] = OmniglotDataModule(n_way=n_way, k_shot=1, q_queries=queries).task_fn("train")
    gen = torch.Generator().manual_seed(seed)
    return collate_tasks([_OMNIGLOT[key](gen) for _ in range(tasks)])


def make_setting(name: str, *, tasks: int, steps: int, hidden: int, queries: int = 15, seed: int = 0,
                 dtype: torch.dtype = torch.float32, shots: int = 10) -> Setting:
    """``sin``: ``tasks`` sinusoid tasks x ``shots`` (as many queries), MLP 1-hidden-hidden-1; ``conv`` / ``conv20``:
    5- / 20-way 1-shot Omniglot, ``queries`` per class, Conv4 with ``hidden`` filters, BatchNorm in training mode."""
    if name == "sin":
        gen = torch.Generator().manual_seed(seed)
        batch = collate_tasks([sinusoid_task(gen, shots, shots) for _ in range(tasks)]).float_(dtype)

        def make_net() -> nn.Module:
            torch.manual_seed(seed)
            return MLP(1, [hidden, hidden], 1).to(dtype)

        return Setting(name, batch, steps, 0.01, "mse", make_net,
                       f"sinusoid, {tasks} tasks x {shots} shots ({shots} queries), {steps} inner SGD steps (lr 0.01), "
                       f"MLP 1-{hidden}-{hidden}-1 ReLU, second order")
    if name in ("conv", "conv20"):
        n_way = 5 if name == "conv" else 20
        lr = 0.4 if name == "conv" else 0.1
        batch = omniglot_batch(n_way, tasks, queries, seed).float_(dtype)

        def make_net() -> nn.Module:
            torch.manual_seed(seed)
            return native_batchnorm(Conv4(1, n_way, hidden=hidden)).to(dtype)

        return Setting(name, batch, steps, lr, "ce", make_net,
                       f"Omniglot {n_way}-way 1-shot ({queries} queries per class, real images), T={tasks}, "
                       f"Conv4-{hidden} (BatchNorm in training mode, batch statistics), {steps} inner SGD step(s) "
                       f"(lr {lr}), second order")
    raise ValueError(f"unknown setting {name!r}: use 'sin', 'conv' or 'conv20'")


# ============================================================================ methods
class Method:
    """One way of computing the meta-gradient on a copy of the reference network."""

    def __init__(self, net: nn.Module, step: Callable[[], None], prefix: str = "") -> None:
        self.net, self._step, self.prefix = net, step, prefix

    def step(self) -> None:
        for p in self.net.parameters():
            p.grad = None
        self._step()

    def grads(self) -> dict[str, Tensor]:
        n = len(self.prefix)
        return {k[n:]: p.grad.detach().clone() for k, p in self.net.named_parameters()
                if k.startswith(self.prefix) and p.grad is not None}


def per_task_loop_meta_grad(net: nn.Module, loss_fn: Callable, batch: MetaBatch, steps: int, lr: float) -> None:
    """Second-order MAML meta-gradient by an explicit loop over tasks (clone, adapt, backward per task).

    For each task: clone the parameters (the clone stays in the graph), take ``steps`` SGD steps with
    ``torch.autograd.grad(create_graph=True)``, and backward the query loss divided by the number of
    tasks, so ``.grad`` accumulates the task-mean meta-gradient.
    """
    params = dict(net.named_parameters())
    T = batch.num_tasks
    for t in range(T):
        fast = {n: p.clone() for n, p in params.items()}
        for _ in range(steps):
            loss = loss_fn(functional_call(net, fast, (batch.support_x[t],)), batch.support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: p - lr * g for (n, p), g in zip(fast.items(), grads)}
        query = loss_fn(functional_call(net, fast, (batch.query_x[t],)), batch.query_y[t])
        (query / T).backward()


def available(peer: str) -> Optional[str]:
    """``None`` when ``peer`` can be used here, else the reason it cannot."""
    mod = {"learn2learn": "learn2learn", "higher": "higher", "pml": "metalearn"}[peer]
    if peer == "learn2learn" and "learn2learn.algorithms.maml" in sys.modules:
        return None
    if importlib.util.find_spec(mod) is None:
        return f"{mod} is not installed (scripts/install_peers.sh installs it)"
    if peer == "learn2learn":
        try:
            learn2learn_maml()
        except Exception as err:  # noqa: BLE001 - the reason is reported
            return f"learn2learn.algorithms.maml does not import: {type(err).__name__}: {err}"
    return None


def learn2learn_maml():
    """``learn2learn.algorithms.maml.MAML`` without running ``learn2learn/__init__.py`` (gym, torchvision, lightning)."""
    if "learn2learn.algorithms.maml" in sys.modules:
        return sys.modules["learn2learn.algorithms.maml"].MAML
    spec = importlib.util.find_spec("learn2learn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("learn2learn is not installed")
    root = list(spec.submodule_search_locations)[0]
    for name, path in (("learn2learn", root), ("learn2learn.algorithms", root + "/algorithms")):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [path]
            pkg.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            pkg.__spec__.submodule_search_locations = [path]
            sys.modules[name] = pkg
    return importlib.import_module("learn2learn.algorithms.maml").MAML


class _AnyKwargs(nn.Module):
    """Calls ``module(x)``, ignoring the keyword arguments parallel-metalearn passes to every forward."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.m = module

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return self.m(x)


def _pml_losses():
    from metalearn.loss import CrossEntropy
    from metalearn.loss.base import BaseLoss
    from metalearn.loss.categorical_accuracy import CategoricalAccuracy

    class CE(CrossEntropy):  # its default metric_fn is the class, which it then calls as a function
        def __init__(self):
            super().__init__(metric_fn=CategoricalAccuracy())

    class MSE(BaseLoss):
        def forward(self, out_dict, targets, model_states=None, **kwargs):
            loss = F.mse_loss(out_dict["logits"], targets["labels"])
            return loss, loss.detach()

    return CE, MSE


def make_method(name: str, setting: Setting, ref: nn.Module) -> Method:
    """A :class:`Method` on a copy of ``ref`` (native BatchNorm) for ``setting``'s batch.

    Each ``step()`` reads ``setting.batch`` anew, so a training loop can set the next meta-batch there.
    """
    steps, lr, loss_fn = setting.steps, setting.lr, setting.loss_fn()
    if name == "loop":
        net = copy.deepcopy(ref)
        return Method(net, lambda: per_task_loop_meta_grad(net, loss_fn, setting.batch, steps, lr))
    if name == "learn2learn":
        MAML = learn2learn_maml()
        net = copy.deepcopy(ref)
        maml = MAML(net, lr=lr, first_order=False)

        def run() -> None:
            b = setting.batch
            T = b.num_tasks
            for t in range(T):
                learner = maml.clone()
                for _ in range(steps):
                    learner.adapt(loss_fn(learner(b.support_x[t]), b.support_y[t]))
                (loss_fn(learner(b.query_x[t]), b.query_y[t]) / T).backward()

        return Method(net, run)
    if name == "higher":
        import higher

        net = copy.deepcopy(ref)
        inner = torch.optim.SGD(net.parameters(), lr=lr)

        def run() -> None:
            b = setting.batch
            T = b.num_tasks
            for t in range(T):
                with higher.innerloop_ctx(net, inner, copy_initial_weights=False, track_higher_grads=True) as (f, d):
                    for _ in range(steps):
                        d.step(loss_fn(f(b.support_x[t]), b.support_y[t]))
                    (loss_fn(f(b.query_x[t]), b.query_y[t]) / T).backward()

        return Method(net, run)
    if name == "pml":
        from metalearn.algorithms import MAML as PMAML
        from metalearn.inner_optimizers.optimizers import InnerSGD
        from metalearn.model_wrappers import MAML_Model

        net = copy.deepcopy(ref)
        make_vmap_safe(net)  # vmap over torch.func.grad: the native batch norm's second order is wrong there
        model = MAML_Model(backbone=_AnyKwargs(net), head=_AnyKwargs(nn.Identity()))
        fast = model.get_fast_weights()
        inner_opt = InnerSGD(fast, first_order=False, inner_lr=lr, max_inner_steps=max(steps, 1), learn_lr=False)
        inner_opt.to(next(ref.parameters()).dtype)  # its lr is made a float32 tensor: refill it in the net's dtype
        with torch.no_grad():
            for p in inner_opt.parameters():
                p.fill_(lr)
        CrossEntropy, MSE = _pml_losses()
        loss = CrossEntropy() if setting.loss == "ce" else MSE()
        algo = PMAML(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), inner_optimizer=inner_opt,
                     support_loss_fn=loss, inner_steps=steps, chunk_size=setting.batch.num_tasks,
                     device=torch.device("cpu"), backend="vmap")

        def run() -> None:
            b = setting.batch
            algo.step(iter([(b.support_x, {"labels": b.support_y}, b.query_x, {"labels": b.query_y})]), training=True)

        return Method(model, run, prefix="backbone.m.")
    if name.startswith("tasklight:"):
        from tasklight.meta.maml import MAMLModule

        parts = name.split(":")
        strategy = parts[1]
        chunk = int(parts[2]) if len(parts) > 2 else None
        module = MAMLModule(copy.deepcopy(ref), loss="mse" if setting.loss == "mse" else "cross_entropy",
                            inner_steps=steps, inner_lr=lr, strategy=strategy, chunk_size=chunk)
        module = module.to(next(ref.parameters()).dtype)

        def run() -> None:
            module.meta_objective(setting.batch).objective.backward()

        meth = Method(module.net, run)
        meth.module = module
        return meth
    raise ValueError(f"unknown method {name!r}")


def compare(got: dict[str, Tensor], ref: dict[str, Tensor]) -> float:
    """max |got - ref| / max |ref| over all parameters (inf when the names differ)."""
    if set(got) != set(ref):
        return float("inf")
    scale = max(float(g.abs().max()) for g in ref.values())
    return max(float((got[k] - ref[k]).abs().max()) for k in ref) / scale
