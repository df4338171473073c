"""Multi-task regression with histogram-loss heads, end to end through the CLI config."""
from pathlib import Path

import pytest
import torch

from tasklight.cli import run_cli
from tasklight.data.mtl_regression import SinusoidTasksDataModule
from tasklight.nn.losses import HistogramLoss

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "mtl_sinusoid_hlgauss.yaml"


@pytest.mark.slow
def test_hlgauss_heads_learn_every_sinusoid_task(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", str(CONFIG), "--trainer.max_epochs", "2", "--trainer.logger", "false",
                   "--trainer.enable_progress_bar", "false"])
    dm, model = cli.datamodule, cli.model
    assert isinstance(dm.tasks[0].loss, HistogramLoss)
    metrics = cli.trainer.callback_metrics
    for t, amp in enumerate(dm.amplitudes.tolist()):
        variance = amp ** 2 / 2  # the MSE of predicting 0 for y = A sin(x - phase), x uniform
        assert float(metrics[f"test/tasks/sin{t}/mse"]) < 0.3 * variance, (t, amp)
    # every task head outputs one logit per bin (the trunk's features are 64 wide)
    bins = dm.tasks[0].loss.num_bins
    for head in model.heads:
        assert head(torch.zeros(2, 64)).shape == (2, bins)


def test_sinusoid_tasks_errors():
    with pytest.raises(ValueError, match="num_tasks must be an integer >= 1"):
        SinusoidTasksDataModule(num_tasks=0)
    with pytest.raises(ValueError, match="noise"):
        SinusoidTasksDataModule(noise=-1.0)
