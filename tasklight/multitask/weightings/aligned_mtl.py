"""Aligned-MTL (Senushkin et al., 2023)."""
from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
from torch import Tensor

from tasklight.multitask.registry import register_weighting
from tasklight.multitask.weighting import GradSource, TaskStats, Weighting, _active_gram, _scatter

SCALES = ("min", "median", "rmse")


def aligned_mtl_weights(gram: Tensor, pref: Tensor, scale_mode: str = "min") -> Tensor:
    """The Aligned-MTL coefficients ``B pref`` on the task gradients, ``B = sqrt(s) V S^{-1/2} V^T`` from
    the eigendecomposition ``G = V S V^T`` of the Gram matrix restricted to its numerical rank, ``s``
    the smallest (``min``), median or mean (``rmse``) kept eigenvalue."""
    lam, V = torch.linalg.eigh(gram)
    tol = lam.max() * len(gram) * torch.finfo(gram.dtype).eps
    keep = lam > tol
    if not bool(keep.any()):
        return pref.clone()
    lam, V = lam[keep], V[:, keep]
    scale = {"min": lam.min(), "median": torch.median(lam), "rmse": lam.mean()}[scale_mode]
    B = scale.sqrt() * (V / lam.sqrt()) @ V.T
    return B @ pref


@register_weighting("alignedmtl", paper="Senushkin et al. (2023), Independent Component Alignment for Multi-Task "
                    "Learning", reference="torchjd `AlignedMTLWeighting`",
                    parity="tests/multitask/test_torchjd_parity.py::test_aligned_mtl")
class AlignedMTL(Weighting):
    """Aligned-MTL: align the principal components of the task gradients, so the linear system of the
    gradients is well conditioned (Algorithm 1 of the paper).

    With ``G = V S V^T`` the Gram matrix of the task gradients, the aligned gradients are
    ``B^T g`` with ``B = sqrt(s) V S^{-1/2} V^T`` (only the components above the numerical rank
    tolerance), ``s`` the smallest eigenvalue (``scale_mode="min"``, the paper's), the median or the
    mean (``"rmse"``, the authors' code); the update is their combination with the preference
    ``pref`` (default ``1/T`` each). Only the shared parameters are steered.
    """

    needs_grads = True
    direction_only = True

    def __init__(self, scale_mode: Literal["min", "median", "rmse"] = "min", pref: Optional[Sequence[float]] = None,
                 grad_source: GradSource = "representation") -> None:
        super().__init__(grad_source)
        if scale_mode not in SCALES:
            raise ValueError(f"AlignedMTL: scale_mode must be one of {SCALES}, got {scale_mode!r}")
        self.scale_mode = scale_mode
        self.pref = None if pref is None else [float(p) for p in pref]

    def setup(self, num_tasks, lower_bounds=None) -> None:
        super().setup(num_tasks, lower_bounds)
        if self.pref is not None and len(self.pref) != num_tasks:
            raise ValueError(f"AlignedMTL: pref has {len(self.pref)} entries for {num_tasks} tasks")

    def compute_weights(self, stats: TaskStats) -> Tensor:
        self._check(stats)
        idx, _, G = _active_gram(stats)
        n = len(idx)
        pref = (torch.full((n,), 1.0 / n, dtype=torch.float64) if self.pref is None
                else torch.tensor(self.pref, dtype=torch.float64)[idx.cpu()])
        return _scatter(aligned_mtl_weights(G.cpu(), pref, self.scale_mode), idx, stats)
