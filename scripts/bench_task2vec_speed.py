"""Speed of the Task2Vec Monte-Carlo Fisher against the reference implementation, in the same run.

The reference is the authors' code (awslabs/aws-cv-task2vec, ``Task2Vec.montecarlo_fisher``), read
from a checkout outside the package (``--reference PATH``, a directory holding its ``task2vec.py``,
default ``$TASK2VEC_REFERENCE`` or ``/tmp/aws-cv-task2vec``, e.g. made by
``git clone https://github.com/awslabs/aws-cv-task2vec /tmp/aws-cv-task2vec``; it needs ``tqdm``); it
is run, never copied. Protocol, fixed before the runs:

* probe: a Conv4 (width 32, 28x28, BatchNorm with fixed statistics set on the data, eval mode, so
  that examples are independent) with a linear head for the task's classes; data: the first
  ``--examples`` training images of one shipped Omniglot alphabet (Greek), their labels;
* reference arm: ``montecarlo_fisher`` with batches of ONE example (its squared batch gradient is then
  the per-example squared gradient of the Monte-Carlo Fisher; with larger batches it squares the
  batch mean, another quantity), one epoch over ``--examples`` draws of its sampler; the inputs and
  the labels it samples are recorded;
* tasklight arm: :func:`tasklight.task2vec.fisher_diagonal` (per-example gradients by
  ``torch.func.vmap(grad)``, 64 examples per call) on the recorded inputs with the recorded labels
  (``labels=``), so that both compute the same estimate from the same draws;
* a third arm: tasklight with ``engine="vmap"`` (``torch.func.grad`` vmapped over examples, the
  previous implementation) on the same draws;
* one untimed warm-up round of every arm first (one-time costs: kernel selection, lazy initialisation),
  then the arms alternate, round after round (``--rounds``), 1 thread; speed-up = reference time / ours per
  round, mean with a 95 % Student-t interval over rounds; ``fisher_rel_diff`` = the largest
  ``max |F_ours - F_ref| / max |F_ref|`` over the conv and linear weights and both tasklight engines;
  ``torch.profiler`` tables of one call of each side say where its time goes.

Without the reference (no ``--reference`` and no checkout found) the reference arm is tasklight's own
per-example loop (``autograd.grad`` example by example), and the SUMMARY line says so.

    python scripts/bench_task2vec_speed.py --quick

Ends with ``SUMMARY fisher_speedup=<s> ci95=<c> fisher_rel_diff=<d> reference=<name>``.
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

from tasklight.data.multitask import OmniglotAlphabetsDataModule  # noqa: E402
from tasklight.nn.nets import Conv4  # noqa: E402
from tasklight.task2vec import fisher_diagonal  # noqa: E402
from tasklight.task2vec.probe import set_batchnorm_stats  # noqa: E402

OUT = "docs/bench_task2vec_speed.md"
DEFAULT_REFERENCE = Path(os.environ.get("TASK2VEC_REFERENCE", "/tmp/aws-cv-task2vec"))


def probe_and_data(examples: int):
    torch.manual_seed(0)
    dm = OmniglotAlphabetsDataModule(batch_size_per_task=8, steps_per_epoch=1)
    dm.setup()
    t = dm.task_names.index("Greek") if "Greek" in getattr(dm, "task_names", []) else 0
    ds = dm.train_sets[t]
    n = min(examples, len(ds))
    xs, ys = zip(*(ds[i] for i in range(n)))
    x, y = torch.stack(xs), torch.as_tensor(ys)
    model = Conv4(out_features=int(y.max()) + 1, hidden=32, track_running_stats=True)
    set_batchnorm_stats(model, x, batch_size=64)
    model.eval()
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return model, x, y, [f"{n}.weight" for n in names]


def load_reference(path: Path):
    if not (path / "task2vec.py").exists():
        return None
    sys.path.insert(0, str(path))
    import task2vec as ref  # the authors' module, from the checkout

    return ref


def reference_arm(ref, model, x, y, seed: int):
    """The reference's montecarlo_fisher, one example per batch; returns (Fisher, inputs, labels)."""
    seen_x, seen_y = [], []

    class Probe(ref.ProbeNetwork):
        def __init__(self):
            super().__init__()
            self.net = model
            self.layers = [model]

        @property
        def classifier(self):
            return self.net.head

        @classifier.setter
        def classifier(self, val):
            self.net.head = val

        def train(self, mode=True):  # keep BatchNorm's fixed statistics, as the estimator needs
            return super().train(False)

        def forward(self, data, start_from=0):
            seen_x.append(data)
            return self.net(data)

    class RecordingLoss(nn.CrossEntropyLoss):
        def forward(self, output, target):
            seen_y.append(target)
            return super().forward(output, target)

    torch.manual_seed(seed)
    t2v = ref.Task2Vec(Probe(), loader_opts={"batch_size": 1, "num_samples": len(x), "num_workers": 0})
    t2v.loss_fn = RecordingLoss()
    t2v.montecarlo_fisher(torch.utils.data.TensorDataset(x, y))
    fisher = {n: p.grad2_acc.clone() for n, p in model.named_parameters() if hasattr(p, "grad2_acc")}
    for p in model.parameters():
        for attr in ("grad2_acc", "grad_counter"):
            if hasattr(p, attr):
                delattr(p, attr)
        p.grad = None
    return fisher, torch.cat(seen_x), torch.cat(seen_y)


def loop_arm(model, x, labels, names):
    """tasklight's per-example loop, the stand-in reference when the authors' code is absent."""
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(params[n]) for n in names}
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i: i + 1]), labels[i: i + 1])
        for n, g in zip(names, torch.autograd.grad(loss, [params[n] for n in names])):
            acc[n] += g.detach() ** 2
    return {n: a / len(x) for n, a in acc.items()}


def main(argv=None) -> None:
    p = _bench.parser(__doc__, OUT)
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 5 quick, 10 full)")
    p.add_argument("--examples", type=int, default=None, help="examples per Fisher (default 128 quick, 512 full)")
    p.add_argument("--reference", default=str(DEFAULT_REFERENCE),
                   help="directory of an aws-cv-task2vec checkout (its task2vec.py); absent: our own loop")
    args = p.parse_args(argv)
    _bench.setup(args)
    rounds = args.rounds or (5 if args.quick else 10)
    model, x, y, names = probe_and_data(args.examples or (128 if args.quick else 512))
    ref = load_reference(Path(args.reference))
    ref_name = "aws-cv-task2vec" if ref is not None else "tasklight-per-example-loop"
    load0 = os.getloadavg()[0]
    start = time.perf_counter()

    def reference_round(r):
        if ref is not None:
            return reference_arm(ref, model, x, y, seed=r)
        gen = torch.Generator().manual_seed(r)
        with torch.no_grad():
            labels = torch.multinomial(F.softmax(model(x), -1), 1, generator=gen).reshape(-1)
        return loop_arm(model, x, labels, names), x, labels

    _, xs, labels = reference_round(rounds)  # warm-up, untimed (a seed the timed rounds do not use)
    fisher_diagonal(model, xs, names, labels=labels)
    fisher_diagonal(model, xs, names, labels=labels, engine="vmap")
    ratios, vmap_ratios, t_ref, t_ours, t_vmap, diffs = [], [], [], [], [], []
    for r in range(rounds):
        t0 = time.perf_counter()
        f_ref, xs, labels = reference_round(r)
        t1 = time.perf_counter()
        ours = fisher_diagonal(model, xs, names, labels=labels)
        t2 = time.perf_counter()
        by_vmap = fisher_diagonal(model, xs, names, labels=labels, engine="vmap")
        t3 = time.perf_counter()
        t_ref.append(t1 - t0)
        t_ours.append(t2 - t1)
        t_vmap.append(t3 - t2)
        ratios.append((t1 - t0) / (t2 - t1))
        vmap_ratios.append((t3 - t2) / (t2 - t1))
        diffs.append(max(float((by_vmap[n] - f_ref[n]).abs().max() / f_ref[n].abs().max()) for n in names))
        diffs.append(max(float((ours[n] - f_ref[n]).abs().max() / f_ref[n].abs().max()) for n in names))
        print(f"round {r + 1}/{rounds}: reference {t1 - t0:.2f} s, tasklight {t2 - t1:.3f} s, "
              f"speed-up {ratios[-1]:.1f}x, rel. diff {diffs[-1]:.1e}", flush=True)
    total = time.perf_counter() - start
    from scipy import stats
    from torch.profiler import ProfilerActivity, profile

    def top_ops(fn):
        """(wall s, share of the wall time in torch operators, [(operator, share of that time)])."""
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            fn()
            wall = time.perf_counter() - t
        events = prof.key_averages()
        spent = sum(e.self_cpu_time_total for e in events)
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
        return wall, spent / 1e6 / wall, [(e.key, e.self_cpu_time_total / spent) for e in top]

    profiles = {"tasklight `auto`": top_ops(lambda: fisher_diagonal(model, xs, names, labels=labels)),
                f"reference ({ref_name})": top_ops(lambda: reference_round(rounds))}
    vm, vh = statistics.fmean(vmap_ratios), float(stats.t.ppf(0.975, len(vmap_ratios) - 1)
                                                  * statistics.stdev(vmap_ratios) / math.sqrt(len(vmap_ratios)))

    mean = statistics.fmean(ratios)
    half = float(stats.t.ppf(0.975, len(ratios) - 1) * statistics.stdev(ratios) / math.sqrt(len(ratios)))
    cmd = " ".join(["python scripts/bench_task2vec_speed.py"] + (argv if argv is not None else sys.argv[1:]))
    lines = _bench.header("Task2Vec Fisher: tasklight against the reference implementation", cmd, args.threads,
                          total)
    lines[-1:] = [f"Load average (1 min): {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.", ""]
    lines += [f"Monte-Carlo Fisher of a Conv4 probe (width 32, 28x28, fixed BatchNorm statistics) over {len(x)} "
              f"Omniglot images, one sampled label per image, {rounds} alternating rounds after one untimed "
              f"warm-up round of every arm. Reference: "
              f"`{ref_name}`" + (" (`Task2Vec.montecarlo_fisher`, one example per batch, its labels recorded and "
                                 "given to tasklight)" if ref is not None else
                                 " (the authors' code was not available: tasklight's per-example loop)") + ".", "",
              "| arm | median time (s) |", "|---|---|",
              f"| reference ({ref_name}) | {statistics.median(t_ref):.3f} |",
              f"| tasklight `fisher_diagonal`, engine `auto` (one forward and backward per 64 examples) | "
              f"{statistics.median(t_ours):.3f} |",
              f"| tasklight `fisher_diagonal`, engine `vmap` (`torch.func.grad` vmapped over examples) | "
              f"{statistics.median(t_vmap):.3f} |", "",
              f"Speed-up (reference / tasklight `auto`, per round): {mean:.1f}x ± {half:.1f} (95 % CI); `vmap` / "
              f"`auto`: {vm:.1f}x ± {vh:.1f}; largest relative difference of either engine's Fisher to the "
              f"reference's: {max(diffs):.1e}.", "",
              "Where the time goes (`torch.profiler`, one call of each side; the share of the call's wall time "
              "spent inside torch operators, the rest being Python, data loading and dispatch; then each "
              "operator's share of that operator time):", ""]
    for arm, (wall, in_ops, ops) in profiles.items():
        lines += [f"{arm}: {wall:.3f} s, {100 * in_ops:.0f} % in torch operators", "", "| operator | share |",
                  "|---|---|"] + [f"| `{k}` | {100 * v:.0f} % |" for k, v in ops] + [""]
    lines += ["Both sides do the same arithmetic per example (a forward and the weight gradients of one "
              "image). The reference runs it one image at a time through a data loader, a backward pass into "
              "every parameter's `.grad` and a Python loop over the parameters; tasklight runs one forward and "
              "one backward to the layer outputs per 64 examples and gets the per-example conv weight gradients "
              "from one grouped convolution (batch folded into the channels).", ""]
    summary = (f"SUMMARY fisher_speedup={mean:.1f} ci95={half:.1f} fisher_rel_diff={max(diffs):.1e} "
               f"reference={ref_name}")
    print("\n".join(lines))
    _bench.write_results(args.out, lines, summary, total)


if __name__ == "__main__":
    main()
