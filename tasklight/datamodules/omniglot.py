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
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

PathLike = Union[str, os.PathLike]
_DRAWER = re.compile(r"_(\d+)\.png$", re.IGNORECASE)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def default_omniglot_root() -> Path:
    """``$TASKLIGHT_OMNIGLOT`` if set, else ``../shared/data/omniglot`` beside the repository."""
    env = os.environ.get("TASKLIGHT_OMNIGLOT")
    if env:
        return Path(env)
    for base in (repo_root(), Path.cwd()):
        cand = (base / ".." / "shared" / "data" / "omniglot").resolve()
        if cand.exists():
            return cand
    return (repo_root() / ".." / "shared" / "data" / "omniglot").resolve()


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
            f"a folder of Omniglot zip files, or one zip file), or set TASKLIGHT_OMNIGLOT. The tests and default "
            f"configs read ../shared/data/omniglot beside the repository.")
    if root.is_file():
        if root.suffix != ".zip":
            raise ValueError(f"{root} is a file but not a .zip; give a folder or an Omniglot zip file")
        return [(root.name, zipfile.ZipFile(root))]
    zips = sorted(root.glob("*.zip"))
    if zips:
        return [(z.name, zipfile.ZipFile(z)) for z in zips]
    return [(root.name, root)]


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
    from PIL import Image

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

    key = hashlib.sha1(repr((str(root.resolve()), image_size, sorted((a, sorted((c, len(v)) for c, v in chars.items()))
                                                                     for a, chars in entries.items()))).encode())
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = cache / f"omniglot_{key.hexdigest()[:16]}.pt"
    if cache_file.exists():
        try:
            return OmniglotImages(**torch.load(cache_file, weights_only=False))
        except Exception:  # a corrupt cache is rebuilt
            pass

    alpha_names = sorted(entries)
    images, img_a, img_c, img_d, char_names, char_a = [], [], [], [], [], []
    src_of = {a: sources[owner[a]][1] for a in alpha_names}
    for ai, a in enumerate(alpha_names):
        for c in sorted(entries[a]):
            ci = len(char_names)
            char_names.append(f"{a}/{c}")
            char_a.append(ai)
            for drawer, member in sorted(entries[a][c]):
                with Image.open(io.BytesIO(_read(src_of[a], member))) as im:
                    im = im.convert("L").resize((image_size, image_size), Image.LANCZOS)
                    images.append(255 - np.asarray(im, dtype=np.uint8))
                img_a.append(ai)
                img_c.append(ci)
                img_d.append(drawer)
    data = dict(images=torch.from_numpy(np.stack(images)), image_alphabet=torch.tensor(img_a),
                image_character=torch.tensor(img_c), image_drawer=torch.tensor(img_d), alphabets=alpha_names,
                characters=char_names, character_alphabet=torch.tensor(char_a))
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        torch.save(data, tmp)
        os.replace(tmp, cache_file)
    except OSError:
        pass  # read-only home: work from memory
    return OmniglotImages(**data)
