"""Multi-task learning on Omniglot alphabets in the low-data regime: per-task test accuracy and Delta_m
of every architecture x weighting method against single-task networks.

Every alphabet of Omniglot (the 8 alphabets of tasklight's two small background zips) is a
classification task over its characters. Each character has 20 drawers: ``--train-drawers`` of
them (default 2, the low-data regime where sharing is known to help) train, drawers 17-19 test.
Single-task learning (STL) is one Conv4 per alphabet, trained together as soft sharing with
penalty 0 (exactly independent networks, see tests/multitask) with the same examples per task per
step and the same number of steps: every method gets the same per-task budget. Delta_m is
LibMTL's average relative gain over STL, ``mean_t (acc_t - acc_t^STL) / acc_t^STL`` in percent
(higher is better), computed per seed against that seed's STL; we report its mean and 95 % CI
(Student t over seeds).

The trunk normalises with running BatchNorm statistics at test time (``track_running_stats=True``),
so a test prediction does not depend on which other examples share its evaluation batch.

    python scripts/bench_mtl_omniglot.py --quick     # every architecture but cross-stitch with equal weights,
                                                     # hard sharing with 3 weightings; 3 seeds x 200 steps
    python scripts/bench_mtl_omniglot.py             # every architecture x every weighting, 3 seeds

Writes its section of docs/bench_multitask.md and ends with
``SUMMARY best_delta_m=<x> ci95=<y> method=<architecture/weighting>``.
"""
from __future__ import annotations

import math
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

from tasklight.data.multitask import OmniglotAlphabetsDataModule  # noqa: E402
from tasklight.multitask import architectures as A  # noqa: E402
from tasklight.multitask import weighting as W  # noqa: E402
from tasklight.multitask.module import MultiTaskModule  # noqa: E402
from tasklight.nn.nets import Conv4  # noqa: E402

OUT = "docs/bench_multitask.md"
WEIGHTINGS = {
    "equal": W.EqualWeighting,
    "uncertainty": W.UncertaintyWeighting,
    "dwa": W.DWA,
    "dro": W.DROWeighting,
    "gradnorm": W.GradNorm,
    "mgda": W.MGDA,
    "pcgrad": W.PCGrad,
}
for _name, _cls in (("cagrad", "CAGrad"), ("nashmtl", "NashMTL"), ("famo", "FAMO"), ("imtl", "IMTL"),
                    ("rlw", "RLW"), ("upgrad", "UPGrad")):
    if hasattr(W, _cls):  # the methods this version of tasklight has
        WEIGHTINGS[_name] = getattr(W, _cls)
QUICK_WEIGHTINGS = ("equal", "uncertainty", "pcgrad")
# cross-stitch runs every tower on the whole batch (T times the cost of hard sharing): full grid only
QUICK_SKIP = ("cross_stitch",)
# name -> a factory of the architecture object
ARCHITECTURES = {
    "hard": A.HardSharing,
    "soft": lambda: A.SoftSharing(penalty=1e-3),
    "concat_shared_outputs": lambda: A.Concat(condition_layer=0, outputs="shared"),
    "concat": lambda: A.Concat(condition_layer=0, outputs="disjoint"),
    "film_shared_outputs": lambda: A.FiLM(condition_layer=2, outputs="shared"),
    "film": lambda: A.FiLM(condition_layer=2, outputs="disjoint"),
    "multiplicative": lambda: A.Multiplicative(outputs="disjoint"),
    "multihead": A.MultiHead,
    "cross_stitch": A.CrossStitch,
    "mmoe": lambda: A.MMoE(num_experts=2),
    "mtan": A.MTAN,
}
STL = "STL (one network per alphabet)"
# Student t quantiles t_{0.975, df}
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def ci95(values: list[float]) -> float:
    """Half-width of the 95 % confidence interval of the mean (Student t; 0 for one value)."""
    n = len(values)
    if n < 2:
        return 0.0
    return _T975.get(n - 1, 1.96) * statistics.stdev(values) / math.sqrt(n)


def runs(quick: bool) -> list[tuple[str, str]]:
    """(architecture, weighting) pairs, STL first."""
    out = [("stl", "equal")]
    for arch in ARCHITECTURES:
        for w, cls in WEIGHTINGS.items():
            if arch == "soft" and cls.needs_grads:
                continue  # soft sharing has no shared parameters for gradient-based methods
            if quick and (arch in QUICK_SKIP or not (w == "equal" or (arch == "hard" and w in QUICK_WEIGHTINGS))):
                continue
            if not quick and "shared_outputs" in arch and w != "equal":
                continue  # the label-collision controls need one weighting only
            out.append((arch, w))
    return out


def write_section(out: str, key: str, lines: list[str], title: str = "Multi-task learning benchmarks") -> None:
    """Replace (or add) this script's section of the shared results file."""
    path = Path(out)
    text = path.read_text() if path.exists() else f"# {title}\n\n"
    start, end = f"<!-- section: {key} -->", f"<!-- end: {key} -->"
    block = "\n".join([start, *lines, end])
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def make_model(arch: str, w: str, hidden: int, size: int, lr: float) -> MultiTaskModule:
    architecture = A.SoftSharing(penalty=0.0) if arch == "stl" else ARCHITECTURES[arch]()
    trunk = Conv4(out_features=0, hidden=hidden, image_size=size, track_running_stats=True)
    return MultiTaskModule(trunk, architecture=architecture, weighting=WEIGHTINGS[w](),
                           optimizer=lambda ps: torch.optim.Adam(ps, lr=lr))


def main(argv=None) -> None:
    p = _bench.parser(__doc__, OUT)
    p.add_argument("--steps", type=int, default=None, help="training steps (default 200 quick, 600 full)")
    p.add_argument("--train-drawers", type=int, default=2, help="training drawers per character (1-14)")
    p.add_argument("--hidden", type=int, default=32, help="Conv4 width")
    p.add_argument("--image-size", type=int, default=16, help="square image size (at least 16)")
    p.add_argument("--batch-size-per-task", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--only", default=None,
                   help="comma-separated runs to keep, e.g. 'hard/equal,mtan/equal' (STL always runs)")
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = 3
    seeds = _bench.setup(args)
    steps = args.steps or (200 if args.quick else 600)
    hidden, size = args.hidden, args.image_size
    plan = runs(args.quick) if not args.only else [
        r for r in runs(False) if r[0] == "stl" or f"{r[0]}/{r[1]}" in args.only.split(",")]
    start = time.perf_counter()
    acc: dict[str, list[list[float]]] = {}
    names: list[str] = []
    per_epoch = max(steps // 10, 1)
    for seed in seeds:
        for arch, w in plan:
            label = STL if arch == "stl" else f"{arch} / {w}"
            seed_everything(seed)
            dm = OmniglotAlphabetsDataModule(image_size=size, batch_size_per_task=args.batch_size_per_task,
                                             train_drawers=args.train_drawers, steps_per_epoch=per_epoch,
                                             eval_batch_size=512, seed=seed)
            model = make_model(arch, w, hidden, size, args.lr)
            metrics, fit_s = _bench.fit_and_test(model, dm, steps)
            names = model.task_names
            row = [float(metrics[f"test/tasks/{n}/acc"]) for n in names]
            acc.setdefault(label, []).append(row)
            print(f"seed {seed} {label:36s} mean acc {statistics.fmean(row):.3f}  ({fit_s:.0f} s)", flush=True)
    total = time.perf_counter() - start
    stl = torch.tensor(acc[STL])  # [seeds, T]

    def delta_m(rows) -> list[float]:
        r = torch.tensor(rows)
        return (100 * ((r - stl) / stl).mean(1)).tolist()  # per seed, paired with that seed's STL

    short = [n.replace("_", " ") for n in names]
    cmd = " ".join(["python scripts/bench_mtl_omniglot.py"] + (argv if argv is not None else sys.argv[1:]))
    lines = _bench.header("Omniglot alphabets: multi-task vs single-task", cmd, args.threads, total)
    mode = "selected runs" if args.only else ("quick" if args.quick else "full")
    lines[0] = f"## Omniglot alphabets, {args.train_drawers} training drawers per character: multi-task vs single-task ({mode})"
    lines += [f"Conv4 (width {hidden}, {size}x{size} images, running BatchNorm statistics at test time), Adam "
              f"{args.lr:g}, {steps} steps of {args.batch_size_per_task} images per alphabet ({per_epoch} steps "
              f"per epoch, which DWA uses), {args.train_drawers} training drawers per character, {len(seeds)} "
              f"seeds; test accuracy on drawers 17-19 of every character (mean over seeds). Delta_m = mean over "
              f"alphabets of the relative accuracy gain over STL of the same seed, in %, mean ± 95 % CI over seeds.",
              "", "| architecture / weighting | " + " | ".join(short) + " | mean acc | Delta_m (%) |",
              "|---|" + "---|" * (len(short) + 2)]
    best = None
    for label, rows in acc.items():
        r = torch.tensor(rows)
        cells = [f"{v:.3f}" for v in r.mean(0).tolist()]
        vals = delta_m(rows)
        mean, ci = statistics.fmean(vals), ci95(vals)
        cell = "0 (reference)" if label == STL else f"{mean:+.2f} ± {ci:.2f}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {float(r.mean()):.3f} | {cell} |")
        if label != STL and (best is None or mean > best[0]):
            best = (mean, ci, label)
    lines.append("")
    method = best[2].replace(" / ", "/").replace(" ", "_")
    summary = f"SUMMARY best_delta_m={best[0]:.2f} ci95={best[1]:.2f} method={method}"
    print("\n".join(lines))
    key = "bench_mtl_omniglot" + ("_subset" if args.only else "_quick" if args.quick else "_full")
    write_section(args.out, key, lines + ["```", summary, "```"])
    print(f"wrote {args.out} ({total:.0f} s)")
    print(summary)


if __name__ == "__main__":
    main()
