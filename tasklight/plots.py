"""Figures logged as W&B images (only when a ``WandbLogger`` is attached; matplotlib's Agg backend)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["metric_vs_steps", "fitted_curves", "log_figure"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


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
                  truth_x: Optional[Tensor] = None, truth_y: Optional[Tensor] = None, tasks: int = 3):
    """1-D regression: the support points and the adapted predictions on ``grid`` for a few tasks
    (``curves[k]`` ``[T, G]`` after ``k`` steps)."""
    plt = _plt()
    n = min(tasks, support_x.shape[0])
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.0), squeeze=False)
    for t in range(n):
        ax = axes[0, t]
        if truth_x is not None and truth_y is not None:
            order = torch.argsort(truth_x[t].flatten())
            ax.plot(truth_x[t].flatten()[order], truth_y[t].flatten()[order], "k.", ms=3, label="query")
        for k, c in sorted(curves.items()):
            ax.plot(grid.flatten(), c[t].flatten(), label=f"{k} steps")
        ax.plot(support_x[t].flatten(), support_y[t].flatten(), "r^", label="support")
        ax.set_title(f"task {t}")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def log_figure(module, key: str, fig) -> bool:
    """Log ``fig`` as an image to every W&B logger of ``module``'s trainer; close it. True if logged."""
    plt = _plt()
    logged = False
    try:
        trainer = module.trainer
    except RuntimeError:
        trainer = None
    for logger in (trainer.loggers if trainer is not None else []):
        if type(logger).__name__ == "WandbLogger":
            import wandb

            logger.experiment.log({key: wandb.Image(fig), "trainer/global_step": trainer.global_step})
            logged = True
    plt.close(fig)
    return logged
