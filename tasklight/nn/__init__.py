"""Networks (MLP, Conv4, the exact elementary-op BatchNorm) and losses (histogram, Mahalanobis)."""
from tasklight.nn.losses import HistogramLoss, MahalanobisLoss, fit_auto_support, mahalanobis_loss
from tasklight.nn.nets import MLP, BatchNorm1d, BatchNorm2d, BatchNorm3d, Conv4, activation, make_vmap_safe

__all__ = ["HistogramLoss", "MahalanobisLoss", "mahalanobis_loss", "fit_auto_support", "MLP", "Conv4", "BatchNorm1d",
           "BatchNorm2d", "BatchNorm3d", "activation", "make_vmap_safe"]
