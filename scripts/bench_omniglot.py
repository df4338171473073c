"""MAML on Omniglot 5-way 1-shot and 20-way 1-shot: test accuracy ± 95 % CI over 600 episodes, and wall time.

    python scripts/bench_omniglot.py --quick     # both tasks, small Conv4, time-capped training (< 5 min total)
    python scripts/bench_omniglot.py             # 64-filter Conv4, longer training, first order for 20-way too

Data: the default ``OmniglotDataModule``: the Omniglot "minimal" background sets (``images_background_small1/2``,
8 alphabets, 242 characters, 20 drawers each, 28x28), characters split 0.7 / 0.1 / 0.2 into
train / val / test (split seed 0), the 90/180/270-degree rotations of the training characters added
as new classes. These are far fewer classes than the paper trains on (1,200 of Omniglot's 1,623
characters x 4 rotations), and far fewer meta-steps, so the accuracies are not the paper's (MAML:
98.7 % 5-way 1-shot, 95.8 % 20-way 1-shot); they show what the framework reaches on this machine in
the given time.

Model: Conv4 (3x3 conv, BatchNorm with batch statistics, ReLU, 2x2 max-pool; x4) and a linear head;
MAML with one inner SGD step of lr 0.4 (the paper's 5-way Omniglot setting; its 20-way runs take 5 steps
of lr 0.1: ``--inner-steps 5 --inner-lr 0.1``), second order, Adam 1e-3;
for 20-way also first order (FOMAML) in the default run (``--first-order`` adds it to ``--quick``).
Test: 600 seeded episodes from the test characters, adapted with the training step size, accuracy
on the query images averaged over episodes with a 95 % CI (1.96 standard errors over episodes).

Writes its section of ``docs/bench_meta_omniglot.md``; the last line printed is
``SUMMARY omniglot5_acc=<a> omniglot20_acc=<b>`` (second-order MAML, fractions in [0, 1]).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_meta as B  # noqa: E402

from lightning.pytorch import Trainer, seed_everything  # noqa: E402

from tasklight.data.omniglot import OmniglotDataModule  # noqa: E402
from tasklight.meta.maml import MAMLModule  # noqa: E402
from tasklight.nn.nets import Conv4  # noqa: E402

PAPER = {5: 0.987, 20: 0.958}


@dataclass
class Run:
    n_way: int
    first_order: bool
    meta_batch: int
    steps: int
    max_seconds: float | None


@dataclass
class Settings:
    hidden: int
    queries: int  # query images per class in training episodes
    test_queries: int  # query images per class in test episodes
    runs: list[Run]


QUICK = Settings(hidden=32, queries=2, test_queries=2, runs=[
    Run(5, False, meta_batch=8, steps=5000, max_seconds=80),
    Run(20, False, meta_batch=2, steps=5000, max_seconds=90)])
FULL = Settings(hidden=64, queries=5, test_queries=15, runs=[
    Run(5, False, meta_batch=32, steps=3000, max_seconds=None),
    Run(20, False, meta_batch=16, steps=3000, max_seconds=None),
    Run(20, True, meta_batch=16, steps=3000, max_seconds=None)])


def quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def train_and_test(run: Run, s: Settings, args) -> dict:
    seed_everything(args.seed, verbose=False)
    net = Conv4(1, out_features=run.n_way, hidden=s.hidden)
    module = MAMLModule(net, loss="cross_entropy", inner_steps=args.inner_steps, inner_lr=args.inner_lr,
                        first_order=run.first_order, eval_inner_steps=args.inner_steps,
                        extra_eval_steps=tuple(args.extra_eval_steps),
                        optimizer=lambda params: torch.optim.Adam(params, lr=args.outer_lr))
    common = dict(n_way=run.n_way, k_shot=1, val_episodes=1, test_episodes=args.test_episodes, seed=args.seed)
    train_dm = OmniglotDataModule(q_queries=s.queries, meta_batch_size=run.meta_batch, batches_per_epoch=1000,
                                  **common)
    test_dm = OmniglotDataModule(q_queries=s.test_queries, meta_batch_size=run.meta_batch, batches_per_epoch=1,
                                 eval_batch_size=args.eval_batch, **common)
    trainer = Trainer(max_steps=run.steps,
                      max_time=None if run.max_seconds is None else {"seconds": run.max_seconds},
                      logger=False, enable_checkpointing=False, limit_val_batches=0, inference_mode=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="auto", devices=1)
    t0 = time.perf_counter()
    trainer.fit(module, train_dm)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = trainer.test(module, datamodule=test_dm, verbose=False)[0]
    test_s = time.perf_counter() - t0
    return {"run": run, "steps": trainer.global_step, "train_s": train_s, "test_s": test_s, "res": res}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="32-filter Conv4, time-capped training (< 5 min in total)")
    p.add_argument("--steps", type=int, default=None, help="meta-steps per run (default: 5000 capped by time with "
                   "--quick, 3000 otherwise)")
    p.add_argument("--max-seconds", type=float, default=None, help="training-time cap per run")
    p.add_argument("--hidden", type=int, default=None, help="Conv4 filters (default 32 quick, 64)")
    p.add_argument("--meta-batch-5", type=int, default=None, help="tasks per meta-batch, 5-way (8 quick, 32)")
    p.add_argument("--meta-batch-20", type=int, default=None, help="tasks per meta-batch, 20-way (4 quick, 16)")
    p.add_argument("--queries", type=int, default=None, help="query images per class in training episodes")
    p.add_argument("--test-queries", type=int, default=None, help="query images per class in test episodes")
    p.add_argument("--first-order", action="store_true", help="also run first-order MAML for 20-way with --quick")
    p.add_argument("--ways", type=int, nargs="+", default=[5, 20], choices=[5, 20])
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--inner-lr", type=float, default=0.4)
    p.add_argument("--outer-lr", type=float, default=1e-3)
    p.add_argument("--extra-eval-steps", type=int, nargs="*", default=[], help="also evaluate after these steps")
    p.add_argument("--test-episodes", type=int, default=600)
    p.add_argument("--eval-batch", type=int, default=5,
                   help="test episodes per evaluation batch (small batches are faster on CPU: less memory traffic)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    quiet_lightning()
    B.set_threads(args.threads)
    machine = B.machine(args.threads)
    s = QUICK if args.quick else FULL
    runs = list(s.runs)
    if args.quick and args.first_order:
        runs.append(replace(runs[-1], first_order=True))
    s = replace(s, hidden=args.hidden or s.hidden, queries=args.queries or s.queries,
                test_queries=args.test_queries or s.test_queries)
    mb = {5: args.meta_batch_5, 20: args.meta_batch_20}
    runs = [replace(r, meta_batch=mb[r.n_way] or r.meta_batch, steps=args.steps or r.steps,
                    max_seconds=args.max_seconds if args.max_seconds is not None else r.max_seconds)
            for r in runs if r.n_way in args.ways]
    print(machine, flush=True)
    t_start = time.perf_counter()
    OmniglotDataModule().prepare_data()  # build the image cache once, outside the timed runs

    outs = []
    for run in runs:
        name = f"{run.n_way}-way 1-shot, {'first' if run.first_order else 'second'} order"
        print(f"{name}: meta-batch {run.meta_batch}, up to {run.steps} meta-steps"
              + (f" / {run.max_seconds:.0f} s" if run.max_seconds else ""), flush=True)
        out = train_and_test(run, s, args)
        out["name"] = name
        outs.append(out)
        k = args.inner_steps
        r = out["res"]
        print(f"  {out['steps']} meta-steps in {out['train_s']:.0f} s, test {out['test_s']:.0f} s: "
              f"acc@{k} {100 * r[f'test/acc@{k}']:.1f} ± {100 * r[f'test/acc@{k}_ci95']:.1f} %", flush=True)

    k = args.inner_steps
    eval_steps = [k, *[e for e in args.extra_eval_steps if e != k]]
    rows = []
    for o in outs:
        r, run = o["res"], o["run"]
        accs = [f"{100 * r[f'test/acc@{e}']:.1f} ± {100 * r[f'test/acc@{e}_ci95']:.1f}" for e in eval_steps]
        rows.append([o["name"], str(run.meta_batch), f"{o['steps']:,}", f"{o['train_s']:.0f}",
                     f"{1000 * o['train_s'] / max(o['steps'], 1):.0f}", f"{o['test_s']:.0f}", *accs,
                     f"{100 * PAPER[run.n_way]:.1f}"])
    header = ["task, MAML", "meta-batch", "meta-steps", "train s", "ms / step", "test s",
              *[f"test acc % @{e} step{'s' if e != 1 else ''} ± 95% CI" for e in eval_steps],
              "Finn et al. 2017 %"]
    tab = B.table(header, rows)
    print(tab)
    so = {o["run"].n_way: o["res"][f"test/acc@{k}"] for o in outs if not o["run"].first_order}
    total = time.perf_counter() - t_start
    summary = (f"SUMMARY omniglot5_acc={so.get(5, float('nan')):.4f} "
               f"omniglot20_acc={so.get(20, float('nan')):.4f}")
    capped = [o["name"] for o in outs if o["run"].max_seconds and o["steps"] < o["run"].steps]
    probe = OmniglotDataModule()
    probe.setup()
    n_train = len(probe.splits["train"])
    body = f"""## {'Quick run' if args.quick else 'Default run'}

Command: `{B.command_line()}`
Date: {B.today()}
Machine: {machine}; total {total:.0f} s (image cache built beforehand).

Setting: Conv4 with {s.hidden} filters, {args.inner_steps} inner SGD step(s) of lr {args.inner_lr} (train and test), Adam
{args.outer_lr}; training episodes 1 support + {s.queries} query images per class; {args.test_episodes} test episodes of
1 support + {s.test_queries} query images per class from the held-out characters.
{'The time cap stopped the training of: ' + '; '.join(capped) + ' (the meta-steps column is what ran).' if capped else ''}

{tab}

The paper's numbers come from 1,200 training characters (x 4 rotations), 64 filters, 60,000 meta-steps
of 32 (5-way) or 16 (20-way) tasks on a GPU, and 5 inner steps of lr 0.1 for 20-way; this is the small
background set ({n_train} training characters x 4 rotations) with {s.hidden} filters on shared CPU cores, so
the comparison shows the gap, not a reproduction.

```
{summary}
```
"""
    intro = """MAML on Omniglot 5-way and 20-way 1-shot with the default `OmniglotDataModule` (small background sets,
characters split 0.7/0.1/0.2, rotation augmentation): test accuracy over 600 episodes and the wall time it
took. Produced by `scripts/bench_omniglot.py`."""
    path = B.write_section("omniglot", "MAML on Omniglot", intro, "quick" if args.quick else "default", body)
    print(f"wrote {path} ({total:.0f} s)")
    print(summary)
    return so


if __name__ == "__main__":
    main(sys.argv[1:])
