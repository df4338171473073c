"""Embed the tasks of a DataModule with Task2Vec and write the embeddings and distance matrices to disk.

``tasklight embed`` (the same options as ``python scripts/embed_tasks.py``, kept for old commands):

    tasklight embed --config configs/task2vec_embed_omniglot.yaml
    tasklight embed --data.class_path tasklight.data.omniglot.OmniglotDataModule \\
        --probe_ckpt runs/maml_omniglot/latest/checkpoints/last.ckpt --output_dir runs/task2vec

The ``data`` section is the same as in a ``tasklight fit`` config; a config may build on another
with ``extends:`` as the ``tasklight fit`` configs do. The probe is a checkpoint
(``--probe_ckpt``: a Lightning ``.ckpt`` that loads on its own, or a ``.pt`` holding a pickled
``nn.Module``, read only with ``--allow_pickle true``) or a network given by class path (``--probe``) with optional weights
(``--probe_state``: a state dict or a Lightning ``.ckpt``; ``--probe_state_prefix trunk`` takes a
MultiTaskModule's trunk out of its checkpoint, ``net`` a meta-learner's network).
``--task2vec.*`` are the options of ``tasklight.task2vec.embedding.Task2Vec``.

Writes to ``--output_dir``:

* ``task2vec.pt``: names, embeddings ``[T, D]``, layers, symmetric and asymmetric distance
  matrices, trivial embedding, descriptors (see ``save_embeddings``);
* ``descriptors.pt``: the ``[T, D]`` descriptor tensor alone (task order = the DataModule's), to
  pass as the task descriptors z_i of a multi-task DataModule;
* ``distances.csv``: the symmetric distance matrix with task names.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Literal, Optional

import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch import LightningDataModule, seed_everything
from torch import nn

from tasklight.task2vec import (DEFAULT_ALPHA, Task2Vec, datamodule_tasks, load_expert, save_embeddings)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--extends", type=Optional[str], default=None,
                        help="in a config file: the config it builds on (applied first, relative to the file)")
    parser.add_subclass_arguments(LightningDataModule, "data", required=True,
                                  help="the DataModule whose tasks to embed (as in a tasklight config)")
    parser.add_subclass_arguments(nn.Module, "probe", required=False, help="probe network by class path")
    parser.add_argument("--probe_ckpt", type=Optional[str], default=None,
                        help="probe checkpoint: a Lightning .ckpt or a .pt holding an nn.Module (needs --allow_pickle)")
    parser.add_argument("--allow_pickle", type=bool, default=False,
                        help="read a --probe_ckpt .pt holding a pickled nn.Module (unpickling runs code from the "
                             "file: only for files you wrote)")
    parser.add_argument("--probe_state", type=Optional[str], default=None,
                        help="weights for --probe: a state_dict file or a Lightning .ckpt")
    parser.add_argument("--probe_state_prefix", type=Optional[str], default=None,
                        help="take only the entries under this prefix (e.g. 'trunk' or 'net') of --probe_state")
    parser.add_class_arguments(Task2Vec, "task2vec", skip={"probe"}, instantiate=False)
    parser.add_argument("--split", type=Literal["train", "val", "test"], default="val")
    parser.add_argument("--max_tasks", type=Optional[int], default=None)
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                        help="weight of the trivial-embedding term of the asymmetric distance")
    parser.add_argument("--descriptor_transform", type=Literal["log_standardize", "l2", "none"],
                        default="log_standardize")
    parser.add_argument("--output_dir", type=str, default="runs/task2vec")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def load_probe(cfg, init) -> nn.Module:
    if cfg.probe_ckpt and init.get("probe") is not None:
        raise ValueError("give either --probe_ckpt or --probe, not both")
    if cfg.probe_ckpt and not Path(cfg.probe_ckpt).is_file():
        raise ValueError(f"--probe_ckpt {cfg.probe_ckpt} does not exist: give the path of a checkpoint")
    if cfg.probe_ckpt:
        return load_expert(cfg.probe_ckpt, allow_pickle=cfg.allow_pickle)
    probe = init.get("probe")
    if probe is None:
        raise ValueError("no probe: pass --probe_ckpt (a checkpoint) or --probe.class_path (a network)")
    if cfg.probe_state and not Path(cfg.probe_state).is_file():
        raise ValueError(f"--probe_state {cfg.probe_state} does not exist: train the probe first (tasklight fit "
                         f"--config configs/task2vec_probe_omniglot.yaml writes runs/task2vec_probe_omniglot/latest/"
                         f"checkpoints/last.ckpt) or give the path of a state file")
    if cfg.probe_state:
        # weights only: a state file holds tensors, never code (a full pickled object is refused)
        state = torch.load(cfg.probe_state, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # a Lightning checkpoint
        if cfg.probe_state_prefix:
            prefix = cfg.probe_state_prefix.rstrip(".") + "."
            if not any(k.startswith(prefix) for k in state):
                # a module nested deeper (MultiTaskModule keeps its trunk in `architecture.trunk`)
                nested = {k[:k.index("." + prefix) + len(prefix) + 1] for k in state if "." + prefix in k}
                if len(nested) == 1:
                    prefix = nested.pop()
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not sub:
                tops = sorted({k.split(".")[0] for k in state})
                raise ValueError(f"no entry of {cfg.probe_state} starts with {prefix!r}; its top-level names are "
                                 f"{tops}: set --probe_state_prefix to one of them")
            state = sub
        try:
            probe.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"--probe_state {cfg.probe_state} does not fit --probe {type(probe).__name__}: {err}. "
                             f"Give the probe's exact architecture, and --probe_state_prefix for a checkpoint of a "
                             f"module that holds it (e.g. 'trunk' for MultiTaskModule, 'net' for meta-learners).") from err
    return probe


def main(args: Optional[list[str]] = None) -> dict:
    from tasklight.cli import _resolve_config_args

    parser = build_parser()
    cfg = parser.parse_args(_resolve_config_args(list(sys.argv[1:] if args is None else args)))
    seed_everything(cfg.seed, verbose=False)
    init = parser.instantiate(cfg)
    dm = init.data
    probe = load_probe(cfg, init)
    dm.prepare_data()
    dm.setup("fit" if cfg.split != "test" else "test")
    tasks = datamodule_tasks(dm, cfg.split, cfg.max_tasks)
    embedder = Task2Vec(probe, **{k: v for k, v in dict(cfg.task2vec).items()})
    embeddings = embedder.embed_tasks(tasks)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = save_embeddings(out_dir / "task2vec.pt", embeddings, cfg.alpha, cfg.descriptor_transform)
    torch.save(result["descriptors"], out_dir / "descriptors.pt")
    names, dist = result["names"], result["distance_symmetric"]
    with open(out_dir / "distances.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", *names])
        for name, row in zip(names, dist.tolist()):
            writer.writerow([name, *[f"{v:.6f}" for v in row]])
    width = max(8, *(len(n) for n in names))
    print(f"Task2Vec symmetric distances ({len(names)} tasks, {embeddings[0].vector.numel()} dims, "
          f"layers {embedder.layers})")
    print(" " * width + " " + " ".join(f"{n[:8]:>8}" for n in names))
    for name, row in zip(names, dist.tolist()):
        print(f"{name:<{width}} " + " ".join(f"{v:8.4f}" for v in row))
    print(f"wrote {out_dir / 'task2vec.pt'}, {out_dir / 'descriptors.pt'} ([{len(names)}, "
          f"{result['descriptors'].shape[1]}]), {out_dir / 'distances.csv'}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
