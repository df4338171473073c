"""Reproduce MAML on sinusoid regression (Finn et al. 2017) and compare with the paper's 5-shot MSE.

    python scripts/reproduce_sinusoid.py --quick      # as many meta-steps as fit in ~4 minutes
    python scripts/reproduce_sinusoid.py              # 70,000 meta-steps (the paper's count)
    python scripts/reproduce_sinusoid.py --steps 20000

Training as in the paper: MLP 1-40-40-1 (ReLU), one inner SGD step with lr 0.01, second order,
Adam (lr 1e-3) on the meta-objective, meta-batches of 25 tasks, K=5 support points per task
(``--queries`` query points, 10 by default). Tasks: ``y = A sin(x - phase)``, ``A ~ U[0.1, 5]``,
``phase ~ U[0, pi]``, ``x ~ U[-5, 5]``.

Evaluation: 600 test tasks (a fixed, seeded set), 5 support points each, SGD with lr 0.01 for 1, 5
and 10 steps from the meta-learned initialisation; the MSE is measured on ``--test-queries`` query
points per task (100 by default) and averaged over tasks, with a 95 % confidence interval
(1.96 standard errors over tasks). Paper (Finn et al. 2017, 5-shot, after 1 / 5 / 10 steps):
0.67 / 0.38 / 0.35.

Writes its section of ``docs/bench_meta_sinusoid.md`` (one section for ``--quick``, one for longer
runs); the last line printed is ``SUMMARY mse_1=<a> mse_5=<b> mse_10=<c>``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings

import torch

import _bench_meta as B  # noqa: E402

from lightning.pytorch import Callback, Trainer, seed_everything  # noqa: E402

from tasklight.data.sinusoid import SinusoidDataModule  # noqa: E402
from tasklight.meta.maml import MAMLModule  # noqa: E402
from tasklight.nn.nets import MLP  # noqa: E402

PAPER = {1: 0.67, 5: 0.38, 10: 0.35}
QUICK_SECONDS = 200  # training-time cap of --quick (the whole run stays under 5 minutes)


class Progress(Callback):
    """Prints the mean query loss of the last ``every`` meta-steps and the speed."""

    def __init__(self, every: int) -> None:
        self.every, self.losses, self.t0, self.curve = every, [], None, []

    def on_train_start(self, trainer, pl_module) -> None:
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        step = trainer.global_step
        if step % self.every == 0:
            mean = sum(self.losses) / len(self.losses)
            dt = time.perf_counter() - self.t0
            self.curve.append((step, mean))
            print(f"  step {step:>6}  query MSE (last {len(self.losses)}) {mean:.3f}  "
                  f"{1000 * dt / step:.1f} ms/step", flush=True)
            self.losses = []


def quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"train for at most {QUICK_SECONDS} s (up to --steps meta-steps); whole run < 5 min")
    p.add_argument("--steps", type=int, default=None, help="meta-steps (default 70000; 20000 cap with --quick)")
    p.add_argument("--max-seconds", type=float, default=None, help="stop training after this many seconds")
    p.add_argument("--meta-batch", type=int, default=25)
    p.add_argument("--shots", type=int, default=5, help="support points per task (train and test)")
    p.add_argument("--queries", type=int, default=10, help="query points per training task")
    p.add_argument("--test-queries", type=int, default=100, help="query points per test task")
    p.add_argument("--test-tasks", type=int, default=600)
    p.add_argument("--inner-lr", type=float, default=0.01)
    p.add_argument("--outer-lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, nargs="+", default=[40, 40])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    quiet_lightning()
    B.set_threads(args.threads)
    machine = B.machine(args.threads)
    steps = args.steps or (20000 if args.quick else 70000)
    max_seconds = args.max_seconds or (QUICK_SECONDS if args.quick else None)
    print(machine, flush=True)
    t_start = time.perf_counter()

    seed_everything(args.seed, verbose=False)
    net = MLP(1, args.hidden, 1)
    module = MAMLModule(net, loss="mse", inner_steps=1, inner_lr=args.inner_lr, first_order=False,
                        eval_inner_steps=10, extra_eval_steps=(0, 1, 5),
                        optimizer=lambda params: torch.optim.Adam(params, lr=args.outer_lr))
    train_dm = SinusoidDataModule(k_shot=args.shots, q_queries=args.queries, meta_batch_size=args.meta_batch,
                                  batches_per_epoch=1000, val_episodes=1, test_episodes=args.test_tasks,
                                  seed=args.seed)
    test_dm = SinusoidDataModule(k_shot=args.shots, q_queries=args.test_queries, meta_batch_size=args.meta_batch,
                                 batches_per_epoch=1, val_episodes=1, test_episodes=args.test_tasks,
                                 eval_batch_size=100, seed=args.seed + 1)
    progress = Progress(every=max(100, steps // 20))
    trainer = Trainer(max_steps=steps, max_time=None if max_seconds is None else {"seconds": max_seconds},
                      logger=False, enable_checkpointing=False, limit_val_batches=0, inference_mode=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[progress],
                      accelerator="auto", devices=1)
    t0 = time.perf_counter()
    trainer.fit(module, train_dm)
    train_s = time.perf_counter() - t0
    done = trainer.global_step
    t0 = time.perf_counter()
    res = trainer.test(module, datamodule=test_dm, verbose=False)[0]
    test_s = time.perf_counter() - t0

    rows, ours = [], {}
    for k in (0, 1, 5, 10):
        mean, ci = res[f"test/mse@{k}"], res[f"test/mse@{k}_ci95"]
        ours[k] = mean
        paper = PAPER.get(k)
        verdict = "" if paper is None else ("at or below" if mean <= paper else
                                            ("within CI" if mean - ci <= paper else "above"))
        rows.append([str(k), f"{mean:.3f} ± {ci:.3f}", "" if paper is None else f"{paper:.2f}", verdict])
    tab = B.table(["adaptation steps (SGD lr 0.01)", f"tasklight MAML MSE ± 95% CI ({args.test_tasks} tasks)",
                   "Finn et al. 2017", "vs paper"], rows)
    print(tab)
    missed = [k for k in (1, 5, 10) if ours[k] > PAPER[k]]
    within = [k for k in missed if ours[k] - res[f"test/mse@{k}_ci95"] <= PAPER[k]]
    verdict = ("met: at or below the paper after 1, 5 and 10 steps" if not missed else
               f"missed after {', '.join(map(str, missed))} step(s)"
               + (f" ({'all ' if len(within) == len(missed) else ''}within the 95% CI: "
                  f"{', '.join(map(str, within))})" if within else "")
               + f", with {done:,} meta-steps (the paper: 70,000)")
    total = time.perf_counter() - t_start
    curve = ", ".join(f"{s}: {m:.2f}" for s, m in progress.curve)
    summary = f"SUMMARY mse_1={ours[1]:.4f} mse_5={ours[5]:.4f} mse_10={ours[10]:.4f}"
    stopped = f" (stopped by the {max_seconds:.0f} s time cap)" if done < steps else ""
    section = "quick" if args.quick else f"steps{steps}"
    body = f"""## {'Quick run' if args.quick else f'{steps:,}-step run'}: {done:,} meta-steps{stopped}

Command: `{B.command_line()}`
Date: {B.today()}
Machine: {machine}; training {train_s:.0f} s ({1000 * train_s / max(done, 1):.1f} ms per meta-step), test {test_s:.0f} s,
total {total:.0f} s.

Training: MLP 1-{'-'.join(map(str, args.hidden))}-1 ReLU, 1 inner SGD step (lr {args.inner_lr}), second order,
Adam lr {args.outer_lr}, {args.meta_batch} tasks per meta-batch, {args.shots} support + {args.queries} query points
per task, {done:,} meta-steps (the paper: 70,000). Test: {args.test_tasks} seeded tasks, {args.shots} support points,
{args.test_queries} query points each; SGD lr {args.inner_lr} from the meta-learned initialisation.

{tab}

Training query MSE (mean over the preceding meta-steps), by step: {curve}.

Target (at or below the paper's 0.67 / 0.38 / 0.35): {verdict}.

```
{summary}
```
"""
    intro = """MAML (second order) on sinusoid regression as in Finn et al. (2017), evaluated on 5-shot tasks after
1, 5 and 10 adaptation steps, next to the paper's numbers. Produced by `scripts/reproduce_sinusoid.py`;
each run length keeps its own section."""
    path = B.write_section("sinusoid", "MAML sinusoid reproduction", intro, section, body)
    print(f"wrote {path} ({total:.0f} s)")
    print(summary)
    return ours


if __name__ == "__main__":
    main(sys.argv[1:])
