"""Reliability of the learners: the non-finite policy, shape and setting checks, CG reports,
memory errors (issue 12 rows 1, 2, 7, 8, 9, 10, 13)."""
import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from tasklight import IMAMLModule, MAMLModule, MLP, Conv4, MetaBatch, SinusoidDataModule
from tasklight.core.implicit import conjugate_gradient
from tasklight.core.outer import check_finite_metrics


def trainer(**kw):
    args = dict(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, inference_mode=False, num_sanity_val_steps=0, limit_val_batches=0)
    args.update(kw)
    return L.Trainer(**args)


def small_dm(**kw):
    args = dict(k_shot=5, q_queries=5, meta_batch_size=4, batches_per_epoch=50, val_episodes=8, test_episodes=8)
    args.update(kw)
    return SinusoidDataModule(**args)


# ------------------------------------------------------------------ row 1: skip must end
def test_skip_with_every_step_nonfinite_raises_after_max_consecutive_skips():
    torch.manual_seed(0)
    module = MAMLModule(MLP(1, [8], 1), inner_steps=1, inner_lr=1e6, nonfinite="skip", max_consecutive_skips=3)
    t = trainer(max_steps=100)
    with pytest.warns(RuntimeWarning, match="skipped step"):
        with pytest.raises(FloatingPointError, match=r"4 steps in a row .*max_consecutive_skips=3"):
            t.fit(module, small_dm())
    assert int(module.skipped_steps) == 4 and t.global_step == 0


def test_a_streak_of_skips_is_reset_by_a_good_step():
    from tasklight.core.outer import outer_step, setup_outer_step

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.w = nn.Parameter(torch.ones(2))
            setup_outer_step(self, nonfinite="skip", max_consecutive_skips=1)

        def training_step(self, batch, i):
            bad = i % 2 == 0  # skip, good, skip, good...: never 2 in a row
            loss = (self.w * (float("nan") if bad else 1.0)).sum()
            outer_step(self, loss)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    m = Tiny()
    with pytest.warns(RuntimeWarning):
        trainer(max_steps=3).fit(m, torch.utils.data.DataLoader(range(100)))
    assert int(m.skipped_steps) == 3 and int(m.consecutive_skips) == 0
    torch.testing.assert_close(m.w.detach(), torch.full((2,), 1 - 0.3))


# ------------------------------------------------------------------ row 2: overflowing state
def test_gradients_whose_square_overflows_are_not_stepped_into_adam():
    from tasklight.core.outer import outer_step, setup_outer_step

    class Huge(L.LightningModule):
        def __init__(self, policy):
            super().__init__()
            self.automatic_optimization = False
            self.w = nn.Parameter(torch.ones(3))
            setup_outer_step(self, nonfinite=policy, max_consecutive_skips=0)

        def training_step(self, batch, i):
            outer_step(self, (self.w * torch.tensor([1.0, 1e20, 1.0])).sum())  # finite grads, g^2 = inf

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters())

    for policy in ("raise", "skip"):
        m = Huge(policy)
        with pytest.raises(FloatingPointError, match="square overflows"):
            trainer(max_steps=2).fit(m, torch.utils.data.DataLoader(range(10)))
        assert torch.equal(m.w.detach(), torch.ones(3))  # never stepped


def test_nonfinite_optimizer_state_raises_naming_the_entry():
    from tasklight.core.outer import outer_step, setup_outer_step

    class BadState(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.w = nn.Parameter(torch.ones(3))
            setup_outer_step(self)

        def training_step(self, batch, i):
            if i == 1:  # corrupt Adam's second moment as an overflow would
                opt = self.optimizers().optimizer
                opt.state[self.w]["exp_avg_sq"][1] = float("inf")
            outer_step(self, self.w.sum())

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters())

    with pytest.raises(FloatingPointError, match=r"non-finite values in the optimiser's state\[0\]\.exp_avg_sq"):
        trainer(max_steps=3).fit(BadState(), torch.utils.data.DataLoader(range(10)))


def test_a_nan_test_metric_is_an_error():
    torch.manual_seed(0)
    module = MAMLModule(MLP(1, [8], 1), inner_steps=1)
    with torch.no_grad():
        module.net.net[0].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"test \(episodes: 8\) produced non-finite metrics: test/mse@0=nan"):
        trainer().test(module, small_dm())
    with pytest.raises(FloatingPointError, match="val/x=inf"):
        check_finite_metrics({"val/x": float("inf"), "val/y": 1.0})


# ------------------------------------------------------------------ row 7: target shapes
def _episode(S=5, Q=5, T=2, target_dims=()):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(T, S + Q, 1, generator=g) * 10 - 5
    y = torch.sin(x)[..., 0].reshape(T, S + Q, *target_dims)
    return MetaBatch(x[:, :S], y[:, :S], x[:, S:], y[:, S:])


def test_targets_without_the_output_dim_train_like_matching_targets():
    """[T, S] targets for an [T, S, 1] net give the loss of [T, S, 1] targets (no [S, S] broadcast)."""
    flat, full = _episode(), _episode(target_dims=(1,))
    torch.manual_seed(0)
    a = MAMLModule(MLP(1, [8], 1), inner_steps=2, inner_lr=0.1)
    b = MAMLModule(MLP(1, [8], 1), inner_steps=2, inner_lr=0.1)
    b.load_state_dict(a.state_dict())
    oa, ob = a.meta_objective(flat), b.meta_objective(full)
    torch.testing.assert_close(oa.query_losses, ob.query_losses)
    # and it is the unbroadcast loss, computed by hand for task 0 without adaptation
    c = MAMLModule(MLP(1, [8], 1), inner_steps=0)
    c.load_state_dict(a.state_dict())
    out = c.net(flat.query_x[0])
    torch.testing.assert_close(c.meta_objective(flat).query_losses[0], F.mse_loss(out[:, 0], flat.query_y[0]))
    pred = a.predict_episode(flat.support_x[0], flat.support_y[0], flat.query_x[0])
    assert pred.shape == (5, 1)


def test_a_three_output_mse_head_is_refused():
    module = MAMLModule(MLP(1, [8], 3), inner_steps=1)
    with pytest.raises(ValueError, match=r"outputs of shape \((2, )?5, 3\) but the regression targets have shape \((2, 5|5,)\)"):
        module.meta_objective(_episode())
    with pytest.raises(ValueError, match="out_features"):
        module.predict_episode(*(_episode().support_x[0], _episode().support_y[0], _episode().query_x[0]))


# ------------------------------------------------------------------ rows 9, 10: settings
@pytest.mark.parametrize("kwargs, match", [
    (dict(inner_lr=-0.1), "inner_lr must be a finite number >= 0"),
    (dict(clip_grad_norm=-1), "clip_grad_norm must be a finite number > 0"),
    (dict(extra_eval_steps=[-1]), "extra_eval_steps must be inner step counts >= 0"),
    (dict(nonfinite="ignore"), "nonfinite must be one of"),
    (dict(max_consecutive_skips=-2), "max_consecutive_skips must be an integer >= 0"),
])
def test_bad_learner_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MAMLModule(MLP(), **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(meta_batch_size=0), "meta_batch_size must be >= 1"),
    (dict(batches_per_epoch=0), "batches_per_epoch must be >= 1"),
    (dict(eval_batch_size=0), "eval_batch_size must be >= 1"),
    (dict(num_workers=-1), "num_workers must be >= 0"),
])
def test_bad_data_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_dm(**kwargs)


class _Episodes(L.LightningDataModule):
    """Image episodes of a given size and way, for the head/size checks."""

    def __init__(self, n_way=5, image_size=28, labels_up_to=None):
        super().__init__()
        self.n_way, self.image_size, self.labels_up_to = n_way, image_size, labels_up_to or n_way

    def batch(self):
        g = torch.Generator().manual_seed(0)
        n, s = self.n_way, self.image_size
        y = torch.arange(n).repeat(2, 1) % self.labels_up_to
        return MetaBatch(torch.rand(2, n, 1, s, s, generator=g), y, torch.rand(2, n, 1, s, s, generator=g), y)

    def train_dataloader(self):
        return torch.utils.data.DataLoader([self.batch()] * 4, batch_size=None)


@pytest.mark.parametrize("out_features", [3, 7])
def test_a_head_that_does_not_match_n_way_is_named(out_features):
    module = MAMLModule(Conv4(1, out_features, hidden=4, image_size=28), loss="cross_entropy")
    with pytest.raises(ValueError, match=rf"out_features={out_features} .*n_way=5"):
        trainer(max_steps=1).fit(module, _Episodes())


def test_labels_beyond_the_head_are_named_in_predict_episode():
    module = MAMLModule(Conv4(1, 3, hidden=4, image_size=28), loss="cross_entropy")
    b = _Episodes().batch()
    with pytest.raises(ValueError, match=r"label 4 .*3 outputs"):
        module.predict_episode(b.support_x[0], b.support_y[0], b.query_x[0])


def test_an_image_size_the_net_was_not_built_for_is_named():
    module = MAMLModule(Conv4(1, 5, hidden=4, image_size=28), loss="cross_entropy")
    with pytest.raises(ValueError, match=r"examples of shape \(1, 20, 20\) .*input_shape \(1, 28, 28\).*image_size"):
        trainer(max_steps=1).fit(module, _Episodes(image_size=20))


# ------------------------------------------------------------------ row 8: CG reports
def test_cg_reports_its_residual_and_indefinite_systems():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    spd = m @ m.T + 0.1 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    x, info = conjugate_gradient(lambda v: spd @ v, b, steps=3, return_info=True)
    true_rel = torch.linalg.norm(b - spd @ x) / torch.linalg.norm(b)
    torch.testing.assert_close(info["rel_residual"], true_rel)
    assert float(info["rel_residual"]) > 1e-3 and not bool(info["indefinite"])
    x, info = conjugate_gradient(lambda v: spd @ v, b, steps=6, return_info=True)
    assert float(info["rel_residual"]) < 1e-6
    indef = spd - 3 * float(torch.linalg.eigvalsh(spd)[-1]) * torch.outer(b, b) / (b @ b)
    _, info = conjugate_gradient(lambda v: indef @ v, b, steps=6, return_info=True)
    assert bool(info["indefinite"])


def _imaml(**kw):
    torch.manual_seed(0)
    args = dict(inner_steps=10, inner_lr=0.01, lam=0.5, cg_steps=5, cg_damping=0.5)
    args.update(kw)
    return IMAMLModule(MLP(1, [40, 40], 1), **args)


def _sinusoid_batch():
    return next(iter(SinusoidDataModule(k_shot=5, q_queries=10, meta_batch_size=25, seed=0).train_dataloader()))


def test_imaml_hessian_system_of_the_sinusoid_settings_is_reported_indefinite():
    batch = _sinusoid_batch()
    module = _imaml(curvature="hessian", cg_check="raise")
    with pytest.raises(FloatingPointError, match="not positive definite .*raise lam or cg_damping"):
        module.meta_objective(batch)
    module = _imaml(curvature="hessian")
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        module.meta_objective(batch)
    with pytest.warns(RuntimeWarning, match="relative residual"):
        _imaml(curvature="hessian", lam=1e-6, cg_damping=0.0).meta_objective(batch)


def test_imaml_default_gauss_newton_system_is_positive_definite_and_exact():
    batch = _sinusoid_batch()
    module = _imaml(cg_steps=40).double()
    batch = MetaBatch(*(t.double() for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y)))
    v, _, _, _ = module.task_meta_gradients(batch)
    assert not bool(module.last_cg["indefinite"].any())
    # an independent dense solve for task 0: G = 2/S J^T J (MSE), (1 + d) I + G / lam
    names = [n for n, _ in module.net.named_parameters()]
    params = {n: p.detach() for n, p in module.net.named_parameters()}
    res = module.core.adapt(params, {}, batch.support_x[0], batch.support_y[0], steps=10, lr=0.01, first_order=True,
                            proximal=0.5, anchor=params)
    phi = res.params
    flat = torch.cat([phi[n].reshape(-1) for n in names])
    sizes, shapes = [phi[n].numel() for n in names], [phi[n].shape for n in names]

    def unflat(x):
        return {n: t.reshape(s) for n, t, s in zip(names, torch.split(x, sizes), shapes)}

    out_fn = lambda x: functional_call(module.net, unflat(x), (batch.support_x[0],))[:, 0]  # noqa: E731
    J = torch.autograd.functional.jacobian(out_fn, flat)
    G = 2.0 / J.shape[0] * J.T @ J
    gq = torch.autograd.functional.jacobian(
        lambda x: F.mse_loss(functional_call(module.net, unflat(x), (batch.query_x[0],)), batch.query_y[0]), flat)
    A = 1.5 * torch.eye(len(flat), dtype=torch.float64) + G / 0.5
    assert float(torch.linalg.eigvalsh(A)[0]) >= 1.5 - 1e-9
    exact = torch.linalg.solve(A, gq)
    got = torch.cat([v[n][0].reshape(-1) for n in names])
    cos = float(got @ exact / (got.norm() * exact.norm()))
    assert cos > 0.999, cos


# ------------------------------------------------------------------ row 13: memory
class _Greedy(nn.Module):
    """A net whose forward asks for far more memory than any machine has (a meta-batch that does not fit)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 1)
        self.input_shape, self.out_features = (1,), 1

    def forward(self, x):
        waste = x.new_zeros(2**42)  # 16 TiB
        return self.lin(x) + waste[:1]


def test_a_meta_batch_that_does_not_fit_names_the_settings():
    module = MAMLModule(_Greedy(), inner_steps=1)
    with pytest.raises(MemoryError, match="meta_batch_size.*inner_steps"):
        trainer(max_steps=1).fit(module, small_dm())


# ------------------------------------------------------------------ rows 1, 2, 7, 9 in every learner
def _regression_learner(name, out=1, **kw):
    from tasklight.meta import MAMLPlusPlusModule, ReptileModule

    net = MLP(1, [8], out)
    if name == "maml":
        return MAMLModule(net, inner_steps=1, **kw)
    if name == "imaml":
        return IMAMLModule(net, inner_steps=1, **kw)
    if name == "mamlpp":
        return MAMLPlusPlusModule(net, loss="mse", inner_steps=1, per_step_bn=False, cosine_lr=False, **kw)
    return ReptileModule(net, inner_steps=1, **kw)


REGRESSION_LEARNERS = ["maml", "imaml", "mamlpp", "reptile"]


@pytest.mark.parametrize("name", REGRESSION_LEARNERS)
def test_every_regression_learner_ends_a_run_of_skips(name):
    torch.manual_seed(0)
    module = _regression_learner(name, inner_lr=1e6, nonfinite="skip", max_consecutive_skips=2)
    t = trainer(max_steps=50)
    with pytest.warns(RuntimeWarning, match="skipped step"):
        with pytest.raises(FloatingPointError, match=r"3 steps in a row .*max_consecutive_skips=2"):
            t.fit(module, small_dm())
    assert int(module.skipped_steps) == 3 and t.global_step <= 1  # Reptile's first step is still finite


@pytest.mark.parametrize("name", REGRESSION_LEARNERS)
def test_every_regression_learner_checks_targets_against_outputs(name):
    flat, full = _episode(), _episode(target_dims=(1,))
    torch.manual_seed(0)
    a, b = _regression_learner(name, inner_lr=0.1), _regression_learner(name, inner_lr=0.1)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a.meta_objective(flat).query_losses, b.meta_objective(full).query_losses)
    assert a.predict_episode(flat.support_x[0], flat.support_y[0], flat.query_x[0]).shape == (5, 1)
    three = _regression_learner(name, out=3)
    with pytest.raises(ValueError, match=r"outputs of shape \(2, (5|10), 3\) but the regression targets"):
        three.meta_objective(flat)
    with pytest.raises(ValueError, match="out_features"):
        three.predict_episode(flat.support_x[0], flat.support_y[0], flat.query_x[0])


@pytest.mark.parametrize("name", REGRESSION_LEARNERS)
def test_every_regression_learner_refuses_out_of_range_settings(name):
    for kwargs, match in [(dict(inner_lr=-0.1), "inner_lr must be"), (dict(inner_lr=float("nan")), "inner_lr must be"),
                          (dict(clip_grad_norm=-1), "clip_grad_norm must be"),
                          (dict(extra_eval_steps=[-1]), "extra_eval_steps must be")]:
        with pytest.raises(ValueError, match=match):
            _regression_learner(name, **kwargs)


def _classifier(name):
    from tasklight.meta import ProtoMAMLModule, ProtoNetModule

    if name == "maml":
        return MAMLModule(Conv4(1, 5, hidden=4, image_size=28), loss="cross_entropy", inner_steps=1)
    if name == "protonet":
        return ProtoNetModule(Conv4(1, 0, hidden=4, image_size=28))
    if name in ("r2d2", "logreg"):
        from tasklight.meta import LogisticHeadModule, R2D2Module

        return (R2D2Module if name == "r2d2" else LogisticHeadModule)(Conv4(1, 0, hidden=4, image_size=28))
    return ProtoMAMLModule(Conv4(1, 0, hidden=4, image_size=28), inner_steps=1)


class _TestEpisodes(_Episodes):
    def test_dataloader(self):
        return self.train_dataloader()


@pytest.mark.parametrize("name", ["maml", "protonet", "protomaml", "r2d2", "logreg"])
def test_non_finite_logits_make_the_accuracy_an_error(name):
    """argmax of NaN logits still picks a class: the accuracy would be a finite, meaningless number."""
    torch.manual_seed(0)
    module = _classifier(name)
    trainer().test(module, _TestEpisodes(), verbose=False)  # finite: no error
    with torch.no_grad():
        for p in module.net.parameters():
            p.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"test \(episodes: 8\) produced non-finite metrics: test/acc@0=nan"):
        trainer().test(module, _TestEpisodes(), verbose=False)


@pytest.mark.parametrize("name", ["protonet", "protomaml", "r2d2", "logreg"])
def test_prototype_learners_end_a_run_of_skips(name):
    torch.manual_seed(0)
    module = _classifier(name)
    module.nonfinite, module.max_consecutive_skips = "skip", 1
    with torch.no_grad():
        next(module.net.parameters()).fill_(float("nan"))
    with pytest.warns(RuntimeWarning, match="skipped step"):
        with pytest.raises(FloatingPointError, match=r"2 steps in a row .*max_consecutive_skips=1"):
            trainer(max_steps=4).fit(module, _Episodes())


def _taskmet(**kw):
    from tasklight.taskmet.module import MetricNet, TaskMetModule

    torch.manual_seed(0)
    args = dict(inner_optimizer="sgd", inner_lr=0.1, inner_steps=2, first_inner_steps=2)
    args.update(kw)
    return TaskMetModule(MLP(1, [], 1), MetricNet(1, 1, hidden=(8,)), **args)


def _decision_dm():
    from tasklight.taskmet.problems import CubicTopK, DecisionDataModule

    return DecisionDataModule(CubicTopK(num_items=10, temperature=0.3), num_train=20, num_val=10, num_test=10,
                              batch_size=10)


@pytest.mark.parametrize("hypergradient", ["implicit", "unrolled"])
def test_taskmet_diverging_inner_loop_goes_through_the_policy(hypergradient):
    """A diverged inner solution is a non-finite step (raise, or skip with the predictor untouched),
    not a ValueError of the decision solver about NaN predictions."""
    diverging = dict(inner_lr=1e8, inner_steps=5, first_inner_steps=5, hypergradient=hypergradient)
    with pytest.raises(FloatingPointError, match=r"non-finite inner solution .*inner_lr=100000000\.0.*nonfinite='skip'"):
        trainer(max_steps=2).fit(_taskmet(**diverging), _decision_dm())
    module = _taskmet(**diverging, nonfinite="skip", max_consecutive_skips=2)
    before = {k: p.detach().clone() for k, p in module.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="skipped step"):
        with pytest.raises(FloatingPointError, match=r"3 steps in a row .*max_consecutive_skips=2"):
            trainer(max_steps=20).fit(module, _decision_dm())
    assert int(module.skipped_steps) == 3 and module._inner_state is None
    for k, v in module.state_dict().items():
        if k not in ("skipped_steps", "consecutive_skips"):
            assert torch.equal(v, before[k]), k
    # a sane inner_lr trains
    module = _taskmet()
    trainer(max_steps=2).fit(module, _decision_dm())
    assert int(module.skipped_steps) == 0 and module._inner_state is not None


def _mtl_dm(out=1):
    from torch.utils.data import TensorDataset

    from tasklight.data.multitask import MultiTaskDataModule, TaskSpec

    g = torch.Generator().manual_seed(0)

    def sets(n):
        xs = [torch.randn(n, 4, generator=g) for _ in range(2)]
        return [TensorDataset(x, x.sum(1)) for x in xs]

    return MultiTaskDataModule(train_sets=sets(24), val_sets=sets(12), test_sets=sets(12), batch_size_per_task=4,
                               steps_per_epoch=4, tasks=[TaskSpec(f"t{i}", out, "regression") for i in range(2)])


def test_multitask_checks_targets_skips_and_evaluation():
    from tasklight.multitask.module import MultiTaskModule

    with pytest.raises(ValueError, match=r"head of task 0 \('t0'\) gives outputs of shape \(4, 3\) but the regression "
                                         r"targets have shape \(4,\)"):
        trainer(max_steps=1).fit(MultiTaskModule(MLP(4, [8], 6)), _mtl_dm(out=3))
    torch.manual_seed(0)
    module = MultiTaskModule(MLP(4, [8], 6), optimizer=lambda p: torch.optim.SGD(p, lr=1e30), nonfinite="skip",
                             max_consecutive_skips=2)
    with pytest.warns(RuntimeWarning, match="skipped step"):
        with pytest.raises(FloatingPointError, match=r"3 steps in a row .*max_consecutive_skips=2"):
            trainer(max_steps=30).fit(module, _mtl_dm())
    module = MultiTaskModule(MLP(4, [8], 6))
    trainer(max_steps=1).fit(module, _mtl_dm())
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"test produced non-finite metrics: test/tasks/t0/loss=nan"):
        trainer().test(module, _mtl_dm(), verbose=False)


class _Metrics(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_imaml_logs_the_cg_residual_and_warns_when_cg_has_not_converged():
    # the shipped sinusoid settings (lam 0.5, cg_damping 0.5, 5 CG steps) on the default Gauss-Newton system
    rec = _Metrics()
    trainer(max_steps=3, callbacks=[rec]).fit(_imaml(), small_dm(meta_batch_size=25, k_shot=5, q_queries=10))
    residuals = [m["train/cg_rel_residual"] for m in rec.seen]
    assert len(residuals) == 3 and all(0 <= r <= 0.1 for r in residuals), residuals
    # lam 1e-6: (1 + d) I + G / lam is ill-conditioned, 5 CG steps do not solve it
    rec = _Metrics()
    with pytest.warns(RuntimeWarning, match=r"relative residual .* > cg_tol=0.1 after cg_steps=5"):
        trainer(max_steps=2, callbacks=[rec]).fit(_imaml(lam=1e-6, cg_damping=0.0), small_dm())
    assert rec.seen[-1]["train/cg_rel_residual"] > 0.1
    with pytest.raises(FloatingPointError, match="relative residual"):
        trainer(max_steps=2).fit(_imaml(lam=1e-6, cg_damping=0.0, cg_check="raise"), small_dm())


@pytest.mark.parametrize("kwargs, match", [(dict(lam=0.0), "lam"), (dict(lam=float("nan")), "lam"),
                                           (dict(cg_damping=-1.0), "cg_damping"),
                                           (dict(cg_damping=float("nan")), "cg_damping"),
                                           (dict(cg_tol=0.0), "cg_tol")])
def test_imaml_refuses_out_of_range_cg_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _imaml(**kwargs)
