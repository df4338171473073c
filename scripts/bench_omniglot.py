"""Meta-learners on Omniglot 5-way 1-shot under the pre-registered protocol
``benchmarks/protocols/omniglot_meta.yaml``: test accuracy, mean and 95 % t interval over seeds, side by
side, with each paper's figure beside it.

    python scripts/bench_omniglot.py             # the protocol: 10 methods x 3 seeds (one process each), 60 meta-steps
    python scripts/bench_omniglot.py --quick     # smoke run: 2 methods, 1 seed, 5 meta-steps (not a result)

Methods: MAML (second order), first-order MAML, Meta-SGD, iMAML, ANIL (MAML adapting the head only),
BOIL (the body only), MAML++, Reptile, Prototypical Networks and ProtoMAML. Every method gets the same
data, seed, meta-batch, number of meta-steps and test episodes; each uses its own inner loop (see
``METHODS``; the inner settings are printed in the results), with its schedules set for that number of
meta-steps. The paper's number stands beside each row (``PAPER``, from DESIGN.md's reference results;
"n/r": the paper reports no Omniglot figure for that setting).

Data: the Omniglot "minimal" background sets shipped with tasklight (8 alphabets, 242 characters, 20
drawers each, 28x28), split by whole alphabets (``OmniglotDataModule(split="alphabet")``): the protocol's
test alphabets, its validation alphabet, and the rest for training with the 90/180/270-degree rotations
of the training characters as new classes. An alphabet that occurs in both zips (Greek, Latin) is one
alphabet and goes to one side only. These are far fewer classes and meta-steps than the papers train
on, so the accuracies are not the papers'; the table compares the methods under one small equal budget.

Writes its section of ``docs/bench_meta_omniglot.md``; the last line printed is
``SUMMARY ways=5 <method>=<mean test accuracy> ... ci95_max=<largest interval> seeds=<n> protocol=<hash>``.
"""
from __future__ import annotations

import argparse
import logging
import re
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from lightning.pytorch import Trainer, seed_everything

import _bench_meta as B
from tasklight.data.omniglot import OmniglotDataModule
from tasklight.meta import IMAMLModule, MAMLModule, MAMLPlusPlusModule, ProtoMAMLModule, ProtoNetModule, ReptileModule
from tasklight.nn.nets import Conv4
from tasklight.protocol import holm, load_protocol, paired

PROTOCOL = Path(__file__).resolve().parents[1] / "benchmarks" / "protocols" / "omniglot_meta.yaml"

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


# the training episodes come in EPOCHS epochs per run, so that MAML++'s multi-step-loss annealing
# (MSL_EPOCHS epochs) covers the first half of any number of meta-steps
EPOCHS, MSL_EPOCHS = 20, 10


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
        Conv4(1, n, hidden=h), inner_steps=2, inner_lr=0.2, eval_inner_steps=2, msl_epochs=MSL_EPOCHS,
        optimizer=_adam(lr)),
        "2 steps, learned per-step lrs from 0.2, per-step BatchNorm, multi-step loss annealed over the first half "
        "of the run, cosine outer lr over the run"),
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


def quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def datamodule(proto, seed: int, split: str, meta_batch: int, steps: int) -> OmniglotDataModule:
    """The seed's episodes on the protocol's alphabet split: training episodes (``split="train"``) in
    ``EPOCHS`` epochs of the run's meta-steps, or the test episodes (the same for every method of a seed)."""
    b, t, sp = proto.budget, proto.extra["test"], proto.extra["split"]
    common = dict(n_way=int(b["ways"]), k_shot=int(b["shots"]), val_episodes=1, test_episodes=int(t["episodes"]),
                  seed=seed, split="alphabet", val_alphabets=list(sp["val_alphabets"]),
                  test_alphabets=list(sp["test_alphabets"]))
    if split == "train":
        return OmniglotDataModule(q_queries=int(b["queries"]), meta_batch_size=meta_batch,
                                  batches_per_epoch=max(steps // EPOCHS, 1), **common)
    return OmniglotDataModule(q_queries=int(t["queries"]), meta_batch_size=meta_batch, batches_per_epoch=1,
                              eval_batch_size=5, **common)


def train_and_test(method: str, proto, seed: int, steps: int) -> dict:
    b = proto.budget
    seed_everything(seed, verbose=False)
    module = METHODS[method].build(int(b["ways"]), int(b["hidden"]), float(b["outer_lr"]), steps)
    train_dm = datamodule(proto, seed, "train", int(b["meta_batch"]), steps)
    test_dm = datamodule(proto, seed, "test", int(b["meta_batch"]), steps)
    trainer = Trainer(max_steps=steps, logger=False, enable_checkpointing=False, limit_val_batches=0,
                      inference_mode=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", devices=1)
    t0 = time.process_time()
    trainer.fit(module, train_dm)
    train_s = time.process_time() - t0
    res = trainer.test(module, datamodule=test_dm, verbose=False)[0]
    k = module.eval_inner_steps
    return {"steps": trainer.global_step, "train_cpu_s": train_s, "acc": res[f"test/acc@{k}"], "k": k}


def run_seed(protocol: str, seed: int, methods: list[str], steps: int, threads: int) -> dict:
    """Every method on one seed (one process per seed with ``--jobs``; the results do not depend on it)."""
    quiet_lightning()
    B.set_threads(threads)
    proto = load_protocol(protocol)
    outs = {}
    for m in methods:
        out = train_and_test(m, proto, seed, steps)
        if out["steps"] != steps:
            raise RuntimeError(f"{NAMES[m]} ran {out['steps']} meta-steps, not the protocol's {steps}")
        outs[m] = out
        print(f"seed {seed} {NAMES[m]:9s} {steps} meta-steps in {out['train_cpu_s']:.0f} CPU s: "
              f"acc@{out['k']} {100 * out['acc']:.1f} %", flush=True)
    return outs


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: MAML and ProtoNet, 1 seed, 5 meta-steps")
    p.add_argument("--protocol", default=str(PROTOCOL))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=3, help="seeds run in this many processes at once (the results do "
                   "not depend on it)")
    args = p.parse_args(argv)
    quiet_lightning()
    B.set_threads(args.threads)
    machine = B.machine(args.threads)
    proto = load_protocol(args.protocol)
    unknown = sorted(set(proto.arms) - set(METHODS))
    if unknown:
        raise ValueError(f"{proto.path.name}: arms {unknown} are not methods of this script ({list(METHODS)})")
    methods, seeds, steps = list(proto.arms), list(proto.test_seeds), int(proto.budget["meta_steps"])
    if args.quick:
        methods, seeds, steps = [m for m in ("maml", "protonet") if m in methods], seeds[:1], 5
    print(machine, flush=True)
    t_start = time.perf_counter()
    OmniglotDataModule().prepare_data()  # build the image cache once, outside the runs
    if args.jobs > 1 and len(seeds) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(args.jobs, len(seeds)), mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(run_seed, str(proto.path), s, methods, steps, args.threads) for s in seeds]
            per_seed = [f.result() for f in futures]
    else:
        per_seed = [run_seed(str(proto.path), s, methods, steps, args.threads) for s in seeds]
    acc = {m: [r[m]["acc"] for r in per_seed] for m in methods}
    cpu = {m: [r[m]["train_cpu_s"] for r in per_seed] for m in methods}
    k_test = {m: per_seed[0][m]["k"] for m in methods}
    total = time.perf_counter() - t_start
    stats = {m: paired(acc[m], [0.0] * len(acc[m])) for m in methods}
    ref = "maml" if "maml" in methods else methods[0]
    diffs = {m: paired(acc[m], acc[ref]) for m in methods if m != ref}
    p_holm = holm({m: d["p"] for m, d in diffs.items()})
    ways = int(proto.budget["ways"])

    def pct(d, key="mean"):
        v = d[key]
        return "n/a" if v != v else f"{100 * v:.1f}"

    def paper(m):
        value = PAPER[m][0][0 if ways == 5 else 1]
        return f"{100 * value:.2f}" if value is not None else "n/r"

    rows = [[NAMES[m], str(k_test[m]), f"{pct(stats[m])} ± {pct(stats[m], 'ci95')}",
             "" if m == ref else f"{100 * diffs[m]['mean']:+.1f} ± {pct(diffs[m], 'ci95')}",
             "" if m == ref else f"{p_holm[m]:.3f}", f"{statistics.fmean(cpu[m]):.0f}", paper(m), PAPER[m][1]]
            for m in methods]
    header = ["method", "test steps", "test acc %, mean ± 95 % CI", f"minus {NAMES[ref]} (paired)", "Holm p",
              "train CPU s / run", "paper %", "paper"]
    tab = B.table(header, rows)
    print(tab)
    ci_max = max(stats[m]["ci95"] for m in methods)
    summary = ("SUMMARY ways=5 " + " ".join(f"{m}={stats[m]['mean']:.4f}" for m in methods)
               + f" ci95_max={ci_max:.4f} methods={len(methods)} seeds={len(seeds)} protocol={proto.hash}")
    if args.quick:
        print(summary.replace("SUMMARY", "SMOKE"))
        return stats
    probe = datamodule(proto, seeds[0], "test", 1, steps)
    probe.setup()
    n_chars = {k: len(v) for k, v in probe.splits.items()}
    settings = "\n".join(f"- {NAMES[m]}: {METHODS[m].describe}." for m in methods)
    b, sp = proto.budget, proto.extra["split"]
    body = f"""## Default run

Command: `{B.command_line()}`
Date: {B.today()}
Machine: {machine}; total {total:.0f} s wall (image cache built beforehand); training time below is process
CPU time.

{chr(10).join(proto.describe())}
Budget, the same for every method: Conv4 with {b['hidden']} filters, {steps} meta-steps, meta-batch
{b['meta_batch']} tasks of {ways}-way {b['shots']}-shot with {b['queries']} query images per class, Adam
{b['outer_lr']} for the methods with an Adam outer step. Alphabet split: test {', '.join(sp['test_alphabets'])}
({n_chars['test']} characters), validation {', '.join(sp['val_alphabets'])} (unused), training the other
alphabets ({n_chars['train']} characters x 4 rotations); no alphabet on two sides. Test: {proto.extra['test']['episodes']}
episodes per seed of 1 support + {proto.extra['test']['queries']} query images per class from the test alphabets,
the same episodes for every method of a seed. Mean ± 95 % t interval over seeds {seeds}; the paired
difference to {NAMES[ref]} with its t interval, p-values Holm-adjusted over {len(diffs)} comparisons. The
inner loops:

{settings}

{tab}

The papers' numbers come from 1,200 training characters (x 4 rotations), 64 filters and tens of thousands
of meta-steps on a GPU, with test characters from other alphabets of the full background/evaluation
sets (the `*_gpu.yaml` configs, docs/meta_methods.md); this is the small background set with {b['hidden']}
filters and {steps} meta-steps per method on shared CPU cores, so the table compares the methods under one
small equal budget; it does not reproduce the papers. "n/r": the paper reports no Omniglot figure for
that setting.

```
{summary}
```
"""
    intro = """Meta-learners on Omniglot 5-way 1-shot with test alphabets disjoint from the training alphabets:
test accuracy, mean and 95 % t interval over seeds, each paper's number beside it. Produced by
`scripts/bench_omniglot.py` under `benchmarks/protocols/omniglot_meta.yaml`."""
    path = B.write_section("omniglot", "Meta-learners on Omniglot", intro, "default", body)
    for stale in ("quick",):  # results of the earlier, unprotocolled design
        text = path.read_text()
        text = re.sub(rf"\n*<!-- section: {stale} -->.*?<!-- end section: {stale} -->", "", text, flags=re.S)
        path.write_text(text)
    print(f"wrote {path} ({total:.0f} s)")
    print(summary)
    return stats


if __name__ == "__main__":
    main(sys.argv[1:])
