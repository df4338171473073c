"""Omniglot (Lake et al. 2015): loading and the few-shot DataModule.

Reads the standard layout ``alphabet/character/*.png`` from a folder, or from the zip files that
hold it (``images_background.zip``, ``images_evaluation.zip``, the "minimal" ``*_small1/2.zip``).
Images are resized (28x28 by default), inverted to white strokes on black, and cached as one
uint8 tensor, so episodes are cut from memory.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from tasklight.core.checks import check_int

PathLike = Union[str, os.PathLike]
_DRAWER = re.compile(r"_(\d+)\.png$", re.IGNORECASE)


ASSETS = Path(__file__).resolve().parent / "assets" / "omniglot"

#: The official Omniglot zips (Lake et al. 2015, MIT licence) and their MD5 checksums.
OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
OMNIGLOT_FILES = {"images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
                  "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811"}


def default_omniglot_root() -> Path:
    """``$TASKLIGHT_OMNIGLOT`` if set, else the two small background sets shipped with tasklight.

    ``tasklight/data/assets/omniglot`` holds ``images_background_small1.zip`` and
    ``images_background_small2.zip`` (the Omniglot "minimal" sets: 5 alphabets each, 3 MB, MIT
    licence). The full background and evaluation sets: ``OmniglotDataModule(download=True)``.
    """
    env = os.environ.get("TASKLIGHT_OMNIGLOT")
    return Path(env) if env else ASSETS


def default_download_root() -> Path:
    """Where ``download=True`` puts the full Omniglot zips: ``<cache>/omniglot``."""
    return default_cache_dir() / "omniglot"


def download_omniglot(root: Optional[PathLike] = None, base_url: str = OMNIGLOT_URL,
                      files: Optional[dict[str, str]] = None) -> Path:
    """Fetch the official background and evaluation zips into ``root`` (checksums verified,
    atomic, resumable; files already there and intact are kept). Returns ``root``."""
    from tasklight.data.download import download

    root = Path(root) if root is not None else default_download_root()
    for name, md5 in (OMNIGLOT_FILES if files is None else files).items():
        download(f"{base_url.rstrip('/')}/{name}", root / name, md5)
    return root


def default_cache_dir() -> Path:
    return Path(os.environ.get("TASKLIGHT_CACHE", Path.home() / ".cache" / "tasklight"))


@dataclass
class OmniglotImages:
    """All images of some Omniglot alphabets, in memory.

    ``images`` is ``uint8 [N, H, W]`` with white strokes on black; the ``image_*`` tensors index
    each image's alphabet, character (global id) and drawer (0..19).
    """

    images: Tensor
    image_alphabet: Tensor
    image_character: Tensor
    image_drawer: Tensor
    alphabets: list[str]
    characters: list[str]
    character_alphabet: Tensor

    @property
    def num_characters(self) -> int:
        return len(self.characters)

    def character_indices(self) -> list[Tensor]:
        """For each character, the indices of its images."""
        order = torch.argsort(self.image_character, stable=True)
        counts = torch.bincount(self.image_character, minlength=self.num_characters)
        return list(torch.split(order, counts.tolist()))


def _sources(root: Path) -> list[tuple[str, object]]:
    """The places that hold ``alphabet/character/*.png`` trees: (label, folder Path or ZipFile)."""
    if not root.exists():
        raise FileNotFoundError(
            f"Omniglot data not found at {root}. Pass `root` (a folder in the layout alphabet/character/*.png, "
            f"a folder of Omniglot zip files, or one zip file), set TASKLIGHT_OMNIGLOT, or pass download=True "
            f"to fetch the official background and evaluation sets.")
    if root.is_file():
        if root.suffix != ".zip":
            raise ValueError(f"{root} is a file but not a .zip; give a folder or an Omniglot zip file")
        return [(root.name, _open_zip(root))]
    # the folder's own alphabet/character/*.png tree first, then every zip in it: a zip beside an
    # extracted tree adds alphabets, it does not hide the tree
    return [(root.name, root)] + [(z.name, _open_zip(z)) for z in sorted(root.glob("*.zip"))]


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path} is not a readable zip file ({e}); remove it from the Omniglot folder or "
                         f"download it again") from e


def _fingerprint(src, members: Iterable[str]) -> list:
    """What the cache key knows of each image file: the zip's CRC-32 and size of every member
    (a content checksum), or a loose file's size and modification time (ns)."""
    if isinstance(src, zipfile.ZipFile):
        return [(m, src.getinfo(m).CRC, src.getinfo(m).file_size) for m in members]
    out = []
    for m in members:
        st = (src / m).stat()
        out.append((m, st.st_size, st.st_mtime_ns))
    return out


def _decode_png(data: bytes, where: str, image_size: int) -> np.ndarray:
    """One Omniglot image as uint8 ``[image_size, image_size]``, white strokes on black.

    Transparent pixels (RGBA, LA, or a palette/grey image with a transparency key) are composited
    over the white paper before conversion to grey, so a transparent background stays background.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                rgba = im.convert("RGBA")
                paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(paper, rgba)
            grey = im.convert("L").resize((image_size, image_size), Image.LANCZOS)
            return 255 - np.asarray(grey, dtype=np.uint8)
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        raise ValueError(f"cannot read the Omniglot image {where}: {type(e).__name__}: {e}. Replace or delete "
                         f"this file (or download the dataset again).") from e


def _list_pngs(src) -> list[tuple[str, str, str]]:
    """(alphabet, character, member) for every png of a source."""
    out = []
    if isinstance(src, zipfile.ZipFile):
        names = [n for n in src.namelist() if n.lower().endswith(".png")]
    else:
        names = [str(p.relative_to(src)) for p in src.rglob("*.png")]
    for n in names:
        parts = Path(n).parts
        if len(parts) < 3:
            continue
        out.append((parts[-3], parts[-2], n))
    return out


def _read(src, member: str) -> bytes:
    if isinstance(src, zipfile.ZipFile):
        return src.read(member)
    return (src / member).read_bytes()


def load_omniglot(root: Optional[PathLike] = None, image_size: int = 28, cache_dir: Optional[PathLike] = None,
                  alphabets: Optional[Sequence[str]] = None) -> OmniglotImages:
    """Load Omniglot images into memory (cached on disk after the first call).

    Alphabets that occur in several sources (Greek and Latin are in both "small" background sets)
    are taken once, from the first source. ``alphabets`` restricts the set by name.
    """
    root = Path(root) if root is not None else default_omniglot_root()
    sources = _sources(root)
    entries: dict[str, dict[str, list[tuple[int, str]]]] = {}
    owner: dict[str, int] = {}
    for si, (_, src) in enumerate(sources):
        for alpha, char, member in _list_pngs(src):
            if owner.setdefault(alpha, si) != si:
                continue  # duplicate alphabet in a later source
            m = _DRAWER.search(member)
            drawer = int(m.group(1)) - 1 if m else -1
            entries.setdefault(alpha, {}).setdefault(char, []).append((drawer, member))
    if alphabets is not None:
        missing = sorted(set(alphabets) - set(entries))
        if missing:
            raise ValueError(f"alphabets {missing} are not in {root}; available: {sorted(entries)}")
        entries = {a: entries[a] for a in alphabets}
    if not entries:
        raise FileNotFoundError(f"no images in the layout alphabet/character/*.png under {root}")

    alpha_names = sorted(entries)
    src_of = {a: sources[owner[a]][1] for a in alpha_names}
    # the key covers every image file's contents (zip CRC) or size and mtime (loose files), so an
    # image edited in place is never served from a stale cache
    files = [(a, c, _fingerprint(src_of[a], [m for _, m in sorted(entries[a][c])]))
             for a in alpha_names for c in sorted(entries[a])]
    key = hashlib.sha256(repr((CACHE_VERSION, str(root.resolve()), image_size, files)).encode())
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = cache / f"omniglot_{key.hexdigest()[:24]}.npz"
    if cache_file.exists():
        cached = _read_cache(cache_file)
        if cached is not None:
            return cached

    images, img_a, img_c, img_d, char_names, char_a = [], [], [], [], [], []
    for ai, a in enumerate(alpha_names):
        for c in sorted(entries[a]):
            ci = len(char_names)
            char_names.append(f"{a}/{c}")
            char_a.append(ai)
            for drawer, member in sorted(entries[a][c]):
                label = f"{sources[owner[a]][0]}:{member}"
                images.append(_decode_png(_read(src_of[a], member), label, image_size))
                img_a.append(ai)
                img_c.append(ci)
                img_d.append(drawer)
    data = dict(images=torch.from_numpy(np.stack(images)), image_alphabet=torch.tensor(img_a),
                image_character=torch.tensor(img_c), image_drawer=torch.tensor(img_d), alphabets=alpha_names,
                characters=char_names, character_alphabet=torch.tensor(char_a))
    _write_cache(cache_file, data)
    return OmniglotImages(**data)


CACHE_VERSION = 2
_CACHE_TENSORS = ("images", "image_alphabet", "image_character", "image_drawer", "character_alphabet")


def _write_cache(cache_file: Path, data: dict) -> None:
    """Plain arrays in an ``.npz`` (no pickle), written atomically."""
    arrays = {k: data[k].numpy() for k in _CACHE_TENSORS}
    arrays["alphabets"] = np.asarray(data["alphabets"], dtype=str)
    arrays["characters"] = np.asarray(data["characters"], dtype=str)
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f"{cache_file.stem}.tmp{os.getpid()}.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, cache_file)
    except OSError as e:  # a read-only cache folder: work from memory, and say so
        warnings.warn(f"could not write the Omniglot cache {cache_file} ({e}); images are decoded again next "
                      f"time. Set TASKLIGHT_CACHE or cache_dir to a writable folder.", RuntimeWarning)


def _read_cache(cache_file: Path) -> Optional[OmniglotImages]:
    """The cached images, or None (with a warning naming the file) if it is not a valid cache.

    ``allow_pickle=False``: a cache file can hold arrays only, never code.
    """
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            fields = {k: torch.from_numpy(z[k].copy()) for k in _CACHE_TENSORS}
            fields["alphabets"] = [str(a) for a in z["alphabets"]]
            fields["characters"] = [str(c) for c in z["characters"]]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        warnings.warn(f"ignoring the invalid Omniglot cache file {cache_file} ({type(e).__name__}: {e}); it is "
                      f"rebuilt from the images.", RuntimeWarning)
        return None
    n = fields["images"].shape[0]
    if fields["images"].dtype != torch.uint8 or any(fields[k].shape != (n,) for k in _CACHE_TENSORS[1:4]):
        warnings.warn(f"ignoring the inconsistent Omniglot cache file {cache_file}; it is rebuilt.", RuntimeWarning)
        return None
    return OmniglotImages(**fields)


# --------------------------------------------------------------------------------- DataModule
from tasklight.data.episodes import EpisodicDataModule, NWayKShot, TaskFn  # noqa: E402


def split_characters(data: OmniglotImages, by: str = "character",
                     fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0,
                     alphabets: Optional[dict[str, Sequence[str]]] = None) -> dict[str, list[int]]:
    """Assign every character to exactly one of train/val/test.

    ``by="alphabet"``: whole alphabets go to a split (explicit ``alphabets={"val": [...], "test": [...]}``
    or a seeded shuffle cut by ``fractions``); ``by="character"``: characters are shuffled and cut.
    """
    if by not in ("alphabet", "character"):
        raise ValueError(f"split must be 'alphabet' or 'character', got {by!r}")
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"split_fractions must be three non-negative numbers (train, val, test), got {fractions}")
    fr = np.asarray(fractions, dtype=float) / float(sum(fractions))
    rng = np.random.default_rng(seed)
    names = ("train", "val", "test")
    if by == "alphabet":
        if alphabets:
            unknown = sorted({a for v in alphabets.values() for a in v} - set(data.alphabets))
            if unknown:
                raise ValueError(f"unknown alphabets {unknown}; available: {data.alphabets}")
            given = {a for v in alphabets.values() for a in v}
            assign = {s: [data.alphabets.index(a) for a in alphabets.get(s, [])] for s in names}
            rest = [i for i, a in enumerate(data.alphabets) if a not in given]
            for s in names:
                if s not in alphabets:
                    assign[s] = rest
                    break
        else:
            order = rng.permutation(len(data.alphabets)).tolist()
            assign = {s: order[lo:hi] for s, lo, hi in zip(names, *_cut_points(fr, len(order)))}
        ca = data.character_alphabet.tolist()
        return {s: [c for c in range(data.num_characters) if ca[c] in set(assign[s])] for s in names}
    order = rng.permutation(data.num_characters).tolist()
    return {s: sorted(order[lo:hi]) for s, lo, hi in zip(names, *_cut_points(fr, len(order)))}


def _cut_points(fractions: np.ndarray, n: int) -> tuple[list[int], list[int]]:
    """Split ``n`` items by ``fractions``; every split with a positive fraction gets at least one."""
    counts = [max(1, int(round(f * n))) if f > 0 else 0 for f in fractions]
    counts[0] = n - sum(counts[1:])
    if counts[0] < (1 if fractions[0] > 0 else 0):
        raise ValueError(f"cannot split {n} items by fractions {fractions.tolist()}: too few items")
    ends = np.cumsum(counts).tolist()
    return [0, *ends[:2]], ends


class _OmniglotFetch:
    """Picklable image fetcher: uint8 images -> float [len, 1, H, W] in [0, 1], rotated by 90*k degrees."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __call__(self, idx: Tensor, rotation: Tensor) -> Tensor:
        x = self.images[idx].float().div_(255.0).unsqueeze(1)
        k = int(rotation[0]) if len(rotation) else 0
        return torch.rot90(x, k, dims=(-2, -1)) if k else x


class OmniglotDataModule(EpisodicDataModule):
    """N-way K-shot Omniglot episodes.

    Args:
        root: a folder in the layout ``alphabet/character/*.png``, a folder of Omniglot zip files,
            or one zip; default: the two small background sets shipped with tasklight
            (``$TASKLIGHT_OMNIGLOT`` overrides), or with ``download=True`` ``<cache>/omniglot``.
        download: fetch the official ``images_background.zip`` and ``images_evaluation.zip`` (964 +
            659 characters) into ``root`` if they are not there yet, verifying their MD5 checksums;
            the writes are atomic and an interrupted download resumes.
        download_url: where the zips are fetched from (a mirror holding the same files).
        n_way, k_shot, q_queries: classes per episode, support and query images per class.
        image_size: images are resized to this square size (28 as in the literature).
        rotations: add the 90/180/270-degree rotations of each training character as new classes.
        split: ``"character"`` (characters shuffled and cut by ``split_fractions``) or ``"alphabet"``
            (whole alphabets per split; ``val_alphabets``/``test_alphabets`` name them explicitly).
            No character is in two splits.
        split_seed: seed of the split (independent of the episode ``seed``).
        eval_n_way: classes per validation/test episode (default ``n_way``): Prototypical Networks
            train with more classes per episode than they are tested with (60-way for 5-way).
    """

    def __init__(self, root: Optional[str] = None, download: bool = False, download_url: str = OMNIGLOT_URL,
                 n_way: int = 5, k_shot: int = 1, q_queries: int = 15,
                 meta_batch_size: int = 16, batches_per_epoch: int = 200, val_episodes: int = 200,
                 test_episodes: int = 600, eval_batch_size: Optional[int] = None, image_size: int = 28,
                 rotations: bool = True, split: Literal["character", "alphabet"] = "character",
                 split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
                 val_alphabets: Optional[list[str]] = None, test_alphabets: Optional[list[str]] = None,
                 split_seed: int = 0, seed: int = 0, num_workers: int = 0, cache_dir: Optional[str] = None,
                 eval_n_way: Optional[int] = None) -> None:
        super().__init__(meta_batch_size, batches_per_epoch, val_episodes, test_episodes, eval_batch_size, seed,
                         num_workers)
        check_int("OmniglotDataModule", "n_way", n_way, 2, "classes per episode")
        if eval_n_way is not None:
            check_int("OmniglotDataModule", "eval_n_way", eval_n_way, 2, "classes per evaluation episode")
        check_int("OmniglotDataModule", "k_shot", k_shot, 1, "support images per class")
        check_int("OmniglotDataModule", "q_queries", q_queries, 1, "query images per class")
        check_int("OmniglotDataModule", "image_size", image_size, 1, "the side of the square images")
        check_int("OmniglotDataModule", "split_seed", split_seed, 0)
        self.save_hyperparameters()
        self.download, self.download_url = download, download_url
        if download:
            self.root = Path(root) if root else default_download_root()
        else:
            self.root = Path(root) if root else default_omniglot_root()
            if not self.root.exists():
                _sources(self.root)  # raises the clear missing-data error now, not at fit time
        self.n_way, self.k_shot, self.q_queries = n_way, k_shot, q_queries
        if eval_n_way is not None and eval_n_way < 2:
            raise ValueError(f"eval_n_way must be >= 2 (or null for n_way), got {eval_n_way}")
        self.eval_n_way = eval_n_way or n_way
        self.image_size, self.rotations = image_size, rotations
        self.split, self.split_fractions, self.split_seed = split, tuple(split_fractions), split_seed
        self.alphabet_split = None
        if val_alphabets is not None or test_alphabets is not None:
            if split != "alphabet":
                raise ValueError("val_alphabets/test_alphabets need split='alphabet'")
            self.alphabet_split = {k: v for k, v in (("val", val_alphabets), ("test", test_alphabets)) if v is not None}
        self.cache_dir = cache_dir
        self.data: Optional[OmniglotImages] = None
        self.splits: dict[str, list[int]] = {}
        self._samplers: dict[str, NWayKShot] = {}

    def prepare_data(self) -> None:
        if self.download:
            download_omniglot(self.root, self.download_url)
        load_omniglot(self.root, self.image_size, self.cache_dir)  # builds the cache once

    def setup(self, stage: Optional[str] = None) -> None:
        if self.data is not None:
            return
        if self.download:
            download_omniglot(self.root, self.download_url)  # no-op when prepare_data already ran
        self.data = load_omniglot(self.root, self.image_size, self.cache_dir)
        self.splits = split_characters(self.data, self.split, self.split_fractions, self.split_seed,
                                       self.alphabet_split)
        per_char = self.data.character_indices()
        fetch = _OmniglotFetch(self.data.images)
        for name, chars in self.splits.items():
            if not chars:
                continue
            transforms = 4 if (self.rotations and name == "train") else 1
            ways = self.n_way if name == "train" else self.eval_n_way
            self._samplers[name] = NWayKShot([per_char[c] for c in chars], fetch, ways, self.k_shot,
                                             self.q_queries, class_transforms=transforms, split=name)

    def task_fn(self, split: str) -> TaskFn:
        self.setup()
        if split not in self._samplers:
            raise ValueError(f"the {split!r} split has no characters; change split_fractions or the alphabet lists")
        return self._samplers[split]
