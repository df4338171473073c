"""Configs built on other configs (`extends:`): the same resolved config as one flat file."""
import textwrap

import pytest
import yaml

from tasklight.cli import expand_config, run_cli

BASE = """
seed_everything: 3
model:
  class_path: tasklight.MAMLModule
  init_args:
    net:
      class_path: tasklight.nn.MLP
      init_args: {in_features: 1, hidden: [8], out_features: 1}
    inner_lr: 0.05
data:
  class_path: tasklight.SinusoidDataModule
  init_args: {k_shot: 5, meta_batch_size: 4}
trainer:
  max_steps: 7
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {save_dir: runs}
"""
OVERRIDE = """
extends: base.yaml
model:
  init_args:
    inner_steps: 2
data:
  class_path: tasklight.SinusoidDataModule
  init_args: {meta_batch_size: 8}
trainer:
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {name: child}
"""
FLAT = """
seed_everything: 3
model:
  class_path: tasklight.MAMLModule
  init_args:
    net:
      class_path: tasklight.nn.MLP
      init_args: {in_features: 1, hidden: [8], out_features: 1}
    inner_lr: 0.05
    inner_steps: 2
data:
  class_path: tasklight.SinusoidDataModule
  init_args: {k_shot: 5, meta_batch_size: 8}
trainer:
  max_steps: 7
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {save_dir: runs, name: child}
"""


def _resolved(path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(["fit", "--config", str(path), "--print_config"])
    assert exc.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    cfg.pop("extends", None)
    return cfg


def test_a_config_that_extends_another_resolves_like_the_flat_config(tmp_path, capsys):
    (tmp_path / "base.yaml").write_text(textwrap.dedent(BASE))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.yaml").write_text(textwrap.dedent(BASE).replace("inner_lr: 0.05", "inner_lr: 9.0"))
    (tmp_path / "child.yaml").write_text(textwrap.dedent(OVERRIDE))
    (tmp_path / "flat.yaml").write_text(textwrap.dedent(FLAT))
    # extends is relative to the file, not to the working directory
    assert expand_config(str(tmp_path / "child.yaml")) == ["--config", str(tmp_path / "base.yaml"),
                                                          "--config", str(tmp_path / "child.yaml")]
    child, flat = _resolved(tmp_path / "child.yaml", capsys), _resolved(tmp_path / "flat.yaml", capsys)
    assert child == flat
    assert child["model"]["init_args"]["inner_lr"] == 0.05 and child["data"]["init_args"]["k_shot"] == 5
    assert child["trainer"]["logger"]["init_args"]["save_dir"] == "runs"


def test_a_missing_or_looping_base_is_one_clear_error(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(SystemExit, match="extends 'nowhere.yaml'.*does not exist"):
        expand_config(str(tmp_path / "a.yaml"))
    (tmp_path / "b.yaml").write_text("extends: c.yaml\n")
    (tmp_path / "c.yaml").write_text("extends: b.yaml\n")
    with pytest.raises(SystemExit, match="loops back"):
        expand_config(str(tmp_path / "b.yaml"))
    (tmp_path / "d.yaml").write_text("extends: [a.yaml, b.yaml]\n")
    with pytest.raises(SystemExit, match="one config file"):
        expand_config(str(tmp_path / "d.yaml"))
