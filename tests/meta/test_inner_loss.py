"""``inner_loss``: a loss for the inner loop separate from the outer (query) loss. Meta-gradients in float64
against explicit unrolled per-task loops written with plain ``torch.autograd`` (the inner loss computed by
hand), evaluation that adapts with the same inner loss, the checkpoint that records it, and the errors."""
import copy

import pytest
import torch
from lightning.pytorch import Trainer
from torch.func import functional_call

from tasklight.data.batch import MetaBatch
from tasklight.meta import IMAMLModule, MAMLModule
from tasklight.nn.losses import HistogramLoss
from tasklight.nn.nets import MLP

T, S, Q, STEPS, LR = 3, 4, 5, 2, 0.05
BINS, V_MIN, V_MAX = 6, -4.0, 4.0
TOL = dict(atol=1e-8, rtol=1e-6)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return MetaBatch(*(torch.randn(T, n, 1, generator=g, dtype=torch.float64) for n in (S, S, Q, Q)))


def centres():
    width = (V_MAX - V_MIN) / BINS
    return V_MIN + width * (torch.arange(BINS, dtype=torch.float64) + 0.5)


def mse_of_mean(out, y):
    """The histogram's mean against the targets, by hand (independent of PredictionMSE)."""
    return ((torch.softmax(out, -1) @ centres() - y[..., 0]) ** 2).mean()


def learner(inner_loss, strategy="auto", **kw):
    torch.manual_seed(0)
    return MAMLModule(MLP(1, [8, 8], BINS), loss=HistogramLoss(BINS, v_min=V_MIN, v_max=V_MAX, sigma=0.75),
                      inner_loss=inner_loss, inner_steps=STEPS, inner_lr=LR, strategy=strategy, **kw).double()


def unrolled_meta_gradient(module, b, inner):
    ref = copy.deepcopy(module.net)
    params = dict(ref.named_parameters())
    total = 0.0
    for t in range(T):
        fast = dict(params)
        for _ in range(STEPS):
            loss = inner(functional_call(ref, fast, (b.support_x[t],)), b.support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: p - LR * g for (n, p), g in zip(fast.items(), grads)}
        out = functional_call(ref, fast, (b.query_x[t],))
        total = total + module.loss_fn(out, b.query_y[t][..., 0]) / T  # the outer loss: the histogram loss
    return dict(zip(params, torch.autograd.grad(total, list(params.values()))))


@pytest.mark.parametrize("strategy, backend", [("vmap", "functorch"), ("stacked", "functorch"),
                                               ("loop", "functorch"), ("auto", "higher")])
def test_mse_of_prediction_inner_loss_meta_gradient_equals_unrolled(strategy, backend):
    module, b = learner("mse_of_prediction", strategy, backend=backend), batch()
    module.zero_grad()
    module.meta_objective(b).objective.backward()
    want = unrolled_meta_gradient(module, b, mse_of_mean)
    for n, g in want.items():
        got = module.get_parameter(f"net.{n}").grad
        assert torch.allclose(got, g, **TOL), n
        assert g.abs().sum() > 0, n
    # and it is not the gradient with the histogram loss as the inner loss too
    same = unrolled_meta_gradient(module, b, lambda o, y: module.loss_fn(o, y[..., 0]))
    assert not all(torch.allclose(module.get_parameter(f"net.{n}").grad, g, **TOL) for n, g in same.items())


def test_module_inner_loss_meta_gradient_equals_unrolled():
    """A loss module as the inner loss (a histogram loss of another width) with the default one outer."""
    inner = HistogramLoss(BINS, v_min=V_MIN, v_max=V_MAX, sigma=2.0)
    module, b = learner(inner), batch(1)
    module.zero_grad()
    module.meta_objective(b).objective.backward()
    want = unrolled_meta_gradient(module, b, lambda o, y: inner.double()(o, y[..., 0]))
    for n, g in want.items():
        assert torch.allclose(module.get_parameter(f"net.{n}").grad, g, **TOL), n


def test_default_inner_loss_is_the_outer_loss():
    module, b = learner(None), batch()
    assert module.core.inner_loss_fn is module.core.loss_fn
    module.zero_grad()
    module.meta_objective(b).objective.backward()
    want = unrolled_meta_gradient(module, b, lambda o, y: module.loss_fn(o, y[..., 0]))
    for n, g in want.items():
        assert torch.allclose(module.get_parameter(f"net.{n}").grad, g, **TOL), n


def test_evaluation_adapts_with_the_inner_loss():
    module, b = learner("mse_of_prediction", eval_inner_steps=3), batch()
    got = module.predict_episode(b.support_x[0], b.support_y[0], b.query_x[0])
    ref = copy.deepcopy(module.net)
    fast = dict(ref.named_parameters())
    for _ in range(3):
        loss = mse_of_mean(functional_call(ref, fast, (b.support_x[0],)), b.support_y[0])
        grads = torch.autograd.grad(loss, list(fast.values()))
        fast = {n: p - LR * g for (n, p), g in zip(fast.items(), grads)}
    want = torch.softmax(functional_call(ref, fast, (b.query_x[0],)), -1) @ centres()
    assert torch.allclose(got[..., 0], want.detach(), **TOL)
    # the outer loss as the inner loss adapts differently
    other = learner(None, eval_inner_steps=3).predict_episode(b.support_x[0], b.support_y[0], b.query_x[0])
    assert not torch.allclose(other, got, **TOL)


def test_imaml_inner_problem_uses_the_inner_loss():
    """iMAML's proximal inner problem descends the inner loss: its adapted parameters are the unrolled
    proximal steps on the squared error of the histogram's mean."""
    torch.manual_seed(0)
    module = IMAMLModule(MLP(1, [8], BINS), loss=HistogramLoss(BINS, v_min=V_MIN, v_max=V_MAX),
                         inner_loss="mse_of_prediction", inner_steps=3, inner_lr=LR, lam=0.5).double()
    b = batch()
    res, _, _ = module._proximal_adapt(*[{k: v.detach() for k, v in d.items()} for d in
                                         (dict(module.net.named_parameters()), dict(module.net.named_buffers()))],
                                       b.support_x, b.support_y, None, 3)
    ref = copy.deepcopy(module.net)
    theta = {n: p.detach() for n, p in ref.named_parameters()}
    fast = {n: p.clone().requires_grad_() for n, p in theta.items()}
    for _ in range(3):
        loss = mse_of_mean(functional_call(ref, fast, (b.support_x[0],)), b.support_y[0])
        loss = loss + 0.25 * sum(((fast[n] - theta[n]) ** 2).sum() for n in fast)
        grads = torch.autograd.grad(loss, list(fast.values()))
        fast = {n: (p - LR * g).detach().requires_grad_() for (n, p), g in zip(fast.items(), grads)}
    for n, p in fast.items():
        assert torch.allclose(res.params[f"{n}"][0], p, **TOL), n


def test_checkpoint_records_the_inner_loss(tmp_path):
    module = learner("mse_of_prediction")
    assert module.hparams["inner_loss"] == "mse_of_prediction"
    trainer = Trainer(max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = MAMLModule.load_from_checkpoint(tmp_path / "m.ckpt")
    assert loaded.hparams["inner_loss"] == "mse_of_prediction"
    b = batch()
    assert torch.allclose(loaded.double().predict_episode(b.support_x[0], b.support_y[0], b.query_x[0]),
                          module.predict_episode(b.support_x[0], b.support_y[0], b.query_x[0]), **TOL)


@pytest.mark.parametrize("loss, inner_loss, match", [
    (None, "bogus", r"inner_loss='bogus' is not a loss: use None .*'mse_of_prediction'"),
    (None, 3, r"inner_loss=3 is not a loss"),
    ("mse", "mse_of_prediction", r"'mse_of_prediction' needs a loss with a predict\(output\) method.*inner_loss='mse'"),
    (None, "cross_entropy", r"inner_loss='cross_entropy' is a classification loss but the outer loss "
                            r"HistogramLoss is a regression loss"),
])
def test_bad_inner_loss_is_one_clear_error(loss, inner_loss, match):
    loss = HistogramLoss(BINS, v_min=V_MIN, v_max=V_MAX) if loss is None else loss
    with pytest.raises(ValueError, match=match):
        MAMLModule(MLP(1, [8], BINS), loss=loss, inner_loss=inner_loss)
