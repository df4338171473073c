"""The differentiable inner update rules against ``torch.optim`` (the same parameters after K first-order
steps, float64) and against ``higher`` (the same second-order meta-gradient through K inner steps), and
their use from ``MAMLModule`` and a config."""
import copy
from pathlib import Path

import higher
import pytest
import torch
from torch import nn
from torch.func import functional_call

from tasklight.core.update_rules import UPDATE_RULES, make_update_rule
from tasklight.meta.maml import MAMLModule
from tasklight.nn import MLP

ROOT = Path(__file__).resolve().parents[2]
K = 4
# (rule name, options, torch.optim class): each option that changes the arithmetic is exercised
CASES = [
    ("momentum", {"momentum": 0.9}, torch.optim.SGD),
    ("momentum", {"momentum": 0.8, "nesterov": True}, torch.optim.SGD),
    ("momentum", {"momentum": 0.7, "dampening": 0.3, "weight_decay": 0.1}, torch.optim.SGD),
    ("adam", {"weight_decay": 0.1, "betas": (0.8, 0.95)}, torch.optim.Adam),
    ("adamw", {}, torch.optim.AdamW),
    ("adamw", {"weight_decay": 0.3, "betas": (0.5, 0.9)}, torch.optim.AdamW),
    ("rmsprop", {}, torch.optim.RMSprop),
    ("rmsprop", {"momentum": 0.5, "centered": True, "weight_decay": 0.1, "alpha": 0.9}, torch.optim.RMSprop),
    ("adagrad", {}, torch.optim.Adagrad),
    ("adagrad", {"lr_decay": 0.25, "initial_accumulator_value": 0.2, "weight_decay": 0.05}, torch.optim.Adagrad),
]
IDS = [f"{n}-{'-'.join(o) or 'default'}" for n, o, _ in CASES]


def _objective(p):
    """A non-quadratic objective: the gradient changes with the parameters, so the steps are closed-loop."""
    return (torch.sin(3 * p["a"]) * p["b"].sum()).sum() + (p["b"] ** 4).sum() + 0.5 * (p["a"] ** 2).sum()


@pytest.mark.parametrize("name,opts,torch_cls", CASES, ids=IDS)
def test_first_order_steps_equal_torch_optim(name, opts, torch_cls):
    g = torch.Generator().manual_seed(0)
    start = {"a": torch.randn(5, generator=g, dtype=torch.float64),
             "b": torch.randn(2, 3, generator=g, dtype=torch.float64)}
    ref = {k: nn.Parameter(v.clone()) for k, v in start.items()}
    opt = torch_cls(ref.values(), lr=0.05, **opts)
    rule = make_update_rule(name, 0.05, **opts)
    params, state = dict(start), rule.init(start)
    for _ in range(K):
        opt.zero_grad()
        _objective(ref).backward()
        opt.step()
        p = {k: v.detach().requires_grad_() for k, v in params.items()}
        grads = dict(zip(p, torch.autograd.grad(_objective(p), list(p.values()))))
        params, state = rule.step({k: v.detach() for k, v in params.items()}, grads, state)
    for k in start:
        torch.testing.assert_close(params[k], ref[k].detach(), rtol=1e-12, atol=1e-13)
        assert not torch.equal(params[k], start[k])


class _HigherAdamW(higher.optim.DifferentiableAdam):
    """higher 0.2.1 has no AdamW: its differentiable Adam after the decoupled decay ``p (1 - lr wd)``."""

    def _update(self, grouped_grads, **kwargs):
        for group, grads in zip(self.param_groups, grouped_grads):
            wd, group["weight_decay"] = group["weight_decay"], 0.0
            group["params"] = [p if g is None else p * (1 - group["lr"] * wd) for p, g in zip(group["params"], grads)]
            group["_wd"] = wd
        super()._update(grouped_grads, **kwargs)
        for group in self.param_groups:
            group["weight_decay"] = group.pop("_wd")


def _task(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 2, generator=g, dtype=torch.float64) for _ in range(4)]


@pytest.mark.parametrize("name,opts,torch_cls", CASES, ids=IDS)
def test_second_order_meta_gradient_equals_higher(name, opts, torch_cls):
    sx, sy, qx, qy = _task()
    torch.manual_seed(0)
    net = MLP(2, [5], 2, activation_name="tanh").double()
    # higher's Adagrad computes lr / (1 + (step - 1) lr_decay) with torch.optim's float32 step counter, a
    # float32 rate: a rate exact in float32 and no lr_decay here (the first-order test checks lr_decay)
    lr = 0.125
    if name == "adagrad":
        opts = {k: v for k, v in opts.items() if k != "lr_decay"}
    if name in ("adam", "adamw"):  # higher puts eps elsewhere (sqrt(v) + eps, then the bias correction)
        opts = {**opts, "eps": 1e-14}
    # tasklight: the rule's steps on a parameter dict, differentiated by plain autograd
    params = dict(net.named_parameters())
    rule, fast = make_update_rule(name, lr, **opts), dict(params)
    state = rule.init(fast)
    mse = nn.functional.mse_loss
    for _ in range(K):
        loss = mse(functional_call(net, fast, (sx,)), sy)
        grads = dict(zip(fast, torch.autograd.grad(loss, list(fast.values()), create_graph=True)))
        fast, state = rule.step(fast, grads, state)
    ours = torch.autograd.grad(mse(functional_call(net, fast, (qx,)), qy), list(params.values()))
    # higher: the same inner loop with its differentiable version of the torch.optim class
    ref_net = copy.deepcopy(net)
    if torch_cls is torch.optim.AdamW:
        higher.register_optim(torch.optim.AdamW, _HigherAdamW)
    inner = torch_cls(ref_net.parameters(), lr=lr, **opts)
    with higher.innerloop_ctx(ref_net, inner, copy_initial_weights=False) as (fnet, diffopt):
        for _ in range(K):
            diffopt.step(mse(fnet(sx), sy))
        theirs = torch.autograd.grad(mse(fnet(qx), qy), list(ref_net.parameters()))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)
    assert all(a.abs().sum() > 0 for a in ours)


@pytest.mark.parametrize("name,opts", [("momentum", {"nesterov": True}), ("rmsprop", {"centered": True}),
                                       ("adagrad", {"initial_accumulator_value": 0.1})])
def test_maml_inner_optimizer_core_equals_higher_backend(name, opts):
    g = torch.Generator().manual_seed(0)
    from tasklight.data.batch import MetaBatch

    batch = MetaBatch(*(torch.randn(3, 4, 1, generator=g, dtype=torch.float64) for _ in range(4)))
    grads = []
    for backend in ("functorch", "higher"):
        torch.manual_seed(0)
        m = MAMLModule(MLP(1, [8], 1, activation_name="tanh"), inner_steps=3, inner_lr=0.125, backend=backend,
                       inner_optimizer=name, inner_optimizer_args=opts).double()
        m.meta_objective(batch).objective.backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    torch.manual_seed(0)
    sgd = MAMLModule(MLP(1, [8], 1, activation_name="tanh"), inner_steps=3, inner_lr=0.125).double()
    sgd.meta_objective(batch).objective.backward()
    for n, a in grads[0].items():
        torch.testing.assert_close(a, grads[1][n], rtol=1e-8, atol=1e-11)
    assert any(not torch.allclose(a, p.grad) for (n, a), p in zip(grads[0].items(), sgd.parameters()))


def test_bad_inner_optimizer_settings_are_refused():
    net = MLP(1, [4], 1)
    with pytest.raises(ValueError, match=r"inner update rule 'rmsprop' takes the options \['alpha'"):
        MAMLModule(net, inner_optimizer="rmsprop", inner_optimizer_args={"betas": (0.9, 0.99)})
    with pytest.raises(ValueError, match="inner_optimizer must be one of"):
        MAMLModule(net, inner_optimizer="lion")
    with pytest.raises(ValueError, match="higher has no differentiable AdamW"):
        MAMLModule(net, inner_optimizer="adamw", backend="higher")
    with pytest.raises(ValueError, match="nesterov momentum needs momentum > 0 and dampening = 0"):
        make_update_rule("momentum", 0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match="Adagrad needs lr_decay >= 0"):
        make_update_rule("adagrad", 0.1, lr_decay=-1.0)
    assert sorted(UPDATE_RULES) == ["adagrad", "adam", "adamw", "momentum", "rmsprop", "sgd"]


@pytest.mark.slow
def test_inner_optimizer_from_a_config(tmp_path, monkeypatch):
    from tasklight.cli import run_cli

    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", str(ROOT / "configs" / "maml_sinusoid.yaml"), "--trainer.max_steps", "2",
                   "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
                   "--trainer.enable_progress_bar", "false", "--data.init_args.meta_batch_size", "2",
                   "--data.init_args.batches_per_epoch", "2", "--data.init_args.val_episodes", "2",
                   "--data.init_args.test_episodes", "4", "--data.init_args.eval_batch_size", "2",
                   "--model.init_args.inner_optimizer", "momentum",
                   "--model.init_args.inner_optimizer_args", "{momentum: 0.9, nesterov: true}"])
    rule = cli.model.update_rule()
    assert type(rule).__name__ == "MomentumSGD" and rule.nesterov and rule.momentum == 0.9
    assert cli.trainer.global_step == 2 and "test/mse" in cli.trainer.callback_metrics
