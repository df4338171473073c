"""Helpers shared by the meta-learning benchmark scripts (``bench_meta_step.py``, ``bench_memory.py``,
``reproduce_sinusoid.py``, ``bench_omniglot.py``): thread settings, the machine line, markdown tables,
robust timing summaries and the per-mode sections of ``docs/bench_meta_<name>.md``.
"""
from __future__ import annotations

import datetime
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def set_threads(n: int) -> None:
    """Intra-op threads for this process (1 by default in every benchmark: the cores are shared)."""
    torch.set_num_threads(n)


def machine(threads: int) -> str:
    """One line describing where the numbers were measured."""
    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)}; CPU side {threads} intra-op thread(s)"
    cores = os.cpu_count() or 0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"CPU, {cores} cores shared, {threads} intra-op thread{'s' if threads != 1 else ''} "
            f"(load average {load:.1f} at the start)")


def command_line() -> str:
    """The exact command that produced a section (relative script path, original arguments)."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(REPO)
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def quartiles(xs: Sequence[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def write_section(name: str, title: str, intro: str, section: str, body: str, path: Path | None = None) -> Path:
    """Create or refresh ``docs/bench_meta_<name>.md`` (or ``path``): one ``## section`` per run mode.

    The file starts with ``# title`` and ``intro``; each mode (e.g. ``--quick`` and the default run)
    owns the text between its markers, so a quick run does not erase the numbers of a longer one.
    """
    path = path or DOCS / f"bench_meta_{name}.md"
    begin, end = f"<!-- section: {section} -->", f"<!-- end section: {section} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    sections: list[str] = []
    if path.exists():
        sections = re.findall(r"<!-- section: .*? -->.*?<!-- end section: .*? -->", path.read_text(), flags=re.S)
    replaced = False
    for i, s in enumerate(sections):
        if s.startswith(begin):
            sections[i], replaced = block, True
    if not replaced:
        sections.append(block)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\n{intro.strip()}\n\n" + "\n\n".join(sections) + "\n")
    return path


def today() -> str:
    return datetime.date.today().isoformat()
