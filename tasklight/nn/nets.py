"""Backbones and heads used by the learners.

Every network here is an ordinary ``nn.Module``: the functional core calls it statelessly with
``torch.func.functional_call``, so any user network works the same way.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from tasklight.config import RecordsInit

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU, "elu": nn.ELU}


def activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}") from None


class MLP(RecordsInit, nn.Module):
    """A fully connected network ``in_features -> hidden... -> out_features``.

    The default (1 -> 40 -> 40 -> 1, ReLU) is the sinusoid network of Finn et al. (2017).
    """

    def __init__(self, in_features: int = 1, hidden: Sequence[int] = (40, 40), out_features: int = 1,
                 activation_name: str = "relu", layer_norm: bool = False) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"MLP sizes must be positive, got in={in_features} hidden={list(hidden)} "
                             f"out={out_features}")
        layers: list[nn.Module] = []
        d = in_features
        for h in hidden:
            layers.append(nn.Linear(d, h))
            if layer_norm:
                layers.append(nn.LayerNorm(h))
            layers.append(activation(activation_name))
            d = h
        layers.append(nn.Linear(d, out_features))
        self.net = nn.Sequential(*layers)
        self.input_shape = (in_features,)
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _ElementaryBatchNorm:
    """BatchNorm written with elementary tensor ops.

    ``vmap`` over ``torch.nn.functional.batch_norm`` gives wrong *second-order* gradients
    (checked on torch 2.13: the MAML meta-gradient through a vmapped BatchNorm differs from an
    explicit per-task loop and from finite differences by ~5 %). Written with mean/var ops, the same
    layer is exact under vmap. Parameters, buffers and ``state_dict`` keys are those of
    ``nn.BatchNorm*d``; running statistics follow the same update rule.
    """

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        self._check_input_dim(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        use_batch_stats = self.training or self.running_mean is None
        if use_batch_stats:
            mean = x.mean(dims)
            var = x.var(dims, unbiased=False)
            if self.training and self.running_mean is not None:
                with torch.no_grad():
                    self.num_batches_tracked.add_(1)
                    momentum = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked
                    n = x.numel() / x.shape[1]
                    self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                    self.running_var.mul_(1 - momentum).add_(momentum * var.detach() * n / max(n - 1, 1))
        else:
            mean, var = self.running_mean, self.running_var
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


class BatchNorm1d(_ElementaryBatchNorm, nn.BatchNorm1d):
    pass


class BatchNorm2d(_ElementaryBatchNorm, nn.BatchNorm2d):
    pass


class BatchNorm3d(_ElementaryBatchNorm, nn.BatchNorm3d):
    pass


_BN_SWAP = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


def make_vmap_safe(module: nn.Module) -> int:
    """Swap every ``nn.BatchNorm{1,2,3}d`` in ``module`` for its elementary-op twin, in place.

    Parameters, buffers and state-dict keys are unchanged. Returns how many layers were swapped.
    Meta-learners call this on the network they are given, so user networks are exact too.
    """
    swapped = 0
    for m in module.modules():
        new_cls = _BN_SWAP.get(type(m))
        if new_cls is not None:
            m.__class__ = new_cls
            swapped += 1
    return swapped


def conv_block(in_channels: int, out_channels: int, batch_norm: bool, track_running_stats: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, padding=1)]
    if batch_norm:
        layers.append(BatchNorm2d(out_channels, track_running_stats=track_running_stats))
    layers += [nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers)


class Conv4(RecordsInit, nn.Module):
    """The four-block convolutional network of the few-shot literature (Vinyals et al. 2016, MAML).

    Each block: 3x3 conv (``hidden`` filters), BatchNorm, ReLU, 2x2 max-pool. A 28x28 Omniglot image
    becomes a ``hidden``-dim feature (1x1 spatial), followed by a linear head with ``out_features``
    outputs. ``out_features=0`` gives the feature extractor alone.

    ``track_running_stats=False`` (default, as in MAML) normalises with the statistics of the
    current batch at train and test time; ``True`` keeps running statistics (BatchNorm buffers),
    which the meta-learners update with the task average of their adaptation batches.
    """

    def __init__(self, in_channels: int = 1, out_features: int = 5, hidden: int = 64, image_size: int = 28,
                 batch_norm: bool = True, track_running_stats: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_block(in_channels, hidden, batch_norm, track_running_stats),
            conv_block(hidden, hidden, batch_norm, track_running_stats),
            conv_block(hidden, hidden, batch_norm, track_running_stats),
            conv_block(hidden, hidden, batch_norm, track_running_stats),
        )
        side = image_size
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ValueError(f"image_size={image_size} is too small for four 2x2 poolings; use at least 16")
        self.feature_dim = hidden * side * side
        self.head: Optional[nn.Linear] = nn.Linear(self.feature_dim, out_features) if out_features > 0 else None
        self.input_shape = (in_channels, image_size, image_size)
        self.out_features = out_features if out_features > 0 else self.feature_dim

    def embed(self, x: Tensor) -> Tensor:
        return self.features(x).flatten(-3)

    def forward(self, x: Tensor) -> Tensor:
        z = self.embed(x)
        return self.head(z) if self.head is not None else z
