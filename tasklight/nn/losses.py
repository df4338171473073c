"""Regression losses: histogram losses (HL-Gauss, HL-OneBin) and the Mahalanobis prediction loss.

``HistogramLoss`` (Imani & White, ICML 2018) turns regression into classification over ``num_bins``
bins on ``[v_min, v_max]``: a head outputs one logit per bin, the target is a distribution over the
bins built from the scalar target ``y`` and the loss is the cross-entropy. The prediction is the
expectation of the bin centres under ``softmax(logits)``.

* ``kind="gauss"`` (HL-Gauss): the target is ``N(y, sigma^2)`` truncated to ``[v_min, v_max]`` and
  integrated over each bin (differences of the normal CDF at the bin edges, renormalised);
* ``kind="onebin"`` (HL-OneBin): all mass in the bin that contains ``y``.

``MahalanobisLoss`` is TaskMet's prediction loss ``(y_hat - y)^T Lambda (y_hat - y)`` with a
(per-example) positive-definite metric ``Lambda``.

Everything here is written with elementary tensor ops and no data-dependent Python control flow on
the differentiated path, so the losses work inside ``torch.func.grad`` / ``vmap`` inner loops.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn
from tasklight.config import RecordsInit

_KINDS = ("gauss", "onebin")
_SIGMA_UNITS = ("bin", "absolute")


def _plain(t: Tensor) -> Tensor:
    """The tensor under any ``torch.func`` wrappers (vmap / grad), for inspecting values only."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        t = functorch.get_unwrapped(t)
    return t


class HistogramLoss(RecordsInit, nn.Module):
    """Cross-entropy to a histogram target: HL-Gauss (default) or HL-OneBin.

    Args:
        num_bins: number of bins ``k`` (the head's output size), at least 2.
        v_min, v_max: the support; targets outside it are clamped to it with a warning.
        sigma: width of the Gaussian target (HL-Gauss only), > 0.
        sigma_unit: ``"bin"`` (``sigma`` is a multiple of the bin width; 0.75 is the usual choice)
            or ``"absolute"`` (``sigma`` is in the units of ``y``).
        kind: ``"gauss"`` or ``"onebin"``.

    ``forward(logits [..., k], y [...] or [..., 1])`` returns the mean cross-entropy (a scalar).
    ``predict(logits [..., k])`` returns the expectation over the bin centres, shaped ``[..., 1]``
    like the output of a one-output regression head (``keepdim=False`` gives ``[...]``).
    """

    def __init__(self, num_bins: int = 100, v_min: float = -1.0, v_max: float = 1.0, sigma: float = 0.75,
                 sigma_unit: str = "bin", kind: str = "gauss") -> None:
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"HistogramLoss kind must be one of {_KINDS}, got {kind!r}.")
        if sigma_unit not in _SIGMA_UNITS:
            raise ValueError(f"HistogramLoss sigma_unit must be one of {_SIGMA_UNITS}, got {sigma_unit!r}.")
        if int(num_bins) != num_bins or num_bins < 2:
            raise ValueError(f"HistogramLoss needs num_bins >= 2 (an integer), got {num_bins}.")
        if not (math.isfinite(v_min) and math.isfinite(v_max)) or not v_max > v_min:
            raise ValueError(f"HistogramLoss range is empty or not finite: v_min={v_min}, v_max={v_max}; "
                             f"give finite values with v_min < v_max that cover the targets.")
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"HistogramLoss needs sigma > 0, got {sigma}; use e.g. sigma=0.75 with "
                             f"sigma_unit='bin' (three quarters of a bin width).")
        self.num_bins = int(num_bins)
        self.v_min, self.v_max = float(v_min), float(v_max)
        self.kind = kind
        self.bin_width = (self.v_max - self.v_min) / self.num_bins
        self.sigma = float(sigma) * (self.bin_width if sigma_unit == "bin" else 1.0)
        edges = torch.linspace(self.v_min, self.v_max, self.num_bins + 1, dtype=torch.float64)
        self.register_buffer("edges", edges.float(), persistent=False)
        self.register_buffer("centers", ((edges[1:] + edges[:-1]) / 2).float(), persistent=False)

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, num_bins={self.num_bins}, v_min={self.v_min}, v_max={self.v_max}, "
                f"sigma={self.sigma:.4g}")

    # ---------------------------------------------------------------- targets
    def _clamp(self, y: Tensor) -> Tensor:
        values = _plain(y)
        outside = (values < self.v_min) | (values > self.v_max)
        if bool(outside.any()):
            warnings.warn(
                f"HistogramLoss: {int(outside.sum())} of {values.numel()} targets lie outside "
                f"[v_min, v_max] = [{self.v_min}, {self.v_max}] (min {float(values.min()):.4g}, max "
                f"{float(values.max()):.4g}) and were clamped to the range; widen v_min/v_max to cover the "
                f"targets.", stacklevel=3)
        return y.clamp(self.v_min, self.v_max)

    def target_probs(self, y: Tensor) -> Tensor:
        """The target distribution over the bins, ``[..., k]`` for ``y [...]`` (rows sum to 1)."""
        y = self._clamp(y)
        edges = self.edges.to(y)
        if self.kind == "gauss":
            cdf = torch.special.ndtr((edges - y.unsqueeze(-1)) / self.sigma)
            mass = cdf[..., 1:] - cdf[..., :-1]
            return mass / (cdf[..., -1:] - cdf[..., :1])
        index = ((y - self.v_min) / self.bin_width).floor().clamp(0, self.num_bins - 1)
        bins = torch.arange(self.num_bins, device=y.device, dtype=y.dtype)
        return (bins == index.unsqueeze(-1)).to(y.dtype)

    # ---------------------------------------------------------------- loss and prediction
    def _check_logits(self, logits: Tensor) -> None:
        if logits.dim() < 1 or logits.shape[-1] != self.num_bins:
            raise ValueError(f"HistogramLoss expects logits [..., {self.num_bins}] (one per bin), got shape "
                             f"{tuple(logits.shape)}; set the head's out_features to num_bins={self.num_bins}.")

    def forward(self, logits: Tensor, y: Tensor) -> Tensor:
        self._check_logits(logits)
        lead = logits.shape[:-1]
        if y.shape == lead + (1,):
            y = y.squeeze(-1)
        elif y.shape != lead:
            raise ValueError(f"HistogramLoss: targets of shape {tuple(y.shape)} do not match logits "
                             f"{tuple(logits.shape)}; expected targets {tuple(lead)} or {tuple(lead + (1,))}.")
        target = self.target_probs(y.to(logits.dtype))
        return -(target * torch.log_softmax(logits, dim=-1)).sum(-1).mean()

    def predict(self, logits: Tensor, keepdim: bool = True) -> Tensor:
        """Expectation over the bin centres: ``[..., 1]`` (or ``[...]`` with ``keepdim=False``)."""
        self._check_logits(logits)
        values = torch.softmax(logits, dim=-1) @ self.centers.to(logits)
        return values.unsqueeze(-1) if keepdim else values


# -------------------------------------------------------------------- Mahalanobis
def mahalanobis_loss(pred: Tensor, target: Tensor, metric: Tensor, diagonal: bool = False) -> Tensor:
    """Mean over examples of ``(pred - target)^T Lambda (pred - target)``.

    ``pred``, ``target``: ``[..., m]``. ``metric``: ``[..., m, m]`` (full) or, with ``diagonal=True``,
    ``[..., m]`` (the diagonal); its leading dims must broadcast against the prediction's.
    """
    if pred.shape != target.shape:
        raise ValueError(f"mahalanobis_loss: predictions {tuple(pred.shape)} and targets "
                         f"{tuple(target.shape)} must have the same shape [..., m].")
    m = pred.shape[-1] if pred.dim() else 0
    want = 1 if diagonal else 2
    if metric.dim() < want or metric.shape[-1] != m or (not diagonal and metric.shape[-2] != m):
        form = f"[..., {m}]" if diagonal else f"[..., {m}, {m}]"
        got = metric.shape[-1] if metric.dim() else "none"
        raise ValueError(f"mahalanobis_loss: the metric has shape {tuple(metric.shape)} (dimension {got}) but "
                         f"the predictions have dimension m={m}; expected a {'diagonal' if diagonal else 'full'} "
                         f"metric {form}: make the metric's dim equal the prediction dimension.")
    r = pred - target
    if diagonal:
        quad = (metric * r * r).sum(-1)
    else:
        quad = (r.unsqueeze(-2) @ metric @ r.unsqueeze(-1))[..., 0, 0]
    return quad.mean()


class MahalanobisLoss(RecordsInit, nn.Module):
    """``forward(pred [..., m], target [..., m], metric)``: see :func:`mahalanobis_loss`."""

    def __init__(self, diagonal: bool = False) -> None:
        super().__init__()
        self.diagonal = diagonal

    def forward(self, pred: Tensor, target: Tensor, metric: Tensor) -> Tensor:
        return mahalanobis_loss(pred, target, metric, diagonal=self.diagonal)
