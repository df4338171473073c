"""scripts/first_day.sh: the README's and the guides' commands as written, on a small budget, with
their outputs checked (metrics table, predictions file, figures and last.ckpt under the run folder,
a resume through runs/<name>/latest/, the Task2Vec pipeline). The suite runs it on the working tree
with the current interpreter (`--reuse-env`); `bash scripts/first_day.sh` alone makes a fresh clone
and a fresh virtual environment."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_first_day_commands_run_as_documented(tmp_path):
    env = {**os.environ, "FIRST_DAY_PYTHON": sys.executable, "FIRST_DAY_DIR": str(tmp_path / "work"),
           "WANDB_MODE": "offline"}
    env.pop("TASKLIGHT_RUN_DIR", None)
    res = subprocess.run(["bash", str(ROOT / "scripts" / "first_day.sh"), "--reuse-env"], env=env,
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, (res.stdout[-4000:], res.stderr[-3000:])
    assert "first_day: all commands ran and left their outputs" in res.stdout
    work = tmp_path / "work" / "tasklight"
    assert (work / "runs" / "maml_omniglot" / "latest" / "checkpoints" / "last.ckpt").is_file()
    assert list((work / "runs" / "maml_sinusoid").glob("*/plots/*.png"))
    assert list((work / "runs" / "maml_omniglot").glob("*/predict-*/predictions.pt"))


def test_first_day_script_runs_the_readme_commands():
    """Every `tasklight` command of the README's command-line block is in the script, as written."""
    import re

    readme = (ROOT / "README.md").read_text()
    block = readme.split("## The command line", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    script = (ROOT / "scripts" / "first_day.sh").read_text()
    commands = [re.sub(r"\s+#.*", "", line).strip() for line in block.splitlines() if line.startswith("tasklight")]
    missing = [c for c in commands if "my_pkg.MyLearner" not in c and c not in script]
    assert commands and not missing, missing
