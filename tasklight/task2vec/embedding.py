"""Task2Vec task embeddings (Achille et al., ICCV 2019).

A task (a labelled classification data set) is embedded through a fixed *probe* network:

1. a copy of the probe's feature extractor is kept frozen and a new linear classifier head is
   fitted on the task (only the head is trained; :func:`~tasklight.task2vec.fisher.fit_linear_head`);
2. the diagonal of the Fisher information of the chosen layers' weights is estimated, either

   * ``method="variational"`` (the paper's embeddings): a learned posterior variance per filter
     (:func:`~tasklight.task2vec.fisher.variational_fisher`, ``beta = 1e-7``); the embedding is the
     per-filter precision ``1 / sigma_f^2``, and the layer's prior precision ``1 / lambda^2`` is kept
     as ``scale`` (it defines the trivial embedding), or
   * ``method="montecarlo"`` (cheaper on small probes): ``F = E_x E_{y ~ p_w(y|x)}
     [(d/dw log p_w(y|x))^2]`` with labels *sampled from the model* and per-example gradients
     (``exact=True`` takes the expectation over labels exactly), averaged over each filter's
     weights (:func:`~tasklight.task2vec.fisher.fisher_diagonal`);

3. one number per filter (conv) or unit (linear): a fixed-length vector whatever the task's number
   of classes.

Distances are in :mod:`tasklight.task2vec.distances`, expert selection in
:mod:`tasklight.task2vec.experts`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Optional, Sequence, Union

import warnings

import torch
from torch import Tensor, nn

from tasklight.task2vec.data import TaskData, _batches, task_tensors
from tasklight.task2vec.fisher import fisher_diagonal, fit_linear_head, per_filter, variational_fisher
from tasklight.task2vec.probe import ProbeAdapter, _check_probe_bn_stats, _ProbeWithHead, set_batchnorm_stats
from tasklight.core.checks import check_int, check_real

DEFAULT_ALPHA = 0.15  # the value the paper found robust across meta-tasks (ResNet-34 probe)
METHODS = ("montecarlo", "variational")


@dataclass
class TaskEmbedding:
    """The Task2Vec embedding of one task: one Fisher value per filter, layer by layer.

    ``vector [D]`` concatenates the layers in ``layers`` (``layer_sizes`` entries each).
    ``scale [D]`` (variational embeddings) is each entry's prior precision ``1 / lambda^2`` (one
    value per layer): the embedding of a task that carries no information, used as the trivial
    embedding by the asymmetric distance. ``None`` for Monte-Carlo embeddings.
    """

    vector: Tensor
    layers: list[str]
    layer_sizes: list[int]
    name: str = ""
    meta: dict = field(default_factory=dict)
    scale: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if sum(self.layer_sizes) != self.vector.numel():
            raise ValueError(f"layer_sizes {self.layer_sizes} sum to {sum(self.layer_sizes)} but the vector has "
                             f"{self.vector.numel()} entries")
        if self.scale is not None and self.scale.shape != self.vector.shape:
            raise ValueError(f"scale has shape {tuple(self.scale.shape)} but the vector has {tuple(self.vector.shape)}")

    def layer(self, name: str) -> Tensor:
        i = self.layers.index(name)
        lo = sum(self.layer_sizes[:i])
        return self.vector[lo: lo + self.layer_sizes[i]]

    @property
    def norm(self) -> float:
        """L1 norm, which the paper relates to the task's difficulty."""
        return float(self.vector.abs().sum())


EmbeddingLike = Union[TaskEmbedding, Tensor]


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


class Task2Vec:
    """Embeds classification tasks through a fixed probe network.

    Args:
        probe: an ``nn.Module`` or ``LightningModule`` (never modified; a copy is used), e.g. a
            Conv4 from :func:`~tasklight.task2vec.probe.omniglot_probe` or a pretrained torchvision
            / timm model from :func:`~tasklight.task2vec.probe.pretrained_probe`.
        network, head: which part of the probe maps inputs to logits and which layer is the
            classifier head to replace (see :class:`~tasklight.task2vec.probe.ProbeAdapter`).
        layers: modules (or parameters) of ``network`` whose Fisher forms the embedding, by dotted
            name; default all conv and linear layers outside the head. One entry per filter/unit.
        method: ``"variational"`` (the paper's estimate: learned per-filter posterior variances) or
            ``"montecarlo"`` (per-example gradients with sampled labels).
        mc_samples: labels sampled from the model per example (Monte-Carlo Fisher).
        exact: Monte-Carlo method only: take the expectation over labels exactly instead of
            sampling (costs one gradient per class per example).
        beta, variational_steps, variational_lr, variational_batch_size: the variational estimate's
            KL weight (the paper's code: 1e-7, for an ImageNet ResNet-34 whose Fisher per weight is
            tiny; the learned precision is about ``Fisher / (2 beta) + prior``, so a small probe with a
            large Fisher per weight needs a larger beta, e.g. 1e-4 for Conv4 on Omniglot), Adam
            steps, learning rate on the log-variances (0.1: they have to move by several nats; the
            iterates of the last half are averaged) and minibatch size (see
            :func:`~tasklight.task2vec.fisher.variational_fisher`). A warning says when the
            variances had not settled.
        max_examples: use at most this many examples of a task (a seeded random subset).
        batch_size: examples per vmapped per-example-gradient call (memory ~ batch_size x weights)
            and per forward pass when computing features.
        head_steps, head_weight_decay: L-BFGS iterations and L2 penalty of the head fit. The
            penalty keeps the head's predictions calibrated: an over-confident head (separable
            features, no penalty) makes the sampled-label gradients, hence the Fisher, vanish on
            most examples and the embedding noisy.
        bn_stats: ``"task"``: BatchNorm layers normalise with statistics computed on the task's
            examples (works for probes without running statistics); ``"probe"``: keep the
            probe's running statistics (a pretrained network's).
        input_transform: applied to the task's inputs (in batches) before the probe, e.g. the
            :class:`~tasklight.task2vec.probe.ImageTransform` of a pretrained probe.
        seed: seeds the example subset, the sampled labels and the weight noise (the global RNG
            is not touched).
    """

    def __init__(self, probe: nn.Module, network: Optional[str] = None, head: Optional[str] = "auto",
                 layers: Optional[Sequence[str]] = None, method: Literal["montecarlo", "variational"] = "montecarlo",
                 mc_samples: int = 1, exact: bool = False, beta: float = 1e-7, variational_steps: int = 200,
                 variational_lr: float = 0.1, variational_batch_size: int = 32,
                 max_examples: Optional[int] = None, batch_size: int = 64, head_steps: int = 100,
                 head_weight_decay: float = 1e-2, bn_stats: Literal["task", "probe"] = "task",
                 input_transform: Optional[Callable[[Tensor], Tensor]] = None, seed: int = 0) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be 'variational' or 'montecarlo', got {method!r}")
        if exact and method != "montecarlo":
            raise ValueError("exact=True computes the Monte-Carlo Fisher's expectation over labels exactly; it has "
                             "no meaning with method='variational' (drop exact, or use method='montecarlo')")
        for name, value, low in (("mc_samples", mc_samples, 1), ("variational_steps", variational_steps, 1),
                                 ("variational_batch_size", variational_batch_size, 1), ("batch_size", batch_size, 1),
                                 ("head_steps", head_steps, 0), ("seed", seed, 0)):
            check_int("Task2Vec", name, value, low)
        for name, value in (("beta", beta), ("variational_lr", variational_lr)):
            check_real("Task2Vec", name, value, 0.0, strict=True)
        check_real("Task2Vec", "head_weight_decay", head_weight_decay, 0.0)
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
        if beta <= 0 or variational_steps < 1 or variational_lr <= 0 or variational_batch_size < 1:
            raise ValueError(f"beta and variational_lr must be > 0, variational_steps and variational_batch_size "
                             f">= 1; got {beta}, {variational_lr}, {variational_steps}, {variational_batch_size}")
        if input_transform is not None and not callable(input_transform):
            raise TypeError(f"input_transform must be callable (tensor -> tensor), got {type(input_transform).__name__}")
        self.adapter = ProbeAdapter(probe, network, head)
        self.params = self.adapter.parameter_names(layers)
        self.layers = [name for name, _ in self.params]
        if method == "variational":
            for name, pname in self.params:
                if not pname.endswith("weight") or not isinstance(
                        self.adapter.network.get_submodule(pname.rpartition(".")[0]), (nn.Conv1d, nn.Conv2d,
                                                                                      nn.Conv3d, nn.Linear)):
                    raise ValueError(f"method='variational' puts a posterior on conv/linear layers' weights; layer "
                                     f"{name!r} ({pname!r}) is not one: name conv or linear modules in `layers`")
        self.method, self.mc_samples, self.exact, self.max_examples = method, mc_samples, exact, max_examples
        self.beta, self.variational_steps, self.variational_lr = beta, variational_steps, variational_lr
        self.variational_batch_size = variational_batch_size
        self.batch_size, self.head_steps, self.head_weight_decay = batch_size, head_steps, head_weight_decay
        self.bn_stats, self.input_transform, self.seed = bn_stats, input_transform, seed

    @property
    def device(self) -> torch.device:
        p = next(self.adapter.network.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _subset(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        if self.max_examples is not None and len(x) > self.max_examples:
            idx = torch.randperm(len(x), generator=gen)[: self.max_examples]
            x, y = x[idx], y[idx]
        return x, y

    def transform(self, x: Tensor) -> Tensor:
        """The task's inputs as the probe takes them (``input_transform``, in batches)."""
        if self.input_transform is None:
            return x
        with torch.no_grad():
            return torch.cat([self.input_transform(x[s]) for s in _batches(len(x), self.batch_size)])

    def prepare(self, x: Tensor) -> nn.Module:
        """The probe's feature extractor for a task with (transformed) inputs ``x``: a copy with fixed
        BN statistics."""
        body = self.adapter.body(x[: min(len(x), 8)])
        if self.bn_stats == "task":
            set_batchnorm_stats(body, x, self.batch_size)
        else:
            _check_probe_bn_stats(body)
        return body

    def embed(self, data: TaskData, name: str = "") -> TaskEmbedding:
        """The Task2Vec embedding of one task (``data`` as in :func:`~tasklight.task2vec.data.task_tensors`)."""
        x, y = task_tensors(data, name)
        gen = torch.Generator().manual_seed(self.seed)
        x, y = self._subset(x, y, gen)
        classes, y = torch.unique(y, return_inverse=True)
        what = f"task {name!r}" if name else "the task"
        if len(classes) < 2:
            raise ValueError(f"{what} has a single class ({int(classes[0])}) among its {len(y)} examples: its Fisher "
                             f"is zero and no head can be fitted; give it examples of at least two classes.")
        x, y = self.transform(x.to(self.device)), y.to(self.device)
        body = self.prepare(x)
        fit = fit_linear_head(self.adapter.features(body, x, self.batch_size), y, len(classes), self.head_steps,
                              self.head_weight_decay)
        model = _ProbeWithHead(body, fit.head).eval()
        meta = dict(num_examples=len(x), num_classes=len(classes), head_train_error=fit.error,
                    head_train_loss=fit.loss, method=self.method)
        scale = None
        if self.method == "variational":
            modules = [f"body.{p.rpartition('.')[0]}" for _, p in self.params]
            vf = variational_fisher(model, x, y, modules, beta=self.beta, steps=self.variational_steps,
                                    lr=self.variational_lr, batch_size=self.variational_batch_size, generator=gen)
            parts = [vf.precision[m].float().cpu() for m in modules]
            scale = torch.cat([vf.prior_precision[m].float().cpu().expand(len(p)) for m, p in zip(modules, parts)])
            meta.update(beta=self.beta, variational_steps=self.variational_steps, drift=vf.drift,
                        final_loss=sum(vf.losses[-10:]) / len(vf.losses[-10:]))
            if vf.drift > 0.25:
                warnings.warn(f"Task2Vec variational Fisher of {what}: the posterior variances were still moving "
                              f"(mean drift {vf.drift:.2f} in log-variance over the averaged steps); raise "
                              f"variational_steps or variational_lr, or raise beta (the precision to reach is about "
                              f"Fisher / (2 beta): small probes have a large Fisher per weight and need a larger beta "
                              f"than the paper's 1e-7, see docs/task2vec.md)", stacklevel=2)
        else:
            names = [f"body.{p}" for _, p in self.params]
            fisher = fisher_diagonal(model, x, names, mc_samples=self.mc_samples, exact=self.exact,
                                     batch_size=self.batch_size, generator=gen)
            parts = [per_filter(fisher[n]).detach().float().cpu() for n in names]
            meta.update(mc_samples=None if self.exact else self.mc_samples, exact=self.exact)
        return TaskEmbedding(torch.cat(parts), list(self.layers), [len(p) for p in parts], name, meta, scale)

    def embed_tasks(self, tasks: Mapping[str, TaskData]) -> list[TaskEmbedding]:
        """Embed every task of a ``name -> data`` mapping, in order."""
        if not tasks:
            raise ValueError("no tasks to embed: the mapping of tasks is empty")
        return [self.embed(data, str(name)) for name, data in tasks.items()]
