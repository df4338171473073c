"""The guides in docs/guides run: every ```python block of a guide, in order, in one namespace."""
import re
import sys
import types
from pathlib import Path

import pytest

GUIDES = sorted((Path(__file__).resolve().parents[1] / "docs" / "guides").glob("*.md"))


def test_there_are_guides():
    assert {p.stem for p in GUIDES} >= {"episodic_datamodule", "weighting", "subclass_learner"}


@pytest.mark.slow
@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.stem)
def test_guide_examples_run(guide, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", guide.read_text(), flags=re.S)
    assert blocks, f"{guide.name} has no python example"
    module = types.ModuleType(f"guide_{guide.stem}")  # importable, as a user's module would be
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for code in blocks:
        exec(compile(code, str(guide), "exec"), module.__dict__)  # noqa: S102 - our own documentation
