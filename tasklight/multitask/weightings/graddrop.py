"""GradDrop, gradient sign dropout (Chen et al., 2020)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from tasklight.core.seeding import seeded_generator
from tasklight.multitask.registry import register_weighting
from tasklight.multitask.weighting import GradSource, TaskStats, Weighting
from tasklight.multitask.weightings._common import require_parameter_grads


def graddrop_direction(grads: Tensor, uniform: Tensor, leak: Tensor) -> Tensor:
    """``sum_t (l_t + (1 - l_t) M_t) * g_t`` with the sign masks ``M_t = [P > U][g_t > 0] + [P < U][g_t < 0]``
    and the positive sign purity ``P = (1 + sum_t g_t / sum_t |g_t|) / 2``, entry by entry."""
    P = 0.5 * (1.0 + grads.sum(0) / grads.abs().sum(0))
    P = torch.nan_to_num(P, nan=0.5)  # entries where every gradient is 0 contribute 0 anyway
    keep = (P > uniform) & (grads > 0) | (P < uniform) & (grads < 0)
    return ((leak[:, None] + (1 - leak[:, None]) * keep.to(grads)) * grads).sum(0)


@register_weighting("graddrop", paper="Chen et al. (2020), Just Pick a Sign: Gradient Sign Dropout",
                    reference="torchjd `GradDrop`; LibMTL 1.1.5 `GradDrop`",
                    parity="tests/multitask/test_libmtl_parity.py::test_graddrop")
class GradDrop(Weighting):
    """Gradient sign dropout: at every entry of the shared gradient, keep either the positive or the
    negative task gradients, the positive ones with probability ``P = (1 + sum_t g_t / sum_t |g_t|) /
    2`` (their share), and sum them; ``leak`` (one value, or one per task) lets that fraction of each
    dropped gradient through. The uniform draws come from a generator seeded by ``(seed, step)``, the
    same on every DDP rank.

    The update is not a weighted sum of the task gradients: the method gives the shared parameters
    their gradient directly (:meth:`Weighting.shared_direction`), so it needs ``grad_source =
    "parameters"``. The paper applies the masks to the gradients at one activation layer, per example
    and multiplied by the sign of the layer's input (LibMTL 1.1.5 implements that form only, with a
    ``1e-7`` in the purity's denominator); torchjd and we apply them to the gradients of the shared
    parameters. Heads get their own loss's gradient; the reported weights are all ones.
    """

    needs_grads = True
    direction_only = True
    gives_direction = True

    def __init__(self, leak: Union[float, Sequence[float]] = 0.0, seed: int = 0,
                 grad_source: GradSource = "parameters") -> None:
        super().__init__(grad_source)
        require_parameter_grads(self, grad_source)
        self.leak = float(leak) if isinstance(leak, (int, float)) else [float(x) for x in leak]
        values = [self.leak] if isinstance(self.leak, float) else self.leak
        if any(not 0.0 <= x <= 1.0 for x in values):
            raise ValueError(f"GradDrop: leak must be in [0, 1], got {leak}")
        self.seed = int(seed)

    def setup(self, num_tasks, lower_bounds=None) -> None:
        super().setup(num_tasks, lower_bounds)
        if isinstance(self.leak, list) and len(self.leak) != num_tasks:
            raise ValueError(f"GradDrop: leak has {len(self.leak)} values for {num_tasks} tasks; give one, or one "
                             f"per task")

    def uniform(self, step: int, size: int) -> Tensor:
        """The uniform draws of ``step`` (float64)."""
        return torch.rand(size, generator=seeded_generator(self.seed, int(step)), dtype=torch.float64)

    def compute_weights(self, stats: TaskStats) -> Tensor:
        self._check(stats)
        return stats.active.to(stats.losses)

    def shared_direction(self, stats: TaskStats, weights: Tensor) -> Optional[Tensor]:
        idx = stats.active.nonzero().flatten()
        g = stats.grads[idx].double()
        leak = torch.tensor([self.leak] * self.num_tasks if isinstance(self.leak, float) else self.leak,
                            dtype=torch.float64)[idx.cpu()].to(g.device)
        return graddrop_direction(g, self.uniform(stats.step, g.shape[1]).to(g.device), leak)
