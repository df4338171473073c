"""Multi-task learning on Omniglot alphabets: per-task test accuracy and Delta_m for each
architecture x weighting method, against single-task networks.

Every alphabet of ../shared/data/omniglot is a classification task over its characters (drawers 0-13
train, 17-19 test). Single-task learning (STL) is one Conv4 per alphabet, trained together as soft
sharing with penalty 0 (exactly independent networks, see tests/test_multitask.py) with the same
examples per task per step. Delta_m is LibMTL's average relative gain over STL,
``mean_t (acc_t - acc_t^STL) / acc_t^STL`` in percent (higher is better).

    python scripts/bench_mtl_omniglot.py --quick     # 13 runs x 200 steps, one seed: under 5 minutes
    python scripts/bench_mtl_omniglot.py             # the full grid (40 runs) x 1000 steps, 3 seeds

Both use 16x16 images and a width-32 Conv4 by default (``--image-size 28 --hidden 64`` for the usual
few-shot network, several times slower).

Writes its section of docs/bench_multitask.md and ends with
``SUMMARY best_delta_m=<x> method=<name>``.
"""
from __future__ import annotations

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
from tasklight.multitask.module import MultiTaskModule  # noqa: E402
from tasklight.nn.nets import Conv4  # noqa: E402
from tasklight.multitask import weighting as W  # noqa: E402

OUT = "docs/bench_multitask.md"
WEIGHTINGS = {
    "equal": W.EqualWeighting,
    "uncertainty": W.UncertaintyWeighting,
    "gradnorm": W.GradNorm,
    "dwa": W.DWA,
    "mgda": W.MGDA,
    "pcgrad": W.PCGrad,
    "dro": W.DROWeighting,
}
ARCHITECTURES = {
    "hard": dict(architecture="hard"),
    "soft": dict(architecture="soft", soft_penalty=1e-3),
    "concat": dict(architecture="conditioned", conditioning="concat", condition_layer=0),
    "film": dict(architecture="conditioned", conditioning="film", condition_layer=2),
    "multiplicative": dict(architecture="conditioned", conditioning="multiplicative"),
    "multihead": dict(architecture="conditioned", conditioning="multihead"),
}
STL = ("stl", dict(architecture="soft", soft_penalty=0.0), "equal")


def runs(quick: bool) -> list[tuple[str, dict, str]]:
    out = [STL]
    for arch, kw in ARCHITECTURES.items():
        for w, cls in WEIGHTINGS.items():
            if arch == "soft" and cls.needs_grads:
                continue  # soft sharing has no shared parameters for gradient-based methods
            if quick and arch != "hard" and w != "equal":
                continue  # quick: every weighting on hard sharing, every architecture with equal weights
            out.append((arch, kw, w))
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


def main(argv=None) -> None:
    p = _bench.parser(__doc__, OUT)
    p.add_argument("--steps", type=int, default=None, help="training steps (default 200 quick, 1000 full)")
    p.add_argument("--hidden", type=int, default=32, help="Conv4 width")
    p.add_argument("--image-size", type=int, default=16, help="square image size (at least 16)")
    p.add_argument("--batch-size-per-task", type=int, default=8)
    p.add_argument("--only", default=None,
                   help="comma-separated runs to keep, e.g. 'hard/equal,hard/mgda,soft/equal' (STL always runs)")
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    seeds = _bench.setup(args)
    steps = args.steps or (200 if args.quick else 1000)
    hidden, size = args.hidden, args.image_size
    start = time.perf_counter()
    plan = runs(args.quick) if not args.only else [
        r for r in runs(False) if r[0] == "stl" or f"{r[0]}/{r[2]}" in args.only.split(",")]
    acc: dict[str, list[list[float]]] = {}
    names: list[str] = []
    for seed in seeds:
        for arch, kw, w in plan:
            label = "STL (one network per alphabet)" if arch == "stl" else f"{arch} / {w}"
            seed_everything(seed)
            dm = OmniglotAlphabetsDataModule(image_size=size, batch_size_per_task=args.batch_size_per_task,
                                             steps_per_epoch=max(steps // 8, 1), eval_batch_size=512, seed=seed)
            model = MultiTaskModule(Conv4(out_features=0, hidden=hidden, image_size=size), weighting=WEIGHTINGS[w](),
                                    optimizer=lambda ps: torch.optim.Adam(ps, lr=3e-3), **kw)
            metrics, fit_s = _bench.fit_and_test(model, dm, steps)
            names = model.task_names
            row = [float(metrics[f"test/tasks/{n}/acc"]) for n in names]
            acc.setdefault(label, []).append(row)
            print(f"seed {seed} {label:32s} mean acc {statistics.fmean(row):.3f}  ({fit_s:.0f} s)", flush=True)
    total = time.perf_counter() - start
    stl_label = "STL (one network per alphabet)"
    stl = torch.tensor(acc[stl_label])  # [seeds, T]

    def delta_m(rows) -> list[float]:
        r = torch.tensor(rows)
        return (100 * ((r - stl) / stl).mean(1)).tolist()  # per seed, paired with that seed's STL

    short = [n.replace("_", " ") for n in names]
    lines = _bench.header("Omniglot alphabets: multi-task vs single-task", " ".join(
        ["python scripts/bench_mtl_omniglot.py"] + (argv if argv is not None else sys.argv[1:])), args.threads, total)
    mode = f"{steps} steps, selected runs" if args.only else ("quick" if args.quick else "full")
    lines[0] = f"## Omniglot alphabets: multi-task vs single-task ({mode})"
    lines += [f"Conv4 (width {hidden}, {size}x{size} images), Adam 3e-3, {steps} steps of {args.batch_size_per_task} "
              f"images per alphabet ({max(steps // 8, 1)} steps per epoch, which DWA uses), {len(seeds)} seed(s); "
              f"test accuracy on drawers 17-19 of every character. Delta_m = mean over alphabets of the relative "
              f"accuracy gain over STL, in % (LibMTL's definition; mean ± std over seeds when several).", "",
              "| architecture / weighting | " + " | ".join(short) + " | mean acc | Delta_m (%) |",
              "|---|" + "---|" * (len(short) + 2)]
    best = None
    for label, rows in acc.items():
        r = torch.tensor(rows)
        cells = [f"{v:.3f}" for v in r.mean(0).tolist()]
        dm_vals = delta_m(rows)
        dm_cell = "0 (reference)" if label == stl_label else (
            _bench.fmt(dm_vals) if len(dm_vals) > 1 else f"{dm_vals[0]:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {float(r.mean()):.3f} | {dm_cell} |")
        if label != stl_label and (best is None or statistics.fmean(dm_vals) > best[0]):
            best = (statistics.fmean(dm_vals), label)
    lines.append("")
    summary = f"SUMMARY best_delta_m={best[0]:.2f} method={best[1].replace(' / ', '/')}"
    print("\n".join(lines))
    key = "bench_mtl_omniglot" + ("_subset" if args.only else "_quick" if args.quick else "_full")
    write_section(args.out, key, lines + ["```", summary, "```"])
    print(f"wrote {args.out} ({total:.0f} s)")
    print(summary)


if __name__ == "__main__":
    main()
