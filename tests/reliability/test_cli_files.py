"""The `tasklight` command's bad inputs and faults: configs, flags, class paths, checkpoints, run
folders and the files it writes. Each case ends in one line naming the setting and the fix (or is
handled as documented); docs/reliability.md lists them ("CLI, configs, checkpoints and files")."""
import errno
import os
import re
from pathlib import Path

import lightning as L
import pytest
import torch

from tasklight import IMAMLModule, MAMLModule, MLP, SinusoidDataModule
from tasklight.cli import check_run_name, checkpoint_run_folder, error_line, main, save_atomically
from tasklight.core.checkpoint import stamp_checkpoint

SIN = ["--config", "maml_sinusoid"]
OMNI = ["--config", "maml_omniglot"]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TASKLIGHT_RUN_DIR", raising=False)
    monkeypatch.delenv("TASKLIGHT_TRACEBACK", raising=False)
    return tmp_path


def one_line(args, capsys) -> str:
    """Run the console command; it must exit non-zero with exactly one `tasklight: error:` line and
    no traceback, and print little else on stderr."""
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    err = capsys.readouterr().err
    if isinstance(exc.value.code, str):  # SystemExit("...") : the interpreter prints it as the last line
        err += exc.value.code + "\n"
    ours = [line for line in err.splitlines() if line.startswith("tasklight: error:")]
    assert exc.value.code not in (0, None), err[-2000:]
    assert len(ours) == 1 and "Traceback" not in err, err[-3000:]
    others = [line for line in err.splitlines() if line.strip() and not line.startswith(("tasklight:", "Seed set"))]
    assert len(others) <= 2, err[-3000:]
    return ours[0]


# ------------------------------------------------------------------ configs and flags
def _write(name, text):
    Path(name).parent.mkdir(parents=True, exist_ok=True)
    Path(name).write_text(text)
    return name


CONFIG_CASES = {
    # id: (files, args, what the line must say)
    "yaml_syntax": ({"bad.yaml": "model: [\n  bad"}, ["fit", "--config", "bad.yaml"],
                    r"bad\.yaml is not valid YAML at line \d+, column \d+.*fix its syntax"),
    "yaml_tab_indent": ({"tab.yaml": "trainer:\n\tmax_steps: 2\n"}, ["fit", "--config", "tab.yaml"],
                        r"tab\.yaml is not valid YAML at line 2"),
    "config_missing": ({}, ["fit", "--config", "nowhere.yaml"], r"--config .*nowhere\.yaml: no such file.*shipped"),
    "extends_not_a_string": ({"e.yaml": "extends: [a, b]\n"}, ["fit", "--config", "e.yaml"],
                             r"`extends:` in .*e\.yaml must be the path of one config file"),
    "extends_missing": ({"e.yaml": "extends: base/none.yaml\n"}, ["fit", "--config", "e.yaml"],
                        r"extends 'base/none\.yaml', but .* does not exist"),
    "extends_loop": ({"a.yaml": "extends: b.yaml\n", "b.yaml": "extends: a.yaml\n"}, ["fit", "--config", "a.yaml"],
                     r"chain of .* loops back"),
    "extends_itself": ({"s.yaml": "extends: s.yaml\n"}, ["fit", "--config", "s.yaml"], r"loops back"),
    "config_unknown_key": ({"k.yaml": "extends: " + "{cfg}/maml_sinusoid.yaml\ntrainer: {{max_stepz: 3}}\n"},
                           ["fit", "--config", "k.yaml"], r"max_stepz"),
    "config_wrong_type": ({"t.yaml": "extends: {cfg}/maml_sinusoid.yaml\ntrainer: {{max_steps: lots}}\n"},
                          ["fit", "--config", "t.yaml"], r"trainer\.max_steps.*lots.*int"),
    "flag_unknown": ({}, ["fit", *SIN, "--trainer.max_stepz", "3"], r"unrecognized arguments: --trainer\.max_stepz"),
    "flag_wrong_type": ({}, ["fit", *SIN, "--trainer.max_steps", "abc"], r"--trainer\.max_steps abc: expected .* int"),
    "seed_wrong_type": ({}, ["fit", *SIN, "--seed_everything", "abc"], r"--seed_everything abc: expected .*int"),
    "subcommand_unknown": ({}, ["train", *SIN], r"invalid choice: 'train'"),
    "model_short_name_unknown": ({}, ["fit", "--model", "NoSuchModule", "--data", "SinusoidDataModule"],
                                 r"--model NoSuchModule: not a class tasklight knows.*full class path"),
    "model_class_missing": ({}, ["fit", "--model", "tasklight.NoSuch", "--data", "SinusoidDataModule"],
                            r"--model tasklight\.NoSuch: tasklight has no class NoSuch"),
    "model_not_a_lightning_module": ({}, ["fit", "--model", "torch.nn.Linear", "--data", "SinusoidDataModule"],
                                     r"torch\.nn\.Linear is not a LightningModule"),
    "model_package_missing": ({}, ["fit", "--model", "my_pkg_absent.Learner", "--data", "SinusoidDataModule"],
                              r"--model my_pkg_absent\.Learner: .*importable from here"),
    "data_package_missing": ({}, ["fit", "--model", "MAMLModule", "--model.net", "MLP", "--data", "nopkg.Data"],
                             r"--data nopkg\.Data: .*importable"),
    "net_package_missing": ({}, ["fit", "--model", "MAMLModule", "--model.net", "nopkg.Net", "--data",
                                 "SinusoidDataModule"], r"--model\.net nopkg\.Net: importing it fails: No module named"),
    "user_module_import_fails": ({"broken_pkg/__init__.py": "import a_dependency_that_is_not_installed\n"},
                                 ["fit", "--model", "broken_pkg.Learner", "--data", "SinusoidDataModule"],
                                 r"broken_pkg\.Learner: importing it fails: No module named "
                                 r"'a_dependency_that_is_not_installed'"),
    "user_module_syntax_error": ({"syntax_pkg/__init__.py": "def broken(:\n"},
                                ["fit", "--model", "syntax_pkg.Learner", "--data", "SinusoidDataModule"],
                                r"--model syntax_pkg\.Learner"),
    "user_class_missing": ({"empty_pkg/__init__.py": "X = 1\n"},
                           ["fit", "--model", "empty_pkg.Learner", "--data", "SinusoidDataModule"],
                           r"empty_pkg has no class Learner"),
    "gradient_clip_val": ({}, ["fit", *SIN, "--trainer.gradient_clip_val=1.0"], r"--model\.init_args\.clip_grad_norm"),
    "accumulate_grad_batches": ({}, ["fit", *SIN, "--trainer.accumulate_grad_batches=2"], r"larger meta-batch"),
    "head_differs_from_n_way": ({}, ["fit", *OMNI, "--model.init_args.net.init_args.out_features", "7"],
                                r"out_features=7 but --data\.init_args\.n_way=5"),
    "run_name_escapes_runs": ({}, ["fit", *SIN, "--run_name", "../../x"], r"--run_name '\.\./\.\./x' is not a folder"),
    "run_name_with_slash": ({}, ["fit", *SIN, "--run_name", "a/b"], r"--run_name 'a/b' is not a folder name"),
    "run_name_dotdot": ({}, ["fit", *SIN, "--run_name", ".."], r"--run_name '\.\.' is not a folder name"),
    "run_name_absolute": ({}, ["fit", *SIN, "--run_name", "/tmp/elsewhere"], r"is not a folder name"),
    "run_name_empty": ({}, ["fit", *SIN, "--run_name", " "], r"is not a folder name"),
    "run_name_home": ({}, ["fit", *SIN, "--run_name", "~x"], r"is not a folder name"),
    "omniglot_root_missing": ({}, ["fit", *OMNI, "--data.init_args.root", "nowhere"],
                              r"OmniglotDataModule: Omniglot data not found"),
    "n_way_zero": ({}, ["fit", *OMNI, "--data.init_args.n_way", "0"], r"^tasklight: error: OmniglotDataModule: n_way must be an integer >= 2.*got 0"),
    "inner_lr_negative": ({}, ["fit", *SIN, "--model.init_args.inner_lr", "-1"], r"MAMLModule: .*inner_lr"),
    "meta_batch_zero": ({}, ["fit", *SIN, "--data.init_args.meta_batch_size", "0"], r"meta_batch_size"),
    "strategy_unknown": ({}, ["fit", *SIN, "--trainer.strategy", "nonsense"], r"invalid strategy name"),
    "gpu_config_without_gpu": ({}, ["fit", "--config", "maml_omniglot_gpu"], r"asks for a GPU and none is visible.*"
                                                                                r"config without `_gpu`"),
    "gpu_accelerator_flag": ({}, ["fit", *SIN, "--trainer.accelerator", "gpu"], r"asks for a GPU"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_a_bad_config_or_flag_is_one_line(case, in_tmp, capsys):
    if case.startswith("gpu") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    files, args, want = CONFIG_CASES[case]
    cfg_dir = Path(__file__).resolve().parents[2] / "configs"
    for name, text in files.items():
        _write(name, text.format(cfg=cfg_dir) if "{cfg}" in text else text)
    line = one_line(args, capsys)
    assert re.search(want, line), line
    assert not (in_tmp / "runs").exists() or not any((in_tmp / "runs").rglob("*.ckpt"))


def test_run_name_checks_and_the_runs_folder_stays_below_runs(in_tmp, capsys):
    for ok in ("exp1", "maml-5way_b", "run.v2"):
        check_run_name(ok)
    one_line(["fit", *SIN, "--run_name", "../../x"], capsys)
    assert not (in_tmp.parent.parent / "x").exists() and not (in_tmp / "runs").exists()


# ------------------------------------------------------------------ checkpoints given to --ckpt_path
def _sinusoid_ckpt(folder: Path, learner=MAMLModule, data=SinusoidDataModule, run_folder=True) -> Path:
    """A small real checkpoint (2 meta-steps with a Python Trainer), placed as a run's last.ckpt."""
    torch.manual_seed(0)
    model = learner(MLP(1, [8], 1), inner_steps=1)
    dm = data(k_shot=5, q_queries=5, meta_batch_size=2, batches_per_epoch=4, val_episodes=2, test_episodes=2)
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        inference_mode=False, limit_val_batches=0, enable_checkpointing=False,
                        default_root_dir=str(folder))
    trainer.fit(model, dm)
    path = folder / "run" / "checkpoints" / "last.ckpt" if run_folder else folder / "plain.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)
    if run_folder:
        (path.parent.parent / "config.yaml").write_text("# the run's config\n")
    return path


@pytest.fixture(scope="module")
def maml_ckpt(tmp_path_factory):
    return _sinusoid_ckpt(tmp_path_factory.mktemp("maml"))


def _damaged(maml_ckpt, kind) -> Path:
    bad = Path(f"{kind}.ckpt")
    data = maml_ckpt.read_bytes()
    if kind == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "text":
        bad.write_text("not a checkpoint\n")
    elif kind == "tensor":
        torch.save(torch.zeros(3), bad)
    elif kind == "no_state_dict":
        torch.save({"epoch": 1}, bad)
    elif kind == "pickled_object":
        torch.save({"state_dict": {}, "obj": Path("x")}, bad)
    elif kind == "directory":
        bad.mkdir()
    elif kind == "checksum":
        ckpt = torch.load(maml_ckpt, weights_only=True)
        first = next(iter(ckpt["state_dict"]))
        ckpt["state_dict"][first] = ckpt["state_dict"][first] + 1  # the weights changed after stamping
        torch.save(ckpt, bad)
    return bad


CKPT_CASES = {
    "truncated": r"--ckpt_path truncated\.ckpt: checkpoint .* \(\d+ bytes\) is not a readable checkpoint",
    "empty": r"empty\.ckpt \(0 bytes\) is not a readable checkpoint",
    "text": r"text\.ckpt .* is not a readable checkpoint",
    "tensor": r"tensor\.ckpt is not a Lightning checkpoint",
    "no_state_dict": r"no_state_dict\.ckpt is not a Lightning checkpoint",
    "pickled_object": r"pickled_object\.ckpt .*is not a readable checkpoint",
    "directory": r"--ckpt_path directory\.ckpt: no such file",
    "checksum": r"do not match the checksum",
}


# every subcommand reads --ckpt_path through the same check: `test` in the quick tier, the others in the full suite
SUBCOMMANDS = [pytest.param(s, marks=() if s == "test" else pytest.mark.slow) for s in ("fit", "validate", "test",
                                                                                         "predict")]


@pytest.mark.parametrize("sub", SUBCOMMANDS)
@pytest.mark.parametrize("kind", sorted(CKPT_CASES))
def test_an_unusable_checkpoint_is_one_line_in_every_subcommand(kind, sub, maml_ckpt, in_tmp, capsys):
    bad = _damaged(maml_ckpt, kind)
    line = one_line([sub, *SIN, "--ckpt_path", str(bad)], capsys)
    assert re.search(CKPT_CASES[kind], line), line
    assert not (in_tmp / "runs").exists()  # nothing was started


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_a_missing_checkpoint_is_one_line_and_says_why_latest_is_missing(sub, in_tmp, capsys):
    line = one_line([sub, *SIN, "--ckpt_path", "runs/maml_sinusoid/latest/checkpoints/last.ckpt"], capsys)
    assert "no such file" in line and "runs/maml_sinusoid/latest does not exist" in line


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_a_checkpoint_of_another_learner_class_is_refused_naming_both(sub, maml_ckpt, in_tmp, capsys):
    line = one_line([sub, "--config", "imaml_sinusoid", "--ckpt_path", str(maml_ckpt)], capsys)
    assert "written by tasklight.meta.maml.MAMLModule" in line and "IMAMLModule" in line, line
    assert not (in_tmp / "runs").exists()


def test_a_checkpoint_of_other_data_names_both_datamodules(maml_ckpt, in_tmp, capsys):
    line = one_line(["test", *OMNI, "--ckpt_path", str(maml_ckpt)], capsys)
    assert "trained on SinusoidDataModule" in line and "OmniglotDataModule" in line, line
    assert "out_features" not in line  # no flag the user never passed


def test_a_head_of_another_n_way_names_the_checkpoint_not_a_flag(maml_ckpt, in_tmp, capsys):
    from tasklight.cli import TasklightCLI

    cli = TasklightCLI.__new__(TasklightCLI)
    cli._raw_args, cli._failed = ["test", *OMNI], False
    from jsonargparse import Namespace

    cfg = Namespace(model=Namespace(class_path="tasklight.MAMLModule", init_args=Namespace(
        net=Namespace(class_path="tasklight.nn.Conv4", init_args=Namespace(out_features=20)))),
        data=Namespace(class_path="tasklight.OmniglotDataModule", init_args=Namespace(n_way=5)),
        ckpt_path="runs/x/latest/checkpoints/last.ckpt")
    with pytest.raises(SystemExit):
        cli._n_way_fill(cfg)
    line = capsys.readouterr().err.strip()
    assert "--ckpt_path runs/x/latest/checkpoints/last.ckpt holds a head with 20 outputs" in line
    assert "--data.init_args.n_way 20" in line and "--model.init_args" not in line


def test_load_from_checkpoint_of_another_class_names_both_and_the_right_call(maml_ckpt):
    with pytest.raises(ValueError, match=r"written by tasklight\.meta\.maml\.MAMLModule, not by "
                                         r"tasklight\.meta\.imaml\.IMAMLModule.*MAMLModule\.load_from_checkpoint"):
        IMAMLModule.load_from_checkpoint(maml_ckpt)
    assert type(MAMLModule.load_from_checkpoint(maml_ckpt)) is MAMLModule


def test_checkpoint_run_folder_only_for_a_runs_checkpoints(maml_ckpt, tmp_path):
    assert checkpoint_run_folder(maml_ckpt) == maml_ckpt.parent.parent
    assert checkpoint_run_folder(tmp_path / "x.ckpt") is None and checkpoint_run_folder("last") is None


# ------------------------------------------------------------------ files the command writes
def test_a_full_disk_leaves_no_truncated_checkpoint_and_names_the_file(tmp_path, monkeypatch):
    target = tmp_path / "checkpoints" / "epoch=0-step=2.ckpt"
    real_save = torch.save

    def full_disk(obj, f, *a, **k):  # writes half, then the device is full
        Path(f).write_bytes(b"PK\x03\x04partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"could not write the checkpoint .*epoch=0-step=2\.ckpt \(No space left on "
                                      r"device\); nothing was left behind: free disk space") as exc:
        save_atomically({"state_dict": {}}, target, what="checkpoint")
    assert exc.value.errno == errno.ENOSPC
    assert list(target.parent.iterdir()) == []  # neither the checkpoint nor the temporary file
    monkeypatch.setattr(torch, "save", real_save)
    assert "free disk space" in error_line(exc.value) and "\n" not in error_line(exc.value)


def test_an_existing_checkpoint_survives_a_failed_overwrite(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    save_atomically({"state_dict": {"w": torch.ones(2)}}, target)
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError):
        save_atomically({"state_dict": {"w": torch.zeros(2)}}, target)
    monkeypatch.undo()
    torch.testing.assert_close(torch.load(target, weights_only=True)["state_dict"]["w"], torch.ones(2))


def test_the_cli_trainer_writes_checkpoints_atomically(in_tmp):
    from tasklight.cli import _checkpoint_io

    io = _checkpoint_io()
    io.save_checkpoint({"state_dict": {"w": torch.ones(1)}}, str(in_tmp / "c" / "x.ckpt"))
    assert sorted(p.name for p in (in_tmp / "c").iterdir()) == ["x.ckpt"]


@pytest.mark.parametrize("err,want", [
    (OSError(errno.ENOSPC, "No space left on device"), "free disk space"),
    (PermissionError(errno.EACCES, "Permission denied", "runs"), "folder you can write to"),
    (OSError(errno.EROFS, "Read-only file system", "runs"), "TASKLIGHT_RUNS"),
    (RuntimeError("Found no NVIDIA driver on your system. CUDA is not available"), "asks for a GPU"),
    (ModuleNotFoundError("No module named 'my_dep'"), "make the package importable"),
    (FloatingPointError("non-finite inner loss at task 0"), "FloatingPointError: non-finite inner loss at task 0"),
])
def test_every_fault_that_ends_a_run_is_one_line(err, want):
    line = error_line(err)
    assert want in line and "\n" not in line


def test_an_unwritable_working_folder_is_one_line(in_tmp, capsys, monkeypatch):
    """A read-only working folder: the run folder cannot be made (root ignores chmod, so mkdir fails here)."""
    monkeypatch.setenv("TASKLIGHT_RUNS", str(in_tmp / "a_file" / "runs"))
    (in_tmp / "a_file").write_text("")  # a file where the runs folder should go
    line = one_line(["fit", *SIN, "--trainer.max_steps", "1", "--trainer.logger", "false"], capsys)
    assert "cannot create the run folder" in line and "TASKLIGHT_RUNS" in line


def test_an_unreadable_config_is_one_line(in_tmp, capsys, monkeypatch):
    _write("c.yaml", "trainer: {}\n")
    real = Path.read_text

    def denied(self, *a, **k):
        if self.name == "c.yaml":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", "c.yaml"])
    assert "cannot read the config" in str(exc.value.code) and "c.yaml" in str(exc.value.code)


def test_version_names_torch_and_lightning(capsys):
    main(["--version"])
    out = capsys.readouterr().out.strip()
    assert re.fullmatch(r"tasklight \S+ \(torch \S+, lightning \S+, python \S+\)", out), out
    assert torch.__version__.split("+")[0] in out


# ------------------------------------------------------------------ predictions file, per learner family
def test_predictions_file_holds_each_family_s_outputs_readable_without_pickle(tmp_path):
    from types import SimpleNamespace

    from lightning.pytorch import seed_everything
    from torch.utils.data import TensorDataset

    from tasklight import DecisionDataModule, MSEModule, MultiTaskModule
    from tasklight.cli import write_predictions
    from tasklight.data import MultiTaskDataModule
    from tasklight.taskmet.problems import CubicTopK

    def predict(model, data):
        t = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      inference_mode=False)
        return t.predict(model, data)

    seed_everything(0)
    gen = torch.Generator().manual_seed(0)
    sets = [TensorDataset(torch.randn(6, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen)) for _ in range(2)]
    families = {
        "meta": (MAMLModule(MLP(1, [8], 1)), SinusoidDataModule(meta_batch_size=2, test_episodes=4, eval_batch_size=2)),
        "multitask": (MultiTaskModule(MLP(4, [8], 6)), MultiTaskDataModule(train_sets=sets, val_sets=sets,
                                                                           test_sets=sets, eval_batch_size=12)),
        "taskmet": (MSEModule(MLP(1, [4], 1)),
                    DecisionDataModule(CubicTopK(num_items=10), num_train=8, num_val=4, num_test=6)),
    }
    for name, (model, data) in families.items():
        out = predict(model, data)
        trainer = SimpleNamespace(predict_loop=SimpleNamespace(predictions=out), global_rank=0)
        path = write_predictions(trainer, model, tmp_path / name, "some.ckpt")
        assert path == tmp_path / name / "predictions.pt"
        saved = torch.load(path, weights_only=True)  # plain containers of tensors: no pickle
        assert saved["learner"].endswith(type(model).__name__) and saved["ckpt_path"] == "some.ckpt"
        assert len(saved["batches"]) == len(out)
        first = saved["batches"][0]
        if name == "meta":
            assert first["predictions"].shape[:2] == first["query_y"].shape[:2] == (2, 10)
            torch.testing.assert_close(first["predictions"], out[0]["predictions"])
        elif name == "multitask":
            assert sorted(first["task"]) == [0, 1] and len(first["predictions"]) == len(first["rows"])
        else:
            torch.testing.assert_close(first, out[0])


# ------------------------------------------------------------------ run folders, latest, resume (end to end)
TINY = ["--trainer.max_steps", "2", "--data.init_args.meta_batch_size", "2", "--data.init_args.val_episodes", "2",
        "--data.init_args.test_episodes", "3", "--trainer.val_check_interval", "2", "--trainer.logger", "false"]


def _run(args, capsys):
    from tasklight.cli import run_cli

    os.environ.pop("TASKLIGHT_RUN_DIR", None)
    cli = run_cli(args)
    out = capsys.readouterr()
    return cli, out.out, out.err


@pytest.mark.slow
def test_latest_moves_only_for_a_fit_with_a_checkpoint_and_every_command_through_it_works(in_tmp, capsys):
    cli, out, _ = _run(["fit", *SIN, *TINY], capsys)
    latest = in_tmp / "runs" / "maml_sinusoid" / "latest"
    run_a = latest.resolve()
    assert (run_a / "checkpoints" / "last.ckpt").is_file() and run_a.name in out
    assert any(p.name.startswith("epoch=") for p in (run_a / "checkpoints").iterdir())  # the best checkpoint
    assert "\r" not in out and re.search(r"tasklight: step 2/2 \(100 %\), [\d.]+ s/step", out)  # plain progress lines
    via = "runs/maml_sinusoid/latest/checkpoints/last.ckpt"

    # test and predict through latest/: their folders go inside the checkpoint's run, latest stays
    _, out, err = _run(["test", *SIN, *TINY, "--ckpt_path", via], capsys)
    assert re.search(r"^test/mse\s", out, re.M) and latest.resolve() == run_a
    assert [p.name[:5] for p in run_a.iterdir() if p.name.startswith("test-")] == ["test-"]
    _, out, _ = _run(["predict", *SIN, *TINY, "--ckpt_path", via], capsys)
    pred = Path(re.search(r"predictions written to (\S+)", out).group(1))
    assert pred.parent.parent == run_a and latest.resolve() == run_a
    saved = torch.load(pred, weights_only=True)
    assert saved["batches"][0]["predictions"].shape[:2] == saved["batches"][0]["query_y"].shape[:2]

    # a fit that fails before its first checkpoint leaves latest where it was
    with pytest.raises(FloatingPointError):
        _run(["fit", *SIN, *TINY, "--model.init_args.inner_lr", "1e30"], capsys)
    assert latest.resolve() == run_a

    # a resume through latest/ continues the run
    cli, out, _ = _run(["fit", *SIN, *TINY, "--trainer.max_steps", "4", "--ckpt_path", via], capsys)
    assert cli.trainer.global_step == 4 and latest.resolve() != run_a

    # test without a checkpoint: a warning on stderr
    _, _, err = _run(["test", *SIN, *TINY], capsys)
    assert "warning: `test` without --ckpt_path evaluates the model the config builds, with untrained weights" in err


@pytest.mark.slow
def test_class_path_runs_have_last_ckpt_and_a_csv_logger_needs_no_save_dir(in_tmp, capsys):
    common = ["--model", "MAMLModule", "--model.net", "MLP", "--data", "SinusoidDataModule", *TINY[:-2]]
    cli, out, _ = _run(["fit", *common, "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                        "--test_after_fit", "false"], capsys)
    run = in_tmp / "runs" / "MAMLModule" / "latest"
    assert (run / "checkpoints" / "last.ckpt").is_file() and f"last {run.resolve().relative_to(in_tmp)}" in \
        out.replace(str(in_tmp) + "/", "")
    assert list(run.glob("lightning_logs/version_*/metrics.csv"))
    assert "no figures: figures are drawn at the end of a test, and --test_after_fit false skipped it" in out


@pytest.mark.slow
def test_a_short_run_says_why_it_has_no_best_checkpoint(in_tmp, capsys):
    _, out, _ = _run(["fit", *SIN, "--trainer.max_steps", "2", "--data.init_args.meta_batch_size", "2",
                      "--trainer.logger", "false", "--test_after_fit", "false"], capsys)
    assert "no best checkpoint: 'val/mse' was never logged (the first validation comes after 500 steps and the " \
           "run stopped at step 2" in out


# ------------------------------------------------------------------ tasklight embed (Task2Vec's second step)
EMBED = ["embed", "--config", str(Path(__file__).resolve().parents[2] / "configs" / "task2vec_embed_omniglot.yaml")]
EMBED_CASES = {
    "embed_probe_state_missing": (EMBED, r"--probe_state .*last\.ckpt does not exist: train the probe first"),
    "embed_probe_ckpt_missing": (["embed", "--data", "SinusoidDataModule", "--probe_ckpt", "none.ckpt"],
                                 r"--probe_ckpt none\.ckpt does not exist"),
    "embed_no_probe": (["embed", "--data", "tasklight.SinusoidDataModule"], r"no probe: pass --probe_ckpt"),
    "embed_unknown_option": ([*EMBED, "--probe_stat", "x"], r"probe_stat"),
    "embed_bad_yaml": (["embed", "--config", "bad.yaml"], r"bad\.yaml is not valid YAML at line"),
    "embed_split_invalid": ([*EMBED, "--split", "nope"], r"split"),
}


@pytest.mark.parametrize("case", sorted(EMBED_CASES))
def test_embed_errors_are_one_line(case, in_tmp, capsys):
    _write("bad.yaml", "probe: [\n")
    args, want = EMBED_CASES[case]
    line = one_line(args, capsys)
    assert re.search(want, line), line


def test_embed_reads_the_shipped_config_with_extends(in_tmp):
    from tasklight.cli import _resolve_config_args
    from tasklight.task2vec.embed_cli import build_parser

    cfg = build_parser().parse_args(_resolve_config_args(EMBED[1:]))
    assert cfg.data.class_path.endswith("OmniglotAlphabetsDataModule")  # from base/task2vec.yaml
    assert cfg.probe_state_prefix == "trunk" and cfg.task2vec.mc_samples == 4  # the leaf's own keys


# ------------------------------------------------------------------ manual optimisation and Trainer options
@pytest.mark.slow
def test_bf16_mixed_precision_is_honoured_by_a_manual_optimisation_learner():
    """Lightning's autocast wraps the learners' training_step: bf16-mixed changes the loss (bf16 matmuls)
    by a little, keeps float32 weights, and trains."""
    def run(precision):
        L.seed_everything(0, verbose=False)
        model = MAMLModule(MLP(1, [8], 1), inner_steps=1)
        dm = SinusoidDataModule(meta_batch_size=2, batches_per_epoch=4, val_episodes=2, test_episodes=2)
        t = L.Trainer(max_steps=3, precision=precision, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, inference_mode=False, limit_val_batches=0, enable_checkpointing=False)
        t.fit(model, dm)
        return float(t.callback_metrics["train/query_loss"]), next(model.parameters()).dtype

    (full, dtype32), (mixed, dtype_mixed) = run("32-true"), run("bf16-mixed")
    assert dtype32 == dtype_mixed == torch.float32
    assert mixed != full and abs(mixed - full) / full < 0.05 and torch.isfinite(torch.tensor(mixed))


@pytest.mark.slow
def test_early_stopping_stops_a_manual_optimisation_learner_on_its_logged_metric():
    from lightning.pytorch.callbacks import EarlyStopping

    L.seed_everything(0, verbose=False)
    model = MAMLModule(MLP(1, [8], 1), inner_steps=1)
    dm = SinusoidDataModule(meta_batch_size=2, batches_per_epoch=50, val_episodes=2, test_episodes=2)
    stop = EarlyStopping(monitor="val/mse", mode="min", stopping_threshold=1e9)  # met at the first validation
    t = L.Trainer(max_steps=50, val_check_interval=3, callbacks=[stop], logger=False, enable_progress_bar=False,
                  enable_model_summary=False, inference_mode=False, enable_checkpointing=False,
                  num_sanity_val_steps=0)
    t.fit(model, dm)
    assert t.global_step == 3 and stop.stopped_epoch == 0 and t.should_stop


@pytest.mark.slow
def test_version_answers_without_importing_torch():
    import subprocess
    import sys

    code = "import sys, tasklight_launch; tasklight_launch.main(['--version']); print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.splitlines()[-1] == "False", res.stdout + res.stderr
    assert res.stdout.startswith("tasklight ") and "(torch " in res.stdout


def test_the_sinusoid_figure_s_true_function_is_each_task_s_sine():
    gen = torch.Generator().manual_seed(3)
    amp, phase = torch.rand(4, 1, 1, generator=gen) * 4.9 + 0.1, torch.rand(4, 1, 1, generator=gen) * 3.14
    x = torch.rand(4, 7, 1, generator=gen) * 10 - 5
    grid = torch.linspace(-5, 5, 50)[:, None]
    curve = SinusoidDataModule.true_function(x, amp * torch.sin(x - phase), grid)
    torch.testing.assert_close(curve, (amp * torch.sin(grid.T - phase)).reshape(4, 50), atol=1e-5, rtol=1e-5)


def test_embed_probe_prefix_finds_a_multitask_trunk_nested_in_its_architecture(tmp_path):
    """Task2Vec's step 2 after step 1: a MultiTaskModule checkpoint keeps its trunk at
    `architecture.trunk.*` (the layout of configs/task2vec_probe_omniglot.yaml's last.ckpt); the shipped
    config's `probe_state_prefix: trunk` finds it."""
    from types import SimpleNamespace

    from tasklight.task2vec.embed_cli import load_probe

    torch.manual_seed(0)
    trunk, head = MLP(4, [8], 6), torch.nn.Linear(6, 3)
    state = {**{f"architecture.trunk.{k}": v for k, v in trunk.state_dict().items()},
             **{f"architecture.heads.0.{k}": v for k, v in head.state_dict().items()},
             "skipped_steps": torch.zeros(()), "weighting.w": torch.ones(2)}
    torch.save({"state_dict": state}, tmp_path / "last.ckpt")
    probe = MLP(4, [8], 6)
    cfg = SimpleNamespace(probe_ckpt=None, probe_state=str(tmp_path / "last.ckpt"), probe_state_prefix="trunk")
    load_probe(cfg, {"probe": probe})
    for name, value in trunk.state_dict().items():
        torch.testing.assert_close(probe.state_dict()[name], value, msg=name)
    cfg.probe_state_prefix = "nothing"
    with pytest.raises(ValueError, match=r"no entry of .* starts with 'nothing\.'"):
        load_probe(cfg, {"probe": MLP(4, [8], 6)})


def test_predict_that_leaves_no_predictions_in_this_process_says_so(capsys, tmp_path, monkeypatch):
    """Under a spawned DDP strategy the predictions stay in the workers: the command says that no file
    was written and how to get one, instead of exiting silently."""
    from types import SimpleNamespace

    from tasklight.cli import TasklightCLI

    monkeypatch.setenv("TASKLIGHT_RUN_DIR", str(tmp_path))
    fake = SimpleNamespace(trainer=SimpleNamespace(predict_loop=SimpleNamespace(predictions=None), global_rank=0),
                           model=object(), _sub=lambda: {}, _report=lambda: None)
    TasklightCLI.after_predict(fake)
    err = capsys.readouterr().err
    assert "no predictions file was written" in err and "--trainer.devices 1" in err
    assert not list(tmp_path.iterdir())
