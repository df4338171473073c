"""Fault injection: SIGKILL a training run at random points, resume it each time from its newest
readable checkpoint, and check it ends bit-identical to an uninterrupted run."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

JOB = Path(__file__).with_name("fault_job.py")
MAX_STEPS = 12


def _start(run_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(JOB), str(run_dir), str(MAX_STEPS)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _steps_done(run_dir):
    p = run_dir / "progress.txt"
    lines = p.read_text().split() if p.exists() else []
    return int(lines[-1]) if lines else 0


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(tmp_path):
    ref_dir = tmp_path / "uninterrupted"
    ref_dir.mkdir()
    ref = _start(ref_dir)
    assert ref.wait(timeout=600) == 0, ref.stderr.read()[-3000:]

    rng = random.Random(12)
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    kills = 0
    targets = sorted(rng.sample(range(1, MAX_STEPS), 3))  # kill once the run has passed each of these steps
    for target in targets:
        proc = _start(run_dir)
        deadline = time.monotonic() + 300
        while _steps_done(run_dir) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.25))  # anywhere in the step: inside the step, or while checkpointing
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
        assert not (run_dir / "final.pt").exists() or proc.returncode == 0
    assert kills == len(targets)
    last = _start(run_dir)
    assert last.wait(timeout=600) == 0, last.stderr.read()[-3000:]

    starts = (run_dir / "starts.txt").read_text().split()
    assert starts[0] == "scratch" and len(starts) == len(targets) + 1
    resumed_at = [int(s.split("=")[1].split(".")[0]) for s in starts[1:]]
    assert all(step >= t - 1 for step, t in zip(resumed_at, targets))  # it resumed, it did not start over
    want = torch.load(ref_dir / "final.pt", weights_only=True)
    got = torch.load(run_dir / "final.pt", weights_only=True)
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert int(got["skipped_steps"]) == 0
