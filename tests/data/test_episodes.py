"""Episodic sampling: determinism, ranks, workers, resumption, splits and the errors for bad input."""
import zipfile

import pytest
import torch

from tasklight.data.batch import MetaBatch, check_episode_shapes
from tasklight.data.episodes import EpisodeStream, NWayKShot
from tasklight.data.omniglot import OmniglotDataModule, default_omniglot_root, load_omniglot
from tasklight.data.sinusoid import SinusoidDataModule


@pytest.fixture(scope="module")
def omniglot():
    return load_omniglot()


def test_omniglot_loads_both_small_sets_deduplicated(omniglot):
    assert omniglot.images.shape[1:] == (28, 28) and omniglot.images.dtype == torch.uint8
    assert sorted(omniglot.alphabets) == ['Balinese', 'Early_Aramaic', 'Greek', 'Japanese_(katakana)', 'Korean',
                                          'Latin', 'Sanskrit', 'Tagalog']
    counts = torch.bincount(omniglot.image_character)
    assert (counts == 20).all()  # 20 drawers per character, no duplicates from the second zip
    assert omniglot.image_drawer.min() == 0 and omniglot.image_drawer.max() == 19
    # strokes are white on black: most pixels are background (dark)
    assert omniglot.images.float().mean() < 60


def test_omniglot_reads_a_plain_folder_layout(tmp_path):
    with zipfile.ZipFile(default_omniglot_root() / "images_background_small2.zip") as z:
        members = [m for m in z.namelist() if "/Tagalog/" in m and m.endswith(".png")][:60]
        z.extractall(tmp_path, members=members)
    data = load_omniglot(tmp_path / "images_background_small2", cache_dir=tmp_path / "cache")
    assert data.alphabets == ["Tagalog"] and len(data.images) == 60


def _split_chars(dm):
    return {k: set(v) for k, v in dm.splits.items()}


@pytest.mark.parametrize("split", ["character", "alphabet"])
def test_splits_are_disjoint_and_cover_everything(split, omniglot):
    dm = OmniglotDataModule(split=split, n_way=5)
    dm.setup()
    s = _split_chars(dm)
    assert not (s["train"] & s["val"]) and not (s["train"] & s["test"]) and not (s["val"] & s["test"])
    assert len(s["train"] | s["val"] | s["test"]) == omniglot.num_characters
    if split == "alphabet":
        alpha = {k: {int(omniglot.character_alphabet[c]) for c in v} for k, v in s.items()}
        assert not (alpha["train"] & alpha["val"]) and not (alpha["train"] & alpha["test"])


def test_explicit_alphabet_split():
    dm = OmniglotDataModule(split="alphabet", val_alphabets=["Greek"], test_alphabets=["Latin", "Korean"])
    dm.setup()
    names = {k: {dm.data.characters[c].split("/")[0] for c in v} for k, v in dm.splits.items()}
    assert names["val"] == {"Greek"} and names["test"] == {"Latin", "Korean"}
    assert not names["train"] & {"Greek", "Latin", "Korean"}


def test_episode_structure_and_label_remapping():
    dm = OmniglotDataModule(n_way=5, k_shot=2, q_queries=3, meta_batch_size=4, batches_per_epoch=2)
    b = next(iter(dm.train_dataloader()))
    assert isinstance(b, MetaBatch)
    assert b.support_x.shape == (4, 10, 1, 28, 28) and b.query_x.shape == (4, 15, 1, 28, 28)
    for t in range(4):
        assert sorted(b.support_y[t].tolist()) == sorted(list(range(5)) * 2)
        assert sorted(b.query_y[t].tolist()) == sorted(list(range(5)) * 3)
        # a support and a query image of the same label come from the same character: their
        # images are never identical copies (distinct drawers) but labels agree class-wise
        for c in range(5):
            sx = b.support_x[t][b.support_y[t] == c]
            qx = b.query_x[t][b.query_y[t] == c]
            assert not any(torch.equal(a, q) for a in sx for q in qx)
    assert 0.0 <= float(b.support_x.min()) and float(b.support_x.max()) <= 1.0


def test_rotation_augmentation_makes_new_classes():
    dm = OmniglotDataModule(n_way=5, rotations=True)
    dm.setup()
    assert dm._samplers["train"].num_classes == 4 * len(dm.splits["train"])
    assert dm._samplers["test"].num_classes == len(dm.splits["test"])


def test_stream_is_deterministic_rank_dependent_and_worker_independent():
    a = SinusoidDataModule(meta_batch_size=3, batches_per_epoch=4, seed=1)
    b = SinusoidDataModule(meta_batch_size=3, batches_per_epoch=4, seed=1, num_workers=2)
    xa, xb = list(a.train_dataloader()), list(b.train_dataloader())
    assert [int(x.index[0]) for x in xb] == [0, 1, 2, 3]
    assert all(torch.equal(u.support_x, v.support_x) for u, v in zip(xa, xb))
    other_rank = EpisodeStream(a.task_fn("train"), 3, 4, seed=1, rank=1)
    assert not torch.allclose(other_rank.meta_batch(0).support_x, xa[0].support_x)
    other_seed = SinusoidDataModule(meta_batch_size=3, batches_per_epoch=4, seed=2)
    assert not torch.allclose(next(iter(other_seed.train_dataloader())).support_x, xa[0].support_x)
    # evaluation episodes are fixed
    t1, t2 = next(iter(a.test_dataloader())), next(iter(a.test_dataloader()))
    assert torch.equal(t1.support_x, t2.support_x)


def test_stream_resumes_from_consumed_position():
    dm = SinusoidDataModule(meta_batch_size=2, batches_per_epoch=5, seed=3)
    full = list(dm.train_dataloader())
    resumed = SinusoidDataModule(meta_batch_size=2, batches_per_epoch=5, seed=3)
    resumed.load_state_dict({"consumed": 3, "seed": 3})
    rest = list(resumed.train_dataloader())
    assert [int(b.index[0]) for b in rest] == [3, 4]
    assert all(torch.equal(u.support_x, v.support_x) for u, v in zip(full[3:], rest))
    with pytest.raises(ValueError, match="seed"):
        resumed.load_state_dict({"consumed": 3, "seed": 4})


def test_error_more_shots_and_queries_than_images():
    with pytest.raises(ValueError, match=r"k_shot \+ q_queries = 15 \+ 10 = 25 .* has only 20"):
        OmniglotDataModule(k_shot=15, q_queries=10).setup()


def test_error_n_way_larger_than_split():
    with pytest.raises(ValueError, match=r"n_way=60 but there are only \d+ classes in the 'val' split"):
        OmniglotDataModule(n_way=60, rotations=False).setup()


def test_error_missing_data_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="Omniglot data not found"):
        OmniglotDataModule(root=str(tmp_path / "nope"))


def test_nway_kshot_generic_dataset():
    # any dataset indexed by class: three classes of scalars
    classes = [torch.arange(0, 4), torch.arange(4, 8), torch.arange(8, 12)]
    data = torch.arange(12.0)
    sampler = NWayKShot(classes, lambda idx, tr: data[idx, None], n_way=2, k_shot=1, q_queries=2)
    sx, sy, qx, qy = sampler(torch.Generator().manual_seed(0))
    for x, y in ((sx, sy), (qx, qy)):
        for label in range(2):
            cls = {int(v) // 4 for v in x[y == label, 0]}
            assert len(cls) == 1  # a label maps to exactly one class


def test_check_episode_shapes_errors():
    with pytest.raises(ValueError, match="support_y"):
        check_episode_shapes(torch.zeros(2, 5, 1), torch.zeros(2, 4, 1), torch.zeros(2, 3, 1), batched=True)
    with pytest.raises(ValueError, match="features"):
        check_episode_shapes(torch.zeros(5, 1), torch.zeros(5, 1), torch.zeros(3, 2), batched=False)
    with pytest.raises(ValueError, match="tasks"):
        check_episode_shapes(torch.zeros(2, 5, 1), torch.zeros(2, 5, 1), torch.zeros(3, 3, 1), batched=True)
