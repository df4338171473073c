"""DDP with a process-group timeout that ends a run whose rank died.

A collective (all-reduce, barrier) waits for every rank. When one rank is killed, the others wait
in that collective until the process group's timeout: Lightning's default is 30 minutes, and under
``ddp_spawn`` the main process waits for them as well, so the run hangs with no output.
:class:`TimedDDPStrategy` sets the timeout (``process_group_timeout`` seconds, default 300): the
surviving ranks then fail with the collective's error and the run ends with a non-zero exit code.

The tasklight CLI uses it for ``--trainer.strategy ddp`` / ``ddp_spawn`` / ``ddp_fork`` (and their
``_find_unused_parameters_true`` variants) and takes ``--process_group_timeout``.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from lightning.pytorch.strategies import DDPStrategy

DEFAULT_PROCESS_GROUP_TIMEOUT = 300.0
_NAMED = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork"}


class TimedDDPStrategy(DDPStrategy):
    """``DDPStrategy`` whose collectives time out after ``process_group_timeout`` seconds."""

    def __init__(self, start_method: str = "popen", process_group_timeout: float = DEFAULT_PROCESS_GROUP_TIMEOUT,
                 **kwargs: Any) -> None:
        if not process_group_timeout > 0:
            raise ValueError(f"process_group_timeout must be > 0 seconds, got {process_group_timeout}")
        self.process_group_timeout = float(process_group_timeout)
        super().__init__(start_method=start_method, timeout=timedelta(seconds=process_group_timeout), **kwargs)


def timed_strategy(strategy: Any, process_group_timeout: float = DEFAULT_PROCESS_GROUP_TIMEOUT) -> Any:
    """A Lightning strategy name -> :class:`TimedDDPStrategy` where it is a DDP name; anything else as is."""
    if not isinstance(strategy, str):
        return strategy
    name, find_unused = strategy, False
    if name.endswith("_find_unused_parameters_true"):
        name, find_unused = name[: -len("_find_unused_parameters_true")], True
    if name not in _NAMED:
        return strategy
    kwargs = {"find_unused_parameters": True} if find_unused else {}
    return TimedDDPStrategy(start_method=_NAMED[name], process_group_timeout=process_group_timeout, **kwargs)
