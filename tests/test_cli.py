"""The `tasklight` command: every meta-learning config parses, and each runs end to end on a tiny budget."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasklight.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
META_CONFIGS = ["maml_sinusoid", "imaml_sinusoid", "maml_omniglot", "maml_omniglot_20way", "fomaml_omniglot",
                "imaml_omniglot"]
TINY = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--data.init_args.meta_batch_size", "2",
        "--data.init_args.batches_per_epoch", "2", "--data.init_args.val_episodes", "2",
        "--data.init_args.test_episodes", "4", "--data.init_args.eval_batch_size", "2"]


def _cli(args, cwd):
    """`tasklight ARGS` in a fresh process (what a user's shell runs)."""
    return subprocess.run([sys.executable, "-m", "tasklight.cli", *args], cwd=cwd, capture_output=True, text=True)


def _ours(stderr: str) -> list[str]:
    """tasklight's own lines of a run's stderr."""
    return [line for line in stderr.splitlines() if line.startswith("tasklight:")]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder (runs/ is written there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _cli_configs():
    """Configs for `tasklight fit` (those whose `extends:` chain has a top-level `model:`; others feed scripts)."""
    from tasklight.cli import expand_config

    def has_model(path):
        chain = expand_config(str(path))[1::2]
        return any(line.startswith("model:") for f in chain for line in Path(f).read_text().splitlines())

    return sorted(p.stem for p in (ROOT / "configs").glob("*.yaml") if p.name != "defaults.yaml" and has_model(p))


def _config_params():
    """Every CLI config; in the quick tier (``-m "not slow"``) only the first of each family (meta,
    multi-task, TaskMet, Task2Vec: the base on ``defaults.yaml``), the whole sweep in the full suite."""
    from tasklight.cli import expand_config

    seen, params = set(), []
    for name in _cli_configs():
        chain = expand_config(str(ROOT / "configs" / f"{name}.yaml"))[1::2]
        base = chain[1] if len(chain) > 2 else None
        params.append(pytest.param(name, marks=() if base not in seen else pytest.mark.slow))
        seen.add(base)
    return params


@pytest.mark.parametrize("name", _config_params())
def test_every_config_parses(name, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(["fit", "--config", str(ROOT / "configs" / f"{name}.yaml"), "--print_config"])
    assert exc.value.code == 0
    assert "class_path" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("name", META_CONFIGS)
def test_meta_config_runs_fit_then_test(name, in_tmp):
    extra = ["--data.init_args.num_workers", "0", "--model.init_args.net.init_args.hidden", "8"] \
        if "omniglot" in name else []
    cli = run_cli(["fit", "--config", str(ROOT / "configs" / f"{name}.yaml"), *TINY, *extra])
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    key = "test/acc" if "omniglot" in name else "test/mse"
    assert key in metrics and f"{key}@0" in metrics  # fit ended with a test on the fitted weights


@pytest.mark.slow
def test_console_entry_point_fit_and_test_from_checkpoint(tmp_path):
    args = ["--config", str(ROOT / "configs" / "maml_sinusoid.yaml"), *TINY, "--test_after_fit", "false",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            f"--trainer.callbacks.dirpath={tmp_path / 'ck'}", "--trainer.callbacks.save_last=true"]
    fit = _cli(["fit", *args], tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    test = _cli(["test", "--config", str(ROOT / "configs" / "maml_sinusoid.yaml"), *TINY,
                 "--ckpt_path", str(tmp_path / "ck" / "last.ckpt")], tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    assert "test/mse@10" in test.stdout


# ------------------------------------------------------------------ a researcher's first day
def _tiny_omniglot():
    return [*TINY, "--data.init_args.num_workers", "0", "--model.init_args.net.init_args.hidden", "8",
            "--data.init_args.q_queries", "2"]


@pytest.mark.slow
def test_packaged_config_by_name_own_run_folder_and_a_checkpoint_that_loads_alone(in_tmp):
    """`tasklight fit --config maml_omniglot` (the packaged config), then MAMLModule.load_from_checkpoint(last.ckpt)
    alone gives the trained module's predictions; a second run writes its own folder."""
    from tasklight import MAMLModule

    cli = run_cli(["fit", "--config", "maml_omniglot", *_tiny_omniglot(), "--test_after_fit", "false"])
    run_dir = Path(cli.trainer.checkpoint_callback.dirpath).resolve().parent
    assert run_dir.parent == in_tmp / "runs" / "maml_omniglot" and (run_dir / "config.yaml").is_file()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert (in_tmp / "runs" / "maml_omniglot" / "latest").resolve() == run_dir.resolve()
    loaded = MAMLModule.load_from_checkpoint(last)
    assert loaded.loss_fn.__class__.__name__ == "CrossEntropyLoss" and loaded.net.init_args["hidden"] == 8
    batch = next(iter(cli.datamodule.test_dataloader()))
    trained = cli.model.predict_episode(batch.support_x, batch.support_y, batch.query_x)
    torch.testing.assert_close(loaded.predict_episode(batch.support_x, batch.support_y, batch.query_x), trained)
    again = run_cli(["fit", "--config", "maml_omniglot", *_tiny_omniglot(), "--test_after_fit", "false"])
    other = Path(again.trainer.checkpoint_callback.dirpath).resolve().parent
    assert other != run_dir and (other / "checkpoints" / "last.ckpt").is_file()
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("last-v")]  # no last-v1.ckpt


@pytest.mark.slow
def test_predict_short_class_names_and_a_numerically_sorted_table(in_tmp, capsys):
    common = ["--model", "MAMLModule", "--model.net", "MLP", "--model.net.init_args.hidden", "[8]",
              "--model.extra_eval_steps", "[0, 5, 10]", "--model.eval_inner_steps", "1", "--data", "SinusoidDataModule",
              *TINY]
    cli = run_cli(["fit", *common])
    assert type(cli.model).__name__ == "MAMLModule"
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines() if line.startswith("test/mse@") and "_ci95" not in line]
    assert rows == ["test/mse@0", "test/mse@1", "test/mse@5", "test/mse@10"]
    ckpt = Path(cli.trainer.checkpoint_callback.last_model_path or cli.trainer.checkpoint_callback.best_model_path)
    pred = run_cli(["predict", *common, "--ckpt_path", str(ckpt)])
    results = pred.trainer.predict_loop.predictions
    assert results and results[0]["predictions"].shape == results[0]["query_y"].shape  # [T, Q]
    batch = next(iter(pred.datamodule.predict_dataloader()))
    torch.testing.assert_close(results[0]["predictions"],
                               pred.model.predict_episode(batch.support_x, batch.support_y, batch.query_x))


@pytest.mark.slow
def test_version_and_one_line_errors(tmp_path):
    import tasklight

    res = _cli(["--version"], tmp_path)
    assert res.returncode == 0 and res.stdout.strip().startswith(f"tasklight {tasklight.__version__} (torch ")
    for flag, option in [("--trainer.gradient_clip_val=1.0", "--model.init_args.clip_grad_norm 1.0"),
                         ("--trainer.accumulate_grad_batches=2", "larger meta-batch")]:
        res = _cli(["fit", "--config", "maml_sinusoid", flag], tmp_path)
        ours = _ours(res.stderr)
        assert res.returncode == 2 and "Traceback" not in res.stderr and len(ours) == 1
        assert ours[0].startswith("tasklight: error: --trainer.") and option in ours[0]
    res = _cli(["fit", "--config", "maml_omniglot", "--data.init_args.root", str(tmp_path / "nowhere")], tmp_path)
    ours = _ours(res.stderr)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "Union" not in res.stderr
    assert len(ours) == 1 and ours[0].startswith("tasklight: error: OmniglotDataModule: Omniglot data not found")


@pytest.mark.slow
def test_wandb_run_records_the_resolved_config_seed_and_versions(in_tmp, capsys):
    import wandb

    i = TINY.index("--trainer.logger")
    args = TINY[:i] + TINY[i + 2:]  # the config's WandbLogger
    cli = run_cli(["fit", "--config", "maml_sinusoid", *args])
    run = cli.trainer.logger.experiment
    cfg = dict(run.config)
    assert cfg["config"]["model"]["class_path"] == "tasklight.MAMLModule"
    assert cfg["config"]["model"]["init_args"]["net"]["init_args"]["hidden"] == [40, 40]
    assert cfg["config"]["trainer"]["max_steps"] == 2 and cfg["seed"] == 0
    assert cfg["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]  # a local build tag may differ
    wandb_dir = Path(run.dir).parent
    wandb.finish()
    out = capsys.readouterr().out
    assert f"wandb sync {wandb_dir}" in out
    # the test's plots as images: MSE vs adaptation steps, the fitted sinusoids of three tasks
    images = [p.name for p in wandb_dir.rglob("*.png")]
    assert any(n.startswith("mse_vs_steps") for n in images) and any(n.startswith("fitted_functions")
                                                                     for n in images), images


# ------------------------------------------------------------------ the head's size follows n_way
def _printed_config(args, capsys):
    import yaml

    with pytest.raises(SystemExit) as exc:
        run_cli(["fit", *args, "--print_config"])
    assert exc.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_head_out_features_follows_n_way_and_an_explicit_different_value_is_an_error(capsys):
    cfg = _printed_config(["--config", "maml_omniglot", "--data.init_args.n_way", "20"], capsys)
    assert cfg["data"]["init_args"]["n_way"] == 20
    assert cfg["model"]["init_args"]["net"]["init_args"]["out_features"] == 20
    for printing in ([], ["--print_config"]):  # the check runs before printing and before building
        with pytest.raises(SystemExit) as exc:
            run_cli(["fit", "--config", "maml_omniglot", "--data.init_args.n_way", "20",
                     "--model.init_args.net.init_args.out_features", "5", *printing])
        assert exc.value.code == 2
        err = _ours(capsys.readouterr().err)
        assert err == [err[0]] and "out_features=5 but --data.init_args.n_way=20" in err[0], err


def test_explicitly_set_finds_an_option_in_flags_and_config_files(tmp_path):
    from tasklight.cli import expand_config, explicitly_set

    key = "model.net.out_features"
    assert not explicitly_set(expand_config("maml_omniglot"), key)  # the shipped config leaves it to n_way
    assert explicitly_set(expand_config("protonet_omniglot"), key)  # an embedding: out_features 0
    for flags in (["--model.init_args.net.init_args.out_features", "5"], ["--model.net.out_features=5"],
                  ["--model.net", "{class_path: Conv4, init_args: {out_features: 3}}"]):
        assert explicitly_set(["fit", *flags], key), flags
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  init_args:\n    net:\n      init_args: {out_features: 7}\n")
    assert explicitly_set(["fit", "--config", str(cfg)], key)
    assert not explicitly_set(["fit", "--model.net", "Conv4", "--data.init_args.n_way", "20",
                               "--model.init_args.net.init_args.hidden", "8"], key)


@pytest.mark.slow
def test_head_size_cases_through_the_cli(capsys):
    cfg = _printed_config(["--config", "maml_omniglot"], capsys)
    assert cfg["model"]["init_args"]["net"]["init_args"]["out_features"] == cfg["data"]["init_args"]["n_way"] == 5
    # an explicit value equal to n_way is fine; prototype learners' embedding nets are left alone
    cfg = _printed_config(["--config", "maml_omniglot", "--data.init_args.n_way", "3",
                           "--model.init_args.net.init_args.out_features", "3"], capsys)
    assert cfg["model"]["init_args"]["net"]["init_args"]["out_features"] == 3
    cfg = _printed_config(["--config", "protonet_omniglot", "--data.init_args.n_way", "20"], capsys)
    assert cfg["model"]["init_args"]["net"]["init_args"]["out_features"] == 0
    with pytest.raises(SystemExit) as exc:
        run_cli(["fit", "--config", "maml_omniglot", "--data.init_args.n_way", "20", "--model.net.out_features=5"])
    assert exc.value.code == 2 and "out_features=5 but" in capsys.readouterr().err


@pytest.mark.slow
def test_a_fit_with_another_n_way_builds_the_head_it_needs(in_tmp):
    cli = run_cli(["fit", "--config", "maml_omniglot", *_tiny_omniglot(), "--data.init_args.n_way", "3",
                   "--test_after_fit", "false"])
    assert cli.trainer.global_step == 2 and cli.model.net.out_features == 3
    batch = next(iter(cli.datamodule.val_dataloader()))
    assert int(batch.support_y.max()) == 2
    assert cli.model.predict_episode(batch.support_x, batch.support_y, batch.query_x).shape[-1] == 3
