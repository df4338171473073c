import numpy as np
import pytest
import torch

from tasklight.core.seeding import seeded_generator


def test_same_keys_same_stream_and_neighbouring_keys_unrelated():
    a = torch.rand(1000, generator=seeded_generator(3, 1, 0, 7))
    b = torch.rand(1000, generator=seeded_generator(3, 1, 0, 7))
    c = torch.rand(1000, generator=seeded_generator(3, 1, 0, 8))
    assert torch.equal(a, b)
    assert abs(float(np.corrcoef(a.numpy(), c.numpy())[0, 1])) < 0.15


def test_seed_is_the_seedsequence_state():
    state = np.random.SeedSequence([5, 2]).generate_state(2, dtype=np.uint32)
    assert seeded_generator(5, 2).initial_seed() == int(state[0]) << 32 | int(state[1])


def test_negative_or_missing_keys_are_an_error():
    with pytest.raises(ValueError, match="non-negative"):
        seeded_generator(1, -1)
    with pytest.raises(ValueError, match="non-negative"):
        seeded_generator()
