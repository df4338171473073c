"""Evaluation counts each episode once: the distributed sampler's padding is found and left out (quick
tier; the real 2-rank runs are in test_distributed.py)."""
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DistributedSampler

from tasklight.metrics import MeanCI, eval_valid_mask, padding_mask


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("shuffle", [False, True])
def test_padding_mask_keeps_each_item_once(world, size, shuffle):
    kept = []
    for rank in range(world):
        sampler = DistributedSampler(list(range(size)), num_replicas=world, rank=rank, shuffle=shuffle, seed=1)
        idx = list(sampler)
        mask = padding_mask(sampler, 0, len(idx))
        kept += [i for i, keep in zip(idx, [True] * len(idx) if mask is None else mask.tolist()) if keep]
    assert sorted(kept) == list(range(size))


def test_eval_valid_mask_follows_batches_of_any_size():
    """Rank 1 of 2 with 5 items: its share is [1, 3, 0(pad)]; in batches of 2 the pad is the 2nd batch's first."""
    sampler = DistributedSampler(list(range(5)), num_replicas=2, rank=1, shuffle=False)
    module = SimpleNamespace(_trainer=SimpleNamespace(world_size=2, test_dataloaders=SimpleNamespace(sampler=sampler)))
    assert eval_valid_mask(module, "test", 0, 2) is None
    assert eval_valid_mask(module, "test", 1, 1).tolist() == [False]
    assert eval_valid_mask(module, "test", 0, 2) is None  # a new epoch starts again at batch 0
    one = SimpleNamespace(_trainer=SimpleNamespace(world_size=1))
    assert eval_valid_mask(one, "test", 0, 3) is None


def test_ci_of_one_episode_is_undefined_not_zero():
    m = MeanCI()
    m.update(torch.tensor([0.7]))
    res = m.compute()
    assert float(res["mean"]) == pytest.approx(0.7)
    assert torch.isnan(res["ci95"]) and torch.isnan(res["std"])
    m.update(torch.tensor([0.9]))
    res = m.compute()
    assert float(res["ci95"]) == pytest.approx(1.96 * torch.tensor([0.7, 0.9]).std().item() / 2 ** 0.5)
    assert torch.isnan(MeanCI().compute()["mean"])  # no episode: no mean
