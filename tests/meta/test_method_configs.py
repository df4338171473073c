"""The ANIL, BOIL, MAML++, Reptile, ProtoNet and ProtoMAML configs run end to end through the CLI on a tiny
budget (the GPU-scale ones on CPU, on the small Omniglot sets)."""
from pathlib import Path

import pytest

from tasklight.cli import run_cli
from tasklight.data.omniglot import default_omniglot_root

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--data.init_args.meta_batch_size", "2",
        "--data.init_args.batches_per_epoch", "2", "--data.init_args.val_episodes", "2",
        "--data.init_args.test_episodes", "4", "--data.init_args.eval_batch_size", "2"]
CONFIGS = ["anil_sinusoid", "boil_sinusoid", "mamlpp_sinusoid", "reptile_sinusoid", "anil_omniglot",
           "boil_omniglot_20way", "mamlpp_omniglot", "reptile_omniglot", "protonet_omniglot",
           "protomaml_omniglot_20way", "mamlpp_omniglot_gpu", "protonet_omniglot_gpu", "reptile_omniglot_20way_gpu"]


def test_every_method_has_its_configs():
    names = {p.stem for p in (ROOT / "configs").glob("*.yaml")}
    for m in ("anil", "boil", "mamlpp", "reptile", "protonet", "protomaml", "maml"):
        for suffix in ("omniglot", "omniglot_20way", "omniglot_gpu", "omniglot_20way_gpu"):
            assert f"{m}_{suffix}" in names, f"{m}_{suffix}"
    for m in ("anil", "boil", "mamlpp", "reptile"):
        assert f"{m}_sinusoid" in names


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_method_config_runs_fit_then_test(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = []
    if "omniglot" in name:
        extra = ["--data.init_args.num_workers", "0", "--model.init_args.net.init_args.hidden", "8"]
    if name.endswith("_gpu"):  # the GPU-scale settings, on this machine's CPU and the small Omniglot sets
        extra += ["--trainer.accelerator", "cpu", "--data.init_args.download", "false",
                  "--data.init_args.root", str(default_omniglot_root()),
                  "--data.init_args.split_fractions", "[0.7, 0.1, 0.2]"]  # 100 of 1,623 is too few val chars here
        if name.startswith("protonet"):
            extra += ["--data.init_args.n_way", "20"]  # fewer than the paper's 60 training classes: small sets
    if name.startswith("reptile"):
        extra += ["--model.init_args.eval_inner_steps", "2"]  # the configs test after 10 or 50 steps
    cli = run_cli(["fit", "--config", str(ROOT / "configs" / f"{name}.yaml"), *TINY, *extra])
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    key = "test/acc" if "omniglot" in name else "test/mse"
    assert key in metrics and f"{key}@0" in metrics
    if name == "protonet_omniglot_gpu":
        assert cli.datamodule.task_fn("test").n_way == 5 and cli.datamodule.task_fn("train").n_way == 20
