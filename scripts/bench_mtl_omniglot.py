"""Multi-task learning on Omniglot alphabets in the low-data regime: per-task test accuracy and Delta_m
of every architecture x weighting method against single-task networks, with model selection on a
validation split and a paired 95 % CI over seeds.

Every alphabet of Omniglot (the 8 alphabets of tasklight's two small background zips, 242 characters)
is a classification task over its characters. Each character has 20 drawers; for every seed the drawers
of every character are put in a seeded random order (``OmniglotAlphabetsDataModule(split_seed=seed)``)
and split into ``--train-drawers`` training drawers (default 1: one example per class, the low-data
regime where sharing is known to help), ``--val-drawers`` validation drawers (default 2) and all the
remaining drawers for testing (17 per character by default, 4114 test images). Within a seed every model
gets the same split and the same training stream: the comparison is paired.

Single-task learning (STL) is one network per alphabet, trained together as soft sharing with penalty 0
(exactly independent networks, see tests/multitask) with the same examples per task per step and the
same number of steps: every method gets the same per-task budget. Every ``--eval-every`` steps each model
is evaluated on the validation and the test sets; the reported test accuracy is the one at the step with
the best validation accuracy -- one step per multi-task model (its mean validation accuracy over tasks),
and one step per task for STL (each single-task network is selected on its own; that favours STL, never
MTL). The SUMMARY line names the method whose validation accuracies give the best Delta_m (the test
sets choose nothing). Delta_m is LibMTL's average relative gain over STL, ``mean_t (acc_t - acc_t^STL) / acc_t^STL`` in
percent (higher is better), computed per seed against that seed's STL; we report its mean and the 95 % CI
(Student t over seeds) of the paired per-seed values.

The trunk normalises with running BatchNorm statistics at test time (``track_running_stats=True``),
so a test prediction does not depend on which other examples share its evaluation batch.

    python scripts/bench_mtl_omniglot.py --quick     # STL and hard sharing of the first conv block, equal
                                                     # weights; 5 seeds x 200 steps of 16 images per task
    python scripts/bench_mtl_omniglot.py             # every architecture x every weighting, 5 seeds

Writes its section of docs/bench_multitask.md and ends with
``SUMMARY best_delta_m=<x> ci95=<y> method=<architecture/weighting>``.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

from tasklight.data.multitask import OmniglotAlphabetsDataModule, OverlaidOmniglotDataModule  # noqa: E402
from tasklight.multitask import architectures as A  # noqa: E402
from tasklight.multitask import weighting as W  # noqa: E402
from tasklight.multitask.module import MultiTaskModule  # noqa: E402
from tasklight.nn.nets import Conv4  # noqa: E402
from torch import nn  # noqa: E402

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
# name -> a factory of the architecture object
ARCHITECTURES = {
    "hard": A.HardSharing,
    # hard_k_block(s): hard sharing of the first k conv blocks; each task has the other blocks and a linear head
    "hard_3_blocks": A.HardSharing,
    "hard_2_blocks": A.HardSharing,
    "hard_1_block": A.HardSharing,
    "soft": lambda: A.SoftSharing(penalty=1e-3),
    "soft_0.01": lambda: A.SoftSharing(penalty=1e-2),
    "soft_0.1": lambda: A.SoftSharing(penalty=1e-1),
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
STL = "STL (one network per task)"


def ci95(values: list[float]) -> float:
    """Half-width of the 95 % confidence interval of the mean (Student t; 0 for one value)."""
    n = len(values)
    if n < 2:
        return 0.0
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1)) * statistics.stdev(values) / math.sqrt(n)


# the multi-task models of --quick, per dataset
QUICK = {"alphabets": (("hard_1_block", "equal"),),
         "overlaid": (("hard_3_blocks", "equal"), ("hard_1_block", "equal"))}
# --quick's training steps per dataset
QUICK_STEPS = {"alphabets": 200, "overlaid": 300}


def runs(quick: bool, dataset: str = "alphabets") -> list[tuple[str, str]]:
    """(architecture, weighting) pairs, STL first. Quick: the dataset's ``QUICK`` models."""
    out = [("stl", "equal")]
    if quick:
        return out + list(QUICK[dataset])
    for arch in ARCHITECTURES:
        for w, cls in WEIGHTINGS.items():
            if arch == "soft" and cls.needs_grads:
                continue  # soft sharing has no shared parameters for gradient-based methods
            if "shared_outputs" in arch and w != "equal":
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


def make_datamodule(args, seed: int, every: int):
    """The seed's DataModule of ``args.dataset``: its drawer split (and pairing) and training stream are
    seeded by ``seed``, so every model of a seed gets the same data."""
    common = dict(image_size=args.image_size, batch_size_per_task=args.batch_size_per_task,
                  train_drawers=args.train_drawers, val_drawers=args.val_drawers,
                  test_drawers=20 - args.train_drawers - args.val_drawers, steps_per_epoch=every,
                  eval_batch_size=1024, seed=seed, split_seed=seed)
    if args.dataset == "alphabets":
        return OmniglotAlphabetsDataModule(characters_per_task=args.characters_per_task, **common)
    return OverlaidOmniglotDataModule(num_characters=args.num_characters, shift=args.shift,
                                      test_canvases=args.test_canvases, **common)


def make_model(arch: str, w: str, hidden: int, lr: float, dm) -> MultiTaskModule:
    architecture = A.SoftSharing(penalty=0.0) if arch == "stl" else ARCHITECTURES[arch]()
    trunk = Conv4(out_features=0, hidden=hidden, image_size=dm.input_shape[-1], track_running_stats=True)
    heads = None
    if arch.startswith("hard_") and arch.endswith(("_block", "_blocks")):
        k = int(arch.split("_")[1])  # hard sharing of the first k conv blocks; each task has the rest and a head
        top = trunk.features[k:]
        feat = trunk.feature_dim
        trunk = nn.Sequential(*trunk.features[:k])
        heads = [nn.Sequential(copy.deepcopy(top), nn.Flatten(), nn.Linear(feat, spec.out_features))
                 for spec in dm.task_specs]
        for h in heads[1:]:
            for m in h.modules():
                if m is not h and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
    return MultiTaskModule(trunk, architecture=architecture, weighting=WEIGHTINGS[w](), heads=heads,
                           optimizer=lambda ps: torch.optim.Adam(ps, lr=lr))


@torch.no_grad()
def task_accuracies(model: MultiTaskModule, loader) -> list[float]:
    """Per-task accuracy of ``model`` (in eval mode: running BatchNorm statistics) on ``loader``."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(model.num_tasks)
    count = torch.zeros(model.num_tasks)
    for batch in loader:
        out = model.test_step(batch, 0)
        correct += out["task_metric_sum"].cpu()
        count += out["task_count"].cpu()
    model.train(was_training)
    return (correct / count.clamp_min(1)).tolist()  # 0 for a task without examples in ``loader``


class Curve(Callback):
    """Validation accuracy of every task every ``every`` optimiser steps, and a copy of the weights at the best
    validation step: one for the model (``per_task=False``: the best mean over tasks) or one per task (STL's
    independent networks). Ties keep the earlier step."""

    def __init__(self, dm, every: int, per_task: bool) -> None:
        self.every, self.per_task = every, per_task
        self.val_loader = dm.val_dataloader()
        self.steps: list[int] = []
        self.val: list[list[float]] = []
        self.best: dict[int, tuple[float, int, dict]] = {}  # key (task, or -1 for the model) -> (acc, step, state)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = int(trainer.global_step)
        if step % self.every or (self.steps and self.steps[-1] == step):
            return
        accs = task_accuracies(pl_module, self.val_loader)
        self.steps.append(step)
        self.val.append(accs)
        scores = dict(enumerate(accs)) if self.per_task else {-1: statistics.fmean(accs)}
        state = None
        for key, score in scores.items():
            if key not in self.best or score > self.best[key][0]:
                state = state or copy.deepcopy(pl_module.state_dict())
                self.best[key] = (score, step, state)


def train_and_select(model: MultiTaskModule, dm, steps: int, every: int, per_task: bool) -> tuple[dict, float]:
    """Train ``steps`` optimiser steps, recording the validation accuracies every ``every`` steps; then the test
    accuracy of every task at the last step and at its best validation step (see :class:`Curve`)."""
    import lightning as L

    curve = Curve(dm, every, per_task)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, inference_mode=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[curve])
    begin = time.perf_counter()
    trainer.fit(model, dm)
    fit_s = time.perf_counter() - begin
    T = model.num_tasks
    last = task_accuracies(model, dm.test_dataloader())
    selected, at = [0.0] * T, [0] * T
    groups = [(k, [k]) for k in range(T)] if per_task else [(-1, list(range(T)))]
    for key, tasks in groups:
        _, step, state = curve.best[key]
        model.load_state_dict(state)
        accs = task_accuracies(model, dm.eval_dataloader("test", tasks) if per_task else dm.test_dataloader())
        for t in tasks:
            selected[t], at[t] = accs[t], step
    return {"steps": curve.steps, "val": curve.val, "test_selected": selected, "selected_step": at,
            "test_last": last}, fit_s


def val_at_selected(curve: dict) -> list[float]:
    """Each task's validation accuracy at its selected step."""
    return [curve["val"][curve["steps"].index(k)][t] for t, k in enumerate(curve["selected_step"])]


def paired_delta_m(rows: list[list[float]], stl: list[list[float]]) -> list[float]:
    """Delta_m (%) per seed: ``100 * mean_t (acc_t - stl_t) / stl_t`` with that seed's STL accuracies."""
    r, s = torch.tensor(rows), torch.tensor(stl)
    if r.shape != s.shape:
        raise ValueError(f"got accuracies of shape {tuple(r.shape)} but STL has {tuple(s.shape)}; every method "
                         f"needs the same seeds and tasks as STL")
    return (100 * ((r - s) / s).mean(1)).tolist()


def main(argv=None) -> None:
    p = _bench.parser(__doc__, OUT)
    p.add_argument("--dataset", choices=("alphabets", "overlaid"), default="alphabets",
                   help="alphabets: one task per Omniglot alphabet; overlaid: two tasks (left and right character) "
                        "on canvases of two overlapping characters")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 400; quick: 200 alphabets, 300 overlaid)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="evaluate on the validation set every this many steps (default steps / 10)")
    p.add_argument("--train-drawers", type=int, default=1, help="training drawers per character")
    p.add_argument("--val-drawers", type=int, default=2, help="validation drawers per character; the remaining "
                   "drawers (20 - train - val) all test")
    p.add_argument("--hidden", type=int, default=32, help="Conv4 width")
    p.add_argument("--image-size", type=int, default=16, help="square image size of one character (at least 16 "
                   "for alphabets)")
    p.add_argument("--characters-per-task", type=int, default=None,
                   help="alphabets: split every alphabet into tasks of this many characters (many small related "
                        "tasks; default: one task per alphabet)")
    p.add_argument("--num-characters", type=int, default=20, help="overlaid: classes of each task")
    p.add_argument("--shift", type=int, default=4, help="overlaid: offset (pixels) of the second character; "
                   "the canvas side is image size + shift")
    p.add_argument("--test-canvases", type=int, default=4000, help="overlaid: test canvases (distinct pairs of "
                   "test images; the training and validation splits use all pairs of their images)")
    p.add_argument("--batch-size-per-task", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    p.add_argument("--save", default=None, help="also write the learning curves to this JSON file")
    p.add_argument("--merge", default=None,
                   help="comma-separated JSON files of --save runs (e.g. one process per seed): tabulate them")
    p.add_argument("--only", default=None,
                   help="comma-separated runs to keep, e.g. 'hard/equal,mtan/equal' (STL always runs)")
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = 5
    if args.seeds < 2 and not args.merge:
        print("note: one seed gives no confidence interval (ci95=0)")
    seeds = [args.first_seed + s for s in _bench.setup(args)]
    steps = args.steps or (QUICK_STEPS[args.dataset] if args.quick else 400)
    every = args.eval_every or max(steps // 10, 1)
    if not 1 <= every <= steps:
        raise ValueError(f"--eval-every must be between 1 and --steps ({steps}), got {every}")
    test_drawers = 20 - args.train_drawers - args.val_drawers
    if args.val_drawers < 1 or test_drawers < 1:
        raise ValueError(f"--train-drawers + --val-drawers must leave at least one test drawer and --val-drawers "
                         f"must be >= 1 (model selection needs a validation set); got {args.train_drawers} + "
                         f"{args.val_drawers}")
    hidden, size = args.hidden, args.image_size
    plan = runs(args.quick, args.dataset) if not args.only else [
        r for r in runs(False) if r[0] == "stl" or f"{r[0]}/{r[1]}" in args.only.split(",")]
    start = time.perf_counter()
    curves: dict[str, list[dict]] = {}
    names: list[str] = []
    merged_s = 0.0
    loads: list[float] = []
    if args.merge:
        seeds = []
        for f in args.merge.split(","):
            saved = json.loads(Path(f).read_text())
            names, seeds, merged_s = saved["names"], seeds + saved["seeds"], merged_s + saved["seconds"]
            if saved.get("load") is not None:
                loads.append(saved["load"])
            for label, rows in saved["curves"].items():
                curves.setdefault(label, []).extend(rows)
        plan = []
    for seed in seeds if not args.merge else []:
        for arch, w in plan:
            label = STL if arch == "stl" else f"{arch} / {w}"
            seed_everything(seed)
            dm = make_datamodule(args, seed, every)
            dm.setup()
            model = make_model(arch, w, hidden, args.lr, dm)
            curve, fit_s = train_and_select(model, dm, steps, every, per_task=label == STL)
            names = model.task_names
            curves.setdefault(label, []).append(curve)
            accs, at = curve["test_selected"], curve["selected_step"]
            print(f"seed {seed} {label:36s} mean test acc {statistics.fmean(accs):.3f} at step(s) "
                  f"{sorted(set(at))}  ({fit_s:.0f} s)", flush=True)
    if args.save:
        Path(args.save).write_text(json.dumps({"names": names, "seeds": seeds, "curves": curves,
                                               "seconds": time.perf_counter() - start,
                                               "load": os.getloadavg()[0]}))
    total = time.perf_counter() - start + merged_s
    acc = {label: [c["test_selected"] for c in cs] for label, cs in curves.items()}
    chosen = {label: [c["selected_step"] for c in cs] for label, cs in curves.items()}
    last = {label: [c["test_last"] for c in cs] for label, cs in curves.items()}
    val_acc = {label: [val_at_selected(c) for c in cs] for label, cs in curves.items()}
    n_steps = curves[STL][0]["steps"]

    short = [n.replace("_", " ") for n in names]
    cmd = " ".join(["python scripts/bench_mtl_omniglot.py"] + (argv if argv is not None else sys.argv[1:]))
    mode = "selected runs" if args.only else ("quick" if args.quick else "full")
    if args.dataset == "alphabets":
        title = f"Omniglot alphabets, {args.train_drawers} training drawer(s) per character"
        if args.characters_per_task:
            title = (f"Omniglot alphabets in tasks of {args.characters_per_task} characters, {args.train_drawers} "
                     f"training drawer(s) per character")
        per = "task" if args.characters_per_task else "alphabet"
        data = (f"Conv4 (width {hidden}, {size}x{size} images, running BatchNorm statistics at test time), Adam "
                f"{args.lr:g}, {n_steps[-1]} steps of {args.batch_size_per_task} images per {per} (DWA's epoch: "
                f"{every} steps), {len(seeds)} seeds. Per seed and character, a seeded random split of the 20 "
                f"drawers: {args.train_drawers} train, {args.val_drawers} validate, {test_drawers} test (the same "
                f"split and training stream for every model of a seed).")
        unit = "alphabets"
        if args.characters_per_task:
            data = (f"Every alphabet split into tasks of {args.characters_per_task} consecutive characters "
                    f"(`characters_per_task`; a one-character remainder joins the task before): "
                    f"{len(names)} tasks. " + data)
            unit = "tasks"
    else:
        c, side = args.num_characters, size + args.shift
        title = (f"Overlaid Omniglot characters (two tasks), {args.train_drawers} training drawer(s) per "
                 f"character")
        data = (f"Two tasks on the same {side}x{side} canvases: a {size}x{size} character at the top left and one "
                f"shifted {args.shift} pixels down and right, pixel-wise maximum (OverlaidOmniglotDataModule); "
                f"task 'left' names the first, task 'right' the second, both over the same {c} characters (a "
                f"fixed seeded draw from the shipped alphabets). Per seed and character, a seeded random split "
                f"of the 20 drawers: {args.train_drawers} train, {args.val_drawers} validate, {test_drawers} "
                f"test; the canvases of a split are pairs of its images: all {(c * args.train_drawers) ** 2} "
                f"training and {(c * args.val_drawers) ** 2} validation pairs, {args.test_canvases} random test "
                f"pairs (the same canvases and training stream for every model of a seed). Conv4 (width "
                f"{hidden}, running BatchNorm statistics at test time), Adam {args.lr:g}, {n_steps[-1]} steps of "
                f"{args.batch_size_per_task} canvases per task (DWA's epoch: {every} steps), {len(seeds)} seeds.")
        unit = "tasks"
    lines = _bench.header(title, cmd, args.threads, total)
    lines[0] = f"## {title}: multi-task vs single-task ({mode})"
    if not args.merge:
        loads.append(os.getloadavg()[0])
    if loads:
        lines[-2] += f" Load average (1 min) when the run(s) ended: {', '.join(f'{v:.1f}' for v in loads)}."
    lines += [data + f" Validation accuracy every {every} steps; the test accuracy reported is the one at the "
              f"best validation step (one step per multi-task model, one per task for STL). Per-task columns: "
              f"mean over seeds. Delta_m = mean over {unit} of the relative accuracy gain over the same seed's "
              f"STL, in %, mean ± 95 % CI (Student t) of the paired per-seed values; 'last step' is the same "
              f"without model selection, 'validation' the same on the validation sets at the selected steps. "
              f"The SUMMARY line reports the method with the best validation Delta_m.",
              "", "| architecture / weighting | " + " | ".join(short)
              + " | mean acc | median selected step | Delta_m (%) | Delta_m, last step (%) | Delta_m, validation (%) |",
              "|---|" + "---|" * (len(short) + 5)]
    best = None
    for label, rows in acc.items():
        r = torch.tensor(rows)
        cells = [f"{v:.3f}" for v in r.mean(0).tolist()]
        at = statistics.median(k for ks in chosen[label] for k in ks)
        if label == STL:
            cell, cell_last, cell_val = "0 (reference)", "0 (reference)", "0 (reference)"
        else:
            vals, vals_last = paired_delta_m(rows, acc[STL]), paired_delta_m(last[label], last[STL])
            mean, ci = statistics.fmean(vals), ci95(vals)
            cell = f"{mean:+.2f} ± {ci:.2f}"
            cell_last = f"{statistics.fmean(vals_last):+.2f} ± {ci95(vals_last):.2f}"
            # the reported method is chosen on validation: the best Delta_m of the validation accuracies
            vals_val = paired_delta_m(val_acc[label], val_acc[STL])
            val_mean = statistics.fmean(vals_val)
            cell_val = f"{val_mean:+.2f} ± {ci95(vals_val):.2f}"
            if best is None or val_mean > best[3]:
                best = (mean, ci, label, val_mean)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {float(r.mean()):.3f} | {at:g} | {cell} | "
                     f"{cell_last} | {cell_val} |")
    lines.append("")
    method = best[2].replace(" / ", "/").replace(" ", "_")
    summary = f"SUMMARY best_delta_m={best[0]:.2f} ci95={best[1]:.2f} method={method}"
    print("\n".join(lines))
    key = "bench_mtl_omniglot" + ("_overlaid" if args.dataset == "overlaid" else "") + (
        f"_tasks{args.characters_per_task}" if args.dataset == "alphabets" and args.characters_per_task else "") + ("_subset" if args.only else "_quick" if args.quick else "_full")
    write_section(args.out, key, lines + ["```", summary, "```"])
    print(f"wrote {args.out} ({total:.0f} s)")
    print(summary)


if __name__ == "__main__":
    main()
