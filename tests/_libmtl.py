"""LibMTL 1.1.5 as a test oracle: its submodules loaded without the package ``__init__`` (which imports
torchvision, absent from the test environment), and removed again afterwards."""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest


def libmtl_submodule(name: str):
    """Yield ``LibMTL.<name>`` (``weighting``, ``architecture``); skip the test when LibMTL is absent.
    Use as the body of a module-scoped fixture: ``yield from libmtl_submodule("weighting")``."""
    spec = importlib.util.find_spec("LibMTL")
    if spec is None:
        pytest.skip("LibMTL 1.1.5 is not installed (pip install --no-deps LibMTL==1.1.5)")
    saved = {k: v for k, v in sys.modules.items() if k == "LibMTL" or k.startswith("LibMTL.")}
    pkg = types.ModuleType("LibMTL")
    pkg.__path__ = [str(Path(spec.origin).parent)]
    sys.modules["LibMTL"] = pkg
    try:
        yield importlib.import_module(f"LibMTL.{name}")
    finally:
        for k in [k for k in sys.modules if k == "LibMTL" or k.startswith("LibMTL.")]:
            del sys.modules[k]
        sys.modules.update(saved)
