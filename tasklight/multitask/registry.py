"""The one registry of loss-weighting methods: the CLI's short names, the docs' method table and the
scripts read it.

A method registers itself with a decorator::

    @register_weighting("gradvac", paper="Wang et al. (2021), Gradient Vaccine",
                        reference="torchjd GradVacWeighting; LibMTL GradVac",
                        parity="tests/multitask/test_torchjd_parity.py::test_gradvac")
    class GradVac(Weighting): ...

``tasklight.weightings()`` returns the registered methods by short name; ``weighting_class(name)``
finds a class by its short name or class name. Every entry has a toy config
``configs/mtl_toy_<name>.yaml``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

__all__ = ["WeightingEntry", "register_weighting", "weightings", "weighting_class", "method_table"]


@dataclass(frozen=True)
class WeightingEntry:
    """One registered method.

    Attributes:
        name: the short name (``configs/mtl_toy_<name>.yaml``, ``weighting_class(name)``).
        cls: the :class:`~tasklight.multitask.weighting.Weighting` subclass.
        paper: the paper that defines the method.
        reference: the reference implementation(s) it is checked against, or how it is checked.
        parity: the test that checks it (``path::test``).
    """

    name: str
    cls: type
    paper: str
    reference: str
    parity: str

    @property
    def config(self) -> str:
        return f"configs/mtl_toy_{self.name}.yaml"


_REGISTRY: dict[str, WeightingEntry] = {}


def register_weighting(name: str, *, paper: str, reference: str, parity: str) -> Callable[[type], type]:
    """Class decorator: register a Weighting under the short ``name``."""
    if not name.isidentifier() or name != name.lower():
        raise ValueError(f"a weighting's short name must be a lower-case identifier, got {name!r}")

    def deco(cls: type) -> type:
        old = _REGISTRY.get(name)
        if old is not None and old.cls is not cls:
            raise ValueError(f"the weighting name {name!r} is already registered for {old.cls.__qualname__}")
        _REGISTRY[name] = WeightingEntry(name, cls, paper, reference, parity)
        return cls

    return deco


def weightings() -> dict[str, WeightingEntry]:
    """Every registered loss-weighting method, by short name (sorted)."""
    import tasklight.multitask.weightings  # noqa: F401  (registers the methods)

    return dict(sorted(_REGISTRY.items()))


def weighting_class(name: str) -> type:
    """The Weighting class registered as ``name`` (a short name such as ``"gradvac"``, or a class name)."""
    entries = weightings()
    if name in entries:
        return entries[name].cls
    for entry in entries.values():
        if entry.cls.__name__ == name:
            return entry.cls
    raise KeyError(f"no weighting method named {name!r}; the registered ones are {sorted(entries)} "
                   f"(see tasklight.weightings())")


def method_table() -> str:
    """The Markdown table of docs/multitask.md, generated from the registry."""
    rows = ["| name | class | paper | reference implementation | parity test |", "|---|---|---|---|---|"]
    for e in weightings().values():
        rows.append(f"| `{e.name}` | `{e.cls.__module__}.{e.cls.__name__}` | {e.paper} | {e.reference} | "
                    f"`{e.parity}` |")
    return "\n".join(rows)


WEIGHTING_OPTION = "--model.init_args.weighting"


def expand_weighting_names(args: list[str]) -> list[str]:
    """Command-line arguments with a registered short name after ``--model.init_args.weighting``
    (``--model.init_args.weighting gradvac``) replaced by the method's class path; class names and
    class paths pass through (the CLI resolves them itself)."""
    out = list(args)
    for i, a in enumerate(out):
        if a == WEIGHTING_OPTION and i + 1 < len(out):
            j, value, prefix = i + 1, out[i + 1], ""
        elif a.startswith(WEIGHTING_OPTION + "="):
            j, value, prefix = i, a.split("=", 1)[1], WEIGHTING_OPTION + "="
        else:
            continue
        if value.isidentifier() and value == value.lower():
            entries = weightings()
            if value not in entries:
                raise SystemExit(f"tasklight: {WEIGHTING_OPTION} {value!r} is not a registered weighting method; "
                                 f"choose one of {sorted(entries)} or give a class path")
            cls = entries[value].cls
            out[j] = f"{prefix}{cls.__module__}.{cls.__qualname__}"
    return out
