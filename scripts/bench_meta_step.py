"""Time per second-order MAML meta-step: tasklight's engine strategies vs learn2learn, higher, parallel-metalearn and a per-task loop.

    python scripts/bench_meta_step.py --quick     # A, B and C with Conv4-32, few rounds, memory of B
    python scripts/bench_meta_step.py             # Conv4-64, more rounds (long: run it with nohup)

Settings (one meta-step = the meta-gradient of one meta-batch in ``.grad``; no outer optimiser step):

* (A) ``sin``: sinusoid, 25 tasks x 10 shots (10 queries), 5 inner SGD steps (lr 0.01), MLP 1-40-40-1;
* (B) ``conv``: Omniglot 5-way 1-shot, 15 queries per class, T=32, Conv4-64 (32 with ``--quick``), 1 step (lr 0.4);
* (C) ``conv20``: Omniglot 20-way 1-shot, 5 queries per class, T=16, Conv4-64 (32 quick), 5 steps (lr 0.1).

All second order, float32, BatchNorm in training mode (batch statistics, as MAML does), real Omniglot
images from the small sets shipped in ``tasklight/data/assets/omniglot`` (training characters).

Methods, on the same batch and the same initial weights (``scripts/_meta_refs.py``): tasklight's
``MAMLModule`` with ``strategy="auto"`` and each strategy (``vmap``, ``stacked``, ``loop`` (per task),
``compiled`` with ``--compiled``), the plain per-task autograd loop (``loop ref``), learn2learn 0.2.0
(``learn2learn.algorithms.MAML``, its examples' loop), higher 0.2.1 and parallel-metalearn 0.5.6 where
installed (``scripts/install_peers.sh``; a peer that is missing is named in the results).

Gradients: every method's meta-gradient is compared with the loop's, in float64 on a small instance of
each setting (to 1e-9) and in float32 on the timed one (to 1e-3, or to twice the float32 noise floor
where that is larger: the difference between the loop with and without oneDNN's kernels, two equally
valid float32 evaluations; on C that floor is about 0.3, since a rounding-level change of the weights
flips pooling choices along the five inner steps and moves the meta-gradient by as much even in float64).
Timing: interleaved rounds (the order of the methods is
rotated each round), 1 thread, with the minor page faults of each step (``getrusage``: memory the allocator
handed back to the system and touches again); ratios are medians of per-round ratios. Arithmetic limit: the FLOPs of
one meta-step (``torch.utils.flop_counter.FlopCounterMode`` over the loop's step) over the single-thread
throughput of conv2d (A: matmul) measured here by a small calibration run. Memory (``--quick`` and
default): peak memory of one B meta-step for each strategy and ``chunk_size`` in (1, 4, 8, T), each in
its own process, measured as ``scripts/bench_memory.py`` does. Profile: the fastest tasklight
strategy on B and C under ``torch.profiler``, top 10 operators by self CPU time.

Writes ``docs/bench_meta_step.md``; the last line printed is
``SUMMARY sin_loop_over_core=<x> conv_loop_over_core=<y> conv20_loop_over_core=<z> grads_match=<true|false>``
(per-task loop time / tasklight ``auto`` time).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import _bench_meta as B  # noqa: E402
import _meta_refs as R  # noqa: E402
from tasklight.metrics import t_ci95  # noqa: E402

MiB = 1024.0 * 1024.0
STRATEGIES = ("auto", "vmap", "stacked", "loop")
LABEL = R.LABEL


def label(method: str) -> str:
    if method.startswith("tasklight:"):
        parts = method.split(":")
        return f"tasklight `{parts[1]}`" + (f" chunk {parts[2]}" if len(parts) > 2 else "")
    return LABEL[method]


def settings_for(args, name: str, dtype=torch.float32, small: bool = False) -> R.Setting:
    if small:  # the float64 check instance
        kw = {"sin": dict(tasks=4, steps=3, hidden=12, shots=5), "conv": dict(tasks=3, steps=1, hidden=4, queries=2),
              "conv20": dict(tasks=2, steps=2, hidden=4, queries=1)}[name]
        return R.make_setting(name, dtype=dtype, seed=args.seed, **kw)
    if name == "sin":
        return R.make_setting("sin", tasks=25, steps=5, hidden=40, shots=10, dtype=dtype, seed=args.seed)
    if name == "conv":
        return R.make_setting("conv", tasks=args.conv_tasks, steps=1, hidden=args.hidden, queries=15, dtype=dtype,
                              seed=args.seed)
    return R.make_setting("conv20", tasks=args.conv20_tasks, steps=5, hidden=args.hidden, queries=args.conv20_queries,
                          dtype=dtype, seed=args.seed)


# ============================================================================ calibration, FLOPs
def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def calibrate(hidden: int, repeats: int = 5) -> dict[str, float]:
    """Single-thread FLOP/s of conv2d (3x3, ``hidden`` channels, 14x14, forward + both backward) and of a 256 matmul."""
    x = torch.randn(64, hidden, 14, 14, requires_grad=True)
    w = torch.randn(hidden, hidden, 3, 3, requires_grad=True)
    a = torch.randn(256, 256, requires_grad=True)
    bm = torch.randn(256, 256, requires_grad=True)

    def conv():
        torch.nn.functional.conv2d(x, w, padding=1).sum().backward()

    def mm():
        (a @ bm).sum().backward()

    out = {}
    for name, fn in (("conv", conv), ("matmul", mm)):
        fn()
        flops = count_flops(fn)
        ts = []
        for _ in range(repeats * (20 if name == "matmul" else 1)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out[name] = flops / B.median(ts)
    return out


# ============================================================================ memory children
def memory_child(args) -> dict:
    import bench_memory as M

    B.set_threads(args.threads)
    can_reset = M._reset_hwm()
    strategy, chunk = args.memory_child
    s = settings_for(args, "conv")
    if strategy == "ref":
        m = R.make_method("loop", s, s.make_net())
    else:
        m = R.make_method(f"tasklight:{strategy}" + ("" if chunk == "none" else f":{chunk}"), s, s.make_net())
    m.step()  # warm-up (lazy initialisation), then keep .grad allocated: it is state before the step
    gc.collect()
    if can_reset:
        before = M._status_kb("VmRSS")
        M._reset_hwm()
        t0 = time.perf_counter()
        m._step()
        dt = time.perf_counter() - t0
        peak, method = (M._status_kb("VmHWM") - before) * 1024, "VmHWM - VmRSS before"
    else:
        before = max(M._maxrss_kb(), M._status_kb("VmRSS"))
        t0 = time.perf_counter()
        m._step()
        dt = time.perf_counter() - t0
        peak, method = max(0, M._maxrss_kb() - before) * 1024, "ru_maxrss rise (lower bound)"
    return {"peak_bytes": peak, "seconds": dt, "method": method}


def run_memory_child(args, strategy: str, chunk: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", strategy, chunk, "--hidden", str(args.hidden),
           "--conv-tasks", str(args.conv_tasks), "--seed", str(args.seed), "--threads", str(args.threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


# ============================================================================ one setting
def methods_for(args, name: str) -> tuple[list[str], dict[str, str]]:
    methods = [f"tasklight:{s}" for s in STRATEGIES]
    if args.compiled and name in args.compiled:
        methods.append("tasklight:compiled")
    methods.append("loop")
    missing = {}
    for peer in R.PEERS:
        if peer in args.skip:
            missing[peer] = "skipped (--skip)"
            continue
        reason = R.available(peer)
        if reason is None:
            methods.append(peer)
        else:
            missing[peer] = reason
    return methods, missing


def grad_check(args, name: str, methods: list[str]) -> dict[str, float]:
    s = settings_for(args, name, torch.float64, small=True)
    ref = s.make_net()
    out = {}
    loop = R.make_method("loop", s, ref)
    loop.step()
    g0 = loop.grads()
    for m in methods:
        if m in ("loop", "tasklight:compiled"):
            continue  # the reference itself; compiled is checked in float32 (a float64 compile costs minutes)
        try:
            meth = R.make_method(m, s, ref)
            meth.step()
            out[m] = R.compare(meth.grads(), g0)
        except Exception as err:  # noqa: BLE001 - reported in the table
            print(f"  {name} {m}: float64 check failed: {type(err).__name__}: {err}", flush=True)
            out[m] = float("inf")
    return out


def bench_setting(args, name: str, rounds: int) -> dict:
    methods, missing = methods_for(args, name)
    print(f"\n[{name}] methods: {', '.join(methods)}" + (f"; not run: {missing}" if missing else ""), flush=True)
    f64 = grad_check(args, name, methods)
    for m, e in f64.items():
        print(f"  grads {label(m):>32} vs loop (f64, small): max rel diff {e:.1e}", flush=True)
    s = settings_for(args, name)
    ref = s.make_net()
    built = {}
    for m in methods:
        try:
            built[m] = R.make_method(m, s, ref)
        except Exception as err:  # noqa: BLE001
            print(f"  {m}: cannot build: {type(err).__name__}: {err}", flush=True)
    compile_s = None
    # first call of each: warm-up (and the compile of `compiled`), and the float32 gradient check
    first = {}
    for m, meth in built.items():
        t0 = time.perf_counter()
        try:
            meth.step()
        except Exception as err:  # noqa: BLE001
            print(f"  {m}: step failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
            continue
        first[m] = time.perf_counter() - t0
        if m == "tasklight:compiled":
            compile_s = first[m]
    built = {m: v for m, v in built.items() if m in first}
    g32 = built["loop"].grads()
    f32 = {m: R.compare(meth.grads(), g32) for m, meth in built.items() if m != "loop"}
    # the float32 noise floor of this meta-gradient: the same loop with the other float32 convolution kernels
    # (oneDNN off) is an equally valid float32 evaluation; where the meta-gradient is ill-conditioned (C: five
    # inner steps through ReLU and max-pool, where a rounding-level change flips a pooling choice) the two
    # differ by far more than 1e-3, and a float32 comparison cannot tell exact methods from inexact ones there
    other = R.make_method("loop", s, ref)
    with torch.backends.mkldnn.flags(enabled=False):
        other.step()
    floor32 = R.compare(other.grads(), g32)
    print(f"  float32 noise floor (loop with / without oneDNN kernels): {floor32:.1e}", flush=True)
    flops = count_flops(built["loop"]._step)
    print(f"  {s.describe}; {flops / 1e9:.2f} GFLOP per meta-step; load {os.getloadavg()[0]:.1f}", flush=True)
    order = list(built)
    times: dict[str, list[float]] = {m: [] for m in order}
    faults: dict[str, list[int]] = {m: [] for m in order}
    for r in range(rounds):
        rot = order[r % len(order):] + order[:r % len(order)]
        for m in rot:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            built[m].step()
            times[m].append(time.perf_counter() - t0)
            faults[m].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        print(f"  round {r + 1}/{rounds} (load {os.getloadavg()[0]:.1f}): "
              + ", ".join(f"{m.replace('tasklight:', '')} {times[m][-1]:.3f}s" for m in order), flush=True)
    loop_over = {m: B.median([a / b for a, b in zip(times["loop"], times[m])]) for m in order}
    return {"name": name, "setting": s, "methods": order, "missing": missing, "times": times, "faults": faults,
            "loop_over": loop_over,
            "f64": f64, "f32": f32, "floor32": floor32, "flops": flops, "compile_s": compile_s, "built": built}


def ratio_interval(ref: list[float], ours: list[float]) -> tuple[float, float]:
    """95 % t interval of the speed ratio ``ref / ours`` over paired rounds (on the log scale, so the interval
    of the ratio is multiplicative); NaN bounds with fewer than two rounds."""
    logs = torch.tensor([math.log(a / b) for a, b in zip(ref, ours)], dtype=torch.float64)
    r = t_ci95(logs)
    mean, half = float(r["mean"]), float(r["ci95"])
    return math.exp(mean - half), math.exp(mean + half)


def profile_best(res: dict, top: int = 10) -> tuple[str, str]:
    from torch.profiler import ProfilerActivity, profile

    cands = [m for m in res["methods"] if m.startswith("tasklight:") and m != "tasklight:compiled"]
    best = max(cands, key=lambda m: res["loop_over"][m])
    meth = res["built"][best]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        meth.step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    table = B.table(["op", "self CPU (ms)", "share", "calls"],
                    [[f"`{e.key}`", f"{e.self_cpu_time_total / 1e3:.0f}", f"{100 * e.self_cpu_time_total / total:.1f} %",
                      str(e.count)] for e in rows])
    return best, table


# ============================================================================ main
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="Conv4-32 for B and C, few rounds")
    p.add_argument("--settings", nargs="+", default=["sin", "conv", "conv20"], choices=["sin", "conv", "conv20"])
    p.add_argument("--hidden", type=int, default=None, help="Conv4 filters for B and C (32 quick, 64)")
    p.add_argument("--conv-tasks", type=int, default=32, help="B's tasks per meta-batch")
    p.add_argument("--conv20-tasks", type=int, default=16, help="C's tasks per meta-batch")
    p.add_argument("--conv20-queries", type=int, default=5, help="C's query images per class")
    p.add_argument("--rounds", type=int, nargs=3, default=None, metavar=("A", "B", "C"),
                   help="interleaved rounds per setting (quick: 10 3 2; default: 30 6 4)")
    p.add_argument("--compiled", nargs="*", default=None, choices=["sin", "conv", "conv20"],
                   help="also time strategy='compiled' on these settings (compiles take minutes per shape)")
    p.add_argument("--skip", nargs="*", default=[], choices=list(R.PEERS), help="peers not to run")
    p.add_argument("--no-memory", action="store_true", help="skip the memory table of B")
    p.add_argument("--tag", default=None, help="results section name (default: quick / default)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.hidden = args.hidden or (32 if args.quick else 64)
    if args.compiled is None:
        args.compiled = []
    B.set_threads(args.threads)
    if args.memory_child:
        print("RESULT " + json.dumps(memory_child(args)))
        return {}
    rounds = dict(zip(("sin", "conv", "conv20"), args.rounds or ((10, 3, 2) if args.quick else (30, 6, 4))))
    machine = B.machine(args.threads)
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    print(f"{machine}; os.getloadavg() = {tuple(round(x, 2) for x in load0)}", flush=True)
    rates = calibrate(args.hidden)
    print(f"calibration (1 thread): conv2d {rates['conv'] / 1e9:.1f} GFLOP/s, matmul {rates['matmul'] / 1e9:.1f} GFLOP/s",
          flush=True)
    results = {name: bench_setting(args, name, rounds[name]) for name in args.settings}

    grads_match = True
    sections = []
    for name, res in results.items():
        rate = rates["matmul" if name == "sin" else "conv"]
        limit = res["flops"] / rate
        auto = res["times"]["tasklight:auto"]
        rows = []
        for m in res["methods"]:
            ts = res["times"][m]
            med = B.median(ts)
            e64, e32 = res["f64"].get(m), res["f32"].get(m)
            ok = (e64 is None or e64 < 1e-9) and (e32 is None or e32 < max(1e-3, 2 * res["floor32"]))
            grads_match &= ok
            agree = "reference" if m == "loop" else (
                f"{'yes' if ok else 'NO'} ({'-' if e64 is None else f'{e64:.0e}'} / {e32:.0e})")
            over_auto = B.median([a / b for a, b in zip(ts, auto)])
            rows.append([label(m), f"{1000 * med:.1f}", f"{res['loop_over'][m]:.2f}x", f"{over_auto:.2f}x",
                         f"{med / limit:.1f}x", f"{B.median(res['faults'][m]):.0f}", agree])
        header = ["method", "ms / meta-step (median)", "loop ref time / this", "this / tasklight auto",
                  "time / arithmetic limit", "page faults / step (median)",
                  "meta-grad = loop's (max rel diff f64 small / f32 timed)"]
        missing = "".join(f"\n- {LABEL[k]}: not run: {v}." for k, v in res["missing"].items())
        extra = (f" The compiled strategy's first call (compile included) took {res['compile_s']:.0f} s."
                 if res["compile_s"] is not None else "")
        sections.append(f"""### {dict(sin='(A)', conv='(B)', conv20='(C)')[name]} {res['setting'].describe}

{len(res['times']['loop'])} interleaved rounds. One meta-step: {res['flops'] / 1e9:.2f} GFLOP (FlopCounterMode over
the loop's step); arithmetic limit {1000 * limit:.1f} ms at the measured {'matmul' if name == 'sin' else 'conv2d'} rate.{extra}

{B.table(header, rows)}
{missing}
""")
        print(B.table(header, rows), flush=True)

    profiles = []
    for name in ("conv", "conv20"):
        if name in results:
            best, table = profile_best(results[name])
            profiles.append(f"**{dict(conv='(B)', conv20='(C)')[name]}**, fastest tasklight strategy "
                            f"`{best.split(':')[1]}`, one meta-step under `torch.profiler`, 1 thread, top 10 by self CPU "
                            f"time:\n\n{table}\n")
            print(f"profile {name} ({best}):\n{table}", flush=True)

    memory = ""
    if not args.no_memory and "conv" in results:
        T = args.conv_tasks
        configs = [("auto", "none"), ("ref", "none")] + [(s, c) for s in ("stacked", "vmap")
                                                          for c in ("1", "4", "8", str(T))]
        mrows = []
        for strategy, chunk in configs:
            r = run_memory_child(args, strategy, chunk)
            name = "loop ref (per-task autograd)" if strategy == "ref" else f"tasklight `{strategy}`"
            ch = "-" if chunk == "none" else chunk
            if "error" in r:
                mrows.append([name, ch, "failed", r["error"][:120]])
            else:
                mrows.append([name, ch, f"{r['peak_bytes'] / MiB:.0f}", f"{r['seconds']:.2f}"])
            print(f"  memory {name} chunk={ch}: {mrows[-1][2]} MiB", flush=True)
        memory = f"""### Peak memory of one (B) meta-step

Each configuration in its own process (this script with `--memory-child`), measured as
`scripts/bench_memory.py` does (peak resident set `VmHWM` over the step after a warm-up step, glibc made to
return freed memory). `loop` is `chunk_size=1`.

{B.table(["method", "chunk_size", "peak MiB over the step", "s (that step)"], mrows)}
"""

    summary = (f"SUMMARY sin_loop_over_core={results['sin']['loop_over']['tasklight:auto']:.2f} "
               if "sin" in results else "SUMMARY sin_loop_over_core=nan ")
    summary += (f"conv_loop_over_core={results['conv']['loop_over']['tasklight:auto']:.2f} " if "conv" in results
                else "conv_loop_over_core=nan ")
    summary += (f"conv20_loop_over_core={results['conv20']['loop_over']['tasklight:auto']:.2f} " if "conv20" in results
                else "conv20_loop_over_core=nan ")
    summary += f"grads_match={str(grads_match).lower()}"
    total = time.perf_counter() - t_start
    load1 = os.getloadavg()
    targets = []
    for name, goal in (("sin", 50.0), ("conv", 2.0), ("conv20", 2.0)):
        if name in results:
            lo = results[name]["loop_over"]
            x = lo["tasklight:auto"]
            l2l = (x / lo["learn2learn"]) if "learn2learn" in lo else None
            lo_ci, hi_ci = ratio_interval(results[name]["times"]["loop"], results[name]["times"]["tasklight:auto"])
            label = dict(sin='(A)', conv='(B)', conv20='(C)')[name]
            if lo_ci > 1:  # a speed-up is claimed only where the paired interval excludes 1
                verdict = f"`auto` is {x:.2f}x faster than the loop (95 % interval {lo_ci:.2f}-{hi_ci:.2f}x)"
            else:
                verdict = (f"`auto` runs at {x:.2f}x the loop's speed (95 % interval {lo_ci:.2f}-{hi_ci:.2f}x, "
                           f"which includes 1: no speed-up)")
            targets.append(f"{label} {verdict}" + (f"; {l2l:.2f}x learn2learn's speed" if l2l is not None else "")
                           + f" (target {goal:.0f}x: {'met' if lo_ci >= goal and (l2l is None or l2l >= goal) else 'missed'})")
    body = f"""## {'Quick run' if args.quick else 'Default run'}{f' ({args.tag})' if args.tag else ''}

Command: `{B.command_line()}`
Date: {B.today()}
Machine: {machine}; os.getloadavg() {tuple(round(x, 1) for x in load0)} at the start, {tuple(round(x, 1) for x in load1)}
at the end (2 cores shared with other jobs: absolute times are inflated, the ratios are measured within rounds);
total {total:.0f} s. Calibration (1 thread): conv2d {rates['conv'] / 1e9:.1f} GFLOP/s, matmul {rates['matmul'] / 1e9:.1f} GFLOP/s.

Targets: {'; '.join(targets)}.

{''.join(sections)}
{memory}
### Where the time goes

{''.join(profiles)}

```
{summary}
```
"""
    intro = """Time per second-order MAML meta-step on three workloads: tasklight's engine (`strategy="auto"` and
each strategy) against a plain per-task autograd loop and the peer libraries learn2learn, higher and
parallel-metalearn, all on the same batch and initial weights, with every meta-gradient checked against the
loop's. Produced by `scripts/bench_meta_step.py` (peers installed by `scripts/install_peers.sh`)."""
    path = B.write_section("step", "MAML meta-step time", intro, args.tag or ("quick" if args.quick else "default"), body)
    print(f"wrote {path} ({total:.0f} s); os.getloadavg() = {tuple(round(x, 2) for x in load1)}")
    print(summary)
    return {"summary": summary, "grads_match": grads_match}


if __name__ == "__main__":
    main(sys.argv[1:])
