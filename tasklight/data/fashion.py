"""Fashion-MNIST (Xiao et al. 2017) and MultiFashion (two overlaid items, one task each; Lin et al. 2019).

The data are the four standard IDX files (``train-images-idx3-ubyte`` ...), raw or ``.gz``, in one folder.
Every file is verified by the SHA-256 of its *decompressed* bytes (:data:`FASHION_FILES`), so the
official ``.gz`` files and the recompressed ones of the Debian package ``dataset-fashion-mnist`` both pass;
a file that does not match is an error naming the file, the expected and the actual digest.

Where the files come from (:func:`default_fashion_root`): ``$TASKLIGHT_FASHION_MNIST`` when set; else the
Debian package's folder ``/usr/share/datasets/fashion-mnist`` when it holds the files
(``apt-get install dataset-fashion-mnist``); else ``<cache>/fashion-mnist`` (``$TASKLIGHT_CACHE``, default
``~/.cache/tasklight``), which ``download=True`` fills from the official location (the Zalando URLs
torchvision uses) through :func:`tasklight.data.download.download`: atomic, resumable, verified before
the file is put in place.

* :class:`FashionMNISTDataModule` -- Fashion-MNIST as one 10-class task on the multi-task batch contract.
* :class:`MultiFashionDataModule` -- two tasks on the same images: each image overlays two Fashion-MNIST
  items, task ``"left"`` names the up-left one, task ``"right"`` the down-right one.
"""
from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from tasklight.data.batch import TaskSpec
from tasklight.data.multitask import ImageTask, MultiTaskDataModule
from tasklight.data.omniglot import default_cache_dir

__all__ = ["FASHION_URL", "FASHION_FILES", "FASHION_CLASSES", "DEBIAN_FASHION_ROOT", "FashionMNIST",
           "FashionChecksumError", "default_fashion_root", "load_fashion_mnist", "download_fashion_mnist",
           "FashionMNISTDataModule", "MultiFashionDataModule"]

#: The official location of the four ``.gz`` files (Zalando Research, MIT licence), as torchvision uses it.
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
#: Where the Debian package ``dataset-fashion-mnist`` installs them.
DEBIAN_FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
#: name -> (SHA-256 of the decompressed bytes, decompressed size in bytes).
FASHION_FILES = {
    "train-images-idx3-ubyte": ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47040016),
    "train-labels-idx1-ubyte": ("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60008),
    "t10k-images-idx3-ubyte": ("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7840016),
    "t10k-labels-idx1-ubyte": ("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10008),
}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


class FashionChecksumError(ValueError):
    """A Fashion-MNIST file whose decompressed bytes do not have the expected SHA-256."""


@dataclass
class FashionMNIST:
    """The four files, parsed: uint8 images ``[n, 28, 28]`` and int64 labels ``[n]``."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


def _has_files(root: Path) -> bool:
    return all((root / n).is_file() or (root / f"{n}.gz").is_file() for n in FASHION_FILES)


def default_fashion_root() -> Path:
    """``$TASKLIGHT_FASHION_MNIST``; else the Debian package's folder when it holds the files; else
    ``<cache>/fashion-mnist`` (where ``download=True`` puts them)."""
    env = os.environ.get("TASKLIGHT_FASHION_MNIST")
    if env:
        return Path(env)
    if _has_files(DEBIAN_FASHION_ROOT):
        return DEBIAN_FASHION_ROOT
    return default_cache_dir() / "fashion-mnist"


def _decompressed(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def _verify(name: str, data: bytes, where: Path) -> None:
    expected = FASHION_FILES[name][0]
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise FashionChecksumError(
            f"{where}: the decompressed bytes of {name} have SHA-256 {actual}, expected {expected}; the file is "
            f"damaged or is not Fashion-MNIST's. Delete it and download it again (download=True), or reinstall "
            f"the package dataset-fashion-mnist")


def _parse_idx(data: bytes, name: str) -> Tensor:
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{name} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    start = 4 + 4 * ndim
    count = 1
    for d in dims:
        count *= d
    if len(data) != start + count:
        raise ValueError(f"{name}: the header says {dims} ({count} bytes) but the file holds {len(data) - start}")
    return torch.frombuffer(bytearray(data[start:]), dtype=torch.uint8).reshape(dims)


def download_fashion_mnist(root: Optional[Union[str, os.PathLike]] = None, url: str = FASHION_URL) -> Path:
    """Fetch the ``.gz`` files that ``root`` lacks from ``url`` (default: the official location); each is
    verified by the SHA-256 of its decompressed bytes before it is put in place. Returns ``root``."""
    from tasklight.data.download import download

    root = Path(root) if root is not None else default_cache_dir() / "fashion-mnist"
    for name in FASHION_FILES:
        if (root / name).is_file() or (root / f"{name}.gz").is_file():
            continue
        dest = root / f"{name}.gz"
        download(f"{url.rstrip('/')}/{name}.gz", dest, None,
                 verify=lambda part, name=name, dest=dest: _verify(name, _decompressed_gz(part), dest))
    return root


def _decompressed_gz(path: Path) -> bytes:
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as err:  # not gzip, or truncated
        raise FashionChecksumError(f"{path}: not a complete gzip file ({err}); download it again") from None


@lru_cache(maxsize=2)
def _load(root: Path, stamp: tuple) -> FashionMNIST:
    arrays = {}
    for name in FASHION_FILES:
        path = root / name if (root / name).is_file() else root / f"{name}.gz"
        try:
            data = _decompressed(path)
        except (OSError, EOFError) as err:
            raise FashionChecksumError(f"{path}: cannot be read or decompressed ({err}); delete it and download "
                                       f"it again (download=True)") from None
        _verify(name, data, path)
        arrays[name] = _parse_idx(data, name)
    return FashionMNIST(arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"].long(),
                        arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"].long())


def load_fashion_mnist(root: Optional[Union[str, os.PathLike]] = None, download: bool = False,
                       url: str = FASHION_URL) -> FashionMNIST:
    """The verified Fashion-MNIST arrays from ``root`` (default :func:`default_fashion_root`); with
    ``download=True`` missing files are first fetched from ``url``. Parsed once per process."""
    root = Path(root) if root is not None else default_fashion_root()
    if not _has_files(root):
        if not download:
            missing = [n for n in FASHION_FILES if not ((root / n).is_file() or (root / f"{n}.gz").is_file())]
            raise FileNotFoundError(
                f"Fashion-MNIST files {missing} not found in {root}. Install them with `apt-get install "
                f"dataset-fashion-mnist` (Debian/Ubuntu; found automatically), pass download=True to fetch "
                f"them from {FASHION_URL}, or give root= (or $TASKLIGHT_FASHION_MNIST) a folder holding the four "
                f"IDX files")
        download_fashion_mnist(root, url)
    stamp = tuple(p.stat().st_mtime_ns for p in sorted(root.iterdir()) if p.name.split(".")[0] in FASHION_FILES)
    return _load(root.resolve(), stamp)


def _split_train(n: int, val_size: int, split_seed: int) -> tuple[Tensor, Tensor]:
    """(train indices, validation indices) of ``n`` training images: a seeded permutation's last
    ``val_size`` validate."""
    from tasklight.core.seeding import seeded_generator

    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be between 0 and {n - 1} (the training images), got {val_size}")
    perm = torch.randperm(n, generator=seeded_generator(int(split_seed), 0))
    return perm[:n - val_size], perm[n - val_size:]


def _subset(idx: Tensor, size: Optional[int], name: str) -> Tensor:
    if size is None:
        return idx
    if not 1 <= size <= len(idx):
        raise ValueError(f"{name} must be between 1 and {len(idx)} (the images available), got {size}")
    return idx[:size]


class _FashionBase(MultiTaskDataModule):
    def __init__(self, root, download, download_url, val_size, train_size, test_size, split_seed,
                 batch_size_per_task, steps_per_epoch, eval_batch_size, task_descriptors, seed, num_workers) -> None:
        super().__init__(batch_size_per_task=batch_size_per_task, steps_per_epoch=steps_per_epoch,
                         eval_batch_size=eval_batch_size, task_descriptors=task_descriptors, seed=seed,
                         num_workers=num_workers)
        if int(split_seed) < 0:
            raise ValueError(f"split_seed must be a non-negative integer, got {split_seed}")
        self.root = Path(root) if root is not None else default_fashion_root()
        self.download, self.download_url = bool(download), download_url
        self.val_size, self.train_size, self.test_size = int(val_size), train_size, test_size
        self.split_seed = int(split_seed)

    def prepare_data(self) -> None:
        load_fashion_mnist(self.root, self.download, self.download_url)

    def _splits(self) -> tuple[FashionMNIST, Tensor, Tensor, Tensor]:
        data = load_fashion_mnist(self.root, self.download, self.download_url)
        train, val = _split_train(len(data.train_labels), self.val_size, self.split_seed)
        test = torch.arange(len(data.test_labels))
        return (data, _subset(train, self.train_size, "train_size"), val,
                _subset(test, self.test_size, "test_size"))


class FashionMNISTDataModule(_FashionBase):
    """Fashion-MNIST as one 10-class task (``"fashion"``) on the multi-task batch contract.

    The last ``val_size`` images of a seeded permutation of the 60,000 training images
    (``split_seed``) validate; ``train_size`` / ``test_size`` keep only the first that many of the remaining
    training / of the 10,000 test images (default: all). Images are ``[1, 28, 28]`` floats in [0, 1].

    Args:
        root: folder of the four IDX files (default :func:`default_fashion_root`).
        download: fetch missing files from ``download_url`` (the official location) into ``root``.
        Other arguments: see :class:`~tasklight.data.multitask.MultiTaskDataModule`.
    """

    def __init__(self, root: Optional[str] = None, download: bool = False, download_url: str = FASHION_URL,
                 val_size: int = 5000, train_size: Optional[int] = None, test_size: Optional[int] = None,
                 split_seed: int = 0, batch_size_per_task: int = 64, steps_per_epoch: int = 100,
                 eval_batch_size: int = 1000, task_descriptors: Optional[Union[Tensor, str]] = None, seed: int = 0,
                 num_workers: int = 0) -> None:
        super().__init__(root, download, download_url, val_size, train_size, test_size, split_seed,
                         batch_size_per_task, steps_per_epoch, eval_batch_size, task_descriptors, seed, num_workers)

    input_shape = (1, 28, 28)

    def build(self):
        data, train, val, test = self._splits()
        return ([TaskSpec("fashion", 10, "classification")],
                [ImageTask(data.train_images[train], data.train_labels[train])],
                [ImageTask(data.train_images[val], data.train_labels[val]) if len(val) else None],
                [ImageTask(data.test_images[test], data.test_labels[test])])


class MultiFashionDataModule(_FashionBase):
    """MultiFashion (Lin et al., NeurIPS 2019, after Sener & Koltun's MultiMNIST): two tasks on the same images.

    Each canvas overlays two Fashion-MNIST items: on a ``28 + shift`` square canvas (36 x 36 with the
    default ``shift=8``) the first item sits in the top-left corner (shifted up-left), the second ``shift``
    pixels lower and further right (shifted down-right); the canvas is their pixel-wise maximum, resized
    back to ``image_size`` x ``image_size`` (bilinear, antialiased). Task ``"left"`` classifies the first
    item (10 classes), task ``"right"`` the second.

    Splits: the training images are split as in :class:`FashionMNISTDataModule` (``val_size`` held out
    by a seeded permutation, ``split_seed``); each split's canvases pair only that split's images (the
    test canvases pair test images), so no image of one split appears in another. A split has one canvas
    per image by default (each image is the first item once, the second item is another seeded
    permutation of the split); ``<split>_canvases`` draws that many instead. Everything is a pure function
    of ``split_seed``: every model given the same ``split_seed`` sees the same canvases.

    Args:
        root, download, download_url, val_size, split_seed: see :class:`FashionMNISTDataModule`.
        train_size, test_size: keep only the first that many images of the split's pool.
        train_canvases, val_canvases, test_canvases: canvases per split (default: one per image).
        shift: offset in pixels of the second item (1 .. 27; 8 gives the 36 x 36 canvas of Lin et al.).
        image_size: side of the final images (28 as in Lin et al.).
        Other arguments: see :class:`~tasklight.data.multitask.MultiTaskDataModule`.
    """

    TASKS = ("left", "right")

    def __init__(self, root: Optional[str] = None, download: bool = False, download_url: str = FASHION_URL,
                 val_size: int = 5000, train_size: Optional[int] = None, test_size: Optional[int] = None,
                 train_canvases: Optional[int] = None, val_canvases: Optional[int] = None,
                 test_canvases: Optional[int] = None, shift: int = 8, image_size: int = 28, split_seed: int = 0,
                 batch_size_per_task: int = 64, steps_per_epoch: int = 100, eval_batch_size: int = 1000,
                 task_descriptors: Optional[Union[Tensor, str]] = None, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__(root, download, download_url, val_size, train_size, test_size, split_seed,
                         batch_size_per_task, steps_per_epoch, eval_batch_size, task_descriptors, seed, num_workers)
        if not 1 <= shift < 28:
            raise ValueError(f"shift must be between 1 and 27 so that the two 28x28 items are offset and overlap, "
                             f"got {shift}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        for name, v in (("train_canvases", train_canvases), ("val_canvases", val_canvases),
                        ("test_canvases", test_canvases)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 (or None for one canvas per image), got {v}")
        self.shift, self.image_size = int(shift), int(image_size)
        self.canvases = {"train": train_canvases, "val": val_canvases, "test": test_canvases}
        self.pairs: dict[str, Tensor] = {}  # per split, [n, 2]: the image indices of each canvas's two items

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (1, self.image_size, self.image_size)

    def overlay(self, first: Tensor, second: Tensor) -> Tensor:
        """uint8 canvases ``[n, image_size, image_size]`` of the uint8 items ``first``, ``second`` ``[n, 28, 28]``."""
        if first.shape != second.shape or first.shape[-2:] != (28, 28):
            raise ValueError(f"overlay needs two batches of 28x28 items of the same shape, got {tuple(first.shape)} "
                             f"and {tuple(second.shape)}")
        k, out = self.shift, []
        for a, b in zip(first.split(4096), second.split(4096)):
            canvas = a.new_zeros((len(a), 28 + k, 28 + k))
            canvas[:, :28, :28] = a
            canvas[:, k:, k:] = torch.maximum(canvas[:, k:, k:], b)
            if self.image_size != 28 + k:
                small = F.interpolate(canvas[:, None].float(), size=(self.image_size, self.image_size),
                                      mode="bilinear", align_corners=False, antialias=True)[:, 0]
                canvas = small.round_().clamp_(0, 255).to(torch.uint8)
            out.append(canvas)
        return torch.cat(out) if out else first.new_zeros((0, self.image_size, self.image_size))

    def _pairs(self, pool: Tensor, want: Optional[int], split_id: int) -> Tensor:
        from tasklight.core.seeding import seeded_generator

        n = len(pool)
        m = n if want is None else int(want)
        gen = seeded_generator(self.split_seed, 1, split_id)
        reps = -(-m // n)
        first = torch.cat([torch.randperm(n, generator=gen) for _ in range(reps)])[:m]
        second = torch.cat([torch.randperm(n, generator=gen) for _ in range(reps)])[:m]
        return torch.stack([pool[first], pool[second]], 1)

    def build(self):
        data, train, val, test = self._splits()
        tasks = [TaskSpec(name, 10, "classification") for name in self.TASKS]
        out = {"train": [], "val": [], "test": []}
        sources = {"train": (data.train_images, data.train_labels, train),
                   "val": (data.train_images, data.train_labels, val),
                   "test": (data.test_images, data.test_labels, test)}
        for split_id, (split, (images, labels, pool)) in enumerate(sources.items()):
            if len(pool) == 0:
                out[split] = [None, None]
                continue
            pairs = self._pairs(pool, self.canvases[split], split_id)
            self.pairs[split] = pairs
            canvas = self.overlay(images[pairs[:, 0]], images[pairs[:, 1]])
            out[split] = [ImageTask(canvas, labels[pairs[:, t]]) for t in range(2)]
        return tasks, out["train"], out["val"], out["test"]
