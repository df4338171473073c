"""Assemble BENCHMARKS.md from the results files the benchmark scripts write (docs/bench_*.md).

    python scripts/collect_benchmarks.py

The summary table lists every `SUMMARY ...` line found in the results files, each with the command,
protocol hash, seeds, interval, machine and date of its run (read from the run's section: the last
``Command:``, ``Date:`` and ``Machine:`` lines before the SUMMARY line; "-" where a run has none, e.g. a
speed benchmark without a protocol).
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["bench_meta_step", "bench_meta_memory", "bench_meta_sinusoid", "bench_meta_omniglot", "bench_omniglot_race", "bench_multitask",
         "bench_taskmet", "bench_hlgauss", "bench_task2vec", "bench_task2vec_speed", "bench_gpu"]


def _field(line: str, name: str) -> str | None:
    m = re.match(rf"^{name}:\s*(.*?)\s*$", line)
    return m.group(1).strip(" `") if m else None


def summary_rows(text: str) -> list[dict[str, str]]:
    """One row per SUMMARY line of a results file, with the run's heading, command, date and machine (the
    last ones before it) and the protocol hash, seeds and interval(s) the SUMMARY line names."""
    rows, ctx = [], {"run": "", "command": "-", "date": "-", "machine": "-"}
    for line in text.splitlines():
        if line.startswith("## "):
            ctx["run"] = line[3:].strip()
        for key, name in (("command", "Command"), ("date", "Date"), ("machine", "Machine")):
            value = _field(line, name)
            if value is not None:
                ctx[key] = value.split(";")[0] if key == "machine" else value
        m = re.match(r"^\s*(SUMMARY .*)$", line)
        if m:
            summary = m.group(1)
            kv = dict(re.findall(r"(\S+?)=(\S+)", summary))
            intervals = ", ".join(f"{k}={v}" for k, v in kv.items() if k.startswith("ci95")) or "-"
            rows.append({**ctx, "summary": summary, "protocol": kv.get("protocol", "-"), "seeds": kv.get("seeds", "-"),
                         "interval": intervals})
    return rows


def main() -> None:
    files = sorted((ROOT / "docs").glob("bench_*.md"), key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER
                                                                       else len(ORDER), p.stem))
    out = ["# Benchmarks", "",
           "Every figure here was produced by a script in `scripts/`, with the compared methods measured in the",
           "same run; ratios are against the alternative of that run. A comparison of methods runs under a",
           "protocol committed before its test run (`benchmarks/protocols/`, named by the hash of the file):",
           "arms, tuning and test seeds, one selection rule and equal steps for every arm. The machine and",
           "thread settings are given per row and section. CPU figures unless a section says GPU.", "",
           "Regenerate this file from the results files with `python scripts/collect_benchmarks.py`.", "",
           "## Summary lines", "",
           "| results file | run | command | protocol | seeds | interval | machine | date | summary |",
           "|---|---|---|---|---|---|---|---|---|"]
    n = 0
    for f in files:
        for r in summary_rows(f.read_text()):
            n += 1
            out.append(f"| [{f.stem}](docs/{f.stem}.md) | {r['run']} | `{r['command']}` | {r['protocol']} | "
                       f"{r['seeds']} | {r['interval']} | {r['machine']} | {r['date']} | `{r['summary']}` |")
    out.append("")
    for f in files:
        text = re.sub(r"^(#+) ", r"#\1 ", f.read_text().strip(), flags=re.M)  # one level down
        out += [text, ""]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(out))
    print(f"wrote BENCHMARKS.md from {len(files)} results files, {n} summary lines")


if __name__ == "__main__":
    main()
