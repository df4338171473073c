"""Metrics: a functional core (:mod:`tasklight.metrics.functional`) with thin torchmetrics classes."""
from tasklight.metrics.functional import mean_ci95_from_sums, paired_t_ci95, t_ci95
from tasklight.metrics.mean_ci import MeanCI, mean_ci95, unshare_state

__all__ = ["MeanCI", "mean_ci95", "mean_ci95_from_sums", "paired_t_ci95", "t_ci95", "unshare_state"]
