"""Task2Vec task embeddings (Achille et al., ICCV 2019), task distances and expert selection.

A task (a labelled classification data set) is embedded through a fixed *probe* network:

1. a copy of the probe's feature extractor is kept frozen and a new linear classifier head is fitted
   on the task (only the head is trained);
2. the diagonal of the Fisher information of the chosen layers' weights is estimated,
   ``F = E_x E_{y ~ p_w(y|x)} [(d/dw log p_w(y|x))^2]``, with labels *sampled from the model's
   predictive distribution* (Monte-Carlo Fisher; ``exact=True`` takes the expectation over labels
   exactly) and per-example gradients (``torch.func.grad`` + ``vmap``), never the square of a
   batch-mean gradient;
3. the diagonal is averaged over the weights of each filter (conv) or unit (linear): one number per
   filter, a fixed-length vector whatever the task's number of classes.

Distances (Sect. 3 of the paper):

* ``d_sym(a, b) = d_cos(F_a / (F_a + F_b), F_b / (F_a + F_b))`` (element-wise ratios), in [0, 1];
* ``d_asym(a -> b) = d_sym(a, b) - alpha * d_sym(a, t0)`` with ``t0`` the *trivial embedding*: the
  isotropic Fisher of the probe (every filter of a layer equally informative, at the layer's mean
  level). ``a`` is the source (an expert's training task) and ``b`` the target: subtracting
  ``alpha * d_sym(a, t0)`` brings complex source tasks closer, since they tend to transfer better.

Expert selection ranks expert models by ``d_asym(expert task -> new task)``;
:func:`evaluate_expert_selection` compares that choice with the oracle (the expert whose features
give the lowest test error after fitting a head on the new task) and with a fixed generic expert.
"""
from __future__ import annotations

import copy
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, Dataset, TensorDataset

from tasklight.nn.nets import make_vmap_safe

TaskData = Union[tuple[Tensor, Tensor], Dataset, DataLoader]
_FILTER_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BATCH_NORMS = nn.modules.batchnorm._BatchNorm
DEFAULT_ALPHA = 0.15  # the value the paper found robust across meta-tasks (ResNet-34 probe)


# ===================================================================================== data
def task_tensors(data: TaskData, name: str = "") -> tuple[Tensor, Tensor]:
    """A task's examples as ``(x [N, ...] float, y [N] long)``.

    ``data`` is an ``(x, y)`` pair of tensors, a ``Dataset`` of ``(x, y)`` items, or a ``DataLoader``
    yielding ``(x, y)`` batches. Raises one clear error for empty data, mismatched lengths,
    non-floating inputs or non-integer labels.
    """
    what = f"task {name!r}" if name else "the task"
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
    elif isinstance(data, DataLoader):
        xs, ys = [], []
        for batch in data:
            bx, by = _pair(batch, what)
            xs.append(bx)
            ys.append(torch.as_tensor(by))
        if not xs:
            raise ValueError(f"{what} is empty: its DataLoader yielded no batches; give it at least two "
                             f"examples of two classes.")
        x, y = torch.cat(xs), torch.cat(ys)
    elif isinstance(data, Dataset) and callable(getattr(data, "fetch", None)):  # indexed in one call
        x, y = data.fetch(torch.arange(len(data)))  # type: ignore[arg-type]
    elif isinstance(data, TensorDataset) and len(data.tensors) >= 2:
        x, y = data.tensors[0], data.tensors[1]
    elif isinstance(data, Dataset):
        try:
            n = len(data)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"{what}: an iterable Dataset has no length; wrap it in a DataLoader") from None
        if n == 0:
            raise ValueError(f"{what} is empty: its Dataset has no examples; give it at least two examples of two "
                             f"classes.")
        items = [_pair(data[i], what) for i in range(n)]
        x = torch.stack([torch.as_tensor(a) for a, _ in items])
        y = torch.stack([torch.as_tensor(b) for _, b in items])
    else:
        raise TypeError(f"{what}: expected an (x, y) pair of tensors, a Dataset or a DataLoader of (x, y), got "
                        f"{type(data).__name__}")
    if x.shape[0] == 0:
        raise ValueError(f"{what} is empty (x has shape {tuple(x.shape)}); give it at least two examples of two "
                         f"classes.")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{what}: labels must have shape [N] matching x's first dim {x.shape[0]}, got "
                         f"{tuple(y.shape)}; Task2Vec embeds classification tasks with one integer label per example.")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{what}: labels must be integer class ids, got dtype {y.dtype}; Task2Vec embeds "
                         f"classification tasks (convert labels with .long()).")
    if not x.is_floating_point():
        raise ValueError(f"{what}: inputs must be floating point, got dtype {x.dtype}; convert them as the probe "
                         f"expects (e.g. images.float() / 255).")
    return x, y.long()


def _pair(item: Any, what: str) -> tuple[Tensor, Tensor]:
    if isinstance(item, Mapping) and "x" in item and "y" in item:
        return item["x"], item["y"]
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return item[0], item[1]
    raise TypeError(f"{what}: every item must be an (x, y) pair, got {type(item).__name__}")


def _batches(n: int, size: int):
    for lo in range(0, n, size):
        yield slice(lo, min(n, lo + size))


def datamodule_tasks(datamodule: Any, split: str = "val", max_tasks: Optional[int] = None) -> dict[str, TaskData]:
    """The tasks of a DataModule as ``name -> data``, for the callback and ``scripts/embed_tasks.py``.

    Looked up in this order:

    1. ``datamodule.task2vec_tasks(split)``: any DataModule can define it and return a mapping
       ``name -> (x, y) | Dataset | DataLoader``;
    2. a multi-task DataModule (``MultiTaskDataModule`` and subclasses: ``tasks`` and
       ``train_sets``/``val_sets``/``test_sets``): each task's dataset of ``split``, in task order,
       so that row ``i`` of the embeddings is task ``i`` (what its ``task_descriptors`` expects);
    3. an episodic (meta-learning) DataModule (one with ``task_fn(split)``, e.g.
       ``OmniglotDataModule``): its fixed evaluation episodes ``0, 1, ...`` of ``split``, each
       episode's support and query sets together as one task.
    """
    if datamodule is None:
        raise ValueError("no DataModule to take tasks from: pass one to the Trainer (datamodule=...) or to the script")
    if max_tasks is not None and max_tasks < 1:
        raise ValueError(f"max_tasks must be >= 1 (or None for all), got {max_tasks}")
    kind = type(datamodule).__name__
    hook = getattr(datamodule, "task2vec_tasks", None)
    if callable(hook):
        tasks = dict(hook(split))
    elif hasattr(datamodule, "train_sets") and hasattr(datamodule, "tasks"):
        datamodule.setup()
        sets = getattr(datamodule, f"{split}_sets", None)
        if sets is None:
            raise ValueError(f"{kind} has no {split!r} split; use split 'train', 'val' or 'test'")
        tasks = {}
        for t, (spec, ds) in enumerate(zip(datamodule.tasks, sets)):
            name = str(getattr(spec, "name", f"task{t}"))
            if getattr(spec, "kind", "classification") != "classification":
                raise ValueError(f"task {name!r} of {kind} is a {spec.kind} task; Task2Vec embeds classification "
                                 f"tasks (the Fisher of a softmax classifier)")
            if ds is None:
                raise ValueError(f"task {name!r} of {kind} has no {split} set; embed another split (e.g. 'train')")
            tasks[name] = ds
    elif callable(getattr(datamodule, "task_fn", None)):
        from tasklight.data.episodes import EpisodeSet

        count = {"val": getattr(datamodule, "val_episodes", None), "test": getattr(datamodule, "test_episodes", None)}
        n = max_tasks or count.get(split) or 16
        episodes = EpisodeSet(datamodule.task_fn(split), n, getattr(datamodule, "seed", 0), stream=split)
        tasks = {}
        for i in range(n):
            sx, sy, qx, qy = episodes[i]
            tasks[f"episode{i}"] = (torch.cat([sx, qx]), torch.cat([sy, qy]))
    else:
        raise TypeError(f"{kind} does not expose its tasks: give it a method `task2vec_tasks(split) -> "
                        f"dict[name, (x, y)]` (or use a multi-task or episodic DataModule)")
    if not tasks:
        raise ValueError(f"{kind} has no tasks in the {split!r} split")
    names = list(tasks)[:max_tasks] if max_tasks is not None else list(tasks)
    return {str(k): tasks[k] for k in names}


# ===================================================================================== the probe
def _resolve(root: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError:
        names = [n for n, m in root.named_modules() if n and isinstance(m, nn.Module)]
        shown = ", ".join(names[:40]) + (" ..." if len(names) > 40 else "")
        raise ValueError(f"the probe has no {what} {path!r}; its submodules are: {shown}") from None


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


class _ProbeWithHead(nn.Module):
    """``head(flatten(body(x)))``: the probe's feature extractor and a task's linear head."""

    def __init__(self, body: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).flatten(1))


class ProbeAdapter:
    """Turns any probe network into ``feature extractor + new linear head`` for one task at a time.

    Args:
        probe: an ``nn.Module`` or ``LightningModule``; it is never modified (a copy is used).
        network: dotted path of the submodule mapping inputs to outputs (or features). Default:
            the probe itself, except for a ``LightningModule`` with a ``net`` attribute (the
            meta-learners), whose ``net`` is used, or with a ``trunk`` (``MultiTaskModule`` with
            hard sharing), whose trunk is used as feature extractor (``head="auto"`` then means
            no head to replace).
        head: dotted path (inside ``network``) of the classifier layer to replace, ``"auto"`` (the
            last ``nn.Linear``, if the network ends with one) or ``None`` (the network's output,
            flattened, is the feature: a head is appended).
    """

    def __init__(self, probe: nn.Module, network: Optional[str] = None, head: Optional[str] = "auto") -> None:
        if not isinstance(probe, nn.Module):
            raise TypeError(f"the probe must be an nn.Module or LightningModule, got {type(probe).__name__}")
        if network is None and _is_lightning(probe):
            if isinstance(getattr(probe, "net", None), nn.Module):
                network = "net"  # the meta-learners' network
            elif isinstance(getattr(probe, "trunk", None), nn.Module):
                network = "trunk"  # a multi-task module's shared trunk: its output is the feature
                head = None if head == "auto" else head
        self.network_path = network or ""
        self.network = _resolve(probe, network, "network submodule") if network else probe
        if head == "auto":
            linears = [n for n, m in self.network.named_modules() if isinstance(m, nn.Linear)]
            head = linears[-1] if linears else None
            self._head_is_guess = True
        else:
            self._head_is_guess = False
        if head is not None:
            module = _resolve(self.network, head, "head layer")
            if not isinstance(module, nn.Linear):
                raise ValueError(f"the head {head!r} is a {type(module).__name__}, not an nn.Linear; name the final "
                                 f"linear layer, or pass head=None to append a head to the network's output")
        self.head_path: Optional[str] = head

    def layer_names(self) -> list[str]:
        """Conv and linear layers of the feature extractor, in module order (the default layers)."""
        skip = self.head_path or "\0"
        return [n for n, m in self.network.named_modules()
                if isinstance(m, _FILTER_LAYERS) and n != skip and not n.startswith(skip + ".")]

    def parameter_names(self, layers: Optional[Sequence[str]]) -> list[tuple[str, str]]:
        """``(layer as given, parameter name inside the body)`` for each chosen layer's filter weights."""
        if layers is None:
            layers = self.layer_names()
            if not layers:
                raise ValueError("the probe has no conv or linear layers outside its head; pass `layers` naming the "
                                 "modules (or parameters) whose Fisher to use")
        if isinstance(layers, str):
            layers = [layers]
        if len(layers) == 0:
            raise ValueError("`layers` is empty: name at least one module of the probe (or leave it unset for all "
                             "conv/linear layers outside the head)")
        params = dict(self.network.named_parameters())
        out = []
        for name in layers:
            if name in params:
                pname = name
            else:
                module = _resolve(self.network, name, "layer")
                w = getattr(module, "weight", None)
                if not isinstance(w, nn.Parameter):
                    raise ValueError(f"the probe's layer {name!r} ({type(module).__name__}) has no weight parameter; "
                                     f"choose conv/linear/norm layers, e.g. {self.layer_names()[:6]}")
                pname = f"{name}.weight" if name else "weight"
            if self.head_path is not None and (pname == self.head_path or pname.startswith(self.head_path + ".")):
                raise ValueError(f"layer {name!r} is the classifier head, which Task2Vec replaces per task; choose "
                                 f"layers of the feature extractor")
            out.append((name, pname))
        return out

    def body(self, example: Tensor) -> nn.Module:
        """A fresh copy of the feature extractor (head replaced by identity), in eval mode.

        ``example`` (a few inputs) checks that the replaced head is the network's last operation.
        """
        net = copy.deepcopy(self.network)
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        make_vmap_safe(net)
        with torch.no_grad():
            try:
                reference = net(example)
            except Exception as err:  # noqa: BLE001 - say which network failed on which input
                raise ValueError(f"the probe network{f' {self.network_path!r}' if self.network_path else ''} failed "
                                 f"on the task's inputs of shape {tuple(example.shape)}: {err}. Pass `network` "
                                 f"naming a submodule that maps x alone to outputs or features.") from err
        if self.head_path is None:
            return net
        old_head = net.get_submodule(self.head_path)
        with torch.no_grad():
            _set_submodule(net, self.head_path, nn.Identity())
            feats = net(example)
            same = (feats.dim() >= 2 and feats[0].numel() == old_head.in_features
                    and torch.allclose(old_head(feats.flatten(1)), reference, atol=1e-5, rtol=1e-4))
        if not same:
            how = "the last nn.Linear found" if self._head_is_guess else f"head {self.head_path!r}"
            raise ValueError(f"{how} ({self.head_path!r}) is not the network's final operation, so replacing it does "
                             f"not give a classifier; pass `head` naming the final linear layer, or `head: null` with "
                             f"`network` naming a feature extractor")
        return net

    def features(self, body: nn.Module, x: Tensor, batch_size: int) -> Tensor:
        with torch.no_grad():
            return torch.cat([body(x[s]).flatten(1) for s in _batches(len(x), batch_size)])


def _is_lightning(module: nn.Module) -> bool:
    try:
        from lightning.pytorch import LightningModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, LightningModule)


def set_batchnorm_stats(net: nn.Module, x: Tensor, batch_size: int) -> int:
    """Give every BatchNorm layer of ``net`` fixed statistics: the average over ``x`` (in batches).

    Layers built without running statistics (``track_running_stats=False``, as in MAML's Conv4)
    get them; existing ones are reset. Afterwards ``net`` is in eval mode, so every example is
    processed independently and per-example gradients are well defined. Returns the layer count.
    """
    bns = [m for m in net.modules() if isinstance(m, _BATCH_NORMS)]
    for m in bns:
        dev = next((t.device for t in m.parameters()), x.device)
        m.track_running_stats = True
        m.momentum = None  # cumulative average over the batches
        m.register_buffer("running_mean", torch.zeros(m.num_features, device=dev))
        m.register_buffer("running_var", torch.ones(m.num_features, device=dev))
        m.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=dev))
    if bns:
        net.eval()
        for m in bns:
            m.train()
        with torch.no_grad():
            for s in _batches(len(x), batch_size):
                net(x[s])
    net.eval()
    return len(bns)


def _check_probe_bn_stats(net: nn.Module) -> None:
    for name, m in net.named_modules():
        if isinstance(m, _BATCH_NORMS) and m.running_mean is None:
            raise ValueError(f"bn_stats='probe' but the probe's BatchNorm {name!r} keeps no running statistics "
                             f"(track_running_stats=False); use bn_stats='task' to compute them on the task's data")


# ===================================================================================== head and Fisher
@dataclass
class HeadFit:
    head: nn.Linear
    loss: float  # final regularised training loss
    error: float  # training error of the fitted head


def fit_linear_head(features: Tensor, labels: Tensor, num_classes: int, steps: int = 100,
                    weight_decay: float = 1e-2) -> HeadFit:
    """Multinomial logistic regression on fixed features (full-batch L-BFGS, zero init, L2 penalty).

    ``weight_decay`` multiplies ``0.5 * ||W||^2`` and keeps the fitted head from becoming
    arbitrarily confident on separable data (which would drive the Fisher to zero).
    """
    head = nn.Linear(features.shape[1], num_classes).to(features.device, features.dtype)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max(1, steps), history_size=20,
                            line_search_fn="strong_wolfe")
    feats, labels = features.detach(), labels.to(features.device)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(feats), labels) + 0.5 * weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        if steps > 0:
            opt.step(closure)
        with torch.no_grad():
            logits = head(feats)
            loss = F.cross_entropy(logits, labels) + 0.5 * weight_decay * head.weight.pow(2).sum()
            error = (logits.argmax(-1) != labels).float().mean()
    for p in head.parameters():
        p.requires_grad_(False)
    return HeadFit(head, float(loss), float(error))


def fisher_diagonal(model: nn.Module, x: Tensor, param_names: Sequence[str], *, mc_samples: int = 1,
                    exact: bool = False, batch_size: int = 64,
                    generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
    """Diagonal Fisher information of ``log p(y|x)`` (softmax of ``model(x)``) w.r.t. the named parameters.

    ``F = mean_i E_{y ~ p(.|x_i)} [g_i(y)^2]`` with ``g_i(y) = d/dw log p(y|x_i)`` the gradient of ONE
    example (``torch.func.grad`` vmapped over examples). Labels are sampled from the model
    (``mc_samples`` per example; sampling uses ``generator``), or, with ``exact=True``, the
    expectation over all classes is computed exactly. ``model`` must treat examples independently
    (eval mode; see :func:`set_batchnorm_stats`).
    """
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    all_params = dict(model.named_parameters())
    missing = [n for n in param_names if n not in all_params]
    if missing:
        raise ValueError(f"the model has no parameters {missing}; it has {list(all_params)}")
    params = {n: all_params[n].detach() for n in param_names}

    def log_prob(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        logits = functional_call(model, p, (xi.unsqueeze(0),))
        return -F.cross_entropy(logits, yi.unsqueeze(0))

    per_example = vmap(grad(log_prob), in_dims=(None, 0, 0))
    acc = {n: torch.zeros_like(p) for n, p in params.items()}

    def add(xb: Tensor, yb: Tensor, weight: Optional[Tensor] = None) -> None:
        for s in _batches(len(xb), batch_size):
            grads = per_example(params, xb[s], yb[s])
            for n, g in grads.items():
                sq = g.pow(2)
                if weight is not None:
                    sq = sq * weight[s].view(-1, *([1] * (sq.dim() - 1)))
                acc[n] += sq.sum(0)

    with torch.enable_grad():
        for s in _batches(len(x), batch_size):
            xb = x[s]
            with torch.no_grad():
                probs = F.softmax(model(xb).float(), dim=-1)
            if exact:
                for c in range(probs.shape[1]):
                    add(xb, torch.full((len(xb),), c, dtype=torch.long, device=xb.device), probs[:, c].to(xb.dtype))
            else:
                ys = torch.multinomial(probs.cpu(), mc_samples, replacement=True, generator=generator).to(xb.device)
                add(xb.repeat_interleave(mc_samples, 0), ys.reshape(-1))
    count = len(x) * (1 if exact else mc_samples)
    return {n: a / count for n, a in acc.items()}


def per_filter(fisher: Tensor) -> Tensor:
    """Average a weight's Fisher over each filter / unit (all dims but the first)."""
    return fisher.reshape(fisher.shape[0], -1).mean(1) if fisher.dim() > 1 else fisher


# ===================================================================================== embeddings
@dataclass
class TaskEmbedding:
    """The Task2Vec embedding of one task: per-filter mean Fisher, layer by layer.

    ``vector [D]`` concatenates the layers in ``layers`` (``layer_sizes`` entries each).
    """

    vector: Tensor
    layers: list[str]
    layer_sizes: list[int]
    name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if sum(self.layer_sizes) != self.vector.numel():
            raise ValueError(f"layer_sizes {self.layer_sizes} sum to {sum(self.layer_sizes)} but the vector has "
                             f"{self.vector.numel()} entries")

    def layer(self, name: str) -> Tensor:
        i = self.layers.index(name)
        lo = sum(self.layer_sizes[:i])
        return self.vector[lo: lo + self.layer_sizes[i]]

    @property
    def norm(self) -> float:
        """L1 norm, which the paper relates to the task's difficulty."""
        return float(self.vector.abs().sum())


EmbeddingLike = Union[TaskEmbedding, Tensor]


class Task2Vec:
    """Embeds classification tasks through a fixed probe network.

    Args:
        probe: an ``nn.Module`` or ``LightningModule`` (never modified; a copy is used).
        network, head: which part of the probe maps inputs to logits and which layer is the
            classifier head to replace (see :class:`ProbeAdapter`).
        layers: modules (or parameters) of ``network`` whose Fisher forms the embedding, by dotted
            name; default all conv and linear layers outside the head. One entry per filter/unit.
        mc_samples: labels sampled from the model per example (Monte-Carlo Fisher).
        exact: take the expectation over labels exactly instead of sampling (costs one gradient
            per class per example).
        max_examples: use at most this many examples of a task (a seeded random subset).
        batch_size: examples per vmapped per-example-gradient call (memory ~ batch_size x weights).
        head_steps, head_weight_decay: L-BFGS iterations and L2 penalty of the head fit. The
            penalty keeps the head's predictions calibrated: an over-confident head (separable
            features, no penalty) makes the sampled-label gradients, hence the Fisher, vanish on
            most examples and the embedding noisy.
        bn_stats: ``"task"``: BatchNorm layers normalise with statistics computed on the task's
            examples (works for probes without running statistics); ``"probe"``: keep the
            probe's running statistics.
        seed: seeds the example subset and the sampled labels (the global RNG is not touched).
    """

    def __init__(self, probe: nn.Module, network: Optional[str] = None, head: Optional[str] = "auto",
                 layers: Optional[Sequence[str]] = None, mc_samples: int = 1, exact: bool = False,
                 max_examples: Optional[int] = None, batch_size: int = 64, head_steps: int = 100,
                 head_weight_decay: float = 1e-2, bn_stats: Literal["task", "probe"] = "task", seed: int = 0) -> None:
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_examples is not None and max_examples < 2:
            raise ValueError(f"max_examples must be >= 2 (or None for all), got {max_examples}")
        if head_steps < 0 or head_weight_decay < 0:
            raise ValueError(f"head_steps and head_weight_decay must be >= 0, got {head_steps}, {head_weight_decay}")
        if bn_stats not in ("task", "probe"):
            raise ValueError(f"bn_stats must be 'task' or 'probe', got {bn_stats!r}")
        self.adapter = ProbeAdapter(probe, network, head)
        self.params = self.adapter.parameter_names(layers)
        self.layers = [name for name, _ in self.params]
        self.mc_samples, self.exact, self.max_examples = mc_samples, exact, max_examples
        self.batch_size, self.head_steps, self.head_weight_decay = batch_size, head_steps, head_weight_decay
        self.bn_stats, self.seed = bn_stats, seed

    @property
    def device(self) -> torch.device:
        p = next(self.adapter.network.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _subset(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        if self.max_examples is not None and len(x) > self.max_examples:
            idx = torch.randperm(len(x), generator=gen)[: self.max_examples]
            x, y = x[idx], y[idx]
        return x, y

    def prepare(self, x: Tensor) -> nn.Module:
        """The probe's feature extractor for a task with inputs ``x``: a copy with fixed BN statistics."""
        body = self.adapter.body(x[: min(len(x), 8)])
        if self.bn_stats == "task":
            set_batchnorm_stats(body, x, self.batch_size)
        else:
            _check_probe_bn_stats(body)
        return body

    def embed(self, data: TaskData, name: str = "") -> TaskEmbedding:
        """The Task2Vec embedding of one task (``data`` as in :func:`task_tensors`)."""
        x, y = task_tensors(data, name)
        gen = torch.Generator().manual_seed(self.seed)
        x, y = self._subset(x, y, gen)
        classes, y = torch.unique(y, return_inverse=True)
        what = f"task {name!r}" if name else "the task"
        if len(classes) < 2:
            raise ValueError(f"{what} has a single class ({int(classes[0])}) among its {len(y)} examples: its Fisher "
                             f"is zero and no head can be fitted; give it examples of at least two classes.")
        x, y = x.to(self.device), y.to(self.device)
        body = self.prepare(x)
        fit = fit_linear_head(self.adapter.features(body, x, self.batch_size), y, len(classes), self.head_steps,
                              self.head_weight_decay)
        model = _ProbeWithHead(body, fit.head).eval()
        names = [f"body.{p}" for _, p in self.params]
        fisher = fisher_diagonal(model, x, names, mc_samples=self.mc_samples, exact=self.exact,
                                 batch_size=self.batch_size, generator=gen)
        parts = [per_filter(fisher[n]).detach().float().cpu() for n in names]
        meta = dict(num_examples=len(x), num_classes=len(classes), head_train_error=fit.error,
                    head_train_loss=fit.loss, mc_samples=None if self.exact else self.mc_samples, exact=self.exact)
        return TaskEmbedding(torch.cat(parts), list(self.layers), [len(p) for p in parts], name, meta)

    def embed_tasks(self, tasks: Mapping[str, TaskData]) -> list[TaskEmbedding]:
        """Embed every task of a ``name -> data`` mapping, in order."""
        if not tasks:
            raise ValueError("no tasks to embed: the mapping of tasks is empty")
        return [self.embed(data, str(name)) for name, data in tasks.items()]


# ===================================================================================== distances
def _vector(e: EmbeddingLike, what: str = "embedding") -> Tensor:
    v = e.vector if isinstance(e, TaskEmbedding) else torch.as_tensor(e)
    v = v.detach().to(torch.float64).reshape(-1)
    if v.numel() == 0:
        raise ValueError(f"the {what} is empty")
    if not torch.isfinite(v).all():
        raise ValueError(f"the {what} has non-finite entries; re-embed the task (a diverged probe or head?)")
    if (v < 0).any():
        raise ValueError(f"the {what} has negative entries ({float(v.min()):.3g}); Task2Vec embeddings are Fisher "
                         f"diagonals, which are >= 0")
    return v


def _stack(embeddings: Sequence[EmbeddingLike]) -> Tensor:
    if isinstance(embeddings, Tensor):
        embeddings = list(embeddings) if embeddings.dim() == 2 else [embeddings]
    if len(embeddings) == 0:
        raise ValueError("no embeddings given")
    vs = [_vector(e, f"embedding {i}") for i, e in enumerate(embeddings)]
    sizes = {v.numel() for v in vs}
    if len(sizes) > 1:
        raise ValueError(f"embeddings have different lengths {sorted(sizes)}: compare only embeddings made with the "
                         f"same probe and layers")
    return torch.stack(vs)


def _pairwise_symmetric(a: Tensor, b: Tensor) -> Tensor:
    """``d_sym`` between every row of ``a [m, D]`` and every row of ``b [n, D]`` -> ``[m, n]``.

    Entries that are zero in both embeddings carry no information and are left out; two all-zero
    embeddings are at distance 0, an all-zero and a non-zero one at distance 1.
    """
    s = a[:, None, :] + b[None, :, :]
    pos = s > 0
    safe = torch.where(pos, s, torch.ones_like(s))
    u = torch.where(pos, a[:, None, :] / safe, torch.zeros_like(s))
    v = torch.where(pos, b[None, :, :] / safe, torch.zeros_like(s))
    nu, nv = u.norm(dim=-1), v.norm(dim=-1)
    cos = (u * v).sum(-1) / (nu * nv).clamp_min(1e-300)
    cos = torch.where((nu > 0) & (nv > 0), cos, torch.zeros_like(cos))
    cos = torch.where(~pos.any(-1), torch.ones_like(cos), cos)  # both all-zero: identical
    return (1.0 - cos).clamp(0.0, 1.0)


def symmetric_distance(a: EmbeddingLike, b: EmbeddingLike) -> float:
    """``d_sym(a, b) = d_cos(F_a / (F_a + F_b), F_b / (F_a + F_b))``: symmetric, 0 for identical
    embeddings (and for proportional ones), in [0, 1]. Entries that are 0 in both are left out."""
    va, vb = _stack([a, b])
    return float(_pairwise_symmetric(va[None], vb[None])[0, 0])


def trivial_embedding(reference: Union[EmbeddingLike, Sequence[EmbeddingLike]]) -> TaskEmbedding:
    """The probe's trivial embedding ``t0``: an isotropic Fisher, every filter of a layer equally
    informative, at the layer's mean level over ``reference`` (one or more embeddings of the probe).

    With plain tensors (no layer structure) the whole vector is one layer.
    """
    refs = [reference] if isinstance(reference, TaskEmbedding) or (
        isinstance(reference, Tensor) and reference.dim() == 1) else list(reference)
    vs = _stack(refs)
    first = refs[0]
    layers, sizes = (first.layers, first.layer_sizes) if isinstance(first, TaskEmbedding) else (["all"], [vs.shape[1]])
    mean = vs.mean(0)
    parts, lo = [], 0
    for size in sizes:
        parts.append(mean[lo: lo + size].mean().expand(size))
        lo += size
    return TaskEmbedding(torch.cat(parts).float(), list(layers), list(sizes), "trivial", {"reference": len(refs)})


def asymmetric_distance(a: EmbeddingLike, b: EmbeddingLike, trivial: Optional[EmbeddingLike] = None,
                        alpha: float = DEFAULT_ALPHA) -> float:
    """``d_asym(a -> b) = d_sym(a, b) - alpha * d_sym(a, t0)``: how well the source task ``a`` (e.g.
    an expert's training task) transfers to the target ``b``; ``t0`` defaults to
    ``trivial_embedding([a, b])``."""
    t0 = trivial if trivial is not None else trivial_embedding([a, b])
    return symmetric_distance(a, b) - alpha * symmetric_distance(a, t0)


def distance_matrix(embeddings: Sequence[EmbeddingLike], kind: Literal["symmetric", "asymmetric"] = "symmetric",
                    alpha: float = DEFAULT_ALPHA, trivial: Optional[EmbeddingLike] = None) -> Tensor:
    """``[T, T]`` matrix of ``d_sym`` (or ``d_asym(i -> j)`` at row i, column j) over a set of tasks.

    For ``"asymmetric"``, ``trivial`` defaults to ``trivial_embedding(embeddings)``.
    """
    if kind not in ("symmetric", "asymmetric"):
        raise ValueError(f"kind must be 'symmetric' or 'asymmetric', got {kind!r}")
    vs = _stack(embeddings)
    d = _pairwise_symmetric(vs, vs)
    d.fill_diagonal_(0.0)
    if kind == "asymmetric":
        t0 = _vector(trivial if trivial is not None else trivial_embedding(list(embeddings)), "trivial embedding")
        if t0.numel() != vs.shape[1]:
            raise ValueError(f"the trivial embedding has {t0.numel()} entries but the embeddings have {vs.shape[1]}")
        d = d - alpha * _pairwise_symmetric(vs, t0[None])  # [T, 1] broadcast over targets
    return d.float()


# ===================================================================================== descriptors and files
def task_descriptors(embeddings: Sequence[EmbeddingLike],
                     transform: Literal["log_standardize", "l2", "none"] = "log_standardize") -> Tensor:
    """Embeddings as a ``[T, D]`` task-descriptor tensor (the z_i of a multi-task network).

    ``"log_standardize"``: ``log`` of the Fisher (its entries span orders of magnitude), then each
    dimension standardised over the tasks; ``"l2"``: each embedding divided by its norm; ``"none"``.
    """
    vs = _stack(embeddings)
    if transform == "none":
        out = vs
    elif transform == "l2":
        out = vs / vs.norm(dim=1, keepdim=True).clamp_min(1e-300)
    elif transform == "log_standardize":
        pos = vs[vs > 0]
        floor = float(pos.min()) * 1e-3 if pos.numel() else 1e-30
        logs = torch.log(vs + floor)
        std = logs.std(0, unbiased=False) if len(vs) > 1 else torch.zeros(vs.shape[1], dtype=vs.dtype)
        out = (logs - logs.mean(0)) / torch.where(std > 1e-12, std, torch.ones_like(std))
    else:
        raise ValueError(f"transform must be 'log_standardize', 'l2' or 'none', got {transform!r}")
    return out.float()


def save_embeddings(path: Union[str, Path], embeddings: Sequence[TaskEmbedding], alpha: float = DEFAULT_ALPHA,
                    descriptor_transform: Literal["log_standardize", "l2", "none"] = "log_standardize") -> dict:
    """Write embeddings, both distance matrices and the ``[T, D]`` descriptors to one ``.pt`` file.

    The file holds ``names``, ``embeddings [T, D]``, ``layers``, ``layer_sizes``, ``meta``,
    ``distance_symmetric``, ``distance_asymmetric``, ``trivial``, ``alpha`` and ``descriptors``
    (what a multi-task DataModule takes as task descriptors). Returns that dict.
    """
    if not embeddings:
        raise ValueError("no embeddings to save")
    trivial = trivial_embedding(list(embeddings))
    out = dict(names=[e.name for e in embeddings], embeddings=_stack(embeddings).float(),
               layers=list(embeddings[0].layers), layer_sizes=list(embeddings[0].layer_sizes),
               meta=[_plain(dict(e.meta), f"meta of {e.name!r}") for e in embeddings],
               distance_symmetric=distance_matrix(embeddings),
               distance_asymmetric=distance_matrix(embeddings, "asymmetric", alpha, trivial),
               trivial=trivial.vector, alpha=alpha, descriptors=task_descriptors(embeddings, descriptor_transform),
               descriptor_transform=descriptor_transform)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def _plain(value, where: str):
    """``value`` as plain containers, numbers, strings and tensors (what ``weights_only`` loads)."""
    if isinstance(value, (str, int, float, bool, type(None), Tensor)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    raise ValueError(f"the {where} holds a {type(value).__name__}; embeddings files store numbers, strings, "
                     f"tensors, lists and dicts only")


def load_embeddings(path: Union[str, Path]) -> list[TaskEmbedding]:
    """The embeddings of a file written by :func:`save_embeddings`.

    The file is read with ``weights_only=True``: tensors and plain containers only, never code.
    """
    try:
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path} holds objects other than tensors and plain containers, which are not loaded "
                         f"(that would run code from the file); write embeddings with save_embeddings") from err
    if not isinstance(data, dict) or "embeddings" not in data:
        raise ValueError(f"{path} is not a Task2Vec embeddings file (no 'embeddings' entry); write it with "
                         f"save_embeddings or scripts/embed_tasks.py")
    return [TaskEmbedding(v, list(data["layers"]), list(data["layer_sizes"]), n, m)
            for v, n, m in zip(data["embeddings"], data["names"], data["meta"])]


# ===================================================================================== expert selection
@dataclass
class ExpertRanking:
    """Experts sorted by ``d_asym(expert task -> new task)``, nearest first."""

    task: str
    experts: list[str]
    distances: list[float]

    @property
    def chosen(self) -> str:
        return self.experts[0]


def rank_experts(task: EmbeddingLike, experts: Mapping[str, EmbeddingLike], alpha: float = DEFAULT_ALPHA,
                 trivial: Optional[EmbeddingLike] = None) -> ExpertRanking:
    """Rank experts by the asymmetric distance from their training task to the new ``task``.

    ``experts`` maps an expert's name to the embedding of the task it was trained on (made with
    the same probe). ``trivial`` defaults to ``trivial_embedding`` of the experts' embeddings.
    """
    if not experts:
        raise ValueError("no experts to rank: the mapping of expert embeddings is empty")
    names = list(experts)
    t0 = trivial if trivial is not None else trivial_embedding([experts[n] for n in names])
    vs = _stack([experts[n] for n in names] + [task])
    t = _vector(t0, "trivial embedding")
    if t.numel() != vs.shape[1]:
        raise ValueError(f"the trivial embedding has {t.numel()} entries but the embeddings have {vs.shape[1]}")
    d = _pairwise_symmetric(vs[:-1], vs[-1:])[:, 0] - alpha * _pairwise_symmetric(vs[:-1], t[None])[:, 0]
    order = torch.argsort(d, stable=True).tolist()
    name = task.name if isinstance(task, TaskEmbedding) else ""
    return ExpertRanking(name, [names[i] for i in order], [float(d[i]) for i in order])


def train_classifier(net: nn.Module, x: Tensor, y: Tensor, epochs: int, lr: float = 3e-3, batch_size: int = 64,
                     seed: int = 0) -> nn.Module:
    """Train ``net`` (logits over the classes of ``y``, remapped to ``0..C-1``) with Adam and
    cross-entropy for ``epochs`` passes in seeded random order: a quick way to make a probe or an
    expert from a labelled data set. Returns ``net`` in eval mode."""
    x, y = task_tensors((x, y))
    _, y = torch.unique(y, return_inverse=True)
    opt = torch.optim.Adam(net.parameters(), lr)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=gen)
            for s in _batches(len(x), batch_size):
                idx = perm[s]
                loss = F.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return net.eval()


def load_expert(source: Union[str, Path, nn.Module], module_class: Optional[type] = None) -> nn.Module:
    """An expert model from a module, a Lightning checkpoint (``.ckpt``) or a pickled module (``.pt``).

    A ``.ckpt`` written by a LightningCLI run (or any module that calls ``save_hyperparameters``)
    loads without ``module_class``; other checkpoints need the LightningModule class.
    """
    if isinstance(source, nn.Module):
        return source
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"expert checkpoint {path} does not exist")
    if path.suffix == ".ckpt":
        from lightning.pytorch import LightningModule

        cls = module_class or LightningModule
        try:
            model = cls.load_from_checkpoint(str(path), map_location="cpu")
        except Exception as err:  # noqa: BLE001 - say how to fix it
            raise ValueError(f"cannot load expert checkpoint {path} with {cls.__name__}: {err}. Pass the "
                             f"LightningModule class that wrote it (module_class=...).") from err
        return model.eval()
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), nn.Module):
        obj = obj["model"]
    if not isinstance(obj, nn.Module):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not an nn.Module; save experts with "
                         f"torch.save(model, path) or as Lightning checkpoints (.ckpt)")
    return obj.eval()


def transfer_error(expert: nn.Module, train: TaskData, test: TaskData, network: Optional[str] = None,
                   head: Optional[str] = "auto", head_steps: int = 100, head_weight_decay: float = 1e-2,
                   batch_size: int = 256) -> float:
    """Test error of an expert's frozen features with a linear head fitted on the new task's ``train``.

    BatchNorm statistics come from the training examples (as when embedding a task).
    """
    xtr, ytr = task_tensors(train, "train")
    xte, yte = task_tensors(test, "test")
    classes, ytr = torch.unique(ytr, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"the new task's training split has a single class ({int(classes[0])}); give it at least "
                         f"two classes")
    unseen = sorted(set(yte.tolist()) - set(classes.tolist()))
    if unseen:
        raise ValueError(f"test labels {unseen[:10]} do not occur in the training split; every test class needs "
                         f"training examples")
    adapter = ProbeAdapter(expert, network, head)
    dev = next((p.device for p in adapter.network.parameters()), torch.device("cpu"))
    xtr, ytr, xte = xtr.to(dev), ytr.to(dev), xte.to(dev)
    body = adapter.body(xtr[:8])
    set_batchnorm_stats(body, xtr, batch_size)
    fit = fit_linear_head(adapter.features(body, xtr, batch_size), ytr, len(classes), head_steps, head_weight_decay)
    with torch.no_grad():
        pred = classes.to(dev)[fit.head(adapter.features(body, xte, batch_size)).argmax(-1)]
    return float((pred.cpu() != yte).float().mean())


@dataclass
class ExpertSelection:
    """One new task: its embedding, the Task2Vec ranking and every expert's test error after fitting a head."""

    embedding: TaskEmbedding
    ranking: ExpertRanking
    errors: dict[str, float]
    generic_error: Optional[float] = None

    @property
    def task2vec_error(self) -> float:
        return self.errors[self.ranking.chosen]

    @property
    def oracle(self) -> str:
        return min(self.errors, key=self.errors.__getitem__)

    @property
    def oracle_error(self) -> float:
        return self.errors[self.oracle]

    @property
    def random_error(self) -> float:
        """Expected test error of an expert chosen uniformly at random."""
        return sum(self.errors.values()) / len(self.errors)


def evaluate_expert_selection(embedder: Task2Vec, experts: Mapping[str, Union[nn.Module, str, Path]],
                              expert_tasks: Mapping[str, Union[TaskData, TaskEmbedding]], train: TaskData,
                              test: TaskData, name: str = "", generic: Union[nn.Module, str, Path, None] = None,
                              alpha: float = DEFAULT_ALPHA, network: Optional[str] = None,
                              head: Optional[str] = "auto", head_steps: int = 100,
                              head_weight_decay: float = 1e-2) -> ExpertSelection:
    """Choose an expert for a new task with Task2Vec, and score every choice.

    ``experts`` maps names to expert models (modules or checkpoint paths, see :func:`load_expert`);
    ``expert_tasks`` maps the same names to the task each expert was trained on (data, embedded with
    ``embedder``'s probe, or a ready embedding). The new task's ``train`` split is embedded and
    used to fit each expert's head; ``test`` gives the errors. ``generic`` is a fixed expert scored
    the same way. ``network``/``head`` locate the experts' feature extractors.
    """
    missing = sorted(set(experts) - set(expert_tasks))
    if missing:
        raise ValueError(f"experts {missing} have no training task in expert_tasks; give each expert the data (or "
                         f"embedding) of the task it was trained on")
    expert_emb = {n: (expert_tasks[n] if isinstance(expert_tasks[n], TaskEmbedding)
                      else embedder.embed(expert_tasks[n], n)) for n in experts}
    embedding = embedder.embed(train, name)
    ranking = rank_experts(embedding, expert_emb, alpha)
    score = dict(network=network, head=head, head_steps=head_steps, head_weight_decay=head_weight_decay)
    errors = {n: transfer_error(load_expert(m), train, test, **score) for n, m in experts.items()}
    generic_error = transfer_error(load_expert(generic), train, test, **score) if generic is not None else None
    return ExpertSelection(embedding, ranking, errors, generic_error)
