"""The three cross-rank reductions, in the quick tier, with a fake two-rank reduce: each rank's
partial sums plus the other rank's must give the means over the union of both ranks' examples,
computed here directly from the pooled examples (the real 2-process runs are in the slow tier)."""
from types import SimpleNamespace

import pytest
import torch

from tasklight.callbacks.task_logging import TaskLossLogger, TaskMeans
from tasklight.data.batch import TaskSpec
from tasklight.metrics import MeanCI
from tasklight.multitask import MultiTaskModule
from tasklight.nn.nets import MLP


def fake_two_ranks(other):
    """A strategy whose all-reduce adds the other rank's tensor (``other(x)`` gives it)."""
    def reduce(x, reduce_op="sum"):
        both = x + other(x)
        return both / 2 if reduce_op == "mean" else both
    return SimpleNamespace(world_size=2, strategy=SimpleNamespace(reduce=reduce))


def per_task(values, tasks, T):
    """count, loss sum and metric sum per task of per-example values."""
    count = torch.bincount(tasks, minlength=T).double()
    return count, torch.zeros(T, dtype=torch.float64).index_add(0, tasks, values.double())


def test_per_task_sums_of_a_training_step_are_means_over_both_ranks():
    T, gen = 3, torch.Generator().manual_seed(0)
    module = MultiTaskModule(MLP(1, [4], 4), tasks=[TaskSpec(f"t{t}", 1, kind="regression") for t in range(T)])
    # rank 0 and rank 1: per-example losses and per-example gradients (4 numbers) of their own examples
    ranks = []
    for n in (5, 8):
        tasks = torch.randint(0, T, (n,), generator=gen)
        tasks[0] = 0  # task 2 may be absent on one rank
        ranks.append((tasks, torch.rand(n, generator=gen, dtype=torch.float64),
                      torch.randn(n, 4, generator=gen, dtype=torch.float64)))

    def local(r):
        tasks, loss, grad = ranks[r]
        count = torch.bincount(tasks, minlength=T).double()
        mean = lambda v: torch.zeros((T,) + v.shape[1:], dtype=torch.float64).index_add(0, tasks, v) / \
            count.clamp_min(1).view(-1, *[1] * (v.dim() - 1))
        return count, mean(loss), mean(grad)

    c1, l1, g1 = local(1)
    other = torch.cat([c1[:, None], (c1 * l1)[:, None], c1[:, None] * g1], 1)
    module._trainer = fake_two_ranks(lambda x: other)
    n, losses, grads = module._sync(*local(0))
    pooled_tasks = torch.cat([ranks[0][0], ranks[1][0]])
    count = torch.bincount(pooled_tasks, minlength=T).double()
    torch.testing.assert_close(n, count)
    for t in range(T):
        sel = pooled_tasks == t
        if sel.any():
            torch.testing.assert_close(losses[t], torch.cat([ranks[0][1], ranks[1][1]])[sel].mean())
            torch.testing.assert_close(grads[t], torch.cat([ranks[0][2], ranks[1][2]])[sel].mean(0))


def test_step_windows_of_per_task_curves_are_means_over_both_ranks():
    T = 2
    logged = {}
    module = SimpleNamespace(task_names=["a", "b"], task_kinds=["regression", "classification"], num_tasks=T,
                             log_dict=lambda d, **kw: logged.update(d))
    # two steps per rank in the window: per-example losses and metrics, and each step's weights
    gen = torch.Generator().manual_seed(1)
    steps = {r: [(torch.randint(0, T, (6,), generator=gen), torch.rand(6, generator=gen),
                  torch.rand(6, generator=gen), torch.rand(T, generator=gen)) for _ in range(2)] for r in range(2)}

    def window(r):
        rows = torch.zeros(5, T, dtype=torch.float64)
        for tasks, loss, metric, w in steps[r]:
            count, loss_sum = per_task(loss, tasks, T)
            rows += torch.stack([loss_sum, count, per_task(metric, tasks, T)[1], w.double(), torch.ones(T)])
        return rows

    cb = TaskLossLogger()
    cb._window = window(0)
    cb._log_window(fake_two_ranks(lambda x: window(1)), module)
    all_steps = steps[0] + steps[1]
    tasks = torch.cat([s[0] for s in all_steps])
    for t, name in enumerate("ab"):
        sel = tasks == t
        assert logged[f"train/tasks/{name}/loss_step"] == pytest.approx(float(torch.cat([s[1] for s in all_steps])[sel].mean()))
        metric = "mse" if t == 0 else "acc"
        assert logged[f"train/tasks/{name}/{metric}_step"] == pytest.approx(
            float(torch.cat([s[2] for s in all_steps])[sel].mean()))
        assert logged[f"train/tasks/{name}/weight_step"] == pytest.approx(float(torch.stack([s[3][t] for s in all_steps]).mean()))


@pytest.mark.parametrize("kind", ["task_means", "mean_ci"])
def test_epoch_sums_are_reduced_over_both_ranks(kind):
    """TaskMeans (multi-task epochs) and MeanCI (meta-learners' evaluation) sync their sums, not means."""
    gen = torch.Generator().manual_seed(2)
    values = [torch.rand(n, generator=gen, dtype=torch.float64) for n in (3, 6)]
    make = (lambda: TaskMeans(2, 1)) if kind == "task_means" else MeanCI
    metrics = [make() for _ in range(2)]
    for m, v in zip(metrics, values):  # task_means: the sum and the count of one task, as [1 field, 2]
        m.update(torch.stack([v.sum(), torch.tensor(float(len(v)), dtype=torch.float64)]).view(1, 2)
                 if kind == "task_means" else v)
    mine, other = metrics

    def gather(t, group=None):  # the other rank's state of the same name, in this rank's order
        name = next(k for k in mine._defaults if getattr(mine, k) is t)
        return [t, getattr(other, name)]

    mine.dist_sync_fn, mine.distributed_available_fn = gather, lambda: True
    res = mine.compute()
    pooled = torch.cat(values)
    if kind == "task_means":
        assert float(res[0, 0] / res[0, 1]) == pytest.approx(float(pooled.mean())) and float(res[0, 1]) == 9
    else:
        assert int(res["count"]) == 9
        assert float(res["mean"]) == pytest.approx(float(pooled.mean()))
        assert float(res["ci95"]) == pytest.approx(1.96 * float(pooled.std()) / 3)
