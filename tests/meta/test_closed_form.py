"""Closed-form heads (R2D2 ridge regression, logistic regression): the solved heads against independent
solvers, meta-gradients against central finite differences in float64, ``predict_episode``, bad
settings, and the Omniglot configs through the CLI."""
from pathlib import Path

import numpy as np
import pytest
import torch

from tasklight.cli import run_cli
from tasklight.data.batch import MetaBatch
from tasklight.meta.closed_form import (ClosedFormHeadModule, LogisticHeadModule, R2D2Module, logistic_loss,
                                        logistic_solve, ridge_solve, with_bias_feature)
from tasklight.nn import MLP

ROOT = Path(__file__).resolve().parents[2]
MODES = [("ridge", "closed_form"), ("ridge", "implicit"), ("logistic", "implicit")]


def _episodes(T=2, n_way=3, k=2, q=2, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(T, n_way * k, d, generator=g, dtype=torch.float64)
    qx = torch.randn(T, n_way * q, d, generator=g, dtype=torch.float64)
    sy = torch.arange(n_way).repeat_interleave(k).expand(T, -1).contiguous()
    qy = torch.arange(n_way).repeat_interleave(q).expand(T, -1).contiguous()
    return MetaBatch(sx, sy, qx, qy)


def _module(head, diff, seed=1):
    torch.manual_seed(seed)
    return ClosedFormHeadModule(MLP(4, [6], 5, activation_name="tanh"), head=head, differentiation=diff, lam=0.7,
                                scale=2.0, newton_steps=12, cg_steps=20).double()


def test_ridge_head_is_the_least_squares_solution_in_both_system_forms():
    g = torch.Generator().manual_seed(0)
    for S, D in [(6, 9), (12, 4)]:  # fewer examples than features (S x S system) and more (D x D)
        x = torch.randn(S, D, generator=g, dtype=torch.float64)
        y = torch.arange(S) % 3
        lam = 0.3
        # ridge as least squares on the stacked system [x; sqrt(lam) I] w = [Y; 0]
        a = torch.cat([x, lam ** 0.5 * torch.eye(D, dtype=x.dtype)])
        b = torch.cat([torch.nn.functional.one_hot(y, 3).to(x.dtype), torch.zeros(D, 3, dtype=x.dtype)])
        ref = torch.linalg.lstsq(a, b).solution
        torch.testing.assert_close(ridge_solve(x, y, torch.tensor(lam, dtype=x.dtype), 3), ref, rtol=1e-10,
                                   atol=1e-10)


def test_logistic_head_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    x = with_bias_feature(torch.randn(9, 4, generator=g, dtype=torch.float64))
    y = torch.arange(9) % 3
    lam = 0.5
    w, losses = logistic_solve(x[None], y[None], torch.tensor([lam], dtype=x.dtype), 3, newton_steps=20, cg_steps=30)
    w, losses = w[0], losses[0]
    # sklearn minimises 1/2 ||W||^2 + C sum CE: the same minimiser with C = 1 / lam (bias as a feature)
    ref = LogisticRegression(C=1 / lam, fit_intercept=False, tol=1e-12, max_iter=10_000).fit(x.numpy(), y.numpy())
    np.testing.assert_allclose(w.T.numpy(), ref.coef_, rtol=1e-6, atol=1e-7)
    assert (losses[1:] <= losses[:-1] + 1e-12).all()  # the step-length choice never increases the objective
    grad = torch.func.grad(lambda w: logistic_loss(w, x, y, torch.tensor(lam, dtype=x.dtype), 3))(w)
    assert grad.abs().max() < 1e-10


@pytest.mark.parametrize("head,diff", MODES)
def test_meta_gradient_matches_finite_differences(head, diff):
    batch = _episodes()
    m = _module(head, diff)
    params = [p for p in m.parameters() if p.requires_grad]
    assert len(params) == 6  # the MLP's four tensors, log lam and log scale all receive meta-gradients
    grads = torch.autograd.grad(m.meta_objective(batch).objective, params)
    assert all(g.abs().sum() > 0 for g in grads)
    gen = torch.Generator().manual_seed(2)
    eps = 1e-5
    for _ in range(3):
        v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]

        def f(s):
            with torch.no_grad():
                for p, vi in zip(params, v):
                    p.add_(s * eps * vi)
                out = m.meta_objective(batch).objective
                for p, vi in zip(params, v):
                    p.sub_(s * eps * vi)
            return out

        fd = (f(1) - f(-1)) / (2 * eps)
        analytic = sum((g * vi).sum() for g, vi in zip(grads, v))
        assert abs(float(analytic - fd)) <= 1e-6 * abs(float(fd)), (float(analytic), float(fd))


def test_ridge_closed_form_and_implicit_gradients_agree():
    batch = _episodes(seed=3)
    grads = []
    for diff in ("closed_form", "implicit"):
        m = _module("ridge", diff)
        grads.append(torch.autograd.grad(m.meta_objective(batch).objective, list(m.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cls", [R2D2Module, LogisticHeadModule])
def test_predict_episode_one_or_many_episodes(cls):
    torch.manual_seed(0)
    m = cls(MLP(4, [6], 5)).double().eval()
    b = _episodes()
    with torch.no_grad():
        many = m.predict_episode(b.support_x, b.support_y, b.query_x)
        one = m.predict_episode(b.support_x[1], b.support_y[1], b.query_x[1])
    assert many.shape == (2, 6, 3) and one.shape == (6, 3)
    torch.testing.assert_close(one, many[1])
    # a well-separated episode is classified correctly by the solved head
    sx = torch.eye(3, 4, dtype=torch.float64).repeat_interleave(2, 0) * 5
    qx = torch.eye(3, 4, dtype=torch.float64) * 5
    m2 = cls(torch.nn.Identity()).double().eval()
    assert m2.predict_episode(sx, torch.arange(3).repeat_interleave(2), qx).argmax(-1).tolist() == [0, 1, 2]


def test_bad_settings_are_refused():
    net = MLP(4, [6], 5)
    with pytest.raises(ValueError, match="no closed form: set differentiation='implicit'"):
        ClosedFormHeadModule(net, head="logistic", differentiation="closed_form")
    with pytest.raises(ValueError, match="head must be 'ridge'"):
        ClosedFormHeadModule(net, head="svm")
    with pytest.raises(ValueError, match="lam .* must be a finite number > 0"):
        R2D2Module(net, lam=0.0)
    with pytest.raises(ValueError, match="cg_steps and newton_steps must be >= 1"):
        LogisticHeadModule(net, newton_steps=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["r2d2_omniglot", "logreg_omniglot"])
def test_closed_form_omniglot_config_runs_fit_then_test(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", str(ROOT / "configs" / f"{name}.yaml"), "--trainer.max_steps", "3",
                   "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
                   "--trainer.enable_progress_bar", "false", "--data.init_args.meta_batch_size", "2",
                   "--data.init_args.batches_per_epoch", "3", "--data.init_args.val_episodes", "2",
                   "--data.init_args.test_episodes", "4", "--data.init_args.eval_batch_size", "2",
                   "--data.init_args.num_workers", "0", "--model.init_args.net.init_args.hidden", "8"])
    assert cli.trainer.global_step == 3
    metrics = cli.trainer.callback_metrics
    assert "test/acc" in metrics and "test/acc@0" in metrics
    assert 0.0 <= float(metrics["test/acc"]) <= 1.0
    # the checkpoint describes itself: the same learner back from the file alone
    ckpt = tmp_path / "runs" / "checkpoints" / name / "last.ckpt"
    loaded = type(cli.model).load_from_checkpoint(ckpt).eval()
    cli.model.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])
    batch = next(iter(cli.datamodule.test_dataloader()))
    with torch.no_grad():
        want = cli.model.eval().predict_episode(batch.support_x, batch.support_y, batch.query_x)
        got = loaded.predict_episode(batch.support_x, batch.support_y, batch.query_x)
    assert loaded.head == cli.model.head and torch.isfinite(got).all()
    torch.testing.assert_close(got, want)


def test_logistic_hessian_vector_product_is_the_hessians():
    from tasklight.core.implicit import hvp
    from tasklight.meta.closed_form import logistic_hvp

    g = torch.Generator().manual_seed(0)
    x, w, v = (torch.randn(*s, generator=g, dtype=torch.float64) for s in [(7, 5), (5, 3), (5, 3)])
    y, lam = torch.arange(7) % 3, torch.tensor(0.4, dtype=torch.float64)
    torch.testing.assert_close(logistic_hvp(x, torch.softmax(x @ w, -1), lam, v),
                               hvp(lambda w: logistic_loss(w, x, y, lam, 3), w, v))


@pytest.mark.slow
@pytest.mark.parametrize("cls", [R2D2Module, LogisticHeadModule])
def test_closed_form_heads_learn_omniglot_5way(cls):
    import functools

    from lightning.pytorch import Trainer

    from tasklight.data.omniglot import OmniglotDataModule
    from tasklight.nn.nets import Conv4

    def trainer(**kw):
        return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                       inference_mode=False, **kw)

    torch.manual_seed(0)
    kw = dict(newton_steps=5, cg_steps=26) if cls is LogisticHeadModule else {}  # CG exact: 5 x 5 + 1 steps
    module = cls(Conv4(1, 0, hidden=16), optimizer=functools.partial(torch.optim.Adam, lr=3e-3), **kw)
    dm = OmniglotDataModule(n_way=5, k_shot=1, q_queries=5, meta_batch_size=4, batches_per_epoch=30,
                            test_episodes=60, eval_batch_size=20)
    before = trainer().test(module, dm, verbose=False)[0]
    trainer(max_steps=30).fit(module, dm)
    res = trainer().test(module, dm, verbose=False)[0]
    assert res["test/acc"] > 0.5, res  # chance is 0.2
    assert res["test/acc"] > before["test/acc"] + 0.05, (before, res)
    assert float(module.log_lam.exp()) != 1.0 and float(module.log_scale.exp()) != 1.0  # both meta-learned
