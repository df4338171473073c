"""The core's execution engine: every strategy gives the meta-gradient of an explicit per-task
autograd loop (native ``nn.BatchNorm2d``), float64, to 1e-10 relative."""
import copy
import logging

import pytest
import torch
from torch import nn
from torch.func import functional_call

from tasklight.core.engine import STRATEGIES, check_engine_settings, stack_plan, surrogate_objective
from tasklight.core.update_rules import SGD, Adam
from tasklight.data.batch import MetaBatch
from tasklight.meta.imaml import IMAMLModule
from tasklight.meta.maml import MAMLModule
from tasklight.meta.reptile import ReptileModule
from tasklight.nn.nets import MLP, Conv4

T, S, Q, STEPS, LR = 4, 4, 5, 2, 0.1
TOL = 1e-10
# (strategy, chunk_size); chunks of 3 over 4 tasks: an uneven last chunk
RUNS = [("vmap", None), ("stacked", None), ("loop", None), ("stacked", 3), ("vmap", 3), ("compiled", None)]


def conv_net(running=False):
    def block(cin):
        return [nn.Conv2d(cin, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=running), nn.ReLU(),
                nn.MaxPool2d(2)]
    return nn.Sequential(*block(1), *block(4), nn.Flatten(), nn.Linear(16, 3))


def batch_for(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return MetaBatch(*(torch.randn(T, n, 1, generator=g, dtype=torch.float64) for n in (S, S, Q, Q)))
    return MetaBatch(torch.randn(T, S, 1, 8, 8, generator=g, dtype=torch.float64),
                     torch.randint(0, 3, (T, S), generator=g),
                     torch.randn(T, Q, 1, 8, 8, generator=g, dtype=torch.float64),
                     torch.randint(0, 3, (T, Q), generator=g))


HEAD = {"mlp": "net.4", "conv": "9"}
CONFIGS = {"maml": {}, "fomaml": {"first_order": True}, "metasgd": {"learn_inner_lr": True},
           "anil": {"adapt": "HEAD"}, "adam": {"inner_optimizer": "adam"}}


def make(kind, strategy="auto", chunk_size=None, running=False, cls=MAMLModule, **kw):
    torch.manual_seed(0)
    # tanh for the MLP: a dead ReLU unit gives an exactly-zero gradient, where Adam's sqrt has no derivative
    net = MLP(1, [8, 8], 1, activation_name="tanh") if kind == "mlp" else conv_net(running)
    if kw.get("adapt") == "HEAD":
        kw["adapt"] = [HEAD[kind]]
    loss = "mse" if kind == "mlp" else "cross_entropy"
    module = cls(net, loss=loss, inner_steps=STEPS, inner_lr=LR, strategy=strategy, chunk_size=chunk_size, **kw)
    module = module.double()
    if getattr(module, "inner_lrs", None) is not None:
        with torch.no_grad():
            for p in module.inner_lrs.values():
                p.uniform_(0.05, 0.2, generator=torch.Generator().manual_seed(1))
    if strategy == "compiled":
        module.core.engine.compile_backend = "eager"  # the same function uncompiled: fast tests (see slow test)
    return module


def native(net):
    """A copy of ``net`` with torch's own BatchNorm (the module's is the elementary-op twin)."""
    net = copy.deepcopy(net)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.__class__ = nn.BatchNorm2d
    return net


def meta_grads(module, batch):
    module.zero_grad()
    out = module.meta_objective(batch)
    out.objective.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}, out


def reference(module, batch, first_order=False, adam=False):
    """The explicit per-task loop: clone, adapt with torch.autograd, sum the query losses (learn2learn's way)."""
    net = native(module.net)
    loss_fn = module.loss_fn
    params = dict(net.named_parameters())
    adapted = [n for n in params if module.core.is_adapted(n)]
    lrs = None
    if module.inner_lrs is not None:
        lrs = {n: module.inner_lrs[n.replace(".", "__")].detach().clone().requires_grad_() for n in adapted}
    total = 0.0
    for t in range(batch.num_tasks):
        fast, m, v = dict(params), {}, {}
        for k in range(1, STEPS + 1):
            loss = loss_fn(functional_call(net, fast, (batch.support_x[t],)), batch.support_y[t])
            grads = torch.autograd.grad(loss, [fast[n] for n in adapted], create_graph=not first_order)
            for n, g in zip(adapted, grads):
                lr = lrs[n] if lrs else LR
                if adam:
                    m[n] = 0.9 * m.get(n, 0) + 0.1 * g
                    v[n] = 0.999 * v.get(n, 0) + 0.001 * g * g
                    vhat = v[n] / (1 - 0.999 ** k)
                    # sqrt whose derivative at an exactly-zero entry is 0 (plain sqrt gives NaN there)
                    root = torch.where(vhat > 0, torch.where(vhat > 0, vhat, 1.0).sqrt(), 0.0)
                    fast[n] = fast[n] - lr * (m[n] / (1 - 0.9 ** k)) / (root + 1e-8)
                else:
                    fast[n] = fast[n] - lr * g
        total = total + loss_fn(functional_call(net, fast, (batch.query_x[t],)), batch.query_y[t]) / batch.num_tasks
    leaves = list(params.values()) + (list(lrs.values()) if lrs else [])
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    out = {f"net.{n}": g for n, g in zip(params, grads) if g is not None}
    if lrs:
        out.update({f"inner_lrs.{n.replace('.', '__')}": g for n, g in zip(lrs, grads[len(params):])})
    return out, net


def rel_err(got, want):
    assert set(want) <= set(got), set(want) - set(got)
    a = torch.cat([got[n].flatten() for n in want])
    b = torch.cat([want[n].flatten() for n in want])
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_every_strategy_equals_the_unrolled_per_task_loop(kind, config):
    kw = CONFIGS[config]
    batch = batch_for(kind)
    want = None
    for strategy, chunk in RUNS:
        if strategy == "compiled" and config == "adam":
            continue  # compiled runs SGD / Meta-SGD (an error, tested below)
        module = make(kind, strategy, chunk, **kw)
        if want is None:
            want, _ = reference(module, batch, first_order=kw.get("first_order", False), adam=config == "adam")
        got, out = meta_grads(module, batch)
        assert rel_err(got, want) < TOL, (strategy, chunk)
        assert out.query_losses.shape == (T,) and out.inner_losses.shape == (T, STEPS)


def test_second_order_terms_and_native_batchnorm_double_backward_match_finite_differences():
    """The stacked strategy's meta-gradient (native F.batch_norm, double backward) against central
    differences of the meta-objective along a random direction."""
    module, batch = make("conv", "stacked"), batch_for("conv")
    got, _ = meta_grads(module, batch)
    params = dict(module.net.named_parameters())
    g = torch.Generator().manual_seed(3)
    direction = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
    eps = 1e-5

    def objective_at(sign):
        with torch.no_grad():
            for n, p in params.items():
                p.add_(sign * eps * direction[n])
        value = float(module.meta_objective(batch).objective.detach())
        with torch.no_grad():
            for n, p in params.items():
                p.sub_(sign * eps * direction[n])
        return value

    fd = (objective_at(1) - objective_at(-1)) / (2 * eps)
    analytic = sum(float((got[f"net.{n}"] * direction[n]).sum()) for n in params)
    assert abs(fd - analytic) < 1e-7 * max(1.0, abs(analytic))
    first, _ = reference(module, batch, first_order=True)
    assert rel_err(first, got) > 1e-3  # the second-order terms are there


def test_running_statistics_are_the_task_average_under_every_strategy():
    batch = batch_for("conv")
    module = make("conv", "vmap", running=True)
    want, ref_net = reference(module, batch)
    # the reference's running statistics: each task on its own copy of the net, averaged
    stats = []
    for t in range(T):
        net = native(make("conv", "vmap", running=True).net)
        fast = dict(net.named_parameters())
        for _ in range(STEPS):
            loss = module.loss_fn(functional_call(net, fast, (batch.support_x[t],)), batch.support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: p - LR * g for (n, p), g in zip(fast.items(), grads)}
        functional_call(net, fast, (batch.query_x[t],))
        stats.append({k: b.clone() for k, b in net.named_buffers()})
    for strategy, chunk in RUNS[:5]:
        module = make("conv", strategy, chunk, running=True)
        got, _ = meta_grads(module, batch)
        assert rel_err(got, want) < TOL, (strategy, chunk)
        for k, b in module.net.named_buffers():
            if b.is_floating_point():
                assert torch.allclose(b, torch.stack([s[k] for s in stats]).mean(0), atol=1e-12), (strategy, k)
            else:
                assert int(b) == STEPS + 1, (strategy, k)
    # evaluation uses the running statistics (eval mode) and agrees across strategies
    outs = []
    for strategy, chunk in RUNS[:5]:
        module = make("conv", strategy, chunk, running=True)
        module.eval()
        outs.append(module.predict_episode(batch.support_x, batch.support_y, batch.query_x, steps=STEPS))
    assert all(torch.allclose(o, outs[0], atol=1e-12) for o in outs)


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_imaml_and_reptile_meta_gradients_agree_across_strategies(kind):
    batch = batch_for(kind)
    for cls, kw in [(IMAMLModule, {"lam": 2.0, "cg_steps": 3}), (ReptileModule, {})]:
        base = None
        for strategy, chunk in [("vmap", None), ("stacked", None), ("stacked", 3)]:
            module = make(kind, strategy, chunk, cls=cls, **kw)
            got, out = meta_grads(module, batch)
            if base is None:
                base, base_out = got, out
                continue
            assert rel_err(got, base) < TOL, (cls.__name__, strategy, chunk)
            assert torch.allclose(out.query_losses, base_out.query_losses, atol=1e-12)


def test_chunked_objective_is_a_surrogate_with_the_unchunked_gradient_and_predictions_agree():
    batch = batch_for("conv")
    whole, chunked = make("conv", "stacked"), make("conv", "stacked", chunk_size=1)
    g1, o1 = meta_grads(whole, batch)
    g2, o2 = meta_grads(chunked, batch)
    assert rel_err(g2, g1) < TOL
    assert torch.allclose(o1.query_losses, o2.query_losses, atol=1e-12)
    p1 = whole.predict_episode(batch.support_x, batch.support_y, batch.query_x)
    p2 = chunked.predict_episode(batch.support_x, batch.support_y, batch.query_x)
    assert p1.shape == (T, Q, 3) and torch.allclose(p1, p2, atol=1e-12)


def test_a_few_training_steps_give_the_same_parameters_under_every_strategy():
    batches = [batch_for("conv", seed) for seed in range(3)]
    finals = []
    for strategy, chunk in [("vmap", None), ("stacked", None), ("loop", None)]:
        module = make("conv", strategy, chunk, learn_inner_lr=True)
        opt = torch.optim.Adam(module.parameters(), lr=1e-2)
        losses = []
        for b in batches + batches[:1]:
            opt.zero_grad()
            out = module.meta_objective(b)
            out.objective.backward()
            opt.step()
            losses.append(float(out.query_losses.mean()))
        finals.append(torch.cat([p.detach().flatten() for p in module.parameters()]))
        assert losses[3] < losses[0]  # the same batch again, after three meta-steps
    for f in finals[1:]:
        assert torch.allclose(f, finals[0], atol=1e-10)


def test_surrogate_objective_has_the_given_gradient():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(2, 2, requires_grad=True)
    ga, gb = torch.randn(3), torch.randn(2, 2)
    obj = surrogate_objective([a, b * 2], [ga, gb])
    obj.backward()
    assert torch.equal(a.grad, ga) and torch.allclose(b.grad, 2 * gb)


def test_differentiable_adam_matches_torch_optim_adam_values():
    p0 = torch.randn(5, dtype=torch.float64)
    grads = [torch.randn(5, dtype=torch.float64) for _ in range(3)]
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.Adam([p], lr=0.1)
    rule, state, q = Adam(0.1), None, {"w": p0.clone()}
    state = rule.init(q)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        q, state = rule.step(q, {"w": g}, state)
    assert torch.allclose(q["w"], p.detach(), atol=1e-12)
    assert SGD({"w": torch.tensor(0.5)}).step({"w": p0}, {"w": p0}, ())[0]["w"].allclose(0.5 * p0)


def test_auto_logs_its_choice(caplog):
    batch = batch_for("mlp")
    with caplog.at_level(logging.INFO, logger="tasklight"):
        meta_grads(make("mlp"), batch)
    assert any("auto -> stacked" in r.getMessage() for r in caplog.records)
    caplog.clear()

    class Odd(nn.Module):  # a layer the stacked layout does not know
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(1, 1)

        def forward(self, x):
            return self.lin(x) * 2

    module = MAMLModule(Odd(), inner_steps=1).double()
    with caplog.at_level(logging.INFO, logger="tasklight"):
        meta_grads(module, batch)
    assert any("auto -> vmap" in r.getMessage() and "Odd" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="strategy='stacked'.*Odd.*strategy='vmap'"):
        MAMLModule(Odd(), strategy="stacked")


def test_stack_plan_covers_conv4_and_mlp_and_names_unsupported_layers():
    kinds = [op.kind for op in stack_plan(Conv4(1, 5, hidden=4, image_size=16)).ops]
    # ReLU runs after the max-pool that follows it (they commute; the ReLU then sees 4x fewer values)
    assert kinds[:4] == ["conv", "bn", "pool", "act"] and kinds[-2:] == ["flatten", "linear"]
    assert [op.kind for op in stack_plan(MLP(1, [4], 1, layer_norm=True)).ops] == ["linear", "ln", "act", "linear"]
    with pytest.raises(ValueError, match="1 is a Dropout"):
        stack_plan(nn.Sequential(nn.Linear(1, 2), nn.Dropout(0.5)))
    with pytest.raises(ValueError, match="groups=2"):
        stack_plan(nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)))


@pytest.mark.parametrize("bad,match", [({"strategy": "fast"}, "strategy must be one of"),
                                       ({"chunk_size": 0}, "chunk_size must be an integer >= 1"),
                                       ({"chunk_size": 2.5}, "chunk_size must be an integer >= 1"),
                                       ({"chunk_size": True}, "chunk_size must be an integer >= 1"),
                                       ({"strategy": "compiled", "chunk_size": 2}, "chunk_size does not apply")])
def test_bad_engine_settings_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        MAMLModule(MLP(1, [4], 1), **bad)
    assert set(STRATEGIES) == {"auto", "vmap", "stacked", "loop", "compiled"}
    check_engine_settings("auto", None, None)


def test_compiled_refuses_running_statistics_and_other_update_rules():
    with pytest.raises(ValueError, match="running statistics"):
        meta_grads(make("conv", "compiled", running=True), batch_for("conv"))
    with pytest.raises(ValueError, match="Adam"):
        meta_grads(make("mlp", "compiled", inner_optimizer="adam"), batch_for("mlp"))


def test_out_of_memory_during_a_meta_step_names_chunk_size(monkeypatch):
    module = make("mlp", "stacked")

    def oom(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB")

    monkeypatch.setattr(module.core.engine, "meta_objective", oom)
    with pytest.raises(MemoryError, match="chunk_size=None.*set chunk_size"):
        module.training_step(batch_for("mlp"), 0)


def test_checkpoint_config_records_the_engine_settings():
    module = MAMLModule(MLP(1, [4], 1), strategy="loop", chunk_size=2)
    assert module.hparams["strategy"] == "loop" and module.hparams["chunk_size"] == 2
    assert module.hparams["compile_cache_dir"] is None


@pytest.mark.slow
def test_compiled_with_inductor_equals_the_loop(tmp_path):
    torch.set_num_threads(1)
    module = make("mlp", "compiled", compile_cache_dir=str(tmp_path / "cache"))
    module.core.engine.compile_backend = "inductor"
    batch = batch_for("mlp")
    want, _ = reference(module, batch)
    got, _ = meta_grads(module, batch)
    assert rel_err(got, want) < 1e-9
    assert module.core.engine.compile_seconds


@pytest.mark.parametrize("config", ["maml", "metasgd", "fomaml"])
def test_hand_written_mlp_inner_gradient_equals_autograd_and_the_loop(config, monkeypatch):
    """The stacked MLP's explicit backprop (ReLU, MSE) against torch.autograd.grad and the loop."""
    import tasklight.core.engine as engine

    torch.manual_seed(0)
    batch = batch_for("mlp")
    grads = []
    for manual in (True, False):
        monkeypatch.setattr(engine, "MANUAL_MLP_GRADS", manual)
        torch.manual_seed(0)
        module = MAMLModule(MLP(1, [8, 8], 1), loss="mse", inner_steps=STEPS, inner_lr=LR, strategy="stacked",
                            **CONFIGS[config]).double()
        if module.inner_lrs is not None:
            with torch.no_grad():
                for p in module.inner_lrs.values():
                    p.uniform_(0.05, 0.2, generator=torch.Generator().manual_seed(1))
        assert engine.manual_mlp_ok(module.core.engine._plan, module.core.loss_fn)
        grads.append(meta_grads(module, batch)[0])
    want, _ = reference(module, batch, first_order=CONFIGS[config].get("first_order", False))
    assert rel_err(grads[0], want) < TOL and rel_err(grads[1], want) < TOL


@pytest.mark.parametrize("use_msl", [True, False])
def test_mamlpp_multi_step_loss_per_step_batchnorm_agrees_across_strategies(use_msl):
    """MAML++ (multi-step loss, per-step BatchNorm weights and running statistics, learned per-step
    rates) on every strategy; tests/meta checks the vmap strategy against an unrolled loop."""
    from tasklight.meta.mamlpp import MAMLPlusPlusModule

    batch = batch_for("conv")
    base = None
    for strategy, chunk in RUNS[:5]:
        torch.manual_seed(0)
        module = MAMLPlusPlusModule(conv_net(running=True), inner_steps=STEPS, inner_lr=LR, multi_step_loss=use_msl,
                                    strategy=strategy, chunk_size=chunk).double()
        with torch.no_grad():
            for p in module.bn_params.values():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2), dtype=p.dtype))
            for v in module.inner_lrs.values():
                v.copy_(torch.tensor([0.1, 0.05]))
        got, out = meta_grads(module, batch)
        stats = {k: b.clone() for k, b in module.bn_stats.named_buffers()}
        assert any(k.startswith("bn_params") for k in got) and any(k.startswith("inner_lrs") for k in got)
        if base is None:
            base, base_stats = got, stats
            continue
        assert rel_err(got, base) < TOL, (strategy, chunk)
        for k in stats:
            assert torch.allclose(stats[k], base_stats[k], atol=1e-12), (strategy, chunk, k)


def test_learners_refuse_strategies_they_do_not_run_on():
    from tasklight.meta.proto import ProtoMAMLModule, ProtoNetModule

    with pytest.raises(ValueError, match="IMAMLModule runs on the strategies"):
        IMAMLModule(MLP(1, [4], 1), strategy="compiled")
    with pytest.raises(ValueError, match="ProtoMAMLModule runs on the strategies"):
        ProtoMAMLModule(Conv4(1, 0, hidden=4, image_size=16), strategy="stacked")
    with pytest.raises(ValueError, match="ProtoNetModule does not run in chunks"):
        ProtoNetModule(Conv4(1, 0, hidden=4, image_size=16), chunk_size=2)
    with pytest.raises(ValueError, match="backend='higher' loops over tasks itself"):
        MAMLModule(MLP(1, [4], 1), backend="higher", strategy="stacked")


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("config", ["maml", "fomaml", "metasgd", "metasgd_tensor", "anil"])
def test_written_out_mlp_meta_gradient_equals_the_loop(activation, config, monkeypatch):
    """The stacked MLP's explicit meta-gradient (no autograd: R-operator Hessian-vector products
    through the inner steps) is the one that runs, unchunked and chunked, and equals the loop's."""
    import tasklight.core.mlp_explicit as mx

    calls = []
    real = mx.explicit_meta_gradient
    monkeypatch.setattr(mx, "explicit_meta_gradient", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(CONFIGS.get(config, {}))
    if config == "metasgd_tensor":
        kw = {"learn_inner_lr": True, "inner_lr_granularity": "tensor"}
    if kw.get("adapt") == "HEAD":
        kw["adapt"] = [HEAD["mlp"]]
    batch = batch_for("mlp", seed=3)
    for chunk in (None, 3):
        torch.manual_seed(0)
        module = MAMLModule(MLP(1, [8, 8], 1, activation_name=activation), loss="mse", inner_steps=STEPS,
                            inner_lr=LR, chunk_size=chunk, **kw).double()
        if module.inner_lrs is not None:
            with torch.no_grad():
                for p in module.inner_lrs.values():
                    p.uniform_(0.05, 0.2, generator=torch.Generator().manual_seed(1))
        calls.clear()
        got, out = meta_grads(module, batch)
        assert calls, "the written-out path did not run"
        want, _ = reference(module, batch, first_order=kw.get("first_order", False))
        assert rel_err(got, want) < TOL, chunk
        if module.inner_lrs is not None:
            assert all(f"inner_lrs.{k}" in got for k in module.inner_lrs.keys())


def test_written_out_path_is_not_used_where_it_does_not_apply(monkeypatch):
    """Adam inner steps and non-MSE losses go through autograd (and still match the loop)."""
    import tasklight.core.mlp_explicit as mx

    def boom(*a, **k):
        raise AssertionError("written-out path used")

    monkeypatch.setattr(mx, "explicit_meta_gradient", boom)
    meta_grads(make("mlp", "stacked", inner_optimizer="adam"), batch_for("mlp"))
    module = MAMLModule(MLP(1, [8], 3), loss="cross_entropy", inner_steps=1, strategy="stacked").double()
    b = batch_for("mlp")
    meta_grads(module, MetaBatch(b.support_x, torch.randint(0, 3, b.support_y.shape[:2]), b.query_x,
                                 torch.randint(0, 3, b.query_y.shape[:2])))


def test_auto_runs_conv_nets_per_task_on_the_cpu(caplog):
    batch = batch_for("conv")
    module = make("conv")
    with caplog.at_level(logging.INFO, logger="tasklight"):
        got, _ = meta_grads(module, batch)
    assert module.core.engine.resolved == "loop"
    assert any("auto -> loop" in r.getMessage() and "CPU" in r.getMessage() for r in caplog.records)
    want, _ = reference(module, batch)
    assert rel_err(got, want) < TOL
