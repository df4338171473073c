"""Shared helpers of the benchmark scripts: setup, mean +- std, and the results file."""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import warnings
from pathlib import Path

import torch


def parser(doc: str, out: str) -> argparse.ArgumentParser:
    """``--quick``, ``--seeds``, ``--threads`` and ``--out`` (default ``out``); add more as needed."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer seeds and steps (under 5 minutes on 2 cores)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3 with --quick, 5 without)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on 2 cores)")
    p.add_argument("--out", default=out, help="the results file")
    return p


def setup(args: argparse.Namespace) -> list[int]:
    """Apply ``--threads``, silence data-loader chatter; return the seeds."""
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*The number of training batches.*")
    return list(range(args.seeds or (3 if args.quick else 5)))


def fmt(values: list[float]) -> str:
    """``mean ± std`` (sample std; 0 for one value)."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def header(title: str, cmd: str, threads: int, total_s: float) -> list[str]:
    """The first lines of a results file: title, command, date, machine."""
    return [
        f"# {title}",
        "",
        f"Command: `{cmd}`  ",
        f"Date: {datetime.date.today().isoformat()}  ",
        f"Machine: CPU, 2 cores ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"{threads} intra-op thread(s); total time {total_s:.0f} s (the cores are shared with other jobs, so "
        f"times vary; the quality numbers do not depend on the load).",
        "",
    ]


def write_results(out: str, lines: list[str], summary: str, total_s: float) -> None:
    """Write ``lines`` and the summary line to ``out``, then print the summary last."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines + ["```", summary, "```", ""]))
    print(f"wrote {path} ({total_s:.0f} s)")
    print(summary)


def fit_and_test(module, datamodule, steps: int, split: str | None = "test") -> tuple[dict, float]:
    """Train ``steps`` optimiser steps without validation, then evaluate on ``split`` ("test", or "val" for
    choosing settings, or None for no evaluation); returns (metrics named ``test/...`` either way, fit seconds)."""
    import time

    import lightning as L

    if split not in ("test", "val", None):
        raise ValueError(f"split={split!r}: use 'test', 'val' or None")
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, inference_mode=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(module, datamodule)
    fit_s = time.perf_counter() - start
    if split is None:
        return {}, fit_s
    if split == "test":
        return trainer.test(module, datamodule, verbose=False)[0], fit_s
    trainer.limit_val_batches = 1.0
    metrics = trainer.validate(module, datamodule, verbose=False)[0]
    return {k.replace("val/", "test/"): v for k, v in metrics.items()}, fit_s
