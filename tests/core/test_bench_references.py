"""The benchmarks' meta-gradient references agree with tasklight in float64 on tiny instances.

``scripts/bench_meta_step.py`` and ``scripts/bench_race.py`` time and train with the methods of
``scripts/_meta_refs.py``: a plain per-task autograd loop and adapters of learn2learn, higher and
parallel-metalearn. A benchmark is only meaningful if they all compute the same meta-gradient, so
each is checked here against tasklight's (``MAMLModule``) and against an independent value: the
per-task loop's, and for the loop itself, central finite differences of the meta-objective.
Peers that are not installed are skipped with the reason (``scripts/install_peers.sh``); the
per-task loop always runs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import _meta_refs as R  # noqa: E402

SETTINGS = {
    "sin": dict(tasks=3, steps=2, hidden=6, shots=4),
    "conv": dict(tasks=2, steps=1, hidden=3, queries=1),
    "conv20": dict(tasks=2, steps=2, hidden=2, queries=1),
}


def _setting(name: str) -> R.Setting:
    return R.make_setting(name, dtype=torch.float64, seed=1, **SETTINGS[name])


def _tasklight_grads(setting: R.Setting, ref) -> dict:
    m = R.make_method("tasklight:auto", setting, ref)
    m.step()
    return m.grads()


@pytest.mark.parametrize("name", list(SETTINGS))
def test_per_task_loop_matches_tasklight(name):
    s = _setting(name)
    ref = s.make_net()
    loop = R.make_method("loop", s, ref)
    loop.step()
    got, want = loop.grads(), _tasklight_grads(s, ref)
    assert set(got) == {n for n, _ in ref.named_parameters()}
    assert R.compare(got, want) < 1e-10
    # the reference weights are untouched and the gradient is not trivially zero
    assert max(float(g.abs().max()) for g in got.values()) > 1e-6


def test_per_task_loop_matches_finite_differences():
    s = _setting("sin")
    ref = s.make_net()
    loop = R.make_method("loop", s, ref)
    loop.step()
    grads = loop.grads()
    net, b, loss_fn = loop.net, s.batch, s.loss_fn()

    def objective() -> float:
        total = 0.0
        for t in range(b.num_tasks):
            fast = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
            for _ in range(s.steps):
                loss = loss_fn(torch.func.functional_call(net, fast, (b.support_x[t],)), b.support_y[t])
                g = torch.autograd.grad(loss, list(fast.values()))
                fast = {n: (p - s.lr * gi).detach().requires_grad_() for (n, p), gi in zip(fast.items(), g)}
            with torch.no_grad():
                total += float(loss_fn(torch.func.functional_call(net, fast, (b.query_x[t],)), b.query_y[t]))
        return total / b.num_tasks

    gen = torch.Generator().manual_seed(0)
    eps = 1e-6
    for name, p in net.named_parameters():
        for idx in torch.randint(0, p.numel(), (2,), generator=gen).tolist():
            flat = p.data.view(-1)
            old = float(flat[idx])
            flat[idx] = old + eps
            up = objective()
            flat[idx] = old - eps
            down = objective()
            flat[idx] = old
            fd = (up - down) / (2 * eps)
            assert abs(fd - float(grads[name].view(-1)[idx])) < 1e-6 * max(1.0, abs(fd)), (name, idx)


@pytest.mark.parametrize("peer", R.PEERS)
@pytest.mark.parametrize("name", list(SETTINGS))
def test_peer_adapter_matches_tasklight(peer, name):
    reason = R.available(peer)
    if reason is not None:
        pytest.skip(reason)
    s = _setting(name)
    ref = s.make_net()
    m = R.make_method(peer, s, ref)
    before = {k: v.detach().clone() for k, v in m.net.named_parameters()}
    m.step()
    want = _tasklight_grads(s, ref)
    assert R.compare(m.grads(), want) < 1e-10
    # the adapter leaves the weights as they were (its step only computes the meta-gradient)
    for k, v in m.net.named_parameters():
        assert torch.equal(v.detach(), before[k]), k


def test_unknown_method_and_setting_are_errors():
    with pytest.raises(ValueError, match="unknown setting"):
        R.make_setting("mnist", tasks=1, steps=1, hidden=2)
    s = _setting("sin")
    with pytest.raises(ValueError, match="unknown method"):
        R.make_method("maml-ish", s, s.make_net())
