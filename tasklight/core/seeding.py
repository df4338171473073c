"""Seeded random generators: one ``torch.Generator`` per tuple of integers.

Every random choice that must be reproducible across processes, DDP ranks, DataLoader workers and
resumption (episodes, task sampling, PCGrad's visiting orders, ...) draws from a generator seeded
from the tuple of what identifies it, e.g. ``(seed, stream, rank, index)``. ``numpy``'s
``SeedSequence`` mixes the tuple into well-separated 64-bit seeds (neighbouring tuples give
unrelated streams, unlike ``seed + index``).
"""
from __future__ import annotations

import numpy as np
import torch


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from the tuple of non-negative integers ``keys``."""
    if not keys or any(int(k) < 0 for k in keys):
        raise ValueError(f"seeded_generator needs one or more non-negative integers, got {keys}")
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


__all__ = ["seeded_generator"]
