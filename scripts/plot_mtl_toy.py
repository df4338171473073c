"""The two-objective toy of CAGrad (Liu et al. 2021) and Nash-MTL (Navon et al. 2022): every weighting method of
tasklight from the papers' starting points, trajectories in objective space against the Pareto front.

For each setting (``nashmtl``: the first loss scaled by 0.1, five starts; ``cagrad``: unscaled, three starts)
every weighting runs :func:`tasklight.multitask.toy.toy_descent` (Adam at ``--lr`` annealed to 0 over
``--steps``, as in docs/multitask.md's table) and one panel shows its trajectories; the panel's title gives
the largest Pareto gap of its end points (the additive epsilon indicator; 0 on the front).

    python scripts/plot_mtl_toy.py      # writes docs/figures/mtl_toy_nashmtl.png and mtl_toy_cagrad.png

Prints one line per method and setting: ``<setting> <method> max_pareto_gap=<g> on_front=<k>/<n>``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tasklight.multitask import WEIGHTINGS
from tasklight.multitask.toy import TOY_SCALES, TOY_STARTS, pareto_gap, toy_descent, toy_pareto_front
from tasklight.plots import _plt, pareto_trajectories

ON_FRONT = 0.01  # a Pareto gap below this counts as on the front


def front_curve(scales) -> torch.Tensor:
    """The non-dominated points of the toy's Pareto region, sorted by the first loss: the front as a curve."""
    pts = toy_pareto_front(scales)
    pts = pts[pts[:, 0].argsort()]
    keep, best = [], float("inf")
    for p in pts:
        if float(p[1]) < best:
            keep.append(p)
            best = float(p[1])
    return torch.stack(keep)


def run_setting(setting: str, steps: int, lr: float, out: Path) -> list[str]:
    scales, starts = TOY_SCALES[setting], TOY_STARTS[setting]
    methods = [m for m in WEIGHTINGS if m != "StaticWeighting"]
    plt = _plt()
    cols = 5
    rows = -(-len(methods) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), dpi=80)
    front = front_curve(scales)
    dense = toy_pareto_front(scales)
    lines = []
    for ax, name in zip(axes.flat, methods):
        path: list = []
        _, final = toy_descent(WEIGHTINGS[name], starts, scales, steps=steps, lr=lr, trajectory=path)
        gaps = pareto_gap(final, dense)
        traj = torch.stack(path, 1)  # [K, steps + 1, 2]
        pareto_trajectories(list(traj), front, labels=[f"({a:g}, {b:g})" for a, b in starts],
                            objectives=(f"L1 x {scales[0]:g}", "L2"),
                            title=f"{name}: max gap {float(gaps.max()):.3f}", ax=ax)
        ax.get_legend().remove()
        on = int((gaps < ON_FRONT).sum())
        lines.append(f"{setting} {name} max_pareto_gap={float(gaps.max()):.3f} on_front={on}/{len(starts)}")
        print(lines[-1], flush=True)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower right", fontsize=8, title="start (x1, x2)")
    fig.suptitle(f"two-objective toy ({setting} setting): {steps} Adam steps, lr {lr:g} annealed to 0; "
                 f"circle = start, star = end", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--out-dir", default="docs/figures")
    p.add_argument("--settings", nargs="+", default=["nashmtl", "cagrad"], choices=sorted(TOY_STARTS))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for setting in args.settings:
        run_setting(setting, args.steps, args.lr, Path(args.out_dir) / f"mtl_toy_{setting}.png")


if __name__ == "__main__":
    main()
