"""Embeddings as task descriptors (the z_i of a multi-task network) and embeddings files."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Literal, Mapping, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from tasklight.task2vec.distances import distance_matrix, trivial_embedding
from tasklight.task2vec.embedding import DEFAULT_ALPHA, EmbeddingLike, TaskEmbedding, _stack


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
    ``distance_symmetric``, ``distance_asymmetric`` (each source's own trivial embedding), ``trivial``
    (the mean trivial embedding), ``alpha``, ``descriptors`` (what a multi-task DataModule takes as
    task descriptors) and ``scales`` (the prior precisions of variational embeddings, else None).
    Returns that dict.
    """
    if not embeddings:
        raise ValueError("no embeddings to save")
    trivial = trivial_embedding(list(embeddings))
    scales = [e.scale for e in embeddings]
    out = dict(names=[e.name for e in embeddings], embeddings=_stack(embeddings).float(),
               layers=list(embeddings[0].layers), layer_sizes=list(embeddings[0].layer_sizes),
               meta=[_plain(dict(e.meta), f"meta of {e.name!r}") for e in embeddings],
               distance_symmetric=distance_matrix(embeddings),
               distance_asymmetric=distance_matrix(embeddings, "asymmetric", alpha),
               trivial=trivial.vector, alpha=alpha, descriptors=task_descriptors(embeddings, descriptor_transform),
               descriptor_transform=descriptor_transform,
               scales=torch.stack(scales).float() if all(t is not None for t in scales) else None)
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
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path} is not a readable embeddings file ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}): it is truncated or corrupted; write it "
                         f"again with save_embeddings or tasklight embed") from err
    if not isinstance(data, dict) or "embeddings" not in data:
        raise ValueError(f"{path} is not a Task2Vec embeddings file (no 'embeddings' entry); write it with "
                         f"save_embeddings or tasklight embed")
    scales = data.get("scales")
    scales = list(scales) if scales is not None else [None] * len(data["names"])
    return [TaskEmbedding(v, list(data["layers"]), list(data["layer_sizes"]), n, m, sc)
            for v, n, m, sc in zip(data["embeddings"], data["names"], data["meta"], scales)]
