"""Checkpoints that say what they are: the learner class, a checksum of the state, and the data
settings that give the state its meaning, all checked on load.

Every tasklight learner calls :func:`stamp_checkpoint` in ``on_save_checkpoint`` and
:func:`verify_checkpoint` in ``on_load_checkpoint`` (before Lightning loads the weights), so

* a checkpoint of one learner class resumed into another (MAML into iMAML) is refused;
* a checkpoint whose weights or optimiser state changed after it was written (a flipped bit, a
  partial copy) is refused instead of training on corrupted numbers;
* episodic DataModules store the settings that change what the state means (``n_way``,
  ``k_shot``, ``q_queries``, ``image_size``, ``meta_batch_size``...) in their own state and refuse
  to resume with others (:meth:`tasklight.data.episodes.EpisodicDataModule.load_state_dict`).

:func:`check_checkpoint_file` reads a file before a run resumes from it and names it if it is not a
readable checkpoint (truncated, empty, not a checkpoint). The tasklight CLI calls it for ``--ckpt_path``.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

KEY = "tasklight"


def _feed(h, tree: Any) -> None:
    if isinstance(tree, Tensor):
        t = tree.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(tree, Mapping):
        for k in sorted(tree, key=str):
            h.update(f"K{k!s}".encode())
            _feed(h, tree[k])
    elif isinstance(tree, (list, tuple)):
        h.update(f"L{len(tree)}".encode())
        for v in tree:
            _feed(h, v)
    else:
        h.update(f"V{tree!r}".encode())


def state_checksum(checkpoint: Mapping) -> str:
    """SHA-256 of the checkpoint's weights and optimiser state (tensor bytes, shapes and dtypes)."""
    h = hashlib.sha256()
    _feed(h, checkpoint.get("state_dict", {}))
    _feed(h, [s.get("state", {}) for s in checkpoint.get("optimizer_states", [])])
    return h.hexdigest()


def learner_name(module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def stamp_checkpoint(module, checkpoint: dict) -> None:
    """Record the learner class and the state checksum in ``checkpoint[KEY]``."""
    checkpoint[KEY] = {"learner": learner_name(module), "checksum": state_checksum(checkpoint)}


def verify_checkpoint(module, checkpoint: Mapping) -> None:
    """Refuse a checkpoint of another learner class or whose state does not match its checksum."""
    info = checkpoint.get(KEY)
    if not isinstance(info, Mapping):
        return  # written by another program: Lightning's own checks apply
    saved, mine = info.get("learner"), learner_name(module)
    if saved != mine:
        raise ValueError(f"this checkpoint was written by {saved} but is being loaded into {mine}: resume or load it "
                         f"with the learner class that wrote it (class_path: {saved}).")
    if info.get("checksum") != state_checksum(checkpoint):
        raise ValueError("the checkpoint's weights or optimiser state do not match the checksum written with them: "
                         "the file is corrupted (a partial copy, a flipped bit). Resume from another checkpoint.")


def _first_sentence(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return text.split(". ")[0]


def check_checkpoint_file(path: os.PathLike | str) -> Optional[dict]:
    """Read ``path`` as a checkpoint (tensors and plain containers only) or raise one ``ValueError``
    naming the file; returns the checkpoint, or None for Lightning's names ``"last"``, ``"best"``..."""
    p = Path(path)
    if str(path) in ("last", "best", "hpc", "registry") or not p.suffix and not p.exists():
        return None
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist: check ckpt_path")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as err:
        size = p.stat().st_size
        raise ValueError(f"checkpoint {p} ({size} bytes) is not a readable checkpoint ({type(err).__name__}: "
                         f"{_first_sentence(err)}): it is truncated, corrupted or not a "
                         f"checkpoint. Resume from another checkpoint.") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{p} is not a Lightning checkpoint (no 'state_dict' entry)")
    info = ckpt.get(KEY)
    if isinstance(info, Mapping) and info.get("checksum") != state_checksum(ckpt):
        raise ValueError(f"checkpoint {p}: the weights or optimiser state do not match the checksum written with "
                         f"them: the file is corrupted. Resume from another checkpoint.")
    return ckpt
