"""Benchmark protocols: every committed file is a fair comparison, results quote the current file, and
the statistics agree with scipy."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from scipy import stats

from tasklight.protocol import ProtocolError, check_bracketed, holm, load_protocol, paired, protocol_hash

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = sorted((ROOT / "benchmarks" / "protocols").glob("*.yaml"))

GOOD = """
name: demo
arms: [a, b]
tuning_seeds: [100, 101]
test_seeds: [0, 1, 2, 3, 4]
grid: {all: [{lr: 0.1}, {lr: 1.0}]}
selection: {rule: last_step}
budget: {steps: 10}
"""


@pytest.mark.parametrize("path", PROTOCOLS, ids=[p.stem for p in PROTOCOLS])
def test_committed_protocol_is_fair(path):
    p = load_protocol(path)
    assert not set(p.tuning_seeds) & set(p.test_seeds)
    assert len({len(p.grid_for(a)) for a in p.arms}) == 1
    assert p.hash == protocol_hash(path)


def test_results_quote_the_current_protocol():
    """A results file that names a protocol hash names the committed file's current hash."""
    current = {protocol_hash(p) for p in PROTOCOLS}
    stale = []
    for doc in [ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("bench_*.md"))]:
        for h in re.findall(r"protocol=([0-9a-f]{12})", doc.read_text()):
            if h not in current:
                stale.append(f"{doc.name}: {h}")
    assert not stale, f"results under a protocol that is no longer committed (re-run them): {stale}"


def _write(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def test_good_protocol_loads(tmp_path):
    p = load_protocol(_write(tmp_path, GOOD))
    assert p.arms == ("a", "b") and p.grid_for("a") == [{"lr": 0.1}, {"lr": 1.0}]
    assert p.summary == f"seeds=5 protocol={p.hash}"


@pytest.mark.parametrize("change, message", [
    (("test_seeds: [0, 1, 2, 3, 4]", "test_seeds: [0, 1, 2, 3, 100]"), "both tuning and test seeds"),
    (("test_seeds: [0, 1, 2, 3, 4]", "test_seeds: [0, 1, 2]"), "at least 5"),
    (("grid: {all: [{lr: 0.1}, {lr: 1.0}]}", "grid: {a: [{lr: 0.1}, {lr: 1.0}], b: [{lr: 0.1}]}"), "differ in size"),
    (("selection: {rule: last_step}", "selection: {rule: best_validation}"), "validation_size and ties"),
    (("selection: {rule: last_step}", "selection: {rule: best_per_arm}"), "selection.rule"),
    (("arms: [a, b]", "arms: [a]"), "at least two"),
    (("budget: {steps: 10}\n", ""), "missing key"),
    (("grid: {all:", "grid: {c:"), "not arms"),
])
def test_unfair_protocol_is_refused(tmp_path, change, message):
    with pytest.raises(ProtocolError, match=message):
        load_protocol(_write(tmp_path, GOOD.replace(*change)))


def test_three_seeds_need_a_reason(tmp_path):
    text = GOOD.replace("test_seeds: [0, 1, 2, 3, 4]", "test_seeds: [0, 1, 2]")
    p = load_protocol(_write(tmp_path, text + "min_test_seeds_reason: one run takes 40 CPU-minutes\n"))
    assert len(p.test_seeds) == 3


def test_paired_interval_matches_scipy():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, generator=g, dtype=torch.float64)
    b = a + 0.3 + 0.2 * torch.randn(7, generator=g, dtype=torch.float64)
    r = paired(a.tolist(), b.tolist())
    ref = stats.ttest_rel(a.numpy(), b.numpy())
    lo, hi = ref.confidence_interval(0.95)
    assert r["mean"] == pytest.approx(float((a - b).mean()), abs=1e-12)
    assert r["ci95"] == pytest.approx((hi - lo) / 2, rel=1e-9)
    assert r["p"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert paired([1.0], [0.0])["ci95"] != paired([1.0], [0.0])["ci95"]  # NaN: one pair has no interval


def test_holm_against_hand_computed():
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == {"a": 0.03, "b": 0.06, "c": 0.06}
    assert holm({"a": 0.5, "b": 0.001}) == {"a": 0.5, "b": 0.002}
    out = holm({"a": float("nan"), "b": 0.2})
    assert out["b"] == 0.2 and out["a"] != out["a"]


def test_edge_of_grid_is_refused():
    check_bracketed([1e-3, 3e-3, 1e-2], 3e-3, "lr")
    with pytest.raises(ProtocolError, match="edge of the grid"):
        check_bracketed([1e-3, 3e-3, 1e-2], 1e-2, "lr")


def test_docstring_examples():
    import doctest

    import tasklight.metrics.functional
    import tasklight.protocol

    for mod in (tasklight.protocol, tasklight.metrics.functional):
        result = doctest.testmod(mod)
        assert result.attempted > 0 and result.failed == 0
