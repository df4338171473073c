"""Seeded drawer splits of the Omniglot alphabet tasks (``OmniglotAlphabetsDataModule(split_seed=...)``)."""
import pytest
import torch

from tasklight.data.multitask import OmniglotAlphabetsDataModule
from tasklight.data.omniglot import load_omniglot

SIZE = 16


def _dm(**kw):
    dm = OmniglotAlphabetsDataModule(alphabets=["Greek"], image_size=SIZE, **kw)
    dm.setup()
    return dm


def _keyed(task) -> list[tuple[int, bytes]]:
    """(label, image bytes) of every example of a task dataset."""
    return sorted((int(y), bytes(x.numpy().tobytes())) for x, y in zip(task.images, task.labels))


def test_split_seed_draws_a_per_character_split_that_partitions_the_drawers():
    data = load_omniglot(None, SIZE, alphabets=["Greek"])
    everything = sorted((int(c), bytes(x.numpy().tobytes())) for x, c in zip(data.images, data.image_character))
    dm = _dm(train_drawers=1, val_drawers=2, test_drawers=17, split_seed=3)
    train, val, test = dm.train_sets[0], dm.val_sets[0], dm.test_sets[0]
    chars = dm.tasks[0].out_features
    assert (len(train), len(val), len(test)) == (chars, 2 * chars, 17 * chars)
    # every character: exactly 1 / 2 / 17 of its 20 drawers
    for split, k in ((train, 1), (val, 2), (test, 17)):
        assert torch.bincount(split.labels, minlength=chars).tolist() == [k] * chars
    # the three splits partition the alphabet's images (labels are the character's index in the alphabet)
    union = sorted(_keyed(train) + _keyed(val) + _keyed(test))
    assert union == everything
    # not the drawer-number split: the training drawer differs between characters
    by_number = _dm(train_drawers=1, val_drawers=2, test_drawers=17)
    assert _keyed(by_number.train_sets[0]) != _keyed(train)
    first = sorted((int(c), bytes(x.numpy().tobytes())) for x, c, d in
                   zip(data.images, data.image_character, data.image_drawer) if int(d) == 0)
    assert _keyed(by_number.train_sets[0]) == first


def test_same_split_seed_same_split_and_other_seeds_differ():
    a = _dm(train_drawers=2, val_drawers=2, test_drawers=16, split_seed=0)
    b = _dm(train_drawers=2, val_drawers=2, test_drawers=16, split_seed=0)
    c = _dm(train_drawers=2, val_drawers=2, test_drawers=16, split_seed=1)
    for split in ("train_sets", "val_sets", "test_sets"):
        assert _keyed(getattr(a, split)[0]) == _keyed(getattr(b, split)[0])
    assert _keyed(a.train_sets[0]) != _keyed(c.train_sets[0])


def test_negative_split_seed_is_refused():
    with pytest.raises(ValueError, match="split_seed must be a non-negative integer"):
        OmniglotAlphabetsDataModule(alphabets=["Greek"], split_seed=-1)


def test_eval_loaders_before_setup_and_for_a_subset_of_tasks():
    # the loaders set the DataModule up themselves (they used to read the still-empty split lists first and
    # raise "no task has a val set")
    kw = dict(alphabets=["Greek", "Tagalog"], image_size=SIZE, train_drawers=1, val_drawers=2, test_drawers=17,
              eval_batch_size=1000)
    dm = OmniglotAlphabetsDataModule(**kw)
    val = next(iter(dm.val_dataloader()))
    assert val.task.bincount().tolist() == [2 * 24, 2 * 17]
    fresh = OmniglotAlphabetsDataModule(**kw)
    assert next(iter(fresh.test_dataloader())).task.bincount().tolist() == [17 * 24, 17 * 17]
    only = next(iter(dm.eval_dataloader("test", [1])))
    assert only.task.unique().tolist() == [1] and len(only) == 17 * 17
    torch.testing.assert_close(only.x, next(iter(dm.test_dataloader())).x[17 * 24:])
    with pytest.raises(IndexError, match=r"tasks \[2\] out of range"):
        dm.eval_dataloader("test", [2])
    with pytest.raises(ValueError, match="split must be 'val' or 'test'"):
        dm.eval_dataloader("train")


def test_characters_per_task_splits_each_alphabet_into_small_tasks_of_its_characters():
    whole = _dm(train_drawers=1, val_drawers=2, test_drawers=17, split_seed=3)
    n = whole.tasks[0].out_features  # Greek's characters
    dm = _dm(train_drawers=1, val_drawers=2, test_drawers=17, split_seed=3, characters_per_task=5)
    sizes = [t.out_features for t in dm.tasks]
    assert sum(sizes) == n and all(s >= 2 for s in sizes) and sizes[:-1] == [5] * (len(sizes) - 1)
    assert [t.name for t in dm.tasks] == [f"Greek {k + 1}" for k in range(len(sizes))]
    offset = 0
    for t, k in enumerate(sizes):
        for split, whole_split in ((dm.train_sets, whole.train_sets), (dm.test_sets, whole.test_sets)):
            part = split[t]
            assert part.labels.min() >= 0 and part.labels.max() == k - 1
            # task t is the whole-alphabet task's characters offset .. offset + k - 1, relabelled from 0
            keep = (whole_split[0].labels >= offset) & (whole_split[0].labels < offset + k)
            want = sorted((int(y) - offset, bytes(x.numpy().tobytes()))
                          for x, y in zip(whole_split[0].images[keep], whole_split[0].labels[keep]))
            assert _keyed(part) == want
        offset += k


def test_characters_per_task_merges_a_remainder_of_one_character():
    dm = _dm(train_drawers=1, val_drawers=2, test_drawers=17, characters_per_task=4)
    n = sum(t.out_features for t in dm.tasks)  # Greek has 24 characters: 6 tasks of 4
    groups = dm._groups(torch.arange(9))
    assert [len(g) for g in groups] == [4, 5]  # 4 + 4 + 1: the single character joins the task before
    assert [len(g) for g in dm._groups(torch.arange(10))] == [4, 4, 2]
    assert n == sum(len(g) for g in dm._groups(torch.arange(n)))


@pytest.mark.parametrize("bad", [1, 0, -3, 2.5, True])
def test_characters_per_task_must_be_an_integer_of_at_least_two(bad):
    with pytest.raises(ValueError, match="characters_per_task must be an integer >= 2"):
        OmniglotAlphabetsDataModule(characters_per_task=bad)
