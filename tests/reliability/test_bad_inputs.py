"""Bad settings and bad batches given to the learners, weightings, DataModules, decision problems and
Task2Vec: each one gives one error that names the setting and the fix (docs/reliability.md, "Learner,
weighting and data inputs"). Nothing here trains beyond a step."""
import functools
import math
import warnings

import pytest
import torch
from lightning.pytorch import Trainer

from tasklight import MLP
from tasklight.core.outer import configure_outer_optimizers
from tasklight.data.batch import MetaBatch
from tasklight.data.episodes import EpisodicDataModule
from tasklight.data.mtl_regression import SinusoidTasksDataModule
from tasklight.data.multitask import MultiTaskDataModule
from tasklight.data.omniglot import OmniglotDataModule
from tasklight.data.sinusoid import SinusoidDataModule
from tasklight.meta.imaml import IMAMLModule
from tasklight.meta.maml import MAMLModule
from tasklight.meta.mamlpp import MAMLPlusPlusModule
from tasklight.meta.proto import ProtoMAMLModule, ProtoNetModule
from tasklight.meta.reptile import ReptileModule
from tasklight.multitask import weighting as W
from tasklight.task2vec import Task2Vec
from tasklight.taskmet.module import DFLModule, MetricNet, TaskMetModule
from tasklight.taskmet.problems import BudgetAllocation, CubicTopK, DecisionDataModule, PortfolioOptimization

nan, inf = math.nan, math.inf


def net():
    return MLP(1, [4], 1)


# (owner, constructor, setting, bad values): every value must raise one ValueError naming the setting
SETTINGS = [
    ("MAMLModule", lambda **k: MAMLModule(net(), **k), "inner_steps", [2.5, -1, True]),
    ("MAMLModule", lambda **k: MAMLModule(net(), **k), "inner_lr", [-1, nan, inf]),
    ("MAMLModule", lambda **k: MAMLModule(net(), **k), "eval_inner_steps", [1.5, -2]),
    ("MAMLModule", lambda **k: MAMLModule(net(), **k), "extra_eval_steps", [(1.5,), (-1,)]),
    ("MAMLModule", lambda **k: MAMLModule(net(), **k), "max_consecutive_skips", [-1, 2.5]),
    ("MAMLModule", lambda **k: MAMLModule(net(), **k), "clip_grad_norm", [0, -1, nan]),
    ("MAMLModule", lambda **k: MAMLModule(net(), **k), "chunk_size", [0, -1]),
    ("IMAMLModule", lambda **k: IMAMLModule(net(), **k), "inner_steps", [2.5]),
    ("IMAMLModule", lambda **k: IMAMLModule(net(), **k), "lam", [0, -1, nan]),
    ("IMAMLModule", lambda **k: IMAMLModule(net(), **k), "cg_steps", [0, 2.5]),
    ("IMAMLModule", lambda **k: IMAMLModule(net(), **k), "cg_damping", [-1, nan]),
    ("IMAMLModule", lambda **k: IMAMLModule(net(), **k), "cg_tol", [0, -1, nan]),
    ("MAMLPlusPlusModule", lambda **k: MAMLPlusPlusModule(net(), loss="mse", **k), "inner_steps", [2.5, 0]),
    ("MAMLPlusPlusModule", lambda **k: MAMLPlusPlusModule(net(), loss="mse", **k), "msl_epochs", [2.5, -1]),
    ("MAMLPlusPlusModule", lambda **k: MAMLPlusPlusModule(net(), loss="mse", **k), "first_order_epochs", [2.5, -1]),
    ("MAMLPlusPlusModule", lambda **k: MAMLPlusPlusModule(net(), loss="mse", **k), "min_outer_lr", [-1, nan]),
    ("ReptileModule", lambda **k: ReptileModule(net(), **k), "inner_steps", [2.5, -1]),
    ("ReptileModule", lambda **k: ReptileModule(net(), **k), "inner_lr", [-1, nan]),
    ("ProtoMAMLModule", lambda **k: ProtoMAMLModule(net(), **k), "inner_steps", [2.5, -1]),
    ("ProtoMAMLModule", lambda **k: ProtoMAMLModule(net(), **k), "inner_lr", [-1, nan]),
    ("ProtoNetModule", lambda **k: ProtoNetModule(net(), **k), "max_consecutive_skips", [-1]),
    ("UncertaintyWeighting", W.UncertaintyWeighting, "init_log_var", [nan, inf]),
    ("StaticWeighting", W.StaticWeighting, "weights", [[0.0, 0.0], [nan, 1.0], [-1.0, 1.0]]),
    ("DWA", W.DWA, "temperature", [0, -1, nan]),
    ("DROWeighting", W.DROWeighting, "step_size", [0, -1, nan]),
    ("MGDA", W.MGDA, "max_iter", [0, 2.5]),
    ("MGDA", W.MGDA, "normalization", ["max"]),
    ("GradNorm", W.GradNorm, "alpha", [-1, nan]),
    ("GradNorm", W.GradNorm, "lr", [0, -1, nan]),
    ("FAMO", W.FAMO, "lr", [0, -1, nan]),
    ("FAMO", W.FAMO, "gamma", [-1, nan]),
    ("FAMO", W.FAMO, "eps", [0, -1]),
    ("CAGrad", W.CAGrad, "c", [-1, nan]),
    ("CAGrad", W.CAGrad, "rescale", [3]),
    ("NashMTL", W.NashMTL, "update_every", [0, 2.5]),
    ("NashMTL", W.NashMTL, "max_iter", [0, 2.5]),
    ("UPGrad", W.UPGrad, "norm_eps", [-1, nan]),
    ("UPGrad", W.UPGrad, "reg_eps", [-1, nan]),
    ("SinusoidDataModule", SinusoidDataModule, "k_shot", [0, -1, 2.5]),
    ("SinusoidDataModule", SinusoidDataModule, "q_queries", [0, 2.5]),
    ("SinusoidDataModule", SinusoidDataModule, "meta_batch_size", [0, 2.5]),
    ("SinusoidDataModule", SinusoidDataModule, "test_episodes", [0, 2.5]),
    ("SinusoidDataModule", SinusoidDataModule, "seed", [-1, 2.5]),
    ("OmniglotDataModule", OmniglotDataModule, "n_way", [0, 1, 2.5]),
    ("OmniglotDataModule", OmniglotDataModule, "eval_n_way", [1]),
    ("OmniglotDataModule", OmniglotDataModule, "k_shot", [0, 2.5]),
    ("OmniglotDataModule", OmniglotDataModule, "q_queries", [0]),
    ("OmniglotDataModule", OmniglotDataModule, "image_size", [0, -1, 2.5]),
    ("OmniglotDataModule", OmniglotDataModule, "split_seed", [2.5]),
    ("OmniglotDataModule", OmniglotDataModule, "eval_batch_size", [0]),
    ("SinusoidTasksDataModule", SinusoidTasksDataModule, "num_tasks", [0, 2.5]),
    ("SinusoidTasksDataModule", SinusoidTasksDataModule, "n_train", [0]),
    ("SinusoidTasksDataModule", SinusoidTasksDataModule, "noise", [-1, nan]),
    ("MultiTaskDataModule", MultiTaskDataModule, "batch_size_per_task", [0, 2.5]),
    ("MultiTaskDataModule", MultiTaskDataModule, "steps_per_epoch", [0]),
    ("MultiTaskDataModule", MultiTaskDataModule, "eval_batch_size", [0]),
    ("DecisionDataModule", lambda **k: DecisionDataModule(CubicTopK(), **k), "num_train", [0, 2.5]),
    ("DecisionDataModule", lambda **k: DecisionDataModule(CubicTopK(), **k), "num_random", [0]),
    ("DecisionDataModule", lambda **k: DecisionDataModule(CubicTopK(), **k), "batch_size", [0]),
    ("DecisionDataModule", lambda **k: DecisionDataModule(CubicTopK(), **k), "steps_per_epoch", [2.5]),
    ("CubicTopK", CubicTopK, "num_items", [0, 2.5]),
    ("CubicTopK", CubicTopK, "k", [0]),
    ("CubicTopK", CubicTopK, "temperature", [0, nan]),
    ("CubicTopK", CubicTopK, "noise", [-1, nan]),
    ("BudgetAllocation", BudgetAllocation, "budget", [0]),
    ("BudgetAllocation", BudgetAllocation, "feature_noise", [-1]),
    ("BudgetAllocation", BudgetAllocation, "temperature", [0]),
    ("BudgetAllocation", BudgetAllocation, "relax_steps", [0]),
    ("PortfolioOptimization", PortfolioOptimization, "num_assets", [0]),
    ("PortfolioOptimization", PortfolioOptimization, "risk_aversion", [-1, nan]),
    ("PortfolioOptimization", PortfolioOptimization, "solver_steps", [0]),
    ("TaskMetModule", lambda **k: TaskMetModule(net(), MetricNet(1, 1), **k), "inner_steps", [0, 2.5]),
    ("TaskMetModule", lambda **k: TaskMetModule(net(), MetricNet(1, 1), **k), "first_inner_steps", [2.5]),
    ("TaskMetModule", lambda **k: TaskMetModule(net(), MetricNet(1, 1), **k), "inner_lr", [0, -1, nan]),
    ("TaskMetModule", lambda **k: TaskMetModule(net(), MetricNet(1, 1), **k), "inner_weight_decay", [-1, nan]),
    ("TaskMetModule", lambda **k: TaskMetModule(net(), MetricNet(1, 1), **k), "cg_steps", [0, 2.5]),
    ("TaskMetModule", lambda **k: TaskMetModule(net(), MetricNet(1, 1), **k), "cg_damping", [-1, nan]),
    ("MetricNet", MetricNet, "dim", [0]),
    ("MetricNet", MetricNet, "eps", [-1, nan]),
    ("MetricNet", MetricNet, "init_scale", [-1, nan]),
    ("DFLModule", lambda **k: DFLModule(net(), **k), "alpha", [-1, nan]),
    ("Task2Vec", lambda **k: Task2Vec(torch.nn.Linear(2, 2), **k), "mc_samples", [0, 2.5]),
    ("Task2Vec", lambda **k: Task2Vec(torch.nn.Linear(2, 2), **k), "beta", [-1, nan]),
    ("Task2Vec", lambda **k: Task2Vec(torch.nn.Linear(2, 2), method="variational", **k), "variational_steps",
     [0, 2.5]),
    ("Task2Vec", lambda **k: Task2Vec(torch.nn.Linear(2, 2), **k), "variational_lr", [0, -1, nan]),
    ("Task2Vec", lambda **k: Task2Vec(torch.nn.Linear(2, 2), **k), "batch_size", [0]),
    ("Task2Vec", lambda **k: Task2Vec(torch.nn.Linear(2, 2), **k), "head_steps", [-1, 2.5]),
    ("Task2Vec", lambda **k: Task2Vec(torch.nn.Linear(2, 2), **k), "head_weight_decay", [-1, nan]),
]


@pytest.mark.parametrize("owner,make,setting,values", SETTINGS, ids=[f"{o}-{s}" for o, _, s, _ in SETTINGS])
def test_a_bad_setting_is_one_error_naming_it(owner, make, setting, values):
    for value in values:
        with pytest.raises(ValueError) as err:
            make(**{setting: value})
        text = str(err.value)
        assert setting in text, (value, text)
        assert "\n" not in text, text


# ------------------------------------------------------------------------------- the outer learning rate
@pytest.mark.parametrize("lr", [0.0, -0.1, nan])
def test_an_outer_learning_rate_that_trains_nothing_or_breaks_is_refused(lr):
    make = functools.partial(torch.optim.SGD, lr=lr)
    with pytest.raises(ValueError, match="outer learning rate must be a finite number > 0") as err:
        configure_outer_optimizers(make, None, torch.nn.Linear(2, 2).parameters())
    assert "\n" not in str(err.value)
    module = MAMLModule(net(), optimizer=make)  # the learner's own configure_optimizers too
    with pytest.raises(ValueError, match="optimizer's lr"):
        module.configure_optimizers()


# ------------------------------------------------------------------------------- bad batches
def class_batch(T=2, n_way=3, shots=2, d=4, dtype=torch.float32, query_label=None):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n_way).repeat(shots).expand(T, -1).clone()
    x = torch.randn(T, n_way * shots, d, generator=g, dtype=dtype)
    qy = y.clone()
    if query_label is not None:
        qy[0, 0] = query_label
    return MetaBatch(x, y, x.clone(), qy)


def classifiers():
    return {"MAMLModule": MAMLModule(MLP(4, [8], 3), loss="cross_entropy"),
            "ProtoNetModule": ProtoNetModule(MLP(4, [8], 8)),
            "ProtoMAMLModule": ProtoMAMLModule(MLP(4, [8], 8))}


def both_paths(module, batch):
    """The training step and the test step (each must raise before any computation)."""
    for run in (lambda: module.training_step(batch, 0), lambda: module._eval_step(batch, "test", 0)):
        with torch.enable_grad():
            yield run


@pytest.mark.parametrize("name", ["MAMLModule", "ProtoNetModule", "ProtoMAMLModule"])
@pytest.mark.parametrize("label", [3, 7, -1])
def test_query_labels_outside_the_episodes_classes_are_one_error_in_training_and_test(name, label):
    module = classifiers()[name]
    for run in both_paths(module, class_batch(query_label=label)):
        with pytest.raises(ValueError, match=f"query label {label} but only classes 0..2"):
            run()


@pytest.mark.parametrize("case,batch,match", [
    ("empty support set", MetaBatch(torch.zeros(2, 0, 1), torch.zeros(2, 0), torch.zeros(2, 5, 1), torch.zeros(2, 5)),
     "empty support set"),
    ("empty query set", MetaBatch(torch.zeros(2, 5, 1), torch.zeros(2, 5), torch.zeros(2, 0, 1), torch.zeros(2, 0)),
     "empty query set"),
    ("uint8 inputs", MetaBatch(torch.zeros(2, 5, 1, dtype=torch.uint8), torch.zeros(2, 5),
                               torch.zeros(2, 5, 1, dtype=torch.uint8), torch.zeros(2, 5)), r"x.float\(\) / 255"),
    ("float64 batch on a float32 net", MetaBatch(torch.zeros(2, 5, 1, dtype=torch.float64),
                                                 torch.zeros(2, 5, dtype=torch.float64),
                                                 torch.zeros(2, 5, 1, dtype=torch.float64),
                                                 torch.zeros(2, 5, dtype=torch.float64)),
     "network's parameters are torch.float32"),
    ("mixed support/query dtypes", MetaBatch(torch.zeros(2, 5, 1), torch.zeros(2, 5),
                                             torch.zeros(2, 5, 1, dtype=torch.float64), torch.zeros(2, 5)),
     "support_x is torch.float32 but query_x is torch.float64"),
    ("float64 targets on float32 inputs", MetaBatch(torch.zeros(2, 5, 1), torch.zeros(2, 5, dtype=torch.float64),
                                                    torch.zeros(2, 5, 1), torch.zeros(2, 5)),
     "support_y is torch.float64"),
])
@pytest.mark.parametrize("learner", ["MAMLModule", "IMAMLModule", "ReptileModule"])
def test_bad_regression_batches_are_one_error(case, batch, match, learner):
    module = {"MAMLModule": MAMLModule, "IMAMLModule": IMAMLModule, "ReptileModule": ReptileModule}[learner](net())
    for run in both_paths(module, batch):
        with pytest.raises(ValueError, match=match) as err:
            run()
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["MAMLModule", "ProtoNetModule", "ProtoMAMLModule"])
def test_float_class_labels_are_one_error(name):
    b = class_batch()
    batch = MetaBatch(b.support_x, b.support_y.float(), b.query_x, b.query_y)
    for run in both_paths(classifiers()[name], batch):
        with pytest.raises(ValueError, match=r"class labels are integers .* convert them with .long\(\)"):
            run()


# ------------------------------------------------------------------------------- the guide's DataModule
class LineTasks:
    def __init__(self, k_shot):
        self.k_shot = k_shot

    def __call__(self, gen):
        x = torch.rand(self.k_shot + 2, 1, generator=gen)
        return x[:self.k_shot], x[:self.k_shot, 0], x[self.k_shot:], x[self.k_shot:, 0]


class LineDataModule(EpisodicDataModule):
    """As docs/guides/episodic_datamodule.md writes it: no save_hyperparameters."""

    def __init__(self, k_shot: int = 5, meta_batch_size: int = 8, seed: int = 0):
        super().__init__(meta_batch_size, 20, 16, 32, seed=seed)
        self.k_shot = k_shot

    def task_fn(self, split):
        return LineTasks(self.k_shot)


def test_a_datamodule_written_as_the_guide_shows_is_checked_on_resume():
    state = LineDataModule(k_shot=5).state_dict()
    with pytest.raises(ValueError, match="k_shot: checkpoint 5, now 3"):
        LineDataModule(k_shot=3).load_state_dict(state)
    LineDataModule(k_shot=5).load_state_dict(state)  # the same settings resume


# ------------------------------------------------------------------------------- evaluation reports
def quiet_trainer():
    return Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, inference_mode=False)


def test_one_test_episode_reports_an_undefined_interval_not_zero():
    torch.manual_seed(0)
    dm = SinusoidDataModule(k_shot=5, q_queries=5, meta_batch_size=2, test_episodes=1)
    with pytest.warns(UserWarning, match="intervals .* are undefined"):
        res = quiet_trainer().test(MAMLModule(net(), inner_steps=1), dm, verbose=False)[0]
    assert math.isfinite(res["test/mse@1"]) and math.isnan(res["test/mse@1_ci95"])


def test_evaluation_flags_adaptation_that_makes_the_loss_worse():
    torch.manual_seed(0)
    dm = SinusoidDataModule(k_shot=5, q_queries=5, meta_batch_size=2, test_episodes=4)
    with pytest.warns(UserWarning, match="adaptation makes the test metric worse"):
        bad = quiet_trainer().test(MAMLModule(net(), inner_steps=3, inner_lr=0.3), dm, verbose=False)[0]
    assert bad["test/adaptation_hurts"] == 1.0 and bad["test/mse@3"] > bad["test/mse@0"]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*adaptation makes.*")
        good = quiet_trainer().test(MAMLModule(net(), inner_steps=3, inner_lr=0.01), dm, verbose=False)[0]
    assert good["test/adaptation_hurts"] == 0.0 and good["test/mse@3"] <= good["test/mse@0"]


def test_every_setting_tried_here_is_listed_in_the_reliability_table():
    from pathlib import Path

    table = (Path(__file__).resolve().parents[2] / "docs" / "reliability.md").read_text()
    missing = [f"{o}({s}=...)" for o, _, s, _ in SETTINGS if f"`{o}({s}=...)`" not in table]
    assert not missing, missing


@pytest.mark.parametrize("dtype,match", [(torch.uint8, r"x.float\(\) / 255"),
                                         (torch.float64, "network's parameters are torch.float32")])
def test_multitask_batches_of_another_dtype_are_one_error(dtype, match):
    from tasklight.data.batch import MultiTaskBatch, TaskSpec
    from tasklight.multitask import MultiTaskModule

    module = MultiTaskModule(MLP(4, [8], 6), tasks=[TaskSpec("a", 3), TaskSpec("b", 3)])
    batch = MultiTaskBatch(torch.zeros(4, 4, dtype=dtype), torch.zeros(4, dtype=torch.long),
                           torch.tensor([0, 0, 1, 1]), torch.eye(2)[[0, 0, 1, 1]])
    for run in (lambda: module.training_step(batch, 0), lambda: module._eval_step(batch, "test", 0)):
        with pytest.raises(ValueError, match=match) as err:
            run()
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("learner", ["TaskMetModule", "DFLModule"])
def test_taskmet_batches_of_another_dtype_are_one_error(learner):
    problem = CubicTopK(num_items=10)
    module = TaskMetModule(net(), MetricNet(1, 1), problem=problem) if learner == "TaskMetModule" else \
        DFLModule(net(), problem=problem)
    x, y = problem.generate(2, torch.Generator().manual_seed(0))
    batch = (x.double(), y.double(), torch.zeros(2), torch.zeros(2))
    for run in (lambda: module.training_step(batch, 0), lambda: module._eval_step(batch, "test", 0)):
        with pytest.raises(ValueError, match="network's parameters are torch.float32") as err:
            run()
        assert "\n" not in str(err.value)
