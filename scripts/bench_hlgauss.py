"""Benchmark: HL-Gauss histogram loss vs MSE, side by side, several seeds, mean and 95 % CI.

1. Sinusoid meta-learning (Finn et al. 2017): MAML with a 1-40-40-k MLP trained with HL-Gauss over k
   bins vs the same MAML with a 1-40-40-1 MLP and MSE; 5-shot MSE on the query points of the test
   tasks (the same tasks for both losses) after 1, 5 and 10 adaptation steps; both are meta-trained with
   5 inner steps. The inner learning rates, the inner steps of meta-training and the outer learning rate
   were chosen on the validation tasks of seeds 0 and 1 (not the benchmark's seeds 100, 101, ...; the
   ``validate_sinusoid`` helper runs candidates on them); see docs/histogram_losses.md.
2. Tabular regression on data that ships with scikit-learn: the diabetes data (442 patients, 10
   features) and Friedman's three regression problems (``make_friedman1/2/3``, 1000 points each).
   A 64-64 MLP; random 60/20/20 splits; every run stops early on the validation RMSE. Each loss gets
   the same number of candidate settings (MSE: two Adam learning rates; HL-Gauss: sigma = 0.75 bin
   widths, tasklight's default after Farebrother et al. 2024, and 2 bin widths, the default of
   ``hl-gauss-pytorch``), and per seed the candidate with the lowest validation RMSE is reported
   (its test RMSE in the target's units). HL-Gauss fits its support to the training targets
   (``support="auto"``, 10 % margin).

Writes docs/bench_hlgauss.md and ends with one line

    SUMMARY hl_over_mse_rmse=<geo-mean ratio> worst=<max ratio> <dataset>=<ratio> ...

where each ratio is RMSE(HL-Gauss) / RMSE(MSE) of the seed means (below 1: the histogram loss wins);
the sinusoid ratio is the square root of the ratio of the query MSEs after 10 adaptation steps.

Usage:
    python scripts/bench_hlgauss.py --quick --jobs 3   # 54 runs (6 MAML, 48 tabular) in 3 processes
    python scripts/bench_hlgauss.py                    # 5 MAML seeds of 4000 meta-steps, 10 tabular seeds
"""
from __future__ import annotations

import functools
import math
import os
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn

from _bench import fit_and_test, header, parser, setup, write_results
from tasklight.data.sinusoid import SinusoidDataModule
from tasklight.meta.maml import MAMLModule
from tasklight.nn.losses import HistogramLoss
from tasklight.nn.nets import MLP

ROOT = Path(__file__).resolve().parents[1]

# Sinusoid settings, chosen on the validation tasks of seeds 0 and 1 (docs/histogram_losses.md); the same as
# configs/maml_sinusoid_hlgauss.yaml. The benchmark's seeds (100, 101, ...) were not used to choose them.
SINUSOID_BINS, SINUSOID_SIGMA = 10, 1.5  # sigma in bin widths
MAML_INNER_LR = {"mse": 0.003, "hlgauss": 0.1}
SINUSOID_INNER_LOSS = {"mse": None, "hlgauss": None}  # None: the inner loop descends the outer loss
OUTER_LR = 3e-3
TRAIN_INNER_STEPS = {"mse": 5, "hlgauss": 5}  # inner steps in meta-training (10 at test, for both)
SEED_OFFSET = 100
SINUSOID_NOTE = (
    'How the settings were chosen: both losses get the same kinds of candidates, and each takes the one with '
    'the lowest validation MSE after 10 steps (100 validation tasks of seeds 0 and 1). Meta-trained with 1 inner '
    'step, HL-Gauss tied MSE after that step and lost after 10 (its later cross-entropy steps move the predicted '
    'means less than MSE steps); meta-trained with the 5 steps of adaptation it is later evaluated near, both '
    'losses improve on validation (MSE at inner lr 0.003, HL-Gauss at 0.1). A squared-error inner loss on the '
    "histogram's mean (inner_loss='mse_of_prediction') with the cross-entropy as the outer loss did not help. "
    'Measurements: '
    '[histogram_losses.md](histogram_losses.md#bins-sigma-and-the-inner-learning-rate-in-a-few-shot-inner-loop).'
)

# Tabular: every loss gets the same number of candidate settings; per seed, the candidate with the lowest
# validation RMSE is reported (its test RMSE). MSE's only knob is the learning rate; HL-Gauss keeps the
# learning rate of the first MSE candidate and varies the Gaussian's width.
TABULAR_BINS = 16
BATCH, MAX_EPOCHS, PATIENCE = 64, 300, 40
FRIEDMAN_NOISE = {"friedman1": 1.0, "friedman2": 125.0, "friedman3": 0.1}
CANDIDATES = {  # loss -> candidate name -> (sigma in bin widths or None for MSE, Adam learning rate)
    "mse": {"mse lr 3e-3": (None, 3e-3), "mse lr 1e-3": (None, 1e-3)},
    "hlgauss": {"HL sigma 0.75 bins": (0.75, 3e-3), "HL sigma 2 bins": (2.0, 3e-3)},
}


# ------------------------------------------------------------------ statistics
def ci95(values: list[float]) -> float:
    """Half-width of the 95 % confidence interval of the mean (Student t over seeds)."""
    from scipy.stats import t

    n = len(values)
    return float(t.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n)) if n > 1 else float("nan")


def fmt_ci(values: list[float], digits: int = 3) -> str:
    return f"{statistics.fmean(values):.{digits}f} ± {ci95(values):.{digits}f}"


# ------------------------------------------------------------------ sinusoid meta-learning
def sinusoid_run(loss_name: str, seed: int, steps: int, test_episodes: int, inner_loss=None, inner_lr=None,
                 train_inner_steps: int | None = None, validate: bool = False) -> dict:
    """One MAML run; the query MSE after 1, 5, 10 steps on the test tasks (``validate``: on 100 validation
    tasks instead, for choosing settings on seeds that the benchmark does not use)."""
    L.seed_everything(seed, verbose=False)
    dm = SinusoidDataModule(k_shot=5, q_queries=10, meta_batch_size=25, batches_per_epoch=steps,
                            val_episodes=100 if validate else 25, test_episodes=test_episodes, seed=seed)
    if loss_name == "mse":
        net, loss = MLP(1, [40, 40], 1), "mse"
    else:  # support auto: fitted to the training targets by the learner
        net, loss = MLP(1, [40, 40], SINUSOID_BINS), HistogramLoss(SINUSOID_BINS, sigma=SINUSOID_SIGMA)
    inner_loss = SINUSOID_INNER_LOSS[loss_name] if inner_loss is None else inner_loss
    train_inner_steps = TRAIN_INNER_STEPS[loss_name] if train_inner_steps is None else train_inner_steps
    module = MAMLModule(net, loss=loss, inner_loss=inner_loss, inner_steps=train_inner_steps,
                        inner_lr=MAML_INNER_LR[loss_name] if inner_lr is None else inner_lr,
                        eval_inner_steps=10, extra_eval_steps=[1, 5],
                        optimizer=functools.partial(torch.optim.Adam, lr=OUTER_LR))
    res, fit_s = fit_and_test(module, dm, steps, split="val" if validate else "test")
    out = {f"mse@{k}": res[f"test/mse@{k}"] for k in (1, 5, 10)} | {"fit_s": fit_s}
    if loss_name != "mse":
        out["support"] = (module.loss_fn.v_min, module.loss_fn.v_max)
    return out


def validate_sinusoid(variants: dict, jobs: int, threads: int, steps: int = 1000) -> None:
    """Each variant (name -> sinusoid_run keyword arguments) on the validation tasks of seeds 0 and 1."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=torch.set_num_threads,
                             initargs=(threads,)) as pool:
        futures = {(name, s): pool.submit(sinusoid_run, kw["loss_name"], s, steps, 25, kw.get("inner_loss"),
                                          kw.get("inner_lr"), kw.get("train_inner_steps"), True)
                   for name, kw in variants.items() for s in (0, 1)}
        for (name, s), f in futures.items():
            r = f.result()
            print(f"VAL {name:40s} seed {s}: " + " / ".join(f"{r[f'mse@{k}']:.3f}" for k in (1, 5, 10))
                  + f"  ({r['fit_s']:.0f} s)", flush=True)


# ------------------------------------------------------------------ tabular regression
def tabular_data(name: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets

    if name == "diabetes":
        return datasets.load_diabetes(return_X_y=True)
    make = getattr(datasets, f"make_{name}")
    return make(n_samples=1000, noise=FRIEDMAN_NOISE[name], random_state=seed)


def signal_to_noise(name: str) -> float:
    """Std of the noiseless Friedman target over the noise std (how hard the problem is)."""
    from sklearn import datasets

    _, y = getattr(datasets, f"make_{name}")(n_samples=20000, noise=0.0, random_state=12345)
    return float(y.std() / FRIEDMAN_NOISE[name])


def tabular_run(name: str, sigma: float | None, lr: float, seed: int, max_epochs: int) -> dict:
    """One 64-64 MLP trained with MSE (``sigma=None``) or HL-Gauss (``sigma`` bin widths); early stopping on
    the validation RMSE (patience ``PATIENCE`` epochs). Returns the validation and test RMSE at the best epoch."""
    x_np, y_np = tabular_data(name, seed)
    x_all, y_all = torch.tensor(x_np, dtype=torch.float32), torch.tensor(y_np, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x_all), generator=gen)
    n_tr, n_va = int(0.6 * len(x_all)), int(0.2 * len(x_all))
    tr, va, te = perm[:n_tr], perm[n_tr:n_tr + n_va], perm[n_tr + n_va:]
    x_mu, x_sd = x_all[tr].mean(0), x_all[tr].std(0)
    y_mu, y_sd = y_all[tr].mean(), y_all[tr].std()
    x = (x_all - x_mu) / x_sd
    y_tr = (y_all[tr] - y_mu) / y_sd
    torch.manual_seed(seed)  # the same initial hidden layers for every loss
    if sigma is None:
        net, loss_fn = MLP(x.shape[1], [64, 64], 1), nn.MSELoss()
        predict = lambda out: out[:, 0]  # noqa: E731
        target = lambda idx: y_tr[idx, None]  # noqa: E731
    else:
        hl = HistogramLoss(TABULAR_BINS, sigma=sigma).fit_support(y_tr)
        net, loss_fn = MLP(x.shape[1], [64, 64], TABULAR_BINS), hl
        predict = lambda out: hl.predict(out, keepdim=False)  # noqa: E731
        target = lambda idx: y_tr[idx]  # noqa: E731
    opt = torch.optim.Adam(net.parameters(), lr=lr)

    def rmse(idx: torch.Tensor) -> float:
        with torch.no_grad():
            pred = predict(net(x[idx])) * y_sd + y_mu
        return float(((pred - y_all[idx]) ** 2).mean().sqrt())

    best = (math.inf, math.nan, 0)
    for epoch in range(max_epochs):
        for idx in torch.randperm(n_tr, generator=gen).split(BATCH):
            opt.zero_grad()
            loss_fn(net(x[tr[idx]]), target(idx)).backward()
            opt.step()
        val = rmse(va)
        if val < best[0]:
            best = (val, rmse(te), epoch + 1)
        elif epoch + 1 - best[2] >= PATIENCE:
            break
    return {"val": best[0], "rmse": best[1], "epoch": best[2]}


def select(runs: dict[str, dict]) -> dict:
    """The candidate with the lowest validation RMSE (ties: the first)."""
    name = min(runs, key=lambda k: runs[k]["val"])
    return runs[name] | {"chosen": name}


# ------------------------------------------------------------------ main
def main(argv=None) -> None:
    p = parser(__doc__, str(ROOT / "docs" / "bench_hlgauss.md"))
    p.add_argument("--jobs", type=int, default=1,
                   help="runs in parallel processes (each on --threads threads; the quality numbers do not change)")
    args = p.parse_args(argv)
    seeds = [SEED_OFFSET + s for s in setup(args)]
    meta_steps, test_episodes = (1000, 300) if args.quick else (4000, 600)
    tab_seeds = [SEED_OFFSET + s for s in range(3 if args.quick else 10)]
    max_epochs = MAX_EPOCHS
    names = ["diabetes", "friedman1", "friedman2", "friedman3"]
    t0, load = time.perf_counter(), os.getloadavg()

    jobs = {("sinusoid", name, s): (sinusoid_run, (name, s, meta_steps, test_episodes))
            for name in ("mse", "hlgauss") for s in seeds}
    jobs.update({(data, cand, s): (tabular_run, (data, sigma, lr, s, max_epochs))
                 for data in names for family in CANDIDATES.values() for cand, (sigma, lr) in family.items()
                 for s in tab_seeds})
    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"), initializer=torch.set_num_threads,
                                 initargs=(args.threads,)) as pool:
            futures = {key: pool.submit(fn, *fn_args) for key, (fn, fn_args) in jobs.items()}
            results = {key: f.result() for key, f in futures.items()}
    else:
        results = {key: fn(*fn_args) for key, (fn, fn_args) in jobs.items()}

    sin = {name: [results[("sinusoid", name, s)] for s in seeds] for name in ("mse", "hlgauss")}
    for name, runs in sin.items():
        print(f"sinusoid {name:8s} 5-shot MSE " + " ".join(f"@{k} {fmt_ci([r[f'mse@{k}'] for r in runs])}"
                                                          for k in (1, 5, 10)), flush=True)
    # tab[data][family] = per-seed selected runs; cand[data][candidate] = per-seed runs
    cand = {data: {c: [results[(data, c, s)] for s in tab_seeds] for fam in CANDIDATES.values() for c in fam}
            for data in names}
    tab = {data: {fam: [select({c: results[(data, c, s)] for c in CANDIDATES[fam]}) for s in tab_seeds]
                  for fam in CANDIDATES} for data in names}
    for name in names:
        print(f"{name:9s} " + "  ".join(f"{fam} {fmt_ci([r['rmse'] for r in runs])}"
                                        for fam, runs in tab[name].items()), flush=True)

    mean = lambda runs, key: statistics.fmean(r[key] for r in runs)  # noqa: E731
    ratios = {"sinusoid": math.sqrt(mean(sin["hlgauss"], "mse@10") / mean(sin["mse"], "mse@10"))}
    for name in names:
        ratios[name] = mean(tab[name]["hlgauss"], "rmse") / mean(tab[name]["mse"], "rmse")
    geo = math.exp(statistics.fmean(math.log(r) for r in ratios.values()))
    worst = max(ratios.values())
    summary = (f"SUMMARY hl_over_mse_rmse={geo:.3f} worst={worst:.3f} "
               + " ".join(f"{k}={v:.3f}" for k, v in ratios.items()))
    total = time.perf_counter() - t0

    def paired(a_runs: list[dict], b_runs: list[dict]) -> str:
        return fmt_ci([a["rmse"] / b["rmse"] for a, b in zip(a_runs, b_runs)])

    def chosen(runs: list[dict]) -> str:
        counts = {c: sum(r["chosen"] == c for r in runs) for c in dict.fromkeys(r["chosen"] for r in runs)}
        return ", ".join(f"{c} ({n})" for c, n in counts.items())

    sin_paired = fmt_ci([math.sqrt(a["mse@10"] / b["mse@10"]) for a, b in zip(sin["hlgauss"], sin["mse"])])
    sin_support = sorted({tuple(round(v, 2) for v in r["support"]) for r in sin["hlgauss"]})
    cand_names = [c for fam in CANDIDATES.values() for c in fam]
    cmd = "python scripts/bench_hlgauss.py" + (" --quick" if args.quick else "") + \
        ("" if args.seeds is None else f" --seeds {args.seeds}") + (f" --jobs {args.jobs}" if args.jobs > 1 else "")
    doc = header("Benchmark: HL-Gauss histogram loss vs MSE", cmd, args.threads, total) + [
        f"Load average of the machine: {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end ({args.jobs} "
        f"run(s) in parallel).",
        "",
        "Mean ± 95 % confidence interval (Student t) over seeds. How the settings were chosen, and what the "
        "results mean: [histogram_losses.md](histogram_losses.md).",
        "",
        f"## Sinusoid meta-learning (MAML, {meta_steps} meta-steps, Adam {OUTER_LR:g}, meta-batch 25, "
        f"10 inner steps at test)",
        "",
        f"HL-Gauss: {SINUSOID_BINS} bins, sigma = {SINUSOID_SIGMA} bin widths, support fitted to the training "
        f"targets ({', '.join(f'[{a}, {b}]' for a, b in sin_support)}), inner lr {MAML_INNER_LR['hlgauss']}, "
        f"{TRAIN_INNER_STEPS['hlgauss']} inner step(s) in meta-training; MSE: inner lr {MAML_INNER_LR['mse']}, "
        f"{TRAIN_INNER_STEPS['mse']} inner step(s) in meta-training (both chosen on the validation tasks of seeds 0 and 1). 5-shot MSE on the "
        f"query points of {test_episodes} test tasks (the same tasks for both losses) after k adaptation steps; "
        f"{len(seeds)} seeds ({seeds[0]}-{seeds[-1]}).",
        "",
        "| loss | MSE after 1 step | after 5 steps | after 10 steps | fit time / run |",
        "|---|---|---|---|---|",
        *[f"| {name} | {fmt_ci([r['mse@1'] for r in runs])} | {fmt_ci([r['mse@5'] for r in runs])} | "
          f"{fmt_ci([r['mse@10'] for r in runs])} | {statistics.fmean(r['fit_s'] for r in runs):.0f} s |"
          for name, runs in sin.items()],
        "",
        f"RMSE ratio HL-Gauss / MSE after 10 steps, per seed (the same test tasks): {sin_paired}.",
        "",
        "Reference (Finn et al. 2017, 70k meta-steps): MAML 0.67 / 0.38 / 0.35 after 1 / 5 / 10 steps.",
        "",
        SINUSOID_NOTE,
        "",
        f"## Tabular regression (scikit-learn data, 64-64 MLP, Adam, batch {BATCH}, early stopping)",
        "",
        f"Random 60/20/20 splits ({len(tab_seeds)} seeds, {tab_seeds[0]}-{tab_seeds[-1]}; the Friedman data are "
        f"drawn anew per seed), inputs and targets standardised with the training statistics. Every run stops "
        f"{PATIENCE} epochs after its lowest validation RMSE (at most {max_epochs} epochs) and reports the test RMSE "
        f"(target units) of that epoch. Each loss gets {len(CANDIDATES['mse'])} candidate settings "
        f"({'; '.join(f'{fam}: ' + ', '.join(c) for fam, c in CANDIDATES.items())}); per seed the candidate "
        f"with the lowest validation RMSE is the loss's result. HL-Gauss: {TABULAR_BINS} bins, support fitted to "
        f"the standardised training targets with the default 10 % margin. Friedman noise std "
        + ", ".join(f"{k} {v} (signal/noise {signal_to_noise(k):.1f})" for k, v in FRIEDMAN_NOISE.items()) + ".",
        "",
        "| data | n | MSE (chosen on validation) | HL-Gauss (chosen on validation) | ratio HL/MSE per seed | "
        "chosen MSE / HL (seeds) |",
        "|---|---|---|---|---|---|",
        *[f"| {name} | {len(tabular_data(name, 0)[1])} | {fmt_ci([r['rmse'] for r in t['mse']])} | "
          f"{fmt_ci([r['rmse'] for r in t['hlgauss']])} | {paired(t['hlgauss'], t['mse'])} | "
          f"{chosen(t['mse'])} / {chosen(t['hlgauss'])} |" for name, t in tab.items()],
        "",
        "Every candidate (test RMSE, mean best epoch):",
        "",
        "| data | " + " | ".join(cand_names) + " |",
        "|---|" + "---|" * len(cand_names),
        *[f"| {name} | " + " | ".join(f"{fmt_ci([r['rmse'] for r in cand[name][c]])} ({mean(cand[name][c], 'epoch'):.0f})"
                                      for c in cand_names) + " |" for name in names],
        "",
        f"## Summary ({'quick run' if args.quick else 'default run'})",
        "",
        "Ratios RMSE(HL-Gauss) / RMSE(MSE) of the seed means (below 1: the histogram loss wins); the sinusoid one "
        "after 10 adaptation steps (square root of the MSE ratio), `hl_over_mse_rmse` their geometric mean and "
        "`worst` the largest:",
        "",
    ]
    write_results(args.out, doc, summary, total)


if __name__ == "__main__":
    sys.exit(main())
