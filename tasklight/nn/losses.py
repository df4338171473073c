"""Regression losses: histogram losses (HL-Gauss, HL-OneBin) and the Mahalanobis prediction loss.

``HistogramLoss`` (Imani & White, ICML 2018) turns regression into classification over ``num_bins``
bins on ``[v_min, v_max]``: a head outputs one logit per bin, the target is a distribution over the
bins built from the scalar target ``y`` and the loss is the cross-entropy. The prediction is the
expectation of the bin centres under ``softmax(logits)``.

* ``kind="gauss"`` (HL-Gauss): the target is ``N(y, sigma^2)`` truncated to ``[v_min, v_max]`` and
  integrated over each bin (differences of the normal CDF at the bin edges, renormalised);
* ``kind="onebin"`` (HL-OneBin): all mass in the bin that contains ``y``.

Defaults: ``sigma = 0.75`` bin widths (Farebrother et al. 2024) and, without ``v_min``/``v_max``,
``support="auto"``: the range of the training targets plus a 10 % margin, fitted by
``fit_support`` (the tasklight learners call it from their DataModule's ``train_targets()``).

``MahalanobisLoss`` is TaskMet's prediction loss ``(y_hat - y)^T Lambda (y_hat - y)`` with a
(per-example) positive-definite metric ``Lambda``.

Everything here is written with elementary tensor ops and no data-dependent Python control flow on
the differentiated path, so the losses work inside ``torch.func.grad`` / ``vmap`` inner loops.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from tasklight.config import RecordsInit

_KINDS = ("gauss", "onebin")
_SIGMA_UNITS = ("bin", "absolute")
_SUPPORTS = ("auto", "fixed")


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
        v_min, v_max: an explicit support ``[v_min, v_max]`` (``support="fixed"``).
        support: ``"auto"`` (the default when ``v_min``/``v_max`` are not given): the support is fitted
            from the training targets by :meth:`fit_support`, ``[lo - margin * (hi - lo), hi + margin * (hi - lo)]``
            for the targets' range ``[lo, hi]``; the tasklight learners call it from their DataModule's
            ``train_targets()`` before training. ``"fixed"``: use ``v_min``/``v_max``.
        margin: the fraction of the targets' range added on each side by ``support="auto"`` (>= 0).
            The default 0.1 keeps every training target at least 3 sigma from the edges for
            ``num_bins >= 27`` with ``sigma = 0.75`` bins, so no training target's Gaussian is truncated.
        sigma: width of the Gaussian target (HL-Gauss only), > 0. The default 0.75 bin widths is the
            ratio recommended by Farebrother et al. (2024). With ``sigma_unit="bin"`` the number of bins
            also sets the absolute width ``sigma * (v_max - v_min) / num_bins``, and that width is what
            the results depend on (docs/histogram_losses.md: on small tabular data 2 bin widths of 16
            bins beat 0.75; 0.75 of 64 bins was far worse); choose it on validation data.
        sigma_unit: ``"bin"`` (``sigma`` is a multiple of the bin width) or ``"absolute"`` (in the units
            of ``y``).
        kind: ``"gauss"`` or ``"onebin"``.

    ``forward(logits [..., k], y [...] or [..., 1])`` returns the mean cross-entropy (a scalar).
    ``predict(logits [..., k])`` returns the expectation over the bin centres, shaped ``[..., 1]``
    like the output of a one-output regression head (``keepdim=False`` gives ``[...]``).
    Targets outside the support are clamped to it with a warning. The support is saved in the
    ``state_dict`` (buffer ``support``), so a fitted range travels with checkpoints.
    """

    def __init__(self, num_bins: int = 100, v_min: Optional[float] = None, v_max: Optional[float] = None,
                 sigma: float = 0.75, sigma_unit: str = "bin", kind: str = "gauss", support: Optional[str] = None,
                 margin: float = 0.1) -> None:
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"HistogramLoss kind must be one of {_KINDS}, got {kind!r}.")
        if sigma_unit not in _SIGMA_UNITS:
            raise ValueError(f"HistogramLoss sigma_unit must be one of {_SIGMA_UNITS}, got {sigma_unit!r}.")
        if int(num_bins) != num_bins or num_bins < 2:
            raise ValueError(f"HistogramLoss needs num_bins >= 2 (an integer), got {num_bins}.")
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"HistogramLoss needs sigma > 0, got {sigma}; use e.g. sigma=0.75 with "
                             f"sigma_unit='bin' (three quarters of a bin width).")
        if not (math.isfinite(margin) and margin >= 0):
            raise ValueError(f"HistogramLoss needs margin >= 0 (a fraction of the targets' range), got {margin}.")
        given = (v_min is not None, v_max is not None)
        if support is None:
            support = "fixed" if any(given) else "auto"
        if support not in _SUPPORTS:
            raise ValueError(f"HistogramLoss support must be one of {_SUPPORTS}, got {support!r}.")
        if support == "fixed" and not all(given):
            raise ValueError(f"HistogramLoss support='fixed' needs both v_min and v_max, got v_min={v_min}, "
                             f"v_max={v_max}; give both, or use support='auto' to fit the range from the training "
                             f"targets.")
        if support == "auto" and any(given):
            raise ValueError(f"HistogramLoss support='auto' fits the range from the training targets, but v_min="
                             f"{v_min}, v_max={v_max} were given; drop them, or use support='fixed'.")
        self.num_bins = int(num_bins)
        self.kind, self.support_mode, self.margin = kind, support, float(margin)
        self._sigma_arg, self.sigma_unit = float(sigma), sigma_unit
        self.register_buffer("support", torch.full((2,), math.nan, dtype=torch.float64))
        self.register_buffer("edges", torch.full((self.num_bins + 1,), math.nan), persistent=False)
        self.register_buffer("centers", torch.full((self.num_bins,), math.nan), persistent=False)
        self.v_min = self.v_max = self.bin_width = self.sigma = math.nan
        if support == "fixed":
            self._set_range(float(v_min), float(v_max))

    # ---------------------------------------------------------------- the support
    @property
    def needs_support(self) -> bool:
        """True while ``support="auto"`` has not been fitted (nor loaded from a checkpoint)."""
        return not math.isfinite(self.v_min)

    def _set_range(self, v_min: float, v_max: float) -> None:
        if not (math.isfinite(v_min) and math.isfinite(v_max)) or not v_max > v_min:
            raise ValueError(f"HistogramLoss range is empty or not finite: v_min={v_min}, v_max={v_max}; "
                             f"give finite values with v_min < v_max that cover the targets.")
        self.v_min, self.v_max = float(v_min), float(v_max)
        self.bin_width = (self.v_max - self.v_min) / self.num_bins
        self.sigma = self._sigma_arg * (self.bin_width if self.sigma_unit == "bin" else 1.0)
        edges = torch.linspace(self.v_min, self.v_max, self.num_bins + 1, dtype=torch.float64)
        with torch.no_grad():
            self.support.copy_(torch.tensor([self.v_min, self.v_max], dtype=torch.float64))
            self.edges.copy_(edges)
            self.centers.copy_((edges[1:] + edges[:-1]) / 2)

    def fit_support(self, targets: Tensor) -> "HistogramLoss":
        """Fit the support of ``support="auto"`` to training ``targets`` (any shape) plus the margin.

        Returns ``self``. Raises if the loss has a fixed support, or the targets are empty, not finite
        or all equal.
        """
        if self.support_mode != "auto":
            raise ValueError(f"HistogramLoss.fit_support: this loss has a fixed support [{self.v_min}, {self.v_max}]; "
                             f"create it with support='auto' (and no v_min/v_max) to fit the range from data.")
        values = _plain(torch.as_tensor(targets)).detach().to(torch.float64).flatten()
        if values.numel() == 0:
            raise ValueError("HistogramLoss.fit_support got no targets; give the training targets.")
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"HistogramLoss.fit_support: {int((~torch.isfinite(values)).sum())} of {values.numel()} "
                             f"targets are not finite; clean the training targets first.")
        lo, hi = float(values.min()), float(values.max())
        if not hi > lo:
            raise ValueError(f"HistogramLoss.fit_support: all {values.numel()} targets equal {lo}, so there is no "
                             f"range to fit; give v_min and v_max explicitly.")
        pad = self.margin * (hi - lo)
        self._set_range(lo - pad, hi + pad)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "support"
        if key not in state_dict and not self.needs_support:
            state_dict = {**state_dict, key: self.support.clone()}  # checkpoints from before the buffer existed
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key in state_dict:
            lo, hi = (float(v) for v in state_dict[key])
            if math.isfinite(lo) and math.isfinite(hi):
                self._set_range(lo, hi)

    def _check_ready(self) -> None:
        if self.needs_support:
            raise RuntimeError("HistogramLoss(support='auto') has no range yet: call loss.fit_support(train_targets), "
                               "or train it in a tasklight learner whose DataModule has train_targets(), or give "
                               "v_min and v_max.")

    def extra_repr(self) -> str:
        rng = ("support='auto' (not fitted)" if self.needs_support
               else f"v_min={self.v_min:.4g}, v_max={self.v_max:.4g}")
        return f"kind={self.kind!r}, num_bins={self.num_bins}, {rng}, sigma={self.sigma:.4g}"

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
        self._check_ready()
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
        self._check_ready()
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


def fit_auto_support(loss: nn.Module, targets: Optional[Callable[[], Tensor]], where: str) -> bool:
    """Fit ``loss``'s support from ``targets()`` if it is a ``HistogramLoss(support="auto")`` not yet fitted.

    ``targets`` is a DataModule's ``train_targets`` (bound to a task where needed), or None when the
    DataModule has none; ``where`` names the DataModule in the error. Returns True if it fitted.
    """
    if not getattr(loss, "needs_support", False):
        return False
    if targets is None:
        raise ValueError(f"HistogramLoss(support='auto') fits its range to the training targets, but {where} has no "
                         f"train_targets(); give v_min and v_max (support='fixed'), or call "
                         f"loss.fit_support(training_targets) before training.")
    loss.fit_support(targets())
    return True


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


# ====================================================================== target shapes
def align_target(output: Tensor, target: Tensor, loss: object = None, what: str = "the network") -> Tensor:
    """``target`` checked against ``output`` (shapes are static, so this also works under ``vmap``).

    * classification (``CrossEntropyLoss``/``NLLLoss``) and histogram losses (a ``predict`` method):
      one output row per target, ``output [..., C]`` with ``target [...]``;
    * plain regression: the same shape; a single-output head ``[..., 1]`` with targets ``[...]`` (the
      documented sinusoid layout) gets its targets viewed as ``[..., 1]``.

    Anything else raises one ``ValueError`` that names both shapes: a loss would otherwise broadcast
    (``[S, 1]`` against ``[S]`` gives ``[S, S]``) and train on the wrong objective.
    """
    out_shape, y_shape = tuple(output.shape), tuple(target.shape)
    per_row = isinstance(loss, (nn.CrossEntropyLoss, nn.NLLLoss)) or hasattr(loss, "predict")
    if per_row:
        if out_shape[:-1] == y_shape:
            return target
        if y_shape == out_shape[:-1] + (1,) and hasattr(loss, "predict"):
            return target.reshape(out_shape[:-1])
        raise ValueError(f"{what} gives outputs of shape {out_shape} (one row of {out_shape[-1] if out_shape else 0} "
                         f"scores per example) but the targets have shape {y_shape}: the targets must have the "
                         f"outputs' shape without the last dimension, {out_shape[:-1]}.")
    if out_shape == y_shape:
        return target
    if out_shape == y_shape + (1,):
        return target.unsqueeze(-1)
    raise ValueError(f"{what} gives outputs of shape {out_shape} but the regression targets have shape {y_shape}: "
                     f"they must be equal (or targets {out_shape[:-1]} for a single-output head). Set the "
                     f"network's out_features to the target size, or use a loss made for this head "
                     f"(e.g. HistogramLoss for one logit per bin).")


class PredictionMSE:
    """Mean squared error between ``loss.predict(output)`` and the targets, for a loss that turns outputs
    into values (a :class:`HistogramLoss`): e.g. an inner loop that adapts a histogram head by the
    squared error of its mean while the outer loss stays the histogram loss. A plain callable that
    refers to ``loss`` (its support and bin centres) without owning it."""

    def __init__(self, loss) -> None:
        if not callable(getattr(loss, "predict", None)):
            raise ValueError(f"'mse_of_prediction' needs a loss with a predict(output) method (e.g. HistogramLoss), "
                             f"got {type(loss).__name__}: use inner_loss='mse' or None for it")
        self.loss = loss

    def predict(self, output: Tensor, keepdim: bool = True) -> Tensor:
        return self.loss.predict(output, keepdim=keepdim)

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        return (self.loss.predict(output, keepdim=False) - target).pow(2).mean()

    def __repr__(self) -> str:
        return f"PredictionMSE({self.loss!r})"


class TargetChecked:
    """``loss(output, target)`` after :func:`align_target` (a plain callable, not a module)."""

    def __init__(self, loss, what: str = "the network") -> None:
        self.loss, self.what = loss, what

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        return self.loss(output, align_target(output, target, self.loss, self.what))
