"""ANIL/BOIL (the ``adapt`` filter), MAML++, Reptile, Prototypical Networks and ProtoMAML: meta-gradients in
float64 against explicit unrolled per-task loops written with plain ``torch.autograd``."""
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from tasklight.data.batch import MetaBatch
from tasklight.meta import (MAMLModule, MAMLPlusPlusModule, ProtoMAMLModule, ProtoNetModule, ReptileModule,
                            msl_weights)
from tasklight.nn.nets import MLP, Conv4

T, S, Q, STEPS, LR = 3, 4, 5, 2, 0.1
TOL = dict(atol=1e-8, rtol=1e-6)


def regression_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return MetaBatch(*(torch.randn(T, n, 1, generator=g, dtype=torch.float64) for n in (S, S, Q, Q)))


def class_batch(ways=3, shots=2, queries=2, dim=4, seed=0, image=False):
    """Episodes whose support set holds every class (``shots`` examples each)."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, 16, 16) if image else (dim,)
    sy = torch.arange(ways).repeat_interleave(shots).repeat(T, 1)
    qy = torch.randint(0, ways, (T, ways * queries), generator=g)
    return MetaBatch(torch.randn(T, ways * shots, *shape, generator=g, dtype=torch.float64), sy,
                     torch.randn(T, ways * queries, *shape, generator=g, dtype=torch.float64), qy)


def module_grads(module, batch):
    module.zero_grad()
    out = module.meta_objective(batch)
    out.objective.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}, out


def unrolled(net, params, adapted, x, y, loss_fn, steps, lr, first_order=False):
    """Plain SGD steps on ``adapted`` parameters only (a learn2learn-style explicit loop)."""
    fast = dict(params)
    for _ in range(steps):
        loss = loss_fn(functional_call(net, fast, (x,)), y)
        names = [n for n in fast if n in adapted]
        grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=not first_order)
        fast.update({n: fast[n] - (lr[n] if isinstance(lr, dict) else lr) * g for n, g in zip(names, grads)})
    return fast


# ----------------------------------------------------------------------------- ANIL / BOIL
@pytest.mark.parametrize("kind, adapt, adapted", [
    ("mlp", ["net.4"], {"net.4.weight", "net.4.bias"}),  # ANIL: the head
    ("mlp", ["net.0", "net.2"], {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}),  # BOIL: the body
    ("conv", ["head"], {"head.weight", "head.bias"}),
    ("conv", ["features"], None),
])
def test_adapt_filter_meta_gradient_equals_unrolled(kind, adapt, adapted):
    torch.manual_seed(0)
    if kind == "mlp":
        net, loss, batch = MLP(1, [8, 8], 1), "mse", regression_batch()
    else:
        net, loss, batch = Conv4(1, 3, hidden=4, image_size=16), "cross_entropy", class_batch(image=True)
    module = MAMLModule(net, loss=loss, inner_steps=STEPS, inner_lr=LR, adapt=adapt).double()
    got, _ = module_grads(module, batch)
    ref = copy.deepcopy(module.net)
    params = dict(ref.named_parameters())
    adapted = adapted or {n for n in params if n.startswith("features.")}
    assert module.core.adapted == frozenset(adapted)
    total = 0.0
    for t in range(T):
        fast = unrolled(ref, params, adapted, batch.support_x[t], batch.support_y[t], module.loss_fn, STEPS, LR)
        total = total + module.loss_fn(functional_call(ref, fast, (batch.query_x[t],)), batch.query_y[t]) / T
    want = torch.autograd.grad(total, list(params.values()))
    assert set(got) == {f"net.{n}" for n in params}  # held-fixed parameters get outer gradients too
    for n, g in zip(params, want):
        assert torch.allclose(got[f"net.{n}"], g, **TOL), n
        assert g.abs().sum() > 0, n


def test_adapt_filter_with_learned_inner_lrs_covers_only_adapted_parameters():
    torch.manual_seed(0)
    module = MAMLModule(MLP(1, [8, 8], 1), inner_steps=STEPS, inner_lr=LR, adapt=["net.4"], learn_inner_lr=True,
                        inner_lr_granularity="tensor").double()
    assert sorted(module.inner_lrs.keys()) == ["net__4__bias", "net__4__weight"]
    got, _ = module_grads(module, regression_batch())
    ref = copy.deepcopy(module.net)
    params = dict(ref.named_parameters())
    lrs = {n: module.inner_lrs[n.replace(".", "__")].detach().clone().requires_grad_() for n in ("net.4.weight",
                                                                                                "net.4.bias")}
    b = regression_batch()
    total = sum(module.loss_fn(functional_call(ref, unrolled(ref, params, set(lrs), b.support_x[t], b.support_y[t],
                                                             module.loss_fn, STEPS, lrs), (b.query_x[t],)),
                               b.query_y[t]) for t in range(T)) / T
    want = torch.autograd.grad(total, list(lrs.values()))
    for (n, _), g in zip(lrs.items(), want):
        assert torch.allclose(got[f"inner_lrs.{n.replace('.', '__')}"], g, **TOL), n


def test_adapt_filter_errors_name_the_setting():
    with pytest.raises(ValueError, match=r"adapt=.*'classifier' matches no parameter"):
        MAMLModule(Conv4(1, 5, hidden=4), loss="cross_entropy", adapt=["classifier"])
    with pytest.raises(ValueError, match="adapt .* needs backend='functorch'"):
        MAMLModule(Conv4(1, 5, hidden=4), loss="cross_entropy", adapt=["head"], backend="higher")


# ----------------------------------------------------------------------------- Reptile
@pytest.mark.parametrize("train_on_query", [True, False])
def test_reptile_meta_gradient_is_theta_minus_mean_adapted(train_on_query):
    torch.manual_seed(0)
    module = ReptileModule(MLP(1, [8, 8], 1), inner_steps=3, inner_lr=0.05, train_on_query=train_on_query).double()
    b = regression_batch()
    got, out = module_grads(module, b)
    ref = copy.deepcopy(module.net)
    theta = {n: p.detach() for n, p in ref.named_parameters()}
    phis = []
    for t in range(T):
        x, y = b.support_x[t], b.support_y[t]
        if train_on_query:
            x, y = torch.cat([x, b.query_x[t]]), torch.cat([y, b.query_y[t]])
        fast = {n: p.clone().requires_grad_() for n, p in theta.items()}
        for _ in range(3):  # plain SGD, no graph
            grads = torch.autograd.grad(F.mse_loss(functional_call(ref, fast, (x,)), y), list(fast.values()))
            fast = {n: (p - 0.05 * g).detach().requires_grad_() for (n, p), g in zip(fast.items(), grads)}
        phis.append(fast)
    for n, p in theta.items():
        want = p - torch.stack([phi[n] for phi in phis]).mean(0)
        assert torch.allclose(got[f"net.{n}"], want, **TOL), n
    # the default outer step (SGD, lr 1) moves theta onto the mean adapted weights
    opt = module.configure_optimizers()
    opt.step()
    for n, p in module.net.named_parameters():
        assert torch.allclose(p, torch.stack([phi[n] for phi in phis]).mean(0), **TOL), n
    assert out.query_losses.shape == (T,) and out.inner_losses.shape == (T, 3)


def test_reptile_needs_inner_steps():
    with pytest.raises(ValueError, match="inner_steps >= 1"):
        ReptileModule(MLP(), inner_steps=0)


# ----------------------------------------------------------------------------- Prototypical Networks
def explicit_proto_logits(net, params, sx, sy, qx, ways):
    emb_s = functional_call(net, params, (sx,))
    emb_q = functional_call(net, params, (qx,))
    protos = torch.stack([emb_s[sy == k].mean(0) for k in range(ways)])
    return torch.stack([torch.stack([-((q - c) ** 2).sum() for c in protos]) for q in emb_q]), protos


def test_protonet_gradient_equals_explicit_loop():
    torch.manual_seed(0)
    module = ProtoNetModule(MLP(4, [8], 6)).double()
    b = class_batch()
    got, out = module_grads(module, b)
    ref = copy.deepcopy(module.net)
    params = dict(ref.named_parameters())
    total = 0.0
    for t in range(T):
        logits, _ = explicit_proto_logits(ref, params, b.support_x[t], b.support_y[t], b.query_x[t], 3)
        total = total + F.cross_entropy(logits, b.query_y[t]) / T
    want = torch.autograd.grad(total, list(params.values()))
    for n, g in zip(params, want):
        assert torch.allclose(got[f"net.{n}"], g, **TOL), n
    assert torch.allclose(out.objective, total.detach(), **TOL)
    module.eval()
    pred = module.predict_episode(b.support_x[0], b.support_y[0], b.query_x[0])
    assert torch.allclose(pred, explicit_proto_logits(ref, params, b.support_x[0], b.support_y[0], b.query_x[0],
                                                      3)[0].detach(), **TOL)


def test_prototype_learners_reject_a_missing_class():
    b = class_batch()
    sy = b.support_y.clone()
    sy[1][sy[1] == 1] = 0  # task 1 has no example of class 1
    with pytest.raises(ValueError, match="task 1 has no support example of class 1"):
        ProtoNetModule(MLP(4, [8], 6)).double().meta_objective(MetaBatch(b.support_x, sy, b.query_x, b.query_y))


# ----------------------------------------------------------------------------- ProtoMAML
@pytest.mark.parametrize("first_order, adapt", [(False, None), (True, None), (False, ["head"])])
def test_protomaml_meta_gradient_equals_unrolled(first_order, adapt):
    torch.manual_seed(0)
    module = ProtoMAMLModule(MLP(4, [8], 6), inner_steps=STEPS, inner_lr=LR, first_order=first_order,
                             adapt=adapt).double()
    b = class_batch()
    got, _ = module_grads(module, b)
    ref = copy.deepcopy(module.net)
    params = dict(ref.named_parameters())

    class Head(nn.Module):  # body + a linear head given as parameters
        def __init__(self):
            super().__init__()
            self.body = ref

        def forward(self, x):
            return F.linear(self.body(x), self.w, self.b)

    head_net = Head()
    total = 0.0
    for t in range(T):
        _, protos = explicit_proto_logits(ref, params, b.support_x[t], b.support_y[t], b.query_x[t], 3)
        # the inner loop differentiates the body and the head as separate inputs (partial derivatives):
        # the body enters through an alias, so autograd.grad w.r.t. it does not follow the prototypes
        start = {**{f"body.{n}": p * 1 for n, p in params.items()}, "w": 2 * protos, "b": -(protos ** 2).sum(-1)}
        adapted = {"w", "b"} if adapt == ["head"] else set(start)
        fast = unrolled(head_net, start, adapted, b.support_x[t], b.support_y[t], F.cross_entropy, STEPS, LR,
                        first_order=first_order)
        total = total + F.cross_entropy(functional_call(head_net, fast, (b.query_x[t],)), b.query_y[t]) / T
    want = torch.autograd.grad(total, list(params.values()))
    for n, g in zip(params, want):
        assert torch.allclose(got[f"net.{n}"], g, **TOL), n


def test_protomaml_without_steps_classifies_like_the_protonet():
    torch.manual_seed(0)
    net = MLP(4, [8], 6)
    pm = ProtoMAMLModule(copy.deepcopy(net)).double().eval()
    pn = ProtoNetModule(copy.deepcopy(net)).double().eval()
    b = class_batch()
    a = pm.predict_episode(b.support_x, b.support_y, b.query_x, steps=0)
    p = pn.predict_episode(b.support_x, b.support_y, b.query_x)
    # the two differ by -||f(x)||^2, the same for every class: equal softmax
    assert torch.allclose(a.softmax(-1), p.softmax(-1), **TOL)
    assert not torch.allclose(a, p)
    assert (pm.predict_episode(b.support_x, b.support_y, b.query_x, steps=2) - a).abs().max() > 1e-4


# ----------------------------------------------------------------------------- MAML++
def test_msl_weights_anneal_to_the_last_step():
    w0, w5, w10 = (msl_weights(5, e, 10) for e in (0, 5, 10))
    assert torch.allclose(w0, torch.full((5,), 0.2, dtype=torch.float64))
    assert all(torch.isclose(w.sum(), torch.tensor(1.0, dtype=torch.float64)) for w in (w0, w5, w10))
    assert (w5[:-1] < w0[:-1]).all() and w5[-1] > w0[-1]
    assert torch.equal(w10, torch.tensor([0, 0, 0, 0, 1.0], dtype=torch.float64))
    assert (msl_weights(5, 9, 10)[:-1] >= 0.03 / 5 - 1e-12).all()


def _paper_msl(n, epoch, msl_epochs):
    """The per-step loss importance of MAML++'s code (HowToTrainYourMAMLPytorch,
    ``get_per_step_loss_importance_vector``), restated: non-final steps 1/n - epoch/(n E), floored at
    0.03/n; the final step 1/n + epoch (n-1)/(n E), capped at 1 - (n-1) 0.03/n; not renormalised. From
    epoch E on, the code trains on the final step's loss alone."""
    if epoch >= msl_epochs:
        return [0.0] * (n - 1) + [1.0]
    rate = 1.0 / n / msl_epochs
    return [max(1.0 / n - epoch * rate, 0.03 / n)] * (n - 1) + \
        [min(1.0 / n + epoch * (n - 1) * rate, 1.0 - (n - 1) * 0.03 / n)]


def test_msl_weights_equal_the_papers_schedule_value_for_value():
    assert msl_weights(5, 5, 10).tolist() == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.6], abs=1e-15)
    assert msl_weights(5, 0, 10).tolist() == pytest.approx([0.2] * 5, abs=1e-15)
    assert msl_weights(3, 3, 4).tolist() == pytest.approx([1 / 12, 1 / 12, 5 / 6], abs=1e-15)
    assert msl_weights(5, 10, 10).tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]
    for n in (1, 2, 3, 5, 8):
        for msl_epochs in (1, 3, 10, 15):
            for epoch in range(msl_epochs + 3):
                assert msl_weights(n, epoch, msl_epochs).tolist() == pytest.approx(
                    _paper_msl(n, epoch, msl_epochs), abs=1e-15), (n, epoch, msl_epochs)


class BNNet(nn.Module):
    def __init__(self, track=False):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=track), nn.ReLU())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("epoch, first_order_epochs", [(0, 0), (3, 0), (0, 2), (5, 2)])
def test_mamlpp_meta_gradient_equals_unrolled(epoch, first_order_epochs):
    torch.manual_seed(0)
    steps, msl_epochs = 3, 4
    module = MAMLPlusPlusModule(BNNet(), inner_steps=steps, inner_lr=LR, msl_epochs=msl_epochs,
                                first_order_epochs=first_order_epochs).double()
    with torch.no_grad():  # distinct per-step values, so that a wrong index shows
        for p in module.bn_params.values():
            p.add_(0.1 * torch.randn_like(p))
        for v in module.inner_lrs.values():
            v.copy_(torch.tensor([0.1, 0.05, 0.2]))
    module.first_order_now = lambda: epoch < first_order_epochs
    module._trainer = SimpleNamespace(current_epoch=epoch)  # the module reads its own schedule at this epoch
    b = class_batch()
    got, out = module_grads(module, b)

    ref = copy.deepcopy(module.net)
    base = {n: p for n, p in module.net.named_parameters() if p.requires_grad}
    bn = {n: module.bn_params[n.replace(".", "__")] for n in ("body.1.weight", "body.1.bias")}
    lrs = {n: module.inner_lrs[n.replace(".", "__")] for n in base}
    leaves = {**{f"net.{n}": p for n, p in base.items()}, **{f"bn_params.{n.replace('.', '__')}": p
                                                             for n, p in bn.items()},
              **{f"inner_lrs.{n.replace('.', '__')}": p for n, p in lrs.items()}}
    # the paper's schedule at 3 steps, 4 MSL epochs (not the module's own msl_weights)
    w = {0: [1 / 3, 1 / 3, 1 / 3], 3: [1 / 12, 1 / 12, 5 / 6], 5: [0.0, 0.0, 1.0]}[epoch]
    fo = epoch < first_order_epochs
    total = 0.0
    for t in range(T):
        fast = dict(base)
        for i in range(steps):
            step_bn = {n: v[i] for n, v in bn.items()}
            loss = F.cross_entropy(functional_call(ref, {**fast, **step_bn}, (b.support_x[t],)), b.support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: p - lrs[n][i] * (g.detach() if fo else g) for (n, p), g in zip(fast.items(), grads)}
            qloss = F.cross_entropy(functional_call(ref, {**fast, **step_bn}, (b.query_x[t],)), b.query_y[t])
            total = total + w[i] * qloss / T
    want = torch.autograd.grad(total, list(leaves.values()))
    assert set(got) == set(leaves)  # the net's own BatchNorm affine parameters are replaced by per-step ones
    for n, g in zip(leaves, want):
        assert torch.allclose(got[n], g, **TOL), n
    assert torch.allclose(out.objective, total.detach(), **TOL)


def test_mamlpp_per_step_running_statistics_are_kept_and_used():
    torch.manual_seed(0)
    module = MAMLPlusPlusModule(BNNet(track=True), inner_steps=2, inner_lr=0.5).double()
    b = class_batch()
    module.train()
    module.meta_objective(b)
    stats = module.bn_stats.body__1__running_mean
    assert stats.shape == (2, 6)
    assert not torch.allclose(stats[0], stats[1])  # step 1 saw adapted weights
    assert not torch.allclose(stats[0], torch.zeros(6, dtype=torch.float64))
    module.eval()
    before = module.predict_episode(b.support_x, b.support_y, b.query_x, steps=2)
    with torch.no_grad():
        module.bn_stats.body__1__running_mean[1] += 1.0  # the last step's statistics drive the query forward
    after = module.predict_episode(b.support_x, b.support_y, b.query_x, steps=2)
    assert not torch.allclose(before, after)


def test_mamlpp_cosine_outer_lr_and_bad_settings():
    from lightning.pytorch import Trainer

    module = MAMLPlusPlusModule(BNNet(), inner_steps=2, min_outer_lr=1e-5)
    module.trainer = Trainer(max_steps=100, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    conf = module.configure_optimizers()
    sch = conf["lr_scheduler"]["scheduler"]
    assert isinstance(sch, torch.optim.lr_scheduler.CosineAnnealingLR) and sch.T_max == 100 and sch.eta_min == 1e-5
    with pytest.raises(ValueError, match="inner_steps >= 1"):
        MAMLPlusPlusModule(BNNet(), inner_steps=0)
    with pytest.raises(ValueError, match="msl_epochs must be an integer >= 0"):
        MAMLPlusPlusModule(BNNet(), msl_epochs=-1)
