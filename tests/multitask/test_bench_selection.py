"""The Omniglot multi-task benchmark's model selection and statistics (scripts/bench_mtl_omniglot.py).

The benchmark reports each model's test accuracy at its best validation step; these tests retrain the same
model from the same seed for exactly the selected number of steps and check that the reported accuracies
are that model's, for one checkpoint per model (multi-task) and one per task (single-task networks)."""
from __future__ import annotations

import functools
import importlib.util
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import TensorDataset

from tasklight.data.multitask import MultiTaskDataModule
from tasklight.multitask.architectures import HardSharing, SoftSharing
from tasklight.multitask.module import MultiTaskModule
from tasklight.nn.nets import MLP

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))  # as `python scripts/x.py` does: the scripts share _bench.py
    spec = importlib.util.spec_from_file_location("bench_mtl_omniglot", ROOT / "scripts" / "bench_mtl_omniglot.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sets(T, n, seed, d=4, classes=3, noise=1.5):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(T, d, classes, generator=torch.Generator().manual_seed(99))
    out = []
    for t in range(T):
        x = torch.randn(n, d, generator=gen)
        y = (x @ w[t] + noise * torch.randn(n, classes, generator=gen)).argmax(1)
        out.append(TensorDataset(x, y))
    return out


def _dm(T=3):
    return MultiTaskDataModule(train_sets=_sets(T, 12, 0), val_sets=_sets(T, 40, 1), test_sets=_sets(T, 60, 2),
                               batch_size_per_task=4, steps_per_epoch=3, eval_batch_size=32)


def _model(arch):
    return MultiTaskModule(MLP(4, [16], 16), architecture=arch,
                           optimizer=functools.partial(torch.optim.Adam, lr=0.05))


def _test_acc_after(arch_factory, steps, bench):
    seed_everything(0)
    dm, model = _dm(), _model(arch_factory())
    Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0).fit(model, dm)
    return bench.task_accuracies(model, dm.test_dataloader())


@pytest.mark.parametrize("stl", [False, True])
def test_reported_accuracy_is_the_models_at_the_selected_step(bench, stl):
    arch = (lambda: SoftSharing(penalty=0.0)) if stl else HardSharing
    seed_everything(0)
    dm, model = _dm(), _model(arch())
    torch.set_num_threads(1)
    steps, every = 24, 3
    out, _ = bench.train_and_select(model, dm, steps, every)
    assert out["steps"] == list(range(every, steps + 1, every))
    val = out["val"]  # [evaluations][tasks]
    # the selected step is the first best step of the mean validation accuracy over tasks, for STL too
    means = [statistics.fmean(v) for v in val]
    expect = [out["steps"][max(range(len(means)), key=lambda k: (means[k], -k))]] * 3
    assert out["selected_step"] == expect
    assert len(set(means)) > 1  # the validation curve moves, so selection means something
    # an independent run of exactly that many steps has those test accuracies (and the last step's)
    assert out["test_selected"] == pytest.approx(_test_acc_after(arch, expect[0], bench), abs=1e-6)
    assert out["test_last"] == pytest.approx(_test_acc_after(arch, steps, bench), abs=1e-6)


def test_one_selection_rule_for_every_arm(bench):
    """STL and every multi-task arm of the protocol (and every other architecture x weighting) select alike."""
    proto = bench.load_protocol(bench.PROTOCOL)
    assert proto.arms[0] == "stl" and proto.selection["granularity"] == "model"
    arms = list(proto.arms) + [f"{a}/{w}" for a in bench.ARCHITECTURES for w in bench.WEIGHTINGS]
    assert {bench.selection_rule(a) for a in arms} == {bench.selection_rule("stl")}
    with pytest.raises(ValueError, match="architectures are"):
        bench.selection_rule("nope/equal")


def test_paired_delta_m_and_t_interval(bench):
    stl = [[0.5, 0.25], [0.4, 0.2]]
    mtl = [[0.6, 0.25], [0.4, 0.3]]
    # seed 0: (+20 % + 0 %) / 2 = 10 %; seed 1: (0 % + 50 %) / 2 = 25 %
    assert bench.paired_delta_m(mtl, stl) == pytest.approx([10.0, 25.0])
    with pytest.raises(ValueError, match="same seeds and tasks as STL"):
        bench.paired_delta_m([[0.6, 0.25]], stl)
    stats = bench.delta_m_stats(mtl, stl)
    assert stats["mean"] == pytest.approx(17.5)
    # t interval of the two per-seed values: t_{0.975,1} * std / sqrt(2)
    assert stats["ci95"] == pytest.approx(12.706205 * statistics.stdev([10.0, 25.0]) / math.sqrt(2), rel=1e-5)
