"""The registry of weighting methods: every entry is a Weighting with a parity test that exists, a toy
config that runs through the CLI, and a row of the method table in docs/multitask.md."""
from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tasklight
from tasklight.multitask.registry import method_table, register_weighting, weighting_class, weightings
from tasklight.multitask.weighting import Weighting

ROOT = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- weightings:begin -->", "<!-- weightings:end -->"


def test_every_registered_method_has_a_class_a_parity_test_and_a_toy_config():
    entries = weightings()
    assert len(entries) >= 27 and tasklight.weightings() == entries
    assert len({e.cls for e in entries.values()}) == len(entries)
    for name, e in entries.items():
        assert issubclass(e.cls, Weighting) and e.name == name, name
        assert (ROOT / e.config).is_file(), e.config
        path, test = e.parity.split("::")
        assert re.search(rf"^def {test}\(", (ROOT / path).read_text(), re.M), e.parity
        assert weighting_class(name) is e.cls and weighting_class(e.cls.__name__) is e.cls
    stems = {p.stem.removeprefix("mtl_toy_") for p in ROOT.glob("configs/mtl_toy_*.yaml")}
    assert stems == set(entries)  # no toy config without a registered method


def test_lookups_and_registration_errors():
    with pytest.raises(KeyError, match="no weighting method named 'nope'.*gradvac"):
        weighting_class("nope")
    with pytest.raises(ValueError, match="lower-case identifier"):
        register_weighting("Grad-Vac", paper="", reference="", parity="")
    with pytest.raises(ValueError, match="already registered"):
        register_weighting("gradvac", paper="", reference="", parity="")(type("Other", (Weighting,), {}))


def test_the_docs_method_table_is_the_registry():
    text = (ROOT / "docs" / "multitask.md").read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    table = text.split(BEGIN)[1].split(END)[0].strip()
    assert table == method_table(), ("docs/multitask.md's method table is out of date; regenerate it with "
                                     "python scripts/weighting_table.py")


def test_the_table_script_checks_and_rewrites_the_table(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import weighting_table
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert weighting_table.main(["--check"]) == 0  # python scripts/weighting_table.py --check
    stale = tmp_path / "doc.md"
    stale.write_text(f"intro\n{BEGIN}\n| old |\n{END}\nrest\n")
    assert weighting_table.main(["--check", "--doc", str(stale)]) == 1
    assert weighting_table.main(["--doc", str(stale)]) == 0  # python scripts/weighting_table.py
    assert stale.read_text() == f"intro\n{BEGIN}\n{method_table()}\n{END}\nrest\n"
    assert weighting_table.main(["--check", "--doc", str(stale)]) == 0


@pytest.mark.slow
def test_the_documented_count_command():
    out = subprocess.run([sys.executable, "-c", "import tasklight; print(len(tasklight.weightings()))"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert int(out.stdout.strip()) >= 27


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(weightings()))
def test_every_toy_config_runs_through_the_cli(name, tmp_path, monkeypatch):
    from tasklight.cli import run_cli

    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", str(ROOT / "configs" / f"mtl_toy_{name}.yaml"), "--trainer.max_steps", "3",
                   "--trainer.logger", "false", "--test_after_fit", "false", "--trainer.enable_progress_bar", "false",
                   "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "0"])
    assert cli.trainer.global_step == 3
    assert type(cli.model.weighting) is weightings()[name].cls
    assert math.isfinite(float(cli.trainer.callback_metrics["train/objective"]))
    start = cli.config["fit"]["model"]["init_args"]["trunk"]["init_args"]["start"]
    assert list(cli.model.trunk.parameters())[0].detach().tolist() != start  # the point moved


def test_short_names_on_the_command_line_become_class_paths():
    from tasklight.multitask.registry import expand_weighting_names

    assert expand_weighting_names(["fit", "--model.init_args.weighting", "gradvac", "--x", "gradvac"]) == [
        "fit", "--model.init_args.weighting", "tasklight.multitask.weightings.gradvac.GradVac", "--x", "gradvac"]
    assert expand_weighting_names(["--model.init_args.weighting=mgda"]) == [
        "--model.init_args.weighting=tasklight.multitask.weighting.MGDA"]
    keep = ["--model.init_args.weighting", "GradVac", "--model.init_args.weighting=tasklight.multitask.MoCo"]
    assert expand_weighting_names(keep) == keep
    with pytest.raises(SystemExit, match="'gradvaq' is not a registered weighting method.*gradvac"):
        expand_weighting_names(["--model.init_args.weighting", "gradvaq"])


@pytest.mark.slow
def test_the_documented_short_name_command(tmp_path, monkeypatch):
    from tasklight.cli import run_cli

    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", str(ROOT / "configs" / "mtl_toy_equal.yaml"), "--model.init_args.weighting",
                   "gradvac", "--trainer.max_steps", "2", "--trainer.logger", "false", "--test_after_fit", "false",
                   "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0"])
    assert type(cli.model.weighting) is weighting_class("gradvac") and cli.trainer.global_step == 2
