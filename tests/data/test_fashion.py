"""Fashion-MNIST and MultiFashion: checksums of the decompressed bytes, download=True against a local HTTP
server on 127.0.0.1 serving small IDX files made here, the overlay, the splits, and the real files of the
Debian package dataset-fashion-mnist (installed by .ci/run)."""
import gzip
import hashlib

import pytest
import torch
from test_download import _Server  # the local HTTP server with Range support (tests/data/test_download.py)

from tasklight.data import fashion as fm
from tasklight.data.download import DownloadError


def _idx(array: torch.Tensor) -> bytes:
    """The IDX bytes of a uint8 tensor."""
    head = bytes([0, 0, 0x08, array.dim()]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return head + array.numpy().tobytes()


def _tiny(n_train=40, n_test=20, seed=0) -> dict[str, bytes]:
    g = torch.Generator().manual_seed(seed)
    return {"train-images-idx3-ubyte": _idx(torch.randint(0, 256, (n_train, 28, 28), generator=g, dtype=torch.uint8)),
            "train-labels-idx1-ubyte": _idx(torch.arange(n_train, dtype=torch.uint8) % 10),
            "t10k-images-idx3-ubyte": _idx(torch.randint(0, 256, (n_test, 28, 28), generator=g, dtype=torch.uint8)),
            "t10k-labels-idx1-ubyte": _idx((torch.arange(n_test, dtype=torch.uint8) * 3) % 10)}


@pytest.fixture
def tiny(monkeypatch):
    """Small IDX files, registered as the expected Fashion-MNIST files (their digests)."""
    raw = _tiny()
    monkeypatch.setattr(fm, "FASHION_FILES", {k: (hashlib.sha256(v).hexdigest(), len(v)) for k, v in raw.items()})
    return raw


def test_download_fetches_verifies_and_caches(tmp_path, tiny):
    served = {f"{k}.gz": gzip.compress(v) for k, v in tiny.items()}
    root = tmp_path / "fm"
    with _Server(served) as srv:
        dm = fm.FashionMNISTDataModule(root=str(root), download=True, download_url=srv.url, val_size=10,
                                       batch_size_per_task=4)
        dm.prepare_data()
        dm.setup()
        assert sorted(p.name for p in root.iterdir()) == sorted(served)
        assert [len(dm.train_sets[0]), len(dm.val_sets[0]), len(dm.test_sets[0])] == [30, 10, 20]
        x, y = dm.test_sets[0].fetch(torch.arange(20))
        assert torch.equal(y, (torch.arange(20) * 3) % 10)
        assert torch.equal((x[:, 0] * 255).round().to(torch.uint8),
                           torch.frombuffer(bytearray(tiny["t10k-images-idx3-ubyte"][16:]), dtype=torch.uint8)
                           .reshape(20, 28, 28))
        n = len(srv.log)
        fm.MultiFashionDataModule(root=str(root), download=True, download_url=srv.url, val_size=10).prepare_data()
        assert len(srv.log) == n  # the files are there and intact: no request


def test_a_download_with_the_wrong_bytes_names_the_file_and_digests_and_leaves_nothing(tmp_path, tiny):
    served = {f"{k}.gz": gzip.compress(v) for k, v in tiny.items()}
    bad = tiny["t10k-labels-idx1-ubyte"][:-1] + b"\x08"  # the last label was 7
    served["t10k-labels-idx1-ubyte.gz"] = gzip.compress(bad)
    root = tmp_path / "fm"
    with _Server(served) as srv:
        with pytest.raises(fm.FashionChecksumError) as err:
            fm.load_fashion_mnist(root, download=True, url=srv.url)
    msg = str(err.value)
    assert "t10k-labels-idx1-ubyte" in msg and fm.FASHION_FILES["t10k-labels-idx1-ubyte"][0] in msg
    assert hashlib.sha256(bad).hexdigest() in msg
    assert not (root / "t10k-labels-idx1-ubyte.gz").exists()
    assert not list(root.glob("*.part"))  # nothing half-written


def test_an_interrupted_download_resumes_and_a_damaged_local_file_is_refused(tmp_path, tiny):
    served = {f"{k}.gz": gzip.compress(v) for k, v in tiny.items()}
    root = tmp_path / "fm"
    with _Server(served) as srv:
        name = "train-images-idx3-ubyte.gz"
        srv.cut[name] = len(served[name]) // 2
        data = fm.load_fashion_mnist(root, download=True, url=srv.url)  # download() retries from the .part
        ranged = [entry for entry in srv.log if entry[0] == name]
        assert ranged[0][1] is None and ranged[1][1] == f"bytes={len(served[name]) // 2}-"
    assert data.train_images.shape == (40, 28, 28) and not list(root.glob("*.part"))
    # a raw (uncompressed) file with other bytes is refused, naming the file and both digests
    other = tmp_path / "other"
    other.mkdir()
    for k, v in tiny.items():
        (other / k).write_bytes(v if k != "train-labels-idx1-ubyte" else v[:-1] + bytes([v[-1] ^ 1]))
    with pytest.raises(fm.FashionChecksumError, match=r"train-labels-idx1-ubyte have SHA-256 [0-9a-f]{64}, expected"):
        fm.load_fashion_mnist(other)


def test_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*download=True"):
        fm.load_fashion_mnist(tmp_path)
    with pytest.raises(DownloadError):  # nothing listens on the port: an error, not a hang
        fm.download_fashion_mnist(tmp_path, url="http://127.0.0.1:9/none")


def test_multifashion_overlays_two_items_and_keeps_the_splits_apart(tmp_path, tiny):
    for k, v in tiny.items():
        (tmp_path / k).write_bytes(v)
    data = fm.load_fashion_mnist(tmp_path)
    dm = fm.MultiFashionDataModule(root=str(tmp_path), val_size=10, shift=8, image_size=36, split_seed=3,
                                   train_canvases=50)
    dm.setup()
    assert [t.name for t in dm.task_specs] == ["left", "right"] and dm.input_shape == (1, 36, 36)
    pairs = dm.pairs
    assert len(pairs["train"]) == 50 and len(pairs["val"]) == 10 and len(pairs["test"]) == 20
    assert not set(pairs["train"].flatten().tolist()) & set(pairs["val"].flatten().tolist())
    # every val / test image is the first item exactly once (one canvas per image)
    assert sorted(pairs["test"][:, 0].tolist()) == list(range(20))
    # the canvas, built independently: first item top-left, second 8 px down-right, pixel-wise maximum
    a, b = pairs["test"][:, 0], pairs["test"][:, 1]
    expect = torch.zeros(20, 36, 36, dtype=torch.uint8)
    for i in range(20):
        for r in range(36):
            for c in range(36):
                v1 = int(data.test_images[a[i], r, c]) if r < 28 and c < 28 else 0
                v2 = int(data.test_images[b[i], r - 8, c - 8]) if r >= 8 and c >= 8 else 0
                expect[i, r, c] = max(v1, v2)
    x, y_left = dm.test_sets[0].fetch(torch.arange(20))
    assert torch.equal((x[:, 0] * 255).round().to(torch.uint8), expect)
    assert torch.equal(y_left, data.test_labels[a]) and torch.equal(dm.test_sets[1].fetch(torch.arange(20))[1],
                                                                    data.test_labels[b])
    # deterministic in split_seed; another seed, other canvases
    again = fm.MultiFashionDataModule(root=str(tmp_path), val_size=10, shift=8, image_size=36, split_seed=3,
                                      train_canvases=50)
    again.setup()
    assert all(torch.equal(again.pairs[s], pairs[s]) for s in pairs)
    other = fm.MultiFashionDataModule(root=str(tmp_path), val_size=10, split_seed=4)
    other.setup()
    assert not torch.equal(other.pairs["test"], pairs["test"]) and other.input_shape == (1, 28, 28)
    assert other.test_sets[0].fetch(torch.arange(3))[0].shape == (3, 1, 28, 28)
    with pytest.raises(ValueError, match="shift must be between 1 and 27"):
        fm.MultiFashionDataModule(root=str(tmp_path), shift=28)
    with pytest.raises(ValueError, match="val_size must be between 0 and 39"):
        fm.MultiFashionDataModule(root=str(tmp_path), val_size=40).setup()


# ----------------------------------------------------------------------------- the real files
_REAL = fm.DEBIAN_FASHION_ROOT
real = pytest.mark.skipif(not fm._has_files(_REAL), reason=f"Fashion-MNIST is not installed in {_REAL} "
                          f"(apt-get install dataset-fashion-mnist; .ci/run installs it)")


@real
def test_the_real_files_pass_their_checksums_and_are_fashion_mnist():
    assert fm.default_fashion_root() == _REAL or "TASKLIGHT_FASHION_MNIST" in __import__("os").environ
    data = fm.load_fashion_mnist(_REAL)
    assert data.train_images.shape == (60000, 28, 28) and data.test_images.shape == (10000, 28, 28)
    assert torch.equal(torch.bincount(data.train_labels), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(data.test_labels), torch.full((10,), 1000))
    assert data.test_labels[:5].tolist() == [9, 2, 1, 1, 6]  # the first test items: ankle boot, pullover, ...


@real
def test_multifashion_on_the_real_files():
    dm = fm.MultiFashionDataModule(root=str(_REAL), val_size=1000, train_size=3000, test_size=2000, split_seed=0)
    dm.setup()
    assert [len(dm.train_sets[0]), len(dm.val_sets[0]), len(dm.test_sets[0])] == [3000, 1000, 2000]
    x, y = dm.train_sets[0].fetch(torch.arange(256))
    assert x.shape == (256, 1, 28, 28) and 0 <= float(x.min()) and float(x.max()) <= 1
    # both items are visible: the top-left corner holds the first item, the bottom-right the second
    assert float(x[:, 0, :4, :4].mean()) < float(x[:, 0, 8:20, 8:20].mean())
    assert len(set(y.tolist())) == 10


@real
@pytest.mark.slow
def test_a_small_network_learns_both_multifashion_tasks():
    import lightning as L

    from tasklight.multitask import MultiTaskModule

    torch.manual_seed(0)
    dm = fm.MultiFashionDataModule(root=str(_REAL), val_size=500, train_size=4000, test_size=1000,
                                   batch_size_per_task=64, steps_per_epoch=150)
    model = MultiTaskModule(_Flat(), head_type="linear")
    trainer = L.Trainer(max_steps=150, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, dm)
    dm.setup()
    model.eval()
    with torch.no_grad():
        for t in range(2):
            x, y = dm.test_sets[t].fetch(torch.arange(1000))
            acc = (model(x, t).argmax(-1) == y).float().mean()
            assert acc > 0.4, f"task {t}: test accuracy {acc:.3f} after 150 steps (chance 0.1)"


class _Flat(torch.nn.Sequential):
    out_features = 64

    def __init__(self):
        super().__init__(torch.nn.Flatten(), torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64),
                         torch.nn.ReLU())
