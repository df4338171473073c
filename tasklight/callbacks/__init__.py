"""Callbacks: per-task loss logging across DDP, gradient-conflict monitoring, Task2Vec embeddings."""
from tasklight.callbacks.gradient_conflict import GradientConflictMonitor
from tasklight.callbacks.task2vec import Task2VecCallback
from tasklight.callbacks.task_logging import TaskLossLogger, TaskMeans

__all__ = ["GradientConflictMonitor", "Task2VecCallback", "TaskLossLogger", "TaskMeans"]
