"""A small MAML run that checkpoints every step and resumes from its newest readable checkpoint;
test_fault_injection.py SIGKILLs it at random points.

    python fault_job.py <run_dir> <max_steps>
"""
import glob
import os
import re
import sys
import time

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from tasklight import MAMLModule, MLP, SinusoidDataModule
from tasklight.core.checkpoint import check_checkpoint_file


class Progress(Callback):
    """Writes the step reached (for the test to aim its kills) and slows steps down a little."""

    def __init__(self, path):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step}\n")
        time.sleep(0.2)


def newest_readable(ckpt_dir):
    found = []
    for p in glob.glob(os.path.join(ckpt_dir, "*.ckpt")):
        m = re.search(r"step=(\d+)", p)
        if m:
            found.append((int(m.group(1)), p))
    for _, p in sorted(found, reverse=True):
        try:
            check_checkpoint_file(p)
            return p
        except ValueError:  # killed while writing it: take the one before
            continue
    return None


def main():
    torch.set_num_threads(1)
    run_dir, max_steps = sys.argv[1], int(sys.argv[2])
    ckpt_dir = os.path.join(run_dir, "ckpt")
    torch.manual_seed(0)
    module = MAMLModule(MLP(1, [16, 16], 1), inner_steps=2, inner_lr=0.05,
                        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    dm = SinusoidDataModule(k_shot=5, q_queries=5, meta_batch_size=4, batches_per_epoch=5, seed=5)
    ck = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, inference_mode=False, num_sanity_val_steps=0, limit_val_batches=0,
                      callbacks=[ck, Progress(os.path.join(run_dir, "progress.txt"))], default_root_dir=run_dir)
    start = newest_readable(ckpt_dir)
    with open(os.path.join(run_dir, "starts.txt"), "a") as f:
        f.write(f"{os.path.basename(start) if start else 'scratch'}\n")
    trainer.fit(module, dm, ckpt_path=start)
    torch.save(module.state_dict(), os.path.join(run_dir, "final.pt"))


if __name__ == "__main__":
    main()
