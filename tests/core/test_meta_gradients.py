"""Meta-gradients of the core against independent computations (plain autograd loops, dense Hessians)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from tasklight.data.batch import MetaBatch
from tasklight.core.implicit import conjugate_gradient, implicit_gradient, proximal_meta_gradient
from tasklight.meta.imaml import IMAMLModule
from tasklight.meta.maml import MAMLModule
from tasklight.nn.nets import MLP, Conv4

T, S, Q, STEPS, LR = 3, 4, 5, 2, 0.1


def regression_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return MetaBatch(torch.randn(T, S, 1, generator=g, dtype=torch.float64),
                     torch.randn(T, S, 1, generator=g, dtype=torch.float64),
                     torch.randn(T, Q, 1, generator=g, dtype=torch.float64),
                     torch.randn(T, Q, 1, generator=g, dtype=torch.float64))


def image_batch(seed=0, ways=3):
    g = torch.Generator().manual_seed(seed)
    return MetaBatch(torch.randn(T, S, 1, 16, 16, generator=g, dtype=torch.float64),
                     torch.randint(0, ways, (T, S), generator=g),
                     torch.randn(T, Q, 1, 16, 16, generator=g, dtype=torch.float64),
                     torch.randint(0, ways, (T, Q), generator=g))


def make(kind, **kw):
    torch.manual_seed(0)
    if kind == "mlp":
        net, loss, batch = MLP(1, [8, 8], 1), "mse", regression_batch()
    else:
        net = Conv4(1, out_features=3, hidden=4, image_size=16, track_running_stats=(kind == "conv_running"))
        loss, batch = "cross_entropy", image_batch()
    module = MAMLModule(net, loss=loss, inner_steps=STEPS, inner_lr=LR, **kw).double()
    return module, batch


def meta_grads(module, batch):
    module.zero_grad()
    out = module.meta_objective(batch)
    out.objective.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters()}, out


def reference_grads(module, batch, first_order=False, lrs=None):
    """An explicit per-task loop with plain torch.autograd (the learn2learn way: clone, adapt, loop)."""
    net = copy.deepcopy(module.net)
    loss_fn = module.loss_fn
    params = dict(net.named_parameters())
    lr_params = {n: l.detach().clone().requires_grad_() for n, l in lrs.items()} if lrs else None
    total = 0.0
    for t in range(batch.num_tasks):
        fast = dict(params)
        for _ in range(STEPS):
            loss = loss_fn(functional_call(net, fast, (batch.support_x[t],)), batch.support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {n: p - (lr_params[n] if lr_params else LR) * g for (n, p), g in zip(fast.items(), grads)}
        total = total + loss_fn(functional_call(net, fast, (batch.query_x[t],)), batch.query_y[t]) / batch.num_tasks
    leaves = list(params.values()) + (list(lr_params.values()) if lr_params else [])
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    out = {f"net.{n}": g for n, g in zip(params, grads)}
    if lr_params:
        out.update({f"lr:{n}": g for n, g in zip(lr_params, grads[len(params):])})
    return out, net


@pytest.mark.parametrize("kind", ["mlp", "conv", "conv_running"])
def test_second_order_maml_equals_unrolled_autograd(kind):
    module, batch = make(kind)
    got, _ = meta_grads(module, batch)
    want, _ = reference_grads(module, batch)
    for n, g in want.items():
        assert torch.allclose(got[n], g, atol=1e-5, rtol=1e-5), n
    # second-order terms are really there: first-order differs
    fo, _ = reference_grads(module, batch, first_order=True)
    assert any(not torch.allclose(fo[n], want[n], atol=1e-6) for n in want)


def test_batchnorm_running_stats_are_task_average_of_reference():
    module, batch = make("conv_running")
    meta_grads(module, batch)
    # reference: each task adapts its own copy of the net in train mode; running stats are averaged
    stats = []
    for t in range(batch.num_tasks):
        net = copy.deepcopy(make("conv_running")[0].net)
        fast = dict(net.named_parameters())
        for _ in range(STEPS):
            loss = F.cross_entropy(functional_call(net, fast, (batch.support_x[t],)), batch.support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: p - LR * g for (n, p), g in zip(fast.items(), grads)}
        functional_call(net, fast, (batch.query_x[t],))
        stats.append(net.features[0][1].running_mean.clone())
    assert torch.allclose(module.net.features[0][1].running_mean, torch.stack(stats).mean(0), atol=1e-10)
    assert int(module.net.features[0][1].num_batches_tracked) == STEPS + 1


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_first_order_maml_equals_definition(kind):
    module, batch = make(kind, first_order=True)
    got, _ = meta_grads(module, batch)
    want, _ = reference_grads(module, batch, first_order=True)
    for n, g in want.items():
        assert torch.allclose(got[n], g, atol=1e-6), n


def test_meta_sgd_learnable_inner_lrs():
    module, batch = make("mlp", learn_inner_lr=True)
    with torch.no_grad():  # distinct per-element learning rates
        for p in module.inner_lrs.values():
            p.uniform_(0.05, 0.2)
    got, _ = meta_grads(module, batch)
    lrs = {n: module.inner_lrs[n.replace(".", "__")] for n, _ in module.net.named_parameters()}
    want, _ = reference_grads(module, batch, lrs=lrs)
    for n, g in want.items():
        key = f"inner_lrs.{n[3:].replace('.', '__')}" if n.startswith("lr:") else n
        assert torch.allclose(got[key], g, atol=1e-6), n
    assert all(got[f"inner_lrs.{k}"].abs().sum() > 0 for k in module.inner_lrs.keys())


@pytest.mark.parametrize("kind,kw", [("mlp", {}), ("conv", {}), ("mlp", {"first_order": True}),
                                     ("mlp", {"learn_inner_lr": True})])
def test_higher_backend_equals_core(kind, kw):
    core, batch = make(kind, **kw)
    hig, _ = make(kind, backend="higher", **kw)
    hig.load_state_dict(core.state_dict())
    g1, o1 = meta_grads(core, batch)
    g2, o2 = meta_grads(hig, batch)
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-6), n
    assert torch.allclose(o1.query_losses, o2.query_losses, atol=1e-8)


def test_higher_backend_adam_inner_optimizer_trains_and_differs_from_sgd():
    module, batch = make("mlp", backend="higher", inner_optimizer="adam")
    g, out = meta_grads(module, batch)
    sgd, _ = make("mlp")
    g_sgd, _ = meta_grads(sgd, batch)
    assert all(torch.isfinite(v).all() for v in g.values())
    assert not torch.allclose(g["net.net.0.weight"], g_sgd["net.net.0.weight"])
    # the core's differentiable Adam (tasklight.core.update_rules) agrees with higher's up to where
    # eps sits (torch.optim.Adam's sqrt(v_hat) + eps vs higher's (sqrt(v) + eps) / sqrt(1 - beta2^t));
    # tests/core/test_engine.py checks it exactly against an unrolled loop
    core, _ = make("mlp", inner_optimizer="adam")
    core.load_state_dict(module.state_dict())
    g_core, out_core = meta_grads(core, batch)
    for n in g:
        assert torch.allclose(g_core[n], g[n], atol=2e-3, rtol=1e-2), n
    assert torch.allclose(out_core.query_losses, out.query_losses, atol=1e-4)


# --------------------------------------------------------------------------- implicit gradients
def test_conjugate_gradient_matches_linalg_solve():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(12, 12, generator=g, dtype=torch.float64)
    a = m @ m.T + 0.1 * torch.eye(12, dtype=torch.float64)
    b = torch.randn(12, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda v: a @ v, b, steps=40)
    assert torch.allclose(x, torch.linalg.solve(a, b), atol=1e-8)
    # damping solves the damped system; dict pytrees work
    xd = conjugate_gradient(lambda v: {"u": a @ v["u"]}, {"u": b}, steps=40, damping=0.5)
    assert torch.allclose(xd["u"], torch.linalg.solve(a + 0.5 * torch.eye(12, dtype=torch.float64), b), atol=1e-8)
    # few steps: not converged yet, but the residual decreases
    r = lambda k: (a @ conjugate_gradient(lambda v: a @ v, b, steps=k) - b).norm()  # noqa: E731
    assert r(8) < r(2) < b.norm()


def test_conjugate_gradient_with_a_per_system_inner_product_solves_each_system():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(3, 6, 6, generator=g, dtype=torch.float64)
    c = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    a = m @ m.transpose(1, 2) + c[:, None, None] * torch.eye(6, dtype=torch.float64)  # 3 systems, unlike spectra
    b = torch.randn(3, 6, 2, generator=g, dtype=torch.float64)
    x, info = conjugate_gradient(lambda v: a @ v, b, steps=30, return_info=True,
                                 dot=lambda u, v: (u * v).sum((-2, -1), keepdim=True))
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-8, atol=1e-10)
    assert info["rel_residual"].shape == (3, 1, 1) and (info["rel_residual"] < 1e-8).all()


def _flat(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


def test_imaml_meta_gradient_equals_dense_hessian_solve():
    torch.manual_seed(0)
    lam = 2.0
    module = IMAMLModule(MLP(1, [5], 1, activation_name="tanh"), loss="mse", inner_steps=30, inner_lr=0.05, lam=lam,
                         cg_steps=60, curvature="hessian").double()
    batch = regression_batch(1)
    v, qloss, inner, _ = module.task_meta_gradients(batch)
    names = [n for n, _ in module.net.named_parameters()]
    theta = {n: p.detach() for n, p in module.net.named_parameters()}
    shapes = [theta[n].shape for n in names]
    sizes = [theta[n].numel() for n in names]

    def unflat(x):
        return {n: t.reshape(s) for n, t, s in zip(names, torch.split(x, sizes), shapes)}

    for t in range(batch.num_tasks):
        # inner solution by the same proximal gradient steps, done by hand
        phi = _flat(theta).clone()
        loss = lambda x: F.mse_loss(functional_call(module.net, unflat(x), (batch.support_x[t],)),  # noqa: E731
                                    batch.support_y[t])
        for _ in range(30):
            x = phi.clone().requires_grad_()
            g = torch.autograd.grad(loss(x) + lam / 2 * ((x - _flat(theta)) ** 2).sum(), x)[0]
            phi = phi - 0.05 * g
        qloss_fn = lambda x: F.mse_loss(functional_call(module.net, unflat(x), (batch.query_x[t],)),  # noqa: E731
                                        batch.query_y[t])
        gq = torch.autograd.functional.jacobian(qloss_fn, phi)
        hess = torch.autograd.functional.hessian(loss, phi)
        exact = torch.linalg.solve(torch.eye(len(phi), dtype=torch.float64) + hess / lam, gq)
        got = torch.cat([v[n][t].reshape(-1) for n in names])
        assert torch.allclose(got, exact, atol=1e-6), (t, (got - exact).abs().max())
    # the module's gradient is the task mean of these
    module.zero_grad()
    module.meta_objective(batch).objective.backward()
    for n, p in module.net.named_parameters():
        assert torch.allclose(p.grad, v[n].mean(0))


def test_imaml_with_batchnorm_running_stats_runs_and_is_finite():
    torch.manual_seed(0)
    module = IMAMLModule(Conv4(1, 3, hidden=4, image_size=16, track_running_stats=True), loss="cross_entropy",
                         inner_steps=3, inner_lr=0.1, lam=1.0, cg_steps=3).double()
    batch = image_batch()
    before = module.net.features[0][1].running_mean.clone()
    out = module.meta_objective(batch)
    out.objective.backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())
    assert not torch.allclose(before, module.net.features[0][1].running_mean)


def test_general_implicit_gradient_closed_form():
    """theta*(phi) = argmin 1/2 theta^T A theta - phi^T theta = A^-1 phi; L = 1/2||theta - c||^2."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = m @ m.T + torch.eye(6, dtype=torch.float64)
    phi, c = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    theta = torch.linalg.solve(a, phi)
    got = implicit_gradient(lambda th, ph: 0.5 * th @ a @ th - ph @ th, theta, phi, theta - c, cg_steps=30)
    assert torch.allclose(got, torch.linalg.solve(a, theta - c), atol=1e-8)
    # proximal special case: inner = f(th) + lam/2||th - phi||^2 gives lam (H + lam)^-1 g = (I + H/lam)^-1 g
    lam = 0.7
    hq = lambda th: 0.5 * th @ a @ th  # noqa: E731
    v1 = implicit_gradient(lambda th, ph: hq(th) + lam / 2 * ((th - ph) ** 2).sum(), theta, phi, c, cg_steps=30)
    v2 = proximal_meta_gradient(hq, theta, c, lam, cg_steps=30)
    assert torch.allclose(v1, v2, atol=1e-8)
