"""Callbacks: per-task loss logging across DDP, gradient-conflict monitoring, Task2Vec embeddings, figures."""
from tasklight.callbacks.figures import LearnedMetricPlot, ParetoTrajectoryPlot
from tasklight.callbacks.gradient_conflict import GradientConflictMonitor
from tasklight.callbacks.task2vec import Task2VecCallback
from tasklight.callbacks.task_logging import TaskLossLogger, TaskMeans, log_step_means, step_log_due

__all__ = ["GradientConflictMonitor", "LearnedMetricPlot", "ParetoTrajectoryPlot", "Task2VecCallback",
           "TaskLossLogger", "TaskMeans", "log_step_means", "step_log_due"]
