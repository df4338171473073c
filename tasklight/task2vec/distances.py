"""Task distances (Achille et al. 2019, Sect. 3).

* ``d_sym(a, b) = d_cos(F_a / (F_a + F_b), F_b / (F_a + F_b))`` (element-wise ratios), in [0, 1]:
  the normalisation makes the distance insensitive to the overall scale of the Fisher and weighs
  every filter equally, as the authors' code (``task_similarity.cosine``) does;
* ``d_asym(a -> b) = d_sym(a, b) - alpha * d_sym(a, t0)`` with ``t0`` the *trivial embedding* of
  the source ``a``: the embedding of a task that carries no information. For a variational
  embedding that is its prior precision (``scale``: every filter's posterior equal to the layer's
  prior, the authors' ``get_trivial_embedding_from``); for a Monte-Carlo one, which has no prior,
  an isotropic Fisher at the level of ``a``'s own layer means. ``a`` is the source (an expert's
  training task) and ``b`` the target: subtracting ``alpha * d_sym(a, t0)`` brings complex source
  tasks closer, since they tend to transfer better.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

import torch
from torch import Tensor

from tasklight.task2vec.embedding import DEFAULT_ALPHA, EmbeddingLike, TaskEmbedding, _stack, _vector


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
    """The trivial embedding ``t0`` of one embedding (or the mean over several of the same probe).

    Variational embeddings (all with ``scale``): their prior precision ``1 / lambda^2``, each
    filter's posterior equal to its layer's prior. Otherwise an isotropic Fisher: every filter of a
    layer equally informative, at the layer's mean level over ``reference``. With plain tensors
    (no layer structure) the whole vector is one layer.
    """
    refs = [reference] if isinstance(reference, TaskEmbedding) or (
        isinstance(reference, Tensor) and reference.dim() == 1) else list(reference)
    vs = _stack(refs)
    first = refs[0]
    layers, sizes = (first.layers, first.layer_sizes) if isinstance(first, TaskEmbedding) else (["all"], [vs.shape[1]])
    if all(isinstance(r, TaskEmbedding) and r.scale is not None for r in refs):
        scale = torch.stack([r.scale.to(torch.float64) for r in refs]).mean(0)
        return TaskEmbedding(scale.float(), list(layers), list(sizes), "trivial", {"reference": len(refs)}, scale.float())
    mean = vs.mean(0)
    parts, lo = [], 0
    for size in sizes:
        parts.append(mean[lo: lo + size].mean().expand(size))
        lo += size
    return TaskEmbedding(torch.cat(parts).float(), list(layers), list(sizes), "trivial", {"reference": len(refs)})


def _trivial_rows(sources: Sequence[EmbeddingLike], trivial: Optional[EmbeddingLike], dim: int) -> Tensor:
    """``[m, D]``: the given trivial embedding for every source, or each source's own."""
    if trivial is not None:
        t = _vector(trivial, "trivial embedding")
        if t.numel() != dim:
            raise ValueError(f"the trivial embedding has {t.numel()} entries but the embeddings have {dim}")
        return t.expand(len(sources), dim)
    return torch.stack([_vector(trivial_embedding(s), "trivial embedding") for s in sources])


def asymmetric_distance(a: EmbeddingLike, b: EmbeddingLike, trivial: Optional[EmbeddingLike] = None,
                        alpha: float = DEFAULT_ALPHA) -> float:
    """``d_asym(a -> b) = d_sym(a, b) - alpha * d_sym(a, t0)``: how well the source task ``a`` (e.g.
    an expert's training task) transfers to the target ``b``; ``t0`` defaults to
    ``trivial_embedding(a)``."""
    t0 = trivial if trivial is not None else trivial_embedding(a)
    return symmetric_distance(a, b) - alpha * symmetric_distance(a, t0)


def distance_matrix(embeddings: Sequence[EmbeddingLike], kind: Literal["symmetric", "asymmetric"] = "symmetric",
                    alpha: float = DEFAULT_ALPHA, trivial: Optional[EmbeddingLike] = None) -> Tensor:
    """``[T, T]`` matrix of ``d_sym`` (or ``d_asym(i -> j)`` at row i, column j) over a set of tasks.

    For ``"asymmetric"``, ``trivial`` defaults to each source's own trivial embedding.
    """
    if kind not in ("symmetric", "asymmetric"):
        raise ValueError(f"kind must be 'symmetric' or 'asymmetric', got {kind!r}")
    vs = _stack(embeddings)
    d = _pairwise_symmetric(vs, vs)
    d.fill_diagonal_(0.0)
    if kind == "asymmetric":
        t0 = _trivial_rows(list(embeddings), trivial, vs.shape[1])
        d = d - alpha * _rowwise_symmetric(vs, t0)[:, None]  # [T, 1] broadcast over targets
    return d.float()


def _rowwise_symmetric(a: Tensor, b: Tensor) -> Tensor:
    """``d_sym(a[i], b[i])`` for matching rows -> ``[m]``."""
    return torch.stack([_pairwise_symmetric(a[i: i + 1], b[i: i + 1])[0, 0] for i in range(len(a))])
