"""Two overlapping Omniglot characters per canvas, one task per character (``OverlaidOmniglotDataModule``)."""
import pytest
import torch
import torch.nn.functional as F

from tasklight.data.multitask import OverlaidOmniglotDataModule
from tasklight.data.omniglot import load_omniglot

SIZE, SHIFT = 16, 5
ALPHABETS = ["Greek", "Tagalog"]


def _dm(**kw):
    args = dict(alphabets=ALPHABETS, num_characters=6, image_size=SIZE, shift=SHIFT, train_drawers=2, val_drawers=3,
                test_canvases=50)
    args.update(kw)
    dm = OverlaidOmniglotDataModule(**args)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def data():
    return load_omniglot(None, SIZE, alphabets=ALPHABETS)


@pytest.fixture(scope="module")
def dm():
    return _dm(split_seed=4)


def test_overlay_is_the_pixelwise_max_of_the_two_shifted_images():
    dm = OverlaidOmniglotDataModule(image_size=3, shift=1)
    first = torch.tensor([[[1, 2, 3], [4, 5, 6], [7, 8, 9]]], dtype=torch.uint8)
    second = torch.full((1, 3, 3), 5, dtype=torch.uint8)
    expect = torch.tensor([[[1, 2, 3, 0], [4, 5, 6, 5], [7, 8, 9, 5], [0, 5, 5, 5]]], dtype=torch.uint8)
    assert torch.equal(dm.overlay(first, second), expect)
    with pytest.raises(ValueError, match="two batches of 3x3 images"):
        dm.overlay(first, torch.zeros(1, 4, 4, dtype=torch.uint8))


def test_canvases_and_labels_are_the_two_characters(dm, data):
    assert [t.name for t in dm.task_specs] == ["left", "right"]
    assert [t.out_features for t in dm.task_specs] == [6, 6]
    assert dm.input_shape == (1, SIZE + SHIFT, SIZE + SHIFT)
    names = {n: i for i, n in enumerate(dm.characters)}
    assert len(names) == 6 and all(n.split("/")[0] in ALPHABETS for n in names)
    for split, sets in (("train", dm.train_sets), ("val", dm.val_sets), ("test", dm.test_sets)):
        left, right = sets
        assert left.images is right.images  # both tasks see the same canvases
        a, b = dm.pairs[split].unbind(1)
        pad = (0, SHIFT, 0, SHIFT)  # (left, right, top, bottom) of the last two dimensions
        first = F.pad(data.images[a], pad)
        second = F.pad(data.images[b], (SHIFT, 0, SHIFT, 0))
        assert torch.equal(left.images, torch.maximum(first, second))
        assert (first > 0).any() and (second > 0).any() and ((first > 0) & (second > 0)).any()  # they overlap
        expect_left = torch.tensor([names[data.characters[int(c)]] for c in data.image_character[a]])
        expect_right = torch.tensor([names[data.characters[int(c)]] for c in data.image_character[b]])
        assert torch.equal(left.labels, expect_left) and torch.equal(right.labels, expect_right)
    x, y = dm.train_sets[1].fetch(torch.arange(4))
    assert x.shape == (4, 1, SIZE + SHIFT, SIZE + SHIFT) and 0 <= x.min() and x.max() <= 1
    assert torch.equal(y, dm.train_sets[1].labels[:4])


def test_splits_use_disjoint_drawers_and_all_pairs_by_default(dm, data):
    images = {s: set(dm.pairs[s].flatten().tolist()) for s in ("train", "val", "test")}
    assert not images["train"] & images["val"] and not images["train"] & images["test"]
    assert not images["val"] & images["test"]
    # per character: 2 training, 3 validation drawers; the test split draws from the other 15
    for split, k in (("train", 2), ("val", 3)):
        chars = data.image_character[torch.tensor(sorted(images[split]))]
        assert torch.bincount(chars).max() == k and len(chars) == 6 * k
        n = 6 * k
        pairs = dm.pairs[split]
        assert len(pairs) == n * n and len({tuple(p) for p in pairs.tolist()}) == n * n  # every ordered pair once
    test = dm.pairs["test"]
    assert len(test) == 50 and len({tuple(p) for p in test.tolist()}) == 50
    assert len(data.image_character[test.flatten()].unique()) <= 6
    # the drawers are a seeded draw per character, not the drawer numbers
    assert sorted(data.image_drawer[torch.tensor(sorted(images["train"]))].unique().tolist()) != [0, 1]


def test_deterministic_from_the_seeds(dm):
    again = _dm(split_seed=4)
    assert again.characters == dm.characters
    for split in ("train", "val", "test"):
        assert torch.equal(again.pairs[split], dm.pairs[split])
    other = _dm(split_seed=5)
    assert other.characters == dm.characters  # the character set does not depend on the split seed
    assert set(other.pairs["train"].flatten().tolist()) != set(dm.pairs["train"].flatten().tolist())
    assert _dm(split_seed=4, character_seed=1).characters != dm.characters


@pytest.mark.parametrize("kw, match", [
    (dict(shift=SIZE), "shift must be between 1 and image_size - 1"),
    (dict(shift=0), "shift must be between 1 and image_size - 1"),
    (dict(num_characters=1), "num_characters must be at least 2"),
    (dict(train_drawers=0), "train_drawers must be >= 1"),
    (dict(train_drawers=10, val_drawers=5, test_drawers=6), "at most the 20 drawers"),
    (dict(split_seed=-1), "split_seed must be a non-negative integer"),
    (dict(test_canvases=0), "test_canvases must be >= 1"),
])
def test_bad_settings_are_refused_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        OverlaidOmniglotDataModule(alphabets=ALPHABETS, image_size=SIZE, **kw)


def test_bad_settings_are_refused_at_setup():
    with pytest.raises(ValueError, match=r"num_characters=1000 but .* have only 41 characters"):
        _dm(num_characters=1000)
    # 6 characters x 3 validation drawers = 18 images, 324 pairs
    with pytest.raises(ValueError, match=r"val_canvases=325 but the val split has only 324 distinct pairs"):
        _dm(val_canvases=325)
