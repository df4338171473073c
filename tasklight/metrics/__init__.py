"""Metrics: a functional core (:mod:`tasklight.metrics.functional`) with thin torchmetrics classes."""
from tasklight.metrics.functional import mean_ci95_from_sums, paired_t_ci95, t_ci95
from tasklight.metrics.mean_ci import MeanCI, mean_ci95, unshare_state
from tasklight.metrics.padding import eval_valid_mask, padding_mask

__all__ = ["MeanCI", "eval_valid_mask", "mean_ci95", "mean_ci95_from_sums", "padding_mask", "paired_t_ci95", "t_ci95",
           "unshare_state"]
