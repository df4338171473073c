"""Meta-learners on Omniglot 5-way and 20-way 1-shot: test accuracy ± 95 % CI over seeded test episodes, side by side.

    python scripts/bench_omniglot.py --quick     # every method, 32-filter Conv4, the same time-capped budget (~20 min)
    python scripts/bench_omniglot.py             # 64-filter Conv4, 3000 meta-steps per method
    python scripts/bench_omniglot.py --methods maml protonet --ways 5

Methods: MAML (second order), first-order MAML, Meta-SGD, iMAML, ANIL (MAML adapting the head only),
BOIL (the body only), MAML++, Reptile, Prototypical Networks and ProtoMAML. Every method gets the same data, the same seed, the
same meta-batch, the same cap on meta-steps and training seconds (``--max-seconds``) and the same
test episodes; each uses its own inner loop (see ``METHODS``; the inner settings are printed in the
results). The paper's number stands beside each row (``PAPER``; "n/r": the paper reports no
Omniglot figure for that setting).

Data: the default ``OmniglotDataModule``: the Omniglot "minimal" background sets (``images_background_small1/2``,
8 alphabets, 242 characters, 20 drawers each, 28x28), characters split 0.7 / 0.1 / 0.2 into
train / val / test (split seed 0), the 90/180/270-degree rotations of the training characters added
as new classes. These are far fewer classes than the papers train on (1,200 of Omniglot's 1,623
characters x 4 rotations; the ``*_gpu.yaml`` configs have those settings), and far fewer meta-steps,
so the accuracies are not the papers'; they compare the methods under one small budget on this machine.

Test: seeded episodes from the held-out characters, accuracy on the query images averaged over
episodes with a 95 % CI (1.96 standard errors over episodes).

Writes its section of ``docs/bench_meta_omniglot.md``; the last line printed is
``SUMMARY omniglot5_acc=<best 5-way> omniglot20_acc=<best 20-way> methods=<count>`` (fractions in [0, 1]).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_meta as B  # noqa: E402

from lightning.pytorch import Trainer, seed_everything  # noqa: E402

from tasklight.data.omniglot import OmniglotDataModule  # noqa: E402
from tasklight.meta import (IMAMLModule, MAMLModule, MAMLPlusPlusModule, ProtoMAMLModule, ProtoNetModule,  # noqa: E402
                            ReptileModule)
from tasklight.nn.nets import Conv4  # noqa: E402

# (5-way, 20-way) 1-shot test accuracy each paper reports; None: no Omniglot figure in that paper
PAPER = {
    "maml": ((0.987, 0.958), "Finn et al. 2017"),
    "fomaml": ((0.983, 0.894), "Finn et al. 2017, first order"),
    "metasgd": ((0.9953, 0.9593), "Li et al. 2017"),
    "imaml": ((0.9916, 0.9446), "Rajeswaran et al. 2019, iMAML-GD"),
    "anil": ((None, 0.962), "Raghu et al. 2020"),
    "boil": ((None, None), "Oh et al. 2021"),
    "mamlpp": ((0.9947, 0.9765), "Antoniou et al. 2019"),
    "reptile": ((0.9768, 0.8943), "Nichol et al. 2018, transductive"),
    "protonet": ((0.988, 0.960), "Snell et al. 2017"),
    "protomaml": ((None, None), "Triantafillou et al. 2020"),
}
NAMES = {"maml": "MAML", "fomaml": "FOMAML", "metasgd": "Meta-SGD", "imaml": "iMAML", "anil": "ANIL", "boil": "BOIL", "mamlpp": "MAML++", "reptile": "Reptile",
         "protonet": "ProtoNet", "protomaml": "ProtoMAML"}


@dataclass
class Method:
    """How one method is built for the benchmark, and the inner loop it is tested with."""

    build: Callable  # (n_way, hidden, outer_lr, max_steps) -> module
    describe: str


def _adam(lr):
    return lambda params: torch.optim.Adam(params, lr=lr)


def _maml(adapt=None, **kw):
    def build(n, h, lr, steps):
        return MAMLModule(Conv4(1, n, hidden=h), loss="cross_entropy", inner_steps=1, inner_lr=0.4,
                          eval_inner_steps=1, adapt=adapt, optimizer=_adam(lr), **kw)
    return build


METHODS = {
    "maml": Method(_maml(), "1 inner step, lr 0.4, second order"),
    "fomaml": Method(_maml(first_order=True), "MAML with the first-order meta-gradient: 1 step, lr 0.4"),
    "metasgd": Method(_maml(learn_inner_lr=True), "MAML with a learned inner lr per parameter entry, "
                      "initialised at 0.4: 1 step, second order"),
    "imaml": Method(lambda n, h, lr, steps: IMAMLModule(
        Conv4(1, n, hidden=h), loss="cross_entropy", inner_steps=5, inner_lr=0.1, lam=2.0, cg_steps=5,
        cg_damping=1.0, eval_inner_steps=5, optimizer=_adam(lr)),
        "5 proximal SGD steps of lr 0.1 (lam 2), implicit meta-gradient by 5 CG steps (Gauss-Newton curvature, "
        "damping 1); 5 test steps"),
    "anil": Method(_maml(["head"]), "MAML adapting the head only: 1 step, lr 0.4"),
    "boil": Method(_maml(["features"]), "MAML adapting the body only (head fixed in the inner loop): 1 step, lr 0.4"),
    "mamlpp": Method(lambda n, h, lr, steps: MAMLPlusPlusModule(
        Conv4(1, n, hidden=h), inner_steps=2, inner_lr=0.2, eval_inner_steps=2, msl_epochs=10, optimizer=_adam(lr)),
        "2 steps, learned per-step lrs from 0.2, per-step BatchNorm, multi-step loss, cosine outer lr"),
    "reptile": Method(lambda n, h, lr, steps: ReptileModule(
        Conv4(1, n, hidden=h), loss="cross_entropy", inner_steps=5, inner_lr=0.1, eval_inner_steps=5,
        optimizer=lambda params: torch.optim.SGD(params, lr=1.0),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=steps)),
        "5 SGD steps of lr 0.1 on support + query, meta step 1 -> 0 linearly; 5 test steps"),
    "protonet": Method(lambda n, h, lr, steps: ProtoNetModule(Conv4(1, 0, hidden=h), optimizer=_adam(lr)),
                       "squared Euclidean distance to the class means; no inner loop"),
    "protomaml": Method(lambda n, h, lr, steps: ProtoMAMLModule(
        Conv4(1, 0, hidden=h), inner_steps=1, inner_lr=0.1, eval_inner_steps=1, optimizer=_adam(lr)),
        "head initialised from the prototypes, 1 step of lr 0.1, second order"),
}


@dataclass
class Run:
    method: str
    n_way: int
    meta_batch: int
    steps: int
    max_seconds: float | None
    test_episodes: int


@dataclass
class Settings:
    hidden: int
    queries: int  # query images per class in training episodes
    test_queries: int  # query images per class in test episodes
    meta_batch: dict  # n_way -> tasks per meta-batch
    steps: int
    max_seconds: float | None
    test_episodes: dict  # n_way -> test episodes


QUICK = Settings(hidden=32, queries=2, test_queries=2, meta_batch={5: 8, 20: 2}, steps=5000, max_seconds=25,
                 test_episodes={5: 300, 20: 150})
FULL = Settings(hidden=64, queries=5, test_queries=15, meta_batch={5: 32, 20: 16}, steps=3000, max_seconds=None,
                test_episodes={5: 600, 20: 600})


def quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def train_and_test(run: Run, s: Settings, args) -> dict:
    seed_everything(args.seed, verbose=False)
    module = METHODS[run.method].build(run.n_way, s.hidden, args.outer_lr, run.steps)
    common = dict(n_way=run.n_way, k_shot=1, val_episodes=1, test_episodes=run.test_episodes, seed=args.seed)
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
    k = module.eval_inner_steps
    return {"run": run, "steps": trainer.global_step, "train_s": train_s, "test_s": test_s,
            "acc": res[f"test/acc@{k}"], "ci": res[f"test/acc@{k}_ci95"], "k": k}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="32-filter Conv4, every method time-capped (~20 min in all)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--steps", type=int, default=None, help="meta-steps per run (default: 5000 capped by time with "
                   "--quick, 3000 otherwise)")
    p.add_argument("--max-seconds", type=float, default=None, help="training-time cap per run (25 with --quick)")
    p.add_argument("--hidden", type=int, default=None, help="Conv4 filters (default 32 quick, 64)")
    p.add_argument("--meta-batch-5", type=int, default=None, help="tasks per meta-batch, 5-way (8 quick, 32)")
    p.add_argument("--meta-batch-20", type=int, default=None, help="tasks per meta-batch, 20-way (2 quick, 16)")
    p.add_argument("--queries", type=int, default=None, help="query images per class in training episodes")
    p.add_argument("--test-queries", type=int, default=None, help="query images per class in test episodes")
    p.add_argument("--ways", type=int, nargs="+", default=[5, 20], choices=[5, 20])
    p.add_argument("--outer-lr", type=float, default=1e-3, help="Adam lr of the methods with an Adam outer step")
    p.add_argument("--test-episodes", type=int, default=None, help="test episodes (quick: 300 5-way, 150 20-way; 600 otherwise)")
    p.add_argument("--eval-batch", type=int, default=5,
                   help="test episodes per evaluation batch (small batches are faster on CPU: less memory traffic)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    quiet_lightning()
    B.set_threads(args.threads)
    machine = B.machine(args.threads)
    s = QUICK if args.quick else FULL
    s = replace(s, hidden=args.hidden or s.hidden, queries=args.queries or s.queries,
                test_queries=args.test_queries or s.test_queries, steps=args.steps or s.steps,
                max_seconds=args.max_seconds if args.max_seconds is not None else s.max_seconds,
                meta_batch={5: args.meta_batch_5 or s.meta_batch[5], 20: args.meta_batch_20 or s.meta_batch[20]},
                test_episodes={w: args.test_episodes or s.test_episodes[w] for w in (5, 20)})
    runs = [Run(m, w, s.meta_batch[w], s.steps, s.max_seconds, s.test_episodes[w])
            for w in args.ways for m in args.methods]
    print(machine, flush=True)
    t_start = time.perf_counter()
    OmniglotDataModule().prepare_data()  # build the image cache once, outside the timed runs

    outs = []
    for run in runs:
        print(f"{NAMES[run.method]} {run.n_way}-way 1-shot: meta-batch {run.meta_batch}, up to {run.steps} meta-steps"
              + (f" / {run.max_seconds:.0f} s" if run.max_seconds else ""), flush=True)
        out = train_and_test(run, s, args)
        outs.append(out)
        print(f"  {out['steps']} meta-steps in {out['train_s']:.0f} s, test {out['test_s']:.0f} s: "
              f"acc@{out['k']} {100 * out['acc']:.1f} ± {100 * out['ci']:.1f} %", flush=True)

    def paper(method, n_way):
        value = PAPER[method][0][0 if n_way == 5 else 1]
        return f"{100 * value:.2f}" if value is not None else "n/r"

    rows = [[NAMES[o["run"].method], f"{o['run'].n_way}-way", str(o["run"].meta_batch), f"{o['steps']:,}",
             f"{o['train_s']:.0f}", f"{1000 * o['train_s'] / max(o['steps'], 1):.0f}", f"{o['test_s']:.0f}",
             str(o["k"]), f"{100 * o['acc']:.1f} ± {100 * o['ci']:.1f}", paper(o["run"].method, o["run"].n_way),
             PAPER[o["run"].method][1]] for o in outs]
    header = ["method", "task (1-shot)", "meta-batch", "meta-steps", "train s", "ms / step", "test s", "test steps",
              "test acc % ± 95% CI", "paper %", "paper"]
    tab = B.table(header, rows)
    print(tab)
    best = {w: max((o["acc"] for o in outs if o["run"].n_way == w), default=float("nan")) for w in (5, 20)}
    best_name = {w: next((NAMES[o["run"].method] for o in outs if o["run"].n_way == w and o["acc"] == best[w]), "-")
                 for w in (5, 20)}
    total = time.perf_counter() - t_start
    n_methods = len({o["run"].method for o in outs})
    summary = (f"SUMMARY omniglot5_acc={best[5]:.4f} omniglot20_acc={best[20]:.4f} methods={n_methods}")
    capped = sorted({f"{NAMES[o['run'].method]} {o['run'].n_way}-way" for o in outs
                     if o["run"].max_seconds and o["steps"] < o["run"].steps})
    probe = OmniglotDataModule()
    probe.setup()
    n_train = len(probe.splits["train"])
    settings = "\n".join(f"- {NAMES[m]}: {METHODS[m].describe}." for m in args.methods)
    budget = (f"at most {s.steps:,} meta-steps and {s.max_seconds:.0f} s of training per run" if s.max_seconds
              else f"{s.steps:,} meta-steps per run")
    body = f"""## {'Quick run' if args.quick else 'Default run'}

Command: `{B.command_line()}`
Date: {B.today()}
Machine: {machine}; total {total:.0f} s (image cache built beforehand). The cores are shared with other
jobs, so a time-capped run reaches fewer meta-steps under load; the meta-steps column says what ran.

Budget, the same for every method: Conv4 with {s.hidden} filters, {budget}, meta-batch
{s.meta_batch[5]} (5-way) / {s.meta_batch[20]} (20-way), seed {args.seed}, Adam {args.outer_lr} for the methods with an
Adam outer step; training episodes 1 support + {s.queries} query images per class; test episodes
({s.test_episodes[5]} 5-way, {s.test_episodes[20]} 20-way) of 1 support + {s.test_queries} query images per class from the
held-out characters, the same episodes for every method. The inner loops:

{settings}
{'The time cap stopped the training of: ' + '; '.join(capped) + '.' if capped else ''}

{tab}

Best: {best_name[5]} (5-way), {best_name[20]} (20-way). The papers' numbers come from 1,200 training characters
(x 4 rotations), 64 filters and tens of thousands of meta-steps on a GPU (the `*_gpu.yaml` configs,
docs/meta_methods.md); this is the small background set ({n_train} training characters x 4 rotations) with
{s.hidden} filters and a few minutes of shared CPU per method, so the table ranks the methods under a
small equal budget; it does not reproduce the papers. "n/r": the paper reports no Omniglot figure
for that setting.

```
{summary}
```
"""
    intro = """Meta-learners on Omniglot 5-way and 20-way 1-shot with the default `OmniglotDataModule` (small background
sets, characters split 0.7/0.1/0.2, rotation augmentation): test accuracy with 95 % CIs over seeded test
episodes, the wall time it took, and each paper's number beside it. Produced by `scripts/bench_omniglot.py`."""
    path = B.write_section("omniglot", "Meta-learners on Omniglot", intro, "quick" if args.quick else "default", body)
    print(f"wrote {path} ({total:.0f} s)")
    print(summary)
    return best


if __name__ == "__main__":
    main(sys.argv[1:])
