"""Task2Vec benchmark on Omniglot: expert selection and embedding time.

    python scripts/bench_task2vec.py --quick      # under 5 minutes on 2 CPU cores
    python scripts/bench_task2vec.py              # larger experts and embeddings

Expert selection (Achille et al. 2019, Sect. 4, on the Omniglot alphabets available here):

* the alphabets are split into two halves; in each fold one half provides the *experts* (one
  Conv4 classifier per alphabet, plus a *generic* expert trained on the whole half, which is also
  the Task2Vec probe) and the other half provides the *new tasks*;
* each new-task alphabet is cut into two tasks (disjoint halves of its characters); a new task's
  training split is ``--shots`` drawers per character, its test split the other drawers;
* the experts are ranked by ``d_asym(expert's training task -> new task)`` on Task2Vec embeddings
  of the probe; every expert (and the generic one) is scored by the test error of a linear head
  fitted on its frozen features with the new task's training split;
* reported: the test error of the Task2Vec choice, of the oracle (the expert best on the test
  split), of a random choice (expected error of a uniformly chosen expert), and of the generic
  expert, averaged over the new tasks.

Then the time to embed one task against its number of examples. Results go to
``docs/bench_task2vec.md``; the last line printed is
``SUMMARY task2vec_err=<x> oracle_err=<y> random_err=<z>``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tasklight.data.omniglot import load_omniglot
from tasklight.nn.nets import Conv4
from tasklight.task2vec.embedding import Task2Vec, evaluate_expert_selection, rank_experts, train_classifier

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Settings:
    hidden: int
    expert_epochs: int
    generic_epochs: int
    max_examples: int
    mc_samples: int
    shots: int
    timing_sizes: tuple[int, ...]


QUICK = Settings(hidden=32, expert_epochs=4, generic_epochs=3, max_examples=300, mc_samples=1, shots=5,
                 timing_sizes=(25, 50, 100, 200, 400))
FULL = Settings(hidden=64, expert_epochs=15, generic_epochs=10, max_examples=800, mc_samples=2, shots=5,
                timing_sizes=(25, 50, 100, 200, 400, 800))


def expert(x: torch.Tensor, y: torch.Tensor, hidden: int, epochs: int, seed: int) -> Conv4:
    """A Conv4 classifier over the classes of ``y``, trained from scratch."""
    torch.manual_seed(seed)
    net = Conv4(out_features=len(torch.unique(y)), hidden=hidden)
    return train_classifier(net, x, y, epochs, seed=seed)


def folds(alphabets: list[str], sizes: list[int]) -> list[tuple[list[str], list[str]]]:
    """Two halves with similar numbers of characters (greedy), each in turn the experts' half."""
    order = sorted(range(len(alphabets)), key=lambda i: -sizes[i])
    halves: list[list[int]] = [[], []]
    for i in order:
        target = min((0, 1), key=lambda h: (sum(sizes[j] for j in halves[h]), len(halves[h])))
        halves[target].append(i)
    a, b = ([alphabets[i] for i in sorted(h)] for h in halves)
    return [(a, b), (b, a)]


def fmt(v: float) -> str:
    return f"{v:.3f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small experts and embeddings (< 5 min, 2 CPU cores)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest for these small workloads on shared cores)")
    parser.add_argument("--alpha", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(REPO / "docs" / "bench_task2vec.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    s = QUICK if args.quick else FULL
    t_start = time.perf_counter()

    data = load_omniglot()
    x_all = data.images.float().div(255.0).unsqueeze(1)
    per_alpha = torch.bincount(data.character_alphabet, minlength=len(data.alphabets)).tolist()
    embed_opts = dict(max_examples=s.max_examples, mc_samples=s.mc_samples, seed=args.seed)

    rows, summary = [], {"task2vec": [], "task2vec_sym": [], "oracle": [], "random": [], "generic": []}
    picks_oracle = generic_wins = 0
    probe_for_timing = None
    timing_task = None
    for fold, (expert_alphabets, new_alphabets) in enumerate(folds(data.alphabets, per_alpha)):
        t0 = time.perf_counter()
        experts, expert_tasks = {}, {}
        for k, name in enumerate(expert_alphabets):
            m = data.image_alphabet == data.alphabets.index(name)
            expert_tasks[name] = (x_all[m], data.image_character[m])
            experts[name] = expert(x_all[m], data.image_character[m], s.hidden, s.expert_epochs,
                                             args.seed + 100 * fold + k)
        m_gen = torch.isin(data.image_alphabet, torch.tensor([data.alphabets.index(a) for a in expert_alphabets]))
        generic = expert(x_all[m_gen], data.image_character[m_gen], s.hidden, s.generic_epochs,
                                   args.seed + 100 * fold + 99)
        print(f"fold {fold}: trained {len(experts)} experts + generic in {time.perf_counter() - t0:.0f}s "
              f"(experts: {', '.join(expert_alphabets)})", flush=True)
        embedder = Task2Vec(generic, **embed_opts)  # the probe: trained on the experts' alphabets only
        expert_emb = {n: embedder.embed(t, n) for n, t in expert_tasks.items()}
        gen = torch.Generator().manual_seed(args.seed + fold)
        for name in new_alphabets:
            chars = (data.character_alphabet == data.alphabets.index(name)).nonzero().flatten()
            chars = chars[torch.randperm(len(chars), generator=gen)]
            for part, subset in enumerate((chars[: len(chars) // 2], chars[len(chars) // 2:])):
                m = torch.isin(data.image_character, subset)
                train = m & (data.image_drawer < s.shots)
                test = m & (data.image_drawer >= s.shots)
                task = f"{name}/{part}"
                tr = (x_all[train], data.image_character[train])
                te = (x_all[test], data.image_character[test])
                sel = evaluate_expert_selection(embedder, experts, expert_emb, tr, te, name=task, generic=generic,
                                                alpha=args.alpha)
                ranking, errors, generic_err = sel.ranking, sel.errors, sel.generic_error
                ranking_sym = rank_experts(sel.embedding, expert_emb, alpha=0.0)
                oracle, random_err = sel.oracle, sel.random_error
                picks_oracle += errors[ranking.chosen] == errors[oracle]
                generic_wins += generic_err < errors[oracle]
                for key, v in (("task2vec", errors[ranking.chosen]), ("task2vec_sym", errors[ranking_sym.chosen]),
                               ("oracle", errors[oracle]), ("random", random_err), ("generic", generic_err)):
                    summary[key].append(v)
                true_rank = sorted(errors.values()).index(errors[ranking.chosen]) + 1
                rows.append([task, str(len(subset)), ranking.chosen, f"{true_rank}/{len(errors)}", oracle,
                             fmt(errors[ranking.chosen]), fmt(errors[oracle]), fmt(random_err), fmt(generic_err)])
                print(f"  {task:<28} {len(subset):>2}-way  task2vec={ranking.chosen:<22} err={errors[ranking.chosen]:.3f}"
                      f"  oracle={oracle:<22} err={errors[oracle]:.3f}  random={random_err:.3f}  "
                      f"generic={generic_err:.3f}", flush=True)
                if timing_task is None:
                    timing_task = name
        if probe_for_timing is None:
            probe_for_timing = (generic, timing_task)

    # ------------------------------------------------------------------ time to embed one task
    probe, alpha_name = probe_for_timing
    m = data.image_alphabet == data.alphabets.index(alpha_name)
    x_t, y_t = x_all[m], data.image_character[m]
    perm = torch.randperm(len(x_t), generator=torch.Generator().manual_seed(args.seed))
    timing_rows = []
    for n in s.timing_sizes:
        if n > len(x_t):
            continue
        idx = perm[:n]
        embedder = Task2Vec(probe, mc_samples=1, seed=args.seed)
        t0 = time.perf_counter()
        embedder.embed((x_t[idx], y_t[idx]))
        dt = time.perf_counter() - t0
        timing_rows.append([str(n), f"{dt:.2f}", f"{1000 * dt / n:.1f}"])
        print(f"  embed {n:>4} examples: {dt:.2f}s ({1000 * dt / n:.1f} ms/example)", flush=True)

    mean = {k: sum(v) / len(v) for k, v in summary.items()}
    n_tasks = len(rows)
    total = time.perf_counter() - t_start
    sel_header = ["new task", "classes", "Task2Vec choice", "its true rank", "oracle expert", "Task2Vec err",
                  "oracle err", "random err", "generic err"]
    summary_rows = [["Task2Vec (d_asym, alpha=%.2f)" % args.alpha, fmt(mean["task2vec"])],
                    ["Task2Vec (d_sym)", fmt(mean["task2vec_sym"])],
                    ["oracle (best expert on test)", fmt(mean["oracle"])],
                    ["random expert (expected)", fmt(mean["random"])],
                    ["generic expert (all expert alphabets)", fmt(mean["generic"])]]
    command = "python scripts/bench_task2vec.py" + (" --quick" if args.quick else "")
    summary_line = (f"SUMMARY task2vec_err={mean['task2vec']:.4f} oracle_err={mean['oracle']:.4f} "
                    f"random_err={mean['random']:.4f}")
    doc = f"""# Task2Vec benchmark

Command: `{command}`
Date: {datetime.date.today().isoformat()}
Machine: CPU, 2 cores ({args.threads} torch thread{'s' if args.threads > 1 else ''}); total time {total:.0f} s
(load average {load_at_start:.1f} at the start: the cores are shared, so times vary with other jobs;
the errors do not depend on the load).

Settings: Conv4 experts with {s.hidden} filters, {s.expert_epochs} epochs per single-alphabet expert,
{s.generic_epochs} epochs for the generic expert (the probe); Task2Vec with at most {s.max_examples}
examples per task, {s.mc_samples} sampled label(s) per example, alpha={args.alpha}; new tasks are
half an alphabet each, {s.shots} training images per character, the other drawers for testing;
heads fitted by L-BFGS on frozen features. Omniglot "minimal" background sets
({len(data.alphabets)} alphabets, two folds: each half of the alphabets in turn gives the experts).

## Expert selection: mean test error over {n_tasks} new tasks

{table(["selection", "test error"], summary_rows)}

Task2Vec picked the oracle expert on {picks_oracle}/{n_tasks} tasks (ties count as the oracle); the generic
expert beat the oracle single-alphabet expert on {generic_wins}/{n_tasks} tasks. The random row is the expected
error of a uniformly chosen expert.

## Per task

{table(sel_header, rows)}

## Time to embed one task ({s.hidden}-filter Conv4 probe, 1 sampled label per example)

Head fit and Fisher included; {args.threads} torch thread(s).

{table(["examples", "seconds", "ms / example"], timing_rows)}

```
{summary_line}
```
"""
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc)
    print(table(["selection", "test error"], summary_rows))
    print(f"wrote {out} ({total:.0f} s)")
    print(summary_line)
    return mean


if __name__ == "__main__":
    main(sys.argv[1:])
