"""Real 2-process DDP (gloo) for multi-task learning: one spawn, every weighting method.

For each case of ``mtl_ddp_helpers.CASES`` the two ranks train on disjoint examples (4 per task per
rank), and a single process trains on their union (8 per task, the same examples). Checked:

* parameters are identical across ranks after 6 steps;
* they equal the single process's parameters (each weighting method gives the same update);
* the weights chosen at every step are the same on both ranks and in the single process;
* the logged per-task training losses equal the mean over both ranks' batches, and the logged
  validation losses equal the single process's;
* the gradient-conflict matrices (synced per-task gradients) equal the single process's.
"""
from __future__ import annotations

import socket

import pytest
import torch

import mtl_ddp_helpers as H

pytestmark = pytest.mark.slow  # real 2-process DDP: minutes on 2 cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same(a, b, msg):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=msg)


def test_two_ranks_match_one_process_on_the_union_for_every_weighting(tmp_path):
    torch.multiprocessing.start_processes(H.worker, args=(2, _free_port(), str(tmp_path)), nprocs=2,
                                          start_method="spawn")
    for case in H.CASES:
        ranks = [torch.load(tmp_path / f"{case}_rank{r}.pt", weights_only=False) for r in range(2)]
        H.fit_case(case, str(tmp_path / f"{case}_single.pt"), 1, 2 * H.B, "auto")
        single = torch.load(tmp_path / f"{case}_single.pt", weights_only=False)
        for k, v in single["init"].items():
            _same(ranks[0]["init"][k], v, f"{case}: {k}")
        moved = False
        for k, v in ranks[0]["final"].items():
            _same(v, ranks[1]["final"][k], f"{case}: {k}")  # identical across ranks
            torch.testing.assert_close(v, single["final"][k], atol=2e-5, rtol=1e-4, equal_nan=True, msg=f"{case}: {k}")
            init = ranks[0]["init"][k]  # state the size of the gradients is allocated at the first step
            moved |= v.is_floating_point() and (v.shape != init.shape or not torch.allclose(v, init, equal_nan=True))
        assert moved, case
        # the ranks trained on different examples, and chose the same weights as the single process
        assert len(ranks[0]["steps"]) == len(single["steps"]) == H.STEPS
        assert not torch.allclose(ranks[0]["steps"][0]["task_loss_sum"], ranks[1]["steps"][0]["task_loss_sum"])
        if "sampled" not in case:
            assert ranks[0]["steps"][0]["task_count"].tolist() == [H.B] * H.T
            assert single["steps"][0]["task_count"].tolist() == [2 * H.B] * H.T
        for s0, s1, ss in zip(ranks[0]["steps"], ranks[1]["steps"], single["steps"]):
            _same(s0["weights"], s1["weights"], case)
            torch.testing.assert_close(s0["weights"], ss["weights"], atol=2e-5, rtol=1e-4, msg=case)
        # logged per-task training losses of the last epoch: the mean over both ranks' batches
        last = slice(H.STEPS - H.STEPS_PER_EPOCH, H.STEPS)
        loss_sum = sum(s["task_loss_sum"].double() for r in ranks for s in r["steps"][last])
        count = sum(s["task_count"].double() for r in ranks for s in r["steps"][last])
        for r in ranks:
            torch.testing.assert_close(r["logged"]["train"]["loss"], loss_sum / count, msg=case)
            torch.testing.assert_close(r["logged"]["train"]["loss"], single["logged"]["train"]["loss"],
                                       atol=2e-5, rtol=1e-4, msg=case)
            torch.testing.assert_close(r["logged"]["val"]["loss"], single["logged"]["val"]["loss"],
                                       atol=2e-5, rtol=1e-4, msg=case)
            assert r["logged"]["val"]["count"].tolist() == [8.0] * H.T  # every validation example once
        if case == H.MONITORED:
            assert len(ranks[0]["monitor"]) == len(single["monitor"]) == H.STEPS // 2
            for (st0, _, m0), (st1, _, m1), (sts, _, ms) in zip(ranks[0]["monitor"], ranks[1]["monitor"],
                                                               single["monitor"]):
                assert st0 == st1 == sts
                torch.testing.assert_close(m0, m1)
                torch.testing.assert_close(m0, ms, atol=1e-5, rtol=1e-4)
