"""MultiFashion (Lin et al., NeurIPS 2019): single-task networks against every multi-task model of tasklight, under
the protocol benchmarks/protocols/mtl_multifashion.yaml.

Each image overlays two Fashion-MNIST items (``MultiFashionDataModule``: the first up-left, the second
down-right on a 36 x 36 canvas, resized to 28 x 28); task "left" classifies the first item, task "right"
the second (10 classes each). Per test seed ``s`` the canvases are drawn with ``split_seed=s`` from the
protocol's subset of the training images (a held-out validation split of the training images) and from
the 10,000 test images, and every arm gets the same canvases, training stream and initial random state:
the comparison is paired.

Arms (the protocol's): single-task networks (STL: one network per task, ``SoftSharing(penalty=0)``, the same
examples per task per step); hard sharing with every weighting method of tasklight; MMoE, MTAN and
cross-stitch with equal weights. The network is a small LeNet (3 conv stages, 50 features) and a linear head
per task; Adam, the protocol's steps and batch, one configuration for every arm (not tuned), and the
last step's model for every arm (no checkpoint selection). Reported: per-task test accuracy and
``Delta_m = mean_t (acc_t - acc_t^STL) / acc_t^STL`` in percent (LibMTL's), per seed against that seed's
STL, with its mean and 95 % t interval over the test seeds and the Holm-adjusted p-values across the
methods. The SUMMARY names the method whose *validation* Delta_m is best (the test sets choose nothing)
and reports its test Delta_m.

    python scripts/bench_mtl_multifashion.py           # the protocol's arms and test seeds
    python scripts/bench_mtl_multifashion.py --smoke   # 3 arms, 2 seeds, 20 steps: checks the script runs

Needs the Fashion-MNIST files (``apt-get install dataset-fashion-mnist``, or ``--download``). Writes
docs/bench_mtl_multifashion.md and ends with ``SUMMARY best_delta_m=<x> ci95=<y> method=<arch/weighting>
seeds=<n> protocol=<hash>``.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import _bench
import torch
from lightning.pytorch import seed_everything
from torch import nn

from tasklight.data.fashion import MultiFashionDataModule
from tasklight.data.multitask import MultiTaskDataModule
from tasklight.multitask import WEIGHTINGS, CrossStitch, HardSharing, MMoE, MTAN, MultiTaskModule, SoftSharing
from tasklight.protocol import holm, load_protocol, paired

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "benchmarks" / "protocols" / "mtl_multifashion.yaml"
OUT = "docs/bench_mtl_multifashion.md"
PUBLISHED = (
    "Published: Lin et al. (NeurIPS 2019, Pareto multi-task learning) introduced MultiFashion (120,000 training "
    "and 20,000 test canvases, a LeNet) and report it as plots of the two tasks' test accuracies for single-task "
    "networks, the uniformly weighted sum, GradNorm, uncertainty weighting, MGDA and Pareto MTL, not as a table; "
    "the figures of that paper and of the later Pareto-front papers that reuse the data set (e.g. Mahapatra & "
    "Rajan 2020, EPO; Navon et al. 2021, Pareto hypernetworks) are preference-sweep fronts and hypervolumes, not "
    "Delta_m against single-task networks, so no published number is directly comparable with the column "
    "above. This run is CPU-sized (a subset of the training images, a hundred steps of 32 canvases per task): its absolute "
    "accuracies are below full-budget training and the comparison between arms is what it measures.")
ARCHITECTURES = {"hard": HardSharing, "mmoe": MMoE, "mtan": MTAN, "cross_stitch": CrossStitch}


class LeNet(nn.Module):
    """Three conv stages (10, 20, 50 channels) on a 28 x 28 image; the output is the 50 features of the last."""

    out_features = 50
    input_shape = (1, 28, 28)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 10, 5), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(10, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(20, 50, 4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)


def parse_arm(arm: str) -> tuple[str, str]:
    """``"stl"`` or ``"<architecture>/<weighting class>"`` -> (architecture, weighting)."""
    if arm == "stl":
        return "stl", "EqualWeighting"
    arch, _, weighting = arm.partition("/")
    if arch not in ARCHITECTURES or weighting not in WEIGHTINGS:
        raise ValueError(f"arm {arm!r}: expected 'stl' or '<{'|'.join(ARCHITECTURES)}>/<weighting>' with a weighting "
                         f"of {sorted(WEIGHTINGS)}")
    return arch, weighting


def make_model(arm: str, lr: float) -> MultiTaskModule:
    arch, weighting = parse_arm(arm)
    architecture = SoftSharing(penalty=0.0) if arch == "stl" else ARCHITECTURES[arch]()
    return MultiTaskModule(LeNet(), architecture=architecture, weighting=WEIGHTINGS[weighting](),
                           optimizer=lambda ps: torch.optim.Adam(ps, lr=lr))


@torch.no_grad()
def accuracies(model: MultiTaskModule, sets) -> list[float]:
    """Accuracy of every task on its held-out set ``sets[t]``."""
    model.eval()
    out = []
    for t, ds in enumerate(sets):
        x, y = ds.fetch(torch.arange(len(ds)))
        out.append(float(torch.cat([model(xb, t).argmax(-1) for xb in x.split(2000)]).eq(y).float().mean()))
    return out


def delta_m(acc: list[float], stl: list[float]) -> float:
    """LibMTL's Delta_m in percent: the mean relative accuracy gain over single-task learning."""
    return 100.0 * statistics.fmean((a - s) / s for a, s in zip(acc, stl))


def seed_data(seed: int, data: dict, steps: int) -> MultiFashionDataModule:
    """Seed ``seed``'s canvases (``split_seed=seed``), built once and shared by every arm of the seed."""
    dm = MultiFashionDataModule(split_seed=seed, seed=seed, batch_size_per_task=data["batch_size_per_task"],
                                steps_per_epoch=steps, val_size=data["val_size"], train_size=data["train_size"],
                                test_size=data["test_size"], val_canvases=data["val_canvases"])
    dm.setup()
    return dm


def run(arm: str, seed: int, canvases: MultiFashionDataModule, cfg: dict, steps: int
        ) -> tuple[list[float], list[float], float]:
    """(validation accuracies, test accuracies, fit seconds) of ``arm`` on seed ``seed``'s canvases (a fresh
    training stream with the same seed for every arm)."""
    dm = MultiTaskDataModule(tasks=canvases.task_specs, train_sets=canvases.train_sets, val_sets=canvases.val_sets,
                             test_sets=canvases.test_sets, batch_size_per_task=canvases.batch_size_per_task,
                             steps_per_epoch=canvases.steps_per_epoch, seed=seed)
    seed_everything(seed, verbose=False)
    model = make_model(arm, cfg["lr"])
    _, fit_s = _bench.fit_and_test(model, dm, steps, split=None)
    return accuracies(model, dm.val_sets), accuracies(model, dm.test_sets), fit_s


def main(argv=None) -> None:
    p = _bench.parser(__doc__, OUT)
    p.add_argument("--smoke", action="store_true", help="3 arms, 2 seeds, 20 steps (checks the script; not a result)")
    p.add_argument("--protocol", default=str(PROTOCOL), help="the protocol file")
    args = p.parse_args(argv)
    _bench.setup(args)
    proto = load_protocol(args.protocol)
    data = proto.extra["data"]
    arms = list(proto.arms)
    if proto.baseline != "stl" or arms[0] != "stl":
        raise ValueError(f"{proto.path.name}: the baseline must be 'stl', the first arm")
    for arm in arms:
        parse_arm(arm)  # every arm is known before anything runs
    seeds = list(proto.test_seeds)
    steps = int(proto.budget["steps"])
    if args.smoke:
        arms, seeds, steps = ["stl", "hard/EqualWeighting", "mtan/EqualWeighting"], seeds[:2], 20
    start = time.perf_counter()
    val = {a: [] for a in arms}
    test = {a: [] for a in arms}
    secs = {a: [] for a in arms}
    for seed in seeds:
        canvases = seed_data(seed, data, steps)
        for arm in arms:  # interleaved: every arm of a seed under the same load
            v, t, s = run(arm, seed, canvases, proto.grid_for(arm)[0], steps)
            val[arm].append(v)
            test[arm].append(t)
            secs[arm].append(s)
            print(f"seed {seed} {arm}: val {v[0]:.4f}/{v[1]:.4f} test {t[0]:.4f}/{t[1]:.4f} ({s:.0f} s)", flush=True)
    total = time.perf_counter() - start

    methods = arms[1:]
    dm_test = {a: [delta_m(test[a][i], test["stl"][i]) for i in range(len(seeds))] for a in methods}
    dm_val = {a: [delta_m(val[a][i], val["stl"][i]) for i in range(len(seeds))] for a in methods}
    stats = {a: paired(dm_test[a], [0.0] * len(seeds)) for a in methods}
    adjusted = holm({a: stats[a]["p"] for a in methods})
    chosen = max(methods, key=lambda a: statistics.fmean(dm_val[a]))
    summary = (f"SUMMARY best_delta_m={stats[chosen]['mean']:.2f} ci95={stats[chosen]['ci95']:.2f} method={chosen} "
               f"holm_p={adjusted[chosen]:.3g} {'smoke=true ' if args.smoke else ''}seeds={len(seeds)} "
               f"protocol={proto.hash}")

    cmd = "python scripts/bench_mtl_multifashion.py" + (" --smoke" if args.smoke else "")
    lines = _bench.header("MultiFashion: single-task networks against every multi-task model", cmd, args.threads,
                          total)
    lines += proto.describe()
    lines += [
        f"Data: MultiFashion canvases from the first {data['train_size']} of the training images left after "
        f"holding out {data['val_size']} for validation ({data['val_canvases']} validation canvases), and from "
        f"the first {data['test_size']} test images (one canvas per image); "
        f"batches of {data['batch_size_per_task']} canvases per task; {steps} Adam steps "
        f"(lr {proto.grid_for('stl')[0]['lr']}) for every arm; the last step's model for every arm. Accuracy: "
        f"mean ± std over the test seeds. Delta_m (%): per seed against that seed's STL, mean and paired 95 % t "
        f"interval over the seeds; p: t test of Delta_m = 0, Holm-adjusted over the {len(methods)} methods.", "",
        "| arm | left acc | right acc | Delta_m (%) | 95 % CI | Holm p | val Delta_m (%) | fit s/run |",
        "|---|---|---|---|---|---|---|---|",
        f"| stl | {_bench.fmt([t[0] for t in test['stl']])} | {_bench.fmt([t[1] for t in test['stl']])} | 0 | | | 0 | "
        f"{statistics.fmean(secs['stl']):.0f} |"]
    for a in methods:
        lines.append(f"| {a} | {_bench.fmt([t[0] for t in test[a]])} | {_bench.fmt([t[1] for t in test[a]])} | "
                     f"{stats[a]['mean']:+.2f} | ± {stats[a]['ci95']:.2f} | {adjusted[a]:.3g} | "
                     f"{statistics.fmean(dm_val[a]):+.2f} | {statistics.fmean(secs[a]):.0f} |")
    lines += ["", f"Chosen by validation Delta_m: **{chosen}**, test Delta_m {stats[chosen]['mean']:+.2f} ± "
              f"{stats[chosen]['ci95']:.2f} % (Holm p = {adjusted[chosen]:.3g}).", "",
              PUBLISHED, ""]
    _bench.write_results(args.out, lines, summary, total)


if __name__ == "__main__":
    main()
