"""tasklight: a PyTorch Lightning framework for learning across tasks.

The layout follows the design: ``core`` (the functional inner-loop engine and implicit gradients),
one package per learner family (``meta``, ``multitask``, ``taskmet``, ``task2vec``), and the shared
pieces they use (``nn``, ``data``, ``metrics``, ``callbacks``). The main classes are importable from
here, so configs can say ``class_path: tasklight.MAMLModule``.
"""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("tasklight")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that is not installed
    __version__ = "0+unknown"

from tasklight.callbacks import GradientConflictMonitor, Task2VecCallback, TaskLossLogger  # noqa: E402
from tasklight.data import (MetaBatch, MultiTaskBatch, MultiTaskDataModule, OmniglotAlphabetsDataModule,  # noqa: E402
                            OmniglotDataModule, SinusoidDataModule, SinusoidTasksDataModule, TaskSpec)
from tasklight.meta import (IMAMLModule, MAMLModule, MAMLPlusPlusModule, MetaLearner, ProtoMAMLModule,  # noqa: E402
                            ProtoNetModule, ReptileModule)
from tasklight.meta import ClosedFormHeadModule, LogisticHeadModule, R2D2Module  # noqa: E402
from tasklight.multitask import MultiTaskModule, TwoObjectiveToyDataModule  # noqa: E402
from tasklight.multitask.registry import weightings  # noqa: E402,F401  (every weighting method, by name)
from tasklight.nn import MLP, Conv4, HistogramLoss, MahalanobisLoss  # noqa: E402
from tasklight.task2vec import Task2Vec  # noqa: E402
from tasklight.strategies import TimedDDPStrategy  # noqa: E402
from tasklight.taskmet import DecisionDataModule, DFLModule, MSEModule, TaskMetModule  # noqa: E402

__all__ = ["__version__", "MetaLearner", "MAMLModule", "IMAMLModule", "MAMLPlusPlusModule",
           "ReptileModule", "ProtoNetModule", "ProtoMAMLModule", "MultiTaskModule", "TaskMetModule",
           "MSEModule", "DFLModule", "Task2Vec", "MLP", "Conv4", "HistogramLoss", "MahalanobisLoss", "MetaBatch",
           "MultiTaskBatch", "TaskSpec", "SinusoidDataModule", "OmniglotDataModule", "MultiTaskDataModule",
           "OmniglotAlphabetsDataModule", "SinusoidTasksDataModule", "TwoObjectiveToyDataModule",
           "DecisionDataModule", "GradientConflictMonitor", "TaskLossLogger", "Task2VecCallback", "TimedDDPStrategy",
           "ClosedFormHeadModule", "R2D2Module", "LogisticHeadModule", "weightings"]
