"""Step-time overhead of each loss-weighting method relative to equal weighting, and the per-task
gradient engines, in the same run.

Hard sharing on Omniglot alphabets (8 tasks, Conv4 trunk width 32, 28x28, 8 images per task per step,
BatchNorm on batch statistics). Protocol, fixed before the runs:

1. **Engines.** On the module's own forward, the per-task Jacobian ``[8, P]`` of the shared trunk by
   each engine: ``loop`` (8 ``autograd.grad`` calls, tasklight's CPU default), ``batched`` (one
   ``autograd.grad(..., is_grads_batched=True)``, all tasks or chunks of 2), ``func.vmap(vjp)`` (a
   ``torch.func`` forward and the vmapped pullback) and torchjd's ``autojac.jac``; plus ``equal`` (the
   forward and one backward of the loss sum) for scale. Each timed call includes the forward. The arms
   take turns in rotated order, round after round; the ratio to ``loop`` is taken per round (paired)
   and reported as mean with a 95 % Student-t interval over rounds. Every engine's float32 Jacobian is
   compared with the loop's in float64 (``grads_match``: max abs difference <= 1e-3 x the largest
   entry; float32 rounding through BatchNorm is about 3e-4 here, the loop's own included). Peak
   memory: each arm once more in a fresh process after a warm-up forward and backward, the largest
   rise of the resident set size (RSS) while it runs (sampled every millisecond).
2. **Step time.** Every method trains in short bursts (a fresh Trainer each), the methods taking
   turns round after round; each step is timed from ``on_train_batch_start`` to
   ``on_train_batch_end`` (forward, per-task gradients, the one all-reduce, the weighting, backward
   and optimiser step); the first step of a burst is dropped. Per round, the ratio of the method's
   median step to equal weighting's; reported: the median step over all rounds, and the mean ratio
   with its 95 % interval over rounds. Methods needing per-task gradients are timed with both
   gradient sources: ``representation`` (one extra backward pass through the heads) and
   ``parameters`` (the per-task Jacobian of the trunk, engine ``auto``).

    python scripts/bench_mtl_overhead.py --quick

Writes its section of docs/bench_multitask.md and ends with
``SUMMARY max_param_overhead=<x> max_rep_overhead=<y> grads_match=<true|false>`` (x, y: the largest
mean step-time ratio to equal weighting over the methods with ``parameters`` / ``representation``
gradients).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer, seed_everything

import _bench  # noqa: E402
from bench_mtl_omniglot import OUT, write_section  # noqa: E402

from tasklight.data.multitask import MultiTaskStream, OmniglotAlphabetsDataModule  # noqa: E402
from tasklight.multitask import weighting as W  # noqa: E402
from tasklight.multitask import HardSharing, MultiTaskModule  # noqa: E402
from tasklight.multitask.jacobian import resolve_engine, task_jacobian  # noqa: E402
from tasklight.nn.nets import Conv4  # noqa: E402

METHODS = {
    "equal": W.EqualWeighting,
    "uncertainty": W.UncertaintyWeighting,
    "dwa": W.DWA,
    "dro": W.DROWeighting,
    "rlw": W.RLW,
    "famo": W.FAMO,
}
for _src in ("representation", "parameters"):
    for _name, _cls in (("gradnorm", W.GradNorm), ("mgda", W.MGDA), ("pcgrad", W.PCGrad), ("cagrad", W.CAGrad),
                        ("nashmtl", W.NashMTL), ("imtl", W.IMTL), ("upgrad", W.UPGrad)):
        METHODS[f"{_name} ({_src})"] = (lambda c=_cls, s=_src: c(grad_source=s))

ENGINE_ARMS = ["equal", "loop", "batched", "batched (chunks of 2)", "func.vmap(vjp)", "torchjd autojac.jac"]


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % Student-t interval."""
    from scipy import stats

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, float("nan")
    return m, float(stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


# ----------------------------------------------------------------------------- 1. engines
def engine_setup(hidden: int, device: str = "cpu", per_task: int = 8):
    seed_everything(0)
    dm = OmniglotAlphabetsDataModule(batch_size_per_task=per_task, steps_per_epoch=10_000)
    dm.setup()
    model = MultiTaskModule(Conv4(out_features=0, hidden=hidden), architecture=HardSharing())
    model.build(dm.task_specs, dm.descriptors.shape[1])
    batch = MultiTaskStream(dm.train_sets, dm.descriptors, per_task, 1).batch(0)
    return model.to(device), batch.to(device)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def engine_arm(name: str, model, batch) -> torch.Tensor | None:
    """Forward + the Jacobian of the 8 task losses w.r.t. the trunk by engine ``name``."""
    params = list(model.trunk.parameters())
    if name == "func.vmap(vjp)":
        from torch.func import functional_call, vjp, vmap

        names = [n for n, _ in model.trunk.named_parameters()]
        rows = [(batch.task == t) for t in range(model.num_tasks)]

        def losses(*ps):
            rep = functional_call(model.trunk, dict(zip(names, ps)), (batch.x,))
            return torch.stack([F.cross_entropy(model.heads[t](rep[m]), batch.y[m]) for t, m in enumerate(rows)])

        out, pull = vjp(losses, *params)
        g = vmap(pull)(torch.eye(len(out), device=out.device))
        return torch.cat([gi.reshape(len(out), -1) for gi in g], 1)
    fw = model._forward(batch)
    if name == "equal":
        fw.losses.sum().backward()
        model.zero_grad(set_to_none=True)
        return None
    if name == "torchjd autojac.jac":
        import torchjd.autojac as jac

        g = jac.jac(fw.losses, params)
        return torch.cat([gi.reshape(fw.losses.shape[0], -1) for gi in g], 1)
    engine, chunk = {"loop": ("loop", None), "batched": ("batched", None),
                     "batched (chunks of 2)": ("batched", 2)}[name]
    return task_jacobian(fw.losses, params, engine, chunk)


def rss_peak_during(fn) -> float:
    """The rise (MiB) of the resident set size while ``fn`` runs over the RSS just before it, sampled
    every millisecond from /proc/self/statm by a thread."""
    import threading

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    base, peak, done = rss(), [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(0, max(peak[0], rss()) - base) / 2**20


def peak_rss_mib(name: str, hidden: int) -> float:
    """``rss_peak_during`` of engine ``name`` in a fresh process, after one warm-up forward and backward."""
    code = (f"import sys, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); torch.set_num_threads(1); "
            f"import bench_mtl_overhead as B; m, b = B.engine_setup({hidden}); B.engine_arm('equal', m, b); "
            f"print('RSS', B.rss_peak_during(lambda: B.engine_arm({name!r}, m, b)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.split("RSS")[-1])


def bench_engines(hidden: int, rounds: int, device: str = "cpu", per_task: int = 8, rss: bool = True):
    """Engine times, max relative differences to the float64 loop, peak RSS rises (CPU; on CUDA the peak
    GPU memory of each arm), and the number of shared parameters."""
    model, batch = engine_setup(hidden, device, per_task)
    x32 = batch.x
    model.double()
    batch.x = x32.double()
    ref = engine_arm("loop", model, batch).detach()  # the float64 Jacobian: the reference of every engine
    model.float()
    batch.x = x32
    diffs = {}
    for name in ENGINE_ARMS[1:]:
        g = engine_arm(name, model, batch).detach().double()
        diffs[name] = float((g - ref).abs().max() / ref.abs().max())
    times = {n: [] for n in ENGINE_ARMS}
    for r in range(rounds):
        order = ENGINE_ARMS[r % len(ENGINE_ARMS):] + ENGINE_ARMS[:r % len(ENGINE_ARMS)]
        for name in order:
            _sync(device)
            t0 = time.perf_counter()
            engine_arm(name, model, batch)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    if torch.device(device).type == "cuda":
        memory = {}
        for name in ENGINE_ARMS:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            engine_arm(name, model, batch)
            memory[name] = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        memory = {n: peak_rss_mib(n, hidden) if rss else float("nan") for n in ENGINE_ARMS}
    return times, diffs, memory, sum(p.numel() for p in model.trunk.parameters())


# ----------------------------------------------------------------------------- 2. step time
class StepTimer(Callback):
    def __init__(self, cuda: bool = False) -> None:
        self.times: list[float] = []
        self._t0 = 0.0
        self.cuda = cuda

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t0)


def burst(make, dm, hidden: int, steps: int, accelerator: str = "cpu") -> list[float]:
    seed_everything(0)
    model = MultiTaskModule(Conv4(out_features=0, hidden=hidden), architecture=HardSharing(), weighting=make())
    timer = StepTimer(accelerator == "gpu")
    trainer = Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer],
                      accelerator=accelerator, devices=1)
    trainer.fit(model, dm)
    return timer.times[1:]  # the first step includes one-off work


def bench_steps(names: list[str], hidden: int, rounds: int, steps: int, accelerator: str = "cpu",
                per_task: int = 8) -> tuple[dict, dict]:
    """Step times of the methods ``names`` (keys of METHODS, "equal" among them), taking turns: every
    step's time, and per round the ratio of each method's median step to equal weighting's."""
    dm = OmniglotAlphabetsDataModule(batch_size_per_task=per_task, steps_per_epoch=10_000)
    times: dict[str, list[float]] = {m: [] for m in names}
    per_round: dict[str, list[float]] = {m: [] for m in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        med = {}
        for name in order:
            t = burst(METHODS[name], dm, hidden, steps + 1, accelerator)
            times[name] += t
            med[name] = statistics.median(t)
        for name in names:
            per_round[name].append(med[name] / med["equal"])
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {per_round[n][-1]:.2f}x" for n in names), flush=True)
    return times, per_round


def main(argv=None) -> None:
    p = _bench.parser(__doc__, OUT)
    p.add_argument("--rounds", type=int, default=None, help="turns per method (default 3 quick, 8 full)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per turn (default 4 quick, 10 full)")
    p.add_argument("--engine-rounds", type=int, default=None, help="rounds of the engine timing (default 6 / 15)")
    p.add_argument("--hidden", type=int, default=32, help="Conv4 width")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    _bench.setup(args)
    rounds = args.rounds or (3 if args.quick else 8)
    steps = args.steps or (4 if args.quick else 10)
    engine_rounds = args.engine_rounds or (6 if args.quick else 15)
    load0 = os.getloadavg()[0]
    start = time.perf_counter()
    etimes, diffs, rss, n_params = bench_engines(args.hidden, engine_rounds)
    names = list(METHODS)
    times, per_round = bench_steps(names, args.hidden, rounds, steps)
    total = time.perf_counter() - start
    load1 = os.getloadavg()[0]
    cmd = " ".join(["python scripts/bench_mtl_overhead.py"] + (argv if argv is not None else sys.argv[1:]))
    lines = _bench.header("Step-time overhead of the weighting methods", cmd, args.threads, total)
    lines[0] = "## Step-time overhead of the weighting methods and the per-task gradient engines"
    lines[-1:] = [f"Load average (1 min): {load0:.1f} at the start, {load1:.1f} at the end.", ""]
    lines += [f"Hard sharing, 8 Omniglot alphabets, Conv4 width {args.hidden} (28x28, BatchNorm on batch statistics; "
              f"{n_params} shared parameters), 8 images per task per step.", "",
              f"**Per-task gradient engines** (forward + Jacobian [8, {n_params}] of the trunk; {engine_rounds} "
              f"interleaved rounds; ratio to `loop` per round, mean ± 95 % CI; peak RSS: largest rise while the "
              f"arm runs, fresh process):", "",
              "| engine | median (ms) | ratio to loop | max rel. diff to the float64 loop | peak RSS rise (MiB) |",
              "|---|---|---|---|---|"]
    for name in ENGINE_ARMS:
        ratios = [a / b for a, b in zip(etimes[name], etimes["loop"])]
        m, h = t_interval(ratios)
        diff = "--" if name == "equal" else f"{diffs[name]:.1e}"
        label = "equal (forward + one backward)" if name == "equal" else name
        lines.append(f"| {label} | {1000 * statistics.median(etimes[name]):.0f} | {m:.2f} ± {h:.2f} | {diff} | "
                     f"{rss[name]:.1f} |")
    fwd_bwd = statistics.median(etimes["equal"])
    jac = statistics.median(etimes["loop"])
    lines += ["", f"Where the time goes: the forward and one backward take {1000 * fwd_bwd:.0f} ms, the forward "
              f"and the 8-task Jacobian by the loop {1000 * jac:.0f} ms ({jac / fwd_bwd:.1f}x). BatchNorm on batch "
              f"statistics makes every task's loss depend on every example, so each task's cotangent is dense in "
              f"every trunk layer and any exact engine does 8 trunk backward passes of arithmetic; the batched "
              f"engines only change how it is dispatched.", "",
              f"**Step time** ({rounds} rounds x {steps} timed steps per method, methods taking turns; engine "
              f"`auto` = `{resolve_engine('auto', torch.device('cpu'))}` on this CPU):", "",
              "| method (gradient source) | median step (ms) | ratio to equal (mean ± 95 % CI over rounds) |",
              "|---|---|---|"]
    worst = {"parameters": 0.0, "representation": 0.0}
    for name in names:
        m, h = t_interval(per_round[name])
        lines.append(f"| {name} | {1000 * statistics.median(times[name]):.0f} | {m:.2f} ± {h:.2f} |")
        for src in worst:
            if f"({src})" in name:
                worst[src] = max(worst[src], m)
    match = all(d <= 1e-3 for d in diffs.values())
    summary = (f"SUMMARY max_param_overhead={worst['parameters']:.2f} max_rep_overhead={worst['representation']:.2f} "
               f"grads_match={'true' if match else 'false'}")
    lines.append("")
    print("\n".join(lines))
    write_section(args.out, "bench_mtl_overhead", lines + ["```", summary, "```"])
    if args.json:
        Path(args.json).write_text(json.dumps({"engines": {n: statistics.median(v) for n, v in etimes.items()},
                                               "rss_mib": rss, "diffs": diffs, "per_round": per_round}, indent=1))
    print(f"wrote {args.out} ({total:.0f} s)")
    print(summary)


if __name__ == "__main__":
    main()
