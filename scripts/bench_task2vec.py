"""Task2Vec on Omniglot: expert selection among alphabet experts (the default, under a protocol), and
the paper's three qualitative results on transformed domains (a second, labelled setting).

    python scripts/bench_task2vec.py                             # alphabets: protocol, 5 seeds
    python scripts/bench_task2vec.py --setting transforms --quick   # domains: one fold, one seed

**Alphabets** (the default; ``benchmarks/protocols/task2vec_alphabets.yaml`` fixes every setting):
tasks are alphabets, one Conv4 expert per alphabet. Each alphabet in turn is the held-out new task; the
candidates are the other alphabets' experts; Task2Vec (``d_asym``, alpha 0.15) picks one from the
embeddings of the experts' training tasks and of the new task's training split. Compared on the new
task's test split (a linear head on the expert's frozen features): the picked expert, the oracle (the
best candidate on the test split), a random candidate (the mean over candidates) and the generic expert
(trained on the union of the candidates' data, with the experts' epochs), which is also the probe. The
last line is ``SUMMARY setting=alphabets task2vec_err=<t> oracle_err=<o> random_err=<r> generic_err=<g>
ci95=<c> ... seeds=<n> protocol=<hash>``, with ``ci95`` the 95 % t interval of task2vec_err over seeds.

**Transforms** (``--setting transforms``; Achille et al. 2019, Sects. 4-5, at CPU scale):

* the alphabets are cut into two halves; in a fold one half is *seen* (the probe and the experts are
  trained on it) and the other *unseen* (the new tasks come from it);
* **domains** built from the same images: ``upright``, ``rotated`` (90 degrees), ``negative``
  (1 - x) and ``small`` (half size, centred). The **model zoo**: one Conv4 *expert* per domain,
  trained on the seen alphabets in that domain, and a *generic* expert trained on all domains mixed;
* the **probe** (:func:`tasklight.task2vec.omniglot_probe`): a Conv4 trained on the seen alphabets,
  upright, each character in four rotations as four classes; it is none of the experts;
* **new tasks**: each unseen alphabet, in each domain, cut into two tasks (halves of its
  characters; ``--quick``: the first half only); training split ``shots`` drawers per character,
  test split the other drawers.

Measured (both estimators, ``montecarlo`` and ``variational``, on the same probe and data):

(a) taxonomy: 5-way upright tasks of the unseen alphabets; Spearman rank correlation between
    ``d_sym`` and "different alphabet" (0/1) over all task pairs, with a 95 % bootstrap CI over
    tasks, for several embedding seeds;
(b) transfer: Spearman correlation between ``d_asym(expert task -> new task)`` and the fine-tuning
    gain (error from scratch minus error of the fine-tuned expert) over all (expert, new task)
    pairs; the paper reports that nearer experts transfer better, i.e. a negative correlation
    with the distance, a positive one with ``-d_asym``, which is what is reported;
(c) expert selection: mean test error (linear head on the expert's frozen features) of the expert
    Task2Vec picks (``d_asym``, alpha = 0.15), of the oracle (best expert on the test split), of a
    random expert (expected) and of the generic expert.

It writes docs/bench_task2vec_transforms.md and ends with ``SUMMARY setting=transforms task2vec_err=<t>
oracle_err=<o> random_err=<r> generic_err=<g> seeds=1`` for the variational estimate.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tasklight.data.omniglot import load_omniglot
from tasklight.nn.nets import Conv4
import _bench
from tasklight.protocol import holm, load_protocol, paired
from tasklight.task2vec import (Task2Vec, bootstrap_interval, distance_matrix, finetune_error, omniglot_probe,
                                rank_experts, spearman, taxonomy_correlation, train_classifier, transfer_error)

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = REPO / "benchmarks" / "protocols" / "task2vec_alphabets.yaml"
METHODS = ("variational", "montecarlo")
BETA = 1e-4  # the variational KL weight for this probe: its Fisher per weight is ~1e4 x a ResNet-34's


@dataclass
class Settings:
    folds: int
    hidden: int
    probe_epochs: int
    expert_epochs: int
    max_examples: int
    mc_samples: int
    variational_steps: int
    finetune_steps: int
    taxonomy_seeds: int
    task_parts: int
    probe_rotations: int
    generic_fraction: float
    shots: int = 5
    bootstrap: int = 1000


QUICK = Settings(folds=1, hidden=16, probe_epochs=2, expert_epochs=2, max_examples=150, mc_samples=2,
                 variational_steps=150, finetune_steps=10, taxonomy_seeds=2, task_parts=1, probe_rotations=1,
                 generic_fraction=1.0)
FULL = Settings(folds=2, hidden=32, probe_epochs=4, expert_epochs=6, max_examples=400, mc_samples=2,
                variational_steps=200, finetune_steps=40, taxonomy_seeds=5, task_parts=2, probe_rotations=4,
                generic_fraction=1.0)


# ------------------------------------------------------------------------------------- domains
def small(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1]
    out = torch.zeros_like(x)
    lo = h // 4
    out[..., lo: lo + h // 2, lo: lo + h // 2] = F.interpolate(x, size=(h // 2, h // 2), mode="area")
    return out


DOMAINS = {
    "upright": lambda x: x,
    "rotated": lambda x: torch.rot90(x, 1, dims=(2, 3)),
    "negative": lambda x: 1.0 - x,
    "small": small,
}


def fmt(v: float) -> str:
    return f"{v:.3f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def halves(alphabets: list[str], sizes: list[int]) -> list[tuple[list[str], list[str]]]:
    """Two halves with similar numbers of characters (greedy), each in turn the seen half."""
    order = sorted(range(len(alphabets)), key=lambda i: -sizes[i])
    parts: list[list[int]] = [[], []]
    for i in order:
        target = min((0, 1), key=lambda h: (sum(sizes[j] for j in parts[h]), len(parts[h])))
        parts[target].append(i)
    a, b = ([alphabets[i] for i in sorted(h)] for h in parts)
    return [(a, b), (b, a)]


# ------------------------------------------------------------------------------------- main
def drawer_split(seed: int, zoo: int, train: int, test: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A seeded permutation of the 20 drawers cut into the zoo's, the new task's training and its test
    drawers (disjoint)."""
    if zoo + train + test > 20 or min(zoo, train, test) < 1:
        raise ValueError(f"drawers zoo={zoo}, train={train}, test={test}: each at least 1 and at most 20 in all")
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(seed))
    return perm[:zoo], perm[zoo: zoo + train], perm[zoo + train: zoo + train + test]


def leave_one_out(names: list[str]) -> list[tuple[str, list[str]]]:
    """(held-out alphabet, candidate alphabets): every alphabet in turn, the candidates all the others."""
    return [(h, [a for a in names if a != h]) for h in names]


def alphabet_seed(protocol: str, seed: int, quick: bool, threads: int) -> dict:
    """One test seed of the alphabet setting: the zoo, every held-out alphabet in turn, each arm's error
    (one process per seed with ``--jobs``; the results do not depend on it)."""
    torch.set_num_threads(threads)
    proto = load_protocol(protocol)
    b, m, t2v, dr = proto.budget, proto.extra["model"], proto.extra["task2vec"], proto.extra["drawers"]
    (config,) = proto.grid_for("task2vec")
    alpha, hidden = float(config["alpha"]), int(m["hidden"])
    epochs, gepochs = (1, 1) if quick else (int(b["expert_epochs"]), int(b["generic_epochs"]))
    data = load_omniglot()
    x_all = data.images.float().div(255.0).unsqueeze(1)
    size = int(m["image_size"])
    if size != x_all.shape[-1]:
        x_all = F.interpolate(x_all, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    names = list(data.alphabets)
    rows, picks = [], 0
    zoo_d, train_d, test_d = drawer_split(seed, int(dr["zoo"]), int(dr["train"]), int(dr["test"]))
    in_zoo, in_train, in_test = (torch.isin(data.image_drawer, d) for d in (zoo_d, train_d, test_d))

    def alpha_mask(alphabets, drawers_mask):
        ids = torch.tensor([names.index(a) for a in alphabets])
        return torch.isin(data.image_alphabet, ids) & drawers_mask

    def train_net(alphabets, ep, net_seed):
        mk = alpha_mask(alphabets, in_zoo)
        y = data.image_character[mk]
        torch.manual_seed(net_seed)
        net = Conv4(out_features=len(torch.unique(y)), hidden=hidden, image_size=x_all.shape[-1])
        return train_classifier(net, x_all[mk], y, ep, lr=float(b["lr"]), batch_size=int(b["batch_size"]),
                                seed=net_seed)

    t0 = time.perf_counter()
    experts = {a: train_net([a], epochs, 1000 * seed + k) for k, a in enumerate(names)}
    zoo_tasks = {a: (x_all[alpha_mask([a], in_zoo)], data.image_character[alpha_mask([a], in_zoo)]) for a in names}
    print(f"seed {seed}: {len(experts)} experts trained in {time.perf_counter() - t0:.0f} s", flush=True)
    per = {a: [] for a in proto.arms}
    for k, (held, cands) in enumerate(leave_one_out(names)):
        generic = train_net(cands, gepochs, 1000 * seed + 100 + k)
        embedder = Task2Vec(generic, method=t2v["method"], mc_samples=int(t2v["mc_samples"]),
                            max_examples=int(t2v["max_examples"]), seed=seed)
        tr = (x_all[alpha_mask([held], in_train)], data.image_character[alpha_mask([held], in_train)])
        te = (x_all[alpha_mask([held], in_test)], data.image_character[alpha_mask([held], in_test)])
        cand_emb = {a: embedder.embed(zoo_tasks[a], a) for a in cands}
        ranking = rank_experts(embedder.embed(tr, held), cand_emb, alpha=alpha)
        errors = {a: transfer_error(experts[a], tr, te) for a in cands}
        oracle = min(errors, key=errors.__getitem__)
        row = {"task2vec": errors[ranking.chosen], "oracle": errors[oracle],
               "random": statistics.fmean(errors.values()), "generic": transfer_error(generic, tr, te)}
        for a in proto.arms:
            per[a].append(row[a])
        picks += errors[ranking.chosen] == errors[oracle]
        rows.append([str(seed), held, ranking.chosen, f"{row['task2vec']:.3f}", oracle, f"{row['oracle']:.3f}",
                     f"{row['random']:.3f}", f"{row['generic']:.3f}"])
        print("  " + " | ".join(rows[-1]), flush=True)
    return {"per": per, "rows": rows, "picks": picks, "zoo": sorted(zoo_d.tolist()), "names": names}


def run_alphabets(argv: list[str] | None) -> dict:
    """The alphabet setting under its protocol (see the module docstring)."""
    p = _bench.parser(__doc__, str(REPO / "docs" / "bench_task2vec.md"))
    p.add_argument("--setting", choices=("alphabets",), default="alphabets")
    p.add_argument("--protocol", default=str(PROTOCOL))
    p.add_argument("--jobs", type=int, default=5, help="seeds run in this many processes at once (the results do "
                   "not depend on it)")
    args = p.parse_args(argv)
    if args.seeds is not None:
        p.error("--seeds: the test seeds are the protocol's (test_seeds in the protocol file)")
    _bench.setup(args)
    proto = load_protocol(args.protocol)
    b, m, t2v, dr = proto.budget, proto.extra["model"], proto.extra["task2vec"], proto.extra["drawers"]
    (config,) = proto.grid_for("task2vec")
    alpha, hidden = float(config["alpha"]), int(m["hidden"])
    seeds = list(proto.test_seeds)
    epochs, gepochs = int(b["expert_epochs"]), int(b["generic_epochs"])
    if args.quick:  # a smoke run of the code path, not a result
        seeds, epochs, gepochs = seeds[:2], 1, 1
    t_start = time.perf_counter()
    if args.jobs > 1 and len(seeds) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(args.jobs, len(seeds)), mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(alphabet_seed, str(proto.path), s, args.quick, args.threads) for s in seeds]
            per_seed = [f.result() for f in futures]
    else:
        per_seed = [alphabet_seed(str(proto.path), s, args.quick, args.threads) for s in seeds]
    errs = {a: [statistics.fmean(r["per"][a]) for r in per_seed] for a in proto.arms}  # mean over alphabets
    rows = [row for r in per_seed for row in r["rows"]]
    picks = sum(r["picks"] for r in per_seed)
    names, zoo_d, size = per_seed[0]["names"], per_seed[-1]["zoo"], int(m["image_size"])
    total = time.perf_counter() - t_start
    mean_ci = {a: paired(errs[a], [0.0] * len(errs[a])) for a in proto.arms}
    diffs = {a: paired(errs["task2vec"], errs[a]) for a in proto.arms if a != "task2vec"}
    p_holm = holm({a: d["p"] for a, d in diffs.items()})
    cmd = " ".join(["python scripts/bench_task2vec.py"] + (argv or []))
    lines = _bench.header("Task2Vec benchmark", cmd, args.threads, total)
    lines[-2] += f" Load average (1 min) at the end: {os.getloadavg()[0]:.1f}."
    lines += ["## Expert selection among alphabet experts" + (" (--quick smoke run)" if args.quick else ""), ""]
    lines += proto.describe()
    lines += [f"Tasks are the {len(names)} alphabets of the two small background zips. Per seed, drawers "
              f"{zoo_d} of the last seed (a seeded permutation per seed) make the zoo's data, "
              f"{dr['train']} drawers the new task's training split and {dr['test']} its test split; images "
              f"resized to {size}x{size}. Experts: Conv4 (width {hidden}), {epochs} epochs of Adam (lr {b['lr']}, batches of {b['batch_size']}) on "
              f"one alphabet's zoo drawers. Each alphabet in turn is held out: the candidates are the other "
              f"{len(names) - 1} experts; the generic expert, also the probe, is a Conv4 trained {gepochs} epochs "
              f"on the union of the candidates' zoo data. Task2Vec: {t2v['method']} Fisher, at most "
              f"{t2v['max_examples']} examples per task, `d_asym` with alpha {alpha}. Error: a linear head on the "
              f"frozen features fitted on the new task's training split, error on its test split. Per seed, "
              f"each arm's error is the mean over the {len(names)} held-out alphabets; mean ± 95 % t interval over "
              f"{len(seeds)} seeds. Task2Vec picked the oracle in {picks} of {len(rows)} cases.", "",
              "| arm | test error, mean ± 95 % CI | task2vec minus arm, mean ± 95 % CI | Holm p |",
              "|---|---|---|---|"]
    for a in proto.arms:
        diff = "" if a == "task2vec" else f"{diffs[a]['mean']:+.4f} ± {diffs[a]['ci95']:.4f}"
        lines.append(f"| {a} | {mean_ci[a]['mean']:.4f} ± {mean_ci[a]['ci95']:.4f} | {diff} | "
                     f"{'' if a == 'task2vec' else f'{p_holm[a]:.3f}'} |")
    lines += ["", "Per seed and held-out alphabet:", "",
              table(["seed", "held-out alphabet", "task2vec pick", "its error", "oracle", "oracle error",
                     "random error", "generic error"], rows), ""]
    mc = mean_ci
    summary = (f"SUMMARY setting=alphabets task2vec_err={mc['task2vec']['mean']:.4f} "
               f"oracle_err={mc['oracle']['mean']:.4f} random_err={mc['random']['mean']:.4f} "
               f"generic_err={mc['generic']['mean']:.4f} ci95={mc['task2vec']['ci95']:.4f} "
               f"minus_oracle={diffs['oracle']['mean']:.4f} ci95_minus_oracle={diffs['oracle']['ci95']:.4f} "
               f"minus_random={diffs['random']['mean']:.4f} ci95_minus_random={diffs['random']['ci95']:.4f} "
               f"minus_generic={diffs['generic']['mean']:.4f} ci95_minus_generic={diffs['generic']['ci95']:.4f} "
               f"seeds={len(seeds)} protocol={proto.hash}")
    print("\n".join(lines))
    if args.quick:
        print(summary.replace("SUMMARY", "SMOKE"))
        return errs
    _bench.write_results(args.out, lines, summary, total)
    return errs


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if "transforms" not in argv:
        return run_alphabets(argv)
    return run_transforms(argv)


def run_transforms(argv: list[str] | None = None) -> dict:
    """The transformed-domain setting (one fold and seed with --quick); see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=("transforms",), required=True)
    parser.add_argument("--quick", action="store_true", help="one fold, fewer steps (a few minutes on 1 thread)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on shared cores)")
    parser.add_argument("--alpha", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(REPO / "docs" / "bench_task2vec_transforms.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    s = QUICK if args.quick else FULL
    t_start = time.perf_counter()

    data = load_omniglot()
    x_all = data.images.float().div(255.0).unsqueeze(1)
    per_alpha = torch.bincount(data.character_alphabet, minlength=len(data.alphabets)).tolist()
    alpha_ids = lambda names: torch.tensor([data.alphabets.index(a) for a in names])  # noqa: E731

    def embedder(probe, method, seed):
        opts = dict(max_examples=s.max_examples, seed=seed)
        if method == "variational":
            return Task2Vec(probe, method="variational", beta=BETA, variational_steps=s.variational_steps, **opts)
        return Task2Vec(probe, method="montecarlo", mc_samples=s.mc_samples, **opts)

    sel = {m: {"task2vec": [], "task2vec_sym": []} for m in METHODS}
    sel_common = {"oracle": [], "random": [], "generic": []}
    picks_oracle = {m: 0 for m in METHODS}
    transfer_pairs = {m: [] for m in METHODS}  # (task index, d_asym, gain)
    taxonomy = {m: [] for m in METHODS}
    agreement, embed_time = [], {m: [] for m in METHODS}
    rows, task_index = [], 0
    fold_notes = []
    for fold, (seen, unseen) in enumerate(halves(data.alphabets, per_alpha)[: s.folds]):
        t0 = time.perf_counter()
        m_seen = torch.isin(data.image_alphabet, alpha_ids(seen))
        xs, ys = x_all[m_seen], data.image_character[m_seen]
        probe = omniglot_probe(xs, ys, hidden=s.hidden, epochs=s.probe_epochs, rotations=s.probe_rotations,
                               seed=args.seed + 10 * fold)
        experts, expert_tasks = {}, {}
        for k, (dname, dom) in enumerate(DOMAINS.items()):
            torch.manual_seed(args.seed + 100 * fold + k)
            net = Conv4(out_features=len(torch.unique(ys)), hidden=s.hidden)
            experts[dname] = train_classifier(net, dom(xs), ys, s.expert_epochs, seed=args.seed + 100 * fold + k)
            expert_tasks[dname] = (dom(xs), ys)
        mixed_x = torch.cat([dom(xs) for dom in DOMAINS.values()])
        mixed_y = torch.cat([ys for _ in DOMAINS])
        keep = torch.randperm(len(mixed_x), generator=torch.Generator().manual_seed(args.seed + fold))
        keep = keep[: int(s.generic_fraction * len(keep))]
        mixed_x, mixed_y = mixed_x[keep], mixed_y[keep]
        torch.manual_seed(args.seed + 100 * fold + 99)
        generic = train_classifier(Conv4(out_features=len(torch.unique(ys)), hidden=s.hidden), mixed_x, mixed_y,
                                   s.expert_epochs, seed=args.seed + 100 * fold + 99)
        fold_notes.append(f"fold {fold}: seen {', '.join(seen)}; unseen {', '.join(unseen)}")
        print(f"fold {fold}: probe, {len(experts)} experts and the generic expert trained in "
              f"{time.perf_counter() - t0:.0f}s (seen: {', '.join(seen)})", flush=True)

        embedders = {m: embedder(probe, m, args.seed) for m in METHODS}
        expert_emb = {m: {n: e.embed(t, n) for n, t in expert_tasks.items()} for m, e in embedders.items()}

        # ---------------------------------------------------------------- (a) taxonomy
        tax_tasks, tax_alpha = {}, []
        gen = torch.Generator().manual_seed(args.seed + 7 + fold)
        for a in unseen:
            chars = (data.character_alphabet == data.alphabets.index(a)).nonzero().flatten()
            chars = chars[torch.randperm(len(chars), generator=gen)]
            for k in range(len(chars) // 5):
                mk = torch.isin(data.image_character, chars[5 * k: 5 * (k + 1)])
                tax_tasks[f"{a}/{k}"] = (x_all[mk], data.image_character[mk])
                tax_alpha.append(a)
        for method in METHODS:
            for seed in range(s.taxonomy_seeds):
                e = embedder(probe, method, args.seed + 1000 * seed)
                t1 = time.perf_counter()
                embs = e.embed_tasks(tax_tasks)
                embed_time[method].append((time.perf_counter() - t1) / len(tax_tasks))
                d = distance_matrix(embs)
                n = len(tax_tasks)
                rho, lo, hi = taxonomy_correlation(d, tax_alpha, s.bootstrap, seed)
                taxonomy[method].append((fold, seed, n, rho, lo, hi))
                if method == "variational" and seed == 0:
                    d_var = d
                if method == "montecarlo" and seed == 0:
                    iu = torch.triu_indices(n, n, 1)
                    agreement.append(spearman(d_var[iu[0], iu[1]], d[iu[0], iu[1]]))
            print(f"  (a) {method:<11} rho(d_sym, different alphabet) over {len(tax_tasks)} tasks: "
                  + ", ".join(f"{r:.3f} [{lo:.3f}, {hi:.3f}]" for *_, r, lo, hi in taxonomy[method][-s.taxonomy_seeds:]),
                  flush=True)

        # ---------------------------------------------------------------- (b), (c) new tasks
        gen = torch.Generator().manual_seed(args.seed + fold)
        for a in unseen:
            chars = (data.character_alphabet == data.alphabets.index(a)).nonzero().flatten()
            chars = chars[torch.randperm(len(chars), generator=gen)]
            for part, subset in enumerate((chars[: len(chars) // 2], chars[len(chars) // 2:])[: s.task_parts]):
                mk = torch.isin(data.image_character, subset)
                tr_m, te_m = mk & (data.image_drawer < s.shots), mk & (data.image_drawer >= s.shots)
                for dname, dom in DOMAINS.items():
                    task = f"{a}/{part}/{dname}"
                    tr = (dom(x_all[tr_m]), data.image_character[tr_m])
                    te = (dom(x_all[te_m]), data.image_character[te_m])
                    errors = {n: transfer_error(ex, tr, te) for n, ex in experts.items()}
                    generic_err = transfer_error(generic, tr, te)
                    oracle = min(errors, key=errors.__getitem__)
                    random_err = sum(errors.values()) / len(errors)
                    scratch = finetune_error(None, tr, te, steps=s.finetune_steps, seed=args.seed,
                                             init=lambda: Conv4(out_features=len(subset), hidden=s.hidden))
                    gains = {n: scratch - finetune_error(ex, tr, te, steps=s.finetune_steps, seed=args.seed)
                             for n, ex in experts.items()}
                    sel_common["oracle"].append(errors[oracle])
                    sel_common["random"].append(random_err)
                    sel_common["generic"].append(generic_err)
                    row = [task, str(len(subset)), oracle, fmt(errors[oracle]), fmt(random_err), fmt(generic_err)]
                    for method in METHODS:
                        emb = embedders[method].embed(tr, task)
                        ranking = rank_experts(emb, expert_emb[method], alpha=args.alpha)
                        ranking_sym = rank_experts(emb, expert_emb[method], alpha=0.0)
                        sel[method]["task2vec"].append(errors[ranking.chosen])
                        sel[method]["task2vec_sym"].append(errors[ranking_sym.chosen])
                        picks_oracle[method] += errors[ranking.chosen] == errors[oracle]
                        for n, dist in zip(ranking.experts, ranking.distances):
                            transfer_pairs[method].append((task_index, dist, gains[n]))
                        row += [ranking.chosen, fmt(errors[ranking.chosen])]
                    rows.append(row)
                    task_index += 1
                    print(f"  {task:<34} oracle={oracle:<9} {errors[oracle]:.3f} random={random_err:.3f} "
                          f"generic={generic_err:.3f} | " + " ".join(f"{row[6 + 2 * i]}:{row[7 + 2 * i]}"
                                                                    for i in range(len(METHODS))), flush=True)

    # ------------------------------------------------------------------ summaries
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    n_tasks = len(rows)
    transfer_rows = []
    for method in METHODS:
        pairs = transfer_pairs[method]
        tidx = torch.tensor([p[0] for p in pairs])
        neg_d = -torch.tensor([p[1] for p in pairs])
        gain = torch.tensor([p[2] for p in pairs])
        rho = spearman(neg_d, gain)

        def stat(idx, neg_d=neg_d, gain=gain, tidx=tidx):
            sel_pairs = torch.cat([(tidx == i).nonzero().flatten() for i in idx.tolist()])
            return spearman(neg_d[sel_pairs], gain[sel_pairs])

        lo, hi = bootstrap_interval(stat, n_tasks, s.bootstrap, 1)
        transfer_rows.append([method, str(len(pairs)), fmt(rho), f"[{lo:.3f}, {hi:.3f}]"])
    sel_rows = []
    for method in METHODS:
        sel_rows.append([f"Task2Vec {method} (d_asym, alpha={args.alpha:.2f})", fmt(mean(sel[method]["task2vec"])),
                         f"{picks_oracle[method]}/{n_tasks}"])
        sel_rows.append([f"Task2Vec {method} (d_sym)", fmt(mean(sel[method]["task2vec_sym"])), ""])
    sel_rows += [["oracle (best expert on the test split)", fmt(mean(sel_common["oracle"])), ""],
                 ["random expert (expected)", fmt(mean(sel_common["random"])), ""],
                 ["generic expert (all domains mixed)", fmt(mean(sel_common["generic"])), ""]]
    tax_rows = [[m, str(f), str(seed), str(n), fmt(r), f"[{lo:.3f}, {hi:.3f}]"]
                for m in METHODS for f, seed, n, r, lo, hi in taxonomy[m]]
    t2v, orc, rnd = mean(sel["variational"]["task2vec"]), mean(sel_common["oracle"]), mean(sel_common["random"])
    gen_err = mean(sel_common["generic"])
    summary_line = (f"SUMMARY setting=transforms task2vec_err={t2v:.4f} oracle_err={orc:.4f} random_err={rnd:.4f} "
                    f"generic_err={gen_err:.4f} seeds=1")
    total = time.perf_counter() - t_start
    command = "python scripts/bench_task2vec.py --setting transforms" + (" --quick" if args.quick else "")
    per_task_header = ["new task", "classes", "oracle expert", "oracle err", "random err", "generic err"]
    for m in METHODS:
        per_task_header += [f"{m} choice", f"{m} err"]
    doc = f"""# Task2Vec benchmark, transformed domains (one seed, no interval)

Command: `{command}`
Date: {datetime.date.today().isoformat()}
Machine: CPU, 2 shared cores, {args.threads} torch thread(s); total time {total:.0f} s (load average
{load_at_start:.1f} at the start: the cores are shared, so times vary with other jobs; the errors and
correlations do not depend on the load).

Settings: {s.folds} fold(s) ({'; '.join(fold_notes)}). Probe: Conv4 with {s.hidden} filters trained
{s.probe_epochs} epochs on the seen alphabets, upright, {s.probe_rotations} rotation(s) as separate classes
per character. Zoo: one Conv4 expert per domain ({', '.join(DOMAINS)}), {s.expert_epochs} epochs on the seen
alphabets in that domain, and a generic expert, {s.expert_epochs} epochs on
{s.generic_fraction:.0%} of the images of all domains mixed (the union of the experts' data, their epochs).
New tasks: {'half' if s.task_parts == 2 else 'the first half'} of each unseen alphabet's characters in each domain. Task2Vec with at most {s.max_examples}
examples per task; variational: beta = {BETA:g}, {s.variational_steps} Adam steps (lr 0.1 on the log-variances,
batches of 32, the last half averaged);
Monte-Carlo: {s.mc_samples} sampled label(s) per example. New tasks: half an unseen alphabet each, in
each domain, {s.shots} training drawers per character, the other 15 for testing. Errors: a linear head
(L-BFGS) on the expert's frozen features; fine-tuning: that head, then {s.finetune_steps} full-batch Adam
steps on every weight (lr 1e-3).

## (a) Task distances track the taxonomy

Spearman correlation between `d_sym` and "different alphabet" over all pairs of 5-way upright tasks
of the unseen alphabets (positive: tasks of the same alphabet are closer); 95 % bootstrap interval
over tasks; one row per embedding seed.

{table(["estimator", "fold", "seed", "tasks", "Spearman", "95 % CI"], tax_rows)}

Agreement of the two estimators: Spearman correlation between their `d_sym` over the same task
pairs (seed 0): {', '.join(fmt(a) for a in agreement)}. Time to embed one 100-example task:
variational {mean(embed_time['variational']):.2f} s, Monte-Carlo {mean(embed_time['montecarlo']):.2f} s.

## (b) Distance predicts transfer

Spearman correlation between `-d_asym(expert task -> new task)` and the fine-tuning gain (error
from scratch minus error of the fine-tuned expert), over all (expert, new task) pairs; 95 % bootstrap
interval over new tasks.

{table(["estimator", "pairs", "Spearman", "95 % CI"], transfer_rows)}

## (c) Expert selection: mean test error over {n_tasks} new tasks

{table(["selection", "test error", "picked the oracle"], sel_rows)}

Relative gap to the oracle (variational, d_asym): {(t2v - orc) / orc:+.1%}; the paper reports about 10 %.

## Per task

{table(per_task_header, rows)}

```
{summary_line}
```
"""
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc)
    print(table(["selection", "test error", "picked the oracle"], sel_rows))
    print(table(["estimator", "pairs", "Spearman", "95 % CI"], transfer_rows))
    print(f"wrote {out} ({total:.0f} s)")
    print(summary_line)
    return dict(task2vec=t2v, oracle=orc, random=rnd, taxonomy=taxonomy, transfer=transfer_rows)


if __name__ == "__main__":
    main()
