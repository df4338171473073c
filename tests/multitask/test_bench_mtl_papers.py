"""The synthetic (MMoE, GradNorm) and MultiFashion benchmarks' logic: the papers' data as the papers define
them, the statistics, the arms the protocols name, and a --smoke run of each script (slow)."""
from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scipy import stats

from tasklight.data import fashion as fm
from tasklight.multitask import WEIGHTINGS
from tasklight.protocol import load_protocol

ROOT = Path(__file__).resolve().parents[2]


def _script(name):
    sys.path.insert(0, str(ROOT / "scripts"))  # the scripts import their shared _bench module
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(ROOT / "scripts"))


@pytest.fixture(scope="module")
def synth():
    return _script("bench_mtl_synthetic")


@pytest.fixture(scope="module")
def fashion_bench():
    return _script("bench_mtl_multifashion")


@pytest.mark.parametrize("p", [1.0, 0.9, 0.5, 0.0])
def test_mmoe_task_correlation_is_the_cosine_of_the_weight_vectors(synth, p):
    w1, w2, alpha, beta = synth.mmoe_parameters(p, seed=3)
    assert float(w1.norm()) == pytest.approx(1.0) and float(w2.norm()) == pytest.approx(1.0)
    assert float(w1 @ w2) == pytest.approx(p, abs=1e-12)
    x, y, f = synth.mmoe_tasks(p, seed=3, n=4000)
    # the targets, recomputed from the parameters: w^T x + sum_i sin(alpha_i w^T x + beta_i)
    s = x.double() @ w2
    expect = s + sum(torch.sin(a * s + b) for a, b in zip(alpha, beta))
    assert torch.allclose(f[:, 1].double(), expect, atol=1e-4)
    assert float((y - f).var()) == pytest.approx(0.01, rel=0.1)  # noise N(0, 0.01)
    if p == 1.0:
        assert torch.equal(f[:, 0], f[:, 1])
    # the same seed gives the same inputs at every correlation
    assert torch.equal(x, synth.mmoe_tasks(0.3, seed=3, n=4000)[0])
    with pytest.raises(ValueError, match="between -1 and 1"):
        synth.mmoe_parameters(1.5, seed=0)


def test_gradnorm_tasks_share_a_basis_and_have_their_scales(synth):
    sigmas = [1.0, 10.0, 100.0]
    x, f = synth.gradnorm_tasks(sigmas, seed=0, n=500)
    assert x.shape == (500, 250) and f.shape == (500, 3, 100)
    for t, s in enumerate(sigmas):
        unit = f[:, t] / s
        assert float(unit.abs().max()) <= 1.0 and float(unit.abs().max()) > 0.99  # sigma_t tanh(.)
    # the tasks share B: their pre-activations are correlated (B has variance 10, eps_t 3.5)
    pre = torch.atanh((f[:, :, :] / torch.tensor(sigmas)[None, :, None]).clamp(-0.999999, 0.999999))
    r = torch.corrcoef(torch.stack([pre[:, 0].flatten(), pre[:, 1].flatten()]))[0, 1]
    assert 0.5 < float(r) < 0.95


def test_statistics_of_the_synthetic_benchmark(synth):
    a, b = [0.3, 1.2, -0.5, 2.0, 0.1, 0.7], [1.0, 0.2, 0.4, 3.0, -1.0, 0.5]
    assert synth.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)
    assert synth.gap_grows({1.0: 0.01, 0.9: 0.02, 0.5: 0.05})
    assert not synth.gap_grows({1.0: 0.01, 0.9: 0.03, 0.5: 0.02})


def test_the_synthetic_protocol_names_the_papers_settings():
    p = load_protocol(ROOT / "benchmarks" / "protocols" / "mtl_synthetic.yaml")
    assert p.extra["mmoe"]["correlations"] == [1.0, 0.9, 0.5] and len(p.test_seeds) >= 5
    sig = p.extra["gradnorm"]["sigmas"]
    assert sig[0] == 1.0 and sig[-1] == 100.0 and all(b > a for a, b in zip(sig, sig[1:]))


def test_multifashion_arms_cover_every_weighting_and_delta_m(fashion_bench):
    p = load_protocol(ROOT / "benchmarks" / "protocols" / "mtl_multifashion.yaml")
    parsed = [fashion_bench.parse_arm(a) for a in p.arms]
    hard = {w for arch, w in parsed if arch == "hard"}
    assert hard == set(WEIGHTINGS) - {"StaticWeighting"}  # equal weights is StaticWeighting's default
    assert {arch for arch, _ in parsed} == {"stl", "hard", "mmoe", "mtan", "cross_stitch"}
    assert p.baseline == "stl" and p.arms[0] == "stl"
    # Delta_m: the mean relative gain in percent
    assert fashion_bench.delta_m([0.8, 0.6], [0.5, 0.6]) == pytest.approx(100 * (0.3 / 0.5 + 0) / 2)
    with pytest.raises(ValueError, match="expected 'stl' or"):
        fashion_bench.parse_arm("hard/NoSuchWeighting")
    # the LeNet splits into three conv stages (MTAN, cross-stitch) and gives 50 features
    from tasklight.multitask import trunk_stages

    net = fashion_bench.LeNet()
    assert len(trunk_stages(net)) == 3 and net(torch.zeros(2, 1, 28, 28)).shape == (2, 50)


def _smoke(script, tmp_path):
    out = tmp_path / "out.md"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = [line for line in res.stdout.splitlines() if line.startswith("SUMMARY")]
    assert len(summary) == 1 and summary[0] in out.read_text()
    return summary[0]


@pytest.mark.slow
def test_bench_mtl_synthetic_smoke(tmp_path):
    line = _smoke("bench_mtl_synthetic.py", tmp_path)
    p = load_protocol(ROOT / "benchmarks" / "protocols" / "mtl_synthetic.yaml")
    for key in ("mmoe_gain_low_corr=", "ci95=", "gap_grows=", "gradnorm_over_equal=", "smoke=true", "seeds=2",
                f"protocol={p.hash}"):
        assert key in line
    assert math.isfinite(float(line.split("gradnorm_over_equal=")[1].split()[0]))


@pytest.mark.slow
@pytest.mark.skipif(not fm._has_files(fm.DEBIAN_FASHION_ROOT),
                    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_bench_mtl_multifashion_smoke(tmp_path):
    line = _smoke("bench_mtl_multifashion.py", tmp_path)
    p = load_protocol(ROOT / "benchmarks" / "protocols" / "mtl_multifashion.yaml")
    assert "method=" in line and "smoke=true" in line and f"protocol={p.hash}" in line


def test_toy_descent_records_the_trajectory():
    from tasklight.multitask import EqualWeighting
    from tasklight.multitask.toy import TOY_SCALES, TOY_STARTS, toy_descent, toy_objectives

    starts, scales = TOY_STARTS["cagrad"], TOY_SCALES["cagrad"]
    path: list = []
    x, final = toy_descent(EqualWeighting, starts, scales, steps=7, lr=0.1, trajectory=path)
    assert len(path) == 8 and torch.equal(path[-1], final)
    assert torch.allclose(path[0], toy_objectives(torch.tensor(starts, dtype=torch.float64), scales))
    x2, final2 = toy_descent(EqualWeighting, starts, scales, steps=7, lr=0.1)  # recording changes nothing
    assert torch.equal(x, x2) and torch.equal(final, final2)


@pytest.mark.slow
def test_plot_mtl_toy_writes_the_figure(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_mtl_toy.py"), "--steps", "5", "--settings",
                          "cagrad", "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "mtl_toy_cagrad.png").stat().st_size > 10_000
    assert len([line for line in res.stdout.splitlines() if "max_pareto_gap=" in line]) == len(WEIGHTINGS) - 1


def test_the_benchmarks_mmoe_equals_libmtls_on_the_same_weights(synth):
    """The implementation check of the MMoE experiment: LibMTL 1.1.5's MMoE, given our experts, gates and
    towers, computes the same outputs and the same expert gradients on MMoE's synthetic inputs."""
    import copy

    from _libmtl import libmtl_submodule

    loader = libmtl_submodule("architecture.MMoE")
    LibMMoE = next(loader).MMoE
    loader.close()  # LibMTL's modules leave sys.modules again; the class stays usable
    from tasklight.data.batch import TaskSpec
    from tasklight.multitask import MMoE, MultiTaskModule

    torch.manual_seed(0)
    expert = synth.ReLUNet(100, [16])
    expert.input_shape = (100,)  # built without a DataModule: the gates' input size
    ours = MultiTaskModule(expert, MMoE(num_experts=8), head_hidden=[8],
                           tasks=[TaskSpec("a", 1, "regression"), TaskSpec("b", 1, "regression")])
    arch = ours.architecture
    for g in arch.gates:  # away from the uniform initial mixture, so that the gates matter
        torch.nn.init.normal_(g.weight, std=0.3)
    experts = iter(copy.deepcopy(list(arch.experts)))
    theirs = LibMMoE(["a", "b"], lambda: next(experts), torch.nn.ModuleDict({"a": copy.deepcopy(arch.heads[0]),
                                                                               "b": copy.deepcopy(arch.heads[1])}),
                     rep_grad=False, multi_input=False, device="cpu", img_size=[100], num_experts=[8])
    with torch.no_grad():
        for t, name in enumerate(["a", "b"]):
            theirs.gate_specific[name][0].weight.copy_(arch.gates[t].weight)
            theirs.gate_specific[name][0].bias.copy_(arch.gates[t].bias)
    x, y, _ = synth.mmoe_tasks(0.5, seed=1, n=64)
    out_theirs = theirs(x)
    loss_ours = sum(((ours(x, t)[:, 0] - y[:, t]) ** 2).mean() for t in range(2))
    loss_theirs = sum(((out_theirs[n][:, 0] - y[:, t]) ** 2).mean() for t, n in enumerate(["a", "b"]))
    for t, name in enumerate(["a", "b"]):
        assert torch.allclose(ours(x, t), out_theirs[name], atol=1e-6)
    loss_ours.backward()
    loss_theirs.backward()
    for e_ours, e_theirs in zip(arch.experts, theirs.experts_shared):
        for p, q in zip(e_ours.parameters(), e_theirs.parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-5)
