import os

import torch

# The suite runs small models: one intra-op thread is faster than two on small tensors and keeps
# timings stable when the cores are shared.
torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _finish_wandb_runs():
    """Each test starts and ends without an open W&B run (a logger would otherwise reuse it)."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()
