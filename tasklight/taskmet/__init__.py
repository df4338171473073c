"""TaskMet: a learned Mahalanobis metric for the prediction loss, trained through the decisions it leads to."""
from tasklight.taskmet.module import DecisionLearner, DFLModule, MetricNet, MSEModule, TaskMetModule
from tasklight.taskmet.problems import (BudgetAllocation, CubicTopK, DecisionDataModule, DecisionProblem,
                                        PortfolioOptimization, normalize_dq)

__all__ = ["DecisionLearner", "MSEModule", "DFLModule", "TaskMetModule", "MetricNet", "DecisionProblem",
           "CubicTopK", "BudgetAllocation", "PortfolioOptimization", "DecisionDataModule", "normalize_dq"]
