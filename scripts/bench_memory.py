"""Peak memory of one meta-step, MAML (second order) vs iMAML, as the inner steps grow 5 -> 20 -> 100.

    python scripts/bench_memory.py --quick        # MLP on sinusoid, 3 step counts (about 2-3 min)
    python scripts/bench_memory.py                # also 50 steps, and 3 repeats per setting

Each (algorithm, inner steps) setting runs in its own process (this script with ``--child``), so
one setting's allocations cannot hide in another's. In the child: build the module and one fixed
meta-batch, run one warm-up meta-step (lazy initialisation, operator tables), then measure one
meta-step (``meta_objective`` + ``backward``):

* CUDA present: ``torch.cuda.max_memory_allocated()`` minus the memory allocated just before;
* CPU: the peak resident set size (``VmHWM``) minus the resident set size just before, with the
  peak reset by writing ``5`` to ``/proc/self/clear_refs``; where that is not permitted, the rise of
  ``getrusage(RUSAGE_SELF).ru_maxrss`` over the step (the warm-up is then a small meta-batch).
  Children run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors go back to the system
  (glibc would otherwise keep the warm-up's memory and the measured step would reuse it unseen).

Default model: the sinusoid MLP 1-40-40-1 (ReLU) with a meta-batch of 25 tasks x 200 shots
(200 queries), inner SGD lr 0.01; iMAML with lam=1, 5 CG steps. Activations (T x S x 40 per
layer and inner step) dominate the parameters (1,761 numbers). ``--net conv4`` uses a Conv4 on
28x28 Omniglot-sized random images instead.

Writes ``docs/bench_meta_memory.md``; the last line printed is
``SUMMARY maml_growth=<x> imaml_growth=<y>`` (peak at the largest vs the smallest step count).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import _bench_meta as B  # noqa: E402

MiB = 1024.0 * 1024.0


# --------------------------------------------------------------------------------- child
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux


def build(args, tasks: int):
    from tasklight.data.batch import MetaBatch, collate_tasks
    from tasklight.data.sinusoid import sinusoid_task
    from tasklight.meta.imaml import IMAMLModule
    from tasklight.meta.maml import MAMLModule
    from tasklight.nn.nets import MLP, Conv4

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    if args.net == "mlp":
        net, loss = MLP(1, args.hidden, 1), "mse"
        batch = collate_tasks([sinusoid_task(gen, args.shots, args.queries) for _ in range(tasks)])
    else:
        net, loss = Conv4(1, out_features=args.ways, hidden=args.conv_hidden), "cross_entropy"
        s, q = args.ways * args.shots, args.ways * args.queries
        batch = MetaBatch(torch.rand(tasks, s, 1, 28, 28, generator=gen),
                          torch.randint(0, args.ways, (tasks, s), generator=gen),
                          torch.rand(tasks, q, 1, 28, 28, generator=gen),
                          torch.randint(0, args.ways, (tasks, q), generator=gen))
    if args.algo == "maml":
        module = MAMLModule(net, loss=loss, inner_steps=args.steps, inner_lr=args.inner_lr)
    else:
        module = IMAMLModule(net, loss=loss, inner_steps=args.steps, inner_lr=args.inner_lr, lam=args.lam,
                             cg_steps=args.cg_steps)
    return module, batch


def meta_step(module, batch) -> None:
    module.zero_grad(set_to_none=False)
    out = module.meta_objective(batch)
    out.objective.backward()
    del out


def child(args) -> dict:
    B.set_threads(args.threads)
    cuda = torch.cuda.is_available() and not args.cpu
    dev = torch.device("cuda" if cuda else "cpu")
    can_reset = (not cuda) and _reset_hwm()
    module, batch = build(args, args.tasks)
    module, batch = module.to(dev), batch.to(dev)
    # warm-up: the same meta-step when the peak can be reset, else a one-task one (ru_maxrss only grows)
    warm = batch if (cuda or can_reset) else batch[:1]
    meta_step(module, warm)
    for p in module.parameters():  # keep .grad allocated: it is part of the state before the step
        p.grad.zero_()
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        meta_step(module, batch)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - before
        method = "torch.cuda.max_memory_allocated - allocated before"
    elif can_reset:
        before = _status_kb("VmRSS")
        _reset_hwm()
        t0 = time.perf_counter()
        meta_step(module, batch)
        dt = time.perf_counter() - t0
        peak = (_status_kb("VmHWM") - before) * 1024
        method = "VmHWM - VmRSS before (peak reset via /proc/self/clear_refs)"
    else:
        before = max(_maxrss_kb(), _status_kb("VmRSS"))
        t0 = time.perf_counter()
        meta_step(module, batch)
        dt = time.perf_counter() - t0
        peak = max(0, _maxrss_kb() - before) * 1024
        method = "ru_maxrss rise over the step (lower bound)"
    return {"algo": args.algo, "steps": args.steps, "peak_bytes": peak, "seconds": dt, "method": method,
            "device": str(dev)}


# --------------------------------------------------------------------------------- parent
def run_child(args, algo: str, steps: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--algo", algo, "--inner-steps", str(steps),
           "--net", args.net, "--tasks", str(args.tasks), "--shots", str(args.shots), "--queries", str(args.queries),
           "--hidden", *map(str, args.hidden), "--ways", str(args.ways), "--conv-hidden", str(args.conv_hidden),
           "--inner-lr", str(args.inner_lr), "--lam", str(args.lam), "--cg-steps", str(args.cg_steps),
           "--threads", str(args.threads), "--seed", str(args.seed)] + (["--cpu"] if args.cpu else [])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {algo} steps={steps} failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="steps 5, 20, 100; one process per setting (about 2-3 min)")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="inner step counts (default 5 20 100; "
                   "5 20 50 100 without --quick)")
    p.add_argument("--repeats", type=int, default=None, help="processes per setting (median; default 1 quick, 3)")
    p.add_argument("--net", choices=["mlp", "conv4"], default="mlp")
    p.add_argument("--tasks", type=int, default=25, help="tasks per meta-batch")
    p.add_argument("--shots", type=int, default=200, help="support examples per task (per class for conv4)")
    p.add_argument("--queries", type=int, default=200, help="query examples per task (per class for conv4)")
    p.add_argument("--hidden", type=int, nargs="+", default=[40, 40], help="MLP hidden sizes")
    p.add_argument("--ways", type=int, default=5, help="classes per task (conv4)")
    p.add_argument("--conv-hidden", type=int, default=32, help="Conv4 filters (conv4)")
    p.add_argument("--inner-lr", type=float, default=0.01)
    p.add_argument("--lam", type=float, default=1.0, help="iMAML proximal weight")
    p.add_argument("--cg-steps", type=int, default=5, help="iMAML conjugate-gradient steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="measure on CPU even if CUDA is present")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--algo", choices=["maml", "imaml"], default="maml", help=argparse.SUPPRESS)
    p.add_argument("--inner-steps", dest="child_steps", type=int, default=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.steps = args.child_steps
        print("RESULT " + json.dumps(child(args)), flush=True)
        return {}

    B.set_threads(args.threads)
    steps = args.steps or ([5, 20, 100] if args.quick else [5, 20, 50, 100])
    repeats = args.repeats or (1 if args.quick else 3)
    cuda = torch.cuda.is_available() and not args.cpu
    machine = B.machine(args.threads)
    if args.net == "mlp":
        setting = (f"MLP 1-{'-'.join(map(str, args.hidden))}-1 ReLU on sinusoid, {args.tasks} tasks x {args.shots} "
                   f"shots ({args.queries} queries)")
    else:
        setting = (f"Conv4 ({args.conv_hidden} filters, BatchNorm) on 28x28 inputs, {args.tasks} tasks, "
                   f"{args.ways}-way {args.shots}-shot ({args.queries} queries per class)")
    setting += f", inner SGD lr {args.inner_lr}; MAML second order; iMAML lam={args.lam}, {args.cg_steps} CG steps"
    print(f"{machine}\n{setting}", flush=True)
    t_start = time.perf_counter()
    results: dict[tuple[str, int], list[dict]] = {}
    for r in range(repeats):  # interleave algorithms and step counts
        for n in steps:
            for algo in ("maml", "imaml"):
                res = run_child(args, algo, n)
                results.setdefault((algo, n), []).append(res)
                print(f"  {algo:>5} steps={n:>3}: peak +{res['peak_bytes'] / MiB:8.1f} MiB  "
                      f"{res['seconds']:.2f} s/meta-step", flush=True)
    method = next(iter(results.values()))[0]["method"]
    peak = {k: B.median([r["peak_bytes"] for r in v]) for k, v in results.items()}
    secs = {k: B.median([r["seconds"] for r in v]) for k, v in results.items()}
    lo, hi = min(steps), max(steps)
    growth = {a: peak[(a, hi)] / max(peak[(a, lo)], 1) for a in ("maml", "imaml")}
    rows = []
    for n in steps:
        rows.append([str(n), f"{peak[('maml', n)] / MiB:.1f}", f"{peak[('maml', n)] / peak[('maml', lo)]:.2f}x",
                     f"{peak[('imaml', n)] / MiB:.1f}", f"{peak[('imaml', n)] / peak[('imaml', lo)]:.2f}x",
                     f"{secs[('maml', n)]:.2f}", f"{secs[('imaml', n)]:.2f}"])
    header = ["inner steps", "MAML peak (MiB)", f"MAML vs {lo}", "iMAML peak (MiB)", f"iMAML vs {lo}",
              "MAML s/step", "iMAML s/step"]
    tab = B.table(header, rows)
    print(tab)
    per_step = (peak[("maml", hi)] - peak[("maml", lo)]) / (hi - lo) / MiB
    imaml_ok, maml_grows = growth["imaml"] <= 1.2, growth["maml"] > 1.2
    verdict = ("met" if imaml_ok and maml_grows else
               f"missed: iMAML grows {growth['imaml']:.2f}x, MAML {growth['maml']:.2f}x")
    total = time.perf_counter() - t_start
    summary = f"SUMMARY maml_growth={growth['maml']:.2f} imaml_growth={growth['imaml']:.2f}"
    body = f"""## {'Quick run' if args.quick else 'Default run'}{'' if args.net == 'mlp' else f' ({args.net})'}

Command: `{B.command_line()}`
Date: {B.today()}
Machine: {machine}; total {total:.0f} s.

Setting: {setting}. One process per setting{'' if repeats == 1 else f' ({repeats} processes each, median)'};
one warm-up meta-step, then the measured one (meta-objective + backward). Peak: {method}.

{tab}

MAML's peak grows by about {per_step:.1f} MiB per inner step (the graph of every step is kept for the
second-order backward); iMAML's inner loop keeps no graph, its meta-gradient is CG on Hessian-vector
products at the end point. Target (iMAML at most 1.2x from {lo} to {hi} steps, MAML growing): {verdict}.

```
{summary}
```
"""
    intro = """Peak memory of one meta-step (meta-objective + backward) for second-order MAML and iMAML as the
number of inner steps grows, each setting in its own process. Produced by `scripts/bench_memory.py`."""
    section = ("quick" if args.quick else "default") + ("" if args.net == "mlp" else f"-{args.net}")
    path = B.write_section("memory", "MAML vs iMAML memory", intro, section, body)
    print(f"wrote {path} ({total:.0f} s)")
    print(summary)
    return growth


if __name__ == "__main__":
    main(sys.argv[1:])
