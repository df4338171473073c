"""scripts/gpu_check.py cannot rot: its --dry-run runs every code path of the GPU check on the CPU."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # spawns the script: about 20 s on 2 idle cores
def test_gpu_check_dry_run_runs_every_section_and_writes_its_results(tmp_path):
    out = tmp_path / "bench_gpu.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry-run", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    m = re.match(r"SUMMARY device=(\S+) families_ok=(\d+)/(\d+) bf16_within_tol=\d+/6 bf16_max_rel_err=\S+ "
                 r"conv_loop_over_vmap=[\d.]+ conv20_loop_over_vmap=[\d.]+ max_param_overhead=[\d.]+ "
                 r"grads_match=true$", summary)
    assert m, summary
    assert m.group(2) == m.group(3) == "9"  # six meta-learners, multi-task, TaskMet, Task2Vec
    text = out.read_text()
    assert text.startswith("# GPU check (dry run on the CPU at tiny sizes (not GPU figures))")
    for section in ("## Learner families on the device", "## Meta-step benchmark", "## Multi-task overhead"):
        assert section in text
    for row in ("meta: MAML ", "meta: ProtoNet", "TaskMet", "Task2Vec", "tasklight vmap", "tasklight stacked",
                "| loop |", "batched (chunks of 2)", "pcgrad (parameters)"):
        assert row in text, row
    assert "FAILED" not in text


def test_gpu_check_refuses_to_run_without_cuda_unless_dry_run(capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu_check.main([]) == 2
    assert "--dry-run" in capsys.readouterr().err
