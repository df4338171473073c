"""DDP reliability (issue 12 rows 3, 4): the CI metric under every strategy; a dead rank ends the run."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

JOB = Path(__file__).with_name("ddp_job.py")
EVAL_JOB = Path(__file__).with_name("ddp_eval_job.py")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(JOB.parent), env.get("PYTHONPATH", "")])
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        env.pop(k, None)
    return env


def _ci(strategy, tmp_path):
    out = tmp_path / f"{strategy}.json"
    proc = subprocess.run([sys.executable, str(JOB), "ci", strategy, str(out)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _ci("single", tmp_path_factory.mktemp("single"))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["single", "ddp", "ddp_spawn"])
def test_mean_and_ci_are_the_same_under_every_strategy(strategy, single, tmp_path):
    got = single if strategy == "single" else _ci(strategy, tmp_path)
    assert set(got) == set(single)
    for key in single:
        assert got[key] == pytest.approx(single[key], rel=1e-5), (strategy, key)
    assert single["test/mse@1_ci95"] > 0


@pytest.mark.slow
def test_a_rank_killed_under_ddp_spawn_ends_the_run(tmp_path):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(JOB), "dead_rank", "ddp_spawn", "15"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    took = time.monotonic() - start
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "training ended normally" not in proc.stdout
    assert took < 240, took  # the process-group timeout (15 s) ends it, not Lightning's default 30 minutes


# every learner family's evaluation path, on 1, 3 and 4 episodes (the distributed sampler pads 1 and 3)
EVAL_CASES = [f"{family}:{size}" for family in ("maml", "protonet", "multitask", "taskmet") for size in (1, 3, 4)]


def _eval(strategy, cases, tmp_path):
    out = tmp_path / f"eval_{strategy}.json"
    proc = subprocess.run([sys.executable, str(EVAL_JOB), strategy, str(out), *cases], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _same(got, want):
    assert set(got) == set(want)
    for case, metrics in want.items():
        assert set(got[case]) == set(metrics), case
        for key, value in metrics.items():
            if math.isnan(value):  # the interval of one episode is undefined on every strategy
                assert math.isnan(got[case][key]), (case, key)
            else:
                assert got[case][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (case, key)


@pytest.fixture(scope="module")
def single_eval(tmp_path_factory):
    return _eval("single", EVAL_CASES, tmp_path_factory.mktemp("eval_single"))


@pytest.mark.slow
def test_every_family_counts_each_test_episode_once_on_two_ranks(single_eval, tmp_path):
    """One ``ddp`` launch runs every case in the same two processes (each case a new Trainer)."""
    _same(_eval("ddp", EVAL_CASES, tmp_path), single_eval)
    assert math.isnan(single_eval["maml:1"]["test/mse@1_ci95"]) and single_eval["maml:3"]["test/mse@1_ci95"] > 0


@pytest.mark.slow
def test_ddp_spawn_test_metrics_equal_one_process_with_padding(single_eval, tmp_path):
    cases = ["maml:1", "maml:3", "maml:4"]  # one spawn per case
    _same(_eval("ddp_spawn", cases, tmp_path), {c: single_eval[c] for c in cases})
