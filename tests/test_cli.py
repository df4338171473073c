"""The `tasklight` command: every meta-learning config parses, and each runs end to end on a tiny budget."""
import subprocess
import sys
from pathlib import Path

import pytest

from tasklight.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
META_CONFIGS = ["maml_sinusoid", "imaml_sinusoid", "maml_omniglot", "maml_omniglot_20way", "fomaml_omniglot",
                "imaml_omniglot"]
TINY = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--data.init_args.meta_batch_size", "2",
        "--data.init_args.batches_per_epoch", "2", "--data.init_args.val_episodes", "2",
        "--data.init_args.test_episodes", "4", "--data.init_args.eval_batch_size", "2"]


def _cli_configs():
    """Configs for `tasklight fit` (those with a top-level `model:`; others feed scripts)."""
    return sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")
                  if any(line.startswith("model:") for line in p.read_text().splitlines()))


@pytest.mark.parametrize("name", _cli_configs())
def test_every_config_parses(name, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(["fit", "--config", str(ROOT / "configs" / f"{name}.yaml"), "--print_config"])
    assert exc.value.code == 0
    assert "class_path" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("name", META_CONFIGS)
def test_meta_config_runs_fit_then_test(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = ["--data.init_args.num_workers", "0", "--model.init_args.net.init_args.hidden", "8"] \
        if "omniglot" in name else []
    cli = run_cli(["fit", "--config", str(ROOT / "configs" / f"{name}.yaml"), *TINY, *extra])
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    key = "test/acc" if "omniglot" in name else "test/mse"
    assert key in metrics and f"{key}@0" in metrics  # fit ended with a test on the fitted weights


@pytest.mark.slow
def test_console_entry_point_fit_and_test_from_checkpoint(tmp_path):
    env_cmd = [sys.executable, "-m", "tasklight.cli"]
    args = ["--config", str(ROOT / "configs" / "maml_sinusoid.yaml"), *TINY, "--test_after_fit", "false",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            f"--trainer.callbacks.dirpath={tmp_path / 'ck'}", "--trainer.callbacks.save_last=true"]
    fit = subprocess.run(env_cmd + ["fit", *args], cwd=tmp_path, capture_output=True, text=True)
    assert fit.returncode == 0, fit.stderr[-3000:]
    test = subprocess.run(env_cmd + ["test", "--config", str(ROOT / "configs" / "maml_sinusoid.yaml"), *TINY,
                                     "--ckpt_path", str(tmp_path / "ck" / "last.ckpt")],
                          cwd=tmp_path, capture_output=True, text=True)
    assert test.returncode == 0, test.stderr[-3000:]
    assert "test/mse@10" in test.stdout
