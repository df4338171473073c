"""tasklight's figures, drawn with matplotlib's Agg backend, and the one way they are logged.

:func:`log_figure` sends a figure to the run: as an image to every ``WandbLogger`` of the trainer,
and, when the trainer has no ``WandbLogger``, as a PNG under the run folder
(``<run folder>/plots/<key>-step<N>.png``; the run folder of a ``tasklight`` command, else the first
logger's ``log_dir``). A trainer without loggers gets no figures.

Figures: the evaluation metric vs adaptation steps and the fitted functions of a few regression
tasks (meta-learners, at the end of a test), a square heatmap (the gradient-conflict cosine matrix,
Task2Vec distances), per-task bars (a multi-task run's validation metric), the two-objective toy's
trajectories in objective space with the Pareto front, and TaskMet's learned metric.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["metric_vs_steps", "fitted_curves", "heatmap", "task_bars", "pareto_trajectories", "learned_metric",
           "figure_array", "log_figure", "run_folder", "wants_figures"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _np(t) -> np.ndarray:
    return t.detach().cpu().double().numpy() if isinstance(t, Tensor) else np.asarray(t, dtype=float)


def metric_vs_steps(steps: Sequence[int], means: Sequence[float], ci95: Sequence[float], metric: str,
                    title: str = ""):
    """The evaluation metric after each number of adaptation steps, with 95 % confidence intervals."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.errorbar(list(steps), list(means), yerr=list(ci95), marker="o", capsize=3)
    ax.set_xlabel("adaptation steps")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs adaptation steps")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def fitted_curves(support_x: Tensor, support_y: Tensor, grid: Tensor, curves: dict[int, Tensor],
                  truth_x: Optional[Tensor] = None, truth_y: Optional[Tensor] = None, tasks: int = 3,
                  true_curve: Optional[Tensor] = None):
    """1-D regression: the support points and the adapted predictions on ``grid`` for a few tasks
    (``curves[k]`` ``[T, G]`` after ``k`` steps), with the true function (``true_curve`` ``[T, G]``)
    where the data knows it."""
    plt = _plt()
    n = min(tasks, support_x.shape[0])
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.0), squeeze=False)
    for t in range(n):
        ax = axes[0, t]
        if truth_x is not None and truth_y is not None:
            order = torch.argsort(truth_x[t].flatten())
            ax.plot(truth_x[t].flatten()[order], truth_y[t].flatten()[order], "k.", ms=3, label="query")
        if true_curve is not None:
            ax.plot(grid.flatten(), true_curve[t].flatten(), "k--", lw=1.2, label="true function")
        for k, c in sorted(curves.items()):
            ax.plot(grid.flatten(), c[t].flatten(), label=f"{k} steps")
        ax.plot(support_x[t].flatten(), support_y[t].flatten(), "r^", label="support")
        ax.set_title(f"task {t}")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def heatmap(matrix, names: Sequence[str], title: str = "", cmap: str = "viridis", vmin: Optional[float] = None,
            vmax: Optional[float] = None, annotate: Optional[bool] = None, dpi: int = 80):
    """A square matrix with ``names`` on both axes and a colour bar (values written in the cells of
    matrices up to 8 x 8 unless ``annotate`` says otherwise)."""
    plt = _plt()
    m = _np(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(names):
        raise ValueError(f"heatmap needs a square matrix with one name per row, got shape {m.shape} and "
                         f"{len(names)} names")
    n = len(names)
    size = max(3.0, 0.45 * n + 1.5)
    fig, ax = plt.subplots(figsize=(size + 1.0, size), dpi=dpi)
    im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(n), [str(s) for s in names], rotation=90, fontsize=7)
    ax.set_yticks(range(n), [str(s) for s in names], fontsize=7)
    if annotate if annotate is not None else n <= 8:
        for i in range(n):
            for j in range(n):
                r, g, b, _ = im.cmap(im.norm(m[i, j]))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # readable text on the cell's colour
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w" if dark else "k")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def task_bars(names: Sequence[str], values, metric: str, title: str = ""):
    """One bar per task (tasks without a value, NaN, are left empty and named in the title)."""
    plt = _plt()
    v = _np(values)
    if v.shape != (len(names),):
        raise ValueError(f"task_bars needs one value per task, got {v.shape} values for {len(names)} tasks")
    fig, ax = plt.subplots(figsize=(max(3.5, 0.5 * len(names) + 1.5), 3.2), dpi=80)
    ok = np.isfinite(v)
    ax.bar(np.arange(len(names))[ok], v[ok])
    ax.set_xticks(range(len(names)), [str(s) for s in names], rotation=60 if len(names) > 6 else 0, fontsize=7)
    ax.set_ylabel(metric)
    missing = [str(n) for n, o in zip(names, ok) if not o]
    ax.set_title((title or f"{metric} per task") + (f" (no value: {', '.join(missing)})" if missing else ""),
                 fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def pareto_trajectories(trajectories: Sequence, front=None, labels: Optional[Sequence[str]] = None,
                        objectives: Sequence[str] = ("L1", "L2"), title: str = "trajectories in objective space",
                        ax=None):
    """Two-objective trajectories ``[N, 2]`` (one per start) with the Pareto front ``[M, 2]``: start
    (circle) and end (star) marked. ``ax``: draw into this matplotlib axes (one panel of a larger figure)
    instead of a new figure."""
    plt = _plt()
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.5, 4.0), dpi=80)
    else:
        fig = ax.figure
    if front is not None:
        f = _np(front)
        ax.plot(f[:, 0], f[:, 1], "k-", lw=2, alpha=0.5, label="Pareto front")
    for i, tr in enumerate(trajectories):
        t = _np(tr)
        if t.ndim != 2 or t.shape[1] != 2:
            raise ValueError(f"a trajectory is [steps, 2] objective values, got shape {t.shape}")
        label = labels[i] if labels is not None else f"start {i}"
        (line,) = ax.plot(t[:, 0], t[:, 1], "-", lw=1.2, label=label)
        ax.plot(t[0, 0], t[0, 1], "o", color=line.get_color())
        ax.plot(t[-1, 0], t[-1, 1], "*", ms=10, color=line.get_color())
    ax.set_xlabel(objectives[0])
    ax.set_ylabel(objectives[1])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def learned_metric(matrices: Tensor, x: Optional[Tensor] = None, title: str = "learned metric"):
    """TaskMet's metric ``Lambda(x) [N, m, m]`` at ``N`` inputs: the mean matrix as a heatmap and, for
    1-D inputs ``x [N]``, each diagonal entry ``Lambda_ii(x)`` against ``x`` (only the curve for a
    1 x 1 metric)."""
    plt = _plt()
    lam = _np(matrices)
    if lam.ndim != 3 or lam.shape[1] != lam.shape[2]:
        raise ValueError(f"learned_metric needs matrices [N, m, m], got shape {lam.shape}")
    m = lam.shape[1]
    with_x = x is not None and _np(x).reshape(-1).shape[0] == lam.shape[0]
    heat = m > 1 or not with_x  # a 1 x 1 mean says little when the curve is there
    n = int(heat) + int(with_x)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.6), dpi=80, squeeze=False)
    if heat:
        ax = axes[0, 0]
        im = ax.imshow(lam.mean(0), cmap="magma")
        ax.set_xticks(range(m))
        ax.set_yticks(range(m))
        ax.set_title(f"mean Lambda(x) over {lam.shape[0]} inputs", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if with_x:
        xs = _np(x).reshape(-1)
        order = np.argsort(xs)
        ax = axes[0, n - 1]
        for i in range(min(m, 8)):
            ax.plot(xs[order], lam[order, i, i], label=f"Lambda_{i}{i}")
        ax.set_xlabel("x")
        ax.set_yscale("log")
        ax.set_title("diagonal of Lambda(x)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def figure_array(fig) -> np.ndarray:
    """The figure as an RGB ``uint8 [H, W, 3]`` array (closes it)."""
    plt = _plt()
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return img


def _trainer(target):
    from lightning.pytorch import Trainer

    if target is None or isinstance(target, Trainer):
        return target
    try:
        return target.trainer
    except RuntimeError:  # a LightningModule not attached to a trainer
        return None


def wants_figures(target) -> bool:
    """Whether :func:`log_figure` would log anything for ``target`` (skip drawing otherwise)."""
    trainer = _trainer(target)
    if trainer is None or not trainer.is_global_zero:
        return False
    return any(type(lg).__name__ == "WandbLogger" for lg in trainer.loggers) or run_folder(trainer) is not None


def run_folder(trainer) -> Optional[Path]:
    """Where a run's PNG figures go: the ``tasklight`` command's run folder, else the first logger's
    ``log_dir``; None for a trainer without loggers."""
    if trainer is None or not trainer.loggers:
        return None
    folder = getattr(trainer, "tasklight_run_dir", None)
    if folder:
        return Path(folder)
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if log_dir:
            return Path(log_dir)
    return None


def log_figure(target, key: str, fig, step: Optional[int] = None) -> list[Union[str, Path]]:
    """Log ``fig`` under ``key`` for ``target`` (a LightningModule or a Trainer) and close it.

    Every ``WandbLogger`` of the trainer gets it as an image, and it is saved as
    ``<run folder>/plots/<key>-step<N>.png`` (the ``tasklight`` command's run folder, else the first
    logger's ``log_dir``). Only global rank 0 logs. Returns where it went
    (``"wandb"`` and/or the PNG paths).
    """
    plt = _plt()
    trainer = _trainer(target)
    done: list[Union[str, Path]] = []
    try:
        if trainer is None or not trainer.is_global_zero:
            return done
        step = int(trainer.global_step if step is None else step)
        wandb_loggers = [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
        if wandb_loggers:
            import wandb

            for logger in wandb_loggers:
                logger.experiment.log({key: wandb.Image(fig), "trainer/global_step": step})
            done.append("wandb")
        folder = run_folder(trainer)
        if folder is not None:
            path = folder / "plots" / f"{re.sub(r'[^A-Za-z0-9_.@-]+', '_', key)}-step{step}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=fig.dpi)
            done.append(path)
        return done
    finally:
        plt.close(fig)
