"""Any torchjd weighting or aggregator, by name, as a tasklight weighting method."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from tasklight.multitask.registry import register_weighting
from tasklight.multitask.weighting import GradSource, TaskStats, Weighting, _active_gram, _scatter


_INNER_PRODUCTS = ("MoDoWeighting", "SDMGradWeighting")


def _torchjd_class(method: str):
    import torchjd.aggregation as jd

    cls = getattr(jd, method, None) if not method.startswith("_") else None
    if cls is None and isinstance(getattr(jd, f"{method}Weighting", None), type):
        cls = getattr(jd, f"{method}Weighting")
    if not isinstance(cls, type) or not issubclass(cls, (jd.Weighting, jd.Aggregator)):
        names = sorted(n for n in dir(jd) if isinstance(getattr(jd, n), type) and not n.startswith("_")
                       and issubclass(getattr(jd, n), (jd.Weighting, jd.Aggregator))
                       and getattr(jd, n) not in (jd.Weighting, jd.Aggregator))
        raise ValueError(f"TorchJD: method {method!r} is not a torchjd.aggregation Weighting or Aggregator; "
                         f"choose one of {names}")
    return cls


@register_weighting("torchjd", paper="Quinton & Rey (2024), Jacobian Descent for Multi-Objective Optimization "
                    "(torchjd), and each aggregator's own paper",
                    reference="torchjd's aggregators and weightings, called on the same matrix",
                    parity="tests/multitask/test_torchjd_parity.py::test_adapter")
class TorchJD(Weighting):
    """A torchjd ``Weighting`` or ``Aggregator`` by name: ``TorchJD("UPGrad")``, ``TorchJD("Krum",
    {"n_byzantine": 1})``; in a config ``weighting: {class_path: tasklight.multitask.weightings.TorchJD,
    init_args: {method: ConFIG, grad_source: parameters}}``.

    ``options`` are the torchjd class's keyword arguments (lists become tensors, e.g. ``pref_vector``).
    Resolution: a torchjd ``Weighting`` named ``method``, or else ``<method>Weighting`` when torchjd has
    it, maps the Gram matrix of the task gradients (MoDo's and SDMGrad's: of one batch, as in
    :class:`~tasklight.multitask.weightings.MoDo`) or, for a matrix weighting such as ExcessMTL's, the
    gradients themselves, to task weights; any other ``Aggregator`` (``ConFIG``, ``GradDrop``, ``Krum``,
    ``TrimmedMean``...) maps the matrix to the shared parameters' update, which the module applies
    directly (:meth:`Weighting.shared_direction`, ``grad_source="parameters"`` required). Only the
    shared parameters are steered; heads get their own loss's gradient.
    """

    needs_grads = True
    direction_only = True

    def __init__(self, method: str, options: Optional[dict[str, Any]] = None,
                 grad_source: GradSource = "representation") -> None:
        super().__init__(grad_source)
        import torchjd.aggregation as jd

        self.method, self.options = str(method), dict(options or {})
        cls = _torchjd_class(self.method)
        if not issubclass(cls, jd.Weighting) and isinstance(getattr(jd, f"{self.method}Weighting", None), type):
            cls = getattr(jd, f"{self.method}Weighting")
        kwargs = {k: torch.tensor(v, dtype=torch.float64) if isinstance(v, (list, tuple)) else v
                  for k, v in self.options.items()}
        try:
            self._jd = cls(**kwargs)
        except TypeError as e:
            raise ValueError(f"TorchJD: torchjd's {cls.__name__} does not take options {self.options}: {e}") from e
        self.gives_direction = not isinstance(self._jd, jd.Weighting)
        if self.gives_direction and grad_source != "parameters":
            raise ValueError(f"TorchJD: torchjd's {cls.__name__} is an aggregator (it returns the update itself), "
                             f"so it needs grad_source='parameters' (got {grad_source!r})")
        from torchjd.aggregation._weighting_bases import _GramianWeighting

        # MoDo's and SDMGrad's matrix weightings take a matrix of gradient inner products (J_1 J_2^T)
        self._on_gram = isinstance(self._jd, _GramianWeighting) or type(self._jd).__name__ in _INNER_PRODUCTS

    def compute_weights(self, stats: TaskStats) -> Tensor:
        self._check(stats)
        if self.gives_direction:
            return stats.active.to(stats.losses)
        idx, g, G = _active_gram(stats)
        return _scatter(self._jd(G if self._on_gram else g).double(), idx, stats)

    def shared_direction(self, stats: TaskStats, weights: Tensor) -> Optional[Tensor]:
        if not self.gives_direction:
            return None
        idx = stats.active.nonzero().flatten()
        return self._jd(stats.grads[idx].double())
