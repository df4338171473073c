"""TaskMet: the implicit metric gradient, the metric, the learners on cubic top-k, configs through the CLI."""
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.func import functional_call

from tasklight.cli import main as cli_main, run_cli
from tasklight.taskmet.problems import BudgetAllocation, CubicTopK, DecisionDataModule
from tasklight.nn.nets import MLP
from tasklight.taskmet.module import DFLModule, MetricNet, MSEModule, TaskMetModule

ROOT = Path(__file__).resolve().parents[2]
D = torch.float64


def small_problem(seed=0):
    problem = CubicTopK(num_items=10, temperature=0.3)
    x, y = problem.generate(6, torch.Generator().manual_seed(seed))
    return problem, x.double(), y.double()


def make_taskmet(problem, **kwargs):
    torch.manual_seed(0)
    predictor = MLP(1, [], 1).double()
    metric = MetricNet(1, 1, hidden=(8,), init_scale=0.5, activation_name="tanh").double()
    args = dict(inner_optimizer="sgd", inner_lr=0.3, inner_weight_decay=0.1, inner_steps=800, first_inner_steps=800,
                cg_damping=0.0)
    args.update(kwargs)
    return TaskMetModule(predictor, metric, problem=problem, **args)


def closed_form_theta(module, phi, x, y):
    """Weighted ridge regression: the exact minimiser of the inner loss of a linear predictor."""
    w = functional_call(module.metric, phi, (x,))[..., 0, 0].reshape(-1)
    X = torch.stack([x.reshape(-1), torch.ones_like(x.reshape(-1))], -1)
    n, wd = X.shape[0], module.inner_weight_decay
    A = 2 / n * X.T @ (w[:, None] * X) + wd * torch.eye(2, dtype=D)
    theta = torch.linalg.solve(A, 2 / n * X.T @ (w * y.reshape(-1)))
    return {"net.0.weight": theta[:1].view(1, 1), "net.0.bias": theta[1:]}


@pytest.mark.slow
def test_implicit_metric_gradient_matches_unrolled_loop_and_finite_differences():
    problem, x, y = small_problem()
    implicit = make_taskmet(problem)
    hyper, _ = implicit.metric_gradient(x, y)
    # the inner loop reached the closed-form solution
    phi = {k: p.detach() for k, p in implicit.metric.named_parameters()}
    theta_star = closed_form_theta(implicit, phi, x, y)
    for k, p in implicit.predictor.named_parameters():
        torch.testing.assert_close(p.detach(), theta_star[k], rtol=1e-9, atol=1e-10)
    # differentiating through a long unrolled inner loop gives the same gradient
    unrolled = make_taskmet(problem, hypergradient="unrolled")
    hyper_unrolled, _ = unrolled.metric_gradient(x, y)
    for k in hyper:
        assert hyper[k].abs().max() > 0
        torch.testing.assert_close(hyper[k], hyper_unrolled[k], rtol=1e-6, atol=1e-9)
    # central finite differences of L_task(theta*(phi)) along a random direction, theta* in closed form
    gen = torch.Generator().manual_seed(1)
    direction = {k: torch.randn(v.shape, generator=gen, dtype=D) for k, v in phi.items()}

    def task_at(phi_):
        theta = closed_form_theta(implicit, phi_, x, y)
        return float(problem.task_loss(functional_call(implicit.predictor, theta, (x,)), y, x))

    h = 1e-5
    plus = task_at({k: phi[k] + h * direction[k] for k in phi})
    minus = task_at({k: phi[k] - h * direction[k] for k in phi})
    fd = (plus - minus) / (2 * h)
    analytic = float(sum((hyper[k] * direction[k]).sum() for k in hyper))
    assert abs(analytic - fd) <= 1e-5 * max(1.0, abs(fd))


class Indifferent(CubicTopK):
    """A task whose objective does not depend on the decisions."""

    def objective(self, z, y, x):
        return y[..., 0].sum(-1)


@pytest.mark.parametrize("mode", ["implicit", "unrolled"])
def test_metric_gradient_is_zero_when_the_task_ignores_the_predictions(mode):
    problem = Indifferent(num_items=10, temperature=0.3)
    x, y = problem.generate(6, torch.Generator().manual_seed(0))
    module = make_taskmet(problem, hypergradient=mode, inner_steps=20, first_inner_steps=20)
    hyper, _ = module.metric_gradient(x.double(), y.double())
    for g in hyper.values():
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("kwargs", [dict(), dict(diagonal=True), dict(input_dependent=False),
                                    dict(learn_eps=True, eps=0.1)])
def test_metric_is_positive_definite_for_any_input_and_starts_at_identity(kwargs):
    torch.manual_seed(0)
    x = 100 * torch.randn(64, 3, dtype=D)
    metric = MetricNet(3, 4, hidden=(16,), init_scale=3.0, **kwargs).double()
    lam = metric.matrix(x)
    assert lam.shape == (64, 4, 4)
    torch.testing.assert_close(lam, lam.transpose(-1, -2))
    eigs = torch.linalg.eigvalsh(lam)
    assert (eigs >= metric.eps * (1 - 1e-9)).all()
    identity = MetricNet(3, 4, hidden=(16,), init_scale=0.0, **kwargs).double()
    torch.testing.assert_close(identity.matrix(x), torch.eye(4, dtype=D).expand(64, 4, 4))


def test_metric_dimension_mismatch_raises():
    module = TaskMetModule(MLP(1, [], 1), MetricNet(1, dim=2), problem=CubicTopK())
    with pytest.raises(ValueError, match=r"the metric has dimension 2 but CubicTopK predicts 1 value"):
        module.setup("fit")
    # a metric without a declared dimension is caught where the loss is formed
    problem, x, y = small_problem()
    bad = TaskMetModule(MLP(1, [], 1).double(), torch.nn.Linear(1, 3).double(), problem=problem)
    with pytest.raises(ValueError, match="make the metric's dim equal the prediction dimension"):
        bad.metric_gradient(x, y)
    with pytest.raises(ValueError, match="hypergradient must be"):
        TaskMetModule(MLP(1, [], 1), MetricNet(), hypergradient="exact")


def adam_1e2(params):
    return torch.optim.Adam(params, lr=1e-2)


def fit_and_test(module, dm, steps):
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, inference_mode=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(module, dm)
    return trainer.test(module, dm, verbose=False)[0]


@pytest.mark.slow
def test_cubic_topk_mse_is_poor_and_taskmet_clearly_better():
    L.seed_everything(0)
    dm = DecisionDataModule(CubicTopK(), num_train=100, num_val=10, num_test=200, steps_per_epoch=10)
    mse = fit_and_test(MSEModule(MLP(1, [], 1), optimizer=adam_1e2), dm, 100)
    L.seed_everything(0)
    taskmet = fit_and_test(TaskMetModule(MLP(1, [], 1), MetricNet(1, 1, hidden=(32, 32)), optimizer=adam_1e2), dm, 30)
    assert mse["test/ndq"] < 0.0
    assert taskmet["test/ndq"] > 0.8
    assert taskmet["test/ndq"] > mse["test/ndq"] + 0.8


@pytest.mark.slow
def test_dfl_lowers_the_task_loss_on_budget_allocation():
    L.seed_everything(0)
    dm = DecisionDataModule(BudgetAllocation(), num_train=64, num_val=8, num_test=8, steps_per_epoch=10)
    dm.setup("fit")
    x, y = dm.splits["train"].tensors[:2]
    module = DFLModule(MLP(4, [], 5), alpha=0.1, optimizer=adam_1e2)
    before = float(dm.problem.task_loss(module(x), y, x))
    fit_and_test(module, dm, 30)
    assert float(dm.problem.task_loss(module(x), y, x)) < before - 0.05


# ---------------------------------------------------------------- configs through the CLI
CONFIGS = sorted(ROOT.glob("configs/taskmet_*.yaml")) + sorted(ROOT.glob("configs/*hlgauss*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


@pytest.mark.slow
def test_taskmet_cubic_config_runs_end_to_end(tmp_path):
    cli = run_cli(["fit", "--config", str(ROOT / "configs/taskmet_cubic.yaml"), "--trainer.max_steps", "3",
                    "--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing",
                    "false", "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
                    "--data.init_args.num_val", "20", "--data.init_args.num_test", "20"])
    assert cli.trainer.global_step == 3
    assert "test/ndq" in cli.trainer.callback_metrics
