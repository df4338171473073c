"""CGC, PLE, DSelect-k and LTB: routing against hand-computed examples, parity with LibMTL 1.1.5 (CGC,
PLE, DSelect-k; LibMTL 1.1.5 has no LTB), bad settings, and their Omniglot configs through the CLI."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from _libmtl import libmtl_submodule

from tasklight.data.batch import TaskSpec
from tasklight.multitask import ARCHITECTURES, CGC, LTB, PLE, DSelectK
from tasklight.multitask.arch_experts import smooth_step
from tasklight.multitask.architectures import HeadFactory
from tasklight.nn.nets import MLP

ROOT = Path(__file__).resolve().parents[2]


def build(arch, trunk, T=2, features=2, example=None):
    arch.build(trunk, [TaskSpec(f"t{t}", features) for t in range(T)], 0, features, HeadFactory("identity"),
               example=example)
    return arch


def set_linear(layer: nn.Linear, scale: float) -> None:
    with torch.no_grad():
        layer.weight.copy_(scale * torch.eye(*layer.weight.shape))
        layer.bias.zero_()


def set_gate(layer: nn.Linear, probs) -> None:
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor(probs).log())


def first_linear(m: nn.Module) -> nn.Linear:
    return next(x for x in m.modules() if isinstance(x, nn.Linear))


X = torch.tensor([[1.0, 2.0], [2.0, -1.0]])  # example 0 belongs to task 0, example 1 to task 1
ROWS = [torch.tensor([0]), torch.tensor([1])]


def test_cgc_routing_by_hand():
    arch = build(CGC(num_shared_experts=1, num_task_experts=1), MLP(2, [], 2))
    set_linear(first_linear(arch.shared_experts[0]), 1.0)
    set_linear(first_linear(arch.task_experts[0][0]), 3.0)
    set_linear(first_linear(arch.task_experts[1][0]), -1.0)
    set_gate(arch.gates[0], [0.25, 0.75])
    set_gate(arch.gates[1], [0.5, 0.5])
    outs, rep = arch(X, None, ROWS)
    # task 0: 0.25 * x + 0.75 * 3x = 2.5 x; task 1: 0.5 * x - 0.5 * x = 0
    torch.testing.assert_close(outs[0], torch.tensor([[2.5, 5.0]]))
    torch.testing.assert_close(outs[1], torch.tensor([[0.0, 0.0]]))
    torch.testing.assert_close(rep, torch.tensor([[2.5, 5.0], [0.0, 0.0]]))
    # shared: the shared expert; task 0's: its expert, gate and head -- not task 1's
    assert {id(p) for p in arch.shared_parameters()} == {id(p) for p in arch.shared_experts.parameters()}
    assert not {id(p) for p in arch.task_parameters(0)} & {id(p) for p in arch.task_parameters(1)}


def test_ple_routing_by_hand():
    arch = build(PLE(num_shared_experts=1, num_task_experts=1), MLP(2, [2], 2))  # stages: [Linear, ReLU], [Linear]
    assert len(arch.shared_experts) == 2
    for stage, (shared, own) in enumerate([(1.0, 2.0), (1.0, 0.5)]):
        set_linear(first_linear(arch.shared_experts[stage][0]), shared)
        set_linear(first_linear(arch.task_experts[stage][0][0]), own)
        set_linear(first_linear(arch.task_experts[stage][1][0]), own)
    set_gate(arch.gates[0][0], [0.5, 0.5])
    set_gate(arch.gates[1][0], [0.25, 0.75])
    set_gate(arch.gates[0][1], [1.0, 1e-30])
    set_gate(arch.gates[1][1], [1.0, 1e-30])
    outs, _ = arch(torch.tensor([[1.0, 2.0]]), None, [torch.tensor([0]), None])
    # stage 0: 0.5 relu(x) + 0.5 relu(2x) = [1.5, 3]; stage 1: 0.25 h + 0.75 * 0.5 h = 0.625 h
    torch.testing.assert_close(outs[0], torch.tensor([[0.9375, 1.875]]))
    assert outs[1] is None


def test_smooth_step_and_dselect_k_routing_by_hand():
    t = torch.tensor([-1.0, -0.5, 0.0, 0.25, 0.5, 2.0])
    torch.testing.assert_close(smooth_step(t, 1.0), torch.tensor([0.0, 0.0, 0.5, 0.84375, 1.0, 1.0]))
    arch = build(DSelectK(num_experts=4, num_nonzeros=1, entropy_weight=0.5), MLP(2, [], 2))
    for e, c in enumerate([1.0, 2.0, 3.0, 4.0]):
        set_linear(first_linear(arch.experts[e]), c)
    with torch.no_grad():
        for t, bias in enumerate([[1.0, -1.0], [0.0, 1.0]]):
            arch.z_logits[t].weight.zero_()
            arch.z_logits[t].bias.copy_(torch.tensor(bias))
    outs, _ = arch(X, None, ROWS)
    # task 0: codes (msb first) s = [1, 0] select expert 2 (binary 10): 3x
    torch.testing.assert_close(outs[0], 3 * X[:1])
    # task 1: s = [0.5, 1] gives experts 1 (01) and 3 (11) weight 0.5 each: 0.5 * 2x + 0.5 * 4x = 3x
    torch.testing.assert_close(outs[1], 3 * X[1:])
    entropy = -(1.0 * math.log(1 + 1e-6)) - 2 * 0.5 * math.log(0.5 + 1e-6)
    torch.testing.assert_close(arch.penalty(), torch.tensor(0.5 * entropy))
    # 3 experts (not a power of 2): the mass on the missing code 11 is penalised by 1 / sum_e q_e
    arch3 = build(DSelectK(num_experts=3, num_nonzeros=1, entropy_weight=0.0), MLP(2, [], 2))
    with torch.no_grad():
        arch3.z_logits[0].weight.zero_()
        arch3.z_logits[0].bias.copy_(torch.tensor([0.0, 1.0]))  # q = [0, 0.5, 0] (+ 0.5 on the missing 11)
    arch3(X[:1], None, [torch.tensor([0]), None])
    torch.testing.assert_close(arch3.penalty(), torch.tensor(2.0))


def test_ltb_routing_by_hand():
    arch = build(LTB(sample=False), MLP(2, [2], 2))  # two stages, one node per task in each
    for stage, scales in enumerate([(1.0, 2.0), (10.0, -1.0)]):
        for node, c in enumerate(scales):
            set_linear(first_linear(arch.nodes[stage][node]), c)
    with torch.no_grad():
        arch.alpha.copy_(torch.tensor([[[0.0, 5.0], [5.0, 0.0]]]))  # child 0 <- parent 1, child 1 <- parent 0
    x = torch.tensor([[1.0, 2.0]])
    arch.eval()  # the discrete tree: each node's most likely parent
    outs, _ = arch(x.repeat(2, 1), None, ROWS)
    torch.testing.assert_close(outs[0], 10 * 2 * x)
    torch.testing.assert_close(outs[1], -1 * x)
    arch.train()  # the relaxation: softmax of the logits (sample=False)
    p = 1 / (1 + math.exp(-5.0))
    outs, _ = arch(x.repeat(2, 1), None, ROWS)
    torch.testing.assert_close(outs[0], 10 * (p * 2 * x + (1 - p) * x))
    torch.testing.assert_close(outs[1], -1 * (p * x + (1 - p) * 2 * x))
    sampled = build(LTB(temperature=0.5), MLP(2, [2], 2))
    a = sampled.branching()
    assert a.shape == (1, 2, 2) and torch.allclose(a.sum(-1), torch.ones(1, 2))
    assert any(p is sampled.alpha for p in sampled.shared_parameters())


def test_bad_settings_are_refused_and_the_names_are_registered():
    with pytest.raises(ValueError, match="CGC needs num_shared_experts >= 1"):
        CGC(num_shared_experts=0)
    with pytest.raises(ValueError, match="PLE needs num_task_experts >= 1"):
        PLE(num_task_experts=[1, 0])
    with pytest.raises(ValueError, match=r"CGC got num_task_experts=\[1, 2\] for 3 tasks: give one count per task"):
        build(CGC(num_task_experts=[1, 2]), MLP(2, [], 2), T=3)
    with pytest.raises(ValueError, match="DSelectK needs gamma > 0"):
        DSelectK(gamma=0.0)
    with pytest.raises(ValueError, match="LTB temperature must be a finite number > 0"):
        LTB(temperature=0.0)
    with pytest.raises(ValueError, match="cannot split the trunk"):
        build(PLE(), nn.Linear(2, 2), example=X)
    assert {k: ARCHITECTURES[k] for k in ("cgc", "ple", "dselect_k", "ltb")} == \
        {"cgc": CGC, "ple": PLE, "dselect_k": DSelectK, "ltb": LTB}


# ----------------------------------------------------------------------------- parity with LibMTL 1.1.5
@pytest.fixture(scope="module")
def libmtl_arch():
    """LibMTL's architecture modules, loaded without the package ``__init__`` (it imports torchvision)."""
    yield from libmtl_submodule("architecture")


class _ResNetLike(nn.Module):
    """LibMTL's PLE takes a ResNet's conv1/bn1/relu/maxpool/layer1-4 as its five stages: the same
    attributes on linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = nn.Linear(4, 5), nn.Identity(), nn.Tanh(), nn.Identity()
        for i in range(1, 5):
            setattr(self, f"layer{i}", nn.Sequential(nn.Linear(5, 5), nn.Tanh()))

    def forward(self, x):
        h = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(h))))


def _lib(cls, encoder, T=3, **kwargs):
    torch.manual_seed(0)
    decoders = nn.ModuleDict({f"t{t}": nn.Linear(5, 2) for t in range(T)})
    return cls([f"t{t}" for t in range(T)], encoder, decoders, False, False, "cpu", img_size=[4], **kwargs)


def _ours(arch, trunk, lib, T=3):
    arch.build(trunk, [TaskSpec(f"t{t}", 2) for t in range(T)], 0, 5, HeadFactory(), example=torch.zeros(2, 4))
    for t in range(T):
        arch.heads[t].load_state_dict(lib.decoders[f"t{t}"].state_dict())
    return arch


def _compare(lib, ours, copy_pairs, T=3):
    for a, b in copy_pairs:
        a.load_state_dict(b.state_dict())
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(1))
    lib.eval()
    want = lib(x)
    # LibMTL gives every task an output on every example; here the rows of one task at a time
    got = [ours(x, None, [torch.arange(7) if s == t else None for s in range(T)])[0][t] for t in range(T)]
    for t in range(T):
        torch.testing.assert_close(got[t], want[f"t{t}"], rtol=1e-5, atol=1e-6)
    # the same gradients: of every task's outputs, on corresponding parameters
    gw = torch.autograd.grad(sum((want[f"t{t}"] ** 2).sum() for t in range(T)), [b.weight for _, b in copy_pairs
                                                                                  if hasattr(b, "weight")])
    gg = torch.autograd.grad(sum((got[t] ** 2).sum() for t in range(T)), [a.weight for a, _ in copy_pairs
                                                                          if hasattr(a, "weight")])
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cgc_equals_libmtl(libmtl_arch):
    enc = lambda: MLP(4, [6], 5, activation_name="tanh")  # noqa: E731
    lib = _lib(libmtl_arch.CGC, enc, num_experts=[2, 1, 2, 1])  # shared, then one count per task
    ours = _ours(CGC(num_shared_experts=2, num_task_experts=[1, 2, 1]), enc(), lib)
    pairs = [(ours.shared_experts[i].net[j], lib.experts_shared[i].net[j]) for i in range(2) for j in (0, 2)]
    for t, k in enumerate([1, 2, 1]):
        pairs += [(ours.task_experts[t][e].net[j], lib.experts_specific[f"t{t}"][e].net[j])
                  for e in range(k) for j in (0, 2)]
        pairs.append((ours.gates[t], lib.gate_specific[f"t{t}"][0]))
    _compare(lib, ours, pairs)


def test_ple_equals_libmtl(libmtl_arch):
    lib = _lib(libmtl_arch.PLE, _ResNetLike, num_experts=[2, 1, 1, 2])
    trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), *[m for _ in range(4) for m in (nn.Linear(5, 5), nn.Tanh())])
    ours = _ours(PLE(num_shared_experts=2, num_task_experts=[1, 1, 2]), trunk, lib)
    pairs = []
    for j in range(5):
        for i in range(2):
            pairs.append((ours.shared_experts[j][i][0], first_linear(lib.encoder.shared_layer[str(j)][i])))
        for t, k in enumerate([1, 1, 2]):
            pairs += [(ours.task_experts[j][t][e][0], first_linear(lib.encoder.specific_layer[str(j)][f"t{t}"][e]))
                      for e in range(k)]
            pairs.append((ours.gates[j][t], lib.encoder.gate_specific[f"t{t}"][j][0]))
    _compare(lib, ours, pairs)


def test_dselect_k_equals_libmtl(libmtl_arch):
    enc = lambda: MLP(4, [6], 5, activation_name="tanh")  # noqa: E731
    lib = _lib(libmtl_arch.DSelect_k, enc, num_experts=[4], num_nonzeros=2, kgamma=1.0)
    ours = _ours(DSelectK(num_experts=4, num_nonzeros=2, gamma=1.0), enc(), lib)
    # LibMTL builds its binary codes with np.array of '0'/'1' strings .astype(bool): every non-empty string is
    # True under numpy 2, so all its codes are 11..1 and every expert gets the same selector weight. The
    # paper's codes (expert e <-> the binary digits of e) are given to it here; then the two agree.
    lib._binary_codes = ours.codes.unsqueeze(0)
    with torch.no_grad():  # logits in the smooth step's sloped part, so that the selectors are not 0/1
        for t in range(3):
            lib._z_logits[f"t{t}"].weight.normal_(0, 0.3)
    pairs = [(ours.experts[i].net[j], lib.experts_shared[i].net[j]) for i in range(4) for j in (0, 2)]
    for t in range(3):
        pairs += [(ours.z_logits[t], lib._z_logits[f"t{t}"]), (ours.w_logits[t], lib._w_logits[f"t{t}"])]
    _compare(lib, ours, pairs)


# ----------------------------------------------------------------------------- configs
CONFIGS = ["mtl_omniglot_cgc", "mtl_omniglot_ple", "mtl_omniglot_dselect_k", "mtl_omniglot_ltb"]


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_expert_architecture_configs_run_through_the_cli(name, tmp_path, monkeypatch):
    from tasklight.cli import run_cli

    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", str(ROOT / "configs" / f"{name}.yaml"), "--trainer.max_steps", "3",
                   "--trainer.logger", "false", "--test_after_fit", "false", "--trainer.enable_progress_bar", "false",
                   "--trainer.num_sanity_val_steps", "0", "--data.init_args.batch_size_per_task", "2",
                   "--data.init_args.eval_batch_size", "64", "--trainer.limit_val_batches", "1",
                   "--trainer.val_check_interval", "3", "--model.init_args.trunk.init_args.hidden", "8"])
    assert cli.trainer.global_step == 3
    assert type(cli.model.architecture) is ARCHITECTURES[name[len("mtl_omniglot_"):]]
    assert "val/acc" in cli.trainer.callback_metrics
