"""Fixed-budget race: Omniglot 5-way 1-shot MAML, tasklight (``strategy="auto"``) vs the per-task loop (or a peer).

    python scripts/bench_race.py --quick            # 60 s of training each, Conv4-32, 200 test episodes
    python scripts/bench_race.py --budget 600       # 10 minutes each, Conv4-64, 600 test episodes
    python scripts/bench_race.py --quick --against learn2learn

Both contestants start from the same Conv4 weights (seed), train second-order MAML (1 inner SGD step,
lr 0.4; Adam 1e-3 outer) on the same sequence of seeded meta-batches (meta-batch i is the same for both;
each gets as far as its budget allows), and are tested on the same seeded test episodes with the same
code (tasklight's ``predict_episode`` with the trained weights, 1 adaptation step): accuracy on the query
images, mean over episodes with a 95 % CI (1.96 standard errors). The meta-gradients come from
``scripts/_meta_refs.py`` (tasklight ``MAMLModule.meta_objective``; the per-task autograd loop or the
peer's loop), so the race differs only in how the meta-gradient is computed.

Fair under a shared, varying load: the two train in alternating slices (``--slice`` seconds each), and
only a contestant's own steps count against its budget (after one uncounted warm-up meta-step each).

Data: ``OmniglotDataModule`` defaults (the small background sets shipped in
``tasklight/data/assets/omniglot``, characters split 0.7 / 0.1 / 0.2, rotations of the training characters).

Writes ``docs/bench_omniglot_race.md``; the last line printed is
``SUMMARY race_budget_s=<s> tasklight_acc=<a> other_acc=<b> tasklight_steps=<n> other_steps=<m>``.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch

import _bench_meta as B  # noqa: E402
import _meta_refs as R  # noqa: E402

from tasklight.data.batch import collate_tasks  # noqa: E402
from tasklight.data.episodes import episode_generator  # noqa: E402
from tasklight.data.omniglot import OmniglotDataModule  # noqa: E402
from tasklight.meta.maml import MAMLModule  # noqa: E402
from tasklight.nn.nets import Conv4  # noqa: E402

TRAIN_STREAM, TEST_STREAM = 0, 2


class Contestant:
    def __init__(self, name: str, method_name: str, setting: R.Setting, ref, outer_lr: float) -> None:
        self.name, self.setting = name, setting
        self.method = R.make_method(method_name, setting, ref)
        self.opt = torch.optim.Adam(self.method.net.parameters(), lr=outer_lr)
        self.steps, self.seconds, self.losses = 0, 0.0, []

    def train_for(self, seconds: float, budget: float, batch_of) -> None:
        start = time.perf_counter()
        while self.seconds < budget and time.perf_counter() - start < seconds:
            self.setting.batch = batch_of(self.steps)
            t0 = time.perf_counter()
            self.method.step()
            self.opt.step()
            self.seconds += time.perf_counter() - t0
            self.steps += 1


def evaluate(net, episodes, lr: float, steps: int) -> tuple[float, float]:
    """Mean query accuracy and 95 % CI half-width over ``episodes``, by tasklight's ``predict_episode``."""
    module = MAMLModule(copy.deepcopy(net), loss="cross_entropy", inner_steps=steps, inner_lr=lr)
    accs = []
    for b in episodes:
        logits = module.predict_episode(b.support_x, b.support_y, b.query_x)
        accs.extend((logits.argmax(-1) == b.query_y).float().mean(-1).tolist())
    mean = sum(accs) / len(accs)
    sd = math.sqrt(sum((a - mean) ** 2 for a in accs) / max(1, len(accs) - 1))
    return mean, 1.96 * sd / math.sqrt(len(accs))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="60 s each, Conv4-32, 8 tasks per meta-batch, 200 test episodes")
    p.add_argument("--budget", type=float, default=None, help="training seconds per contestant (60 quick, 600)")
    p.add_argument("--slice", type=float, default=10.0, help="seconds per alternating training slice")
    p.add_argument("--against", default="loop", choices=["loop", *R.PEERS])
    p.add_argument("--hidden", type=int, default=None, help="Conv4 filters (32 quick, 64)")
    p.add_argument("--tasks", type=int, default=None, help="tasks per meta-batch (8 quick, 32)")
    p.add_argument("--queries", type=int, default=15, help="query images per class (training and test)")
    p.add_argument("--test-episodes", type=int, default=None, help="(200 quick, 600)")
    p.add_argument("--outer-lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    budget = args.budget or (60.0 if args.quick else 600.0)
    hidden = args.hidden or (32 if args.quick else 64)
    tasks = args.tasks or (8 if args.quick else 32)
    n_test = args.test_episodes or (200 if args.quick else 600)
    B.set_threads(args.threads)
    if args.against != "loop" and R.available(args.against) is not None:
        raise SystemExit(f"--against {args.against}: {R.available(args.against)}")
    machine = B.machine(args.threads)
    load0 = os.getloadavg()
    print(f"{machine}; os.getloadavg() = {tuple(round(x, 2) for x in load0)}", flush=True)
    t_start = time.perf_counter()

    dm = OmniglotDataModule(n_way=5, k_shot=1, q_queries=args.queries)
    train_fn, test_fn = dm.task_fn("train"), dm.task_fn("test")

    def batch_of(i: int):
        gen = episode_generator(args.seed, TRAIN_STREAM, 0, i)
        return collate_tasks([train_fn(gen) for _ in range(tasks)])

    test = [collate_tasks([test_fn(episode_generator(args.seed, TEST_STREAM, 0, i)) for i in range(s, min(s + 20, n_test))])
            for s in range(0, n_test, 20)]

    torch.manual_seed(args.seed)
    ref = R.native_batchnorm(Conv4(1, 5, hidden=hidden))
    first = batch_of(0)
    mk = lambda: R.Setting("conv", first, 1, 0.4, "ce", None, "")  # noqa: E731
    racers = [Contestant("tasklight `auto`", "tasklight:auto", mk(), ref, args.outer_lr),
              Contestant(R.LABEL[args.against], args.against, mk(), ref, args.outer_lr)]
    before = evaluate(ref, test[:2], 0.4, 1)[0]
    print(f"budget {budget:.0f} s each, Conv4-{hidden}, {tasks} tasks x (5 support + {5 * args.queries} query); "
          f"accuracy before training (first 40 test episodes) {before:.3f}", flush=True)
    for c in racers:  # one warm-up meta-step each (lazy initialisation), not counted and not applied
        c.setting.batch = first
        c.method.step()
    r = 0
    while any(c.seconds < budget for c in racers):
        for c in (racers if r % 2 == 0 else racers[::-1]):
            c.train_for(args.slice, budget, batch_of)
        r += 1
        print(f"  slice {r}: " + ", ".join(f"{c.name} {c.steps} steps / {c.seconds:.0f} s" for c in racers)
              + f" (load {os.getloadavg()[0]:.1f})", flush=True)
    results = []
    for c in racers:
        acc, ci = evaluate(c.method.net, test, 0.4, 1)
        results.append((c, acc, ci))
        print(f"  {c.name}: {c.steps} meta-steps in {c.seconds:.0f} s, test accuracy {acc:.3f} ± {ci:.3f}", flush=True)
    total = time.perf_counter() - t_start
    load1 = os.getloadavg()
    (a, acc_a, ci_a), (o, acc_o, ci_o) = results
    rows = [[c.name, str(c.steps), f"{c.seconds:.0f}", f"{c.steps / c.seconds:.2f}", f"{100 * acc:.1f} ± {100 * ci:.1f}"]
            for c, acc, ci in results]
    table = B.table(["method", "meta-steps in the budget", "training s", "meta-steps / s", "test accuracy % (95 % CI)"],
                    rows)
    overlap = abs(acc_a - acc_o) <= ci_a + ci_o
    summary = (f"SUMMARY race_budget_s={budget:.0f} tasklight_acc={acc_a:.4f} other_acc={acc_o:.4f} "
               f"tasklight_steps={a.steps} other_steps={o.steps}")
    body = f"""## {'Quick run' if args.quick else f'Budget {budget:.0f} s'}{'' if args.against == 'loop' else f' vs {args.against}'}

Command: `{B.command_line()}`
Date: {B.today()}
Machine: {machine}; os.getloadavg() {tuple(round(x, 1) for x in load0)} at the start, {tuple(round(x, 1) for x in load1)}
at the end (2 cores shared with other jobs); total {total:.0f} s.

Setting: Omniglot 5-way 1-shot, {args.queries} queries per class, {tasks} tasks per meta-batch, Conv4-{hidden}
(BatchNorm with batch statistics), second-order MAML, 1 inner SGD step (lr 0.4), Adam {args.outer_lr:g} outer;
{budget:.0f} s of training each in alternating {args.slice:.0f}-second slices; the same seeded meta-batches and initial
weights. Test: {n_test} seeded test episodes (the same for both), 1 adaptation step; accuracy before training
{100 * before:.1f} % (first 40 episodes).

{table}

{'The two CIs overlap: within this budget the accuracies are not distinguishable.' if overlap else
 f"The CIs do not overlap: {(a if acc_a > acc_o else o).name} is ahead after the same training time."}
tasklight ran {a.steps / max(o.steps, 1):.2f}x as many meta-steps as {o.name} in the same time.

```
{summary}
```
"""
    intro = """Omniglot 5-way 1-shot MAML trained for the same wall-clock budget by tasklight (`strategy="auto"`) and by
the per-task autograd loop (or a peer library), from the same weights on the same meta-batches, then tested
on the same episodes. Produced by `scripts/bench_race.py`."""
    section = "quick" if args.quick else f"budget-{budget:.0f}"
    if args.against != "loop":
        section += f"-{args.against}"
    path = B.write_section("omniglot_race", "Omniglot fixed-budget race", intro, section, body,
                           path=B.DOCS / "bench_omniglot_race.md")
    print(f"wrote {path} ({total:.0f} s)")
    print(summary)
    return {"summary": summary}


if __name__ == "__main__":
    main(sys.argv[1:])
