"""Expert selection (Achille et al. 2019, Sect. 5): rank expert models by the asymmetric distance
from their training task to a new task, and score the choice against the oracle, a random expert and a
generic one by the test error of each expert's features on the new task."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasklight.task2vec.data import TaskData, _batches, task_tensors
from tasklight.task2vec.distances import _pairwise_symmetric, _rowwise_symmetric, _trivial_rows
from tasklight.task2vec.embedding import DEFAULT_ALPHA, EmbeddingLike, Task2Vec, TaskEmbedding, _stack
from tasklight.task2vec.fisher import fit_linear_head
from tasklight.task2vec.probe import ProbeAdapter, set_batchnorm_stats


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
    the same probe). ``trivial`` defaults to each expert's own trivial embedding (see
    :func:`~tasklight.task2vec.distances.trivial_embedding`).
    """
    if not experts:
        raise ValueError("no experts to rank: the mapping of expert embeddings is empty")
    names = list(experts)
    vs = _stack([experts[n] for n in names] + [task])
    t0 = _trivial_rows([experts[n] for n in names], trivial, vs.shape[1])
    d = _pairwise_symmetric(vs[:-1], vs[-1:])[:, 0] - alpha * _rowwise_symmetric(vs[:-1], t0)
    order = torch.argsort(d, stable=True).tolist()
    name = task.name if isinstance(task, TaskEmbedding) else ""
    return ExpertRanking(name, [names[i] for i in order], [float(d[i]) for i in order])


def load_expert(source: Union[str, Path, nn.Module], module_class: Optional[type] = None,
                allow_pickle: bool = False) -> nn.Module:
    """An expert model from a module, a Lightning checkpoint (``.ckpt``) or a pickled module (``.pt``).

    A ``.ckpt`` written by a LightningCLI run (or any module that calls ``save_hyperparameters``)
    loads without ``module_class``; other checkpoints need the LightningModule class.
    A pickled module is code: unpickling it runs whatever the file says, so it is read only with
    ``allow_pickle=True`` (for files you wrote yourself); without it such a file is refused unread.
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
    if not allow_pickle:
        raise ValueError(f"expert {path} is not a Lightning checkpoint (.ckpt): a pickled module runs code stored "
                         f"in the file when it is loaded, so it is not read. Pass allow_pickle=True (embed_tasks.py: "
                         f"--allow_pickle true) if you wrote the file yourself, or save the expert as a Lightning "
                         f"checkpoint (.ckpt)")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), nn.Module):
        obj = obj["model"]
    if not isinstance(obj, nn.Module):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not an nn.Module; save experts with "
                         f"torch.save(model, path) or as Lightning checkpoints (.ckpt)")
    return obj.eval()


def _split(train: TaskData, test: TaskData) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
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
    return xtr, ytr, xte, yte, classes


def _transformed(x: Tensor, transform: Optional[Callable[[Tensor], Tensor]], batch_size: int) -> Tensor:
    if transform is None:
        return x
    with torch.no_grad():
        return torch.cat([transform(x[s]) for s in _batches(len(x), batch_size)])


def _with_linear_head(expert: nn.Module, network: Optional[str], head: Optional[str], xtr: Tensor, ytr: Tensor,
                      xte: Tensor, n_classes: int, head_steps: int, head_weight_decay: float, batch_size: int):
    """The expert's body with the training examples' BatchNorm statistics and a linear head fitted on
    its frozen features; the data moved to the expert's device."""
    adapter = ProbeAdapter(expert, network, head)
    dev = next((p.device for p in adapter.network.parameters()), torch.device("cpu"))
    xtr, ytr, xte = xtr.to(dev), ytr.to(dev), xte.to(dev)
    body = adapter.body(xtr[:8])
    set_batchnorm_stats(body, xtr, batch_size)
    fit = fit_linear_head(adapter.features(body, xtr, batch_size), ytr, n_classes, head_steps, head_weight_decay)
    return adapter, body, fit, xtr, ytr, xte


def _test_error(adapter, body: nn.Module, fit, xte: Tensor, yte: Tensor, classes: Tensor, batch_size: int) -> float:
    with torch.no_grad():
        logits = fit.head(adapter.features(body, xte, batch_size))
    pred = classes.to(logits.device)[logits.argmax(-1)]
    return float((pred.cpu() != yte).float().mean())


def transfer_error(expert: nn.Module, train: TaskData, test: TaskData, network: Optional[str] = None,
                   head: Optional[str] = "auto", head_steps: int = 100, head_weight_decay: float = 1e-2,
                   batch_size: int = 256, input_transform: Optional[Callable[[Tensor], Tensor]] = None) -> float:
    """Test error of an expert's frozen features with a linear head fitted on the new task's ``train``.

    BatchNorm statistics come from the training examples (as when embedding a task).
    """
    xtr, ytr, xte, yte, classes = _split(train, test)
    xtr, xte = _transformed(xtr, input_transform, batch_size), _transformed(xte, input_transform, batch_size)
    adapter, body, fit, xtr, ytr, xte = _with_linear_head(expert, network, head, xtr, ytr, xte, len(classes),
                                                          head_steps, head_weight_decay, batch_size)
    return _test_error(adapter, body, fit, xte, yte, classes, batch_size)


def finetune_error(expert: Optional[nn.Module], train: TaskData, test: TaskData, steps: int = 30, lr: float = 1e-3,
                   network: Optional[str] = None, head: Optional[str] = "auto", head_steps: int = 100,
                   head_weight_decay: float = 1e-2, batch_size: int = 256, seed: int = 0,
                   init: Optional[Callable[[], nn.Module]] = None) -> float:
    """Test error after fine-tuning: a head fitted on frozen features (as :func:`transfer_error`),
    then every weight trained for ``steps`` full-batch Adam steps on the new task's ``train``.

    ``expert=None`` with ``init`` (a function returning an untrained network of the same kind)
    gives the from-scratch baseline; the fine-tuning gain of an expert is the baseline's error
    minus the expert's. BatchNorm keeps the training examples' statistics throughout.
    """
    xtr, ytr, xte, yte, classes = _split(train, test)
    if expert is None:
        if init is None:
            raise ValueError("finetune_error with expert=None needs `init`, a function building the untrained network")
        torch.manual_seed(seed)
        expert = init()
    adapter, body, fit, xtr, ytr, xte = _with_linear_head(expert, network, head, xtr, ytr, xte, len(classes),
                                                          head_steps, head_weight_decay, batch_size)
    params = [p for p in body.parameters()] + [p for p in fit.head.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(fit.head(body(xtr).flatten(1)), ytr) + 0.5 * head_weight_decay * fit.head.weight.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return _test_error(adapter, body, fit, xte, yte, classes, batch_size)


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
    score = dict(network=network, head=head, head_steps=head_steps, head_weight_decay=head_weight_decay,
                 input_transform=embedder.input_transform)
    errors = {n: transfer_error(load_expert(m), train, test, **score) for n, m in experts.items()}
    generic_error = transfer_error(load_expert(generic), train, test, **score) if generic is not None else None
    return ExpertSelection(embedding, ranking, errors, generic_error)