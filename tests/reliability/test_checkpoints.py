"""Checkpoints validated on load (issue 12 row 12): unreadable files named, corrupted state refused,
another learner class refused, changed episode settings refused."""
import glob
import re
import zipfile

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tasklight import IMAMLModule, MAMLModule, MLP, SinusoidDataModule
from tasklight.core.checkpoint import check_checkpoint_file


def _trainer(tmp_path, steps, callbacks=()):
    return L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     inference_mode=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=list(callbacks),
                     default_root_dir=str(tmp_path), enable_checkpointing=bool(callbacks))


def _dm(**kw):
    args = dict(k_shot=5, q_queries=5, meta_batch_size=2, batches_per_epoch=10, seed=1)
    args.update(kw)
    return SinusoidDataModule(**args)


def _maml():
    torch.manual_seed(0)
    return MAMLModule(MLP(1, [8], 1), inner_steps=1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    ck = ModelCheckpoint(dirpath=str(d), every_n_train_steps=2, save_top_k=-1)
    _trainer(d, 2, [ck]).fit(_maml(), _dm())
    return glob.glob(str(d / "*.ckpt"))[0]


def test_a_good_checkpoint_passes_and_resumes(ckpt, tmp_path):
    assert check_checkpoint_file(ckpt)["tasklight"]["learner"] == "tasklight.meta.maml.MAMLModule"
    t = _trainer(tmp_path, 3)
    t.fit(_maml(), _dm(), ckpt_path=ckpt)
    assert t.global_step == 3


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_an_unreadable_checkpoint_is_named(ckpt, tmp_path, damage):
    data = open(ckpt, "rb").read()
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(ValueError, match=r"checkpoint .*bad\.ckpt \(\d+ bytes\) is not a readable checkpoint"):
        check_checkpoint_file(bad)


def test_a_bit_flipped_in_the_weights_is_refused(ckpt, tmp_path):
    bad = tmp_path / "flipped.ckpt"
    raw = bytearray(open(ckpt, "rb").read())
    with zipfile.ZipFile(ckpt) as z:  # the largest tensor record: flip one bit in its middle
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    h = info.header_offset  # the local header's name and extra (padding) lengths
    start = h + 30 + int.from_bytes(raw[h + 26:h + 28], "little") + int.from_bytes(raw[h + 28:h + 30], "little")
    raw[start + info.file_size // 2] ^= 0x10
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="flipped|corrupted"):
        check_checkpoint_file(bad)
    # the learner itself refuses it too, when Lightning reads it without the CLI
    with pytest.raises(ValueError, match="do not match the checksum"):
        _trainer(tmp_path, 3).fit(_maml(), _dm(), ckpt_path=str(bad))


def test_a_checkpoint_of_another_learner_is_refused(ckpt, tmp_path):
    torch.manual_seed(0)
    imaml = IMAMLModule(MLP(1, [8], 1), inner_steps=1)
    with pytest.raises(ValueError, match=r"written by tasklight\.meta\.maml\.MAMLModule .*IMAMLModule"):
        _trainer(tmp_path, 3).fit(imaml, _dm(), ckpt_path=ckpt)
    # load_from_checkpoint refuses it too (before or in on_load_checkpoint), naming the class that wrote it
    with pytest.raises(ValueError, match=r"tasklight\.meta\.maml\.MAMLModule"):
        IMAMLModule.load_from_checkpoint(ckpt, net=MLP(1, [8], 1))


def test_resuming_with_other_episode_settings_is_refused(ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"other episodes \(k_shot: checkpoint 5, now 3\)"):
        _trainer(tmp_path, 3).fit(_maml(), _dm(k_shot=3), ckpt_path=ckpt)
    # settings that do not change the meaning of the state may change
    t = _trainer(tmp_path, 3)
    t.fit(_maml(), _dm(num_workers=0, batches_per_epoch=7, test_episodes=9), ckpt_path=ckpt)
    assert t.global_step == 3


_CLI_TINY = ["--model", "MAMLModule", "--model.net", "MLP", "--model.net.init_args.hidden", "[8]",
             "--model.inner_steps", "1", "--data", "SinusoidDataModule", "--data.init_args.meta_batch_size", "2",
             "--data.init_args.batches_per_epoch", "2", "--data.init_args.test_episodes", "2",
             "--trainer.max_steps", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
             "--trainer.limit_val_batches", "0"]


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_the_cli_names_an_unreadable_ckpt_path_in_every_subcommand(ckpt, tmp_path, monkeypatch, subcommand, capsys):
    from tasklight.cli import run_cli

    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "cut.ckpt"
    bad.write_bytes(open(ckpt, "rb").read()[:1000])
    args = [*_CLI_TINY, "--test_after_fit", "false"] if subcommand == "fit" else _CLI_TINY
    with pytest.raises(SystemExit) as exc:
        run_cli([subcommand, *args, "--ckpt_path", str(bad)])
    assert exc.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("tasklight: error:")]
    assert len(lines) == 1 and re.search(r"checkpoint .*cut\.ckpt \(1000 bytes\) is not a readable checkpoint", lines[0])


@pytest.mark.parametrize("name, method", [("ddp", "popen"), ("ddp_spawn", "spawn"), ("ddp_fork", "fork"),
                                          ("ddp_spawn_find_unused_parameters_true", "spawn")])
def test_the_cli_gives_ddp_strategies_the_process_group_timeout(tmp_path, monkeypatch, name, method):
    """`--trainer.strategy ddp_spawn` gets a timeout, so a dead rank ends the run (issue 12 row 4)."""
    from datetime import timedelta

    from lightning.pytorch import LightningDataModule, LightningModule

    from tasklight.cli import TasklightCLI
    from tasklight.strategies import TimedDDPStrategy

    monkeypatch.chdir(tmp_path)
    cli = TasklightCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       trainer_defaults={"inference_mode": False}, auto_configure_optimizers=False, run=False,
                       save_config_callback=None,
                       args=[*_CLI_TINY, "--trainer.strategy", name, "--trainer.accelerator", "cpu",
                             "--trainer.devices", "2", "--process_group_timeout", "12"])
    strategy = cli.trainer.strategy
    assert isinstance(strategy, TimedDDPStrategy) and strategy._start_method == method
    assert strategy._timeout == timedelta(seconds=12)
    assert strategy._ddp_kwargs.get("find_unused_parameters", False) == name.endswith("_true")
