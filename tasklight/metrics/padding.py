"""Evaluation counts each episode (example, instance) exactly once under every strategy and world size.

Lightning's distributed sampler pads the evaluation set by repeating its first items until every
rank has the same number: with 3 episodes on 2 ranks, episode 0 is evaluated twice and a mean over
all ranks' items is biased. Every rank must keep the same number of batches (collectives at the
epoch end), so the padding cannot be dropped from the loader; :func:`eval_valid_mask` tells each
evaluation step which of its items are padding, and the learners leave those out of their metrics.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler


def _loader(trainer, stage: str, dataloader_idx: int):
    loaders = {"val": getattr(trainer, "val_dataloaders", None),
               "test": getattr(trainer, "test_dataloaders", None)}.get(stage)
    if isinstance(loaders, (list, tuple)):
        return loaders[dataloader_idx] if dataloader_idx < len(loaders) else None
    if isinstance(loaders, dict):
        return list(loaders.values())[dataloader_idx]
    return loaders


def padding_mask(sampler, start: int, size: int, device=None) -> Optional[Tensor]:
    """``bool [size]``: False for the items at positions ``start .. start+size-1`` of this rank's
    share of ``sampler`` that a padding ``DistributedSampler`` repeated; None if nothing is padding.

    ``DistributedSampler`` (``drop_last=False``) extends its index list to a multiple of
    ``num_replicas`` and gives rank ``r`` the positions ``r, r + W, r + 2W, ...``: position ``p`` of
    rank ``r`` is padding exactly when ``r + p * W >= len(dataset)``, shuffled or not.
    """
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last or sampler.num_replicas == 1:
        return None
    positions = sampler.rank + (start + torch.arange(size)) * sampler.num_replicas
    valid = positions < len(sampler.dataset)
    return None if bool(valid.all()) else valid.to(device)


def eval_valid_mask(module, stage: str, batch_idx: int, size: int, dataloader_idx: int = 0,
                    device=None) -> Optional[Tensor]:
    """The :func:`padding_mask` of evaluation batch ``batch_idx`` (``size`` items) of ``module``'s
    ``stage`` (``"val"`` or ``"test"``) loader; None when no item is padding (one process, or a
    sampler that does not pad).

    Items are counted per stage and loader from batch 0 of each evaluation epoch, so batches of any
    size (a shorter last batch) are placed correctly.
    """
    trainer = getattr(module, "_trainer", None)
    if trainer is None or getattr(trainer, "world_size", 1) == 1:
        return None
    loader = _loader(trainer, stage, dataloader_idx)
    sampler = getattr(loader, "sampler", None)
    seen = module.__dict__.setdefault("_eval_items_seen", {})
    key = (stage, dataloader_idx)
    start = 0 if batch_idx == 0 else seen.get(key, 0)
    seen[key] = start + size
    return padding_mask(sampler, start, size, device)


__all__ = ["eval_valid_mask", "padding_mask"]
