"""Step-time overhead of each loss-weighting method relative to equal weighting, in the same run.

Hard sharing on Omniglot alphabets (8 tasks, Conv4 trunk, 8 images per task per step). Every method
trains in short bursts, the methods taking turns round after round, so that they share the machine's
load; each training step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (forward,
per-task gradients when needed, the one all-reduce, the weighting, backward and optimiser step) and
the median over all steps of all rounds is reported. Methods needing per-task gradients are timed
with both gradient sources: ``representation`` (one extra backward pass through the heads) and
``parameters`` (one backward pass per task through the trunk).

    python scripts/bench_mtl_overhead.py --quick

Writes its section of docs/bench_multitask.md and ends with
``SUMMARY max_overhead=<x> method=<name>`` (x: median step time / equal weighting's).
"""
from __future__ import annotations

import statistics
import sys
import time

from lightning.pytorch import Callback, Trainer, seed_everything

import _bench  # noqa: E402
from bench_mtl_omniglot import OUT, write_section  # noqa: E402

from tasklight.data.multitask import OmniglotAlphabetsDataModule  # noqa: E402
from tasklight.multitask import weighting as W  # noqa: E402
from tasklight.multitask import HardSharing, MultiTaskModule  # noqa: E402
from tasklight.nn.nets import Conv4  # noqa: E402

METHODS = {
    "equal": W.EqualWeighting,
    "uncertainty": W.UncertaintyWeighting,
    "dwa": W.DWA,
    "dro": W.DROWeighting,
    "gradnorm (representation)": lambda: W.GradNorm(grad_source="representation"),
    "mgda (representation)": lambda: W.MGDA(grad_source="representation"),
    "pcgrad (representation)": lambda: W.PCGrad(grad_source="representation"),
    "gradnorm (parameters)": lambda: W.GradNorm(grad_source="parameters"),
    "mgda (parameters)": lambda: W.MGDA(grad_source="parameters"),
    "pcgrad (parameters)": lambda: W.PCGrad(grad_source="parameters"),
    "rlw": W.RLW,
    "famo": W.FAMO,
    "cagrad (representation)": lambda: W.CAGrad(grad_source="representation"),
    "nashmtl (representation)": lambda: W.NashMTL(grad_source="representation"),
    "imtl (representation)": lambda: W.IMTL(grad_source="representation"),
    "upgrad (representation)": lambda: W.UPGrad(grad_source="representation"),
    "cagrad (parameters)": lambda: W.CAGrad(grad_source="parameters"),
    "nashmtl (parameters)": lambda: W.NashMTL(grad_source="parameters"),
    "imtl (parameters)": lambda: W.IMTL(grad_source="parameters"),
    "upgrad (parameters)": lambda: W.UPGrad(grad_source="parameters"),
}


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._t0)


def burst(make, dm, hidden: int, steps: int) -> list[float]:
    seed_everything(0)
    model = MultiTaskModule(Conv4(out_features=0, hidden=hidden), architecture=HardSharing(), weighting=make())
    timer = StepTimer()
    trainer = Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(model, dm)
    return timer.times[1:]  # the first step includes one-off work


def main(argv=None) -> None:
    p = _bench.parser(__doc__, OUT)
    p.add_argument("--rounds", type=int, default=None, help="turns per method (default 3 quick, 8 full)")
    p.add_argument("--steps", type=int, default=None, help="steps per turn (default 6 quick, 12 full)")
    p.add_argument("--hidden", type=int, default=32, help="Conv4 width")
    args = p.parse_args(argv)
    _bench.setup(args)
    rounds = args.rounds or (3 if args.quick else 8)
    steps = args.steps or (6 if args.quick else 12)
    dm = OmniglotAlphabetsDataModule(batch_size_per_task=8, steps_per_epoch=10_000)
    start = time.perf_counter()
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(rounds):
        for name, make in METHODS.items():
            times[name] += burst(make, dm, args.hidden, steps + 1)
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {1000 * statistics.median(t):.0f} ms"
                                                      for n, t in times.items()), flush=True)
    total = time.perf_counter() - start
    base = statistics.median(times["equal"])
    lines = _bench.header("Step-time overhead of the weighting methods", " ".join(
        ["python scripts/bench_mtl_overhead.py"] + (argv if argv is not None else sys.argv[1:])), args.threads, total)
    lines[0] = "## Step-time overhead of the weighting methods"
    lines += [f"Hard sharing, 8 Omniglot alphabets, Conv4 width {args.hidden} (28x28), 8 images per task per step; "
              f"median step time over {rounds} rounds x {steps} steps per method, methods taking turns.", "",
              "| method (gradient source) | median step (ms) | overhead vs equal |", "|---|---|---|"]
    worst = None
    for name, t in times.items():
        med = statistics.median(t)
        ratio = med / base
        lines.append(f"| {name} | {1000 * med:.0f} | {ratio:.2f}x |")
        if name != "equal" and (worst is None or ratio > worst[0]):
            worst = (ratio, name)
    lines.append("")
    summary = f"SUMMARY max_overhead={worst[0]:.2f} method={worst[1].replace(' (', '/').rstrip(')')}"
    print("\n".join(lines))
    write_section(args.out, "bench_mtl_overhead", lines + ["```", summary, "```"])
    print(f"wrote {args.out} ({total:.0f} s)")
    print(summary)


if __name__ == "__main__":
    main()
