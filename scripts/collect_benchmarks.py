"""Assemble BENCHMARKS.md from the results files the benchmark scripts write (docs/bench_*.md).

    python scripts/collect_benchmarks.py

The summary table lists every `SUMMARY ...` line found in the results files.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["bench_meta_step", "bench_meta_memory", "bench_meta_sinusoid", "bench_meta_omniglot", "bench_omniglot_race", "bench_multitask",
         "bench_taskmet", "bench_hlgauss", "bench_task2vec", "bench_task2vec_speed", "bench_gpu"]


def main() -> None:
    files = sorted((ROOT / "docs").glob("bench_*.md"), key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER
                                                                       else len(ORDER), p.stem))
    summaries = []
    for f in files:
        heading = ""
        for line in f.read_text().splitlines():
            if line.startswith("## "):
                heading = line[3:].strip()
            m = re.match(r"^\s*(SUMMARY .*)$", line)
            if m:
                summaries.append((f.stem, heading, m.group(1)))
    out = ["# Benchmarks", "",
           "Every figure here was produced by a script in `scripts/` (each has `--quick`), with the compared",
           "methods measured in the same run; ratios are against the alternative of that run. The machine and",
           "thread settings are given per section. CPU figures unless a section says GPU.", "",
           "Regenerate this file from the results files with `python scripts/collect_benchmarks.py`.", "",
           "## Summary lines", "", "| results file | run | summary |", "|---|---|---|"]
    out += [f"| [{stem}](docs/{stem}.md) | {run} | `{s}` |" for stem, run, s in summaries]
    out.append("")
    for f in files:
        text = re.sub(r"^(#+) ", r"#\1 ", f.read_text().strip(), flags=re.M)  # one level down
        out += [text, ""]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(out))
    print(f"wrote BENCHMARKS.md from {len(files)} results files, {len(summaries)} summary lines")


if __name__ == "__main__":
    main()
