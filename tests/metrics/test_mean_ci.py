import math

import pytest
import torch

from tasklight.metrics import MeanCI, mean_ci95


def test_mean_ci_over_several_updates_equals_the_textbook_formula():
    values = torch.linspace(-3, 5, 37) ** 2
    metric = MeanCI()
    for chunk in values.split(10):  # sums accumulated over batches of different sizes
        metric.update(chunk)
    res = metric.compute()
    n = values.numel()
    mean = sum(values.tolist()) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values.tolist()) / (n - 1))
    assert res["count"].item() == n
    assert res["mean"].item() == pytest.approx(mean, rel=1e-12)
    assert res["std"].item() == pytest.approx(std, rel=1e-10)
    assert res["ci95"].item() == pytest.approx(1.96 * std / math.sqrt(n), rel=1e-10)
    assert mean_ci95(values) == pytest.approx((mean, 1.96 * std / math.sqrt(n)), rel=1e-10)


def test_mean_ci95_of_one_value_has_no_interval():
    mean, ci = mean_ci95(torch.tensor([2.5]))
    assert mean == 2.5 and math.isnan(ci)
