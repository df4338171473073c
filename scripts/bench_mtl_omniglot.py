"""Multi-task learning on Omniglot alphabets in the low-data regime: per-task test accuracy and Delta_m
of multi-task models against single-task networks, under the pre-registered protocol
``benchmarks/protocols/mtl_omniglot.yaml`` (arms, test seeds, data split, steps, selection rule).

Every alphabet of Omniglot (the 8 alphabets of tasklight's two small background zips, 242 characters)
is a classification task over its characters. Each character has 20 drawers; for every seed the drawers
of every character are put in a seeded random order (``OmniglotAlphabetsDataModule(split_seed=seed)``)
and split into the protocol's training drawers (1: one example per class, the low-data regime),
validation drawers (5: 1210 validation images) and all the remaining drawers for testing (14 per
character). Within a seed every model gets the same split and the same training stream: the comparison
is paired.

Single-task learning (STL) is one network per alphabet, trained together as soft sharing with penalty 0
(exactly independent networks, see tests/multitask) with the same examples per task per step and the
same number of steps. Every model, STL included, is selected by one rule: every ``every`` steps it is
evaluated on the validation sets, and its test accuracy is reported at the step with the best mean
validation accuracy over tasks (ties: the earliest step) -- one step per model -- and at the last step.
Delta_m is LibMTL's average relative gain over STL, ``mean_t (acc_t - acc_t^STL) / acc_t^STL`` in
percent (higher is better), computed per seed against that seed's STL; we report its mean, its 95 %
Student-t interval over seeds and Holm-adjusted paired p-values.

The trunk normalises with running BatchNorm statistics at test time (``track_running_stats=True``),
so a test prediction does not depend on which other examples share its evaluation batch.

    python scripts/bench_mtl_omniglot.py            # the protocol's 4 arms x 5 seeds (about 15 minutes)
    python scripts/bench_mtl_omniglot.py --quick    # smoke run: 2 seeds x 20 steps, not a result

Writes its section of docs/bench_multitask.md and ends with ``SUMMARY delta_m=<x> ci95=<y>
delta_m_last=<z> ci95_last=<w> method=<arm> stl_selection=<rule> mtl_selection=<rule> seeds=<n>
protocol=<hash>`` for the multi-task arm with the best validation Delta_m (the test sets choose nothing).
"""
from __future__ import annotations

import copy
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Callback
from torch import nn

import _bench
from tasklight.data.multitask import OmniglotAlphabetsDataModule
from tasklight.multitask import architectures as A
from tasklight.multitask import weighting as W
from tasklight.multitask.module import MultiTaskModule
from tasklight.nn.nets import Conv4
from tasklight.protocol import holm, load_protocol, paired

OUT = "docs/bench_multitask.md"
PROTOCOL = Path(__file__).resolve().parents[1] / "benchmarks" / "protocols" / "mtl_omniglot.yaml"
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
    "stl": lambda: A.SoftSharing(penalty=0.0),  # independent networks: single-task learning
    "hard": A.HardSharing,
    # hard_k_block(s): hard sharing of the first k conv blocks; each task has the other blocks and a linear head
    "hard_3_blocks": A.HardSharing,
    "hard_2_blocks": A.HardSharing,
    "hard_1_block": A.HardSharing,
    "soft": lambda: A.SoftSharing(penalty=1e-3),
    "concat": lambda: A.Concat(condition_layer=0, outputs="disjoint"),
    "film": lambda: A.FiLM(condition_layer=2, outputs="disjoint"),
    "multiplicative": lambda: A.Multiplicative(outputs="disjoint"),
    "multihead": A.MultiHead,
    "cross_stitch": A.CrossStitch,
    "mmoe": lambda: A.MMoE(num_experts=2),
    "mtan": A.MTAN,
}
# the model-selection rule, the same for every arm (STL included): one step per model
SELECTION = "best_mean_validation_accuracy_per_model"


def parse_arm(arm: str) -> tuple[str, str]:
    """``"hard/equal"`` -> ("hard", "equal"); ``"stl"`` -> ("stl", "equal")."""
    arch, _, w = arm.partition("/")
    w = w or "equal"
    if arch not in ARCHITECTURES or w not in WEIGHTINGS:
        raise ValueError(f"arm {arm!r}: architectures are {list(ARCHITECTURES)}, weightings {list(WEIGHTINGS)}")
    return arch, w


def selection_rule(arm: str) -> str:
    """The selection rule of ``arm``: one rule for every arm (checked by tests/multitask/test_bench_selection)."""
    parse_arm(arm)
    return SELECTION


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


def make_datamodule(data: dict, batch_size_per_task: int, seed: int, every: int) -> OmniglotAlphabetsDataModule:
    """The seed's DataModule: its drawer split and training stream are seeded by ``seed``, so every model of a
    seed gets the same data."""
    train, val = int(data["train_drawers"]), int(data["val_drawers"])
    return OmniglotAlphabetsDataModule(image_size=int(data["image_size"]), batch_size_per_task=batch_size_per_task,
                                       train_drawers=train, val_drawers=val, test_drawers=20 - train - val,
                                       steps_per_epoch=every, eval_batch_size=1024, seed=seed, split_seed=seed)


def make_model(arch: str, w: str, hidden: int, lr: float, dm) -> MultiTaskModule:
    architecture = ARCHITECTURES[arch]()
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
    """Validation accuracy of every task every ``every`` optimiser steps, and a copy of the weights at the step
    with the best mean validation accuracy over tasks (one step per model, whatever the architecture; ties keep
    the earlier step)."""

    def __init__(self, dm, every: int) -> None:
        self.every = every
        self.val_loader = dm.val_dataloader()
        self.steps: list[int] = []
        self.val: list[list[float]] = []
        self.best: tuple[float, int, dict] | None = None  # (mean validation accuracy, step, state)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = int(trainer.global_step)
        if step % self.every or (self.steps and self.steps[-1] == step):
            return
        accs = task_accuracies(pl_module, self.val_loader)
        self.steps.append(step)
        self.val.append(accs)
        score = statistics.fmean(accs)
        if self.best is None or score > self.best[0]:
            self.best = (score, step, copy.deepcopy(pl_module.state_dict()))


def train_and_select(model: MultiTaskModule, dm, steps: int, every: int) -> tuple[dict, float]:
    """Train ``steps`` optimiser steps, recording the validation accuracies every ``every`` steps; then the test
    accuracy of every task at the last step and at the model's best validation step (see :class:`Curve`)."""
    import lightning as L

    curve = Curve(dm, every)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, inference_mode=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[curve])
    begin = time.process_time()
    trainer.fit(model, dm)
    fit_s = time.process_time() - begin
    last = task_accuracies(model, dm.test_dataloader())
    _, step, state = curve.best
    model.load_state_dict(state)
    selected = task_accuracies(model, dm.test_dataloader())
    return {"steps": curve.steps, "val": curve.val, "test_selected": selected,
            "selected_step": [step] * model.num_tasks, "test_last": last}, fit_s


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


def delta_m_stats(rows: list[list[float]], stl: list[list[float]]) -> dict[str, float]:
    """Per-seed Delta_m against STL: its mean, 95 % t interval and paired-t p-value (against 0)."""
    vals = paired_delta_m(rows, stl)
    return {**paired(vals, [0.0] * len(vals)), "values": vals}


def main(argv=None) -> None:
    p = _bench.parser(__doc__, OUT)
    p.add_argument("--protocol", default=str(PROTOCOL), help="the protocol file (arms, seeds, data, steps, selection)")
    args = p.parse_args(argv)
    if args.seeds is not None:
        p.error("--seeds: the test seeds are the protocol's (test_seeds in the protocol file)")
    _bench.setup(args)
    proto = load_protocol(args.protocol)
    if proto.selection.get("granularity") != "model" or proto.selection.get("ties") != "earliest":
        raise ValueError(f"{proto.path.name}: this script implements selection granularity 'model' with ties "
                         f"'earliest' for every arm; the file says {dict(proto.selection)}")
    if proto.arms[0] != "stl" or proto.baseline != "stl":
        raise ValueError(f"{proto.path.name}: the first arm and the baseline must be 'stl' (Delta_m is against STL)")
    data, model_cfg = proto.extra["data"], proto.extra["model"]
    (config,) = proto.grid_for("stl")
    lr, hidden = float(config["lr"]), int(model_cfg["hidden"])
    seeds = list(proto.test_seeds)
    steps, every = int(proto.budget["steps"]), int(proto.selection["every"])
    if args.quick:
        seeds, steps, every = seeds[:2], 20, 10
    bpt = int(proto.budget["batch_size_per_task"])
    start = time.perf_counter()
    curves: dict[str, list[dict]] = {}
    cpu: dict[str, float] = {}
    names: list[str] = []
    for seed in seeds:
        for arm in proto.arms:
            arch, w = parse_arm(arm)
            seed_everything(seed)
            dm = make_datamodule(data, bpt, seed, every)
            dm.setup()
            n_val = sum(len(s) for s in dm.val_sets)
            if n_val != int(proto.selection["validation_size"]):
                raise ValueError(f"{proto.path.name}: validation_size {proto.selection['validation_size']} but the "
                                 f"split gives {n_val} validation images")
            model = make_model(arch, w, hidden, lr, dm)
            curve, fit_s = train_and_select(model, dm, steps, every)
            names = model.task_names
            curves.setdefault(arm, []).append(curve)
            cpu[arm] = cpu.get(arm, 0.0) + fit_s
            print(f"seed {seed} {arm:28s} test acc selected {statistics.fmean(curve['test_selected']):.3f} "
                  f"(step {curve['selected_step'][0]}), last {statistics.fmean(curve['test_last']):.3f}  "
                  f"({fit_s:.0f} CPU s)", flush=True)
    total = time.perf_counter() - start
    acc = {arm: [c["test_selected"] for c in cs] for arm, cs in curves.items()}
    last = {arm: [c["test_last"] for c in cs] for arm, cs in curves.items()}
    val_acc = {arm: [val_at_selected(c) for c in cs] for arm, cs in curves.items()}
    chosen = {arm: [c["selected_step"][0] for c in cs] for arm, cs in curves.items()}

    short = [n.replace("_", " ") for n in names]
    cmd = " ".join(["python scripts/bench_mtl_omniglot.py"] + (argv if argv is not None else sys.argv[1:]))
    train, val = int(data["train_drawers"]), int(data["val_drawers"])
    title = f"Omniglot alphabets, {train} training drawer(s) per character" + (" (--quick smoke run)" if args.quick else "")
    lines = _bench.header(title, cmd, args.threads, total)
    lines[0] = f"## {title}: multi-task vs single-task"
    lines[-2] += f" Load average (1 min) at the end: {os.getloadavg()[0]:.1f}."
    lines += proto.describe()
    stl_rule = selection_rule("stl")
    mtl_rules = {selection_rule(a) for a in proto.arms[1:]}
    (mtl_rule,) = mtl_rules
    stats = {arm: delta_m_stats(acc[arm], acc["stl"]) for arm in proto.arms[1:]}
    stats_last = {arm: delta_m_stats(last[arm], last["stl"]) for arm in proto.arms[1:]}
    stats_val = {arm: delta_m_stats(val_acc[arm], val_acc["stl"]) for arm in proto.arms[1:]}
    p_holm = holm({arm: s["p"] for arm, s in stats.items()})
    p_holm_last = holm({arm: s["p"] for arm, s in stats_last.items()})
    lines += [f"Conv4 (width {hidden}, {data['image_size']}x{data['image_size']} images, running BatchNorm "
              f"statistics at test time), Adam {lr:g}, {steps} steps of {bpt} images per alphabet, {len(seeds)} "
              f"seeds. Per seed and character, a seeded random split of the 20 drawers: {train} train, {val} "
              f"validate, {20 - train - val} test (the same split and training stream for every model of a seed). "
              f"Selection, the same for every arm (STL included): validation accuracy every {every} steps, the "
              f"test accuracy at the step with the best mean validation accuracy over alphabets (ties: the "
              f"earliest), one step per model. Per-alphabet columns: mean test accuracy over seeds at the "
              f"selected step. Delta_m = mean over alphabets of the relative accuracy gain over the same seed's "
              f"STL, in %: mean ± 95 % CI (Student t) of the per-seed values, with the paired-t p-value "
              f"Holm-adjusted over the {len(stats)} multi-task arms; 'last step' is the same without model "
              f"selection, 'validation' the same on the validation sets at the selected steps. Training CPU "
              f"seconds are process time summed over seeds.",
              "", "| arm | " + " | ".join(short)
              + " | mean acc (selected) | mean acc (last step) | median selected step | Delta_m (%) | Holm p "
                "| Delta_m, last step (%) | Holm p, last step | Delta_m, validation (%) | training CPU s |",
              "|---|" + "---|" * (len(short) + 9)]
    for arm in proto.arms:
        r = torch.tensor(acc[arm])
        cells = [f"{v:.3f}" for v in r.mean(0).tolist()]
        at = statistics.median(chosen[arm])
        mean_last = float(torch.tensor(last[arm]).mean())
        if arm == "stl":
            dm_cells = ["0 (reference)", "", "0 (reference)", "", "0 (reference)"]
        else:
            s, sl, sv = stats[arm], stats_last[arm], stats_val[arm]
            dm_cells = [f"{s['mean']:+.2f} ± {s['ci95']:.2f}", f"{p_holm[arm]:.3f}",
                        f"{sl['mean']:+.2f} ± {sl['ci95']:.2f}", f"{p_holm_last[arm]:.3f}",
                        f"{sv['mean']:+.2f} ± {sv['ci95']:.2f}"]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {float(r.mean()):.3f} | {mean_last:.3f} | {at:g} | "
                     + " | ".join(dm_cells) + f" | {cpu[arm]:.0f} |")
    lines += ["", "Per-seed Delta_m (%), selected step / last step:", ""]
    for arm in proto.arms[1:]:
        lines.append(f"- {arm}: " + ", ".join(f"{a:+.1f} / {b:+.1f}" for a, b in
                                             zip(stats[arm]["values"], stats_last[arm]["values"])))
    lines.append("")
    # the SUMMARY names the multi-task arm with the best validation Delta_m (the test sets choose nothing)
    best = max(proto.arms[1:], key=lambda a: stats_val[a]["mean"])
    summary = (f"SUMMARY delta_m={stats[best]['mean']:.2f} ci95={stats[best]['ci95']:.2f} "
               f"delta_m_last={stats_last[best]['mean']:.2f} ci95_last={stats_last[best]['ci95']:.2f} method={best} "
               f"stl_selection={stl_rule} mtl_selection={mtl_rule} seeds={len(seeds)} protocol={proto.hash}")
    if args.quick:
        summary = summary.replace("SUMMARY", "SMOKE")  # a smoke run is not a result
    print("\n".join(lines))
    if not args.quick:
        write_section(args.out, "bench_mtl_omniglot", lines + ["```", summary, "```"])
        print(f"wrote {args.out} ({total:.0f} s)")
    print(summary)


if __name__ == "__main__":
    main()
