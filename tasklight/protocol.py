"""Pre-registered benchmark protocols: one YAML file per comparison, read by its script.

A protocol fixes a comparison before it is run: the arms; tuning seeds and test seeds (disjoint); each
arm's tuning grid, with the same number of configurations for every arm; one model-selection rule for
every arm; the step budget; and the statistics (paired differences over test seeds, Holm's correction
when one table compares many arms). A benchmark script loads its protocol with :func:`load_protocol`,
prints ``protocol=<hash>`` (the first 12 hex digits of the file's SHA-256) in its SUMMARY line and
writes it into its results file, so a result names the exact protocol it was run under.

The file's keys::

    name: mtl_omniglot                # the comparison
    arms: [stl, hard/equal, ...]      # what is compared
    baseline: stl                     # the arm the others are paired against (optional)
    tuning_seeds: [100, 101, 102]     # seeds used to choose each arm's configuration
    test_seeds: [0, 1, 2, 3, 4]       # seeds of the reported numbers; disjoint from tuning_seeds
    grid:                             # per arm (or `all:` for every arm), the same count per arm
      all: [{lr: 0.001}, {lr: 0.003}, {lr: 0.01}]
    selection:                        # one rule for every arm
      rule: last_step                 # or best_validation (then also validation_size and ties)
    budget: {steps: 300}              # equal steps per arm
    min_test_seeds_reason: ...        # only to run 3 test seeds: why one run is too expensive

Example:

>>> import tempfile, pathlib
>>> text = '''
... name: demo
... arms: [a, b]
... tuning_seeds: [100]
... test_seeds: [0, 1, 2, 3, 4]
... grid: {all: [{lr: 0.1}, {lr: 1.0}]}
... selection: {rule: last_step}
... budget: {steps: 10}
... '''
>>> path = pathlib.Path(tempfile.mkdtemp()) / "demo.yaml"
>>> _ = path.write_text(text)
>>> p = load_protocol(path)
>>> p.grid_for("b"), len(p.hash)
([{'lr': 0.1}, {'lr': 1.0}], 12)
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import yaml

from tasklight.metrics import paired_t_ci95

MIN_TEST_SEEDS = 5
SELECTION_RULES = ("last_step", "best_validation")
_REQUIRED = ("name", "arms", "tuning_seeds", "test_seeds", "selection", "budget")


class ProtocolError(ValueError):
    """A protocol file that does not fix a fair comparison."""


@dataclass(frozen=True)
class Protocol:
    """A loaded protocol; see the module docstring for the file's keys."""

    path: Path
    hash: str
    name: str
    arms: tuple[str, ...]
    tuning_seeds: tuple[int, ...]
    test_seeds: tuple[int, ...]
    selection: Mapping[str, Any]
    budget: Mapping[str, Any]
    grid: Mapping[str, list] = field(default_factory=dict)
    baseline: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def grid_for(self, arm: str) -> list:
        """The tuning configurations of ``arm`` (``[{}]``, a single default, when the file has no grid)."""
        if arm not in self.arms:
            raise ProtocolError(f"{self.path.name}: no arm {arm!r}; the arms are {list(self.arms)}")
        if arm in self.grid:
            return list(self.grid[arm])
        if "all" in self.grid:
            return list(self.grid["all"])
        return [{}]

    @property
    def summary(self) -> str:
        """``seeds=<n> protocol=<hash>``: the part of a SUMMARY line every script prints."""
        return f"seeds={len(self.test_seeds)} protocol={self.hash}"

    def describe(self) -> list[str]:
        """Markdown lines for a results file: the protocol's path, hash, seeds, selection and budget."""
        sel = ", ".join(f"{k}={v}" for k, v in self.selection.items())
        budget = ", ".join(f"{k}={v}" for k, v in self.budget.items())
        return [
            f"Protocol: `{self.path.name}` (sha256 {self.hash}), committed before the test run.  ",
            f"Arms: {', '.join(self.arms)}.  ",
            f"Tuning seeds {list(self.tuning_seeds)}; test seeds {list(self.test_seeds)}; "
            f"{len(self.grid_for(self.arms[0]))} configuration(s) per arm; selection: {sel}; budget: {budget}.",
            "",
        ]


def protocol_hash(path: str | Path) -> str:
    """The first 12 hex digits of the SHA-256 of the file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def load_protocol(path: str | Path) -> Protocol:
    """Read and check a protocol file; a file that does not fix a fair comparison is a
    :class:`ProtocolError` naming the key and the fix."""
    path = Path(path)
    if not path.is_file():
        raise ProtocolError(f"protocol file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ProtocolError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ProtocolError(f"{path}: expected a mapping of {', '.join(_REQUIRED)}")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ProtocolError(f"{path.name}: missing key(s) {missing}; a protocol fixes {', '.join(_REQUIRED)}")
    arms = tuple(str(a) for a in raw["arms"])
    if len(arms) < 2 or len(set(arms)) != len(arms):
        raise ProtocolError(f"{path.name}: arms must be at least two distinct names, got {list(arms)}")
    tuning, test = tuple(int(s) for s in raw["tuning_seeds"]), tuple(int(s) for s in raw["test_seeds"])
    both = sorted(set(tuning) & set(test))
    if both:
        raise ProtocolError(f"{path.name}: seeds {both} are both tuning and test seeds; make them disjoint")
    if len(set(test)) != len(test):
        raise ProtocolError(f"{path.name}: test_seeds repeat a seed: {list(test)}")
    floor = 3 if raw.get("min_test_seeds_reason") else MIN_TEST_SEEDS
    if len(test) < floor:
        raise ProtocolError(f"{path.name}: {len(test)} test seeds; at least {MIN_TEST_SEEDS} (3 only with "
                            f"min_test_seeds_reason saying why one run is too expensive)")
    selection = dict(raw["selection"] or {})
    rule = selection.get("rule")
    if rule not in SELECTION_RULES:
        raise ProtocolError(f"{path.name}: selection.rule is {rule!r}; use one of {SELECTION_RULES} (one rule for every arm)")
    if rule == "best_validation" and not {"validation_size", "ties"} <= selection.keys():
        raise ProtocolError(f"{path.name}: selection rule best_validation needs validation_size and ties "
                            f"(the same for every arm)")
    budget = dict(raw["budget"] or {})
    if not budget:
        raise ProtocolError(f"{path.name}: budget is empty; give the equal step budget of every arm (budget: {{steps: N}})")
    grid = dict(raw.get("grid") or {})
    unknown = sorted(set(grid) - set(arms) - {"all"})
    if unknown:
        raise ProtocolError(f"{path.name}: grid names {unknown}, which are not arms {list(arms)}")
    baseline = raw.get("baseline")
    if baseline is not None and baseline not in arms:
        raise ProtocolError(f"{path.name}: baseline {baseline!r} is not one of the arms {list(arms)}")
    extra = {k: v for k, v in raw.items() if k not in (*_REQUIRED, "grid", "baseline")}
    p = Protocol(path=path, hash=protocol_hash(path), name=str(raw["name"]), arms=arms, tuning_seeds=tuning,
                 test_seeds=test, selection=selection, budget=budget, grid=grid, baseline=baseline, extra=extra)
    sizes = {arm: len(p.grid_for(arm)) for arm in arms}
    if len(set(sizes.values())) != 1:
        raise ProtocolError(f"{path.name}: tuning grids differ in size {sizes}; give every arm the same number "
                            f"of configurations")
    return p


def check_bracketed(values: Sequence[float], best: float, setting: str) -> None:
    """Refuse a tuned numeric setting whose best value lies on the edge of its grid: the grid must be
    extended before testing. A one-value grid is not tuned and passes."""
    vals = sorted(set(float(v) for v in values))
    if len(vals) > 1 and float(best) in (vals[0], vals[-1]):
        raise ProtocolError(f"{setting}: the best value {best} is on the edge of the grid {vals}; extend the "
                            f"grid beyond it in the protocol before the test run")


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Mean difference ``a - b`` over the same test seeds, its 95 % t interval and paired-t p-value."""
    r = paired_t_ci95(torch.tensor(list(a), dtype=torch.float64), torch.tensor(list(b), dtype=torch.float64))
    return {k: float(v) for k, v in r.items()}


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1); NaN stays NaN.

    >>> holm({"a": 0.01, "b": 0.04, "c": 0.03})
    {'a': 0.03, 'b': 0.06, 'c': 0.06}
    """
    finite = sorted(((p, k) for k, p in pvalues.items() if p == p), key=lambda t: t[0])
    m = len(finite)
    out: dict[str, float] = {k: float("nan") for k, p in pvalues.items() if p != p}
    running = 0.0
    for i, (p, k) in enumerate(finite):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = round(running, 12)
    return {k: out[k] for k in pvalues}


__all__ = ["Protocol", "ProtocolError", "MIN_TEST_SEEDS", "SELECTION_RULES", "load_protocol", "protocol_hash",
           "check_bracketed", "paired", "holm"]
