"""The benchmark scripts' own logic under their protocols: Omniglot meta-learning test alphabets disjoint
from the training alphabets, Task2Vec's leave-one-alphabet-out zoo and drawer split, HL-Gauss's tuning
refusing a learning rate on the edge of its grid."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tasklight.data.omniglot import load_omniglot
from tasklight.protocol import ProtocolError, load_protocol

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))  # as `python scripts/x.py` does: the scripts share helpers
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_omniglot_test_alphabets_are_disjoint_from_training():
    bench = _script("bench_omniglot")
    proto = load_protocol(bench.PROTOCOL)
    dm = bench.datamodule(proto, 0, "test", 1, 10)
    dm.setup()
    data = dm.data
    alphabets = {k: {data.alphabets[int(data.character_alphabet[c])] for c in chars} for k, chars in dm.splits.items()}
    assert alphabets["test"] == set(proto.extra["split"]["test_alphabets"])
    assert not alphabets["train"] & alphabets["test"] and not alphabets["val"] & alphabets["test"]
    assert not alphabets["train"] & alphabets["val"]
    # Greek and Latin occur in both shipped zips: each is one alphabet, all its characters on one side
    for name in ("Greek", "Latin"):
        sides = {k for k, a in alphabets.items() if name in a}
        assert len(sides) == 1, (name, sides)
    chars = {k: set(v) for k, v in dm.splits.items()}
    assert not chars["train"] & chars["test"] and sum(map(len, chars.values())) == data.num_characters


def test_task2vec_zoo_excludes_the_held_out_alphabet_and_drawers_are_disjoint():
    bench = _script("bench_task2vec")
    names = load_omniglot().alphabets
    pairs = bench.leave_one_out(names)
    assert [h for h, _ in pairs] == names
    for held, cands in pairs:
        assert held not in cands and sorted(cands + [held]) == sorted(names)
    for seed in range(3):
        zoo, train, test = bench.drawer_split(seed, 10, 5, 5)
        parts = [set(zoo.tolist()), set(train.tolist()), set(test.tolist())]
        assert [len(p) for p in parts] == [10, 5, 5] and len(set().union(*parts)) == 20
    assert not (bench.drawer_split(0, 10, 5, 5)[0] == bench.drawer_split(1, 10, 5, 5)[0]).all()
    with pytest.raises(ValueError, match="at most 20"):
        bench.drawer_split(0, 10, 6, 5)


def test_hlgauss_tuning_picks_the_lowest_validation_and_refuses_an_edge():
    bench = _script("bench_hlgauss")
    inside = {("d", "mse"): {1e-3: 2.0, 3e-3: 1.0, 1e-2: 1.5}, ("d", "hlgauss"): {1e-3: 3.0, 3e-3: 1.0, 1e-2: 2.0}}
    assert bench.tune(inside, "p.yaml") == {("d", "mse"): 3e-3, ("d", "hlgauss"): 3e-3}
    edge = {**inside, ("e", "hlgauss"): {1e-3: 0.5, 3e-3: 1.0, 1e-2: 2.0}}
    with pytest.raises(ProtocolError, match="lr of hlgauss on e.*edge of the grid"):
        bench.tune(edge, "p.yaml")
    assert bench.tune(edge, "p.yaml", strict=False)[("e", "hlgauss")] == 1e-3  # smoke runs only


def test_collect_benchmarks_reads_each_runs_command_protocol_seeds_and_interval():
    collect = _script("collect_benchmarks")
    text = """# Title

Command: `python scripts/a.py`  
Date: 2026-12-08  
Machine: CPU, 2 cores, 1 thread; total time 5 s

## Run one

```
SUMMARY delta_m=1.00 ci95=2.00 delta_m_last=0.50 ci95_last=1.50 seeds=5 protocol=0123456789ab
```

## Run two

Command: `python scripts/a.py --other`  
SUMMARY speed=1.05
"""
    one, two = collect.summary_rows(text)
    assert one == {"run": "Run one", "command": "python scripts/a.py", "date": "2026-12-08",
                   "machine": "CPU, 2 cores, 1 thread", "protocol": "0123456789ab", "seeds": "5",
                   "interval": "ci95=2.00, ci95_last=1.50",
                   "summary": "SUMMARY delta_m=1.00 ci95=2.00 delta_m_last=0.50 ci95_last=1.50 seeds=5 "
                              "protocol=0123456789ab"}
    assert two["command"] == "python scripts/a.py --other" and two["protocol"] == "-" and two["interval"] == "-"
