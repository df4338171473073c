"""Figures as W&B images (real offline runs) or PNGs in the run folder, and per-task curves on step."""
import csv
import functools
import glob
import os

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger

from tasklight.callbacks import GradientConflictMonitor, LearnedMetricPlot, ParetoTrajectoryPlot, TaskLossLogger
from tasklight.multitask import MultiTaskModule
from tasklight.multitask.toy import TOY_SCALES, ToyPoint, TwoObjectiveToyDataModule, toy_objectives

PNG = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_side=150, max_side=4000):
    from PIL import Image

    with open(path, "rb") as f:
        assert f.read(8) == PNG, path
    with Image.open(path) as img:
        w, h = img.size
    assert min_side <= w <= max_side and min_side <= h <= max_side, (path, img.size)


def toy_model(steps, start=(9.0, 9.0)):
    return MultiTaskModule(ToyPoint(start), head_type="identity",
                           optimizer=functools.partial(torch.optim.Adam, lr=0.2))


def fit(model, dm, steps, logger, callbacks=(), val=True, **kw):
    trainer = Trainer(max_steps=steps, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1.0 if val else 0,
                      callbacks=list(callbacks), **kw)
    trainer.fit(model, dm)
    return trainer


def csv_rows(logger):
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def wandb_images(save_dir):
    import wandb

    if wandb.run is not None:
        wandb.finish()
    runs = glob.glob(os.path.join(str(save_dir), "wandb", "offline-run-*"))
    assert len(runs) == 1, runs
    return {os.path.relpath(p, os.path.join(runs[0], "files", "media", "images")): p
            for p in glob.glob(os.path.join(runs[0], "files", "media", "images", "**", "*.png"), recursive=True)}


@pytest.mark.slow
def test_multitask_figures_are_wandb_images(tmp_path):
    """A real W&B offline run of the toy: the gradient-conflict heatmap, the per-task bars and the
    Pareto trajectory are PNG images of the run."""
    from lightning.pytorch.loggers import WandbLogger

    seed_everything(0)
    logger = WandbLogger(project="tasklight-test", save_dir=str(tmp_path), offline=True)
    dm = TwoObjectiveToyDataModule("nashmtl", steps_per_epoch=3)
    pareto = ParetoTrajectoryPlot()
    fit(toy_model(6), dm, 6, logger, [GradientConflictMonitor(every_n_steps=3, source="representation"),
                                      TaskLossLogger(), pareto], log_every_n_steps=2)
    images = wandb_images(tmp_path)
    for prefix in ("grad_conflict/heatmap_", "val/tasks_bars_", "toy/pareto_trajectory_"):
        found = [p for name, p in images.items() if name.startswith(prefix)]
        assert found, (prefix, sorted(images))
        for p in found:
            assert_png(p)
    assert len([n for n in images if n.startswith("grad_conflict/heatmap_")]) == 2  # steps 0 and 3
    assert len([n for n in images if n.startswith("val/tasks_bars_")]) == 2  # two epochs
    assert pareto.trajectory.shape == (7, 2)


@pytest.mark.slow
def test_taskmet_learned_metric_is_a_wandb_image(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    from tasklight.nn.nets import MLP
    from tasklight.taskmet.module import MetricNet, TaskMetModule
    from tasklight.taskmet.problems import CubicTopK, DecisionDataModule

    seed_everything(0)
    logger = WandbLogger(project="tasklight-test", save_dir=str(tmp_path), offline=True)
    dm = DecisionDataModule(CubicTopK(num_items=10), num_train=8, num_val=4, num_test=4, steps_per_epoch=2)
    model = TaskMetModule(MLP(1, [], 1), MetricNet(1, 1, hidden=(8,)), inner_steps=2, first_inner_steps=4,
                          cg_steps=2)
    plot = LearnedMetricPlot()
    fit(model, dm, 2, logger, [plot], inference_mode=False)
    assert plot.last is not None and plot.last.shape == (40, 1, 1)  # 4 problems x 10 items
    torch.testing.assert_close(plot.last, model.metric.matrix(dm.val_dataloader().dataset.tensors[0]
                                                              .reshape(-1, 1)[:40]).detach())
    images = wandb_images(tmp_path)
    found = [p for name, p in images.items() if name.startswith("taskmet/learned_metric_")]
    assert found, sorted(images)
    for p in found:
        assert_png(p)


@pytest.mark.slow
def test_without_wandb_the_figures_are_pngs_in_the_run_folder(tmp_path):
    seed_everything(0)
    logger = CSVLogger(str(tmp_path), name="toy")
    dm = TwoObjectiveToyDataModule("nashmtl", steps_per_epoch=2)
    fit(toy_model(2), dm, 2, logger, [GradientConflictMonitor(every_n_steps=1, source="representation"),
                                      ParetoTrajectoryPlot()])
    plots = sorted(os.listdir(os.path.join(logger.log_dir, "plots")))
    assert [p for p in plots if p.startswith("grad_conflict_heatmap-step")] == \
        ["grad_conflict_heatmap-step0.png", "grad_conflict_heatmap-step1.png"]
    assert "val_tasks_bars-step2.png" in plots and "toy_pareto_trajectory-step2.png" in plots, plots
    for p in plots:
        assert_png(os.path.join(logger.log_dir, "plots", p))
    # no logger, no figures (and nothing written anywhere)
    fit(toy_model(1), TwoObjectiveToyDataModule("nashmtl", steps_per_epoch=1), 1, False, [ParetoTrajectoryPlot()],
        default_root_dir=str(tmp_path / "none"))
    assert not (tmp_path / "none").exists() or not list((tmp_path / "none").rglob("*.png"))


def test_pareto_plot_needs_the_toy():
    from tasklight.nn.nets import MLP

    with pytest.raises(TypeError, match="trunk is a ToyPoint"):
        fit(MultiTaskModule(MLP(1, [4], 2)), TwoObjectiveToyDataModule("nashmtl", steps_per_epoch=1), 1, False,
            [ParetoTrajectoryPlot()])


# ------------------------------------------------------------------ per-task curves on step
def test_multitask_per_task_curves_every_log_every_n_steps(tmp_path):
    """6 steps with log_every_n_steps=2: 3 logged points per task, each the mean of its two steps'
    losses (recomputed from the recorded points of the toy) and weights."""
    seed_everything(0)
    logger = CSVLogger(str(tmp_path), name="steps")
    pareto = ParetoTrajectoryPlot()
    fit(toy_model(6), TwoObjectiveToyDataModule("nashmtl", steps_per_epoch=6), 6, logger, [pareto], val=False,
        log_every_n_steps=2)
    rows = [r for r in csv_rows(logger) if r.get("train/tasks/f1/loss_step")]
    assert [int(r["step"]) for r in rows] == [1, 3, 5]
    losses = toy_objectives(torch.stack(pareto.points[:-1]), TOY_SCALES["nashmtl"])  # before each step
    for j, r in enumerate(rows):
        for t, name in enumerate(["f1", "f2"]):
            want = float(losses[2 * j:2 * j + 2, t].mean())
            assert float(r[f"train/tasks/{name}/loss_step"]) == pytest.approx(want, rel=1e-5, abs=1e-6)
            assert float(r[f"train/tasks/{name}/weight_step"]) == pytest.approx(1.0)  # equal weighting


def test_meta_learner_curves_every_log_every_n_steps(tmp_path):
    from tasklight.data.sinusoid import SinusoidDataModule
    from tasklight.meta.maml import MAMLModule
    from tasklight.nn.nets import MLP

    seed_everything(0)
    logger = CSVLogger(str(tmp_path), name="maml")
    dm = SinusoidDataModule(k_shot=5, q_queries=5, meta_batch_size=2, batches_per_epoch=6, val_episodes=2,
                            test_episodes=2)
    fit(MAMLModule(MLP(1, [8], 1)), dm, 6, logger, val=False, log_every_n_steps=2, inference_mode=False)
    rows = [r for r in csv_rows(logger) if r.get("train/query_loss")]
    assert [int(r["step"]) for r in rows] == [1, 3, 5]
    assert all(r.get("train/support_loss_pre") for r in rows)
