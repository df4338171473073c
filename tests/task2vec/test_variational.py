"""The variational Fisher against its closed-form stationary point, the two estimators against each
other, the trivial embedding it defines, probes (rotation-augmented Omniglot, pretrained image
models) and the fine-tuning error."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tasklight.nn.nets import Conv4
from tasklight.task2vec import (ImageTransform, Task2Vec, TaskEmbedding, asymmetric_distance, distance_matrix,
                                finetune_error, fisher_diagonal, omniglot_probe, rank_experts, symmetric_distance,
                                transfer_error, trivial_embedding, variational_fisher)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float(ra @ rb / (ra.norm() * rb.norm()))


def hessian_diagonal(model: nn.Module, weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Diagonal of the Hessian of the mean cross-entropy w.r.t. ``weight``, one double backward per entry."""
    loss = F.cross_entropy(model(x), y)
    (g,) = torch.autograd.grad(loss, weight, create_graph=True)
    flat = g.reshape(-1)
    diag = torch.zeros(flat.numel(), dtype=torch.float64)
    for i in range(flat.numel()):
        (h,) = torch.autograd.grad(flat[i], weight, retain_graph=True)
        diag[i] = h.reshape(-1)[i]
    return diag.reshape(weight.shape)


@pytest.mark.slow
def test_variational_fisher_reaches_its_closed_form_stationary_point():
    """For a linear layer the local reparametrisation is exact, so the objective's stationary point is
    ``1 / sigma_f^2 = mean_{i in f} H_ii / (2 beta) + 1 / lambda^2`` and ``lambda^2 = (sum w^2 + sum
    sigma^2) / k``, with H the Hessian of the mean cross-entropy (computed here by double backward)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(2048, 5)
    y = torch.randint(0, 3, (2048,))
    beta = 1e-4  # small enough for the second-order expansion (weight noise ~ 0.1 x the weights)
    vf = variational_fisher(model, x, y, ["0"], beta=beta, steps=2000, lr=1e-2, batch_size=2048,
                            generator=torch.Generator().manual_seed(1))
    w = model[0].weight.detach().clone().requires_grad_(True)
    probe = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), model[2])
    with torch.no_grad():
        probe[0].bias.copy_(model[0].bias)
    probe[0].weight = nn.Parameter(w)
    h = hessian_diagonal(probe, probe[0].weight, x, y).mean(1)  # per-filter (output unit) mean
    prior = vf.prior_precision["0"].double()
    want = h / (2 * beta) + prior
    got = vf.precision["0"].double()
    assert got.shape == (4,)
    torch.testing.assert_close(got, want, rtol=0.15, atol=0.0)
    sigma2 = 1 / got
    lam2 = (w.detach().double().pow(2).sum() + 5 * sigma2.sum()) / w.numel()
    torch.testing.assert_close(1 / prior, lam2, rtol=0.05, atol=0.0)
    # the objective went down from its initial value
    assert sum(vf.losses[-50:]) / 50 < sum(vf.losses[:10]) / 10


@pytest.mark.slow
def test_variational_embedding_agrees_with_monte_carlo_on_the_same_probe():
    torch.manual_seed(0)
    probe = Conv4(out_features=4, hidden=8, image_size=16)
    x = torch.rand(80, 1, 16, 16)
    y = torch.arange(80) % 4
    # beta for a small probe (its Fisher per weight is large; see docs/task2vec.md, Choosing beta)
    var = Task2Vec(probe, method="variational", beta=1e-4, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # settled: no drift warning
        e = var.embed((x, y), "t")
    assert e.vector.shape == (32,) and (e.vector > 0).all() and e.meta["method"] == "variational"
    assert e.scale is not None and e.scale.shape == (32,)
    for layer, lo in zip(e.layers, (0, 8, 16, 24)):  # one prior precision per layer
        assert torch.all(e.scale[lo: lo + 8] == e.scale[lo])
    torch.testing.assert_close(var.embed((x, y)).vector, e.vector)  # reproducible with its seed
    exact = Task2Vec(probe, exact=True).embed((x, y))
    # both estimate the per-filter Fisher: precision - prior ~ F / (2 beta) up to the Hessian/Fisher gap
    signal = (e.vector - e.scale).clamp_min(0)
    assert spearman(signal, exact.vector) > 0.6
    # the paper's beta = 1e-7 is far from settled on this probe in 200 steps, and says so
    with pytest.warns(UserWarning, match="still moving"):
        Task2Vec(probe, method="variational", variational_steps=40).embed((x, y))
    with pytest.raises(ValueError, match="exact=True"):
        Task2Vec(probe, method="variational", exact=True)
    with pytest.raises(ValueError, match="method must be"):
        Task2Vec(probe, method="laplace")
    with pytest.raises(ValueError, match="beta must be > 0"):
        variational_fisher(probe, x, y, ["features.0.0"], beta=0.0)
    with pytest.raises(ValueError, match="is a BatchNorm2d"):
        variational_fisher(probe, x, y, ["features.0.1"])


def test_trivial_embedding_of_a_variational_embedding_is_its_prior():
    layers, sizes = ["a", "b"], [2, 3]
    scale = torch.tensor([2.0, 2.0, 5.0, 5.0, 5.0])
    informative = TaskEmbedding(torch.tensor([40.0, 2.5, 90.0, 5.2, 60.0]), layers, sizes, "x", scale=scale)
    t0 = trivial_embedding(informative)
    assert torch.equal(t0.vector, scale) and torch.equal(t0.scale, scale)
    # the posterior equal to the prior is the trivial task; a source far from it is brought closer
    uninformative = TaskEmbedding(scale * 1.01, layers, sizes, "u", scale=scale)
    target = TaskEmbedding(torch.tensor([10.0, 10.0, 10.0, 10.0, 10.0]), layers, sizes, "t", scale=scale)
    for src in (informative, uninformative):
        want = symmetric_distance(src, target) - 0.15 * symmetric_distance(src, scale)
        assert asymmetric_distance(src, target, alpha=0.15) == pytest.approx(want, rel=1e-9)
    ranking = rank_experts(target, {"i": informative, "u": uninformative}, alpha=0.15)
    assert ranking.distances == pytest.approx(sorted(asymmetric_distance(s, target) for s in
                                                     (informative, uninformative)))
    m = distance_matrix([informative, uninformative, target], "asymmetric", alpha=0.15)
    assert float(m[0, 2]) == pytest.approx(asymmetric_distance(informative, target), rel=1e-6)
    # Monte-Carlo embeddings (no prior): the isotropic Fisher at the source's own layer means
    mc = TaskEmbedding(torch.tensor([1.0, 3.0, 4.0, 0.0, 2.0]), layers, sizes)
    torch.testing.assert_close(trivial_embedding(mc).vector, torch.tensor([2.0, 2.0, 2.0, 2.0, 2.0]))


@pytest.mark.slow
def test_omniglot_probe_classifies_characters_in_four_rotations():
    from tasklight.data.omniglot import load_omniglot

    data = load_omniglot()
    m = data.image_alphabet == data.alphabets.index("Greek")
    m &= data.image_character < data.image_character[m].min() + 6  # six characters
    x, y = data.images[m].float().div(255).unsqueeze(1), data.image_character[m]
    probe = omniglot_probe(x, y, hidden=16, epochs=8, seed=0)
    assert probe.head.out_features == 24
    _, ids = torch.unique(y, return_inverse=True)
    with torch.no_grad():
        for k in range(4):
            pred = probe(torch.rot90(x, k, dims=(2, 3))).argmax(-1)
            assert (pred == ids + 6 * k).float().mean() > 0.5  # chance is 1/24
    with pytest.raises(ValueError, match="rotations must be"):
        omniglot_probe(x, y, rotations=5)


class TinyResNet(nn.Module):
    """The layout of a torchvision ResNet: nested blocks, BatchNorm with running statistics,
    in-place ReLU, global pooling, a final ``fc``."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = x + self.layer1(x)
        return self.fc(self.pool(x).flatten(1))


def test_a_pretrained_style_image_probe_with_its_input_transform():
    torch.manual_seed(0)
    net = TinyResNet().eval()
    with torch.no_grad():  # running statistics as a trained network has them
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    transform = ImageTransform(3, size=32)
    x1 = torch.rand(40, 1, 16, 16)
    y = torch.arange(40) % 4
    out = transform(x1)
    assert out.shape == (40, 3, 32, 32)
    torch.testing.assert_close(out[:, 1], (F.interpolate(x1, size=(32, 32), mode="bilinear")[:, 0] - 0.456) / 0.224)
    for method in ("montecarlo", "variational"):
        t2v = Task2Vec(net, input_transform=transform, bn_stats="probe", method=method, variational_steps=20)
        assert t2v.adapter.head_path == "fc" and t2v.layers == ["conv1", "layer1.0"]
        e = t2v.embed((x1, y))
        assert e.vector.shape == (16,) and (e.vector > 0).all()
    # transfer_error applies the same transform
    assert 0.0 <= transfer_error(net, (x1, y), (x1, y), input_transform=transform) <= 1.0
    with pytest.raises(ValueError, match="2 channels but the probe expects 3"):
        transform(torch.rand(2, 2, 8, 8))
    with pytest.raises(TypeError, match="input_transform must be callable"):
        Task2Vec(net, input_transform="resize")


def test_pretrained_probe_builds_torchvision_models():
    torchvision = pytest.importorskip("torchvision")
    from tasklight.task2vec import pretrained_probe

    net, transform = pretrained_probe("torchvision:resnet18", weights=None, size=32)
    assert isinstance(net, torchvision.models.ResNet) and not net.training
    t2v = Task2Vec(net, input_transform=transform, bn_stats="probe", layers=["layer4.1.conv2"], exact=False)
    assert t2v.adapter.head_path == "fc"
    e = t2v.embed((torch.rand(6, 1, 28, 28), torch.arange(6) % 2))
    assert e.vector.shape == (512,)
    with pytest.raises(ValueError, match="'torchvision:<model>' or 'timm:<model>'"):
        pretrained_probe("resnet18")


@pytest.mark.slow
def test_finetune_error_improves_on_the_frozen_head_and_needs_init_from_scratch():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(120) % 3
    x = torch.randn(120, 4, generator=g)
    x[:, 0] += 2.0 * (y - 1).float()  # the class is in feature 0
    expert = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        expert[0].weight.copy_(torch.eye(4)[[1, 2, 3, 3]])  # features that miss feature 0
        expert[0].bias.zero_()
    tr, te = (x[:60], y[:60]), (x[60:], y[60:])
    frozen = transfer_error(expert, tr, te)
    assert finetune_error(expert, tr, te, steps=0) == frozen
    tuned = finetune_error(expert, tr, te, steps=300, lr=3e-2)
    assert frozen > 0.45 and tuned < frozen - 0.2
    with pytest.raises(ValueError, match="needs `init`"):
        finetune_error(None, tr, te)
    scratch = finetune_error(None, tr, te, steps=300, lr=3e-2, init=lambda: nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
    assert scratch < 0.3
    # the exact Monte-Carlo machinery is untouched by the variational one
    assert set(fisher_diagonal(expert, x, ["0.weight"], exact=True)) == {"0.weight"}
