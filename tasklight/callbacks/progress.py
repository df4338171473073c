"""Progress with an estimate of the time left for the whole run (not only the epoch).

* :class:`EtaProgressBar`: Lightning's progress bar with ``eta`` (the whole run, from ``max_steps``
  or ``max_epochs``) among its figures; the ``tasklight`` command uses it in a terminal.
* :class:`LineProgress`: one plain line every ``every_s`` seconds (and at the end of training), for
  output that goes to a file or a pipe, where a redrawn bar would write megabytes of control codes;
  the ``tasklight`` command uses it when its output is not a terminal.
"""
from __future__ import annotations

import sys
import time
from typing import Optional

from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

__all__ = ["EtaProgressBar", "LineProgress", "run_total_steps", "format_eta"]


def run_total_steps(trainer) -> Optional[int]:
    """The optimiser steps the run will make (``max_steps``, else ``max_epochs`` x batches), or None."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    batches = trainer.num_training_batches
    if trainer.max_epochs is not None and trainer.max_epochs > 0 and batches not in (None, float("inf")):
        return int(trainer.max_epochs * batches)
    return None


def format_eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class _Clock:
    """Seconds per step measured from the first completed step (the first one includes start-up)."""

    def __init__(self) -> None:
        self.t0: Optional[float] = None
        self.step0 = 0

    def eta(self, trainer) -> Optional[float]:
        total, step = run_total_steps(trainer), trainer.global_step
        if self.t0 is None:
            self.t0, self.step0 = time.monotonic(), step
            return None
        if total is None or step <= self.step0:
            return None
        rate = (time.monotonic() - self.t0) / (step - self.step0)
        return rate * max(0, total - step)


class EtaProgressBar(TQDMProgressBar):
    """Lightning's bar, with the time left for the whole run as ``eta``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._clock = _Clock()

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        eta = self._clock.eta(trainer) if trainer.training else None
        if eta is not None:
            items["eta"] = format_eta(eta)
        return items


class LineProgress(ProgressBar):
    """Plain progress lines: ``step 120/2000 (6 %), 0.82 s/step, eta 25m41s, train/loss 0.52``."""

    def __init__(self, every_s: float = 30.0, stream=None) -> None:
        super().__init__()
        if not every_s > 0:
            raise ValueError(f"every_s must be > 0 seconds, got {every_s}")
        self.every_s = float(every_s)
        self.stream = stream
        self._enabled = True
        self._clock = _Clock()
        self._last = 0.0
        self._start: Optional[float] = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _write(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def line(self, trainer, pl_module) -> str:
        total, step = run_total_steps(trainer), trainer.global_step
        parts = [f"step {step}/{total} ({100 * step / total:.0f} %)" if total else f"step {step}"]
        if self._start is not None and step > 0:
            parts.append(f"{(time.monotonic() - self._start) / step:.3g} s/step")
        eta = self._clock.eta(trainer)
        if eta is not None:
            parts.append(f"eta {format_eta(eta)}")
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in list(metrics.items())[:4]]
        return "tasklight: " + ", ".join(parts)

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = self._last = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._clock.t0 is None:
            self._clock.eta(trainer)  # start the clock after the first step
        if not self._enabled or not trainer.is_global_zero:
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._write(self.line(trainer, pl_module))

    def on_train_end(self, trainer, pl_module) -> None:
        if self._enabled and trainer.is_global_zero:
            self._write(self.line(trainer, pl_module))
