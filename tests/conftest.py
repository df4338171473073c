import os

import torch

# The suite runs small models: one intra-op thread is faster than two on small tensors and keeps
# timings stable when the cores are shared.
torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
